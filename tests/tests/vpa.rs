//! Kubernetes through VPA, without a cluster: real OCI containers (runc, busybox) carrying the
//! names the kubelet (`io.kubernetes.pod.namespace`, `io.kubernetes.pod.name`,
//! `io.kubernetes.container.name`) or containerd's CRI (`io.kubernetes.cri.sandbox-namespace`,
//! `io.kubernetes.cri.sandbox-name`, `io.kubernetes.cri.container-name`) give a container, a
//! real agent naming them from runc's state.json, one real Prometheus scraping it, and the
//! queries VPA's recommender sends with its Prometheus history provider pointed at EMARS's
//! series (docs/kubernetes.md), their text built as VPA's history_provider.go builds it: one
//! series per container, whose last value is the agent's recorded peak of that container,
//! byte for byte; a pod's sandbox and a container without Kubernetes names have none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use emars_tests::{oci::Oci, prometheus::Prometheus, *};
use serde_json::Value;

/// The scrape job, which VPA is told with `--prometheus-cadvisor-job-name`.
const JOB: &str = "emars";

/// VPA's flags for EMARS's series (docs/kubernetes.md).
struct VpaFlags {
    /// `--history-memory-metric`
    memory_metric: &'static str,
    /// `--container-pod-name-label`, `--container-name-label`, `--container-namespace-label`
    pod_label: &'static str,
    container_label: &'static str,
    namespace_label: &'static str,
    /// `--namespace` ("" : every namespace)
    namespace: &'static str,
    /// `--prometheus-cadvisor-job-name`
    job: &'static str,
}

const FLAGS: VpaFlags = VpaFlags {
    memory_metric: "emars_container_memory_peak_bytes",
    pod_label: "pod",
    container_label: "container",
    namespace_label: "namespace",
    namespace: "",
    job: JOB,
};

/// The memory history query, as kubernetes/autoscaler's
/// vertical-pod-autoscaler/pkg/recommender/input/history/history_provider.go
/// (GetClusterHistory) builds it:
///
/// ```go
/// if p.config.CadvisorMetricsJobName != "" {
///     podSelector = fmt.Sprintf("job=\"%s\", ", p.config.CadvisorMetricsJobName)
/// }
/// podSelector = podSelector + fmt.Sprintf("%s=~\".+\", %s!=\"POD\", %s!=\"\"",
///     p.config.CtrPodNameLabel, p.config.CtrNameLabel, p.config.CtrNameLabel)
/// if p.config.Namespace != "" {
///     podSelector = fmt.Sprintf("%s, %s=\"%s\"", podSelector, p.config.CtrNamespaceLabel, p.config.Namespace)
/// }
/// historicalMemoryQuery := fmt.Sprintf("%s{%s}", p.config.MemoryMetricName, podSelector)
/// ```
///
/// which readResourceHistory runs as a range query from now less `--history-length` to now,
/// every `--history-resolution`.
fn vpa_memory_query(f: &VpaFlags) -> String {
    let mut pod_selector = String::new();
    if !f.job.is_empty() {
        pod_selector = format!("job=\"{}\", ", f.job);
    }
    pod_selector += &format!(
        "{}=~\".+\", {}!=\"POD\", {}!=\"\"",
        f.pod_label, f.container_label, f.container_label
    );
    if !f.namespace.is_empty() {
        pod_selector = format!("{pod_selector}, {}=\"{}\"", f.namespace_label, f.namespace);
    }
    format!("{}{{{pod_selector}}}", f.memory_metric)
}

/// A container id as Docker and containerd make them: 64 hex digits.
fn container_id(n: u32) -> String {
    format!("{:016x}{:048x}", std::process::id(), n)
}

/// One container of the test: its annotations, what it holds, whether it keeps running.
struct Spec {
    n: u32,
    annotations: Vec<(&'static str, &'static str)>,
    mib: u64,
    stays: bool,
    /// (namespace, pod, container) VPA must see it as; None: no series.
    seen_as: Option<(&'static str, &'static str, &'static str)>,
}

fn kubelet(
    ns: &'static str,
    pod: &'static str,
    c: &'static str,
) -> Vec<(&'static str, &'static str)> {
    vec![
        ("io.kubernetes.pod.namespace", ns),
        ("io.kubernetes.pod.name", pod),
        ("io.kubernetes.container.name", c),
    ]
}

#[test]
fn vpa_history_query_returns_each_containers_recorded_peak() -> anyhow::Result<()> {
    let test = "vpa_history_query_returns_each_containers_recorded_peak";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let Some(mut runc) = Oci::new(&root, "runc")? else {
        panic!("{test}: runc or /bin/busybox (busybox-static) missing: run `cargo xtask setup`");
    };
    // Named by the container's name in either label set, from runc's state.json (into which
    // runc copies the bundle's annotations); other containers by the path rule.
    let state = format!("{}/{{id}}/state.json", runc.state_root().display());
    let extra = format!(
        r#"[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
metadata = "{state}"
function = "{{label:io.kubernetes.container.name}}"
instance = "{{id}}"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
metadata = "{state}"
function = "{{label:io.kubernetes.cri.container-name}}"
instance = "{{id}}"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
function = "oci"
instance = "{{id}}"
"#
    );
    let agent = Agent::start_configured(&root, &extra)?;
    let specs = [
        // Two containers of one pod (the kubelet's labels): one running, one that ended.
        Spec {
            n: 1,
            annotations: kubelet("shop", "resize-7f9c4", "resize"),
            mib: 40,
            stays: true,
            seen_as: Some(("shop", "resize-7f9c4", "resize")),
        },
        Spec {
            n: 2,
            annotations: kubelet("shop", "resize-7f9c4", "warmup"),
            mib: 12,
            stays: false,
            seen_as: Some(("shop", "resize-7f9c4", "warmup")),
        },
        // containerd's CRI annotations.
        Spec {
            n: 3,
            annotations: vec![
                ("io.kubernetes.cri.container-type", "container"),
                ("io.kubernetes.cri.sandbox-namespace", "media"),
                ("io.kubernetes.cri.sandbox-name", "thumb-0"),
                ("io.kubernetes.cri.container-name", "thumb"),
            ],
            mib: 24,
            stays: true,
            seen_as: Some(("media", "thumb-0", "thumb")),
        },
        // The pod's sandbox, and a container outside Kubernetes: no series.
        Spec {
            n: 4,
            annotations: kubelet("shop", "resize-7f9c4", "POD"),
            mib: 1,
            stays: true,
            seen_as: None,
        },
        Spec {
            n: 5,
            annotations: vec![],
            mib: 8,
            stays: true,
            seen_as: None,
        },
    ];
    for s in &specs {
        let id = container_id(s.n);
        // /dev/shm is the container's own tmpfs: its pages are charged to the container.
        let fill = format!(
            "dd if=/dev/zero of=/dev/shm/fill bs=1M count={} 2>/dev/null",
            s.mib
        );
        let script = if s.stays {
            format!("{fill}; exec sleep 600")
        } else {
            fill
        };
        runc.create(&id, &s.annotations, &script)?;
        runc.start(&id)?;
    }
    let ended = specs.iter().find(|s| !s.stays).map(|s| container_id(s.n));
    if let Some(id) = &ended {
        runc.wait_stopped(id, Duration::from_secs(20 * u64::from(time_scale())))?;
        runc.delete(id)?;
    }

    // The agent's record of each container: its function is its container's name.
    let record = |function: &str, id: &str| -> Option<Value> {
        agent
            .instances(function)
            .ok()?
            .into_iter()
            .find(|r| r["instance"] == id)
    };
    let function_of = |s: &Spec| -> &'static str {
        match s.seen_as {
            Some((_, _, c)) => c,
            None if s.annotations.is_empty() => "oci",
            None => "POD",
        }
    };
    for s in &specs {
        let id = container_id(s.n);
        let seen = wait_for(Duration::from_secs(20), || {
            let r = record(function_of(s), &id)?;
            // Filled (those that stay), or ended.
            let done = if s.stays {
                u64_of(&r, "peak_bytes") >= s.mib * MIB
            } else {
                !r["ended_at_ms"].is_null()
            };
            done.then_some(())
        });
        assert!(
            seen.is_some(),
            "{id} ({}): no record:\n{}",
            function_of(s),
            agent.log()
        );
    }

    let prometheus = Prometheus::scraping(JOB, &[agent.addr.as_str()], &[])?;
    let query = vpa_memory_query(&FLAGS);
    assert_eq!(
        query,
        "emars_container_memory_peak_bytes{job=\"emars\", pod=~\".+\", container!=\"POD\", container!=\"\"}"
    );
    // As VPA runs it (--history-length=10m --history-resolution=1s here): until each
    // container's last value is the agent's peak now.
    let range = || -> Option<Value> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        prometheus.query_range(&query, now - 600.0, now, 1.0).ok()
    };
    let expected: Vec<(&Spec, String)> = specs
        .iter()
        .filter(|s| s.seen_as.is_some())
        .map(|s| (s, container_id(s.n)))
        .collect();
    let settled = wait_for(Duration::from_secs(60), || {
        let answer = range()?;
        let series = Prometheus::result(&answer);
        let all = expected.iter().all(|(s, id)| {
            let (ns, pod, c) = s.seen_as.expect("expected ones are seen");
            let peak = record(function_of(s), id).map(|r| u64_of(&r, "peak_bytes"));
            series.iter().any(|r| {
                r["metric"]["namespace"] == ns
                    && r["metric"]["pod"] == pod
                    && r["metric"]["container"] == c
                    && last_value(r) == peak.map(|p| p.to_string())
            })
        });
        all.then_some(answer)
    });
    let Some(answer) = settled else {
        panic!(
            "VPA's query never returned the agent's peaks: {:?}\nagent's /metrics:\n{}\n{}",
            range(),
            ureq::get(&agent.url("/metrics")).call()?.into_string()?,
            prometheus.log()
        );
    };
    // One series per container with Kubernetes names, no other; each with the labels VPA
    // reads and the agent's recorded peak of that container as its last value.
    let series = Prometheus::result(&answer);
    assert_eq!(series.len(), expected.len(), "{answer}");
    for (s, id) in &expected {
        let (ns, pod, c) = s.seen_as.expect("expected ones are seen");
        let mine: Vec<&Value> = series
            .iter()
            .filter(|r| r["metric"]["pod"] == pod && r["metric"]["container"] == c)
            .collect();
        assert_eq!(mine.len(), 1, "{pod}/{c}: {answer}");
        let m = &mine[0]["metric"];
        assert_eq!(m["namespace"], ns, "{m}");
        assert_eq!(m["job"], JOB, "{m}");
        assert_eq!(m["function"], function_of(s), "{m}");
        let rec = record(function_of(s), id).expect("recorded above");
        let peak = u64_of(&rec, "peak_bytes");
        assert_eq!(last_value(mine[0]), Some(peak.to_string()), "{rec}");
        assert!(peak >= s.mib * MIB, "{rec}");
        println!(
            "{ns}/{pod}/{c}: {peak} bytes (ended: {})",
            !rec["ended_at_ms"].is_null()
        );
    }

    // VPA reads each pod's last labels with --metric-for-pod-labels as an instant query that
    // must answer a matrix (readLastLabels): a range selector of the same series, with
    // --pod-namespace-label=namespace --pod-name-label=pod.
    let labels = prometheus.query(&format!("{}{{job=\"{JOB}\"}}[10m]", FLAGS.memory_metric))?;
    assert_eq!(labels["data"]["resultType"], "matrix", "{labels}");
    let pods: std::collections::BTreeSet<(String, String)> = Prometheus::result(&labels)
        .iter()
        .map(|r| {
            let m = &r["metric"];
            (
                m["namespace"].as_str().unwrap_or_default().to_owned(),
                m["pod"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: std::collections::BTreeSet<(String, String)> =
        [("media", "thumb-0"), ("shop", "resize-7f9c4")]
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
    assert_eq!(pods, want);
    Ok(())
}

/// The last value of a range query's series, as Prometheus wrote it.
fn last_value(series: &Value) -> Option<String> {
    series["values"]
        .as_array()?
        .last()?
        .get(1)?
        .as_str()
        .map(str::to_owned)
}
