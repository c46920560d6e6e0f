//! Reactive mode: the decisions, kept apart from the signals that trigger them
//! (`kernel/notify.rs`) and the event loop that carries them out.
//!
//! - Burst guard: an instance whose usage reaches its early-warning point (memory.high on v2,
//!   the same value as a usage threshold on v1) gets its limits raised by a step, up to its
//!   function's ceiling and to what the host can spare above a reserve, before the OOM killer
//!   acts. The rescued instance's peak is then recorded exactly (an OOM-killed one's is cut at
//!   its limit), which is what teaches the function's next recommendation.
//! - Admission ("Refuse"): whether a new instance of a function fits in what the host has
//!   left, from the live recommendation and one read of the host's available memory.

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;
use crate::model::Limits;

pub const DEFAULT_TRIGGER_FRACTION: f64 = 0.9;
/// A quarter: a rescued instance holds at most a quarter more than it needed, which the
/// defaults' tight limits lean on (docs/config.md, "Choosing the defaults").
pub const DEFAULT_STEP_FRACTION: f64 = 0.25;
pub const DEFAULT_STEP_MIN_BYTES: u64 = 16 << 20;
pub const DEFAULT_CEILING_FACTOR: f64 = 4.0;
pub const DEFAULT_HOST_RESERVE_BYTES: u64 = 256 << 20;
pub const DEFAULT_PRESSURE_STALL_MS: u64 = 100;
pub const DEFAULT_PRESSURE_WINDOW_MS: u64 = 1000;
pub const DEFAULT_IDLE_AFTER_S: u64 = 30;
pub const DEFAULT_SQUEEZE_HEADROOM_BYTES: u64 = 4 << 20;
pub const DEFAULT_RELEASE_AFTER_S: u64 = 30;

/// `[reactive]`: the burst guard is on in enforce mode unless `enabled = false`; writes happen
/// only where writes are allowed (enforce mode).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReactiveConfig {
    /// The burst guard. Left out (None): on in enforce mode, where limits are written.
    pub enabled: Option<bool>,
    /// The early-warning point as a fraction of memory.max, where an instance has no
    /// memory.high (v2) or soft limit (v1) below its max.
    pub trigger_fraction: f64,
    /// A raise adds this fraction of the current memory.max ...
    pub step_fraction: f64,
    /// ... and at least this many bytes.
    pub step_min_bytes: u64,
    /// No raise goes above this times the function's recommended memory.max, else times the
    /// limit in force when the guard started watching the instance (fixed then).
    pub ceiling_factor: f64,
    /// Memory the host keeps available (MemAvailable) after a raise or an admitted instance.
    pub host_reserve_bytes: u64,
    /// Host-pressure squeeze: under memory pressure, idle instances give back their page
    /// cache and are held near their working set (needs `enabled`).
    pub squeeze: bool,
    /// Pressure is tasks stalled on memory (PSI "some") for this long ...
    pub pressure_stall_ms: u64,
    /// ... within a window this long (the kernel takes 500 to 10,000 ms).
    pub pressure_window_ms: u64,
    /// cgroup v1 roots have no PSI: the memory.pressure_level signalled ("low", "medium",
    /// "critical").
    pub pressure_level_v1: String,
    /// An instance whose processes used no CPU for this long is idle.
    pub idle_after_s: u64,
    /// A squeezed instance is held at its working set plus this (memory.high on v2, the soft
    /// limit on v1), and is squeezed only when that frees more than this.
    pub squeeze_headroom_bytes: u64,
    /// Squeezes are released once no pressure was signalled for this long.
    pub release_after_s: u64,
}

impl Default for ReactiveConfig {
    fn default() -> Self {
        ReactiveConfig {
            enabled: None,
            trigger_fraction: DEFAULT_TRIGGER_FRACTION,
            step_fraction: DEFAULT_STEP_FRACTION,
            step_min_bytes: DEFAULT_STEP_MIN_BYTES,
            ceiling_factor: DEFAULT_CEILING_FACTOR,
            host_reserve_bytes: DEFAULT_HOST_RESERVE_BYTES,
            squeeze: false,
            pressure_stall_ms: DEFAULT_PRESSURE_STALL_MS,
            pressure_window_ms: DEFAULT_PRESSURE_WINDOW_MS,
            pressure_level_v1: "medium".to_owned(),
            idle_after_s: DEFAULT_IDLE_AFTER_S,
            squeeze_headroom_bytes: DEFAULT_SQUEEZE_HEADROOM_BYTES,
            release_after_s: DEFAULT_RELEASE_AFTER_S,
        }
    }
}

impl ReactiveConfig {
    /// Whether the burst guard runs: asked for or left out, where writes are allowed.
    pub fn guard_on(&self, writes_allowed: bool) -> bool {
        writes_allowed && self.enabled.unwrap_or(true)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, v: f64, reason: &str| ConfigError::Invalid {
            key: format!("reactive.{key}"),
            value: v.to_string(),
            reason: reason.to_owned(),
        };
        if !(self.trigger_fraction > 0.0 && self.trigger_fraction < 1.0) {
            return Err(bad(
                "trigger_fraction",
                self.trigger_fraction,
                "must be above 0 and below 1",
            ));
        }
        if !(self.step_fraction > 0.0 && self.step_fraction <= 10.0) {
            return Err(bad(
                "step_fraction",
                self.step_fraction,
                "must be above 0 and at most 10",
            ));
        }
        if !(self.ceiling_factor >= 1.0 && self.ceiling_factor <= 100.0) {
            return Err(bad(
                "ceiling_factor",
                self.ceiling_factor,
                "must be between 1 and 100",
            ));
        }
        let bad_u = |key: &str, v: u64, reason: &str| ConfigError::Invalid {
            key: format!("reactive.{key}"),
            value: v.to_string(),
            reason: reason.to_owned(),
        };
        if !(500..=10_000).contains(&self.pressure_window_ms) {
            return Err(bad_u(
                "pressure_window_ms",
                self.pressure_window_ms,
                "the kernel takes PSI windows of 500 to 10000 ms",
            ));
        }
        if self.pressure_stall_ms == 0 || self.pressure_stall_ms > self.pressure_window_ms {
            return Err(bad_u(
                "pressure_stall_ms",
                self.pressure_stall_ms,
                "must be above 0 and at most pressure_window_ms",
            ));
        }
        if self.pressure_level_v1_str().is_none() {
            return Err(ConfigError::Invalid {
                key: "reactive.pressure_level_v1".to_owned(),
                value: self.pressure_level_v1.clone(),
                reason: "must be \"low\", \"medium\" or \"critical\"".to_owned(),
            });
        }
        if self.idle_after_s == 0 {
            return Err(bad_u("idle_after_s", 0, "must be at least 1"));
        }
        if self.release_after_s == 0 {
            return Err(bad_u("release_after_s", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// The v1 pressure level as the kernel spells it, if it is one.
    pub fn pressure_level_v1_str(&self) -> Option<&'static str> {
        ["low", "medium", "critical"]
            .into_iter()
            .find(|l| *l == self.pressure_level_v1)
    }

    /// What a squeeze of an idle instance does, from what it holds now: `None` when it
    /// would free no more than the headroom. Otherwise the bytes to reclaim (its reclaimable
    /// page cache) and the hold (memory.high / soft limit) to set once they are back: the
    /// rest plus headroom, never above the hold it has.
    pub fn squeeze(&self, usage: u64, reclaimable: u64, limits: Limits) -> Option<Squeeze> {
        let working_set = usage.saturating_sub(reclaimable);
        let hold = working_set.saturating_add(self.squeeze_headroom_bytes);
        let current_hold = limits
            .high_bytes
            .into_iter()
            .chain(limits.max_bytes)
            .min()
            .unwrap_or(u64::MAX);
        if reclaimable <= self.squeeze_headroom_bytes || hold >= current_hold {
            return None;
        }
        Some(Squeeze {
            reclaim_bytes: reclaimable,
            hold_bytes: hold,
        })
    }

    /// Usage at which an instance with these limits is helped.
    pub fn trigger_bytes(&self, limits: Limits) -> Option<u64> {
        let max = limits.max_bytes?;
        Some(match limits.high_bytes {
            Some(high) if high < max => high,
            _ => (max as f64 * self.trigger_fraction) as u64,
        })
    }

    /// The limits a burst gets: memory.max raised by a step (memory.high keeping its ratio),
    /// bounded by `ceiling` and by `host_available` less the reserve. `Err` says why not.
    pub fn burst_raise(
        &self,
        limits: Limits,
        usage: u64,
        ceiling: u64,
        host_available: u64,
    ) -> Result<Limits, NoRaise> {
        let max = limits.max_bytes.ok_or(NoRaise::NoLimit)?;
        if max >= ceiling {
            return Err(NoRaise::AtCeiling { max, ceiling });
        }
        let spare = host_available.saturating_sub(self.host_reserve_bytes);
        let step = ((max as f64 * self.step_fraction) as u64).max(self.step_min_bytes);
        let new_max = max
            .saturating_add(step)
            .min(ceiling)
            .min(max.saturating_add(spare));
        if new_max <= max.max(usage) {
            return Err(NoRaise::HostFull {
                available: host_available,
                reserve: self.host_reserve_bytes,
            });
        }
        let high = limits
            .high_bytes
            .filter(|h| *h < max)
            .map(|h| (new_max as f64 * (h as f64 / max as f64)) as u64);
        Ok(Limits {
            max_bytes: Some(new_max),
            high_bytes: high,
        })
    }

    /// Whether an instance predicted to need `predicted` bytes fits in `available`.
    pub fn admit(&self, predicted: Option<u64>, available: u64) -> Admission {
        let room = available.saturating_sub(self.host_reserve_bytes);
        let (admit, reason) = match predicted {
            None => (
                true,
                "no history for this function: nothing to predict from".to_owned(),
            ),
            Some(p) if p <= room => (
                true,
                "the predicted memory.max fits in what the host has available".to_owned(),
            ),
            Some(p) => (
                false,
                format!(
                    "the predicted memory.max ({p} bytes) exceeds what the host has available \
                     above its reserve ({room} bytes)"
                ),
            ),
        };
        Admission {
            admit,
            reason,
            predicted_bytes: predicted,
            available_bytes: room,
        }
    }
}

/// A squeeze's plan: reclaim this much, then hold the instance here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Squeeze {
    pub reclaim_bytes: u64,
    pub hold_bytes: u64,
}

/// Why a burst got no raise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRaise {
    #[error("the instance has no memory.max")]
    NoLimit,
    #[error(
        "at the ceiling {} (reactive.ceiling_factor x the function's recommended memory.max, \
         else the limit in force when the guard started watching): memory.max is {max} bytes",
        mib(.ceiling)
    )]
    AtCeiling { max: u64, ceiling: u64 },
    #[error(
        "at the container runtime's limit {} (policy.override_runtime_limits = false): \
         memory.max is {max} bytes",
        mib(.limit)
    )]
    AtRuntimeLimit { max: u64, limit: u64 },
    #[error("the host has {available} bytes available, {reserve} of them reserved")]
    HostFull { available: u64, reserve: u64 },
}

/// Bytes as MiB for messages: "128 MiB", "12.5 MiB".
fn mib(bytes: &u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} MiB", *bytes as f64 / f64::from(1 << 20))
    }
}

/// POST /v1/admission's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Admission {
    pub admit: bool,
    pub reason: String,
    /// The function's recommended memory.max; null without history.
    pub predicted_bytes: Option<u64>,
    /// What the host has available above its reserve.
    pub available_bytes: u64,
}

// Bridge for policy/burst.rs and api/mod.rs, which import it from here: the reader is
// `kernel::host` now.

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limits(max: u64, high: Option<u64>) -> Limits {
        Limits {
            max_bytes: Some(max),
            high_bytes: high,
        }
    }

    #[test]
    fn a_squeeze_takes_the_page_cache_and_holds_the_rest() {
        let c = ReactiveConfig::default(); // 4 MiB headroom
                                           // 8 MiB anon + 48 MiB cache under a 100 MiB max with a 90 MiB high.
        let l = limits(100 * MIB, Some(90 * MIB));
        assert_eq!(
            c.squeeze(56 * MIB, 48 * MIB, l),
            Some(Squeeze {
                reclaim_bytes: 48 * MIB,
                hold_bytes: 12 * MIB
            })
        );
        // Nothing worth taking: no more cache than the headroom.
        assert_eq!(c.squeeze(12 * MIB, 4 * MIB, l), None);
        // The hold would not be below what it has: no squeeze.
        assert_eq!(
            c.squeeze(56 * MIB, 48 * MIB, limits(100 * MIB, Some(10 * MIB))),
            None
        );
        // No high: the max bounds the hold.
        assert!(c
            .squeeze(56 * MIB, 48 * MIB, limits(60 * MIB, None))
            .is_some());
        assert_eq!(c.squeeze(56 * MIB, 48 * MIB, limits(12 * MIB, None)), None);
    }

    #[test]
    fn pressure_settings_are_checked() {
        let ok = ReactiveConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            ReactiveConfig {
                pressure_window_ms: 100,
                ..ok.clone()
            },
            ReactiveConfig {
                pressure_stall_ms: 0,
                ..ok.clone()
            },
            ReactiveConfig {
                pressure_stall_ms: 2000,
                ..ok.clone()
            },
            ReactiveConfig {
                pressure_level_v1: "high".into(),
                ..ok.clone()
            },
            ReactiveConfig {
                idle_after_s: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trigger_is_high_or_a_fraction_of_max() {
        let c = ReactiveConfig::default();
        assert_eq!(
            c.trigger_bytes(limits(100 * MIB, Some(80 * MIB))),
            Some(80 * MIB)
        );
        assert_eq!(
            c.trigger_bytes(limits(100 * MIB, None)),
            Some((100.0 * MIB as f64 * 0.9) as u64)
        );
        assert_eq!(c.trigger_bytes(Limits::default()), None);
    }

    #[test]
    fn a_burst_gets_a_step_bounded_by_ceiling_and_host() {
        // The default step: a quarter of max.
        let l = limits(100 * MIB, Some(90 * MIB));
        let r = ReactiveConfig::default()
            .burst_raise(l, 95 * MIB, 1000 * MIB, 10_000 * MIB)
            .unwrap();
        assert_eq!(r.max_bytes, Some(125 * MIB));
        let c = ReactiveConfig {
            step_fraction: 0.5,
            ..ReactiveConfig::default()
        };
        // A step of half of max; high keeps its ratio.
        let r = c
            .burst_raise(l, 95 * MIB, 1000 * MIB, 10_000 * MIB)
            .unwrap();
        assert_eq!(r.max_bytes, Some(150 * MIB));
        assert_eq!(r.high_bytes, Some(135 * MIB));
        // The ceiling bounds it.
        let r = c.burst_raise(l, 95 * MIB, 120 * MIB, 10_000 * MIB).unwrap();
        assert_eq!(r.max_bytes, Some(120 * MIB));
        let at = c.burst_raise(limits(120 * MIB, None), 0, 120 * MIB, 10_000 * MIB);
        assert_eq!(
            at,
            Err(NoRaise::AtCeiling {
                max: 120 * MIB,
                ceiling: 120 * MIB
            })
        );
        let why = at.unwrap_err().to_string();
        assert!(why.starts_with("at the ceiling 120 MiB"), "{why}");
        // So does what the host can spare above its reserve.
        let r = c
            .burst_raise(l, 95 * MIB, 1000 * MIB, 256 * MIB + 10 * MIB)
            .unwrap();
        assert_eq!(r.max_bytes, Some(110 * MIB));
        assert!(matches!(
            c.burst_raise(l, 95 * MIB, 1000 * MIB, 200 * MIB),
            Err(NoRaise::HostFull { .. })
        ));
        // A host with "everything" available (a simulation's) bounds nothing and overflows
        // nothing.
        let r = c
            .burst_raise(limits(1 << 40, None), 0, 1 << 41, u64::MAX)
            .unwrap();
        assert_eq!(r.max_bytes, Some((1 << 40) + (1 << 39)));
        // A small max gets the minimum step.
        let r = c.burst_raise(limits(10 * MIB, None), 0, 1000 * MIB, 10_000 * MIB);
        assert_eq!(r.unwrap().max_bytes, Some(26 * MIB));
    }

    #[test]
    fn admission_compares_prediction_with_room_above_reserve() {
        let c = ReactiveConfig::default();
        let yes = c.admit(Some(100 * MIB), 1000 * MIB);
        assert!(yes.admit, "{yes:?}");
        assert_eq!(yes.available_bytes, 1000 * MIB - 256 * MIB);
        let no = c.admit(Some(800 * MIB), 1000 * MIB);
        assert!(!no.admit);
        assert!(no.reason.contains("exceeds"), "{}", no.reason);
        let unknown = c.admit(None, 0);
        assert!(unknown.admit && unknown.predicted_bytes.is_none());
    }

    #[test]
    fn config_checks_ranges() {
        let c = ReactiveConfig {
            trigger_fraction: 1.0,
            ..ReactiveConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("trigger_fraction"));
        let c = ReactiveConfig {
            ceiling_factor: 0.5,
            ..ReactiveConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ceiling_factor"));
        ReactiveConfig::default().validate().unwrap();
    }
}
