//! Types shared by the eBPF programs (emars-ebpf) and the agent (emars-agent).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes it into maps and the ring
//! buffer, the user side reads it byte for byte. The `user` feature adds `aya::Pod` impls.
#![no_std]

#[cfg(test)]
extern crate std;

/// Bytes of a cgroup path or exec filename carried in an [`Event`].
pub const EVENT_NAME_LEN: usize = 256;
/// Bytes of a watched-root prefix (path relative to the hierarchy root, e.g. `/emars`).
pub const ROOT_PREFIX_LEN: usize = 128;
/// Watched roots the kernel side compares mkdir paths against.
pub const MAX_ROOTS: u32 = 8;
/// Entries of the memcg item → byte-unit table; covers node_stat_item and memcg_stat_item.
pub const MAX_MEMCG_ITEMS: u32 = 128;

/// Map and global names, shared so the loader cannot drift from the programs.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const WATCH_ROOTS: &str = "WATCH_ROOTS";
    pub const WATCHED: &str = "WATCHED";
    pub const TASKS: &str = "TASKS";
    pub const ITEM_UNITS: &str = "ITEM_UNITS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CONFIG: &str = "CONFIG";
    pub const SETTINGS: &str = "SETTINGS";
    pub const NET_COUNTS: &str = "NET_COUNTS";
    /// The program attached to the watched roots' cgroups (cgroup v2), not to a tracepoint.
    pub const NET_INGRESS: &str = "net_ingress";
    /// Every program of emars-ebpf (the function names in emars-ebpf/src/main.rs).
    pub const PROGRAMS: [&str; 10] = [
        "cgroup_mkdir",
        "raw_cgroup_rmdir",
        "cgroup_rmdir",
        "cgroup_attach_task",
        "sched_process_fork",
        "sched_process_exec",
        "sched_process_exit",
        "oom_mark_victim",
        "memcg_mod_memcg_state",
        "memcg_mod_memcg_lruvec_state",
    ];
}

/// What an [`Event`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A cgroup was created under a watched root; it is now tracked in `WATCHED`.
    CgroupMkdir = 1,
    /// A watched cgroup was removed; `value` = final in-kernel charge-event peak, `aux` = the
    /// kernel's own watermark read at removal (0 = not available on this kernel).
    CgroupRmdir = 2,
    /// A task moved into a watched cgroup (memory hierarchy).
    TaskAttach = 3,
    /// A task of a watched cgroup called execve; `name` = filename.
    Exec = 4,
    /// A thread-group leader of a watched cgroup exited.
    Exit = 5,
    /// A watched cgroup's in-kernel usage reached a new high-water step; `value` = peak, `aux` = usage.
    MemPeak = 6,
    /// A task of a watched cgroup was chosen as OOM victim.
    OomVictim = 7,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::CgroupMkdir,
            2 => Self::CgroupRmdir,
            3 => Self::TaskAttach,
            4 => Self::Exec,
            5 => Self::Exit,
            6 => Self::MemPeak,
            7 => Self::OomVictim,
            _ => return None,
        })
    }
}

/// The fixed part of every record of the `EVENTS` ring buffer. A record is this header,
/// followed by `name_len + 1` bytes of name (path or filename and its NUL) for the kinds that
/// carry one: records are as long as what they carry (56 bytes for most), so the ring holds
/// several times more of them while the agent is down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub pid: u32,
    /// cgroup id in the memory hierarchy: the inode of the cgroup directory.
    pub cgroup_id: u64,
    pub value: u64,
    pub aux: u64,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub hierarchy: i32,
    pub level: i32,
    pub _pad: u32,
    /// Valid bytes of the name that follows (without the NUL); 0 for kinds without one.
    pub name_len: u32,
}

/// Bytes of an [`EventHeader`]: the shortest record.
pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// The format of the ring's records ([`EventHeader`], [`EventKind`], the name after them).
/// Recorded with each pinned set: an agent reads the records a replaced set left in its ring
/// only when they are in this format. Bump it with any change to what a record holds.
pub const EVENT_FORMAT: u32 = 1;

// A change of the header's size is a change of the format: bump EVENT_FORMAT with this figure.
const _: () = assert!(EVENT_HEADER_LEN == 56 && EVENT_FORMAT == 1);

/// A header and room for the longest name: where the kernel side builds a named record before
/// sending its used part.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    pub head: EventHeader,
    pub name: [u8; EVENT_NAME_LEN],
}

/// A watched root: mkdirs below it in hierarchy `hierarchy` start being tracked in the kernel,
/// before any task can be attached, so no charge of a new instance is missed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WatchRoot {
    pub hierarchy: i32,
    /// Bytes of `prefix` in use; 0 = empty slot.
    pub len: u32,
    pub prefix: [u8; ROOT_PREFIX_LEN],
}

impl WatchRoot {
    pub const EMPTY: WatchRoot = WatchRoot {
        hierarchy: 0,
        len: 0,
        prefix: [0; ROOT_PREFIX_LEN],
    };
}

/// Per watched cgroup memory state, kept by the memcg tracepoint programs.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct MemState {
    /// Sum of charged bytes seen through memcg stat events (anon + file + kernel + sock).
    pub usage: i64,
    /// Highest `usage` seen.
    pub peak: i64,
    /// `peak` when the last MemPeak event was sent.
    pub reported: i64,
}

/// What the cgroup_skb ingress program counted for one cgroup (cgroup v2 id, the directory's
/// inode in the unified hierarchy): the `NET_COUNTS` map's value. Totals since the cgroup's
/// first packet; the agent keeps its last reading and adds the difference to the hour.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct NetCounts {
    /// Inbound TCP connection requests (SYN without ACK) to a listening socket of the cgroup.
    pub connections: u64,
    /// Inbound TCP segments whose first payload bytes start an HTTP/1.x request line
    /// (`GET `, `POST `, ...): each request of a keep-alive connection counts.
    pub requests: u64,
}

/// Bytes of a segment's payload the request-line test reads: the longest method and its space.
pub const REQUEST_HEAD_LEN: usize = 8;

/// The HTTP/1.x methods (RFC 9110 section 9) and the space after them, as the first bytes of a
/// request line.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// A method's bytes as the low bytes of a little-endian word, and the mask that selects them.
const fn method_word(m: &[u8]) -> (u64, u64) {
    let mut word = 0u64;
    let mut i = 0;
    while i < m.len() {
        word |= (m[i] as u64) << (8 * i);
        i += 1;
    }
    let mask = if m.len() >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * m.len())) - 1
    };
    (word, mask)
}

const METHOD_WORDS: [(u64, u64); 9] = {
    let mut out = [(0, 0); 9];
    let mut i = 0;
    while i < METHODS.len() {
        out[i] = method_word(METHODS[i]);
        i += 1;
    }
    out
};

/// Whether a TCP payload whose first [`REQUEST_HEAD_LEN`] bytes are `head` (read as a
/// little-endian word) starts an HTTP/1.x request line: a method and its space. Nine compares,
/// no loop the verifier has to bound: the in-kernel test of every inbound segment.
#[inline(always)]
pub fn starts_request_line(head: u64) -> bool {
    let mut i = 0;
    while i < METHOD_WORDS.len() {
        let (word, mask) = METHOD_WORDS[i];
        if head & mask == word {
            return true;
        }
        i += 1;
    }
    false
}

/// Indexes of the `COUNTERS` per-CPU array.
pub mod counter {
    /// Ring buffer reservations that failed: events lost.
    pub const LOST: u32 = 0;
    /// Task table inserts that failed.
    pub const TASK_TABLE_FULL: u32 = 1;
    /// Watched table inserts that failed.
    pub const WATCH_TABLE_FULL: u32 = 2;
    /// memcg stat events seen for watched cgroups.
    pub const MEMCG_EVENTS: u32 = 3;
    /// Peak steps not sent because the ring was over half full (the agent away or behind):
    /// the other half is kept for the lifecycle events that make instance records.
    pub const PEAKS_HELD: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Settings the agent writes at every start, into the one entry of the `SETTINGS` array map,
/// whether it loads the programs or adopts a pinned set: changing them replaces nothing, so a
/// restart that changes them loses no event.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct RunSettings {
    /// 1 when a new cgroup wakes the agent at once (its limits are due: enforce mode); else
    /// its record waits for the agent's next read, like the rest.
    pub wake_on_mkdir: u32,
    pub _pad: u32,
    /// Minimum growth of the peak between two MemPeak events.
    pub peak_step_bytes: u64,
}

/// What the programs use should `SETTINGS` not be found (it always is: an array's entry).
pub const DEFAULT_PEAK_STEP_BYTES: u64 = 1 << 20;

/// Start-up configuration of the programs, written into their read-only `CONFIG` global:
/// what the running kernel decides (offsets from its tracefs format files and BTF, the memory
/// hierarchy), nothing an operator sets. Part of a pinned set's identity.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ProbeConfig {
    /// Hierarchy id holding the memory controller (0 = cgroup2).
    pub mem_hierarchy: i32,
    /// 1 when bpf_get_current_cgroup_id() names the memory cgroup (pure cgroup v2).
    pub current_cgroup_is_memcg: u32,
    pub mkdir: CgroupTpOffsets,
    pub rmdir: CgroupTpOffsets,
    pub attach: AttachTpOffsets,
    pub fork_parent_pid: u32,
    pub fork_child_pid: u32,
    pub exec_pid: u32,
    pub exec_filename: u32,
    pub exit_pid: u32,
    pub oom_pid: u32,
    pub memcg_state: MemcgTpOffsets,
    pub memcg_lruvec: MemcgTpOffsets,
    pub layout: KernelLayout,
}

/// Where the kernel keeps a memory cgroup's high watermark, read from the running kernel's BTF
/// at start-up (never baked in). Lets the raw cgroup_rmdir program read the exact watermark as
/// the cgroup goes away, on kernels without memcg tracepoints too.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KernelLayout {
    /// 0 = unknown: the raw rmdir program then only reports the in-kernel estimate.
    pub valid: u32,
    /// enum cgroup_subsys_id: memory_cgrp_id.
    pub memory_cgrp_id: u32,
    /// struct cgroup: kn, root, subsys[].
    pub cgroup_kn: u32,
    pub cgroup_root: u32,
    pub cgroup_subsys: u32,
    /// struct kernfs_node: id (the cgroup id).
    pub kernfs_node_id: u32,
    /// struct cgroup_root: hierarchy_id.
    pub root_hierarchy_id: u32,
    /// struct mem_cgroup: css, memory (a struct page_counter).
    pub memcg_css: u32,
    pub memcg_memory: u32,
    /// struct page_counter: watermark (pages).
    pub page_counter_watermark: u32,
    pub _pad: u32,
    pub page_size: u64,
}

/// Field offsets of cgroup:cgroup_mkdir / cgroup_rmdir.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CgroupTpOffsets {
    pub root: u32,
    pub level: u32,
    pub id: u32,
    pub path: u32,
}

/// Field offsets of cgroup:cgroup_attach_task.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct AttachTpOffsets {
    pub root: u32,
    pub level: u32,
    pub id: u32,
    pub pid: u32,
    pub path: u32,
    pub _pad: u32,
}

/// Field offsets of memcg:mod_memcg_state / mod_memcg_lruvec_state.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct MemcgTpOffsets {
    pub id: u32,
    pub item: u32,
    pub val: u32,
    /// Bytes of `val`: `int` (4) up to 6.x, `long` (8) on 7.x.
    pub val_size: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain integers/arrays with no padding holes that the
    // kernel could misread (explicit _pad fields keep the layout fixed).
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::WatchRoot {}
    unsafe impl aya::Pod for super::MemState {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::RunSettings {}
    unsafe impl aya::Pod for super::NetCounts {}
}

#[cfg(test)]
mod tests {
    use std::string::String;

    use super::*;

    fn head(bytes: &[u8]) -> u64 {
        let mut b = [0u8; REQUEST_HEAD_LEN];
        let n = bytes.len().min(REQUEST_HEAD_LEN);
        b[..n].copy_from_slice(&bytes[..n]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn request_lines_are_told_from_other_payloads() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /invoke HTTP/1.1\r\n",
            b"PUT /x HTTP/1.0\r\n",
            b"HEAD / HTTP/1.1\r\n",
            b"DELETE /k HTTP/1.1\r\n",
            b"PATCH /k HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT host:443 HTTP/1.1\r\n",
            b"TRACE / HTTP/1.1\r\n",
        ] {
            assert!(
                starts_request_line(head(line)),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        for other in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"GETS / HTTP/1.1",
            b"get / HTTP/1.1",
            b"{\"GET \": 1}",
            b"\x16\x03\x01\x02\x00\x01\x00\x01",
            b"POSTX /",
            b"",
        ] {
            assert!(
                !starts_request_line(head(other)),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
