//! What the kernel tells and what the agent reads from the host, with no model of its own:
//! - `probes`: the eBPF programs, their loader, pins and the kernel counters they keep;
//! - `netcount`: requests counted by the socket program, read per instance (cgroup v2);
//! - `ring`: the ring buffer the programs send records through, drained in batches;
//! - `events`: those records, decoded;
//! - `notify`: the cgroup and pressure files the agent waits on (inotify, PSI triggers,
//!   memory.events);
//! - `cgroupfs`: the cgroup files read and written directly (limits, usage, peaks), opened
//!   below a watched root;
//! - `host`: the host's memory (MemTotal, MemAvailable);
//! - `runtime_meta`: a container runtime's metadata file, read safely (its meaning is
//!   `model::runtime`'s).

pub mod cgroupfs;
pub mod events;
pub mod host;
pub mod netcount;
pub mod notify;
pub mod probes;
pub mod ring;
pub mod runtime_meta;
