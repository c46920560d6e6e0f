//! Kernel notifications that an instance nears its memory limit: the reactive mode's trigger,
//! with no polling.
//!
//! - cgroup v1: a usage threshold (`cgroup.event_control` + an eventfd on
//!   `memory.usage_in_bytes`); the kernel signals the eventfd when usage crosses it, either way.
//! - cgroup v2: inotify on `memory.events`, which the kernel marks modified when its counters
//!   move; `high` moves as soon as usage passes memory.high, the early-warning point that the
//!   agent writes below memory.max.
//!
//! Each signal carries the cgroup id and the moment it was read, so that the time from the
//! kernel's signal to the limit written can be measured.

use std::collections::HashMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustix::fs::inotify;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::kernel::cgroupfs::CgroupVersion;

/// An instance's limit watch fired.
#[derive(Debug, Clone, Copy)]
pub struct Signal {
    pub cgroup_id: u64,
    pub at: Instant,
}

enum Watch {
    /// The task that owns the eventfd (aborting it closes the fd, which unregisters the
    /// threshold in the kernel), and the threshold.
    V1(AbortOnDrop, u64),
    V2(i32),
}

/// A task aborted when its handle goes: a watch replaced, ended, or dropped unfinished.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The watches of every instance with limits, and the channel their signals arrive on.
pub struct LimitSignals {
    version: CgroupVersion,
    tx: mpsc::UnboundedSender<Signal>,
    watches: HashMap<u64, Watch>,
    /// v2: the inotify descriptor (shared with its reader task) and watch descriptor → id.
    inotify: Option<Arc<AsyncFd<OwnedFd>>>,
    by_wd: Arc<Mutex<HashMap<i32, u64>>>,
    reader: Option<JoinHandle<()>>,
    /// v1 registrations that failed after `watch` returned (they are made in the background).
    failed: Arc<AtomicU64>,
}

impl LimitSignals {
    /// Must be called inside a tokio runtime.
    pub fn new(version: CgroupVersion) -> std::io::Result<(Self, mpsc::UnboundedReceiver<Signal>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let by_wd: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
        let (inotify, reader) = match version {
            CgroupVersion::V1 => (None, None),
            CgroupVersion::V2 => {
                let fd =
                    inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
                // SAFETY: the fd is owned by the AsyncFd and deregistered when it is dropped.
                let fd = Arc::new(unsafe { AsyncFd::register(fd) }?);
                let task = tokio::spawn(read_inotify(fd.clone(), by_wd.clone(), tx.clone()));
                (Some(fd), Some(task))
            }
        };
        Ok((
            LimitSignals {
                version,
                tx,
                watches: HashMap::new(),
                inotify,
                by_wd,
                reader,
                failed: Arc::default(),
            },
            rx,
        ))
    }

    /// How the kernel tells, for /v1/info.
    pub fn method(&self) -> &'static str {
        match self.version {
            CgroupVersion::V1 => "v1 usage threshold (cgroup.event_control + eventfd)",
            CgroupVersion::V2 => {
                "v2 memory.events notifications (inotify; high counts past memory.high)"
            }
        }
    }

    /// Watches that failed in the background (v1), for /v1/info's `watch_errors`.
    pub fn failed_watches(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn watched(&self) -> usize {
        self.watches.len()
    }

    /// The instances watched now.
    pub fn watched_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.watches.keys().copied()
    }

    /// Watches the instance in `dir` for usage reaching `trigger` bytes (v1; on v2 the kernel's
    /// own memory.high is the trigger). Replaces an earlier watch of the same instance.
    pub fn watch(&mut self, cgroup_id: u64, dir: &Path, trigger: u64) -> std::io::Result<()> {
        match self.version {
            CgroupVersion::V1 => {
                // The same threshold is registered already (a pooled cgroup bound again with
                // the same limits): nothing to do, and no moment without a watch.
                if let Some(Watch::V1(task, t)) = self.watches.get(&cgroup_id) {
                    if *t == trigger && !task.0.is_finished() {
                        return Ok(());
                    }
                }
                // The watch it replaces stays until this one is registered.
                let old = self.watches.remove(&cgroup_id);
                let (dir, tx, failed) = (dir.to_owned(), self.tx.clone(), self.failed.clone());
                let task = tokio::spawn(async move {
                    // Each registration waits for an RCU grace period in the kernel (memcg
                    // thresholds): made on the blocking pool, so that the caller (the event
                    // loop, writing the next instance's limits) does not wait for it. Dropped
                    // unfinished, its eventfd is closed, which unregisters it.
                    let args = trigger.to_string();
                    let registered = tokio::task::spawn_blocking(move || {
                        v1_register(&dir, "memory.usage_in_bytes", &args).map_err(|e| (e, dir))
                    })
                    .await;
                    drop(old);
                    let efd = match registered {
                        Ok(Ok(efd)) => efd,
                        Ok(Err((e, dir))) => {
                            // A cgroup removed meanwhile is no failure.
                            if e.kind() != std::io::ErrorKind::NotFound {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(cgroup = %dir.display(), "cannot watch for bursts: {e}");
                            }
                            return;
                        }
                        Err(_) => return,
                    };
                    // SAFETY: the eventfd is owned by the AsyncFd, which this task drops.
                    match unsafe { AsyncFd::register(efd) } {
                        Ok(afd) => {
                            forward_eventfd(afd, tx, move |at| Signal { cgroup_id, at }).await
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                self.watches
                    .insert(cgroup_id, Watch::V1(AbortOnDrop(task), trigger));
            }
            CgroupVersion::V2 => {
                if self.watches.contains_key(&cgroup_id) {
                    return Ok(());
                }
                let Some(fd) = &self.inotify else {
                    return Ok(());
                };
                let wd = inotify::add_watch(
                    fd.get_ref().as_fd(),
                    dir.join("memory.events"),
                    inotify::WatchFlags::MODIFY,
                )?;
                self.by_wd
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(wd, cgroup_id);
                self.watches.insert(cgroup_id, Watch::V2(wd));
            }
        }
        Ok(())
    }

    /// Stops watching (the instance ended). A watch of a cgroup already removed is gone in the
    /// kernel too; removing it here only frees its task or table entry.
    pub fn unwatch(&mut self, cgroup_id: u64) {
        match self.watches.remove(&cgroup_id) {
            Some(Watch::V1(task, _)) => drop(task),
            Some(Watch::V2(wd)) => {
                self.by_wd
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&wd);
                if let Some(fd) = &self.inotify {
                    // EINVAL: the kernel dropped it with the cgroup's files.
                    let _ = inotify::remove_watch(fd.get_ref().as_fd(), wd);
                }
            }
            None => {}
        }
    }
}

impl Drop for LimitSignals {
    fn drop(&mut self) {
        // Each v1 watch's task is aborted as its handle goes.
        self.watches.clear();
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// Sends `make(moment)` each time the kernel signals the eventfd, until the receiver is gone
/// (the task owns the eventfd: aborting it closes the fd, which unregisters the event).
async fn forward_eventfd<T>(
    afd: AsyncFd<OwnedFd>,
    tx: mpsc::UnboundedSender<T>,
    make: impl Fn(Instant) -> T,
) {
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        let mut buf = [0u8; 8];
        match rustix::io::read(afd.get_ref(), &mut buf) {
            Ok(_) => {
                if tx.send(make(Instant::now())).is_err() {
                    return;
                }
            }
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}

/// Registers a cgroup v1 notification through `cgroup.event_control`: an eventfd that the
/// kernel signals about the file `file` of the cgroup `dir`, with `args` (a usage threshold,
/// a pressure level). The registration holds its own reference to the file.
fn v1_event(dir: &Path, file: &str, args: &str) -> std::io::Result<AsyncFd<OwnedFd>> {
    let efd = v1_register(dir, file, args)?;
    // SAFETY: the eventfd is owned by the AsyncFd, which its task drops.
    unsafe { AsyncFd::register(efd) }.map_err(|e| e.into())
}

/// [`v1_event`]'s registration alone: blocking, for as long as the kernel takes.
fn v1_register(dir: &Path, file: &str, args: &str) -> std::io::Result<OwnedFd> {
    let efd = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?;
    let target = std::fs::File::open(dir.join(file))?;
    let mut control = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))?;
    control.write_all(format!("{} {} {args}", efd.as_raw_fd(), target.as_raw_fd()).as_bytes())?;
    Ok(efd)
}

async fn read_inotify(
    fd: Arc<AsyncFd<OwnedFd>>,
    by_wd: Arc<Mutex<HashMap<i32, u64>>>,
    tx: mpsc::UnboundedSender<Signal>,
) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let at = Instant::now();
        let mut ids = Vec::new();
        let mut reader = inotify::Reader::new(fd.get_ref(), &mut buf);
        loop {
            match reader.next() {
                Ok(ev) => {
                    let map = by_wd.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(id) = map.get(&ev.wd()) {
                        ids.push(*id);
                    }
                }
                Err(rustix::io::Errno::AGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(_) => return,
            }
        }
        ids.dedup();
        for cgroup_id in ids {
            if tx.send(Signal { cgroup_id, at }).is_err() {
                return;
            }
        }
    }
}

/// A pressure source fired: `source` indexes [`PressureSignals::sources`].
#[derive(Debug, Clone, Copy)]
pub struct PressureSignal {
    pub source: usize,
    pub at: Instant,
}

/// Where memory pressure is watched, for /v1/info and the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PressureSource {
    /// The file the kernel signals on.
    pub path: std::path::PathBuf,
    /// "psi some 100000us/1000000us" or "v1 memory.pressure_level medium".
    pub kind: String,
}

impl PressureSource {
    pub fn describe(&self) -> String {
        format!("{} on {}", self.kind, self.path.display())
    }
}

/// How stalls are told apart from noise (the PSI trigger's threshold and window) and, on
/// cgroup v1, which memory.pressure_level is signalled.
#[derive(Debug, Clone, Copy)]
pub struct PressureThresholds {
    pub stall_us: u64,
    pub window_us: u64,
    pub v1_level: &'static str,
}

/// Memory-pressure notifications, no polling:
/// - PSI triggers (`some <stall> <window>` written into a pressure file, then POLLPRI) on the
///   host's `/proc/pressure/memory` and, on cgroup v2, on each watched root's
///   `memory.pressure`: the kernel wakes the agent when tasks stalled on memory for `stall` in
///   any `window`;
/// - cgroup v1 roots: `memory.pressure_level` through `cgroup.event_control` and an eventfd
///   (vmpressure, signalled from the reclaim of the root or any cgroup below it).
pub struct PressureSignals {
    pub sources: Vec<PressureSource>,
    tasks: Vec<JoinHandle<()>>,
}

impl PressureSignals {
    /// Sets up every source it can; one that cannot be set up is returned with why, and the
    /// others still work. Must be called inside a tokio runtime.
    pub fn new(
        version: CgroupVersion,
        host_psi: Option<&Path>,
        roots: &[std::path::PathBuf],
        t: PressureThresholds,
    ) -> (
        Self,
        mpsc::UnboundedReceiver<PressureSignal>,
        Vec<(std::path::PathBuf, std::io::Error)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = PressureSignals {
            sources: Vec::new(),
            tasks: Vec::new(),
        };
        let mut errors = Vec::new();
        let mut wanted: Vec<(std::path::PathBuf, bool)> = Vec::new();
        if let Some(p) = host_psi {
            wanted.push((p.to_owned(), true));
        }
        for r in roots {
            match version {
                CgroupVersion::V2 => wanted.push((r.join("memory.pressure"), true)),
                CgroupVersion::V1 => wanted.push((r.clone(), false)),
            }
        }
        for (path, psi) in wanted {
            let source = s.sources.len();
            let set_up = if psi {
                psi_trigger(&path, t).map(|afd| {
                    (
                        format!("psi some {}us/{}us", t.stall_us, t.window_us),
                        tokio::spawn(read_psi(afd, source, tx.clone())),
                    )
                })
            } else {
                v1_event(&path, "memory.pressure_level", t.v1_level).map(|afd| {
                    (
                        format!("v1 memory.pressure_level {}", t.v1_level),
                        tokio::spawn(forward_eventfd(afd, tx.clone(), move |at| PressureSignal {
                            source,
                            at,
                        })),
                    )
                })
            };
            match set_up {
                Ok((kind, task)) => {
                    let path = if psi {
                        path
                    } else {
                        path.join("memory.pressure_level")
                    };
                    s.sources.push(PressureSource { path, kind });
                    s.tasks.push(task);
                }
                Err(e) => errors.push((path, e)),
            }
        }
        (s, rx, errors)
    }
}

impl Drop for PressureSignals {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// Opens a PSI file and arms a trigger on it; the kernel keeps the trigger while the file
/// stays open, and marks it POLLPRI each time the stall threshold is crossed in a window.
fn psi_trigger(path: &Path, t: PressureThresholds) -> std::io::Result<AsyncFd<std::fs::File>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    // The kernel parses the string up to its NUL.
    f.write_all(format!("some {} {}\0", t.stall_us, t.window_us).as_bytes())?;
    // SAFETY: the file is owned by the AsyncFd, which its task drops.
    unsafe { AsyncFd::register_with_interest(f, tokio::io::Interest::PRIORITY) }
        .map_err(|e| e.into())
}

async fn read_psi(
    afd: AsyncFd<std::fs::File>,
    source: usize,
    tx: mpsc::UnboundedSender<PressureSignal>,
) {
    loop {
        let Ok(mut guard) = afd.ready(tokio::io::Interest::PRIORITY).await else {
            return;
        };
        let at = Instant::now();
        guard.clear_ready();
        if tx.send(PressureSignal { source, at }).is_err() {
            return;
        }
    }
}
