//! Readers of the memory controller's cgroupfs files, for cgroup v1 (memory hierarchy) and v2.
//!
//! Every error carries the path it concerns; a cgroup that vanished mid-read is
//! [`CgroupfsError::Gone`], which callers treat as a normal end of life, not a failure.

use std::{
    fs, io,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use procfs::process::MountInfo;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CgroupfsError {
    #[error("cgroup {path} is gone")]
    Gone { path: PathBuf },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("unexpected content {content:?} in {path}")]
    Parse { path: PathBuf, content: String },
    #[error("{path} is not strictly inside the watched root {root} (or is reached through a symlink); EMARS only writes to cgroups it manages")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    /// The directory at the path is not the cgroup asked for: that one was removed and
    /// another created under its name (the id is the directory's inode).
    #[error(
        "{path} was removed and created again (cgroup id {found}, not {expected}): it is no \
         longer the cgroup asked for"
    )]
    Replaced {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("no memory controller found: {0}")]
    NoMemoryController(String),
    /// The cgroup exists but has no memory files: on v2 its parent's cgroup.subtree_control
    /// lacks "+memory".
    #[error("{path} is missing: the memory controller is not enabled for this cgroup (on cgroup v2, write +memory to its parent's cgroup.subtree_control)")]
    ControllerOff { path: PathBuf },
}

impl CgroupfsError {
    fn io(path: &Path, source: io::Error) -> Self {
        // ENODEV: the kernfs node was removed while its file was open.
        match source.raw_os_error() {
            // A missing file in a cgroup that still exists: the controller is off there.
            Some(libc::ENOENT)
                if path
                    .parent()
                    .is_some_and(|d| d.join("cgroup.procs").exists()) =>
            {
                Self::ControllerOff {
                    path: path.to_owned(),
                }
            }
            Some(libc::ENOENT) | Some(libc::ENODEV) => Self::Gone {
                path: path.to_owned(),
            },
            _ => Self::Io {
                path: path.to_owned(),
                source,
            },
        }
    }
}

type Result<T> = std::result::Result<T, CgroupfsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

/// The hierarchy that holds the memory controller.
#[derive(Debug, Clone)]
pub struct MemoryHierarchy {
    pub version: CgroupVersion,
    /// Where it is mounted, e.g. /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2).
    pub mount: PathBuf,
    /// Kernel hierarchy id as the cgroup tracepoints report it (0 for cgroup2).
    pub hierarchy_id: i32,
}

/// This process's mount table (/proc/self/mountinfo), where the cgroup hierarchies are found.
pub fn mount_table() -> std::result::Result<Vec<MountInfo>, String> {
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map(|m| m.0)
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))
}

/// Values of v1 limits at or above this mean "unlimited" (PAGE_COUNTER_MAX rounded to pages).
const V1_UNLIMITED: u64 = 1 << 62;

impl MemoryHierarchy {
    /// Finds the memory controller: v2 if the unified hierarchy has it, else the v1 memory
    /// hierarchy, unless `mode` forces one.
    pub fn detect(mode: CgroupMode, mount_override: Option<&Path>) -> Result<Self> {
        let mounts = mount_table().map_err(CgroupfsError::NoMemoryController)?;
        Self::detect_in(&mounts, mode, mount_override)
    }

    /// [`MemoryHierarchy::detect`] in a mount table read already ([`mount_table`]).
    pub fn detect_in(
        mounts: &[MountInfo],
        mode: CgroupMode,
        mount_override: Option<&Path>,
    ) -> Result<Self> {
        let mut v1 = None;
        let mut v2 = None;
        for m in mounts {
            match m.fs_type.as_str() {
                "cgroup2" => {
                    let ctl = m.mount_point.join("cgroup.controllers");
                    let has_memory = fs::read_to_string(&ctl)
                        .map(|s| s.split_whitespace().any(|c| c == "memory"))
                        .unwrap_or(false);
                    if has_memory && v2.is_none() {
                        v2 = Some(m.mount_point.clone());
                    }
                }
                "cgroup" if m.super_options.contains_key("memory") && v1.is_none() => {
                    v1 = Some(m.mount_point.clone());
                }
                _ => {}
            }
        }
        let v1 = v1.map(|mount| (CgroupVersion::V1, mount));
        let v2 = v2.map(|mount| (CgroupVersion::V2, mount));
        let (version, mount) = match mode {
            CgroupMode::Auto => v2.or(v1),
            CgroupMode::V1 => v1,
            CgroupMode::V2 => v2,
        }
        .ok_or_else(|| {
            CgroupfsError::NoMemoryController(format!(
                "mode {mode:?}: no cgroup hierarchy with the memory controller is mounted"
            ))
        })?;
        let mount = mount_override.map(Path::to_owned).unwrap_or(mount);
        let hierarchy_id = match version {
            CgroupVersion::V2 => 0,
            CgroupVersion::V1 => v1_hierarchy_id()?,
        };
        Ok(Self {
            version,
            mount,
            hierarchy_id,
        })
    }

    /// Absolute directory of a cgroup given as the kernel reports it ("/emars/fn/1").
    pub fn dir(&self, rel_path: &str) -> PathBuf {
        self.mount.join(rel_path.trim_start_matches('/'))
    }

    /// The kernel-style relative path of an absolute cgroup directory.
    pub fn rel_path(&self, dir: &Path) -> Option<String> {
        let rel = dir.strip_prefix(&self.mount).ok()?;
        Some(format!("/{}", rel.to_str()?))
    }

    fn file(&self, v1: &'static str, v2: &'static str) -> &'static str {
        match self.version {
            CgroupVersion::V1 => v1,
            CgroupVersion::V2 => v2,
        }
    }

    /// Bytes charged to the cgroup now.
    pub fn usage(&self, dir: &Path) -> Result<u64> {
        read_u64(&dir.join(self.file("memory.usage_in_bytes", "memory.current")))
    }

    /// The kernel's own high watermark: v1 memory.max_usage_in_bytes, v2 memory.peak
    /// (since 5.19; `Ok(None)` when the kernel has no such file).
    pub fn peak(&self, dir: &Path) -> Result<Option<u64>> {
        let path = dir.join(self.file("memory.max_usage_in_bytes", "memory.peak"));
        match read_u64(&path) {
            Ok(v) => Ok(Some(v)),
            // Controller on, watermark file absent: a kernel before 5.19 (v2).
            Err(CgroupfsError::ControllerOff { .. })
                if dir
                    .join(self.file("memory.usage_in_bytes", "memory.current"))
                    .exists() =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The hard and soft limit files: v1 memory.limit_in_bytes / memory.soft_limit_in_bytes,
    /// v2 memory.max / memory.high.
    pub fn limit_files(&self) -> (&'static str, &'static str) {
        limit_files(self.version)
    }

    /// Hard and soft limits in force.
    pub fn limits(&self, dir: &Path) -> Result<Limits> {
        let (max, high) = self.limit_files();
        Ok(Limits {
            max_bytes: read_limit(&dir.join(max))?,
            high_bytes: read_limit(&dir.join(high))?,
        })
    }

    /// OOM kills the kernel counted in this cgroup (v1 memory.oom_control, v2 memory.events).
    pub fn oom_kills(&self, dir: &Path) -> Result<u64> {
        let path = dir.join(self.file("memory.oom_control", "memory.events"));
        let text = read(&path)?;
        Ok(keyed_value(&text, "oom_kill").unwrap_or(0))
    }

    /// How a use bound by an earlier agent goes on being read: v1's watermark was reset at
    /// that bind and is still the use's; v2's per-descriptor reset went with the old agent,
    /// so the use's peak is bounded by the lifetime watermark (not exact).
    pub fn resumed_peak(&self) -> UsePeak {
        match self.version {
            CgroupVersion::V1 => UsePeak::V1,
            CgroupVersion::V2 => UsePeak::Lifetime,
        }
    }

    /// The peak of the use started by [`Self::reset_peak`], and whether it is exact.
    pub fn use_peak(&self, dir: &Path, p: &mut UsePeak) -> Result<(u64, bool)> {
        match p {
            UsePeak::V1 => Ok((read_u64(&dir.join("memory.max_usage_in_bytes"))?, true)),
            UsePeak::V2(f) => {
                let path = dir.join("memory.peak");
                let mut text = String::new();
                io::Seek::seek(f, io::SeekFrom::Start(0))
                    .and_then(|_| io::Read::read_to_string(f, &mut text))
                    .map_err(|e| CgroupfsError::io(&path, e))?;
                Ok((parse_u64(&path, text)?, true))
            }
            UsePeak::Lifetime => Ok((self.peak(dir)?.unwrap_or(0), false)),
        }
    }

    /// Page cache the kernel can reclaim without swap: file pages less shmem (v2 memory.stat
    /// `file` - `shmem`, v1 `cache` - `shmem`).
    pub fn reclaimable_file(&self, dir: &Path) -> Result<u64> {
        let text = read(&dir.join("memory.stat"))?;
        let file = keyed_value(&text, self.file("cache", "file")).unwrap_or(0);
        Ok(file.saturating_sub(keyed_value(&text, "shmem").unwrap_or(0)))
    }

    /// CPU time (clock ticks, user + system) of the processes in the cgroup now: what tells an
    /// idle instance (unchanged between two reads) from a busy one. Processes that exit take
    /// their time with them, so only a change means anything, not its sign.
    pub fn cpu_ticks(&self, dir: &Path) -> Result<u64> {
        let mut ticks = 0u64;
        for pid in read_ids(&dir.join("cgroup.procs"))? {
            if let Ok(stat) = procfs::process::Process::new(pid as i32).and_then(|p| p.stat()) {
                ticks = ticks.saturating_add(stat.utime).saturating_add(stat.stime);
            }
        }
        Ok(ticks)
    }

    /// Thread ids of every task in the cgroup (v1 `tasks`; v2 threads of `cgroup.procs`).
    pub fn tids(&self, dir: &Path) -> Result<Vec<u32>> {
        let procs = match self.version {
            CgroupVersion::V1 => return read_ids(&dir.join("tasks")),
            CgroupVersion::V2 => read_ids(&dir.join("cgroup.procs"))?,
        };
        let mut tids = Vec::with_capacity(procs.len());
        for pid in procs {
            match fs::read_dir(format!("/proc/{pid}/task")) {
                Ok(entries) => tids.extend(
                    entries
                        .flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()),
                ),
                // The process exited between the two reads.
                Err(_) => continue,
            }
        }
        Ok(tids)
    }

    /// The memory cgroup of a task, relative to the hierarchy ("/emars/fn/1").
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let proc = procfs::process::Process::new(pid as i32).ok()?;
        let groups = proc.cgroups().ok()?;
        groups
            .0
            .into_iter()
            .find(|g| match self.version {
                CgroupVersion::V2 => g.hierarchy == 0,
                CgroupVersion::V1 => g.controllers.iter().any(|c| c == "memory"),
            })
            .map(|g| g.pathname)
    }
}

/// How the peak of one use of a pooled cgroup is read (see [`MemoryHierarchy::reset_peak`]).
#[derive(Debug)]
pub enum UsePeak {
    /// v1: memory.max_usage_in_bytes, reset at bind.
    V1,
    /// v2 (6.12+): memory.peak through the descriptor the reset was written to.
    V2(fs::File),
    /// v2 before 6.12: the cgroup's lifetime watermark (not exact for this use).
    Lifetime,
}

impl UsePeak {
    /// For /v1/info: how a kernel like this one measures a use.
    pub fn method(&self) -> &'static str {
        match self {
            UsePeak::V1 => "v1 memory.max_usage_in_bytes reset at bind (exact)",
            UsePeak::V2(_) => "v2 memory.peak reset per descriptor at bind (6.12+, exact)",
            UsePeak::Lifetime => {
                "none: memory.peak cannot be reset before kernel 6.12; a use's peak is the \
                 cgroup's lifetime watermark (not exact)"
            }
        }
    }
}

/// An instance cgroup directory opened once, below a watched root, without following symlinks;
/// its files are read and written through this handle, so a path swapped after the open cannot
/// redirect a write.
#[derive(Debug)]
pub struct CgroupDir {
    fd: OwnedFd,
    path: PathBuf,
    version: CgroupVersion,
}

impl MemoryHierarchy {
    /// Opens `rel` (a path below the watched root `root`, both kernel-style: "/emars",
    /// "/emars/fn/1") strictly inside that root: no symlink, no "." or ".." and no empty
    /// component on the way, and not the root itself.
    pub fn open_below(&self, root: &str, rel: &str) -> Result<CgroupDir> {
        let path = self.dir(rel);
        let outside = || CgroupfsError::OutsideRoot {
            path: path.clone(),
            root: self.dir(root),
        };
        let inner = rel
            .strip_prefix(root)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.is_empty())
            .ok_or_else(outside)?;
        if inner
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(outside());
        }
        let root_dir = self.dir(root);
        let root_fd = rustix::fs::open(
            &root_dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupfsError::io(&root_dir, e.into()))?;
        let fd = rustix::fs::openat2(
            &root_fd,
            inner,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            // ELOOP: a symlink on the way; EXDEV: an escape from the root.
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV | rustix::io::Errno::NOTDIR => {
                outside()
            }
            e => CgroupfsError::io(&path, e.into()),
        })?;
        Ok(CgroupDir {
            fd,
            path,
            version: self.version,
        })
    }

    /// A watched root itself, for probes that change nothing any other reader sees (the v2
    /// per-descriptor watermark reset); the agent writes nothing into a root.
    pub fn open_root(&self, root: &str) -> Result<CgroupDir> {
        let path = self.dir(root);
        let fd = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupfsError::io(&path, e.into()))?;
        Ok(CgroupDir {
            fd,
            path,
            version: self.version,
        })
    }

    /// [`Self::open_below`], refused unless the directory's id is `id`: a cgroup removed and
    /// created again under the same path is another cgroup ([`CgroupfsError::Replaced`]).
    pub fn open_recorded(&self, root: &str, rel: &str, id: u64) -> Result<CgroupDir> {
        let dir = self.open_below(root, rel)?;
        let found = dir.id()?;
        if found != id {
            return Err(CgroupfsError::Replaced {
                path: dir.path,
                expected: id,
                found,
            });
        }
        Ok(dir)
    }
}

impl CgroupDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's inode number: the kernel's cgroup id.
    pub fn id(&self) -> Result<u64> {
        rustix::fs::fstat(&self.fd)
            .map(|st| st.st_ino)
            .map_err(|e| CgroupfsError::io(&self.path, e.into()))
    }

    fn file(&self, v1: &'static str, v2: &'static str) -> &'static str {
        match self.version {
            CgroupVersion::V1 => v1,
            CgroupVersion::V2 => v2,
        }
    }

    fn read(&self, name: &str) -> Result<String> {
        let path = self.path.join(name);
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupfsError::io(&path, e.into()))?;
        let mut text = String::new();
        io::Read::read_to_string(&mut fs::File::from(fd), &mut text)
            .map_err(|e| CgroupfsError::io(&path, e))?;
        Ok(text)
    }

    /// Bytes charged to the cgroup now.
    pub fn usage(&self) -> Result<u64> {
        let name = self.file("memory.usage_in_bytes", "memory.current");
        parse_u64(&self.path.join(name), self.read(name)?)
    }

    /// Hard and soft limits in force.
    pub fn limits(&self) -> Result<Limits> {
        let (max, high) = limit_files(self.version);
        Ok(Limits {
            max_bytes: parse_limit(&self.path.join(max), self.read(max)?)?,
            high_bytes: parse_limit(&self.path.join(high), self.read(high)?)?,
        })
    }

    /// The file [`Self::reclaim`] writes.
    pub fn reclaim_file(&self) -> &'static str {
        self.file("memory.force_empty", "memory.reclaim")
    }

    /// Asks the kernel to reclaim from this cgroup: v2 `memory.reclaim` of `bytes` (EAGAIN
    /// when it found less to take back, which is no error here); v1, which has no such file,
    /// `memory.force_empty`, which takes back what it can of everything.
    pub fn reclaim(&self, bytes: u64) -> io::Result<()> {
        let r = match self.version {
            CgroupVersion::V2 => self.write(self.reclaim_file(), bytes),
            CgroupVersion::V1 => self.write(self.reclaim_file(), 0),
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            other => other,
        }
    }

    /// Starts a use of a pooled cgroup: resets the kernel's watermark through this handle, so
    /// that it measures this use alone (v1: a write to memory.max_usage_in_bytes; v2 from
    /// 6.12: a write to memory.peak resets it for that descriptor, which is kept to read it
    /// through). A v2 kernel before 6.12 has no reset: the lifetime watermark then stands in.
    /// The directory removed since it was opened is [`CgroupfsError::Gone`]: nothing written.
    pub fn reset_peak(&self) -> Result<UsePeak> {
        let name = self.file("memory.max_usage_in_bytes", "memory.peak");
        let path = self.path.join(name);
        let gone = |e: io::Error| match e.raw_os_error() {
            // A file missing in a directory that is still a cgroup: the controller is off.
            Some(libc::ENOENT)
                if rustix::fs::statat(&self.fd, "cgroup.procs", rustix::fs::AtFlags::empty())
                    .is_ok() =>
            {
                CgroupfsError::ControllerOff { path: path.clone() }
            }
            // ENOENT: the directory is gone (its files with it); ENODEV: the kernfs node was
            // removed while its file was open.
            Some(libc::ENOENT) | Some(libc::ENODEV) => CgroupfsError::Gone {
                path: self.path.clone(),
            },
            _ => CgroupfsError::Io {
                path: path.clone(),
                source: e,
            },
        };
        if self.version == CgroupVersion::V1 {
            self.write(name, 0).map_err(gone)?;
            return Ok(UsePeak::V1);
        }
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::NOENT => return Err(gone(e.into())),
            // No memory.peak to reset (or not writable): the lifetime watermark stands in.
            Err(_) => return Ok(UsePeak::Lifetime),
        };
        let mut f = fs::File::from(fd);
        match io::Write::write_all(&mut f, b"reset") {
            Ok(()) => Ok(UsePeak::V2(f)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(gone(e)),
            // EINVAL: memory.peak takes no writes before 6.12.
            Err(_) => Ok(UsePeak::Lifetime),
        }
    }

    /// Writes `value` into the cgroup's file `name` (never through a symlink).
    pub fn write(&self, name: &str, value: u64) -> io::Result<()> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        io::Write::write_all(&mut fs::File::from(fd), value.to_string().as_bytes())
    }
}

/// The cgroup id the kernel uses for a cgroup directory: its inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| CgroupfsError::io(dir, e))
}

/// The cgroup directory below `dir` (or `dir` itself) whose id is `id`, if any.
pub fn find_by_id(dir: &Path, id: u64) -> Option<PathBuf> {
    if cgroup_id(dir).ok()? == id {
        return Some(dir.to_owned());
    }
    descendants(dir)
        .ok()?
        .into_iter()
        .find(|d| cgroup_id(d).is_ok_and(|i| i == id))
}

/// Every cgroup directory below `dir` (not `dir` itself), parents before children.
pub fn descendants(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            // Removed while we walked: skip it, not an error.
            Err(e) if d != dir && matches!(e.raw_os_error(), Some(libc::ENOENT)) => continue,
            Err(e) => return Err(CgroupfsError::io(&d, e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(entry.path());
                stack.push(entry.path());
            }
        }
    }
    out.sort_by_key(|p| p.components().count());
    Ok(out)
}

fn v1_hierarchy_id() -> Result<i32> {
    let ctls = procfs::cgroups()
        .map_err(|e| CgroupfsError::NoMemoryController(format!("/proc/cgroups: {e}")))?;
    ctls.0
        .iter()
        .find(|c| c.name == "memory" && c.enabled && c.hierarchy != 0)
        .map(|c| c.hierarchy as i32)
        .ok_or_else(|| {
            CgroupfsError::NoMemoryController("/proc/cgroups: memory not on a v1 hierarchy".into())
        })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| CgroupfsError::io(path, e))
}

fn read_u64(path: &Path) -> Result<u64> {
    parse_u64(path, read(path)?)
}

fn parse_u64(path: &Path, text: String) -> Result<u64> {
    text.trim().parse().map_err(|_| CgroupfsError::Parse {
        path: path.to_owned(),
        content: text,
    })
}

fn read_limit(path: &Path) -> Result<Option<u64>> {
    parse_limit(path, read(path)?)
}

/// "max" (v2) or a v1 value near PAGE_COUNTER_MAX means no limit.
fn parse_limit(path: &Path, text: String) -> Result<Option<u64>> {
    if text.trim() == "max" {
        return Ok(None);
    }
    Ok(Some(parse_u64(path, text)?).filter(|v| *v < V1_UNLIMITED))
}

fn limit_files(version: CgroupVersion) -> (&'static str, &'static str) {
    match version {
        CgroupVersion::V1 => ("memory.limit_in_bytes", "memory.soft_limit_in_bytes"),
        CgroupVersion::V2 => ("memory.max", "memory.high"),
    }
}

fn read_ids(path: &Path) -> Result<Vec<u32>> {
    Ok(read(path)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Value of `key` in a "key value" per line file (memory.events, memory.oom_control).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Makes `cmd` join the cgroup `dir` between fork and exec, so that all of the command's
/// memory, from its first page, is charged there (the demo, `emars tune`, the tests).
pub fn join_before_exec(cmd: &mut std::process::Command, dir: &Path) -> io::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the cgroup path"))?;
    // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || join_cgroup(&procs));
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose cgroup.procs is `procs`.
fn join_cgroup(procs: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let buf = b"0\n";
        let n = libc::write(fd, buf.as_ptr().cast(), buf.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        let v2 = "low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(v2, "oom_kill"), Some(1));
        assert_eq!(keyed_value(v2, "missing"), None);
    }

    #[test]
    fn limits_parse_and_vanish() {
        let dir = std::env::temp_dir().join(format!("emars-cgfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.max"), "max\n").unwrap();
        fs::write(dir.join("memory.high"), "1048576\n").unwrap();
        let h = MemoryHierarchy {
            version: CgroupVersion::V2,
            mount: dir.clone(),
            hierarchy_id: 0,
        };
        let l = h.limits(&dir).unwrap();
        assert_eq!(l.max_bytes, None);
        assert_eq!(l.high_bytes, Some(1 << 20));
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert!(matches!(
            h.oom_kills(&dir),
            Err(CgroupfsError::ControllerOff { .. })
        ));
        fs::write(dir.join("memory.current"), "garbage").unwrap();
        assert!(matches!(h.usage(&dir), Err(CgroupfsError::Parse { .. })));
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(h.usage(&dir), Err(CgroupfsError::Gone { .. })));
        assert_eq!(h.rel_path(&dir.join("a/b")).as_deref(), Some("/a/b"));
    }
}

/// Limits in force on an instance's cgroup when last seen (bytes; None = unlimited/unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct Limits {
    /// v2 memory.max, v1 memory.limit_in_bytes.
    pub max_bytes: Option<u64>,
    /// v2 memory.high, v1 memory.soft_limit_in_bytes.
    pub high_bytes: Option<u64>,
}

/// Limits to write into an instance's cgroup (bytes; None = leave that file as it is), at
/// least one of them. Not [`Limits`]: there None means unlimited (or unknown), a value the
/// files hold; here it means no write. The body of `POST .../limits` on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub high_bytes: Option<u64>,
}

impl From<Limits> for LimitRequest {
    fn from(l: Limits) -> Self {
        LimitRequest {
            max_bytes: l.max_bytes,
            high_bytes: l.high_bytes,
        }
    }
}

/// Which cgroup version holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect from /proc/self/mountinfo.
    #[default]
    Auto,
    V1,
    V2,
}
