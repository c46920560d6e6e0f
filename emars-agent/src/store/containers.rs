//! Kubernetes containers' names and peaks ([`crate::model::containers`]): named when their
//! instance opens (the names kept in `instance_state`, kind 4, for a restart), their peak
//! following each write of the instance's record, the table rebuilt at open from the live
//! instances' kept names.

use crate::model::containers::{ContainerPeak, Containers, KubernetesNames};
use crate::model::live::InstanceKey;

use super::{Store, StoreError};

impl Store {
    /// The live instance `key` of `function` is the Kubernetes container `names`: kept with
    /// the instance, and exported from now on (see [`Containers::name`] for the bound).
    pub fn name_container(
        &self,
        key: InstanceKey,
        function: &str,
        names: &KubernetesNames,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.keep_state(key, names)?;
        let peak = self.state().model.live_peak(function, key).unwrap_or(0);
        if !self
            .containers()
            .name(key, function, names.clone(), peak, now_ms)
        {
            tracing::debug!(
                pod = names.pod,
                container = names.container,
                "no room for another container series"
            );
        }
        Ok(())
    }

    /// Every container's series now (live ones, and those ended in the last minutes).
    pub fn container_peaks(&self, now_ms: u64) -> Vec<ContainerPeak> {
        let series = self.containers().current(now_ms);
        crate::model::containers::sorted(series)
    }

    /// Containers not exported for want of room since the store opened.
    pub fn containers_refused(&self) -> u64 {
        self.containers().refused
    }

    /// At open: the live instances whose names were kept, with their records' peaks.
    pub(super) fn load_containers(&self) -> Result<(), StoreError> {
        let kept = self.kept_states::<KubernetesNames>()?;
        if kept.is_empty() {
            return Ok(());
        }
        let live: std::collections::HashMap<InstanceKey, (String, u64)> = self
            .live_instances()?
            .into_iter()
            .map(|r| ((r.started_at_ms, r.cgroup_id), (r.function, r.peak_bytes)))
            .collect();
        let now = crate::clock::now_ms();
        let mut containers = self.containers();
        for (key, names) in kept {
            if let Some((function, peak)) = live.get(&key) {
                containers.name(key, function, names, *peak, now);
            }
        }
        Ok(())
    }

    pub(super) fn containers(&self) -> std::sync::MutexGuard<'_, Containers> {
        // Plain data: what a panicked writer left is still usable.
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use crate::model::containers::KubernetesNames;
    use crate::store::test_util::*;
    use crate::store::*;

    #[test]
    fn a_container_is_exported_with_its_record_peak_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let names = KubernetesNames {
            namespace: "shop".into(),
            pod: "resize-1".into(),
            container: "resize".into(),
        };
        let mut r = rec("resize", 1_000, 7);
        r.ended_at_ms = None;
        r.peak_bytes = 0;
        {
            let s = Store::open(&path).unwrap();
            s.name_container((1_000, 7), "resize", &names, 1_000)
                .unwrap();
            r.peak_bytes = 12 << 20;
            s.put_instance(&r).unwrap();
            let now = s.container_peaks(2_000);
            assert_eq!(now.len(), 1);
            assert_eq!((&now[0].names, now[0].peak_bytes), (&names, 12 << 20));
        }
        let s = Store::open(&path).unwrap();
        let now = s.container_peaks(crate::clock::now_ms());
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!((&now[0].names, now[0].peak_bytes), (&names, 12 << 20));
        // Its end: the final peak, then gone (with its kept names) after the window.
        r.peak_bytes = 13 << 20;
        r.ended_at_ms = Some(5_000);
        s.put_instance(&r).unwrap();
        assert_eq!(s.container_peaks(6_000)[0].peak_bytes, 13 << 20);
        assert!(s
            .kept_state::<KubernetesNames>((1_000, 7))
            .unwrap()
            .is_none());
        let later = 5_000 + crate::model::containers::KEEP_ENDED_MS;
        assert!(s.container_peaks(later).is_empty());
    }
}
