//! The socket program (`net_ingress`, cgroup_skb ingress): attached to each watched root's
//! cgroup v2 directory with BPF_F_ALLOW_MULTI (other tools' programs there stay and run), at
//! every start, fresh load or adopted set alike: the roots may have changed since the set was
//! loaded. In a pinned set its program and one link per root are pinned beside the rest, so it
//! keeps counting while no agent runs; links of roots no longer watched are unpinned (detached).

use std::path::Path;

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType,
    },
    util::KernelVersion,
    Ebpf,
};
use emars_common::names;

use super::{
    loader::{prog_pin, ProbeReport},
    pins, ProbesConfig, ProgramStatus,
};
use crate::kernel::netcount::NetRoot;

/// Prefix of a root's link pin; the rest is a hash of the root (bpffs refuses dots).
const LINK_PREFIX: &str = "link_net_ingress_";

fn link_pin(root: &str) -> String {
    format!("{LINK_PREFIX}{:016x}", pins::fnv1a(&[root.as_bytes()]))
}

/// Why the program is not to be attached at all, by configuration or for want of a v2
/// hierarchy; None: attach it where it can be.
pub(super) fn off_by(cfg: &ProbesConfig, roots: &Result<Vec<NetRoot>, String>) -> Option<String> {
    if cfg.disable.iter().any(|d| d == names::NET_INGRESS) {
        return Some("disabled by config (probes.disable)".into());
    }
    roots.as_ref().err().cloned()
}

/// Loads the program of a fresh load (the verifier's pass).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut CgroupSkb = ebpf
        .program_mut(names::NET_INGRESS)
        .ok_or_else(|| format!("program {} not in the eBPF object", names::NET_INGRESS))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load().map_err(|e| format!("load: {}", chain(&e)))
}

/// The program of a fresh load, pinned into the set at `dir` when there is one.
pub(super) fn fresh<'a>(ebpf: &'a mut Ebpf, dir: Option<&Path>) -> Option<&'a mut CgroupSkb> {
    let prog: &mut CgroupSkb = ebpf.program_mut(names::NET_INGRESS)?.try_into().ok()?;
    if let Some(dir) = dir {
        if let Err(e) = prog.pin(dir.join(prog_pin(names::NET_INGRESS))) {
            tracing::warn!("pinning {}: {e}", names::NET_INGRESS);
        }
    }
    Some(prog)
}

/// The program of an adopted set, when the set holds it.
pub(super) fn adopted(dir: &Path) -> Result<CgroupSkb, String> {
    let path = dir.join(prog_pin(names::NET_INGRESS));
    if !path.exists() {
        return Err("not loaded when the pinned kernel side was loaded".into());
    }
    CgroupSkb::from_pin(&path, CgroupSkbAttachType::Ingress).map_err(|e| format!("{e}"))
}

/// Attaches `prog` to every root that has a v2 directory and is not attached yet (a link of an
/// adopted set stays), pins the new links into `pinned` (the set's directory) and unpins
/// those of roots no longer watched; its status goes into the report. The links not pinned
/// come back, to be held for the agent's life.
pub(super) fn attach(
    prog: Result<&mut CgroupSkb, String>,
    pinned: Option<&Path>,
    roots: &[NetRoot],
    report: &mut ProbeReport,
) -> Vec<FdLink> {
    let mut held = Vec::new();
    let mut attached = Vec::new();
    let mut failed = Vec::new();
    let prog = match prog {
        Ok(p) => p,
        Err(e) => {
            push_status(report, Vec::new(), vec![e]);
            return held;
        }
    };
    let mut keep = Vec::new();
    for r in roots {
        let dir = match &r.dir {
            Ok(d) => d,
            Err(why) => {
                failed.push(format!("{}: {why}", r.root));
                continue;
            }
        };
        let pin = link_pin(&r.root);
        keep.push(pin.clone());
        if let Some(set) = pinned {
            if set.join(&pin).exists() {
                attached.push(dir.display().to_string());
                continue;
            }
        }
        match attach_one(prog, dir) {
            Ok(link) => {
                attached.push(dir.display().to_string());
                match pinned {
                    Some(set) => match link.pin(set.join(&pin)) {
                        Ok(p) => held.push(FdLink::from(p)),
                        Err(e) => {
                            // Held unpinned: it counts while this agent runs.
                            tracing::warn!("pinning the link on {}: {e}", dir.display());
                        }
                    },
                    None => held.push(link),
                }
            }
            Err(e) => failed.push(format!("{}: {e}", dir.display())),
        }
    }
    if let Some(set) = pinned {
        unpin_stale(set, &keep);
    }
    push_status(report, attached, failed);
    held
}

fn attach_one(prog: &mut CgroupSkb, dir: &Path) -> Result<FdLink, String> {
    let cgroup = std::fs::File::open(dir).map_err(|e| format!("opening: {e}"))?;
    // aya attaches through a bpf_link from 5.7 on: the kernel runs a link's program beside
    // the cgroup's others (BPF_F_ALLOW_MULTI semantics) and refuses any flag with EINVAL.
    // Before that, through BPF_PROG_ATTACH, where the flag must be given.
    let link_based = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0));
    let mode = if link_based {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    };
    let id = prog
        .attach(&cgroup, CgroupSkbAttachType::Ingress, mode)
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let link = prog.take_link(id).map_err(|e| format!("link: {e}"))?;
    // A bpf_link (kernels >= 5.7): pinnable.
    FdLink::try_from(link).map_err(|e| format!("link: {e}"))
}

/// An error and its causes ("bpf_link_create failed: Operation not permitted").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Unpins (detaches) the links of roots this agent no longer watches.
fn unpin_stale(set: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(set) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(LINK_PREFIX) && !keep.contains(&name) {
            match PinnedLink::from_pin(e.path()).map(PinnedLink::unpin) {
                Ok(Ok(_)) => {
                    tracing::info!("detached the socket program of a root no longer watched")
                }
                Ok(Err(e)) => tracing::warn!("unpinning {name}: {e}"),
                Err(e) => tracing::warn!("opening {name}: {e}"),
            }
        }
    }
}

fn push_status(report: &mut ProbeReport, attached: Vec<String>, failed: Vec<String>) {
    let on = !attached.is_empty();
    report.programs.push(ProgramStatus {
        name: names::NET_INGRESS.into(),
        tracepoint: if on {
            format!("cgroup_skb:ingress {}", attached.join(" "))
        } else {
            "cgroup_skb:ingress".into()
        },
        attached: on,
        error: (!failed.is_empty()).then(|| failed.join("; ")),
        run_count: None,
        run_time_ns: None,
    });
    report.features.insert("kernel_request_counting".into(), on);
    if on && failed.is_empty() {
        report.notes.push(format!(
            "requests counted in the kernel: inbound TCP connections and HTTP/1.x request \
             lines per instance (cgroup_skb ingress on {})",
            attached.join(", ")
        ));
    } else if on {
        report.fallbacks.push(format!(
            "requests counted in the kernel below {} only; elsewhere requests per hour come \
             from platform reports, else execs ({})",
            attached.join(", "),
            failed.join("; ")
        ));
    } else {
        report.fallbacks.push(format!(
            "kernel request counting is off ({}): requests per hour come from platform \
             reports, else execs",
            failed.join("; ")
        ));
    }
}
