//! Input-aware limits: per function, peak memory learned against the size of each invocation's
//! input (`input_bytes` of `POST /v1/bind`), so that a 1 MiB request and a 64 MiB one get
//! limits of their own instead of the function's percentile. Pure computation: the model hands
//! over the samples ([`SizedSample`]: ended instances bound with a hint), the policy caches the
//! fit and bounds what it predicts with the recommender's own steps ([`bounded`]).
//!
//! # The fit, and why
//!
//! Memory usually grows as `base + k · input` (a runtime and its libraries, then buffers in
//! proportion to the request). A line through log-log points bends where the base dominates
//! (small inputs) and straightens where `k · input` does, so one power law misses one end or
//! the other by a wide margin. Both are fitted, each robustly with Theil-Sen (the median of
//! the pairwise slopes, then the median intercept: up to 29 % of the samples may be outliers
//! without moving it, and a single odd invocation does not tilt the line as least squares
//! would):
//!
//! - linear: `peak = a + b · input` (the slope held at 0 or more: memory does not shrink
//!   with the input);
//! - log-log: `ln peak = a + b · ln input` (inputs above 0 only).
//!
//! Each fit's margin is an upper percentile (`residual_percentile`) of the relative residuals
//! `peak / fit − 1` of the exact samples, plus `margin`; an OOM-killed sample's peak is a lower
//! bound (the kernel cut it at the limit), so the margin is also raised until the limit at its
//! input clears `max(peak, limit) · 1.2` (VPA's OOM ratio). Of the two, the one whose limits
//! over-provision the samples least on average is kept, the power law only when it does so by
//! [`LOG_LOG_HANDICAP`] more (on the reference workload, `emars-platform --sized`, the line
//! is kept; the README has the figures).
//!
//! # When the fit is not used
//!
//! The function's percentile recommendation is used instead ([`Fallback`]) when there are
//! fewer than `min_samples` hinted samples, when the inputs are all alike (the largest less
//! than [`MIN_INPUT_RATIO`] times the smallest: no slope can be told from noise), when the
//! margin needed exceeds `max_margin` (the peak does not follow the input), when a limit is
//! pinned, and for a hint far above the inputs seen: above the largest times `extrapolation`
//! (default 2: twice the largest input seen is still predicted, three times is not). A hint
//! far below them (under the smallest divided by `extrapolation`) gets the limits of that
//! lower edge: the curve never falls with the input, so they cover it, and they are far
//! tighter than the percentile (on the reference workload, the percentile gave such an
//! invocation 20x its peak).

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;
use crate::model::SizedSample;

use super::recommend::{
    page_up, Estimate, PolicyParams, Step, WithCeiling, WithFloor, WithHigh, WithHostMemory,
    OOM_BUMP_RATIO, PAGE_BYTES,
};

/// The inputs must span at least this ratio (largest / smallest) for a slope to be fitted.
pub const MIN_INPUT_RATIO: f64 = 1.25;

/// A power law is kept over the line only when it over-provisions the samples this much less
/// (a fraction): with few samples a power law often fits them a little better and then bends
/// away from the next input (the unit tests' noisy workload: with 5 samples, limits up to
/// 1.16x the next peak when picked on the samples alone).
pub const LOG_LOG_HANDICAP: f64 = 0.05;

/// The fit uses the most recent samples, at most this many (Theil-Sen is quadratic in them:
/// 100 samples are 4,950 slopes, well under a millisecond).
pub const MAX_FIT_SAMPLES: usize = 100;

/// `[policy.sized]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SizedConfig {
    /// Off: a bind's hint is recorded, but limits are the function's percentile.
    pub enabled: bool,
    /// Hinted samples (ended, with a peak) needed before the fit is used.
    pub min_samples: u64,
    /// The percentile of the relative residuals taken as the margin, in percent.
    pub residual_percentile: f64,
    /// Added on top of that residual percentile (a fraction).
    pub margin: f64,
    /// A fit that needs more margin than this (a fraction) is poor: the percentile is used.
    pub max_margin: f64,
    /// A hint below the smallest input seen divided by this, or above the largest times this,
    /// is outside the fit's range: the percentile is used.
    pub extrapolation: f64,
}

impl Default for SizedConfig {
    fn default() -> Self {
        SizedConfig {
            enabled: true,
            min_samples: 5,
            residual_percentile: 95.0,
            margin: 0.05,
            max_margin: 0.5,
            extrapolation: 2.0,
        }
    }
}

impl SizedConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, v: String, reason: &str| ConfigError::Invalid {
            key: format!("policy.sized.{key}"),
            value: v,
            reason: reason.to_owned(),
        };
        if !(2..=MAX_FIT_SAMPLES as u64).contains(&self.min_samples) {
            return Err(bad(
                "min_samples",
                self.min_samples.to_string(),
                &format!("must be 2 to {MAX_FIT_SAMPLES}"),
            ));
        }
        if !(self.residual_percentile >= 50.0 && self.residual_percentile <= 100.0) {
            return Err(bad(
                "residual_percentile",
                self.residual_percentile.to_string(),
                "must be from 50 to 100 (a percentile of the residuals, not a fraction)",
            ));
        }
        if !(0.0..=1.0).contains(&self.margin) {
            return Err(bad(
                "margin",
                self.margin.to_string(),
                "must be between 0 and 1",
            ));
        }
        if !(self.max_margin > 0.0 && self.max_margin <= 10.0) {
            return Err(bad(
                "max_margin",
                self.max_margin.to_string(),
                "must be above 0 and at most 10",
            ));
        }
        if self.max_margin < self.margin {
            return Err(bad(
                "max_margin",
                self.max_margin.to_string(),
                "must not be below margin",
            ));
        }
        if !(self.extrapolation >= 1.0 && self.extrapolation <= 1000.0) {
            return Err(bad(
                "extrapolation",
                self.extrapolation.to_string(),
                "must be from 1 (the inputs seen only) to 1000",
            ));
        }
        Ok(())
    }
}

/// Which curve a fit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitModel {
    /// `peak = intercept + slope · input`.
    Linear,
    /// `ln peak = intercept + slope · ln input`.
    LogLog,
}

/// A function's fit of peak against input.
#[derive(Debug, Clone, PartialEq)]
pub struct SizedFit {
    pub model: FitModel,
    pub intercept: f64,
    pub slope: f64,
    /// memory.high is the fit times `1 + envelope` (the residual percentile: peaks above it
    /// are the unusual ones, which the burst guard should hear of) ...
    pub envelope: f64,
    /// ... and memory.max the fit times `1 + margin` (the envelope plus the configured margin,
    /// or more to clear an OOM kill's lower bound).
    pub margin: f64,
    /// The inputs the fit was made from span `[min_input, max_input]`.
    pub min_input: u64,
    pub max_input: u64,
    /// Samples it was made from.
    pub samples: usize,
}

/// Why the function's percentile gave a limit instead of the fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fallback {
    /// `[policy.sized] enabled = false`.
    Disabled,
    /// No fit computed for the function yet (nothing measured).
    NoFit,
    FewSamples {
        have: usize,
        need: u64,
    },
    InputsAlike,
    Spread {
        margin: f64,
    },
    /// The hint is far above the inputs seen.
    Extrapolation {
        input: u64,
    },
    /// A pinned memory.max wins over any fit.
    Pinned,
}

impl Fallback {
    /// The reason as the API and the log say it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::NoFit => "no_fit",
            Fallback::FewSamples { .. } => "few_samples",
            Fallback::InputsAlike => "inputs_alike",
            Fallback::Spread { .. } => "spread",
            Fallback::Extrapolation { .. } => "extrapolation",
            Fallback::Pinned => "pinned",
        }
    }
}

/// The function's fit from its hinted samples (any order), or why there is none.
pub fn fit(samples: &[SizedSample], config: &SizedConfig) -> Result<SizedFit, Fallback> {
    let mut recent: Vec<&SizedSample> = samples.iter().collect();
    recent.sort_by_key(|s| std::cmp::Reverse(s.at_ms));
    recent.truncate(MAX_FIT_SAMPLES);
    let exact: Vec<(f64, f64)> = recent
        .iter()
        .filter(|s| !s.oom_killed && s.peak_bytes > 0)
        .map(|s| (s.input_bytes as f64, s.peak_bytes as f64))
        .collect();
    if (exact.len() as u64) < config.min_samples {
        return Err(Fallback::FewSamples {
            have: exact.len(),
            need: config.min_samples,
        });
    }
    let (lo, hi) = exact
        .iter()
        .fold((f64::INFINITY, 0.0_f64), |(lo, hi), (x, _)| {
            (lo.min(*x), hi.max(*x))
        });
    if hi < lo * MIN_INPUT_RATIO || hi == 0.0 {
        return Err(Fallback::InputsAlike);
    }
    // Lower bounds: an OOM-killed sample needed more than it got.
    let bounds: Vec<(f64, f64)> = recent
        .iter()
        .filter(|s| s.oom_killed)
        .map(|s| {
            let cut = s.peak_bytes.max(s.limit_bytes.unwrap_or(0)) as f64;
            (s.input_bytes as f64, cut * OOM_BUMP_RATIO)
        })
        .collect();
    let mut candidates = vec![Line::theil_sen(&exact, FitModel::Linear)];
    if lo > 0.0 {
        candidates.push(Line::theil_sen(&exact, FitModel::LogLog));
    }
    let best = candidates
        .into_iter()
        .flatten()
        .map(|line| {
            let (envelope, margin) = line.margin(&exact, &bounds, config);
            let waste = line.mean_over_provision(&exact, margin);
            // The line is the prior: a power law must earn its place.
            let handicap = match line.model {
                FitModel::Linear => 1.0,
                FitModel::LogLog => 1.0 + LOG_LOG_HANDICAP,
            };
            (line, envelope, margin, waste * handicap)
        })
        .min_by(|a, b| a.3.total_cmp(&b.3));
    let Some((line, envelope, margin, _)) = best else {
        return Err(Fallback::InputsAlike);
    };
    if margin > config.max_margin {
        return Err(Fallback::Spread { margin });
    }
    Ok(SizedFit {
        model: line.model,
        intercept: line.intercept,
        slope: line.slope,
        envelope,
        margin,
        min_input: lo as u64,
        max_input: hi as u64,
        samples: exact.len() + bounds.len(),
    })
}

impl SizedFit {
    /// The curve at `input` (bytes, at least one page).
    pub fn curve(&self, input: u64) -> f64 {
        let line = Line {
            model: self.model,
            intercept: self.intercept,
            slope: self.slope,
        };
        line.at(input as f64)
    }

    /// memory.max and memory.high for an invocation of `input` bytes before the policy's
    /// bounds (page-rounded up), or [`Fallback::Extrapolation`] when the input is far above
    /// those seen. Far below them, the limits of the smallest input the fit answers for: the
    /// curve never falls with the input (its slope is held at 0 or more), so they cover it.
    pub fn predict(&self, input: u64, extrapolation: f64) -> Result<Predicted, Fallback> {
        let x = input as f64;
        if x > self.max_input as f64 * extrapolation {
            return Err(Fallback::Extrapolation { input });
        }
        let lowest = (self.min_input as f64 / extrapolation).floor() as u64;
        let at_input = input.max(lowest);
        // `as` saturates (and NaN is 0, which the floor lifts).
        let at = |factor: f64| page_up((self.curve(at_input) * factor).ceil() as u64);
        Ok(Predicted {
            max_bytes: at(1.0 + self.margin),
            high_bytes: at(1.0 + self.envelope),
        })
    }
}

/// What the fit says for one input, before the policy's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Predicted {
    pub max_bytes: u64,
    /// The fit's upper envelope: memory.high, so that only a peak above it throttles and
    /// wakes the burst guard (the usual fraction of max would sit below most peaks of a limit
    /// this tight).
    pub high_bytes: u64,
}

/// memory.max and memory.high for a prediction, bounded as the recommender bounds its own
/// (its steps: floor, ceiling, host memory, then memory.high at least `high_fraction` of max
/// and strictly below it, a pinned high lifting it). A pinned max is a [`Fallback::Pinned`]
/// before this is reached.
pub fn bounded(predicted: Predicted, params: &PolicyParams, host_memory_bytes: u64) -> Estimate {
    let host = WithHostMemory::of(host_memory_bytes);
    let chain: [&dyn Step; 4] = [
        &WithFloor {
            bytes: params.floor_bytes,
        },
        &WithCeiling {
            bytes: params.ceiling_bytes,
        },
        &host,
        // In the place of the function's median peak (the median over every input size,
        // above a small invocation's whole limit): the fit's envelope at this input.
        &WithHigh {
            pin: params.pin_high_bytes,
            max_pinned: false,
            fraction: params.high_fraction,
            p50_bytes: predicted.high_bytes,
            host,
        },
    ];
    let base = Estimate {
        max_bytes: predicted.max_bytes,
        ..Estimate::default()
    };
    chain
        .iter()
        .fold(base, |estimate, step| step.apply(estimate))
}

/// A fitted line, in the fit's own coordinates.
#[derive(Debug, Clone, Copy)]
struct Line {
    model: FitModel,
    intercept: f64,
    slope: f64,
}

impl Line {
    /// Theil-Sen on `(input, peak)` points, in the model's coordinates; None without two
    /// distinct inputs.
    fn theil_sen(points: &[(f64, f64)], model: FitModel) -> Option<Line> {
        let coords: Vec<(f64, f64)> = points
            .iter()
            .map(|&(x, y)| match model {
                FitModel::Linear => (x, y),
                FitModel::LogLog => (x.ln(), y.ln()),
            })
            .collect();
        let mut slopes = Vec::with_capacity(coords.len() * coords.len() / 2);
        for (i, a) in coords.iter().enumerate() {
            for b in &coords[i + 1..] {
                if b.0 != a.0 {
                    slopes.push((b.1 - a.1) / (b.0 - a.0));
                }
            }
        }
        let slope = median(&mut slopes)?.max(0.0);
        let mut intercepts: Vec<f64> = coords.iter().map(|(x, y)| y - slope * x).collect();
        let intercept = median(&mut intercepts)?;
        Some(Line {
            model,
            intercept,
            slope,
        })
    }

    /// The curve at input `x`, in bytes (at least one page: a line may cross 0 below the
    /// inputs seen).
    fn at(&self, x: f64) -> f64 {
        let y = match self.model {
            FitModel::Linear => self.intercept + self.slope * x,
            FitModel::LogLog => (self.intercept + self.slope * x.max(1.0).ln()).exp(),
        };
        if y.is_finite() {
            y.max(PAGE_BYTES as f64)
        } else {
            f64::MAX
        }
    }

    /// The envelope (the residual percentile of the exact samples, at least 0) and the margin
    /// (the envelope plus the configured margin, raised until every lower bound is cleared).
    fn margin(
        &self,
        exact: &[(f64, f64)],
        bounds: &[(f64, f64)],
        config: &SizedConfig,
    ) -> (f64, f64) {
        let mut residuals: Vec<f64> = exact.iter().map(|&(x, y)| y / self.at(x) - 1.0).collect();
        residuals.sort_by(f64::total_cmp);
        let rank = (config.residual_percentile / 100.0 * residuals.len() as f64).ceil() as usize;
        let upper = residuals
            .get(rank.clamp(1, residuals.len()) - 1)
            .copied()
            .unwrap_or(0.0);
        let from_bounds = bounds
            .iter()
            .map(|&(x, y)| y / self.at(x) - 1.0)
            .fold(0.0_f64, f64::max);
        let envelope = upper.max(0.0);
        (envelope, (envelope + config.margin).max(from_bounds))
    }

    /// The mean of limit / peak over the exact samples: what the fit would have reserved.
    fn mean_over_provision(&self, exact: &[(f64, f64)], margin: f64) -> f64 {
        let sum: f64 = exact
            .iter()
            .map(|&(x, y)| self.at(x) * (1.0 + margin) / y)
            .sum();
        sum / exact.len().max(1) as f64
    }
}

/// The median (the mean of the middle two for an even count); None when empty.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sample(at_ms: u64, input: u64, peak: u64) -> SizedSample {
        SizedSample {
            at_ms,
            input_bytes: input,
            peak_bytes: peak,
            oom_killed: false,
            limit_bytes: None,
        }
    }

    /// `peak = base + k · input · (1 + noise)`, noise from a fixed pseudo-random sequence in
    /// `[-spread, spread]`, inputs log-uniform over 1-64 MiB.
    fn workload(n: u64, base: u64, k: f64, spread: f64, seed: u64) -> Vec<SizedSample> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|i| {
                let input = (MIB as f64 * 64f64.powf(next())) as u64;
                let noise = 1.0 + spread * (2.0 * next() - 1.0);
                let peak = base + (k * input as f64 * noise) as u64;
                sample(i * 1000, input, peak)
            })
            .collect()
    }

    fn config() -> SizedConfig {
        SizedConfig::default()
    }

    #[test]
    fn a_clean_line_is_found_exactly() {
        let samples: Vec<_> = [1, 2, 4, 8, 16, 32]
            .iter()
            .enumerate()
            .map(|(i, m)| sample(i as u64, m * MIB, 10 * MIB + 3 * m * MIB))
            .collect();
        let f = fit(&samples, &config()).unwrap();
        assert_eq!(f.model, FitModel::Linear);
        assert!((f.slope - 3.0).abs() < 1e-9, "{f:?}");
        assert!((f.intercept - (10 * MIB) as f64).abs() < 1.0, "{f:?}");
        // No residual: the margin is the configured one alone.
        assert!((f.margin - config().margin).abs() < 1e-9, "{f:?}");
        let at_1 = f.predict(MIB, 2.0).unwrap().max_bytes;
        let at_64 = f.predict(64 * MIB, 2.0).unwrap().max_bytes;
        assert_eq!(at_1, page_up((13.0 * MIB as f64 * 1.05).ceil() as u64));
        assert_eq!(at_64, page_up((202.0 * MIB as f64 * 1.05).ceil() as u64));
    }

    #[test]
    fn a_power_law_is_fitted_in_log_log() {
        // peak = 4 MiB · (input / 1 MiB)^0.5: a line through it bends away at both ends.
        let samples: Vec<_> = [1u64, 2, 4, 8, 16, 32, 64]
            .iter()
            .enumerate()
            .map(|(i, m)| {
                sample(
                    i as u64,
                    m * MIB,
                    (4.0 * MIB as f64 * (*m as f64).sqrt()) as u64,
                )
            })
            .collect();
        let f = fit(&samples, &config()).unwrap();
        assert_eq!(f.model, FitModel::LogLog, "{f:?}");
        assert!((f.slope - 0.5).abs() < 1e-6, "{f:?}");
    }

    #[test]
    fn noisy_growth_is_covered_tightly_after_five_samples() {
        // The reference workload's shape (emars-platform --sized): base + 2 · input, ±3 %.
        for seed in 0..50 {
            let all = workload(40, 6 * MIB, 2.0, 0.03, seed);
            for n in 5..all.len() {
                let Ok(f) = fit(&all[..n], &config()) else {
                    // Early draws may all land close together: the fallback covers them.
                    continue;
                };
                let next = &all[n];
                let Ok(Predicted {
                    max_bytes: limit, ..
                }) = f.predict(next.input_bytes, 2.0)
                else {
                    continue;
                };
                let ratio = limit as f64 / next.peak_bytes as f64;
                // Far below the inputs seen the limit is the lower edge's: covering, not tight.
                let far_below = (next.input_bytes as f64) < f.min_input as f64 / 2.0;
                assert!(
                    far_below || ratio < 1.15,
                    "seed {seed} n {n}: {ratio} {f:?}"
                );
                if n >= 10 {
                    assert!(ratio > 0.97, "seed {seed} n {n}: {ratio} {f:?}");
                    assert_eq!(f.model, FitModel::Linear, "seed {seed} n {n}");
                }
            }
        }
    }

    #[test]
    fn an_outlier_does_not_tilt_the_line() {
        // One odd invocation in 40: above the 95th percentile of the residuals, so it moves
        // neither the line nor the margin (least squares would tilt both).
        let mut samples: Vec<_> = (1..=39u64)
            .map(|m| sample(m, m * MIB, 5 * MIB + 2 * m * MIB))
            .collect();
        samples.push(sample(40, MIB, 300 * MIB));
        let f = fit(&samples, &config()).unwrap();
        assert!(
            (f.slope - 2.0 * MIB as f64 / MIB as f64).abs() < 0.01,
            "{f:?}"
        );
        assert!((f.margin - config().margin).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn too_few_alike_or_scattered_samples_fall_back() {
        let few: Vec<_> = (1..=4u64)
            .map(|m| sample(m, m * MIB, m * 3 * MIB))
            .collect();
        assert_eq!(
            fit(&few, &config()),
            Err(Fallback::FewSamples { have: 4, need: 5 })
        );
        let alike: Vec<_> = (0..10u64)
            .map(|i| sample(i, 10 * MIB + i * 1000, 30 * MIB))
            .collect();
        assert_eq!(fit(&alike, &config()), Err(Fallback::InputsAlike));
        // Peaks that do not follow the input: 10-100 MiB whatever it is.
        let scattered: Vec<_> = (1..=20u64)
            .map(|i| sample(i, i * MIB, (10 + (i * 37) % 91) * MIB))
            .collect();
        assert!(
            matches!(fit(&scattered, &config()), Err(Fallback::Spread { .. })),
            "{:?}",
            fit(&scattered, &config())
        );
    }

    #[test]
    fn oom_kills_are_lower_bounds_and_not_fitted() {
        let mut samples: Vec<_> = (1..=8u64)
            .map(|m| sample(m, m * MIB, 4 * MIB + m * MIB))
            .collect();
        let plain = fit(&samples, &config()).unwrap();
        // Killed at 10 MiB with an input of 8 MiB: it needed more than 12 MiB there.
        samples.push(SizedSample {
            at_ms: 20,
            input_bytes: 8 * MIB,
            peak_bytes: 10 * MIB,
            oom_killed: true,
            limit_bytes: Some(14 * MIB),
        });
        let f = fit(&samples, &config()).unwrap();
        assert_eq!(
            f.slope, plain.slope,
            "the killed peak is not a point of the line"
        );
        assert!(f.curve(8 * MIB) * (1.0 + f.margin) >= 14.0 * 1.2 * MIB as f64 - 1.0);
    }

    #[test]
    fn far_outside_the_inputs_seen_is_extrapolation() {
        let samples: Vec<_> = (1..=8u64)
            .map(|m| sample(m, m * MIB, 4 * MIB + m * MIB))
            .collect();
        let f = fit(&samples, &config()).unwrap();
        assert!(f.predict(16 * MIB, 2.0).is_ok());
        assert_eq!(
            f.predict(16 * MIB + 1, 2.0),
            Err(Fallback::Extrapolation {
                input: 16 * MIB + 1
            })
        );
        // Far below: the smallest input's limits, never less.
        let half = f.predict(MIB / 2, 2.0).unwrap();
        assert_eq!(f.predict(MIB / 2 - 1, 2.0), Ok(half));
        assert_eq!(f.predict(0, 2.0), Ok(half));
        assert!(f.predict(MIB, 2.0).unwrap().max_bytes > half.max_bytes);
    }

    #[test]
    fn bounds_are_the_recommenders() {
        let params = PolicyParams {
            floor_bytes: 32 * MIB,
            ceiling_bytes: Some(100 * MIB),
            ..PolicyParams::default()
        };
        let at = |max_bytes, high_bytes| Predicted {
            max_bytes,
            high_bytes,
        };
        let low = bounded(at(MIB, MIB), &params, 0);
        assert_eq!(low.max_bytes, 32 * MIB);
        assert_eq!(low.high_bytes, page_up((32.0 * MIB as f64 * 0.9) as u64));
        assert_eq!(
            bounded(at(500 * MIB, 400 * MIB), &params, 0).max_bytes,
            100 * MIB
        );
        assert_eq!(
            bounded(at(90 * MIB, 80 * MIB), &params, 64 * MIB).max_bytes,
            64 * MIB
        );
        // memory.high is the fit's envelope, above the usual fraction of max ...
        let tight = bounded(at(50 * MIB, 48 * MIB), &params, 0);
        assert_eq!((tight.max_bytes, tight.high_bytes), (50 * MIB, 48 * MIB));
        // ... never below it, and always below max.
        assert_eq!(
            bounded(at(50 * MIB, 10 * MIB), &params, 0).high_bytes,
            45 * MIB
        );
        assert_eq!(
            bounded(at(50 * MIB, 50 * MIB), &params, 0).high_bytes,
            50 * MIB - PAGE_BYTES
        );
    }

    #[test]
    fn settings_are_checked() {
        assert!(SizedConfig::default().validate().is_ok());
        let bad = |c: SizedConfig| c.validate().unwrap_err().to_string();
        let d = SizedConfig::default;
        assert!(bad(SizedConfig {
            min_samples: 1,
            ..d()
        })
        .contains("policy.sized.min_samples"));
        assert!(bad(SizedConfig {
            residual_percentile: 0.95,
            ..d()
        })
        .contains("policy.sized.residual_percentile"));
        assert!(bad(SizedConfig {
            margin: -0.1,
            ..d()
        })
        .contains("policy.sized.margin"));
        assert!(bad(SizedConfig {
            max_margin: 0.01,
            ..d()
        })
        .contains("policy.sized.max_margin"));
        assert!(bad(SizedConfig {
            extrapolation: 0.5,
            ..d()
        })
        .contains("policy.sized.extrapolation"));
    }
}
