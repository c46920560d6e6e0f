//! Pinned sets of another identity found at start-up (another version, ring size, task table,
//! `probes.disable` or `probes.charge_events`): each is replaced, and what its ring recorded
//! while no agent ran is carried over, not dropped. Its programs are detached and its ring kept
//! pinned (retired) until the agent has applied and saved those records; the agent then
//! releases it. Records in another format than this build's are dropped, and said.
//!
//! Each set records the settings it was loaded with in the name of one more pin of its ring
//! (`settings:events=1,ring_buffer_bytes=…`; bpffs holds no plain files), so a replacement
//! says what changed.

use std::collections::BTreeMap;

use aya::maps::MapData;
use emars_common::{names, EVENT_FORMAT};

use super::{
    pins::{PinDir, PinError},
    ProbesConfig,
};
use crate::kernel::ring::EventRing;

/// Start of the name of the pin that records a set's settings.
pub const SETTINGS_PIN: &str = "settings:";

/// Longest name bpffs takes is 255 bytes; the settings are cut short well before.
const SETTINGS_PIN_MAX: usize = 240;

/// The ring of a replaced set, its programs detached: what it recorded until then, to be
/// applied before anything the new set records, and released ([`super::Probes::release_carried`])
/// once saved.
pub struct CarriedRing {
    /// The replaced set's name.
    pub set: String,
    pub ring: EventRing,
}

/// The name of the pin recording what a set was loaded with: the settings that make its
/// identity, as an operator writes them, and the format of its records.
pub fn settings_pin(cfg: &ProbesConfig) -> String {
    let charge = format!("{:?}", cfg.charge_events).to_lowercase();
    let text = format!(
        "{SETTINGS_PIN}events={EVENT_FORMAT},ring_buffer_bytes={},max_watched_cgroups={},\
         max_tasks={},charge_events={charge},disable={}",
        cfg.ring_buffer_bytes,
        cfg.max_watched_cgroups,
        cfg.max_tasks,
        cfg.disable.join("+")
    );
    // bpffs refuses dots in names; a slash would be a directory.
    let mut text: String = text
        .chars()
        .map(|c| {
            if matches!(c, '.' | '/' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    if text.len() > SETTINGS_PIN_MAX {
        let mut end = SETTINGS_PIN_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The `key=value` pairs of a settings pin's name.
fn parse(pin: &str) -> BTreeMap<&str, &str> {
    pin.strip_prefix(SETTINGS_PIN)
        .unwrap_or(pin)
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// The crate version in a set's name (`v0_1_0-…`), as it is written (`0.1.0`).
fn version_of(set: &str) -> Option<String> {
    let v = set.strip_prefix('v')?.split_once('-')?.0;
    Some(v.replace('_', "."))
}

/// What differs between a set's settings and this agent's, in the operator's words.
pub fn difference(set: &str, old: Option<&str>, new: &str) -> String {
    let mut said = Vec::new();
    let ours = env!("CARGO_PKG_VERSION");
    match version_of(set) {
        Some(v) if v != ours => said.push(format!("version {v} → {ours}")),
        Some(_) => {}
        None => said.push(format!("not named by this agent; now version {ours}")),
    }
    let Some(old) = old else {
        said.push("its settings were not recorded (an earlier build)".into());
        return said.join("; ");
    };
    let (old, new) = (parse(old), parse(new));
    for (key, now) in &new {
        let was = old.get(key).copied().unwrap_or("(none)");
        if was != *now {
            let key = match *key {
                "events" => "event format".to_owned(),
                k => format!("probes.{k}"),
            };
            let show = |v: &str| {
                if v.is_empty() {
                    "[]".to_owned()
                } else {
                    v.to_owned()
                }
            };
            said.push(format!("{key} {} → {}", show(was), show(now)));
        }
    }
    if said.is_empty() {
        said.push(
            "the same settings and version: another build, or the kernel's tracepoints or cgroup \
             hierarchy changed"
                .into(),
        );
    }
    said.join("; ")
}

/// A set of another identity as found: its recorded settings and its ring, when one opens.
struct Found {
    name: String,
    settings: Option<String>,
    ring: Result<EventRing, String>,
}

impl Found {
    fn open(pins: &PinDir, name: &str) -> Found {
        let files = pins.files_of(name);
        let settings = files.iter().find(|f| f.starts_with(SETTINGS_PIN)).cloned();
        let ring_pin = super::loader::map_pin(names::EVENTS);
        let ring = if files.contains(&ring_pin) {
            MapData::from_pin(pins.dir_of(name).join(&ring_pin))
                .map_err(|e| e.to_string())
                .and_then(|m| EventRing::new(m).map_err(|e| e.to_string()))
        } else {
            Err("it holds no ring".into())
        };
        Found {
            name: name.to_owned(),
            settings,
            ring,
        }
    }
}

/// Whether this agent can read a set's records: recorded in the same event format.
fn readable(settings: Option<&str>) -> Result<(), String> {
    let format = settings
        .map(parse)
        .and_then(|s| s.get("events").and_then(|v| v.parse::<u32>().ok()));
    match format {
        Some(EVENT_FORMAT) => Ok(()),
        Some(f) => Err(format!(
            "its records are in event format {f}, this agent reads {EVENT_FORMAT}"
        )),
        None => Err("its event format is not recorded (an earlier build)".into()),
    }
}

/// The sets of other identities, opened now, while their programs still run: replaced by
/// [`replace`] at the last moment before the new programs are attached.
pub struct Others(Vec<Found>);

impl Others {
    pub fn open(pins: &PinDir) -> Others {
        Others(pins.others.iter().map(|n| Found::open(pins, n)).collect())
    }

    /// Replaces every set: those whose records this agent reads are retired (programs
    /// detached, ring kept pinned) and their rings handed back; the others are removed, and
    /// what their rings held is said to be dropped. Returns the rings and the sets' names.
    pub fn replace(
        self,
        pins: &PinDir,
        cfg: &ProbesConfig,
    ) -> Result<(Vec<CarriedRing>, Vec<String>), PinError> {
        let ours = settings_pin(cfg);
        let ring_pin = super::loader::map_pin(names::EVENTS);
        let counts_pin = super::loader::map_pin(names::NET_COUNTS);
        let mut carried = Vec::new();
        let mut names = Vec::new();
        for found in self.0 {
            let what = difference(&found.name, found.settings.as_deref(), &ours);
            let base = pins.base().display();
            let name = found.name;
            names.push(name.clone());
            let format_ok = readable(found.settings.as_deref());
            match (found.ring, format_ok) {
                (Ok(ring), Ok(())) => {
                    // Its request counts are kept too, carried into the new set's map
                    // (`net::carry_counts`): instances live across the replacement go on
                    // from their totals.
                    pins.retire(&name, |f| {
                        f == ring_pin || f == counts_pin || f.starts_with(SETTINGS_PIN)
                    })?;
                    // Detached: nothing more comes in.
                    let n = ring.pending();
                    tracing::warn!(
                        "replaced the pinned kernel side {name} under {base} ({what}): its {n} \
                         pending events are carried over (applied and saved before the new \
                         kernel side's)"
                    );
                    carried.push(CarriedRing { set: name, ring });
                }
                (ring, readable) => {
                    pins.remove(&name)?;
                    let lost = match (&ring, readable) {
                        (Ok(r), Err(why)) => match r.pending() {
                            0 => "it held no pending events".to_owned(),
                            n => format!("its {n} pending events are dropped: {why}"),
                        },
                        (Err(why), _) => format!("its pending events (if any) are dropped: {why}"),
                        (Ok(_), Ok(())) => String::new(),
                    };
                    tracing::warn!(
                        "replaced the pinned kernel side {name} under {base} ({what}): {lost}"
                    );
                }
            }
        }
        Ok((carried, names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_pin_is_a_bpffs_name_and_says_what_changed() {
        let mut cfg = ProbesConfig {
            disable: vec!["cgroup.mkdir".into(), "a/b".into()],
            ..ProbesConfig::default()
        };
        let pin = settings_pin(&cfg);
        assert!(pin.starts_with(SETTINGS_PIN));
        assert!(!pin.contains('.') && !pin.contains('/'), "{pin}");
        assert!(pin.len() <= SETTINGS_PIN_MAX);
        let old = settings_pin(&ProbesConfig::default());
        cfg.ring_buffer_bytes *= 2;
        let said = difference("v0_0_1-00ff", Some(&old), &settings_pin(&cfg));
        assert!(said.contains("version 0.0.1 → "), "{said}");
        assert!(
            said.contains(&format!(
                "probes.ring_buffer_bytes {} → {}",
                cfg.ring_buffer_bytes / 2,
                cfg.ring_buffer_bytes
            )),
            "{said}"
        );
        assert!(
            said.contains("probes.disable [] → cgroup_mkdir+a_b"),
            "{said}"
        );
        assert!(difference("v0_0_1-00ff", None, &old).contains("not recorded"));
        let long = ProbesConfig {
            disable: vec!["x".repeat(400)],
            ..ProbesConfig::default()
        };
        assert_eq!(settings_pin(&long).len(), SETTINGS_PIN_MAX);
    }
}
