//! Requests counted in the kernel: where the cgroup_skb program goes (each watched root's
//! cgroup in the cgroup v2 hierarchy) and its counts read for one instance.
//!
//! Socket programs act on the cgroup v2 hierarchy only. On pure cgroup v2 an instance's cgroup
//! there is its memory cgroup (same id). On a hybrid host (memory controller on v1) an instance
//! is counted when its platform also puts it in the unified hierarchy under the same path (runc
//! does); its v2 id is found by that path and kept for the instance's life, since the two
//! directories may go in either order.

use std::{collections::HashMap, os::unix::fs::MetadataExt, path::PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use emars_common::NetCounts;
use procfs::process::MountInfo;

use super::cgroupfs::{CgroupVersion, MemoryHierarchy};

/// The cgroup v2 hierarchy the socket programs act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHierarchy {
    /// Where cgroup2 is mounted: the memory hierarchy's mount on pure v2, the unified one
    /// (e.g. /sys/fs/cgroup/unified) on a hybrid host.
    pub mount: PathBuf,
    /// True on pure v2: an instance's v2 id is its memory cgroup's id.
    pub same_ids: bool,
}

impl NetHierarchy {
    /// The cgroup v2 hierarchy beside `memory`, found in the mount table `memory` was found
    /// in ([`super::cgroupfs::mount_table`]); why none, when none is mounted.
    pub fn detect(memory: &MemoryHierarchy, mounts: &[MountInfo]) -> Result<NetHierarchy, String> {
        if memory.version == CgroupVersion::V2 {
            return Ok(NetHierarchy {
                mount: memory.mount.clone(),
                same_ids: true,
            });
        }
        mounts
            .iter()
            .find(|m| m.fs_type == "cgroup2")
            .map(|m| NetHierarchy {
                mount: m.mount_point.clone(),
                same_ids: false,
            })
            .ok_or_else(|| {
                "no cgroup v2 hierarchy is mounted (socket programs attach to cgroup v2 only)"
                    .to_owned()
            })
    }

    /// Absolute directory of a cgroup given as the kernel reports it ("/emars/fn/1").
    pub fn dir(&self, rel_path: &str) -> PathBuf {
        self.mount.join(rel_path.trim_start_matches('/'))
    }

    /// The cgroup v2 directories of the watched roots, where the program is attached (on a
    /// hybrid host the daemon has made those that are EMARS's own: `daemon::host`). A root
    /// below another watched root is left out: the program attached above already runs for
    /// it, and twice would count every segment twice.
    pub fn root_dirs(&self, roots: &[String]) -> Vec<NetRoot> {
        let mut out = Vec::new();
        for root in roots {
            let nested = roots.iter().any(|other| {
                other != root && root.starts_with(other.as_str()) && {
                    let rest = &root[other.len()..];
                    rest.starts_with('/') || other.ends_with('/')
                }
            });
            let dir = self.dir(root);
            let status = if nested {
                Err("below another watched root, whose program counts it".to_owned())
            } else if dir.is_dir() {
                Ok(dir)
            } else {
                Err(format!(
                    "{} does not exist: the platform does not put its instances in the cgroup \
                     v2 hierarchy{}",
                    dir.display(),
                    if self.same_ids {
                        ""
                    } else {
                        " (only in the v1 hierarchies)"
                    }
                ))
            };
            out.push(NetRoot {
                root: root.clone(),
                dir: status,
            });
        }
        out
    }
}

/// A watched root as the socket program sees it: its cgroup v2 directory, or why it has none.
#[derive(Debug, Clone)]
pub struct NetRoot {
    pub root: String,
    pub dir: Result<PathBuf, String>,
}

/// The counts of the kernel's `NET_COUNTS` map, read for instances.
pub struct NetCounter {
    map: BpfHashMap<MapData, u64, NetCounts>,
    net: NetHierarchy,
    /// Memory cgroup id → cgroup v2 id, found by path (hybrid hosts) while both exist.
    v2_ids: HashMap<u64, u64>,
}

impl NetCounter {
    pub fn new(map: BpfHashMap<MapData, u64, NetCounts>, net: NetHierarchy) -> NetCounter {
        NetCounter {
            map,
            net,
            v2_ids: HashMap::new(),
        }
    }

    /// The cgroup v2 id of the instance whose memory cgroup is `id` at `rel_path`: the same
    /// id on pure v2; on a hybrid host the id of the unified directory at that path, once it
    /// has been seen.
    fn v2_id(&mut self, id: u64, rel_path: &str) -> Option<u64> {
        if self.net.same_ids {
            return Some(id);
        }
        if let Some(v2) = self.v2_ids.get(&id) {
            return Some(*v2);
        }
        let v2 = std::fs::metadata(self.net.dir(rel_path)).ok()?.ino();
        self.v2_ids.insert(id, v2);
        Some(v2)
    }

    /// What the kernel counted for the instance so far (zeros before its first segment);
    /// None when its v2 cgroup is not known (hybrid host, no unified directory at its path).
    pub fn read(&mut self, id: u64, rel_path: &str) -> Option<NetCounts> {
        let v2 = self.v2_id(id, rel_path)?;
        Some(self.map.get(&v2, 0).unwrap_or_default())
    }

    /// The instance ended and its counts were read: its entry goes.
    pub fn forget(&mut self, id: u64) {
        let v2 = if self.net.same_ids {
            Some(id)
        } else {
            self.v2_ids.remove(&id)
        };
        if let Some(v2) = v2 {
            // Already gone (evicted, or never counted): nothing to do.
            let _ = self.map.remove(&v2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid(mount: &std::path::Path) -> NetHierarchy {
        NetHierarchy {
            mount: mount.to_owned(),
            same_ids: false,
        }
    }

    #[test]
    fn roots_are_found_and_nested_ones_are_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let net = hybrid(tmp.path());
        for d in ["kubepods", "emars", "emars/pool"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
        }
        let roots = [
            "/emars".to_owned(),
            "/emars/pool".to_owned(),
            "/emarsx".to_owned(),
            "/kubepods".to_owned(),
        ];
        let dirs = net.root_dirs(&roots);
        let shown: Vec<(&str, Result<PathBuf, &str>)> = dirs
            .iter()
            .map(|r| (r.root.as_str(), r.dir.clone().map_err(|_| "")))
            .collect();
        assert_eq!(
            shown,
            [
                ("/emars", Ok(tmp.path().join("emars"))),
                ("/emars/pool", Err("")),
                ("/emarsx", Err("")),
                ("/kubepods", Ok(tmp.path().join("kubepods"))),
            ]
        );
        // The nested root's program is its parent's; a missing one is not made here.
        assert!(!tmp.path().join("emarsx").exists());
        let why = |i: usize| dirs[i].dir.clone().unwrap_err();
        assert!(why(1).contains("below another watched root"), "{}", why(1));
        assert!(why(2).contains("only in the v1 hierarchies"), "{}", why(2));
    }

    #[test]
    fn on_pure_v2_a_missing_root_is_said() {
        let tmp = tempfile::tempdir().unwrap();
        let net = NetHierarchy {
            mount: tmp.path().to_owned(),
            same_ids: true,
        };
        let dirs = net.root_dirs(&["/emars".to_owned()]);
        let why = dirs[0].dir.clone().unwrap_err();
        assert!(why.contains("does not exist"), "{why}");
        assert!(!why.contains("v1"), "{why}");
    }
}
