//! The cgroup writer: puts memory limits into instance cgroups, and only there.
//!
//! Safety rules, checked on every write: the cgroup lies strictly inside a watched root; a limit
//! is never below the instance's current usage plus headroom and never above host memory; every
//! attempt, failed or not, is recorded with the old and new values. A failed write (cgroup gone,
//! EBUSY, EINVAL) is an error value, never a crash.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroupfs::{CgroupfsError, MemoryHierarchy},
    model::Limits,
};

#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("{path} is not inside a watched root; EMARS only writes to cgroups it manages")]
    OutsideRoots { path: PathBuf },
    #[error(
        "refused: a limit of {requested} bytes is below the current usage {usage} bytes plus \
         headroom {headroom} bytes of {path}"
    )]
    BelowUsage {
        path: PathBuf,
        requested: u64,
        usage: u64,
        headroom: u64,
    },
    #[error("refused: {requested} bytes is above host memory ({host} bytes)")]
    AboveHost { requested: u64, host: u64 },
    #[error("refused: memory.high {high} bytes is above memory.max {max} bytes")]
    HighAboveMax { high: u64, max: u64 },
    #[error("nothing to write: give max_bytes and/or high_bytes")]
    Empty,
    #[error(transparent)]
    Cgroup(#[from] CgroupfsError),
    #[error("writing {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: u64,
        source: io::Error,
    },
}

impl ActuatorError {
    /// True for a refusal by the safety rules (a 4xx for the API), false for a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::OutsideRoots { .. }
                | Self::BelowUsage { .. }
                | Self::AboveHost { .. }
                | Self::HighAboveMax { .. }
                | Self::Empty
        )
    }
}

/// What to do with a requested max below usage + headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BelowUsage {
    /// Raise the limit to usage + headroom (automatic enforcement).
    Raise,
    /// Refuse the request (a user asked for exactly this value).
    Refuse,
}

/// One write attempt, as kept in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub function: String,
    pub instance: String,
    pub cgroup_path: String,
    /// "new_instance", "apply" or "api".
    pub reason: String,
    pub old: Limits,
    /// What was (or would have been) written.
    pub new: Limits,
    pub usage_bytes: Option<u64>,
    /// Microseconds from the kernel's mkdir event to the completed write (new instances).
    pub delay_us: Option<u64>,
    /// True when the request was raised to usage + headroom.
    pub raised: bool,
    /// "ok", or the error.
    pub outcome: String,
}

/// Counters of the actuator, for /v1/info.
#[derive(Debug, Default)]
pub struct ActuatorStats {
    pub writes_ok: AtomicU64,
    pub writes_failed: AtomicU64,
    pub refusals: AtomicU64,
}

pub struct Actuator {
    hierarchy: MemoryHierarchy,
    roots: Vec<PathBuf>,
    host_memory: u64,
    headroom: u64,
    pub stats: ActuatorStats,
}

/// The request of one write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitRequest {
    pub max_bytes: Option<u64>,
    pub high_bytes: Option<u64>,
}

impl Actuator {
    /// `roots` are kernel-style paths relative to the hierarchy ("/emars").
    pub fn new(hierarchy: MemoryHierarchy, roots: &[String], headroom: u64) -> Self {
        let roots = roots.iter().map(|r| hierarchy.dir(r)).collect();
        Self {
            hierarchy,
            roots,
            host_memory: host_memory_bytes(),
            headroom,
            stats: ActuatorStats::default(),
        }
    }

    pub fn host_memory(&self) -> u64 {
        self.host_memory
    }

    /// Writes limits into an instance cgroup. Returns the audit record of what was done;
    /// the caller stores it (failed attempts too: see [`Actuator::failed_record`]).
    pub fn apply(
        &self,
        dir: &Path,
        req: LimitRequest,
        on_below: BelowUsage,
    ) -> Result<Applied, ActuatorError> {
        let r = self.try_apply(dir, req, on_below);
        let counter = match &r {
            Ok(_) => &self.stats.writes_ok,
            Err(e) if e.is_refusal() => &self.stats.refusals,
            Err(_) => &self.stats.writes_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn try_apply(
        &self,
        dir: &Path,
        req: LimitRequest,
        on_below: BelowUsage,
    ) -> Result<Applied, ActuatorError> {
        if req.max_bytes.is_none() && req.high_bytes.is_none() {
            return Err(ActuatorError::Empty);
        }
        self.check_inside(dir)?;
        for v in [req.max_bytes, req.high_bytes].into_iter().flatten() {
            if v > self.host_memory {
                return Err(ActuatorError::AboveHost {
                    requested: v,
                    host: self.host_memory,
                });
            }
        }
        let old = self.hierarchy.limits(dir)?;
        let usage = self.hierarchy.usage(dir)?;
        let floor = usage.saturating_add(self.headroom).min(self.host_memory);
        let mut raised = false;
        // Neither limit below usage + headroom: a low max kills, a low high throttles at once.
        let mut floored = |requested: Option<u64>| -> Result<Option<u64>, ActuatorError> {
            match requested {
                Some(v) if v < floor => match on_below {
                    BelowUsage::Refuse => Err(ActuatorError::BelowUsage {
                        path: dir.to_owned(),
                        requested: v,
                        usage,
                        headroom: self.headroom,
                    }),
                    BelowUsage::Raise => {
                        raised = true;
                        Ok(Some(floor))
                    }
                },
                other => Ok(other),
            }
        };
        let mut new = LimitRequest {
            max_bytes: floored(req.max_bytes)?,
            high_bytes: floored(req.high_bytes)?,
        };
        if let (Some(high), Some(max)) = (new.high_bytes, new.max_bytes) {
            if high > max {
                if raised {
                    new.high_bytes = Some(max);
                } else {
                    return Err(ActuatorError::HighAboveMax { high, max });
                }
            }
        }
        let (max_file, high_file) = self.hierarchy.limit_files();
        // The kernel keeps no order between the two files (v1 soft limit and v2 high may
        // exceed the hard limit), so max first: it is the one that protects the host.
        for (file, value) in [(max_file, new.max_bytes), (high_file, new.high_bytes)] {
            if let Some(v) = value {
                write_value(&dir.join(file), v)?;
            }
        }
        Ok(Applied {
            old,
            new: Limits {
                max_bytes: new.max_bytes.or(old.max_bytes),
                high_bytes: new.high_bytes.or(old.high_bytes),
            },
            usage,
            raised,
        })
    }

    /// The cgroup must be strictly below a watched root, after resolving symlinks and "..".
    fn check_inside(&self, dir: &Path) -> Result<(), ActuatorError> {
        let outside = || ActuatorError::OutsideRoots {
            path: dir.to_owned(),
        };
        let real = fs::canonicalize(dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ActuatorError::Cgroup(CgroupfsError::Gone {
                path: dir.to_owned(),
            }),
            _ => outside(),
        })?;
        let inside = self.roots.iter().any(|root| {
            fs::canonicalize(root)
                .map(|r| real.starts_with(&r) && real != r)
                .unwrap_or(false)
        });
        if inside {
            Ok(())
        } else {
            Err(outside())
        }
    }
}

/// What a successful write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub old: Limits,
    pub new: Limits,
    pub usage: u64,
    pub raised: bool,
}

fn write_value(path: &Path, value: u64) -> Result<(), ActuatorError> {
    fs::write(path, value.to_string()).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => ActuatorError::Cgroup(CgroupfsError::Gone {
            path: path.to_owned(),
        }),
        _ => ActuatorError::Write {
            path: path.to_owned(),
            value,
            source,
        },
    })
}

/// MemTotal from /proc/meminfo (bytes); u64::MAX if unreadable, so no limit is refused for it.
pub fn host_memory_bytes() -> u64 {
    use procfs::Current as _;
    procfs::Meminfo::current()
        .map(|m| m.mem_total)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    //! The safety rules on a fake cgroupfs in a temp dir (plain files stand in for the kernel's;
    //! the real kernel path is covered by tests/tests/predictive.rs).
    use super::*;
    use crate::cgroupfs::CgroupVersion;

    struct Fake {
        _tmp: tempfile::TempDir,
        act: Actuator,
        inst: PathBuf,
        outside: PathBuf,
    }

    fn fake(version: CgroupVersion, usage: u64) -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().to_owned();
        let inst = mount.join("emars/fn/i1");
        let outside = mount.join("other/x");
        for d in [&inst, &outside] {
            fs::create_dir_all(d).unwrap();
            let (usage_f, max_f, high_f, unlimited) = match version {
                CgroupVersion::V1 => (
                    "memory.usage_in_bytes",
                    "memory.limit_in_bytes",
                    "memory.soft_limit_in_bytes",
                    "9223372036854771712",
                ),
                CgroupVersion::V2 => ("memory.current", "memory.max", "memory.high", "max"),
            };
            fs::write(d.join(usage_f), usage.to_string()).unwrap();
            fs::write(d.join(max_f), unlimited).unwrap();
            fs::write(d.join(high_f), unlimited).unwrap();
        }
        let h = MemoryHierarchy {
            version,
            mount,
            hierarchy_id: 0,
        };
        let mut act = Actuator::new(h, &["/emars".to_owned()], 8 << 20);
        act.host_memory = 1 << 30;
        Fake {
            _tmp: tmp,
            act,
            inst,
            outside,
        }
    }

    fn req(max: u64, high: u64) -> LimitRequest {
        LimitRequest {
            max_bytes: Some(max),
            high_bytes: Some(high),
        }
    }

    #[test]
    fn writes_v2_and_v1_files() {
        let f = fake(CgroupVersion::V2, 10 << 20);
        let a = f
            .act
            .apply(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Refuse)
            .unwrap();
        assert_eq!(a.old, Limits::default());
        assert_eq!(a.new.max_bytes, Some(64 << 20));
        assert_eq!(
            fs::read_to_string(f.inst.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(f.inst.join("memory.high")).unwrap(),
            "50331648"
        );
        let f = fake(CgroupVersion::V1, 10 << 20);
        f.act
            .apply(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Refuse)
            .unwrap();
        let v = fs::read_to_string(f.inst.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(v, "67108864");
        assert_eq!(f.act.stats.writes_ok.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn never_outside_the_roots() {
        let f = fake(CgroupVersion::V2, 0);
        let e = f
            .act
            .apply(&f.outside, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(
            matches!(e, Err(ActuatorError::OutsideRoots { .. })),
            "{e:?}"
        );
        // Escapes through ".." are resolved before the check.
        let sneaky = f.inst.join("../../../other/x");
        let e = f
            .act
            .apply(&sneaky, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(
            matches!(e, Err(ActuatorError::OutsideRoots { .. })),
            "{e:?}"
        );
        // The root itself is not an instance.
        let root = f.inst.parent().unwrap().parent().unwrap().to_owned();
        let e = f
            .act
            .apply(&root, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(
            matches!(e, Err(ActuatorError::OutsideRoots { .. })),
            "{e:?}"
        );
        assert_eq!(
            fs::read_to_string(f.outside.join("memory.max")).unwrap(),
            "max"
        );
        assert_eq!(f.act.stats.refusals.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn never_below_usage_plus_headroom() {
        let f = fake(CgroupVersion::V2, 100 << 20);
        let e = f
            .act
            .apply(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Refuse);
        let msg = e
            .as_ref()
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string());
        assert!(msg.contains("below the current usage"), "{msg}");
        assert_eq!(
            fs::read_to_string(f.inst.join("memory.max")).unwrap(),
            "max"
        );
        // memory.high below usage is refused too: it would throttle the instance at once.
        let e = f.act.apply(
            &f.inst,
            LimitRequest {
                max_bytes: None,
                high_bytes: Some(1 << 20),
            },
            BelowUsage::Refuse,
        );
        assert!(matches!(e, Err(ActuatorError::BelowUsage { .. })), "{e:?}");
        // Automatic enforcement raises instead, and says so.
        let a = f
            .act
            .apply(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise)
            .unwrap();
        assert!(a.raised);
        assert_eq!(a.new.max_bytes, Some((100 << 20) + (8 << 20)));
    }

    #[test]
    fn never_above_host_memory_or_inconsistent() {
        let f = fake(CgroupVersion::V2, 0);
        let e = f
            .act
            .apply(&f.inst, req(2 << 30, 1 << 20), BelowUsage::Raise);
        assert!(matches!(e, Err(ActuatorError::AboveHost { .. })), "{e:?}");
        let e = f
            .act
            .apply(&f.inst, req(16 << 20, 32 << 20), BelowUsage::Refuse);
        assert!(
            matches!(e, Err(ActuatorError::HighAboveMax { .. })),
            "{e:?}"
        );
        let e = f
            .act
            .apply(&f.inst, LimitRequest::default(), BelowUsage::Refuse);
        assert!(matches!(e, Err(ActuatorError::Empty)));
    }

    #[test]
    fn vanished_cgroup_is_an_error_not_a_crash() {
        let f = fake(CgroupVersion::V2, 0);
        fs::remove_dir_all(&f.inst).unwrap();
        let e = f
            .act
            .apply(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(
            matches!(e, Err(ActuatorError::Cgroup(CgroupfsError::Gone { .. }))),
            "{e:?}"
        );
        assert_eq!(f.act.stats.writes_failed.load(Ordering::Relaxed), 1);
    }
}
