//! Pinning a fresh load: the identity of a set (what decides what is loaded), the pinned set
//! of this identity opened at start-up, and a fresh load's maps, programs and links pinned
//! into it.

use std::path::Path;

use aya::{programs::links::FdLink, Ebpf};
use emars_common::{names, ProbeConfig};

use super::{
    loader::{link_pin, map_pin, prog_pin, ProbeError, ProbeReport, EBPF_OBJECT, PINNED_MAPS},
    memcg_items::UsageItem,
    pins::{self, PinDir},
    replaced::{self, Others},
    ProbesConfig,
};

/// Names a pinned set: what the programs were built from and loaded with. Another version, other
/// settings or another kernel's offsets make another name, and the old set is replaced.
pub(super) fn identity(config: &ProbeConfig, cfg: &ProbesConfig, items: &[UsageItem]) -> String {
    // Everything that decides what is loaded and attached, and the maps' sizes: a set adopted
    // under other settings would run other programs than this configuration asks for. Nothing
    // else: what may change at a restart (policy.mode, probes.peak_step_bytes) is written
    // into the SETTINGS map instead (RunSettings), so such a restart adopts the set.
    let settings = format!(
        "{config:?}|{}|{}|{}|{:?}|{:?}|{:?}",
        cfg.ring_buffer_bytes,
        cfg.max_watched_cgroups,
        cfg.max_tasks,
        cfg.disable,
        cfg.charge_events,
        items
    );
    let h = pins::fnv1a(&[EBPF_OBJECT, settings.as_bytes()]);
    // bpffs refuses dots in names.
    format!("v{}-{h:016x}", env!("CARGO_PKG_VERSION").replace('.', "_"))
}

/// The pinned set of `identity` (when `cfg.pin`), and the sets of other identities found
/// beside it (replaced at the last moment, their rings carried over). A set another agent
/// holds is an error: two agents must never read one ring.
pub(super) fn open_pins(
    cfg: &ProbesConfig,
    identity: &str,
    report: &mut ProbeReport,
) -> Result<(Option<PinDir>, Option<Others>), ProbeError> {
    if !cfg.pin {
        return Ok((None, None));
    }
    let mut expected: Vec<String> = PINNED_MAPS.iter().map(|m| map_pin(m)).collect();
    expected.push(pins::COMPLETE.into());
    match PinDir::open(&cfg.pin_path, identity, &expected) {
        Ok(p) => {
            let others = Others::open(&p);
            Ok((Some(p), Some(others)))
        }
        Err(e @ pins::PinError::Busy(_)) => Err(e.into()),
        Err(e) => {
            report.fallbacks.push(format!(
                "kernel side not pinned ({e}): it detaches when the agent stops, and \
                 instances that start or end meanwhile are not recorded"
            ));
            Ok((None, None))
        }
    }
}

/// Pins a fresh load (see [`pin_all`]) and says where, or why not; the links held for the
/// agent's life come back.
pub(super) fn pin_fresh(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    links: Vec<(&'static str, FdLink)>,
    cfg: &ProbesConfig,
    report: &mut ProbeReport,
) -> Vec<FdLink> {
    let (held, pinned) = pin_all(ebpf, pins, links, &replaced::settings_pin(cfg), report);
    match pinned {
        Ok(dir) => {
            tracing::info!("kernel side pinned at {dir}: it keeps recording while no agent runs");
            report.pinned = Some(dir);
        }
        Err(e) => report.fallbacks.push(format!(
            "kernel side not pinned ({e}): it detaches when the agent stops"
        )),
    }
    held
}

/// Pins the maps, programs and links of a fresh load into a staging directory and publishes
/// it. A link whose pin fails is lost with its program (the kernel drops the link), so the
/// program is then reported as not attached.
pub(super) fn pin_all(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    links: Vec<(&'static str, FdLink)>,
    settings_pin: &str,
    report: &mut ProbeReport,
) -> (Vec<FdLink>, Result<String, String>) {
    let mut held = Vec::new();
    let staging = match pins.staging() {
        Ok(d) => d,
        Err(e) => {
            held.extend(links.into_iter().map(|(_, l)| l));
            return (held, Err(e.to_string()));
        }
    };
    let mut failed = None;
    for name in PINNED_MAPS {
        let r = match ebpf.map(name) {
            Some(m) => m
                .pin(staging.join(map_pin(name)))
                .map_err(|e| e.to_string()),
            None => Err("missing".into()),
        };
        if let Err(e) = r {
            failed.get_or_insert(format!("map {name}: {e}"));
        }
    }
    for (name, link) in links {
        if let Some(prog) = ebpf.program_mut(name) {
            if let Err(e) = prog.pin(staging.join(prog_pin(name))) {
                failed.get_or_insert(format!("program {name}: {e}"));
            }
        }
        match link.pin(staging.join(link_pin(name))) {
            Ok(p) => held.push(FdLink::from(p)),
            Err(e) => {
                failed.get_or_insert(format!("link of {name}: {e}"));
                if let Some(st) = report.programs.iter_mut().find(|p| p.name == name) {
                    st.attached = false;
                    st.error = Some(format!("pinning its link: {e}"));
                }
            }
        }
    }
    if let Some(e) = failed {
        pins.discard();
        return (held, Err(e));
    }
    // What it was loaded with, for the agent that replaces it to say what changed (and to
    // know its records' format): the ring pinned under a name that says it.
    if let Some(m) = ebpf.map(names::EVENTS) {
        if let Err(e) = m.pin(staging.join(settings_pin)) {
            tracing::warn!("recording the pinned set's settings ({settings_pin}): {e}");
        }
    }
    // The ring buffer, pinned once more, is the marker.
    let marker = |path: &Path| match ebpf.map(names::EVENTS) {
        Some(m) => m.pin(path).map_err(|e| e.to_string()),
        None => Err("missing".into()),
    };
    match pins.publish(marker) {
        Ok(()) => (held, Ok(pins.shown().display().to_string())),
        Err(e) => {
            pins.discard();
            (held, Err(format!("marking the set complete: {e}")))
        }
    }
}
