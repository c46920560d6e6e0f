//! Kubernetes containers among the instances: the names (namespace, pod, container) their
//! runtime's metadata carries, and each one's exact peak so far, which /metrics exports as
//! `emars_container_memory_peak_bytes{namespace, pod, container, function}` in the label names
//! VPA's Prometheus history provider reads.
//!
//! The names come from the labels a rule with `metadata` reads: the kubelet's (dockershim,
//! cri-dockerd) `io.kubernetes.pod.namespace`, `io.kubernetes.pod.name` and
//! `io.kubernetes.container.name`, or containerd CRI's `io.kubernetes.cri.sandbox-namespace`,
//! `io.kubernetes.cri.sandbox-name` and `io.kubernetes.cri.container-name` (runc copies them
//! from the bundle's annotations into its state.json). A pod's sandbox (`POD`, or CRI's
//! `container-type` `sandbox`) is no workload: it gets no series.
//!
//! The series are bounded: live instances with names, and those that ended in the last
//! [`KEEP_ENDED_MS`] (so that the peak an instance's end recorded is scraped), at most
//! [`MAX_CONTAINERS`]; past that the ones that ended longest ago go first, and a new container
//! finding only live ones is not exported (counted in [`Containers::refused`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::kept::KeptState;
use super::live::InstanceKey;
use super::runtime::Labels;
use super::InstanceRecord;

/// How long an ended container's series stays.
pub const KEEP_ENDED_MS: u64 = 10 * 60_000;

/// At most this many containers have a series.
pub const MAX_CONTAINERS: usize = 10_000;

/// A container's names in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesNames {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Kept with the live instance (`instance_state`), so that a restarted agent exports the
/// containers of the last run.
impl KeptState for KubernetesNames {
    const KIND: u8 = 4;
    const NAME: &'static str = "kubernetes names";
}

impl KubernetesNames {
    /// The names in a container's labels (see the module's doc); None when one is missing or
    /// empty, or for a pod's sandbox.
    pub fn from_labels(labels: &Labels) -> Option<KubernetesNames> {
        let get = |keys: [&str; 2]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        if labels
            .get("io.kubernetes.cri.container-type")
            .map(String::as_str)
            == Some("sandbox")
        {
            return None;
        }
        let names = KubernetesNames {
            namespace: get([
                "io.kubernetes.pod.namespace",
                "io.kubernetes.cri.sandbox-namespace",
            ])?,
            pod: get(["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"])?,
            container: get([
                "io.kubernetes.container.name",
                "io.kubernetes.cri.container-name",
            ])?,
        };
        (names.container != "POD").then_some(names)
    }
}

/// One container's series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPeak {
    pub names: KubernetesNames,
    pub function: String,
    /// The instance's peak so far (its record's `peak_bytes`).
    pub peak_bytes: u64,
    pub ended_at_ms: Option<u64>,
}

/// The containers with a series, by instance.
#[derive(Debug, Default)]
pub struct Containers {
    by_instance: HashMap<InstanceKey, ContainerPeak>,
    /// Containers not exported because [`MAX_CONTAINERS`] live ones were.
    pub refused: u64,
}

impl Containers {
    /// The instance `key` of `function` is the container `names`, its peak `peak_bytes` so
    /// far. False when there is no room (see the module's doc).
    pub fn name(
        &mut self,
        key: InstanceKey,
        function: &str,
        names: KubernetesNames,
        peak_bytes: u64,
        now_ms: u64,
    ) -> bool {
        if !self.by_instance.contains_key(&key) && !self.room(now_ms) {
            self.refused += 1;
            return false;
        }
        self.by_instance.insert(
            key,
            ContainerPeak {
                names,
                function: function.to_owned(),
                peak_bytes,
                ended_at_ms: None,
            },
        );
        true
    }

    /// A version of an instance's record: its container's peak and end follow it.
    pub fn record(&mut self, rec: &InstanceRecord) {
        if let Some(c) = self
            .by_instance
            .get_mut(&(rec.started_at_ms, rec.cgroup_id))
        {
            c.peak_bytes = rec.peak_bytes;
            c.ended_at_ms = rec.ended_at_ms;
            c.function.clone_from(&rec.function);
        }
    }

    /// The series now, in no order (see [`sorted`]): those that ended before the window are
    /// dropped first.
    pub fn current(&mut self, now_ms: u64) -> Vec<ContainerPeak> {
        self.forget_ended(now_ms);
        self.by_instance.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }

    /// Room for one more: after the ended ones out of the window go, the one that ended
    /// longest ago makes room if need be.
    fn room(&mut self, now_ms: u64) -> bool {
        if self.by_instance.len() < MAX_CONTAINERS {
            return true;
        }
        self.forget_ended(now_ms);
        if self.by_instance.len() < MAX_CONTAINERS {
            return true;
        }
        let oldest = self
            .by_instance
            .iter()
            .filter_map(|(k, c)| Some((c.ended_at_ms?, *k)))
            .min();
        match oldest {
            Some((_, key)) => {
                self.by_instance.remove(&key);
                true
            }
            None => false,
        }
    }

    fn forget_ended(&mut self, now_ms: u64) {
        self.by_instance.retain(|_, c| {
            c.ended_at_ms
                .is_none_or(|end| end.saturating_add(KEEP_ENDED_MS) > now_ms)
        });
    }
}

impl KubernetesNames {
    fn cmp_key(&self) -> (&str, &str, &str) {
        (&self.namespace, &self.pod, &self.container)
    }
}

/// Series sorted by namespace, pod, container (outside the lock that `current` is read under).
pub fn sorted(mut series: Vec<ContainerPeak>) -> Vec<ContainerPeak> {
    series.sort_by(|a, b| a.names.cmp_key().cmp(&b.names.cmp_key()));
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(pod: &str) -> KubernetesNames {
        KubernetesNames {
            namespace: "ns".into(),
            pod: pod.into(),
            container: "c".into(),
        }
    }

    #[test]
    fn names_from_the_kubelet_or_containerd_labels() {
        let kubelet = labels(&[
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.name", "resize-7f9"),
            ("io.kubernetes.container.name", "resize"),
        ]);
        let want = KubernetesNames {
            namespace: "shop".into(),
            pod: "resize-7f9".into(),
            container: "resize".into(),
        };
        assert_eq!(KubernetesNames::from_labels(&kubelet), Some(want.clone()));
        let cri = labels(&[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
            ("io.kubernetes.cri.sandbox-name", "resize-7f9"),
            ("io.kubernetes.cri.container-name", "resize"),
        ]);
        assert_eq!(KubernetesNames::from_labels(&cri), Some(want));
        // A sandbox, a missing or empty name: no series.
        let sandbox = labels(&[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
            ("io.kubernetes.cri.sandbox-name", "resize-7f9"),
            ("io.kubernetes.cri.container-name", "x"),
        ]);
        assert_eq!(KubernetesNames::from_labels(&sandbox), None);
        let pause = labels(&[
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.name", "resize-7f9"),
            ("io.kubernetes.container.name", "POD"),
        ]);
        assert_eq!(KubernetesNames::from_labels(&pause), None);
        let no_pod = labels(&[
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.name", ""),
            ("io.kubernetes.container.name", "resize"),
        ]);
        assert_eq!(KubernetesNames::from_labels(&no_pod), None);
    }

    fn record(key: InstanceKey, peak: u64, ended: Option<u64>) -> InstanceRecord {
        InstanceRecord {
            function: "f".into(),
            instance: "i".into(),
            cgroup_id: key.1,
            cgroup_path: "/x".into(),
            started_at_ms: key.0,
            ended_at_ms: ended,
            execs: 0,
            peak_bytes: peak,
            peak_source: crate::model::PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Default::default(),
            input_bytes: None,
            connections: 0,
            requests: 0,
        }
    }

    #[test]
    fn peaks_follow_the_records_and_ended_ones_go_after_the_window() {
        let mut c = Containers::default();
        assert!(c.name((1, 1), "f", names("a"), 0, 0));
        c.record(&record((1, 1), 5 << 20, None));
        c.record(&record((2, 2), 9 << 20, None)); // no names: no series
        let now = c.current(10);
        assert_eq!(now.len(), 1);
        assert_eq!((now[0].peak_bytes, now[0].ended_at_ms), (5 << 20, None));
        c.record(&record((1, 1), 7 << 20, Some(100)));
        assert_eq!(c.current(100 + KEEP_ENDED_MS - 1)[0].peak_bytes, 7 << 20);
        assert!(c.current(100 + KEEP_ENDED_MS).is_empty());
    }

    #[test]
    fn at_the_cap_the_longest_ended_go_and_live_ones_stay() {
        let mut c = Containers::default();
        for i in 0..MAX_CONTAINERS as u64 {
            assert!(c.name((i, i), "f", names(&format!("p{i}")), 1, 0));
        }
        // All live: a new one finds no room.
        assert!(!c.name((u64::MAX, 0), "f", names("new"), 1, 0));
        assert_eq!(c.refused, 1);
        // Two ended (in the window): the one that ended first makes room.
        c.record(&record((3, 3), 1, Some(50)));
        c.record(&record((4, 4), 1, Some(40)));
        assert!(c.name((u64::MAX, 0), "f", names("new"), 1, 60));
        assert_eq!(c.len(), MAX_CONTAINERS);
        let pods: Vec<String> = sorted(c.current(60))
            .into_iter()
            .map(|p| p.names.pod)
            .collect();
        assert!(pods.contains(&"p3".to_string()) && !pods.contains(&"p4".to_string()));
        assert!(pods.contains(&"new".to_string()));
    }
}
