//! Loads the eBPF programs, fills their configuration from the running kernel, attaches every
//! program it can and reports what it attached and what it fell back to.

use std::{collections::BTreeMap, path::Path};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{links::FdLink, ProgramInfo, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use emars_common::{
    counter, names, MemState, NetCounts, ProbeConfig, RunSettings, WatchRoot, MAX_ROOTS,
    ROOT_PREFIX_LEN,
};

use super::{
    kernel_facts::{kernel_btf, peak_file_feature, tracepoint_offsets},
    memcg_items::UsageItem,
    net,
    pinning::{identity, open_pins, pin_fresh},
    pins::{self, PinDir},
    replaced::{CarriedRing, Others},
    tracefs::{Tracefs, TracefsError},
    ChargeEvents, KernelCounters, ProbesConfig, ProgramStatus,
};
use crate::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};
use crate::kernel::netcount::NetRoot;
use crate::kernel::ring::EventRing;

/// The eBPF object built by build.rs (aya-build).
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/emars"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("watched root {root:?} is longer than {max} bytes")]
    RootTooLong { root: String, max: usize },
    #[error("more than {MAX_ROOTS} watched roots")]
    TooManyRoots,
    #[error("pinned kernel side: {0}")]
    Pin(#[from] pins::PinError),
    #[error("adopting the pinned kernel side at {dir}: {message}")]
    Adopt { dir: String, message: String },
}

/// One program of emars-ebpf and the tracepoint it belongs on.
pub(super) struct Spec {
    pub(super) program: &'static str,
    pub(super) category: &'static str,
    pub(super) tracepoint: &'static str,
    /// Charge-event programs: optional, with a fallback when absent.
    pub(super) memcg: bool,
}

/// In the order they are attached; names as in `emars_common::names::PROGRAMS`.
pub(super) const SPECS: &[Spec] = &[
    spec("cgroup_mkdir", "cgroup", "cgroup_mkdir", false),
    spec("raw_cgroup_rmdir", "raw", "cgroup_rmdir", false),
    spec("cgroup_rmdir", "cgroup", "cgroup_rmdir", false),
    spec("cgroup_attach_task", "cgroup", "cgroup_attach_task", false),
    spec("sched_process_fork", "sched", "sched_process_fork", false),
    spec("sched_process_exec", "sched", "sched_process_exec", false),
    spec("sched_process_exit", "sched", "sched_process_exit", false),
    spec("oom_mark_victim", "oom", "mark_victim", false),
    spec("memcg_mod_memcg_state", "memcg", "mod_memcg_state", true),
    spec(
        "memcg_mod_memcg_lruvec_state",
        "memcg",
        "mod_memcg_lruvec_state",
        true,
    ),
];

const fn spec(
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    memcg: bool,
) -> Spec {
    Spec {
        program,
        category,
        tracepoint,
        memcg,
    }
}

/// What start-up found and did; shown by GET /v1/info.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub features: BTreeMap<String, bool>,
    pub programs: Vec<ProgramStatus>,
    /// What the agent does instead of something asked for or needed that is missing (WARN).
    pub fallbacks: Vec<String>,
    /// How it measures where that is the configured default, not a loss (INFO).
    pub notes: Vec<String>,
    pub usage_items: Vec<UsageItem>,
    /// Where the kernel side is pinned (None: not pinned, it detaches with the agent).
    pub pinned: Option<String>,
    /// True when this agent adopted a set a previous agent left running.
    pub adopted: bool,
    /// Pinned sets of other versions or settings that start-up replaced (their pending events
    /// carried over where their format is this build's).
    pub unpinned: Vec<String>,
}

impl ProbeReport {
    pub fn attached(&self, program: &str) -> bool {
        self.programs
            .iter()
            .any(|p| p.name == program && p.attached)
    }

    /// True when charge events keep peaks current (both memcg programs attached).
    pub fn charge_events(&self) -> bool {
        self.attached("memcg_mod_memcg_state") && self.attached("memcg_mod_memcg_lruvec_state")
    }
}

/// The loaded programs and the maps the agent talks to.
pub struct Probes {
    /// None when the programs were adopted from bpffs (their links keep them attached).
    ebpf: Option<Ebpf>,
    /// The pinned set and its lock, held for the agent's life.
    pins: Option<PinDir>,
    /// Rings of replaced sets, to be applied before this set's events ([`Probes::take_carried`]).
    carried: Vec<CarriedRing>,
    /// Links taken out of `ebpf` to be pinned: held for the agent's life (an unpinned one
    /// detaches its program when dropped).
    _links: Vec<FdLink>,
    pub report: ProbeReport,
    events: Option<MapData>,
    watched: HashMap<MapData, u64, MemState>,
    tasks: HashMap<MapData, u32, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// The socket program's counts (None: no such map in an adopted set).
    net_counts: Option<HashMap<MapData, u64, NetCounts>>,
}

/// The maps a pinned set holds besides the programs: those the agent reads or writes.
pub(super) const PINNED_MAPS: [&str; 8] = [
    names::EVENTS,
    names::SETTINGS,
    names::WATCHED,
    names::TASKS,
    names::COUNTERS,
    names::WATCH_ROOTS,
    names::ITEM_UNITS,
    names::NET_COUNTS,
];

pub(super) fn map_pin(name: &str) -> String {
    format!("map_{name}")
}
pub(super) fn prog_pin(name: &str) -> String {
    format!("prog_{name}")
}
pub(super) fn link_pin(name: &str) -> String {
    format!("link_{name}")
}

pub(super) fn map_err(name: &'static str, e: impl std::fmt::Display) -> ProbeError {
    ProbeError::Map {
        name,
        message: e.to_string(),
    }
}

impl Probes {
    /// Loads and attaches (or adopts a pinned set). `roots` are watched roots relative to the
    /// hierarchy ("/emars"); `net_roots`: their cgroup v2 directories, where the socket
    /// program goes (or why there are none); `wake_on_mkdir`: new cgroups wake the agent
    /// (their limits are due).
    ///
    /// The steps: read the running kernel (tracepoint formats, BTF, the peak file), open the
    /// pinned set of this identity (adopted when complete), else load the object, fill its
    /// maps, replace other sets, attach, pin, and take the maps the agent talks to.
    pub fn load(
        hierarchy: &MemoryHierarchy,
        cfg: &ProbesConfig,
        roots: &[String],
        net_roots: &Result<Vec<NetRoot>, String>,
        wake_on_mkdir: bool,
    ) -> Result<Probes, ProbeError> {
        let tracefs = Tracefs::find_or_mount()?;
        let mut report = ProbeReport::default();
        let mut config = ProbeConfig {
            mem_hierarchy: hierarchy.hierarchy_id,
            current_cgroup_is_memcg: u32::from(hierarchy.version == CgroupVersion::V2),
            ..Default::default()
        };
        // Not part of the identity: a set pinned under other run-time settings is adopted.
        let settings = RunSettings {
            wake_on_mkdir: u32::from(wake_on_mkdir),
            _pad: 0,
            peak_step_bytes: cfg.peak_step_bytes,
        };
        let mut unusable = tracepoint_offsets(&tracefs, &mut config, &mut report);
        kernel_btf(hierarchy.version, &mut config, &mut report, &mut unusable);
        let peak_file = peak_file_feature(hierarchy, &mut report);

        let identity = identity(&config, cfg, &report.usage_items);
        let (mut pins, others) = open_pins(cfg, &identity, &mut report)?;
        let plan = Plan {
            cfg,
            unusable: &unusable,
            peak_file,
        };
        if let Some(p) = pins.take_if(|p| p.complete) {
            let carried = replace_others(others, &p, cfg, &mut report)?;
            return adopt(
                p,
                report,
                &plan,
                (hierarchy.hierarchy_id, roots, net_roots),
                &settings,
            )
            .map(|probes| probes.carrying(carried));
        }

        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &config, true)
            .map_max_entries(names::EVENTS, cfg.ring_buffer_bytes)
            .map_max_entries(names::WATCHED, cfg.max_watched_cgroups)
            .map_max_entries(names::NET_COUNTS, cfg.max_watched_cgroups)
            .map_max_entries(names::TASKS, cfg.max_tasks)
            .load(EBPF_OBJECT)?;
        fill_maps(
            &mut ebpf,
            (hierarchy.hierarchy_id, roots),
            settings,
            &report.usage_items,
        )?;

        // The old set's programs detach just before the new ones attach (verified already):
        // a cgroup made in between is found by the scan of existing cgroups.
        let carried = match &pins {
            Some(p) => {
                preload(&mut ebpf, &plan);
                replace_others(others, p, cfg, &mut report)?
            }
            None => Vec::new(),
        };
        let links = attach_all(&mut ebpf, &plan, pins.is_some(), &mut report);
        plan.fallbacks(&mut report);
        let mut held = match &pins {
            Some(p) => pin_fresh(&mut ebpf, p, links, cfg, &mut report),
            None => Vec::new(),
        };
        if let Some(p) = &pins {
            let sets: Vec<String> = carried.iter().map(|c| c.set.clone()).collect();
            net::carry_counts(&mut ebpf, p, &sets);
        }
        held.extend(attach_net(&mut ebpf, &pins, cfg, net_roots, &mut report));
        Probes::taking_maps(ebpf, pins, carried, held, report)
    }

    /// The loaded set's maps the agent talks to, taken out of `ebpf`.
    fn taking_maps(
        mut ebpf: Ebpf,
        pins: Option<PinDir>,
        carried: Vec<CarriedRing>,
        held: Vec<FdLink>,
        report: ProbeReport,
    ) -> Result<Probes, ProbeError> {
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| map_err(name, "missing"))
        };
        let events = take(&mut ebpf, names::EVENTS)?;
        let watched = HashMap::try_from(take(&mut ebpf, names::WATCHED)?)
            .map_err(|e| map_err(names::WATCHED, e))?;
        let tasks = HashMap::try_from(take(&mut ebpf, names::TASKS)?)
            .map_err(|e| map_err(names::TASKS, e))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, names::COUNTERS)?)
            .map_err(|e| map_err(names::COUNTERS, e))?;
        let net_counts = HashMap::try_from(take(&mut ebpf, names::NET_COUNTS)?)
            .map_err(|e| map_err(names::NET_COUNTS, e))?;
        let events = match events {
            Map::RingBuf(m) => m,
            _ => return Err(map_err(names::EVENTS, "not a ring buffer")),
        };
        Ok(Probes {
            ebpf: Some(ebpf),
            pins,
            carried,
            _links: held,
            report,
            events: Some(events),
            watched,
            tasks,
            counters,
            net_counts: Some(net_counts),
        })
    }

    /// The socket program's counts, for the reader of per-instance requests
    /// (`kernel::netcount::NetCounter`); None once taken, or when the set has none.
    pub fn take_net_counts(&mut self) -> Option<HashMap<MapData, u64, NetCounts>> {
        if !self.report.attached(names::NET_INGRESS) {
            return None;
        }
        self.net_counts.take()
    }

    /// True when this agent took over a kernel side that kept recording while none ran: the
    /// ring holds what happened meanwhile.
    pub fn adopted(&self) -> bool {
        self.report.adopted
    }

    /// Rings of the sets this start replaced, holding what those recorded until they were
    /// detached: to be applied, in this order, before the events of [`Probes::take_events`],
    /// then saved and released ([`Probes::release_carried`]).
    pub fn take_carried(&mut self) -> Vec<CarriedRing> {
        std::mem::take(&mut self.carried)
    }

    /// Unpins a replaced set once what its ring held is saved (until then a restart finds it
    /// and reads it again).
    pub fn release_carried(&self, set: &str) {
        let Some(p) = &self.pins else { return };
        // A leftover of this very identity was emptied by the new set's staging already.
        if p.shown().file_name() == Some(std::ffi::OsStr::new(set)) {
            return;
        }
        match p.remove(set) {
            Ok(()) => {
                tracing::info!("unpinned the replaced kernel side {set}: its events are saved")
            }
            Err(e) => tracing::warn!("unpinning the replaced kernel side {set}: {e}"),
        }
    }

    fn carrying(mut self, carried: Vec<CarriedRing>) -> Probes {
        self.carried = carried;
        self
    }

    /// The event ring buffer; taken once by the event loop.
    pub fn take_events(&mut self) -> Result<EventRing, ProbeError> {
        let map = self
            .events
            .take()
            .ok_or_else(|| map_err(names::EVENTS, "already taken"))?;
        EventRing::new(map).map_err(|e| map_err(names::EVENTS, e))
    }

    /// Starts tracking a cgroup that existed before the agent (mkdir already tracks new ones).
    /// Does not overwrite state the kernel side already keeps.
    pub fn watch(&mut self, id: u64, usage: u64, peak: u64) -> Result<(), ProbeError> {
        let state = MemState {
            usage: usage as i64,
            peak: peak.max(usage) as i64,
            reported: peak.max(usage) as i64,
        };
        // BPF_NOEXIST: a cgroup the kernel side already tracks keeps its exact state.
        match self.watched.insert(id, state, 1) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(names::WATCHED, e)),
        }
    }

    /// The kernel-side state of a watched cgroup.
    pub fn mem_state(&self, id: u64) -> Option<MemState> {
        self.watched.get(&id, 0).ok()
    }

    pub fn unwatch(&mut self, id: u64) {
        let _ = self.watched.remove(&id);
    }

    /// Records a task of a watched cgroup (seeding for tasks that existed before the agent).
    pub fn track_task(&mut self, tid: u32, id: u64) -> Result<(), ProbeError> {
        self.tasks
            .insert(tid, id, 0)
            .map_err(|e| map_err(names::TASKS, e))
    }

    /// Sum over CPUs of one `COUNTERS` slot.
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    pub fn events_lost(&self) -> u64 {
        self.counter(counter::LOST)
    }

    /// What the kernel side counted but could not do.
    pub fn kernel_counters(&self) -> KernelCounters {
        KernelCounters {
            events_lost: self.counter(counter::LOST),
            task_table_full: self.counter(counter::TASK_TABLE_FULL),
            watch_table_full: self.counter(counter::WATCH_TABLE_FULL),
            peaks_held: self.counter(counter::PEAKS_HELD),
            ..KernelCounters::default()
        }
    }

    /// Current program statuses with bpf_stats figures (non-zero only while stats are enabled).
    pub fn program_stats(&self) -> Vec<ProgramStatus> {
        let mut out = self.report.programs.clone();
        for p in &mut out {
            if !p.attached {
                continue;
            }
            let info = match (&self.ebpf, &self.report.pinned) {
                (Some(ebpf), _) => ebpf.program(&p.name).map(|prog| prog.info()),
                (None, Some(dir)) => Some(ProgramInfo::from_pin(
                    Path::new(dir).join(prog_pin(&p.name)),
                )),
                (None, None) => None,
            };
            if let Some(Ok(info)) = info {
                p.run_count = Some(info.run_count());
                p.run_time_ns = Some(info.run_time().as_nanos() as u64);
            }
        }
        out
    }
}

#[cfg(test)]
#[test]
fn specs_cover_every_program() {
    let mut names: Vec<&str> = SPECS.iter().map(|s| s.program).collect();
    let mut all = emars_common::names::PROGRAMS.to_vec();
    names.sort_unstable();
    all.sort_unstable();
    assert_eq!(names, all);
}

/// The run-time maps of a fresh load: watched roots, settings, stat item units.
fn fill_maps(
    ebpf: &mut Ebpf,
    (hierarchy_id, roots): (i32, &[String]),
    settings: RunSettings,
    usage_items: &[UsageItem],
) -> Result<(), ProbeError> {
    let map = ebpf
        .map_mut(names::WATCH_ROOTS)
        .ok_or_else(|| map_err(names::WATCH_ROOTS, "missing"))?;
    let mut arr: Array<&mut MapData, WatchRoot> =
        Array::try_from(map).map_err(|e| map_err(names::WATCH_ROOTS, e))?;
    fill_watch_roots(&mut arr, hierarchy_id, roots)?;

    let map = ebpf
        .map_mut(names::SETTINGS)
        .ok_or_else(|| map_err(names::SETTINGS, "missing"))?;
    let mut arr: Array<&mut MapData, RunSettings> =
        Array::try_from(map).map_err(|e| map_err(names::SETTINGS, e))?;
    arr.set(0, settings, 0)
        .map_err(|e| map_err(names::SETTINGS, e))?;

    let map = ebpf
        .map_mut(names::ITEM_UNITS)
        .ok_or_else(|| map_err(names::ITEM_UNITS, "missing"))?;
    let mut units: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|e| map_err(names::ITEM_UNITS, e))?;
    for it in usage_items {
        units
            .set(it.item, it.unit, 0)
            .map_err(|e| map_err(names::ITEM_UNITS, e))?;
    }
    Ok(())
}

/// Attaches every program the plan allows, in [`SPECS`] order; each one's status goes into
/// the report. The links to pin (`take`: a pinned set) come back by program.
fn attach_all(
    ebpf: &mut Ebpf,
    plan: &Plan<'_>,
    take: bool,
    report: &mut ProbeReport,
) -> Vec<(&'static str, FdLink)> {
    let mut links = Vec::new();
    for s in SPECS {
        let (mut status, chosen) = plan.status(s, report);
        if status.error.is_none() {
            match attach(ebpf, s, take) {
                Ok(link) => {
                    status.attached = true;
                    links.extend(link.map(|l| (s.program, l)));
                }
                Err(e) => status.error = Some(e),
            }
        }
        match &status.error {
            Some(e) if chosen => tracing::info!(program = s.program, "not attached: {e}"),
            Some(e) => tracing::warn!(program = s.program, "not attached: {e}"),
            None => {}
        }
        report.programs.push(status);
    }
    links
}

/// Loads (the verifier's pass) every program the attach loop is to attach, as far as that can
/// be told before attaching: a replaced set's programs are detached after this, so the moment
/// with no set attached is the attaching alone. A program that fails here fails again there,
/// and is reported then.
fn preload(ebpf: &mut Ebpf, plan: &Plan<'_>) {
    let mut expected = ProbeReport::default();
    for s in SPECS {
        let (mut status, _) = plan.status(s, &expected);
        status.attached = status.error.is_none() && load_program(ebpf, s).is_ok();
        expected.programs.push(status);
    }
}

/// Loads one program, unless it is loaded already.
fn load_program(ebpf: &mut Ebpf, s: &Spec) -> Result<(), String> {
    let prog = ebpf
        .program_mut(s.program)
        .ok_or_else(|| format!("program {} not in the eBPF object", s.program))?;
    if prog.fd().is_ok() {
        return Ok(());
    }
    let loaded = if s.category == "raw" {
        <&mut RawTracePoint>::try_from(prog).map(|p| p.load())
    } else {
        <&mut TracePoint>::try_from(prog).map(|p| p.load())
    };
    loaded
        .map_err(|e| format!("{e}"))?
        .map_err(|e| format!("load: {e}"))
}

/// Loads (unless [`preload`] did) and attaches one program; with `take`, hands its link over
/// (to be pinned) instead of leaving it to the `Ebpf` object, which detaches its links when
/// dropped.
fn attach(ebpf: &mut Ebpf, s: &Spec, take: bool) -> Result<Option<FdLink>, String> {
    load_program(ebpf, s)?;
    let missing = || format!("program {} not in the eBPF object", s.program);
    if s.category == "raw" {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(s.program)
            .ok_or_else(missing)?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        let id = prog
            .attach(s.tracepoint)
            .map_err(|e| format!("attach: {e}"))?;
        if !take {
            return Ok(None);
        }
        let link = prog.take_link(id).map_err(|e| format!("link: {e}"))?;
        return Ok(Some(FdLink::from(link)));
    }
    let prog: &mut TracePoint = ebpf
        .program_mut(s.program)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let id = prog
        .attach(s.category, s.tracepoint)
        .map_err(|e| format!("attach: {e}"))?;
    if !take {
        return Ok(None);
    }
    let link = prog.take_link(id).map_err(|e| format!("link: {e}"))?;
    // A perf-event link (kernels >= 5.15): pinnable.
    FdLink::try_from(link)
        .map(Some)
        .map_err(|e| format!("link: {e}"))
}

/// What decides a program's status besides attaching it: the settings and what the kernel
/// lacks. The same for a fresh load and an adopted set.
struct Plan<'a> {
    cfg: &'a ProbesConfig,
    unusable: &'a BTreeMap<&'static str, String>,
    peak_file: &'static str,
}

impl Plan<'_> {
    /// The status before attaching: an error when the program is not to be attached, and
    /// whether that was chosen (settings, or not needed) rather than forced by the kernel.
    fn status(&self, s: &Spec, report: &ProbeReport) -> (ProgramStatus, bool) {
        let mut status = ProgramStatus {
            name: s.program.into(),
            tracepoint: format!("{}:{}", s.category, s.tracepoint),
            attached: false,
            error: None,
            run_count: None,
            run_time_ns: None,
        };
        if s.program == "cgroup_rmdir" && report.attached("raw_cgroup_rmdir") {
            // One rmdir program is enough: the raw one when it attached.
            status.error = Some("not needed: raw_cgroup_rmdir is attached".into());
        } else if self.cfg.disable.iter().any(|d| d == s.program) {
            status.error = Some("disabled by config (probes.disable)".into());
        } else if s.memcg && self.cfg.charge_events == ChargeEvents::Off {
            status.error = Some("off by config (probes.charge_events = \"off\")".into());
        } else if s.memcg
            && self.cfg.charge_events == ChargeEvents::Auto
            && report.attached("raw_cgroup_rmdir")
        {
            status.error = Some(
                "not needed: raw_cgroup_rmdir hands over the kernel's exact watermark at rmdir \
                 (probes.charge_events = \"on\" streams live peaks, at ~120 ns per memory stat \
                 update on the whole host)"
                    .into(),
            );
        } else if let Some(why) = self.unusable.get(s.program) {
            status.error = Some(why.clone());
            return (status, false);
        }
        let chosen = status.error.is_some();
        (status, chosen)
    }

    /// What the agent does instead of the programs that are missing.
    fn fallbacks(&self, report: &mut ProbeReport) {
        let peak_file = self.peak_file;
        match (report.charge_events(), report.attached("raw_cgroup_rmdir")) {
            (true, _) => {}
            (false, true) => {
                let how = format!(
                    "no memcg charge events: live peaks come from the kernel watermark \
                     ({peak_file}) read on exec/exit events and every reconciliation (10 s); \
                     final peaks are exact (read in the kernel at rmdir)"
                );
                // Only a loss where the operator asked for live charge events.
                if self.cfg.charge_events == ChargeEvents::On {
                    report.fallbacks.push(how);
                } else {
                    report.notes.push(how);
                }
            }
            (false, false) => report.fallbacks.push(format!(
                "no memcg charge events and no raw cgroup_rmdir: peaks come from the kernel \
                 watermark ({peak_file}) read on exec/exit events; a cgroup removed within \
                 microseconds of its last exit may keep an earlier reading"
            )),
        }
        if !report.attached("cgroup_mkdir") {
            // The kernel side starts watching a cgroup at its mkdir: without it, the programs
            // filter out every cgroup created later (measured: none of them is recorded).
            report.fallbacks.push(
                "no cgroup_mkdir: only the cgroups found at start-up are tracked; cgroups \
                 created later are not"
                    .into(),
            );
        }
        if !report.attached("cgroup_attach_task") || !report.attached("sched_process_fork") {
            report.fallbacks.push(
                "task tracking incomplete: exec and OOM events are attributed via /proc/PID/cgroup"
                    .into(),
            );
        }
    }
}

/// Takes over a set a previous agent left pinned: its programs are attached and recording, its
/// ring holds what happened since. The watched roots are written again (they may have changed).
fn adopt(
    pins: PinDir,
    mut report: ProbeReport,
    plan: &Plan<'_>,
    (hierarchy, roots, net_roots): (i32, &[String], &Result<Vec<NetRoot>, String>),
    settings: &RunSettings,
) -> Result<Probes, ProbeError> {
    // Opened through the locked base directory's descriptor; said as configured.
    let dir = pins.dir();
    let shown = pins.shown();
    let adopt_err = |message: String| ProbeError::Adopt {
        dir: shown.display().to_string(),
        message,
    };
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(map_pin(name))).map_err(|e| adopt_err(format!("{name}: {e}")))
    };
    let typed = |name: &'static str| {
        open(name)
            .and_then(|m| Map::from_map_data(m).map_err(|e| adopt_err(format!("{name}: {e}"))))
    };
    let mut arr: Array<MapData, WatchRoot> =
        Array::try_from(typed(names::WATCH_ROOTS)?).map_err(|e| map_err(names::WATCH_ROOTS, e))?;
    fill_watch_roots(&mut arr, hierarchy, roots)?;
    // This agent's run-time settings (policy.mode, peak_step_bytes), whatever the last one's.
    let mut run: Array<MapData, RunSettings> =
        Array::try_from(typed(names::SETTINGS)?).map_err(|e| map_err(names::SETTINGS, e))?;
    run.set(0, *settings, 0)
        .map_err(|e| map_err(names::SETTINGS, e))?;
    for s in SPECS {
        let (mut status, _) = plan.status(s, &report);
        if dir.join(link_pin(s.program)).exists() {
            status.attached = true;
            status.error = None;
        } else if status.error.is_none() {
            status.error = Some("not attached when the pinned kernel side was loaded".into());
        }
        report.programs.push(status);
    }
    plan.fallbacks(&mut report);
    let mut net_prog = match net::off_by(plan.cfg, net_roots) {
        Some(why) => Err(why),
        None => net::adopted(&dir),
    };
    let net_links = net::attach(
        net_prog.as_mut().map_err(|e| e.clone()),
        Some(&dir),
        net_roots.as_deref().unwrap_or_default(),
        &mut report,
    );
    report.adopted = true;
    report.pinned = Some(shown.display().to_string());
    tracing::info!(
        "adopted the kernel side pinned at {}: it kept recording while no agent ran \
         (run-time settings now: wake on mkdir {}, peak step {} bytes)",
        shown.display(),
        settings.wake_on_mkdir != 0,
        settings.peak_step_bytes
    );
    let watched =
        HashMap::try_from(typed(names::WATCHED)?).map_err(|e| map_err(names::WATCHED, e))?;
    let tasks = HashMap::try_from(typed(names::TASKS)?).map_err(|e| map_err(names::TASKS, e))?;
    let counters =
        PerCpuArray::try_from(typed(names::COUNTERS)?).map_err(|e| map_err(names::COUNTERS, e))?;
    let net_counts =
        HashMap::try_from(typed(names::NET_COUNTS)?).map_err(|e| map_err(names::NET_COUNTS, e))?;
    Ok(Probes {
        ebpf: None,
        events: Some(open(names::EVENTS)?),
        pins: Some(pins),
        carried: Vec::new(),
        _links: net_links,
        report,
        watched,
        tasks,
        counters,
        net_counts: Some(net_counts),
    })
}

/// Loads the socket program of a fresh load and attaches it to the roots' v2 directories; in a
/// pinned set (once published) its program and links are pinned there. The links to hold for
/// the agent's life come back.
fn attach_net(
    ebpf: &mut Ebpf,
    pins: &Option<PinDir>,
    cfg: &ProbesConfig,
    net_roots: &Result<Vec<NetRoot>, String>,
    report: &mut ProbeReport,
) -> Vec<FdLink> {
    let dir = pins
        .as_ref()
        .filter(|_| report.pinned.is_some())
        .map(PinDir::dir);
    let prog = match net::off_by(cfg, net_roots) {
        Some(why) => Err(why),
        None => net::load(ebpf).and_then(|()| {
            net::fresh(ebpf, dir.as_deref())
                .ok_or_else(|| format!("program {} not in the eBPF object", names::NET_INGRESS))
        }),
    };
    let roots = net_roots.as_deref().unwrap_or_default();
    net::attach(prog, dir.as_deref(), roots, report)
}

/// Replaces the sets of other identities found at start-up (see [`replaced`]): their rings
/// come back to be applied first; their names go into the report.
fn replace_others(
    others: Option<Others>,
    pins: &PinDir,
    cfg: &ProbesConfig,
    report: &mut ProbeReport,
) -> Result<Vec<CarriedRing>, ProbeError> {
    let Some(others) = others else {
        return Ok(Vec::new());
    };
    let (carried, names) = others.replace(pins, cfg)?;
    report.unpinned = names;
    Ok(carried)
}

/// Writes every slot: the watched roots first, empty slots after (an adopted set may hold more
/// roots than this configuration has).
fn fill_watch_roots<T: std::borrow::BorrowMut<MapData>>(
    arr: &mut Array<T, WatchRoot>,
    hierarchy: i32,
    roots: &[String],
) -> Result<(), ProbeError> {
    if roots.len() > MAX_ROOTS as usize {
        return Err(ProbeError::TooManyRoots);
    }
    for i in 0..MAX_ROOTS as usize {
        let mut w = WatchRoot::EMPTY;
        if let Some(root) = roots.get(i) {
            let bytes = root.as_bytes();
            if bytes.len() >= ROOT_PREFIX_LEN {
                return Err(ProbeError::RootTooLong {
                    root: root.clone(),
                    max: ROOT_PREFIX_LEN - 1,
                });
            }
            w.hierarchy = hierarchy;
            w.len = bytes.len() as u32;
            w.prefix[..bytes.len()].copy_from_slice(bytes);
        }
        arr.set(i as u32, w, 0)
            .map_err(|e| map_err(names::WATCH_ROOTS, e))?;
    }
    Ok(())
}
