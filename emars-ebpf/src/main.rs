//! EMARS kernel probes: tracepoints only (no kprobes, no CO-RE), every field offset from the
//! `CONFIG` global that the agent fills from the tracefs format files of the running kernel.
//!
//! Lifecycle (mkdir/rmdir/attach/fork/exec/exit/OOM) is sent to userspace as events; memcg charge
//! events are filtered to the watched cgroups and aggregated here, so a charge storm costs one
//! hash lookup per event and sends only new high-water steps.
#![no_std]
#![no_main]
// atomic_xadd: core's AtomicI64::fetch_add is not offered for the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::read_volatile,
};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, SkBuffContext, TracePointContext},
    EbpfContext,
};
use emars_common::{
    counter, starts_request_line, Event, EventHeader, EventKind, MemState, MemcgTpOffsets,
    NetCounts, ProbeConfig, RunSettings, WatchRoot, DEFAULT_PEAK_STEP_BYTES, EVENT_HEADER_LEN,
    EVENT_NAME_LEN, MAX_MEMCG_ITEMS, MAX_ROOTS, REQUEST_HEAD_LEN, ROOT_PREFIX_LEN,
};

#[no_mangle]
static CONFIG: ProbeConfig = ProbeConfig {
    mem_hierarchy: 0,
    current_cgroup_is_memcg: 0,
    mkdir: emars_common::CgroupTpOffsets {
        root: 0,
        level: 0,
        id: 0,
        path: 0,
    },
    rmdir: emars_common::CgroupTpOffsets {
        root: 0,
        level: 0,
        id: 0,
        path: 0,
    },
    attach: emars_common::AttachTpOffsets {
        root: 0,
        level: 0,
        id: 0,
        pid: 0,
        path: 0,
        _pad: 0,
    },
    fork_parent_pid: 0,
    fork_child_pid: 0,
    exec_pid: 0,
    exec_filename: 0,
    exit_pid: 0,
    oom_pid: 0,
    memcg_state: emars_common::MemcgTpOffsets {
        id: 0,
        item: 0,
        val: 0,
        val_size: 0,
    },
    memcg_lruvec: emars_common::MemcgTpOffsets {
        id: 0,
        item: 0,
        val: 0,
        val_size: 0,
    },
    layout: emars_common::KernelLayout {
        valid: 0,
        memory_cgrp_id: 0,
        cgroup_kn: 0,
        cgroup_root: 0,
        cgroup_subsys: 0,
        kernfs_node_id: 0,
        root_hierarchy_id: 0,
        memcg_css: 0,
        memcg_memory: 0,
        page_counter_watermark: 0,
        _pad: 0,
        page_size: 4096,
    },
};

/// Size is set by the loader (config `probes.ring_buffer_bytes`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static WATCH_ROOTS: Array<WatchRoot> = Array::with_max_entries(MAX_ROOTS, 0);

/// Watched cgroups (memory hierarchy id → state). Filled here at mkdir and by the agent for
/// cgroups that existed before it started.
#[map]
static WATCHED: HashMap<u64, MemState> = HashMap::with_max_entries(65536, 0);

/// Task (pid) → watched memory cgroup id. Needed because on a hybrid host
/// bpf_get_current_cgroup_id() names the (empty) v2 cgroup, not the v1 memory cgroup.
#[map]
static TASKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(131072, 0);

/// memcg stat item → bytes per unit (0 = not part of usage). Filled by the agent from BTF.
#[map]
static ITEM_UNITS: Array<u64> = Array::with_max_entries(MAX_MEMCG_ITEMS, 0);

/// The settings the agent may change at any start without replacing a pinned set (one entry,
/// written by the agent before the programs are attached and again by each agent that adopts
/// them); read where they are used, never folded into the code.
#[map]
static SETTINGS: Array<RunSettings> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-CPU room to build an event before deciding to keep it (larger than the BPF stack).
#[map]
static SCRATCH: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn cfg() -> &'static ProbeConfig {
    &CONFIG
}

#[inline(always)]
fn cfg_u32(field: &u32) -> usize {
    // SAFETY: reading our own global; volatile so the compiler does not fold the zero default.
    unsafe { read_volatile(field) as usize }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: usize) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; offsets come from the format files.
    unsafe { ctx.read_at::<T>(offset) }.ok()
}

/// Copies a `__data_loc char[]` field into `dst`; returns the bytes copied (without NUL).
#[inline(always)]
fn read_data_loc(ctx: &TracePointContext, field_offset: usize, dst: &mut [u8]) -> u32 {
    let Some(loc) = read::<u32>(ctx, field_offset) else {
        return 0;
    };
    let off = (loc & 0xffff) as usize;
    // SAFETY: the string lies inside the tracepoint record; the helper bounds the copy.
    let src = unsafe { (ctx.as_ptr() as *const u8).add(off) };
    match unsafe { bpf_probe_read_kernel_str_bytes(src, dst) } {
        Ok(s) => s.len() as u32,
        Err(_) => 0,
    }
}

/// A header with the common fields filled.
#[inline(always)]
fn header(kind: EventKind, pid: u32, cgroup_id: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid,
        cgroup_id,
        value: 0,
        aux: 0,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        hierarchy: 0,
        level: 0,
        _pad: 0,
        name_len: 0,
    }
}

/// This CPU's scratch event, for a record with a name.
#[inline(always)]
fn scratch() -> Option<&'static mut Event> {
    let ev = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; tracepoint programs do not nest on one CPU.
    Some(unsafe { &mut *ev })
}

/// Sends the used part of a named record: the header and `name_len` bytes and the NUL.
#[inline(always)]
fn send_named(ev: &Event, kind: EventKind, wake_now: bool) {
    // Masked so the verifier sees the size bounded by the scratch buffer (name_len is at most
    // EVENT_NAME_LEN - 1: the string helper keeps a byte for the NUL).
    let n = EVENT_HEADER_LEN + (ev.head.name_len as usize & (EVENT_NAME_LEN - 1)) + 1;
    // SAFETY: n <= size_of::<Event>(); the bytes lie inside `ev`.
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const Event).cast::<u8>(), n) };
    let flags = if wake_now {
        RB_FORCE_WAKEUP
    } else {
        wake(kind)
    };
    if EVENTS.output::<[u8]>(bytes, flags).is_err() {
        bump(counter::LOST);
    }
}

/// `BPF_RB_NO_WAKEUP` / `BPF_RB_FORCE_WAKEUP`: ring-buffer submit flags.
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query` flags: bytes not yet consumed, and the ring's size.
const RB_AVAIL_DATA: u64 = 0;
const RB_RING_SIZE: u64 = 1;

/// Whether an event wakes the agent. A wake-up costs the kernel an irq_work and the agent a
/// context switch, inside the platform's own syscall (measured: exec 9.5 → 0.7 µs, exit 10.8
/// → 1.8 µs without it). Only a new cgroup when its limits are due at once (enforce mode) and
/// an OOM kill are worth that; the rest wait in the ring for the next of those or the agent's
/// own drain (every 100 ms). Forced, not adaptive: after unwoken records the kernel's adaptive
/// rule would not wake the agent either.
#[inline(always)]
fn wake(kind: EventKind) -> u64 {
    match kind {
        // No settings (never: an array's entry is always there): waking costs only time.
        EventKind::CgroupMkdir if SETTINGS.get(0).is_none_or(|s| s.wake_on_mkdir != 0) => {
            RB_FORCE_WAKEUP
        }
        EventKind::OomVictim => RB_FORCE_WAKEUP,
        _ => RB_NO_WAKEUP,
    }
}

/// Sends a record without a name: the header alone.
#[inline(always)]
fn emit(kind: EventKind, pid: u32, cgroup_id: u64, value: u64, aux: u64) {
    let mut head = header(kind, pid, cgroup_id);
    head.value = value;
    head.aux = aux;
    if EVENTS.output::<EventHeader>(&head, wake(kind)).is_err() {
        bump(counter::LOST);
    }
}

/// True when `path[..len]` lies strictly below a watched root of `hierarchy`.
#[inline(always)]
fn under_watched_root(hierarchy: i32, path: &[u8; EVENT_NAME_LEN], len: u32) -> bool {
    let mut i = 0;
    while i < MAX_ROOTS {
        if let Some(root) = WATCH_ROOTS.get(i) {
            let rlen = root.len as usize;
            // A second, volatile read keeps the mask in the code: older verifiers (6.1) cannot
            // carry the `rlen < ROOT_PREFIX_LEN` bound to the index on their own.
            // SAFETY: reading a field of a map value we hold a reference to.
            let idx = unsafe { read_volatile(&root.len) } as usize & (ROOT_PREFIX_LEN - 1);
            if rlen > 0
                && rlen < ROOT_PREFIX_LEN
                && root.hierarchy == hierarchy
                && (len as usize) > rlen
                && prefix_eq(&root.prefix, path, rlen)
                && path[idx] == b'/'
            {
                return true;
            }
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn prefix_eq(prefix: &[u8; ROOT_PREFIX_LEN], path: &[u8; EVENT_NAME_LEN], len: usize) -> bool {
    let mut j = 0;
    while j < ROOT_PREFIX_LEN {
        if j >= len {
            return true;
        }
        if prefix[j] != path[j] {
            return false;
        }
        j += 1;
    }
    true
}

#[tracepoint]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(hierarchy) = read::<i32>(&ctx, cfg_u32(&c.mkdir.root)) else {
        return 0;
    };
    // SAFETY: reading our own global.
    if hierarchy != unsafe { read_volatile(&c.mem_hierarchy) } {
        return 0;
    }
    let Some(id) = read::<u64>(&ctx, cfg_u32(&c.mkdir.id)) else {
        return 0;
    };
    let level = read::<i32>(&ctx, cfg_u32(&c.mkdir.level)).unwrap_or(0);
    let Some(ev) = scratch() else {
        return 0;
    };
    let len = read_data_loc(&ctx, cfg_u32(&c.mkdir.path), &mut ev.name);
    if !under_watched_root(hierarchy, &ev.name, len) {
        return 0;
    }
    // Track from the first byte (no task can be in the cgroup yet), and before sending: a full
    // ring buffer loses the event, never the tracking.
    if WATCHED.insert(id, MemState::default(), 0).is_err() {
        bump(counter::WATCH_TABLE_FULL);
    }
    ev.head = header(EventKind::CgroupMkdir, 0, id);
    ev.head.hierarchy = hierarchy;
    ev.head.level = level;
    ev.head.name_len = len;
    // A path cut short is looked up by id below its last whole directory: while the cgroup
    // still exists, so the agent is woken for it in observe mode too.
    send_named(
        ev,
        EventKind::CgroupMkdir,
        len as usize >= EVENT_NAME_LEN - 1,
    );
    0
}

#[tracepoint]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(hierarchy) = read::<i32>(&ctx, cfg_u32(&c.rmdir.root)) else {
        return 0;
    };
    // SAFETY: reading our own global.
    if hierarchy != unsafe { read_volatile(&c.mem_hierarchy) } {
        return 0;
    }
    let Some(id) = read::<u64>(&ctx, cfg_u32(&c.rmdir.id)) else {
        return 0;
    };
    // SAFETY: value copied out before the delete below.
    let Some(state) = (unsafe { WATCHED.get(id) }).copied() else {
        return 0;
    };
    let _ = WATCHED.remove(id);
    let Some(ev) = scratch() else {
        return 0;
    };
    ev.head = header(EventKind::CgroupRmdir, 0, id);
    ev.head.hierarchy = hierarchy;
    ev.head.level = read::<i32>(&ctx, cfg_u32(&c.rmdir.level)).unwrap_or(0);
    ev.head.value = state.peak.max(0) as u64;
    ev.head.name_len = read_data_loc(&ctx, cfg_u32(&c.rmdir.path), &mut ev.name);
    send_named(ev, EventKind::CgroupRmdir, false);
    0
}

/// Reads a kernel value at `base + off`.
#[inline(always)]
fn kread<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

/// The kernel's own high watermark of a cgroup's memory counter, in bytes.
#[inline(always)]
fn memcg_watermark(cgrp: u64) -> Option<u64> {
    let l = &cfg().layout;
    if cfg_u32(&l.valid) == 0 {
        return None;
    }
    let slot = cfg_u32(&l.cgroup_subsys) as u64 + 8 * cfg_u32(&l.memory_cgrp_id) as u64;
    let css: u64 = kread(cgrp, slot as u32)?;
    let memcg = css.checked_sub(cfg_u32(&l.memcg_css) as u64)?;
    let off = cfg_u32(&l.memcg_memory) + cfg_u32(&l.page_counter_watermark);
    let pages: u64 = kread(memcg, off as u32)?;
    // SAFETY: reading our own global.
    Some(pages * unsafe { read_volatile(&l.page_size) })
}

/// Raw cgroup_rmdir: has the `struct cgroup *`, so besides the charge-event estimate it hands
/// over the kernel's exact watermark before the cgroup is gone. Preferred over cgroup_rmdir.
#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn raw_cgroup_rmdir(ctx: RawTracePointContext) -> i32 {
    let c = cfg();
    let l = &c.layout;
    let cgrp: u64 = ctx.arg(0);
    let Some(root) = kread::<u64>(cgrp, cfg_u32(&l.cgroup_root) as u32) else {
        return 0;
    };
    let Some(hierarchy) = kread::<i32>(root, cfg_u32(&l.root_hierarchy_id) as u32) else {
        return 0;
    };
    // SAFETY: reading our own global.
    if hierarchy != unsafe { read_volatile(&c.mem_hierarchy) } {
        return 0;
    }
    let Some(kn) = kread::<u64>(cgrp, cfg_u32(&l.cgroup_kn) as u32) else {
        return 0;
    };
    let Some(id) = kread::<u64>(kn, cfg_u32(&l.kernfs_node_id) as u32) else {
        return 0;
    };
    // SAFETY: value copied out before the delete below.
    let Some(state) = (unsafe { WATCHED.get(id) }).copied() else {
        return 0;
    };
    let _ = WATCHED.remove(id);
    let watermark = memcg_watermark(cgrp).unwrap_or(0);
    let Some(ev) = scratch() else {
        return 0;
    };
    let path: u64 = ctx.arg(1);
    ev.head = header(EventKind::CgroupRmdir, 0, id);
    ev.head.hierarchy = hierarchy;
    ev.head.value = state.peak.max(0) as u64;
    ev.head.aux = watermark;
    // SAFETY: the helper bounds the copy and checks the address.
    ev.head.name_len =
        match unsafe { bpf_probe_read_kernel_str_bytes(path as *const u8, &mut ev.name) } {
            Ok(s) => s.len() as u32,
            Err(_) => 0,
        };
    send_named(ev, EventKind::CgroupRmdir, false);
    0
}

#[tracepoint]
pub fn cgroup_attach_task(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(hierarchy) = read::<i32>(&ctx, cfg_u32(&c.attach.root)) else {
        return 0;
    };
    // SAFETY: reading our own global.
    if hierarchy != unsafe { read_volatile(&c.mem_hierarchy) } {
        return 0;
    }
    let (Some(id), Some(pid)) = (
        read::<u64>(&ctx, cfg_u32(&c.attach.id)),
        read::<i32>(&ctx, cfg_u32(&c.attach.pid)),
    ) else {
        return 0;
    };
    let pid = pid as u32;
    if WATCHED.get_ptr(id).is_none() {
        // Moved out of (or never in) a watched cgroup.
        let _ = TASKS.remove(pid);
        return 0;
    }
    if TASKS.insert(pid, id, 0).is_err() {
        bump(counter::TASK_TABLE_FULL);
    }
    emit(EventKind::TaskAttach, pid, id, 0, 0);
    0
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(parent) = read::<i32>(&ctx, cfg_u32(&c.fork_parent_pid)) else {
        return 0;
    };
    let parent = parent as u32;
    // cgroup_attach_task reports a moved process's leader only: a thread of it that forks is
    // found through its thread group id.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: values copied out immediately.
    let found = unsafe { TASKS.get(parent).or_else(|| TASKS.get(tgid)) }.copied();
    let Some(id) = found else {
        return 0;
    };
    if let Some(child) = read::<i32>(&ctx, cfg_u32(&c.fork_child_pid)) {
        if TASKS.insert(child as u32, id, 0).is_err() {
            bump(counter::TASK_TABLE_FULL);
        }
    }
    0
}

/// The watched memory cgroup of `pid`, if any.
#[inline(always)]
fn task_cgroup(pid: u32) -> Option<u64> {
    // SAFETY: value copied out immediately.
    if let Some(id) = unsafe { TASKS.get(pid) } {
        return Some(*id);
    }
    // SAFETY: reading our own global.
    if unsafe { read_volatile(&cfg().current_cgroup_is_memcg) } != 0 {
        // SAFETY: plain helper call.
        let id = unsafe { bpf_get_current_cgroup_id() };
        if WATCHED.get_ptr(id).is_some() {
            // Remember it: tasks that entered without an attach event (clone3 into a cgroup).
            let _ = TASKS.insert(pid, id, 0);
            return Some(id);
        }
    }
    None
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(pid) = read::<i32>(&ctx, cfg_u32(&c.exec_pid)) else {
        return 0;
    };
    let pid = pid as u32;
    let Some(id) = task_cgroup(pid) else {
        return 0;
    };
    let Some(ev) = scratch() else {
        return 0;
    };
    ev.head = header(EventKind::Exec, pid, id);
    ev.head.name_len = read_data_loc(&ctx, cfg_u32(&c.exec_filename), &mut ev.name);
    send_named(ev, EventKind::Exec, false);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(pid) = read::<i32>(&ctx, cfg_u32(&c.exit_pid)) else {
        return 0;
    };
    let pid = pid as u32;
    let Some(id) = task_cgroup(pid) else {
        return 0;
    };
    let _ = TASKS.remove(pid);
    // Threads exit too; only a thread-group leader's exit is worth an event.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == pid {
        emit(EventKind::Exit, pid, id, 0, 0);
    }
    0
}

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    let c = cfg();
    let Some(pid) = read::<i32>(&ctx, cfg_u32(&c.oom_pid)) else {
        return 0;
    };
    let pid = pid as u32;
    // SAFETY: value copied out immediately.
    let id = unsafe { TASKS.get(pid) }.copied().unwrap_or(0);
    // Unknown victims are still sent (cgroup 0): the agent resolves them via /proc or drops them.
    emit(EventKind::OomVictim, pid, id, 0, 0);
    0
}

#[inline(always)]
fn on_memcg_stat(ctx: &TracePointContext, o: &MemcgTpOffsets) -> u32 {
    let (id_off, item_off, val_off) = (cfg_u32(&o.id), cfg_u32(&o.item), cfg_u32(&o.val));
    // Most stat updates of a page fault are items outside the usage sum (LRU moves, events):
    // an array lookup drops them before the hash lookup.
    let Some(item) = read::<i32>(ctx, item_off) else {
        return 0;
    };
    if item < 0 || item as u32 >= MAX_MEMCG_ITEMS {
        return 0;
    }
    let unit = match ITEM_UNITS.get(item as u32) {
        Some(u) if *u != 0 => *u as i64,
        _ => return 0,
    };
    let Some(id) = read::<u64>(ctx, id_off) else {
        return 0;
    };
    // The cost every charge of a watched item pays on the host: a hash miss for unwatched cgroups.
    let Some(state) = WATCHED.get_ptr_mut(id) else {
        return 0;
    };
    let val = if cfg_u32(&o.val_size) == 8 {
        read::<i64>(ctx, val_off)
    } else {
        read::<i32>(ctx, val_off).map(i64::from)
    };
    let Some(val) = val else {
        return 0;
    };
    bump(counter::MEMCG_EVENTS);
    let delta = val * unit;
    // SAFETY: `state` points into the map value; fields are 8-byte aligned i64.
    unsafe {
        // BPF_ATOMIC add: charges of one cgroup arrive on several CPUs at once.
        atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*state).usage, delta);
        let now = read_volatile(&raw const (*state).usage);
        if now > (*state).peak {
            // Not atomic with the add: two CPUs charging at once may leave the peak one delta
            // short until the next higher charge. The exact watermark comes at rmdir
            // (raw_cgroup_rmdir) and from cgroupfs reads; this figure only bridges.
            (*state).peak = now;
            let reported = (*state).reported;
            let step = SETTINGS
                .get(0)
                .map_or(DEFAULT_PEAK_STEP_BYTES, |s| s.peak_step_bytes)
                as i64;
            // Relative step: at most ~64 events per doubling, whatever the size.
            let step = if reported / 64 > step {
                reported / 64
            } else {
                step
            };
            if now >= reported + step {
                // Over half full (the agent is away or behind): the rest of the ring is kept
                // for the lifecycle events that make instance records. The final peak comes
                // with the rmdir, and `reported` stays put, so the next charge sends it again.
                if EVENTS.query(RB_AVAIL_DATA) > EVENTS.query(RB_RING_SIZE) / 2 {
                    bump(counter::PEAKS_HELD);
                } else {
                    (*state).reported = now;
                    emit(EventKind::MemPeak, 0, id, now as u64, now as u64);
                }
            }
        }
    }
    0
}

#[tracepoint]
pub fn memcg_mod_memcg_state(ctx: TracePointContext) -> u32 {
    on_memcg_stat(&ctx, &cfg().memcg_state)
}

#[tracepoint]
pub fn memcg_mod_memcg_lruvec_state(ctx: TracePointContext) -> u32 {
    on_memcg_stat(&ctx, &cfg().memcg_lruvec)
}

/// Inbound connections and HTTP/1.x requests per cgroup v2 id, counted by `net_ingress`. LRU:
/// the agent deletes an instance's entry once it has read it at rmdir; cgroups it never reads
/// (not instances, or never joined on a hybrid host) are the ones evicted. Sized by the loader
/// like `WATCHED`.
#[map]
static NET_COUNTS: LruHashMap<u64, NetCounts> = LruHashMap::with_max_entries(65536, 0);

/// `ETH_P_IP`, `ETH_P_IPV6` (`__sk_buff.protocol` holds them in network byte order).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `BPF_NOEXIST`: create only.
const NOEXIST: u64 = 1;

/// Counts, for the cgroup of the socket a segment is delivered to, connection requests and
/// HTTP/1.x request lines. Attached to each watched root's cgroup (v2) with BPF_F_ALLOW_MULTI,
/// so it runs for the sockets of every cgroup below it, after and beside other tools'
/// programs. Read-only: it always lets the packet through.
///
/// cgroup_skb ingress rather than sock_ops: one program sees both the SYN (at the listening
/// socket) and each request's first bytes (sock_ops sees no payload), and
/// bpf_skb_cgroup_id names the socket's own cgroup (sock_ops has no helper for it).
#[cgroup_skb(ingress)]
pub fn net_ingress(ctx: SkBuffContext) -> i32 {
    count_segment(&ctx);
    1
}

#[inline(always)]
fn count_segment(ctx: &SkBuffContext) -> Option<()> {
    // cgroup_skb programs see the packet from its network header. The IP and TCP headers
    // are read in one helper call where the IP header has no options (each call costs ~15 ns
    // here, half the program's time; a TCP segment is never shorter than the headers read).
    let (l4, off_flags): (usize, [u8; 2]) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let h: [u8; 40] = ctx.load(0).ok()?;
            // A fragment after the first holds no TCP header.
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 || h[9] != IPPROTO_TCP {
                return None;
            }
            let l4 = ((h[0] & 0x0f) as usize) * 4;
            if l4 == 20 {
                (l4, [h[32], h[33]])
            } else {
                (l4, ctx.load(l4 + 12).ok()?)
            }
        }
        // Extension headers before TCP are not followed: rare on a server's inbound path.
        ETH_P_IPV6 => {
            let h: [u8; 54] = ctx.load(0).ok()?;
            if h[6] != IPPROTO_TCP {
                return None;
            }
            (40, [h[52], h[53]])
        }
        _ => return None,
    };
    let flags = off_flags[1];
    if flags & TCP_SYN != 0 {
        if flags & TCP_ACK == 0 {
            add(
                ctx,
                NetCounts {
                    connections: 1,
                    requests: 0,
                },
            );
        }
        return None;
    }
    let payload = l4 + ((off_flags[0] >> 4) as usize) * 4;
    let head = request_head(ctx, payload)?;
    if starts_request_line(head) {
        add(
            ctx,
            NetCounts {
                connections: 0,
                requests: 1,
            },
        );
    }
    None
}

/// The first [`REQUEST_HEAD_LEN`] bytes of the payload at `payload` as a little-endian word,
/// zeros past its end; None for a segment of fewer than 4 bytes (no method and its space).
/// A client that writes "GET /" on its own (5 bytes) is still seen.
#[inline(always)]
fn request_head(ctx: &SkBuffContext, payload: usize) -> Option<u64> {
    let len = ctx.len() as usize;
    if len >= payload + REQUEST_HEAD_LEN {
        return ctx.load::<u64>(payload).ok().map(u64::from_le);
    }
    if len < payload + 4 {
        return None;
    }
    let mut head = u64::from(u32::from_le(ctx.load::<u32>(payload).ok()?));
    let mut i = 4;
    while i < REQUEST_HEAD_LEN - 1 {
        if len > payload + i {
            head |= u64::from(ctx.load::<u8>(payload + i).ok()?) << (8 * i);
        }
        i += 1;
    }
    Some(head)
}

#[inline(always)]
fn add(ctx: &SkBuffContext, one: NetCounts) {
    // SAFETY: the context's own socket buffer.
    let id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if let Some(c) = NET_COUNTS.get_ptr_mut(id) {
        add_to(c, &one);
        return;
    }
    // First count of this cgroup; another CPU may have made the entry in between: add there.
    if NET_COUNTS.insert(id, one, NOEXIST).is_err() {
        if let Some(c) = NET_COUNTS.get_ptr_mut(id) {
            add_to(c, &one);
        }
    }
}

/// Adds `one` to the map value at `c`, the field it counts only (one locked add, not two).
#[inline(always)]
fn add_to(c: *mut NetCounts, one: &NetCounts) {
    // SAFETY: `c` points into the map value; 8-byte aligned u64 fields. Atomic: segments of
    // one cgroup arrive on several CPUs at once.
    unsafe {
        if one.connections != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*c).connections,
                one.connections,
            );
        }
        if one.requests != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*c).requests,
                one.requests,
            );
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// What the kernel sees: dual MIT/GPL counts as GPL-compatible (emars-ebpf is MIT OR GPL-2.0).
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
