//! What the benchmark binaries share: stopping cleanly on a signal (every guard dropped as on
//! any other error) and kernel.bpf_stats_enabled turned on for a run and put back after.

use std::{
    fs,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};

/// Where the kernel turns the programs' run-time accounting on.
pub const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP only set a flag: the bench's loops then fail with an error (see
/// [`check_interrupted`]), so every guard (bpf_stats, agents, cgroups, pins) is dropped as on
/// any other error.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler) };
    }
}

/// An error once a signal came.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// Enables kernel.bpf_stats_enabled and puts the previous value back when dropped, on success,
/// error and panic alike (as bpftop does).
pub struct BpfStatsGuard {
    previous: String,
    /// The bench's name, for what it says when dropped.
    tool: &'static str,
}

impl BpfStatsGuard {
    pub fn enable(tool: &'static str) -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(Self { previous, tool })
    }

    /// The value found before the run (put back when dropped).
    pub fn previous(&self) -> &str {
        &self.previous
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        match fs::write(BPF_STATS, &self.previous) {
            Ok(()) => eprintln!("{}: {BPF_STATS} restored to {}", self.tool, self.previous),
            Err(e) => eprintln!(
                "{}: WARNING: could not restore {BPF_STATS} to {}: {e}",
                self.tool, self.previous
            ),
        }
    }
}
