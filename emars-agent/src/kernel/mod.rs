//! What the kernel tells: the eBPF programs and their loader (`probes`), the records they send
//! (`events`), and the cgroup files read and written directly (`cgroupfs`).

pub mod cgroupfs;
pub mod events;
pub mod notify;
pub mod probes;
pub mod ring;
