//! Kernel probes: the eBPF loader (`loader`), what the running kernel offers them
//! (`kernel_facts`: tracefs formats, BTF layout, the watermark file; `tracefs`; `memcg_items`:
//! stat items from BTF), the pinned set in bpffs (`pins`, `pinning`: a fresh load pinned) and
//! the replacement of other versions' sets (`replaced`), and the socket program attached to
//! the watched roots' cgroups (`net`).

mod kernel_facts;
pub mod loader;
pub mod memcg_items;
mod net;
mod pinning;
pub mod pins;
pub mod replaced;
pub mod tracefs;

use serde::{Deserialize, Serialize};

pub use loader::{ProbeError, ProbeReport, Probes};

/// `probes.charge_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChargeEvents {
    /// Only where the final peak would otherwise not be exact (no raw cgroup_rmdir program or
    /// no BTF layout): elsewhere the kernel's own watermark comes with each rmdir, and live
    /// peaks are read from the watermark file on exec, exit and each reconciliation pass.
    #[default]
    Auto,
    /// Wherever the kernel has the tracepoints: live peaks as they grow.
    On,
    Off,
}

/// One eBPF program as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProgramStatus {
    pub name: String,
    /// "category:name" of the tracepoint.
    pub tracepoint: String,
    pub attached: bool,
    /// Why not, when not attached.
    pub error: Option<String>,
    /// From bpf_stats when enabled (kernel.bpf_stats_enabled or BPF_ENABLE_STATS).
    pub run_count: Option<u64>,
    pub run_time_ns: Option<u64>,
}

/// GET /v1/info → "kernel_counters": conditions that would otherwise go unseen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct KernelCounters {
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Tasks not tracked: the task table (probes.max_tasks) was full.
    pub task_table_full: u64,
    /// Cgroups not watched in the kernel: the table (probes.max_watched_cgroups) was full.
    pub watch_table_full: u64,
    /// Cgroup paths longer than an event carries; the agent looked them up by cgroup id.
    #[serde(default)]
    pub paths_truncated: u64,
    /// Of those, paths it could not find (the cgroup was not tracked rather than misnamed).
    #[serde(default)]
    pub paths_unresolved: u64,
    /// Peak steps the kernel side held back while the ring was over half full (the final
    /// peak of each instance still comes with its rmdir).
    #[serde(default)]
    pub peaks_held: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// eBPF programs not to attach, by name (as listed by GET /v1/info).
    pub disable: Vec<String>,
    /// Whether the memcg charge programs run: they stream live peaks, at a cost every memory
    /// stat update on the host pays (measured in docs/config.md).
    pub charge_events: ChargeEvents,
    /// Growth of a cgroup's in-kernel peak between two peak events.
    pub peak_step_bytes: u64,
    /// Size of the kernel → agent ring buffer.
    pub ring_buffer_bytes: u32,
    /// Capacity of the kernel's table of watched cgroups (live instances at once).
    pub max_watched_cgroups: u32,
    /// Capacity of the kernel's task → cgroup table (tasks in watched cgroups at once).
    pub max_tasks: u32,
    /// Keep the kernel side pinned in bpffs, recording while no agent runs (a crash, a
    /// restart, an upgrade); the next agent adopts it. `emars unpin` removes it.
    pub pin: bool,
    /// Where (on bpffs; mounted at /sys/fs/bpf when absent).
    pub pin_path: std::path::PathBuf,
}
