//! `emars tune [--limits LIST] [--runs N] [--out DIR] -- CMD ARGS...`: runs a local command
//! under a sweep of memory limits, in memory cgroups of its own, and finds the knee — the
//! smallest limit that costs neither OOM kills, failures nor latency (the EMARS paper's figures
//! 7/8; what AWS Lambda Power Tuning does with billed time).
//!
//! Every run gets a fresh cgroup `<hierarchy>/emars-tune-<pid>/<label>-<run>`, so its watermark
//! and OOM counter are its own; the tree is removed after each run and at the end, also on
//! error and on SIGINT/SIGTERM (the command is killed, then its cgroup removed). Swap must not
//! hide a limit: v1 also gets memory.memsw.limit_in_bytes = the limit where swap accounting
//! has that file, v2 memory.swap.max = 0.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{Read as _, Seek as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::kernel::cgroupfs::{
    join_before_exec, CgroupMode, CgroupVersion, CgroupfsError, MemoryHierarchy,
};
use crate::view::plot::{self, PlotError, TunePlot, TunePoint};
use crate::view::text::{count, human_bytes, table, Align};

const MIB: u64 = 1 << 20;

/// A limit's median latency may exceed the baseline's by this fraction and still be at the
/// knee...
pub const KNEE_TOLERANCE: f64 = 0.10;
/// ...or by this many milliseconds, whichever is more: for a command of a few milliseconds,
/// 10 % is below the noise of fork, exec and the scheduler, and would move the knee at random.
pub const KNEE_SLACK_MS: f64 = 5.0;

pub const KNEE_RULE: &str = "the smallest limit whose runs had no OOM kill and no failure and \
    whose median latency is at most the no-limit median + max(10 %, 5 ms)";

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("bad size {value:?} in --limits: {why}; {}", crate::size::SIZE_FORMS)]
    BadSize { value: String, why: String },
    #[error("emars tune needs root: it creates memory cgroups and sets their limits")]
    NotRoot,
    #[error(transparent)]
    Cgroupfs(#[from] CgroupfsError),
    #[error("{what} {path}: {error}")]
    Cgroup {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("running {command}: {error}")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("the command failed without a limit ({status}): nothing to tune{stderr}")]
    BaselineFailed { status: String, stderr: String },
    #[error("cannot derive limits: this kernel reports no peak (v2 memory.peak needs Linux 5.19); pass --limits")]
    NoPeak,
    #[error("interrupted: the runs were stopped and their cgroups removed")]
    Interrupted,
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error(transparent)]
    Output(#[from] crate::files::OutputError),
    #[error("no command to tune: give it after `--`")]
    NoCommand,
    #[error("writing {path}: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// One limit of `--limits`, in the forms of [`crate::size`] (`16Mi`, `64M`, `1Gi`, bytes): at
/// least a page, since the kernel rounds limits to pages.
pub fn parse_size(value: &str) -> Result<u64, TuneError> {
    let bad = |why: String| TuneError::BadSize {
        value: value.to_owned(),
        why,
    };
    let bytes = crate::size::parse_size(value).map_err(|e| bad(e.why().to_owned()))?;
    if bytes < 4096 {
        return Err(bad("below one page (4096 bytes)".to_owned()));
    }
    // Beyond this v1 reads as unlimited.
    if bytes >= 1 << 62 {
        return Err(bad("too large".to_owned()));
    }
    Ok(bytes)
}

/// A comma-separated list of sizes, sorted, duplicates dropped.
pub fn parse_limits(list: &str) -> Result<Vec<u64>, TuneError> {
    let mut v = list
        .split(',')
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// The sweep when --limits is absent: 8 points from 0.5x to 2x the measured peak, evenly
/// spaced on a log scale (limits matter in ratios), rounded up to MiB.
pub fn default_limits(peak: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..8)
        .map(|i| {
            let f = 0.5 * 4f64.powf(i as f64 / 7.0);
            let mib = (peak as f64 * f / MIB as f64).ceil().max(1.0) as u64;
            mib * MIB
        })
        .collect();
    v.dedup();
    v
}

/// The runs of one limit (None: no limit, the baseline).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LimitResult {
    pub limit_bytes: Option<u64>,
    pub runs: usize,
    pub median_ms: f64,
    pub max_ms: f64,
    /// The cgroups' OOM kill counters added up; a run whose command died of SIGKILL with the
    /// counter at 0 (a kernel without the counter) counts one.
    pub oom_kills: u64,
    /// Runs that did not exit 0 (OOM-killed runs included).
    pub failures: u64,
    /// The highest watermark of the runs (None where the kernel has none).
    pub peak_bytes: Option<u64>,
}

/// One run's measurements.
#[derive(Debug, Clone, Copy)]
struct Run {
    ms: f64,
    oom_kills: u64,
    failed: bool,
    peak: Option<u64>,
}

fn summarize(limit: Option<u64>, runs: &[Run]) -> LimitResult {
    let mut ms: Vec<f64> = runs.iter().map(|r| r.ms).collect();
    ms.sort_by(f64::total_cmp);
    LimitResult {
        limit_bytes: limit,
        runs: runs.len(),
        median_ms: median(&ms),
        max_ms: ms.last().copied().unwrap_or(0.0),
        oom_kills: runs.iter().map(|r| r.oom_kills).sum(),
        failures: runs.iter().filter(|r| r.failed).count() as u64,
        peak_bytes: runs.iter().filter_map(|r| r.peak).max(),
    }
}

/// Median of sorted values (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The knee by [`KNEE_RULE`].
pub fn knee(baseline_ms: f64, results: &[LimitResult]) -> Option<u64> {
    let allowed = baseline_ms + (baseline_ms * KNEE_TOLERANCE).max(KNEE_SLACK_MS);
    results
        .iter()
        .filter(|r| r.oom_kills == 0 && r.failures == 0 && r.median_ms <= allowed)
        .filter_map(|r| r.limit_bytes)
        .min()
}

/// What tune.json holds.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    pub command: Vec<String>,
    pub cgroup_version: String,
    pub runs_per_limit: usize,
    pub knee_rule: &'static str,
    pub baseline: LimitResult,
    pub limits: Vec<LimitResult>,
    pub knee_bytes: Option<u64>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`INTERRUPTED`] and interrupt the wait for the command (no
/// SA_RESTART), which then kills it so that its cgroup can be removed.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Our cgroup root, removed (with whatever is left in it) on drop.
struct TuneRoot {
    hierarchy: MemoryHierarchy,
    rel: String,
    dir: PathBuf,
}

impl TuneRoot {
    fn create(hierarchy: MemoryHierarchy) -> Result<Self, TuneError> {
        let rel = format!("/emars-tune-{}", std::process::id());
        let dir = hierarchy.dir(&rel);
        std::fs::create_dir(&dir).map_err(|error| TuneError::Cgroup {
            what: "creating",
            path: dir.clone(),
            error,
        })?;
        let root = Self {
            hierarchy,
            rel,
            dir,
        };
        if root.hierarchy.version == CgroupVersion::V2 {
            let p = root.dir.join("cgroup.subtree_control");
            std::fs::write(&p, "+memory").map_err(|error| TuneError::Cgroup {
                what: "enabling the memory controller in",
                path: p,
                error,
            })?;
        }
        Ok(root)
    }

    /// Runs `cmd` once in a new cgroup `label` under `limit`.
    fn run(
        &self,
        label: &str,
        limit: Option<u64>,
        cmd: &[OsString],
    ) -> Result<(Run, ExitStatus, String), TuneError> {
        let rel = format!("{}/{label}", self.rel);
        let dir = self.hierarchy.dir(&rel);
        std::fs::create_dir(&dir).map_err(|error| TuneError::Cgroup {
            what: "creating",
            path: dir.clone(),
            error,
        })?;
        let result = self.run_in(&rel, &dir, limit, cmd);
        remove_cgroup(&dir);
        result
    }

    fn run_in(
        &self,
        rel: &str,
        dir: &Path,
        limit: Option<u64>,
        cmd: &[OsString],
    ) -> Result<(Run, ExitStatus, String), TuneError> {
        if let Some(bytes) = limit {
            let cg = self.hierarchy.open_below(&self.rel, rel)?;
            let (max_file, _) = self.hierarchy.limit_files();
            let swap = match self.hierarchy.version {
                CgroupVersion::V1 => ("memory.memsw.limit_in_bytes", bytes),
                CgroupVersion::V2 => ("memory.swap.max", 0),
            };
            // v1 wants memory.limit_in_bytes <= memsw.limit_in_bytes at every step: the
            // limit first (memsw is unlimited in a new cgroup), then memsw.
            for (file, value) in [(max_file, bytes), swap] {
                let path = dir.join(file);
                if file == swap.0 && !path.exists() {
                    // No swap accounting (v1 without swapaccount, v2 without swap): nothing
                    // for swap to hide a limit behind that this file could stop.
                    continue;
                }
                cg.write(file, value).map_err(|error| TuneError::Cgroup {
                    what: "writing",
                    path,
                    error,
                })?;
            }
        }
        let command = display_command(cmd);
        let spawn_err = |error| TuneError::Spawn {
            command: command.clone(),
            error,
        };
        // The command's stderr goes to an unnamed file: shown when the baseline fails, and it
        // cannot block the command the way a full pipe would.
        let mut stderr = tempfile::tempfile().map_err(spawn_err)?;
        let (program, args) = cmd.split_first().ok_or(TuneError::NoCommand)?;
        let mut c = Command::new(program);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.try_clone().map_err(spawn_err)?);
        // Joined before exec: all of the command's memory, from its first page, is the cgroup's.
        join_before_exec(&mut c, dir).map_err(|error| TuneError::Cgroup {
            what: "joining",
            path: dir.to_owned(),
            error,
        })?;
        // A signal between runs, or between the spawn and the wait (which it then does not
        // interrupt), must not let a whole run go on.
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(TuneError::Interrupted);
        }
        let start = Instant::now();
        let child = c.spawn().map_err(spawn_err)?;
        if INTERRUPTED.load(Ordering::SeqCst) {
            // SAFETY: killing our own child, not yet reaped (the wait below reaps it).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        }
        let status = wait_interruptible(child.id()).map_err(spawn_err)?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(TuneError::Interrupted);
        }
        let counted = self.hierarchy.oom_kills(dir)?;
        let killed = status.signal() == Some(libc::SIGKILL);
        let run = Run {
            ms,
            oom_kills: if counted == 0 && killed { 1 } else { counted },
            failed: !status.success(),
            peak: self.hierarchy.peak(dir)?,
        };
        Ok((run, status, stderr_tail(&mut stderr)))
    }
}

/// The last 64 KiB of what the command wrote to stderr (the end is where errors are), as
/// text even where it is not UTF-8 or the cut splits a character.
fn stderr_tail(file: &mut std::fs::File) -> String {
    const TAIL: u64 = 64 << 10;
    let len = file.metadata().map_or(0, |m| m.len());
    let mut bytes = Vec::new();
    if file
        .seek(std::io::SeekFrom::Start(len.saturating_sub(TAIL)))
        .is_ok()
    {
        let _ = file.take(TAIL).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Drop for TuneRoot {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup(&e.path());
                }
            }
        }
        remove_cgroup(&self.dir);
    }
}

/// Kills what is left in one of our cgroups (a command's leftover children) and removes it.
fn remove_cgroup(dir: &Path) {
    for _ in 0..100 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: signalling a process of a cgroup this command created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("emars tune: could not remove {}", dir.display());
}

/// waitpid that a SIGINT/SIGTERM to us interrupts: the command is then killed, and reaped.
fn wait_interruptible(pid: u32) -> std::io::Result<ExitStatus> {
    let pid = pid as libc::pid_t;
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            // SAFETY: killing our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn display_command(cmd: &[OsString]) -> String {
    cmd.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sweep: `runs` runs without a limit, then `runs` under each limit; writes tune.json and
/// tune.svg into `out` and returns the report.
pub fn run(
    limits: Option<&[u64]>,
    runs: usize,
    out: &Path,
    cmd: &[OsString],
    progress: &mut dyn FnMut(&str),
) -> Result<TuneReport, TuneError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(TuneError::NotRoot);
    }
    if cmd.is_empty() {
        return Err(TuneError::NoCommand);
    }
    crate::files::output_dir(out)?;
    catch_signals();
    let hierarchy = MemoryHierarchy::detect(CgroupMode::Auto, None)?;
    let version = hierarchy.version;
    let root = TuneRoot::create(hierarchy)?;

    let mut base_runs = Vec::new();
    for i in 0..runs {
        let (r, status, stderr) = root.run(&format!("nolimit-{i}"), None, cmd)?;
        if !status.success() {
            let tail: String = stderr
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(TuneError::BaselineFailed {
                status: status.to_string(),
                stderr: if tail.trim().is_empty() {
                    String::new()
                } else {
                    format!("; its stderr:\n{}", tail.trim_end())
                },
            });
        }
        base_runs.push(r);
    }
    let baseline = summarize(None, &base_runs);
    progress(&format!(
        "no limit: median {:.1} ms, peak {}",
        baseline.median_ms,
        baseline.peak_bytes.map_or_else(|| "-".into(), human_bytes)
    ));
    let limits = match limits {
        Some(l) => l.to_vec(),
        None => default_limits(baseline.peak_bytes.ok_or(TuneError::NoPeak)?),
    };
    let mut results = Vec::new();
    for limit in &limits {
        let mut rs = Vec::new();
        for i in 0..runs {
            rs.push(root.run(&format!("{limit}-{i}"), Some(*limit), cmd)?.0);
        }
        let r = summarize(Some(*limit), &rs);
        progress(&format!(
            "{}: median {:.1} ms, {}, {}",
            human_bytes(*limit),
            r.median_ms,
            count(r.oom_kills, "OOM kill", "OOM kills"),
            count(r.failures, "failure", "failures")
        ));
        results.push(r);
    }
    drop(root);

    let knee_bytes = knee(baseline.median_ms, &results);
    let report = TuneReport {
        command: cmd
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        cgroup_version: version.as_str().to_owned(),
        runs_per_limit: runs,
        knee_rule: KNEE_RULE,
        baseline,
        limits: results,
        knee_bytes,
    };
    let json_path = out.join("tune.json");
    let json = serde_json::to_string_pretty(&report).map_err(|error| TuneError::Json {
        path: json_path.clone(),
        error,
    })?;
    crate::files::write_output(&json_path, json.as_bytes())?;
    let svg = plot::tune_svg(&TunePlot {
        title: format!("emars tune: {}", display_command(cmd)),
        baseline_ms: report.baseline.median_ms,
        points: report
            .limits
            .iter()
            .map(|r| TunePoint {
                limit_bytes: r.limit_bytes.unwrap_or(0),
                median_ms: r.median_ms,
                max_ms: r.max_ms,
                oom_kills: r.oom_kills,
                failures: r.failures,
            })
            .collect(),
        knee_bytes,
    })?;
    crate::files::write_output(&out.join("tune.svg"), svg.as_bytes())?;
    Ok(report)
}

/// The table `emars tune` prints.
pub fn render(r: &TuneReport) -> String {
    let headers = [
        ("limit", Align::Right),
        ("runs", Align::Right),
        ("median ms", Align::Right),
        ("max ms", Align::Right),
        ("OOM kills", Align::Right),
        ("failures", Align::Right),
        ("peak", Align::Right),
        ("", Align::Left),
    ];
    let row = |l: &LimitResult| {
        vec![
            l.limit_bytes.map_or_else(|| "none".into(), human_bytes),
            l.runs.to_string(),
            format!("{:.1}", l.median_ms),
            format!("{:.1}", l.max_ms),
            l.oom_kills.to_string(),
            l.failures.to_string(),
            l.peak_bytes.map_or_else(|| "-".into(), human_bytes),
            if l.limit_bytes.is_some() && l.limit_bytes == r.knee_bytes {
                "<- knee".into()
            } else {
                String::new()
            },
        ]
    };
    let rows: Vec<Vec<String>> = std::iter::once(&r.baseline)
        .chain(&r.limits)
        .map(row)
        .collect();
    let mut s = table(&headers, &rows);
    let _ = match r.knee_bytes {
        Some(k) => writeln!(s, "knee: {} ({k} B): {}", human_bytes(k), KNEE_RULE),
        None => writeln!(s, "no knee: no limit met the rule ({KNEE_RULE})"),
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_kubernetes_writes_them_and_bad_ones_say_why() {
        assert_eq!(parse_size("16Mi").ok(), Some(16 << 20));
        assert_eq!(parse_size("16M").ok(), Some(16_000_000));
        assert_eq!(parse_size("512Ki").ok(), Some(512 << 10));
        assert_eq!(parse_size("1Gi").ok(), Some(1 << 30));
        assert_eq!(parse_size("1.5Gi").ok(), Some(3 << 29));
        assert_eq!(parse_size("1048576").ok(), Some(1 << 20));
        assert_eq!(parse_size(" 8192 ").ok(), Some(8192));
        for (bad, why) in [
            ("", "empty"),
            ("M", "no number"),
            ("-1M", "negative"),
            ("16X", "unknown unit"),
            ("16 M", "right after the number"),
            ("16MiB", "write Mi for MiB"),
            ("100", "below one page"),
            ("0", "below one page"),
            ("99999999999999999999", "too large"),
            ("9999999Ti", "too large"),
            ("4Ei", "too large"),
        ] {
            let e = parse_size(bad).expect_err(bad).to_string();
            assert!(
                e.contains(why) && e.contains(&format!("{bad:?}")) && e.contains("64Mi"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            parse_limits("64Mi,16Mi,32Mi,16Mi").ok(),
            Some(vec![16 << 20, 32 << 20, 64 << 20])
        );
        assert!(parse_limits("16Mi,,32Mi").is_err());
    }

    #[test]
    fn default_sweep_spans_half_to_twice_the_peak_in_mib() {
        let l = default_limits(40 << 20);
        assert_eq!(l.len(), 8);
        assert_eq!(l.first(), Some(&(20 << 20)));
        assert_eq!(l.last(), Some(&(80 << 20)));
        assert!(l.iter().all(|v| v % MIB == 0) && l.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(default_limits(0), vec![MIB]);
    }

    fn result(mib: u64, median_ms: f64, oom_kills: u64, failures: u64) -> LimitResult {
        LimitResult {
            limit_bytes: Some(mib << 20),
            runs: 3,
            median_ms,
            max_ms: median_ms,
            oom_kills,
            failures,
            peak_bytes: None,
        }
    }

    #[test]
    fn the_knee_is_the_smallest_limit_without_ooms_failures_or_slowdown() {
        let r = [
            result(16, 20.0, 3, 3),  // killed early: fast but useless
            result(32, 150.0, 0, 0), // reclaiming: 50 % slower
            result(48, 100.0, 0, 1), // a failure
            result(64, 109.0, 0, 0), // within 10 %
            result(128, 100.0, 0, 0),
        ];
        assert_eq!(knee(100.0, &r), Some(64 << 20));
        assert_eq!(knee(100.0, &r[..4]), Some(64 << 20));
        assert_eq!(knee(100.0, &r[..3]), None);
        // 10 % of 10 ms is below noise: 5 ms of slack.
        assert_eq!(knee(10.0, &[result(8, 14.9, 0, 0)]), Some(8 << 20));
        assert_eq!(knee(10.0, &[result(8, 15.1, 0, 0)]), None);
        // The order of the results does not matter.
        let mut rev = r.to_vec();
        rev.reverse();
        assert_eq!(knee(100.0, &rev), Some(64 << 20));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
    }
}
