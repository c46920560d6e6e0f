//! Reuse and Recycle: how long a function's warm instance is worth keeping, from the idle times
//! between its uses, in the manner of the hybrid histogram policy (Shahrad et al., "Serverless
//! in the Wild", ATC'20): idle times go into 1-minute bins over a 4-hour range; when the
//! histogram is representative, pre-warm at its head (a low percentile, less a margin) and keep
//! alive until its tail (a high percentile, plus a margin); when it is not (too few idle times,
//! too many beyond the range, or spread evenly), a fixed window. One step beyond the paper: a
//! function with too few idle times for the histogram whose idle times all fall in one bin or
//! two neighbouring ones (a timer, a regular caller) is regular: pre-warm at the shortest's bin
//! and keep alive past the longest's, from as few as `min_regular_idle_times`, instead of
//! holding an instance for the fixed window until the histogram fills. Pure: the model hands the idle
//! times over ([`crate::model::live::idle_gaps`]). Bin width and count are settings (`bin_ms`,
//! `bins`), so that tests run in seconds.

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;

const MINUTE_MS: u64 = 60_000;

/// `[keepalive]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepAliveConfig {
    /// The histogram's bin width (the paper's: one minute) ...
    pub bin_ms: u64,
    /// ... and number of bins (the paper's: 240, four hours): idle times beyond them are out
    /// of range.
    pub bins: u64,
    /// Pre-warm at this percentile of the idle times ...
    pub head_percentile: f64,
    /// ... and keep alive until this one.
    pub tail_percentile: f64,
    /// Pre-warm this fraction earlier, keep alive this fraction longer.
    pub margin: f64,
    /// Fewer idle times than this: not representative ...
    pub min_idle_times: u64,
    /// ... unless there are at least this many and they all fall in one bin or two
    /// neighbouring ones: regular (0: never).
    pub min_regular_idle_times: u64,
    /// More than this fraction of idle times beyond the range: not representative.
    pub max_out_of_range: f64,
    /// A histogram whose bin counts vary less than this (coefficient of variation) shows no
    /// pattern: not representative.
    pub min_cv: f64,
    /// The window used when the histogram is not representative (the paper's: the range).
    pub fixed_keepalive_ms: u64,
}

impl Default for KeepAliveConfig {
    fn default() -> Self {
        KeepAliveConfig {
            bin_ms: MINUTE_MS,
            bins: 240,
            head_percentile: 5.0,
            tail_percentile: 99.0,
            margin: 0.1,
            min_idle_times: 10,
            min_regular_idle_times: 3,
            max_out_of_range: 0.5,
            min_cv: 2.0,
            fixed_keepalive_ms: 240 * MINUTE_MS,
        }
    }
}

impl KeepAliveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, v: String, reason: &str| ConfigError::Invalid {
            key: format!("keepalive.{key}"),
            value: v,
            reason: reason.to_owned(),
        };
        if !(10..=86_400_000).contains(&self.bin_ms) {
            return Err(bad(
                "bin_ms",
                self.bin_ms.to_string(),
                "must be 10 ms to a day",
            ));
        }
        if !(1..=10_080).contains(&self.bins) {
            return Err(bad("bins", self.bins.to_string(), "must be 1 to 10080"));
        }
        let pct = |v: f64| v > 0.0 && v < 100.0;
        if !pct(self.head_percentile) || !pct(self.tail_percentile) {
            return Err(bad(
                "head_percentile",
                format!("{} / {}", self.head_percentile, self.tail_percentile),
                "head and tail percentiles must be above 0 and below 100",
            ));
        }
        if self.head_percentile >= self.tail_percentile {
            return Err(bad(
                "head_percentile",
                self.head_percentile.to_string(),
                "must be below tail_percentile",
            ));
        }
        if !(0.0..1.0).contains(&self.margin) {
            return Err(bad(
                "margin",
                self.margin.to_string(),
                "must be 0 or more and below 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.max_out_of_range) {
            return Err(bad(
                "max_out_of_range",
                self.max_out_of_range.to_string(),
                "must be between 0 and 1",
            ));
        }
        if self.min_regular_idle_times == 1 {
            return Err(bad(
                "min_regular_idle_times",
                self.min_regular_idle_times.to_string(),
                "must be 0 (never) or 2 or more: one idle time shows no regularity",
            ));
        }
        if self.min_cv.is_nan() || self.min_cv < 0.0 {
            return Err(bad("min_cv", self.min_cv.to_string(), "must be 0 or more"));
        }
        Ok(())
    }

    /// The advice for a function whose idle times (ms between the end of one use and the
    /// start of the next, no use running in between) are `idle_ms`.
    pub fn advise(&self, idle_ms: &[u64]) -> KeepAlive {
        let bins = self.bins as usize;
        let width = self.bin_ms;
        let mut hist = vec![0u64; bins];
        let mut out_of_range = 0u64;
        for &t in idle_ms {
            match usize::try_from(t / width).ok().filter(|b| *b < bins) {
                Some(b) => hist[b] += 1,
                None => out_of_range += 1,
            }
        }
        let n = idle_ms.len() as u64;
        let in_range = n - out_of_range;
        let fixed = |basis: String| KeepAlive {
            prewarm_ms: 0,
            keepalive_ms: self.fixed_keepalive_ms,
            basis,
            idle_times: n,
            out_of_range,
            cv: None,
        };
        if n < self.min_idle_times {
            if let Some(k) = self.regular(&hist, n) {
                return k;
            }
            return fixed(format!(
                "fixed: {n} idle time(s), fewer than {} to judge from",
                self.min_idle_times
            ));
        }
        if out_of_range as f64 > self.max_out_of_range * n as f64 {
            return fixed(format!(
                "fixed: {out_of_range} of {n} idle times are longer than the range ({} ms)",
                self.bins * width
            ));
        }
        let mean = in_range as f64 / bins as f64;
        let var = hist.iter().map(|c| (*c as f64 - mean).powi(2)).sum::<f64>() / bins as f64;
        let cv = var.sqrt() / mean;
        if cv < self.min_cv {
            return KeepAlive {
                cv: Some(cv),
                ..fixed(format!(
                    "fixed: idle times spread evenly (bin counts' CV {cv:.2} < {})",
                    self.min_cv
                ))
            };
        }
        // Percentiles over every idle time (those out of range sit past the last bin): the
        // head is the lower edge of its bin, the tail the upper edge of its own.
        let rank = |p: f64| ((p / 100.0 * n as f64).ceil() as u64).clamp(1, n);
        let bin_of = |r: u64| {
            let mut seen = 0;
            for (b, c) in hist.iter().enumerate() {
                seen += c;
                if seen >= r {
                    return b as u64;
                }
            }
            bins as u64
        };
        let (head, tail) = (
            bin_of(rank(self.head_percentile)),
            bin_of(rank(self.tail_percentile)),
        );
        let (prewarm_ms, keepalive_ms) = self.window(head, tail);
        KeepAlive {
            prewarm_ms,
            keepalive_ms,
            basis: format!(
                "histogram: pre-warm at the {}th percentile of {n} idle times ({} ms) less \
                 {}%, keep alive to the {}th ({} ms) plus {}%",
                self.head_percentile,
                head * width,
                self.margin * 100.0,
                self.tail_percentile,
                (tail + 1).min(self.bins) * width,
                self.margin * 100.0
            ),
            idle_times: n,
            out_of_range,
            cv: Some(cv),
        }
    }

    /// Pre-warm at the lower edge of bin `head` less the margin, keep alive to the upper edge
    /// of bin `tail` plus the margin: (prewarm_ms, keepalive_ms from the pre-warm).
    fn window(&self, head: u64, tail: u64) -> (u64, u64) {
        let head_ms = head * self.bin_ms;
        let tail_ms = (tail + 1).min(self.bins) * self.bin_ms;
        let prewarm_ms = (head_ms as f64 * (1.0 - self.margin)) as u64;
        let until_ms = (tail_ms as f64 * (1.0 + self.margin)) as u64;
        (prewarm_ms, until_ms.saturating_sub(prewarm_ms))
    }

    /// Too few idle times for the histogram (`n` of them, binned in `hist`, none out of
    /// range), but at least `min_regular_idle_times`, all in one bin or two neighbouring ones:
    /// the window from the shortest's bin to the longest's.
    fn regular(&self, hist: &[u64], n: u64) -> Option<KeepAlive> {
        if self.min_regular_idle_times == 0 || n < self.min_regular_idle_times {
            return None;
        }
        let used = || hist.iter().enumerate().filter(|(_, c)| **c > 0);
        let first = used().next()?.0 as u64;
        let last = used().next_back()?.0 as u64;
        let in_range: u64 = hist.iter().sum();
        if in_range != n || last - first > 1 {
            return None;
        }
        let (prewarm_ms, keepalive_ms) = self.window(first, last);
        Some(KeepAlive {
            prewarm_ms,
            keepalive_ms,
            basis: format!(
                "regular: {n} idle times, all within {} to {} ms: pre-warm at the shortest less \
                 {}%, keep alive past the longest plus {}%",
                first * self.bin_ms,
                (last + 1) * self.bin_ms,
                self.margin * 100.0,
                self.margin * 100.0
            ),
            idle_times: n,
            out_of_range: 0,
            cv: None,
        })
    }
}

/// GET /v1/functions/{name}/keepalive: unload the instance when a use ends, load one again
/// `prewarm_ms` later (0: keep it loaded), and keep it `keepalive_ms` from then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeepAlive {
    pub prewarm_ms: u64,
    pub keepalive_ms: u64,
    /// How the advice was reached ("histogram: ..." or "fixed: <why>").
    pub basis: String,
    /// Idle times it was judged from, and how many were beyond the range.
    pub idle_times: u64,
    pub out_of_range: u64,
    /// Coefficient of variation of the bin counts (None when not computed).
    pub cv: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_function_gets_its_head_and_tail() {
        let c = KeepAliveConfig::default();
        // Called every ~20 minutes: idle times all in the 20-minute bin.
        let idle: Vec<u64> = (0..50).map(|i| 20 * MINUTE_MS + (i % 7) * 1000).collect();
        let k = c.advise(&idle);
        assert_eq!(k.prewarm_ms, 18 * MINUTE_MS, "{k:?}"); // 20 min less 10%
                                                           // Tail: the 21-minute edge plus 10% = 23.1 min, from the end of the use.
        assert_eq!(
            k.prewarm_ms + k.keepalive_ms,
            23 * MINUTE_MS + 6000,
            "{k:?}"
        );
        assert!(k.basis.starts_with("histogram"), "{k:?}");
        assert_eq!((k.idle_times, k.out_of_range), (50, 0));
    }

    #[test]
    fn unrepresentative_histograms_get_the_fixed_window() {
        let c = KeepAliveConfig::default();
        let few = c.advise(&[MINUTE_MS; 2]);
        assert_eq!((few.prewarm_ms, few.keepalive_ms), (0, 240 * MINUTE_MS));
        assert!(few.basis.contains("fewer than 10"), "{few:?}");
        let long: Vec<u64> = (0..20).map(|i| (300 + i) * MINUTE_MS).collect();
        let k = c.advise(&long);
        assert!(k.basis.contains("longer than the range"), "{k:?}");
        // One idle time in every bin: no pattern.
        let even: Vec<u64> = (0..240).map(|b| b * MINUTE_MS + 1).collect();
        let k = c.advise(&even);
        assert!(k.basis.contains("spread evenly"), "{k:?}");
        assert_eq!(k.keepalive_ms, 240 * MINUTE_MS);
    }

    #[test]
    fn a_few_idle_times_in_neighbouring_bins_are_regular() {
        let c = KeepAliveConfig::default();
        // A timer every ~5 minutes, seen three times: 4.6, 5.2 and 4.9 minutes idle.
        let idle = [
            4 * MINUTE_MS + 36_000,
            5 * MINUTE_MS + 12_000,
            4 * MINUTE_MS + 54_000,
        ];
        let k = c.advise(&idle);
        assert!(k.basis.starts_with("regular"), "{k:?}");
        // Pre-warm at 4 minutes less 10%, keep alive to 6 minutes plus 10%.
        assert_eq!(k.prewarm_ms, 4 * MINUTE_MS * 9 / 10, "{k:?}");
        assert_eq!(
            k.prewarm_ms + k.keepalive_ms,
            6 * MINUTE_MS * 11 / 10,
            "{k:?}"
        );
        assert_eq!((k.idle_times, k.out_of_range, k.cv), (3, 0, None));
        // The histogram takes over from min_idle_times on, whatever the spread.
        let more: Vec<u64> = idle.iter().cycle().take(10).copied().collect();
        assert!(c.advise(&more).basis.starts_with("histogram"));
    }

    #[test]
    fn irregular_or_too_few_idle_times_get_the_fixed_window() {
        let c = KeepAliveConfig::default();
        let fixed = |idle: &[u64], c: &KeepAliveConfig| {
            let k = c.advise(idle);
            assert!(k.basis.starts_with("fixed"), "{idle:?}: {k:?}");
            assert_eq!((k.prewarm_ms, k.keepalive_ms), (0, 240 * MINUTE_MS));
        };
        // Two: fewer than min_regular_idle_times.
        fixed(&[5 * MINUTE_MS, 5 * MINUTE_MS], &c);
        // Three, bins 4 and 6: not neighbours.
        fixed(&[4 * MINUTE_MS, 6 * MINUTE_MS, 5 * MINUTE_MS - 1], &c);
        // Three in neighbouring bins, one of them past the range.
        let edge = 240 * MINUTE_MS;
        fixed(&[edge - 1, edge + 1, edge - 2], &c);
        // Off.
        let off = KeepAliveConfig {
            min_regular_idle_times: 0,
            ..Default::default()
        };
        fixed(&[5 * MINUTE_MS; 3], &off);
        // From two when so set.
        let two = KeepAliveConfig {
            min_regular_idle_times: 2,
            ..Default::default()
        };
        assert!(two.advise(&[5 * MINUTE_MS; 2]).basis.starts_with("regular"));
    }

    #[test]
    fn settings_are_checked() {
        assert!(KeepAliveConfig::default().validate().is_ok());
        for bad in [
            KeepAliveConfig {
                bins: 0,
                ..Default::default()
            },
            KeepAliveConfig {
                bin_ms: 0,
                ..Default::default()
            },
            KeepAliveConfig {
                head_percentile: 99.0,
                tail_percentile: 5.0,
                ..Default::default()
            },
            KeepAliveConfig {
                margin: 1.5,
                ..Default::default()
            },
            KeepAliveConfig {
                min_regular_idle_times: 1,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
