//! A function's first limits, before any instance of it has ended: a prior from what this host
//! has learned of its other functions. Pure computation.
//!
//! Without it a function's first instances run unlimited until one of them ends (nothing to
//! recommend from). With it they start at the `percentile` of the other functions' median
//! peaks, plus `margin`: for a host of small functions, far below "unlimited" or a fixed
//! default. It is used only with the burst guard behind it (enforce mode, `[reactive]` on): a
//! prior is a guess, and the guard, not the guess, keeps a larger function alive, up to
//! `ceiling_factor` times the largest median this host knows (see [`Prior`]). The replay
//! (`emars-replay`) measured the choice (docs/config.md, "Choosing the defaults").

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;
use crate::policy::recommend::{page_up, Recommendation};

/// `[policy.prior]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorConfig {
    /// Off: a function's first instances get no limit until one of them has ended.
    pub enabled: bool,
    /// Of the other functions' median peaks, in percent, (0, 100].
    pub percentile: f64,
    /// Added on top, [0, 10].
    pub margin: f64,
    /// Functions with history the host must know before the prior is used, at least 1.
    pub min_functions: u32,
}

impl Default for PriorConfig {
    fn default() -> Self {
        PriorConfig {
            enabled: true,
            percentile: 50.0,
            margin: 0.1,
            min_functions: 3,
        }
    }
}

impl PriorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: format!("policy.prior.{key}"),
            value,
            reason: reason.to_owned(),
        };
        if !(self.percentile > 0.0 && self.percentile <= 100.0) {
            return Err(bad(
                "percentile",
                self.percentile.to_string(),
                "must be in (0, 100]",
            ));
        }
        if !(0.0..=10.0).contains(&self.margin) {
            return Err(bad(
                "margin",
                self.margin.to_string(),
                "must be between 0 and 10",
            ));
        }
        if self.min_functions == 0 {
            return Err(bad("min_functions", "0".into(), "must be at least 1"));
        }
        Ok(())
    }

    /// The prior from the median peaks of the functions with history (any order; sorted
    /// here). None when off or while fewer than `min_functions` are known.
    pub fn of(&self, medians: &mut [u64]) -> Option<Prior> {
        if !self.enabled || medians.len() < self.min_functions as usize {
            return None;
        }
        medians.sort_unstable();
        let rank = ((self.percentile / 100.0) * medians.len() as f64).ceil() as usize;
        let median = medians[rank.clamp(1, medians.len()) - 1];
        Some(Prior {
            max_bytes: page_up((median as f64 * (1.0 + self.margin)).ceil() as u64),
            largest_median_bytes: medians[medians.len() - 1],
        })
    }

    /// [`Self::of`]'s memory.max alone.
    pub fn max_bytes(&self, medians: &mut [u64]) -> Option<u64> {
        self.of(medians).map(|p| p.max_bytes)
    }
}

/// A function's vote in the prior: its median peak, when this host or the fleet has seen it
/// run (a recommendation from the prior itself, or from pins alone, has none).
pub fn vote(r: &Recommendation) -> Option<u64> {
    (r.samples > 0 || r.fleet_samples > 0.0).then_some(r.p50_bytes)
}

/// What the host's other functions say about a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prior {
    /// `percentile` of their medians, times `1 + margin`, page-rounded up.
    pub max_bytes: u64,
    /// The largest of their medians: the burst guard's base for a function on the prior (its
    /// ceiling is `ceiling_factor` times this, or times `max_bytes` where that is larger), so
    /// a new function may grow as large as the largest this host runs, with room, and no
    /// further.
    pub largest_median_bytes: u64,
}

impl Prior {
    /// The base of the burst guard's ceiling for an instance started on this prior.
    pub fn ceiling_base_bytes(&self) -> u64 {
        self.largest_median_bytes.max(self.max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn percentile_of_the_medians_with_margin() {
        let cfg = PriorConfig::default();
        let mut m = vec![400 * MIB, 10 * MIB, 100 * MIB, 40 * MIB];
        // P50 of 4 by nearest rank: the 2nd, 40 MiB; x 1.1.
        assert_eq!(cfg.max_bytes(&mut m), Some(page_up(44 * MIB)));
        let p = cfg.of(&mut m).unwrap();
        assert_eq!(p.largest_median_bytes, 400 * MIB);
        assert_eq!(p.ceiling_base_bytes(), 400 * MIB);
        let p100 = PriorConfig {
            percentile: 100.0,
            margin: 0.0,
            ..cfg.clone()
        };
        assert_eq!(p100.max_bytes(&mut m), Some(400 * MIB));
        let p1 = PriorConfig {
            percentile: 1.0,
            margin: 0.0,
            ..cfg
        };
        assert_eq!(p1.max_bytes(&mut m), Some(10 * MIB));
    }

    #[test]
    fn none_while_too_few_functions_or_off() {
        let cfg = PriorConfig::default();
        assert_eq!(cfg.max_bytes(&mut [MIB, 2 * MIB]), None);
        assert_eq!(cfg.max_bytes(&mut []), None);
        let off = PriorConfig {
            enabled: false,
            ..cfg
        };
        assert_eq!(off.max_bytes(&mut [MIB, 2 * MIB, 3 * MIB]), None);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (cfg, key) in [
            (
                PriorConfig {
                    percentile: 0.0,
                    ..PriorConfig::default()
                },
                "policy.prior.percentile",
            ),
            (
                PriorConfig {
                    margin: -0.1,
                    ..PriorConfig::default()
                },
                "policy.prior.margin",
            ),
            (
                PriorConfig {
                    min_functions: 0,
                    ..PriorConfig::default()
                },
                "policy.prior.min_functions",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        assert!(PriorConfig::default().validate().is_ok());
    }
}
