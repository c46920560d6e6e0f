//! Helpers shared by the store's tests.

use std::collections::BTreeSet;

use crate::model::{InstanceRecord, Limits, PeakSource};
use crate::store::*;

pub const MIB: u64 = 1024 * 1024;

pub fn rec(function: &str, started: u64, cgroup: u64) -> InstanceRecord {
    InstanceRecord {
        function: function.to_string(),
        instance: format!("{function}-{cgroup}"),
        cgroup_id: cgroup,
        cgroup_path: format!("/sys/fs/cgroup/test/{function}/{cgroup}"),
        started_at_ms: started,
        ended_at_ms: None,
        execs: 0,
        peak_bytes: 0,
        peak_source: PeakSource::None,
        oom_kills: 0,
        limits: Limits::default(),
        input_bytes: None,
        connections: 0,
        requests: 0,
    }
}

pub fn open_tmp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("open");
    (dir, store)
}

/// 100 instances with peaks 1..=100 MiB (shuffled), plus zero-peak ones that must not count.
pub fn fill_known_set(s: &Store) {
    for i in 0..100u64 {
        let peak = ((i * 37) % 100 + 1) * MIB; // a permutation of 1..=100
        let mut r = rec("f", 1_000 + i, i);
        r.peak_bytes = peak;
        r.execs = 2;
        r.oom_kills = u64::from(i % 10 == 0);
        if i < 97 {
            r.ended_at_ms = Some(5_000 + i);
        }
        s.put_instance(&r).unwrap();
    }
    let mut unmeasured = rec("f", 500, 1000); // live, never measured
    unmeasured.execs = 1;
    s.put_instance(&unmeasured).unwrap();
}

/// The strings `strings` holds, as text.
pub fn stored_strings(s: &Store) -> BTreeSet<String> {
    s.raw_tree(TREE_STRINGS)
        .iter()
        .values()
        .map(|v| String::from_utf8(v.unwrap().to_vec()).unwrap())
        .collect()
}

/// An instance in a pod of its own (a parent directory of its own, as Kubernetes makes).
pub fn pod_rec(function: &str, i: u64, start: u64, end: Option<u64>) -> InstanceRecord {
    let mut r = rec(function, start, i);
    r.cgroup_path = format!("/sys/fs/cgroup/kubepods/pod-{i}/c{i}");
    r.ended_at_ms = end;
    r
}
