//! The state machine alone: a table of cgroups stands in for the files (the integration
//! tests run the same code against real cgroups and real eBPF events).

use std::cell::RefCell;

use super::*;
use crate::kernel::events::KernelEvent;
use crate::model::{
    kept::RuntimeLimitSource, registry::RootConfig, runtime::MetadataRead, PeakSource,
};

const MIB: u64 = 1 << 20;

/// Cgroups by relative path: (id, limits, watermark); processes by pid.
#[derive(Default)]
struct Table {
    cgroups: RefCell<HashMap<String, (u64, Limits, u64)>>,
    procs: HashMap<u32, String>,
    /// Container metadata files and their labels.
    meta: RefCell<HashMap<PathBuf, crate::model::runtime::Labels>>,
}

impl Table {
    fn add(&self, rel: &str, id: u64) {
        self.cgroups
            .borrow_mut()
            .insert(rel.to_owned(), (id, Limits::default(), 0));
    }
    fn set_max(&self, rel: &str, max: u64) {
        if let Some(c) = self.cgroups.borrow_mut().get_mut(rel) {
            c.1.max_bytes = Some(max);
        }
    }
    fn set_peak(&self, rel: &str, peak: u64) {
        if let Some(c) = self.cgroups.borrow_mut().get_mut(rel) {
            c.2 = peak;
        }
    }
    fn remove(&self, rel: &str) {
        self.cgroups.borrow_mut().remove(rel);
    }
    fn rel(dir: &Path) -> String {
        dir.to_string_lossy().trim_start_matches("/cg").to_owned()
    }
}

impl Cgroups for &Table {
    fn dir(&self, rel_path: &str) -> PathBuf {
        PathBuf::from(format!("/cg{rel_path}"))
    }
    fn rel_path(&self, dir: &Path) -> Option<String> {
        Some(Table::rel(dir))
    }
    fn limits(&self, dir: &Path) -> Result<Limits, CgroupfsError> {
        let c = self.cgroups.borrow();
        c.get(&Table::rel(dir))
            .map(|c| c.1)
            .ok_or(CgroupfsError::Gone {
                path: dir.to_path_buf(),
            })
    }
    fn peak(&self, dir: &Path) -> Result<Option<u64>, CgroupfsError> {
        let c = self.cgroups.borrow();
        c.get(&Table::rel(dir))
            .map(|c| Some(c.2))
            .ok_or(CgroupfsError::Gone {
                path: dir.to_path_buf(),
            })
    }
    fn cgroup_of(&self, pid: u32) -> Option<String> {
        self.procs.get(&pid).cloned()
    }
    fn cgroup_id(&self, dir: &Path) -> Option<u64> {
        self.cgroups.borrow().get(&Table::rel(dir)).map(|c| c.0)
    }
    fn find_by_id(&self, dir: &Path, id: u64) -> Option<PathBuf> {
        let under = Table::rel(dir);
        self.cgroups
            .borrow()
            .iter()
            .find(|(rel, c)| c.0 == id && rel.starts_with(&under))
            .map(|(rel, _)| self.dir(rel))
    }
    /// The pseudo-label `memory` stands for the runtime's memory limit in the file.
    fn metadata(&self, file: &Path) -> ContainerMetadata {
        let meta = self.meta.borrow();
        let Some(labels) = meta.get(file) else {
            return MetadataRead::Absent.into();
        };
        ContainerMetadata {
            read: MetadataRead::Labels(labels.clone()),
            memory_limit_bytes: labels.get("memory").and_then(|m| m.parse().ok()),
        }
    }
}

/// runc's layout: `/docker/<id>` named by the `fn` label of `/run/runc/<id>/state.json`,
/// else "docker".
fn runc_tracker(table: &Table) -> Tracker<&Table> {
    let toml = r#"
[[cgroup.roots]]
path = "/docker"
[[cgroup.roots.rules]]
pattern = "{id}"
metadata = "/run/runc/{id}/state.json"
function = "{label:fn}"
instance = "{id}"
[[cgroup.roots.rules]]
pattern = "{id}"
function = "docker"
instance = "{id}"
"#;
    let config = crate::config::Config::from_toml_str(toml).unwrap();
    Tracker::new(table, Registry::new(&config.cgroup.roots).unwrap()).with_metadata_wait_ms(5_000)
}

fn exec(id: u64) -> KernelEvent {
    KernelEvent::Exec {
        id,
        pid: 1,
        filename: "/bin/sh".into(),
    }
}

fn label_file(table: &Table, id: &str, pairs: &[(&str, &str)]) {
    table.meta.borrow_mut().insert(
        PathBuf::from(format!("/run/runc/{id}/state.json")),
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
}

/// A container's cgroup is made before runc writes its state: the instance opens when the
/// file is there (at an exec), with the execs seen meanwhile and its limits due from the
/// mkdir; without the file it waits, then the path rule names it; removed while waiting,
/// it is named with what there is then and closed with its exact peak.
#[test]
fn containers_wait_for_their_runtime_metadata() {
    let table = Table::default();
    for (rel, id) in [("/docker/aa", 40), ("/docker/bb", 41), ("/docker/cc", 42)] {
        table.add(rel, id);
    }
    table.add("/docker/old", 43);
    let mut t = runc_tracker(&table);
    assert!(t.apply(mkdir(40, "/docker/aa"), 1_000, 7).is_empty());
    assert_eq!(t.pending_count(), 1);
    assert!(t.apply(exec(40), 1_010, 8).is_empty(), "no file yet");
    assert!(t.live_record(40).is_none());
    label_file(&table, "aa", &[("fn", "resize"), ("bundle", "/b/aa")]);
    let fx = t.apply(exec(40), 1_020, 9);
    let Some(Effect::Enforce {
        record,
        mkdir_ts_ns,
    }) = fx.first()
    else {
        panic!("limits first: {fx:?}")
    };
    assert_eq!(
        (record.function.as_str(), record.instance.as_str()),
        ("resize", "aa")
    );
    assert_eq!((record.started_at_ms, *mkdir_ts_ns), (1_000, Some(7)));
    t.enforced(40, None);
    assert_eq!(t.live_record(40).unwrap().execs, 2, "both execs counted");
    assert_eq!(t.pending_count(), 0);

    // No file: waits its time out, then the path rule decides.
    t.apply(mkdir(41, "/docker/bb"), 2_000, 10);
    assert!(t.settle_pending(6_999).is_empty());
    let fx = t.settle_pending(7_000);
    assert!(
        matches!(fx.first(), Some(Effect::Enforce { record, .. }) if record.function == "docker"),
        "{fx:?}"
    );
    assert_eq!(t.live_record(41).unwrap().function, "docker");

    // A file without the label: the path rule, at once (the file is there).
    label_file(&table, "cc", &[("other", "x")]);
    t.apply(mkdir(42, "/docker/cc"), 3_000, 11);
    assert_eq!(t.live_record(42).unwrap().function, "docker");
    assert_eq!(t.pending_count(), 0);
    // The same after a wait: a fallback, not a name from metadata.
    table.add("/docker/ee", 45);
    t.apply(mkdir(45, "/docker/ee"), 3_500, 12);
    label_file(&table, "ee", &[("other", "x")]);
    t.apply(exec(45), 3_600, 13);
    assert_eq!(t.live_record(45).unwrap().function, "docker");

    // Removed while waiting: named now, closed with the rmdir's watermark.
    table.add("/docker/dd", 44);
    t.apply(mkdir(44, "/docker/dd"), 4_000, 12);
    label_file(&table, "dd", &[("fn", "short")]);
    let fx = t.apply(
        KernelEvent::CgroupRmdir {
            id: 44,
            path: String::new(),
            peak: 0,
            watermark: 9 * MIB,
        },
        4_050,
        13,
    );
    let closed = saved(&fx);
    let last = closed.last().expect("a closed record");
    assert_eq!(
        (last.function.as_str(), last.peak_bytes),
        ("short", 9 * MIB)
    );
    assert_eq!(last.ended_at_ms, Some(4_050));

    // There before the agent: its runtime's file is not waited for.
    t.add_cgroup(
        43,
        "/docker/old",
        500,
        None,
        Found::Existing {
            new_since_start: false,
        },
    );
    assert_eq!(t.live_record(43).unwrap().function, "docker");
    assert_eq!(
        (
            t.stats.metadata_waits,
            t.stats.metadata_named,
            t.stats.metadata_fallbacks
        ),
        (4, 2, 2)
    );
}

/// A new instance's runtime limit is kept before its limits are written: from its
/// runtime's metadata, or memory.max as found before the agent wrote anything, the lower
/// of the two; none for a resumed instance (kept from its first run) or without either.
#[test]
fn a_new_instance_keeps_its_runtime_limit_before_its_limits() {
    let table = Table::default();
    let mut t = runc_tracker(&table);
    let runtime_limit = |fx: &[Effect]| {
        let at = fx
            .iter()
            .position(|e| matches!(e, Effect::RuntimeLimit { .. }))?;
        let enforce = fx.iter().position(|e| matches!(e, Effect::Enforce { .. }));
        assert!(
            enforce.is_none_or(|e| at < e),
            "kept before the write: {fx:?}"
        );
        match &fx[at] {
            Effect::RuntimeLimit { key, limit } => Some((*key, limit.bytes, limit.source)),
            _ => None,
        }
    };
    // runc wrote its state (and its limit) before the agent looked.
    table.add("/docker/aa", 50);
    table.set_max("/docker/aa", 64 * MIB);
    label_file(&table, "aa", &[("fn", "f"), ("memory", "67108864")]);
    let fx = t.apply(mkdir(50, "/docker/aa"), 1_000, 1);
    assert_eq!(
        runtime_limit(&fx),
        Some(((1_000, 50), 64 * MIB, RuntimeLimitSource::Metadata))
    );
    // The metadata says nothing of memory: memory.max as first seen.
    table.add("/docker/bb", 51);
    table.set_max("/docker/bb", 32 * MIB);
    label_file(&table, "bb", &[("fn", "f")]);
    let fx = t.apply(mkdir(51, "/docker/bb"), 1_100, 2);
    assert_eq!(
        runtime_limit(&fx),
        Some(((1_100, 51), 32 * MIB, RuntimeLimitSource::FirstSeen))
    );
    // The runtime set a lower limit than its metadata asked: the lower one.
    table.add("/docker/cc", 52);
    table.set_max("/docker/cc", 16 * MIB);
    label_file(&table, "cc", &[("fn", "f"), ("memory", "67108864")]);
    let fx = t.apply(mkdir(52, "/docker/cc"), 1_200, 3);
    assert_eq!(runtime_limit(&fx).map(|r| r.1), Some(16 * MIB));
    // No limit anywhere: nothing kept.
    table.add("/docker/dd", 53);
    label_file(&table, "dd", &[("fn", "f")]);
    let fx = t.apply(mkdir(53, "/docker/dd"), 1_300, 4);
    assert_eq!(runtime_limit(&fx), None);
    // Resumed after a restart: its memory.max may be the agent's own by now.
    table.add("/docker/ee", 54);
    table.set_max("/docker/ee", 8 * MIB);
    let mut resumed = t.live_record(50).unwrap().clone();
    resumed.cgroup_id = 54;
    resumed.cgroup_path = "/cg/docker/ee".into();
    let fx = t.add_cgroup(
        54,
        "/docker/ee",
        1_000,
        Some(resumed),
        Found::Existing {
            new_since_start: false,
        },
    );
    assert_eq!(runtime_limit(&fx), None, "{fx:?}");
}

/// A new instance whose container's metadata names it in Kubernetes is named so (once, when
/// it opens, also after waiting for the file); one without the names, or resumed, is not.
#[test]
fn a_kubernetes_container_is_named_when_it_opens() {
    let table = Table::default();
    let mut t = runc_tracker(&table);
    let named = |fx: &[Effect]| -> Vec<((u64, u64), String, String)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::ContainerNames {
                    key,
                    function,
                    names,
                } => Some((
                    *key,
                    function.clone(),
                    format!("{}/{}/{}", names.namespace, names.pod, names.container),
                )),
                _ => None,
            })
            .collect()
    };
    let k8s = [
        ("fn", "f"),
        ("io.kubernetes.pod.namespace", "shop"),
        ("io.kubernetes.pod.name", "resize-1"),
        ("io.kubernetes.container.name", "resize"),
    ];
    table.add("/docker/aa", 70);
    label_file(&table, "aa", &k8s);
    let fx = t.apply(mkdir(70, "/docker/aa"), 1_000, 1);
    assert_eq!(
        named(&fx),
        [(
            (1_000, 70),
            "f".to_string(),
            "shop/resize-1/resize".to_string()
        )]
    );
    // Its file written after the mkdir: named when the instance opens.
    table.add("/docker/bb", 71);
    let fx = t.apply(mkdir(71, "/docker/bb"), 1_100, 2);
    assert!(named(&fx).is_empty(), "{fx:?}");
    label_file(&table, "bb", &k8s);
    let fx = t.settle_pending(1_200);
    assert_eq!(named(&fx).len(), 1, "{fx:?}");
    // No Kubernetes names.
    table.add("/docker/cc", 72);
    label_file(&table, "cc", &[("fn", "f")]);
    assert!(named(&t.apply(mkdir(72, "/docker/cc"), 1_300, 3)).is_empty());
    // Resumed: its names were kept with it.
    table.add("/docker/dd", 73);
    label_file(&table, "dd", &k8s);
    let mut resumed = t.live_record(70).unwrap().clone();
    resumed.cgroup_id = 73;
    let fx = t.add_cgroup(
        73,
        "/docker/dd",
        1_000,
        Some(resumed),
        Found::Existing {
            new_since_start: false,
        },
    );
    assert!(named(&fx).is_empty(), "{fx:?}");
}

/// After a kill -9 that came before a new instance's record was saved, the next agent sees
/// the cgroup as new; the memory.max in it is the last agent's own write (the audit says
/// so), not a runtime's limit. A value the audit does not name still is one.
#[test]
fn the_last_agents_own_write_is_no_runtime_limit() {
    let table = Table::default();
    let own = HashMap::from([(60, 36 * MIB), (61, 36 * MIB)]);
    let mut t = runc_tracker(&table).with_own_writes(own);
    let runtime_limit = |fx: &[Effect]| {
        fx.iter().find_map(|e| match e {
            Effect::RuntimeLimit { limit, .. } => Some(limit.bytes),
            _ => None,
        })
    };
    table.add("/docker/ff", 60);
    table.set_max("/docker/ff", 36 * MIB);
    label_file(&table, "ff", &[("fn", "f")]);
    let fx = t.apply(mkdir(60, "/docker/ff"), 1_000, 1);
    assert_eq!(runtime_limit(&fx), None, "{fx:?}");
    // Another value than the agent wrote: someone else's, the runtime's.
    table.add("/docker/gg", 61);
    table.set_max("/docker/gg", 20 * MIB);
    label_file(&table, "gg", &[("fn", "f")]);
    let fx = t.apply(mkdir(61, "/docker/gg"), 1_100, 2);
    assert_eq!(runtime_limit(&fx), Some(20 * MIB), "{fx:?}");
}

fn tracker(table: &Table) -> Tracker<&Table> {
    let registry = Registry::new(&[RootConfig {
        path: "/emars".into(),
        rules: Vec::new(),
        create: true,
    }])
    .unwrap();
    Tracker::new(table, registry)
}

fn mkdir(id: u64, path: &str) -> KernelEvent {
    KernelEvent::CgroupMkdir {
        id,
        path: path.into(),
        level: 3,
        truncated: false,
    }
}

fn rmdir(id: u64) -> KernelEvent {
    KernelEvent::CgroupRmdir {
        id,
        path: String::new(),
        peak: 0,
        watermark: 0,
    }
}

fn saved(effects: &[Effect]) -> Vec<&InstanceRecord> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Save(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// A pooled cgroup bound twice in a row: each use is an instance of its own, started at
/// bind, closed at release with that use's reading; wrong binds and releases say why.
#[test]
fn pooled_cgroup_uses_are_instances_of_their_own() {
    let table = Table::default();
    table.add("/emars/cg-1", 30);
    table.add("/emars/fn/i1", 31);
    let mut t = tracker(&table);
    t.apply(mkdir(30, "/emars/cg-1"), 1_000, 1);
    t.apply(mkdir(31, "/emars/fn/i1"), 1_000, 2);
    t.enforced(31, None);
    assert!(
        t.live_record(30).is_none(),
        "a pool slot is no instance by itself"
    );
    let (id, fx) = t.bind("/emars/cg-1", 30, "fa", "a1", None, 2_000).unwrap();
    assert_eq!(id, 30);
    assert!(
        matches!(
            fx.as_slice(),
            [
                Effect::Enforce {
                    mkdir_ts_ns: None,
                    ..
                },
                Effect::AddHour { .. }
            ]
        ),
        "{fx:?}"
    );
    t.enforced(30, None);
    assert!(matches!(
        t.bind("/emars/cg-1", 30, "fb", "b1", None, 2_100),
        Err(BindError::AlreadyBound { .. })
    ));
    table.set_peak("/emars/cg-1", 100 * MIB);
    let (a, fx) = t.release("/emars/cg-1", 3_000).unwrap();
    assert_eq!(
        (a.function.as_str(), a.peak_bytes, a.ended_at_ms),
        ("fa", 100 * MIB, Some(3_000))
    );
    assert_eq!(a.peak_source, PeakSource::LifetimeWatermark);
    assert_eq!(saved(&fx).len(), 1);
    assert!(matches!(
        t.release("/emars/cg-1", 3_100),
        Err(BindError::NotBound { .. })
    ));
    // The slot lives on: bound again, then removed while bound.
    t.bind("/emars/cg-1", 30, "fb", "b1", None, 4_000).unwrap();
    t.enforced(30, None);
    let fx = t.apply(rmdir(30), 5_000, 3);
    let b = saved(&fx);
    assert_eq!(
        (b[0].function.as_str(), b[0].ended_at_ms),
        ("fb", Some(5_000))
    );
    for (path, id, want) in [
        ("/emars/fn/i1", 31, "path rules"),
        ("/emars", 1, "not inside"),
        ("/other/x", 1, "not inside"),
        ("/emars/cg-9", 1, "no cgroup"),
        ("/emars/../x", 1, "without . or .."),
        // Removed and created again (id 30 then) after the bind was asked for.
        ("/emars/cg-1", 29, "removed and created again"),
    ] {
        let e = t.bind(path, id, "fc", "c1", None, 6_000).unwrap_err();
        assert!(e.to_string().contains(want), "{path}: {e}");
    }
    assert!(matches!(
        t.bind("/emars/cg-1", 30, "bad name", "c1", None, 6_000),
        Err(BindError::Invalid(_))
    ));
}

/// A cap of two functions, counted as a store would: the names it holds, in order.
struct TwoFunctions(std::sync::Mutex<Vec<String>>);

impl FunctionAdmission for TwoFunctions {
    fn admit(&self, function: &str, _at_ms: u64) -> Result<(), FunctionsFull> {
        let mut known = self.0.lock().unwrap();
        if known.iter().any(|k| k == function) || known.len() < 2 {
            if !known.iter().any(|k| k == function) {
                known.push(function.to_owned());
            }
            return Ok(());
        }
        Err(FunctionsFull {
            function: function.to_owned(),
            max: 2,
        })
    }
}

/// Past the cap, a new function's instance is not tracked at all (no limits, no record,
/// nothing for its execs or its rmdir), and a bind under a new name is refused; instances
/// of functions already admitted go on as before, and a resumed record is not asked about.
#[test]
fn refused_functions_are_not_tracked() {
    let table = Table::default();
    for (rel, id) in [
        ("/emars/fa/1", 1),
        ("/emars/fb/1", 2),
        ("/emars/fc/1", 3),
        ("/emars/fa/2", 4),
        ("/emars/cg-1", 5),
        ("/emars/fd/1", 6),
    ] {
        table.add(rel, id);
    }
    let mut t = tracker(&table).with_admission(Box::new(TwoFunctions(Default::default())));
    for (id, rel) in [(1, "/emars/fa/1"), (2, "/emars/fb/1")] {
        assert!(!t.apply(mkdir(id, rel), 1_000, 1).is_empty());
        t.enforced(id, None);
    }
    assert!(t.apply(mkdir(3, "/emars/fc/1"), 1_100, 2).is_empty());
    assert!(t.live_record(3).is_none());
    assert_eq!(t.stats.functions_refused, 1);
    assert!(t.apply(exec(3), 1_200, 3).is_empty(), "its exec");
    assert!(t.apply(rmdir(3), 1_300, 4).is_empty(), "its rmdir");
    // A known function's new instance is tracked past the cap.
    let fx = t.apply(mkdir(4, "/emars/fa/2"), 1_400, 5);
    assert!(
        matches!(fx.first(), Some(Effect::Enforce { record, .. }) if record.function == "fa"),
        "{fx:?}"
    );
    t.enforced(4, None);
    t.apply(mkdir(5, "/emars/cg-1"), 1_500, 6);
    match t.bind("/emars/cg-1", 5, "fnew", "x", None, 1_600) {
        Err(e @ BindError::FunctionsFull(_)) => {
            assert!(e.to_string().contains("store.max_functions = 2"), "{e}")
        }
        other => panic!("expected FunctionsFull, got {other:?}"),
    }
    assert!(t.live_record(5).is_none());
    t.bind("/emars/cg-1", 5, "fb", "x", None, 1_700).unwrap();
    // The last run's live record: its function is known to the store, no question asked.
    let mut resumed = InstanceRecord {
        function: "fd".into(),
        instance: "1".into(),
        cgroup_id: 6,
        cgroup_path: "/cg/emars/fd/1".into(),
        started_at_ms: 500,
        ended_at_ms: None,
        execs: 0,
        peak_bytes: 0,
        peak_source: PeakSource::None,
        oom_kills: 0,
        limits: Limits::default(),
        input_bytes: None,
        connections: 0,
        requests: 0,
    };
    resumed.execs = 1;
    t.add_cgroup(
        6,
        "/emars/fd/1",
        500,
        Some(resumed),
        Found::Existing {
            new_since_start: false,
        },
    );
    assert_eq!(t.live_record(6).map(|r| r.execs), Some(1));
    assert_eq!(t.stats.functions_refused, 1);
}

/// A new instance: limits first (nothing saved until the enforcement is answered), then
/// the record with the limits it got.
#[test]
fn mkdir_enforces_before_saving() {
    let table = Table::default();
    table.add("/emars/fn/i1", 10);
    let mut t = tracker(&table);
    let fx = t.apply(mkdir(10, "/emars/fn/i1"), 1_000, 77);
    match fx.as_slice() {
        [Effect::Enforce {
            record,
            mkdir_ts_ns: Some(77),
        }, Effect::AddHour {
            function,
            at_ms: 1_000,
            delta,
        }] => {
            assert_eq!(
                (record.function.as_str(), record.instance.as_str()),
                ("fn", "i1")
            );
            assert_eq!(function, "fn");
            assert_eq!(delta.instances_started, 1);
        }
        other => panic!("unexpected effects {other:?}"),
    }
    let limits = Limits {
        max_bytes: Some(64 * MIB),
        high_bytes: Some(60 * MIB),
    };
    let fx = t.enforced(10, Some(limits));
    assert_eq!(saved(&fx).len(), 1);
    assert_eq!(saved(&fx)[0].limits, limits);
    // Answered once: a second answer does nothing.
    assert!(t.enforced(10, None).is_empty());
}

/// Instances of a function that ended since the last tick make its next new instance
/// recompute the recommendation before the limits are written; the tick recomputes the
/// others, once.
#[test]
fn ended_instances_recompute_before_the_next_enforcement() {
    let table = Table::default();
    table.add("/emars/fn/a", 1);
    table.add("/emars/gn/b", 2);
    let mut t = tracker(&table);
    for (id, p) in [(1, "/emars/fn/a"), (2, "/emars/gn/b")] {
        t.apply(mkdir(id, p), 0, 0);
        t.enforced(id, None);
    }
    table.set_peak("/emars/fn/a", 5 * MIB);
    for (id, p) in [(1, "/emars/fn/a"), (2, "/emars/gn/b")] {
        let fx = t.apply(
            KernelEvent::CgroupRmdir {
                id,
                path: p.into(),
                peak: 0,
                watermark: 7 * MIB,
            },
            50,
            0,
        );
        let s = saved(&fx);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].ended_at_ms, s[0].peak_bytes), (Some(50), 7 * MIB));
        assert_eq!(s[0].peak_source, PeakSource::KernelWatermark);
        table.remove(p);
    }
    table.add("/emars/fn/c", 3);
    let fx = t.apply(mkdir(3, "/emars/fn/c"), 60, 0);
    assert!(
        matches!(&fx[..2], [Effect::Recompute { function, .. }, Effect::Enforce { .. }] if function == "fn"),
        "{fx:?}"
    );
    assert_eq!(
        t.recompute_dirty(70),
        vec![Effect::Recompute {
            function: "gn".into(),
            at_ms: 70
        }]
    );
    assert!(t.recompute_dirty(80).is_empty());
}

/// Execs count and save; a watermark that grew is saved, one that did not is not; an OOM
/// kill saves, counts and recomputes at once.
#[test]
fn execs_peaks_and_oom_kills() {
    let table = Table::default();
    table.add("/emars/fn/i", 5);
    let mut t = tracker(&table);
    t.apply(mkdir(5, "/emars/fn/i"), 0, 0);
    t.enforced(5, None);
    let exec = KernelEvent::Exec {
        id: 5,
        pid: 100,
        filename: "/bin/x".into(),
    };
    let fx = t.apply(exec.clone(), 10, 0);
    assert_eq!(saved(&fx)[0].execs, 1);
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::AddHour { delta, at_ms: 10, .. } if delta.execs == 1)));
    // Nothing grew: an exit saves nothing.
    assert!(t
        .apply(KernelEvent::Exit { id: 5, pid: 100 }, 11, 0)
        .is_empty());
    table.set_peak("/emars/fn/i", 9 * MIB);
    let fx = t.apply(
        KernelEvent::MemPeak {
            id: 5,
            peak: 8 * MIB,
        },
        12,
        0,
    );
    let s = saved(&fx);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].peak_bytes, s[0].peak_source),
        (9 * MIB, PeakSource::KernelWatermark)
    );
    let fx = t.apply(KernelEvent::OomVictim { id: 5, pid: 100 }, 13, 0);
    assert_eq!(saved(&fx)[0].oom_kills, 1);
    assert!(
        matches!(fx.last(), Some(Effect::Recompute { function, at_ms: 13 }) if function == "fn")
    );
}

/// An event from a task of a cgroup whose mkdir was never seen registers it late (and
/// enforces); a cut-short path is found by id; a cgroup gone without an rmdir is closed by
/// reconciliation; one that existed before the agent is saved without enforcement.
#[test]
fn late_truncated_reconciled_and_existing() {
    let mut table = Table::default();
    table.procs.insert(42, "/emars/fn/late".into());
    table.add("/emars/fn/late", 20);
    table.add("/emars/fn/a-very-long-instance-name", 21);
    table.add("/emars/fn/old", 22);
    let mut t = tracker(&table);
    let fx = t.apply(
        KernelEvent::Exec {
            id: 0,
            pid: 42,
            filename: "x".into(),
        },
        5,
        0,
    );
    assert!(
        matches!(&fx[0], Effect::Enforce { record, mkdir_ts_ns: None } if record.instance == "late"),
        "{fx:?}"
    );
    assert_eq!(saved(&t.enforced(20, None))[0].execs, 1);

    let fx = t.apply(
        KernelEvent::CgroupMkdir {
            id: 21,
            path: "/emars/fn/a-very".into(),
            level: 3,
            truncated: true,
        },
        6,
        0,
    );
    assert!(
        matches!(&fx[0], Effect::Enforce { record, .. } if record.instance == "a-very-long-instance-name"),
        "{fx:?}"
    );
    assert_eq!(t.stats.paths_truncated, 1);
    let fx = t.apply(
        KernelEvent::CgroupMkdir {
            id: 99,
            path: "/emars/fn/gon".into(),
            level: 3,
            truncated: true,
        },
        6,
        0,
    );
    assert!(fx.is_empty());
    assert_eq!(t.stats.paths_unresolved, 1);

    let fx = t.add_cgroup(
        22,
        "/emars/fn/old",
        1,
        None,
        Found::Existing {
            new_since_start: false,
        },
    );
    assert!(!fx.iter().any(|e| matches!(e, Effect::Enforce { .. })));
    assert_eq!(saved(&fx).len(), 1);

    table.remove("/emars/fn/late");
    let fx = t.reconcile(100);
    let s = saved(&fx);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].instance.as_str(), s[0].ended_at_ms),
        ("late", Some(100))
    );
    assert_eq!(t.stats.reconciled, 1);
    assert_eq!(t.live_count(), 2);
}

/// A mkdir moves ahead of queued events about other cgroups, not ahead of one about its
/// own id (a reused inode whose rmdir is still queued).
#[test]
fn mkdirs_go_first_unless_their_id_came_before() {
    use crate::kernel::events::Timed;
    let ev = |event| Timed { ts_ns: 0, event };
    let exit = |id| KernelEvent::Exit { id, pid: 1 };
    let batch = vec![
        ev(exit(1)),
        ev(rmdir(1)),
        ev(rmdir(2)),
        ev(mkdir(3, "/emars/f/c")),
        ev(mkdir(2, "/emars/f/reused")),
        ev(exit(3)),
    ];
    let order: Vec<(u64, bool)> = mkdirs_first(batch)
        .iter()
        .map(|t| {
            (
                t.event.cgroup_id(),
                matches!(t.event, KernelEvent::CgroupMkdir { .. }),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            (3, true),
            (1, false),
            (1, false),
            (2, false),
            (2, true),
            (3, false)
        ]
    );
}

/// The mkdirs whose cgroup an rmdir later in the same batch removes (no limits for them).
#[test]
fn instances_gone_within_a_batch_are_found() {
    let t = |ts_ns, event| crate::kernel::events::Timed { ts_ns, event };
    let batch = vec![
        t(1, mkdir(5, "/r/f/a")),
        t(2, mkdir(6, "/r/f/b")),
        t(3, rmdir(5)),
        // Id 5 reused by a new cgroup that stays.
        t(4, mkdir(5, "/r/f/c")),
        // An rmdir of a cgroup made before the batch.
        t(5, rmdir(9)),
    ];
    let gone = gone_in_batch(&batch);
    assert_eq!(gone, HashSet::from([(5, 1)]));
}

/// Effects answered with more are run in order, the answer first.
#[test]
fn drain_runs_answers_before_the_rest() {
    let table = Table::default();
    table.add("/emars/fn/i", 1);
    let mut t = tracker(&table);
    let fx = t.apply(mkdir(1, "/emars/fn/i"), 0, 0);
    let mut order = Vec::new();
    drain(&mut t, fx, |t, e| {
        order.push(match &e {
            Effect::Enforce { .. } => "enforce",
            Effect::Save(_) => "save",
            Effect::AddHour { .. } => "hour",
            Effect::Recompute { .. } => "recompute",
            Effect::RuntimeLimit { .. } => "runtime limit",
            Effect::ContainerNames { .. } => "container names",
            Effect::LimitsInForce { .. } => "limits in force",
        });
        match e {
            Effect::Enforce { record, .. } => t.enforced(record.cgroup_id, None),
            _ => Vec::new(),
        }
    });
    assert_eq!(order, vec!["enforce", "save", "hour"]);
}

/// One kind of effect, for the order of a batch's effects.
fn kind(e: &Effect) -> (&'static str, u64) {
    match e {
        Effect::Enforce { record, .. } => ("enforce", record.cgroup_id),
        Effect::Save(r) if r.ended_at_ms.is_some() => ("save ended", r.cgroup_id),
        Effect::Save(r) => ("save", r.cgroup_id),
        Effect::AddHour { .. } => ("hour", 0),
        Effect::Recompute { .. } => ("recompute", 0),
        Effect::RuntimeLimit { key, .. } => ("runtime limit", key.1),
        Effect::ContainerNames { key, .. } => ("container names", key.1),
        Effect::LimitsInForce { cgroup_id, .. } => ("limits in force", *cgroup_id),
    }
}

/// A batch: its mkdirs applied first, each event's effects carried out (a new instance's
/// limits answered) before the next event is applied.
#[test]
fn a_batch_applies_mkdirs_first_and_carries_each_event_out_before_the_next() {
    use crate::kernel::events::Timed;
    let table = Table::default();
    table.add("/emars/fn/a", 1);
    table.add("/emars/fn/b", 2);
    let mut t = tracker(&table);
    let fx = t.apply(mkdir(1, "/emars/fn/a"), 0, 0);
    drain(&mut t, fx, |t, e| match e {
        Effect::Enforce { record, .. } => t.enforced(record.cgroup_id, None),
        _ => Vec::new(),
    });
    let ev = |ts_ns, event| Timed { ts_ns, event };
    let batch = vec![
        ev(10, KernelEvent::Exit { id: 1, pid: 1 }),
        ev(11, mkdir(2, "/emars/fn/b")),
    ];
    let mut carried = Vec::new();
    t.apply_batch(batch, |t, fx| {
        carried.push(fx.iter().map(kind).collect::<Vec<_>>());
        drain(t, fx, |t, e| match e {
            Effect::Enforce { record, .. } => t.enforced(record.cgroup_id, None),
            _ => Vec::new(),
        });
    });
    assert_eq!(carried.len(), 2, "{carried:?}");
    assert_eq!(carried[0], vec![("enforce", 2), ("hour", 0)]);
    // The exit found the first instance's record as it was: nothing new to save.
    assert!(carried[1].is_empty(), "{carried:?}");
    assert_eq!(t.live_count(), 2);
}

/// An instance that came and went within one batch: no limits are written into it (its
/// cgroup is gone), and its record is saved once, closed, by its rmdir. The came-and-went rule
/// is the batch's: the same mkdir applied alone is due its limits.
#[test]
fn an_instance_that_came_and_went_in_a_batch_gets_no_limits_and_one_save() {
    use crate::kernel::events::Timed;
    let table = Table::default();
    table.add("/emars/fn/a", 5);
    table.add("/emars/fn/b", 6);
    let mut t = tracker(&table);
    let ev = |ts_ns, event| Timed { ts_ns, event };
    let batch = vec![
        ev(1, mkdir(5, "/emars/fn/a")),
        ev(2, mkdir(6, "/emars/fn/b")),
        ev(3, rmdir(5)),
    ];
    let mut carried = Vec::new();
    t.apply_batch(batch, |t, fx| {
        drain(t, fx, |t, e| {
            carried.push(kind(&e));
            match e {
                Effect::Enforce { record, .. } => t.enforced(record.cgroup_id, None),
                _ => Vec::new(),
            }
        });
    });
    let of = |id| -> Vec<&str> {
        carried
            .iter()
            .filter(|(_, i)| *i == id)
            .map(|(k, _)| *k)
            .collect()
    };
    assert_eq!(of(5), vec!["save ended"], "{carried:?}");
    assert_eq!(of(6), vec!["enforce", "save"], "{carried:?}");
    assert_eq!(t.live_count(), 1);
    // Alone (not within a batch that removes it), a mkdir is due its limits.
    table.add("/emars/fn/c", 7);
    let fx = t.apply(mkdir(7, "/emars/fn/c"), 0, 4);
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Enforce { .. })),
        "{fx:?}"
    );
}

/// Limits in force: a new instance's first ones replace what it was found with (its record
/// saved with them, once); later ones change only the files written.
#[test]
fn limits_in_force_answer_a_new_instance_then_change_only_what_was_written() {
    let table = Table::default();
    table.add("/emars/fn/i", 3);
    let mut t = tracker(&table);
    let fx = t.apply(mkdir(3, "/emars/fn/i"), 0, 0);
    assert!(matches!(fx.first(), Some(Effect::Enforce { .. })));
    let first = Limits {
        max_bytes: Some(64 * MIB),
        high_bytes: None,
    };
    let fx = t.limits_in_force(3, first);
    assert_eq!(saved(&fx).len(), 1);
    assert_eq!(saved(&fx)[0].limits, first);
    let high = Limits {
        max_bytes: None,
        high_bytes: Some(48 * MIB),
    };
    let fx = t.limits_in_force(3, high);
    assert_eq!(
        saved(&fx)[0].limits,
        Limits {
            max_bytes: Some(64 * MIB),
            high_bytes: Some(48 * MIB)
        }
    );
    assert!(t.limits_in_force(99, high).is_empty());
}

/// The kernel's request counts by cgroup id, and the ids forgotten.
type CountsTable = (HashMap<u64, KernelRequests>, Vec<u64>);

/// The kernel's request counts as a test sets them, and the instances forgotten.
#[derive(Clone, Default)]
struct Counts(std::sync::Arc<std::sync::Mutex<CountsTable>>);

impl Counts {
    fn set(&self, id: u64, connections: u64, requests: u64) {
        if let Ok(mut c) = self.0.lock() {
            c.0.insert(
                id,
                KernelRequests {
                    connections,
                    requests,
                },
            );
        }
    }
    fn forgotten(&self) -> Vec<u64> {
        self.0.lock().map(|c| c.1.clone()).unwrap_or_default()
    }
}

impl RequestCounts for Counts {
    fn read(&mut self, id: u64, _rel_path: &str) -> Option<KernelRequests> {
        self.0.lock().ok()?.0.get(&id).copied()
    }
    fn forget(&mut self, id: u64) {
        if let Ok(mut c) = self.0.lock() {
            c.1.push(id);
        }
    }
}

fn counted(fx: &[Effect]) -> Vec<(u64, u64, u64)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::AddHour { at_ms, delta, .. } if delta.connections + delta.requests > 0 => {
                Some((*at_ms, delta.connections, delta.requests))
            }
            _ => None,
        })
        .collect()
}

/// The kernel's counts are read where the watermark is (an exit here) and at rmdir: what
/// they grew by since the last reading goes to the instance and to the hour of the reading;
/// nothing new saves nothing; after the last reading the instance is forgotten.
#[test]
fn kernel_request_counts_go_to_the_instance_and_the_hour_of_their_reading() {
    let table = Table::default();
    table.add("/emars/fn/i", 5);
    let counts = Counts::default();
    let mut t = tracker(&table).with_request_counts(Box::new(counts.clone()));
    t.apply(mkdir(5, "/emars/fn/i"), 0, 0);
    t.enforced(5, None);
    counts.set(5, 1, 3);
    let fx = t.apply(KernelEvent::Exit { id: 5, pid: 100 }, 10, 0);
    assert_eq!(counted(&fx), [(10, 1, 3)]);
    assert_eq!(
        saved(&fx)
            .iter()
            .map(|r| (r.connections, r.requests))
            .collect::<Vec<_>>(),
        [(1, 3)]
    );
    assert!(t
        .apply(KernelEvent::Exit { id: 5, pid: 100 }, 11, 0)
        .is_empty());
    counts.set(5, 2, 7);
    assert!(counts.forgotten().is_empty());
    let fx = t.apply(rmdir(5), 20, 0);
    assert_eq!(counted(&fx), [(20, 1, 4)]);
    let last = saved(&fx);
    assert_eq!((last[0].connections, last[0].requests), (2, 7));
    assert!(last[0].ended_at_ms.is_some());
    assert_eq!(counts.forgotten(), [5]);
}
