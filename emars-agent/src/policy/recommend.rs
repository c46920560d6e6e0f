//! Predictive mode: per-function memory limits recommended from the history of instance peaks,
//! in the manner of the Kubernetes Vertical Pod Autoscaler but sized for serverless functions.
//!
//! Pure computation: no I/O, no clock. The caller passes the samples (one per instance, from
//! the store), the policy and the current time.
//!
//! # Method
//!
//! Each numbered step is a named type below, testable alone, and [`recommend`] composes them
//! in one place (after VPA's estimator chain: a base estimate, then wrappers):
//! 1 [`History`]; 2 [`Estimate::percentile_with_margin`] (with [`margin_for`]); 3
//! [`WithOomAtOnce`]; 4 [`WithFloor`], [`WithCeiling`], [`WithHostMemory`]; 5 and 6
//! [`WithPinnedMax`], [`WithHigh`].
//!
//! 1. Every instance peak goes into a [`DecayingHistogram`] (exponential buckets, the first
//!    ending at 1 MiB, each 5% wider than the one before, up to at least 1 TiB) with the weight
//!    `2^((t - ref) / half_life)`. An OOM-killed instance's peak is censored (the kernel killed
//!    it at its limit), so it is replaced by [`oom_bump`]`(max(limit, peak))`, VPA's OOM rule.
//! 2. `percentile_bytes` = the histogram's `percentile` (the upper edge of the bucket where the
//!    cumulative weight reaches it); `max_bytes = percentile_bytes · (1 + margin)`.
//! 3. OOM at once: the most recent OOM-killed instance younger than one half-life lifts
//!    `max_bytes` to at least its bumped value (`oom_bump_bytes`), whatever the percentile; VPA
//!    lets a single OOM sample drown in the histogram.
//! 4. Then the floor, the ceiling and the host memory, in that order (`clamped_by` names the
//!    last one that changed the value).
//! 5. `high_bytes = max(max_bytes · high_fraction, p50_bytes)`, strictly below `max_bytes`.
//! 6. Pins replace the field they name and always win, except that nothing is ever above the
//!    host memory.
//!
//! Computed byte values are rounded up to a multiple of [`PAGE_BYTES`]; clamps (ceiling, host
//! memory) are rounded down, so a rounded result never exceeds them. Pinned values are kept
//! exactly as the user wrote them.
//!
//! # Reference time
//!
//! Only relative weights matter to a percentile, so the histogram uses the newest sample as its
//! reference: its weight is 1, older ones are smaller, and no history, however old, underflows
//! to an empty histogram. `effective_samples` is the sum of the weights relative to `now`
//! (`2^((t - now) / half_life)`), which is what the confidence grows with. A sample stamped in
//! the future (clock skew) counts as taken at `now`.

use std::{sync::OnceLock, time::Duration};

pub use crate::model::audit::ClampedBy;
pub use crate::model::Sample;
pub use crate::policy::fleet::FleetPeaks;
use serde::{Deserialize, Serialize};

/// Results are multiples of the page size (the kernel rounds limits down to pages anyway).
pub const PAGE_BYTES: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Upper edge of the first histogram bucket.
pub const FIRST_BUCKET_BYTES: u64 = MIB;
/// Each bucket is this fraction wider than the one before it.
pub const BUCKET_GROWTH: f64 = 0.05;
/// The last bucket's upper edge is at least this (1 TiB); larger values land in it.
pub const MAX_TRACKED_BYTES: u64 = 1 << 40;
/// VPA's OOM rule: the bumped value is at least this much above the limit/peak...
pub const OOM_BUMP_MIN_BYTES: u64 = 100 * MIB;
/// ...and at least this multiple of it.
pub const OOM_BUMP_RATIO: f64 = 1.2;

/// The defaults, chosen with the burst guard behind them (it is on by default in enforce
/// mode): on the replay of the Azure sample they reserve the least memory at no more kills
/// than the older P95 x 1.15 without the guard (docs/config.md, "Choosing the defaults").
pub const DEFAULT_PERCENTILE: f64 = 50.0;
pub const DEFAULT_MARGIN: f64 = 0.1;
pub const DEFAULT_LOW_CONFIDENCE_MARGIN: f64 = 0.1;

/// Per-function policy (the lead maps config into this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyParams {
    /// Percentile of instance peaks, in percent; valid (0, 100].
    pub percentile: f64,
    /// Fraction added on top of the percentile; valid [0, 10].
    pub margin: f64,
    /// Extra margin while history is thin: the margin used is
    /// `margin + low_confidence_margin · (1 − confidence)` (VPA widens its upper bound with
    /// low confidence the same way); valid [0, 10].
    pub low_confidence_margin: f64,
    /// memory.high = max_bytes · high_fraction (but never below the P50 peak); valid (0, 1].
    pub high_fraction: f64,
    /// Serverless functions are small: VPA's 250 MiB floor would dominate them.
    pub floor_bytes: u64,
    pub ceiling_bytes: Option<u64>,
    pub half_life: Duration,
    /// User-pinned limits always win ("user parameters given higher priority").
    pub pin_max_bytes: Option<u64>,
    pub pin_high_bytes: Option<u64>,
    /// Effective (decayed) samples for confidence 1.0.
    pub confidence_samples: f64,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams {
            percentile: DEFAULT_PERCENTILE,
            margin: DEFAULT_MARGIN,
            low_confidence_margin: DEFAULT_LOW_CONFIDENCE_MARGIN,
            high_fraction: 0.9,
            floor_bytes: 16 * MIB,
            ceiling_bytes: None,
            half_life: Duration::from_secs(24 * 3600),
            pin_max_bytes: None,
            pin_high_bytes: None,
            confidence_samples: 20.0,
        }
    }
}

impl PolicyParams {
    /// Checks every field; the error names the first bad field and its value.
    pub fn validate(&self) -> Result<(), String> {
        fn bad(field: &str, value: impl std::fmt::Display, why: &str) -> Result<(), String> {
            Err(format!("{field} = {value}: {why}"))
        }
        if !(self.percentile > 0.0 && self.percentile <= 100.0) {
            return bad("percentile", self.percentile, "must be in (0, 100]");
        }
        if !(0.0..=10.0).contains(&self.margin) {
            return bad("margin", self.margin, "must be between 0 and 10");
        }
        if !(0.0..=10.0).contains(&self.low_confidence_margin) {
            return bad(
                "low_confidence_margin",
                self.low_confidence_margin,
                "must be between 0 and 10",
            );
        }
        if !(self.high_fraction > 0.0 && self.high_fraction <= 1.0) {
            return bad("high_fraction", self.high_fraction, "must be in (0, 1]");
        }
        if self.half_life.is_zero() {
            return bad("half_life", format!("{:?}", self.half_life), "must be > 0");
        }
        if !(self.confidence_samples > 0.0 && self.confidence_samples.is_finite()) {
            return bad(
                "confidence_samples",
                self.confidence_samples,
                "must be finite and > 0",
            );
        }
        for (field, v) in [
            ("floor_bytes", Some(self.floor_bytes)),
            ("ceiling_bytes", self.ceiling_bytes),
            ("pin_max_bytes", self.pin_max_bytes),
            ("pin_high_bytes", self.pin_high_bytes),
        ] {
            if let Some(v) = v {
                if v < PAGE_BYTES {
                    return bad(field, v, "must be at least 4096 (one page)");
                }
            }
        }
        if let Some(c) = self.ceiling_bytes {
            if self.floor_bytes > c {
                return bad(
                    "floor_bytes",
                    self.floor_bytes,
                    &format!("must not exceed ceiling_bytes ({c})"),
                );
            }
        }
        if let (Some(h), Some(m)) = (self.pin_high_bytes, self.pin_max_bytes) {
            if h > m {
                return bad(
                    "pin_high_bytes",
                    h,
                    &format!("must not exceed pin_max_bytes ({m})"),
                );
            }
        }
        Ok(())
    }
}

/// The recommendation and the inputs behind it (served as JSON by
/// GET /v1/functions/{name}/recommendation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recommendation {
    pub function: String,
    /// memory.max (v2) / memory.limit_in_bytes (v1).
    pub max_bytes: u64,
    /// memory.high (v2) / memory.soft_limit_in_bytes (v1); below `max_bytes` unless pinned.
    pub high_bytes: u64,
    /// 0..=1: `min(1, effective_samples / confidence_samples)`.
    pub confidence: f64,
    /// Instances considered.
    pub samples: u64,
    /// Sum of the samples' weights relative to `computed_at_ms`.
    pub effective_samples: f64,
    /// The policy's percentile, in percent.
    pub percentile: f64,
    /// The histogram's `percentile` (a bucket upper edge); 0 without samples.
    pub percentile_bytes: u64,
    /// The histogram's median (a bucket upper edge); 0 without samples.
    pub p50_bytes: u64,
    pub margin: f64,
    /// OOM-killed instances considered.
    pub oom_kills: u64,
    /// When a recent OOM raised `max_bytes` above `percentile_bytes · (1 + margin)`: the
    /// bumped value it was raised to.
    pub oom_bump_bytes: Option<u64>,
    /// A pin set `max_bytes` or `high_bytes`.
    pub pinned: bool,
    /// "floor" | "ceiling" | "host_memory": the last bound that changed `max_bytes`.
    #[schema(value_type = Option<String>)]
    pub clamped_by: Option<ClampedBy>,
    /// Set when the function had no history: the host's prior (`[policy.prior]`) the limits
    /// started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_bytes: Option<u64>,
    /// Samples from the other hosts (`[fleet]`) in the histogram besides this host's
    /// `samples`: 0 when the fleet knows nothing of the function (or fleet learning is off).
    #[serde(default)]
    pub fleet_samples: f64,
    pub half_life_hours: f64,
    pub computed_at_ms: u64,
}

/// VPA's OOM rule: `max(x + 100 MiB, x · 1.2)`.
pub fn oom_bump(x: u64) -> u64 {
    x.saturating_add(OOM_BUMP_MIN_BYTES)
        .max(f64_to_bytes(x as f64 * OOM_BUMP_RATIO))
}

/// A sample's weight relative to `ref_ms`: `2^((at_ms - ref_ms) / half_life)`. A zero
/// half-life means no memory at all: 1 at or after `ref_ms`, 0 before.
pub fn decay_weight(at_ms: u64, ref_ms: u64, half_life: Duration) -> f64 {
    let half_life_ms = half_life.as_secs_f64() * 1000.0;
    if half_life_ms <= 0.0 {
        return if at_ms >= ref_ms { 1.0 } else { 0.0 };
    }
    ((at_ms as f64 - ref_ms as f64) / half_life_ms).exp2()
}

/// Rounds up to a multiple of [`PAGE_BYTES`] (saturating at the largest one).
pub fn page_up(bytes: u64) -> u64 {
    bytes
        .div_ceil(PAGE_BYTES)
        .checked_mul(PAGE_BYTES)
        .unwrap_or(u64::MAX - (PAGE_BYTES - 1))
}

/// Rounds down to a multiple of [`PAGE_BYTES`].
pub fn page_down(bytes: u64) -> u64 {
    bytes - bytes % PAGE_BYTES
}

/// Ceil of a non-negative float as bytes; NaN and negatives give 0, overflow saturates.
fn f64_to_bytes(x: f64) -> u64 {
    // `as` saturates and maps NaN to 0.
    x.ceil() as u64
}

/// Upper edges of the histogram buckets, ascending; bucket `i` holds `[edge(i-1), edge(i))`.
fn bucket_edges() -> &'static [u64] {
    static EDGES: OnceLock<Vec<u64>> = OnceLock::new();
    EDGES.get_or_init(|| {
        // Bucket i spans FIRST · 1.05^i: its upper edge is FIRST · (1.05^(i+1) - 1) / 0.05.
        let mut edges = Vec::with_capacity(256);
        let mut i = 1;
        loop {
            let growth = (1.0 + BUCKET_GROWTH).powi(i);
            let upper = (FIRST_BUCKET_BYTES as f64 * (growth - 1.0) / BUCKET_GROWTH).round() as u64;
            edges.push(upper);
            if upper >= MAX_TRACKED_BYTES {
                break edges;
            }
            i += 1;
        }
    })
}

/// A histogram of byte values with exponentially growing buckets and real-valued (decayed)
/// weights, after VPA's `DecayingHistogram`. The caller computes the weights (see
/// [`decay_weight`]); the histogram only adds them up.
#[derive(Debug, Clone, PartialEq)]
pub struct DecayingHistogram {
    weights: Vec<f64>,
    total: f64,
}

impl Default for DecayingHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl DecayingHistogram {
    pub fn new() -> Self {
        DecayingHistogram {
            weights: vec![0.0; bucket_edges().len()],
            total: 0.0,
        }
    }

    /// Number of buckets (the first ends at 1 MiB, the last at or above 1 TiB).
    pub fn bucket_count() -> usize {
        bucket_edges().len()
    }

    /// Upper edge of bucket `index` (clamped to the last bucket).
    pub fn bucket_upper_edge(index: usize) -> u64 {
        let edges = bucket_edges();
        edges[index.min(edges.len() - 1)]
    }

    /// Bucket of `value`: the first whose upper edge is above it; values beyond the last edge
    /// go to the last bucket.
    pub fn bucket_of(value: u64) -> usize {
        let edges = bucket_edges();
        edges
            .partition_point(|&edge| edge <= value)
            .min(edges.len() - 1)
    }

    /// Adds `weight` to `value`'s bucket; weights that are not finite and positive (including
    /// ones that underflowed to 0) are ignored.
    pub fn add(&mut self, value: u64, weight: f64) {
        if !(weight > 0.0 && weight.is_finite()) {
            return;
        }
        self.weights[Self::bucket_of(value)] += weight;
        self.total += weight;
    }

    pub fn total_weight(&self) -> f64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total <= 0.0
    }

    /// The upper edge of the first bucket where the cumulative weight reaches `p` percent of
    /// the total (`p` is clamped to [0, 100]; NaN counts as 100). `p = 0` gives the lowest
    /// non-empty bucket, `p = 100` the highest. An empty histogram gives 0.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        let threshold = self.total * p / 100.0;
        let mut sum = 0.0;
        let mut highest = 0;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                sum += w;
                highest = i;
                if sum >= threshold {
                    return Self::bucket_upper_edge(i);
                }
            }
        }
        // Rounding left the running sum a hair below the threshold (p near 100).
        Self::bucket_upper_edge(highest)
    }
}

/// The value a sample contributes: its peak, or for an OOM-killed instance (whose peak is cut
/// off at its limit) VPA's bump of `max(limit, peak)`.
pub fn sample_value(s: &Sample) -> u64 {
    if s.oom_killed {
        oom_bump(s.limit_bytes.unwrap_or(0).max(s.peak_bytes))
    } else {
        s.peak_bytes
    }
}

/// Recommends limits for `function` from its instances' `samples` (any order). `params` should
/// have passed [`PolicyParams::validate`]; out-of-range values are not rejected here but give
/// well-defined results (e.g. a NaN margin counts as a zero-size limit, which the floor lifts).
/// `host_memory_bytes` is the host's RAM (0 = unknown: no host clamp). Returns `None` when there
/// are no samples and nothing is pinned.
///
/// The rule is a chain of named steps (after VPA's estimator wrappers), composed here and
/// nowhere else: the base estimate from the history, then each [`Step`] in the module doc's
/// order.
pub fn recommend(
    function: &str,
    samples: &[Sample],
    params: &PolicyParams,
    now_ms: u64,
    host_memory_bytes: u64,
) -> Option<Recommendation> {
    recommend_blended(function, samples, None, params, now_ms, host_memory_bytes)
}

/// [`recommend`] over this host's samples and, where the fleet knows the function, the other
/// hosts' peaks (`[fleet]`): each fleet sample enters the histogram at its bucket's upper bound
/// with the weight of a fresh local sample, so the percentile and the confidence come from both
/// by sample counts. A function this host has never run gets fleet-informed limits from its
/// first instance. Returns `None` with neither samples nor fleet peaks nor pins.
pub fn recommend_blended(
    function: &str,
    samples: &[Sample],
    fleet: Option<&FleetPeaks>,
    params: &PolicyParams,
    now_ms: u64,
    host_memory_bytes: u64,
) -> Option<Recommendation> {
    let fleet = fleet.filter(|f| !f.is_empty());
    if samples.is_empty()
        && fleet.is_none()
        && params.pin_max_bytes.is_none()
        && params.pin_high_bytes.is_none()
    {
        return None;
    }
    let mut history = History::of(samples, now_ms, params.half_life);
    let fleet_samples = fleet.map_or(0.0, |f| history.add_fleet(f));
    let confidence = history.confidence(params.confidence_samples);
    let margin = margin_for(params, confidence);
    let percentile_bytes = history.histogram.percentile(params.percentile);
    let p50_bytes = history.histogram.percentile(50.0);
    let base = Estimate::percentile_with_margin(
        percentile_bytes,
        margin,
        samples.is_empty() && fleet.is_none(),
    );
    let estimate = chain(
        base,
        history.recent_oom_bytes,
        p50_bytes,
        params,
        host_memory_bytes,
    );
    Some(Recommendation {
        function: function.to_string(),
        max_bytes: estimate.max_bytes,
        high_bytes: estimate.high_bytes,
        confidence,
        samples: samples.len() as u64,
        effective_samples: history.effective_samples,
        percentile: params.percentile,
        percentile_bytes,
        p50_bytes,
        margin,
        oom_kills: history.oom_kills,
        oom_bump_bytes: estimate.oom_bump_bytes,
        pinned: params.pin_max_bytes.is_some() || params.pin_high_bytes.is_some(),
        clamped_by: estimate.clamped_by,
        prior_bytes: None,
        fleet_samples,
        half_life_hours: params.half_life.as_secs_f64() / 3600.0,
        computed_at_ms: now_ms,
    })
}

/// The limits of a function with no history of its own, from the host's prior
/// (`prior::PriorConfig::max_bytes`) as the base estimate, through the same steps as
/// [`recommend`] (a function with pins has a recommendation and needs no prior).
pub fn recommend_from_prior(
    function: &str,
    prior_bytes: u64,
    params: &PolicyParams,
    now_ms: u64,
    host_memory_bytes: u64,
) -> Recommendation {
    let base = Estimate {
        max_bytes: prior_bytes,
        ..Estimate::default()
    };
    let estimate = chain(base, None, 0, params, host_memory_bytes);
    Recommendation {
        function: function.to_string(),
        max_bytes: estimate.max_bytes,
        high_bytes: estimate.high_bytes,
        confidence: 0.0,
        samples: 0,
        effective_samples: 0.0,
        percentile: params.percentile,
        percentile_bytes: 0,
        p50_bytes: 0,
        margin: 0.0,
        oom_kills: 0,
        oom_bump_bytes: None,
        pinned: params.pin_max_bytes.is_some() || params.pin_high_bytes.is_some(),
        clamped_by: estimate.clamped_by,
        prior_bytes: Some(prior_bytes),
        fleet_samples: 0.0,
        half_life_hours: params.half_life.as_secs_f64() / 3600.0,
        computed_at_ms: now_ms,
    }
}

/// Steps 3 to 6 over a base estimate, composed here and nowhere else.
fn chain(
    base: Estimate,
    recent_oom_bytes: Option<u64>,
    p50_bytes: u64,
    params: &PolicyParams,
    host_memory_bytes: u64,
) -> Estimate {
    let host = WithHostMemory::of(host_memory_bytes);
    let steps: [&dyn Step; 6] = [
        &WithOomAtOnce { recent_oom_bytes },
        &WithFloor {
            bytes: params.floor_bytes,
        },
        &WithCeiling {
            bytes: params.ceiling_bytes,
        },
        &host,
        &WithPinnedMax {
            pin: params.pin_max_bytes,
            host,
        },
        &WithHigh {
            pin: params.pin_high_bytes,
            max_pinned: params.pin_max_bytes.is_some(),
            fraction: params.high_fraction,
            p50_bytes,
            host,
        },
    ];
    steps
        .iter()
        .fold(base, |estimate, step| step.apply(estimate))
}

/// Step 1: the samples as a decayed histogram (relative to the newest sample), and the OOM
/// kills among them.
#[derive(Debug, Clone)]
pub struct History {
    pub histogram: DecayingHistogram,
    /// The histogram's total weight relative to `now` (what the confidence grows with).
    pub effective_samples: f64,
    pub oom_kills: u64,
    /// The bumped value of the most recent OOM kill younger than one half-life (among
    /// equally recent ones, the larger bump).
    pub recent_oom_bytes: Option<u64>,
    /// The histogram weight of a sample taken now (1 without samples): the histogram's weights
    /// are relative to its newest sample, so a fresh sample from elsewhere weighs this much.
    pub now_weight: f64,
}

impl History {
    pub fn of(samples: &[Sample], now_ms: u64, half_life: Duration) -> Self {
        let half_life_ms = half_life.as_secs_f64() * 1000.0;
        let ref_ms = samples.iter().map(|s| s.at_ms.min(now_ms)).max();
        let mut histogram = DecayingHistogram::new();
        let mut oom_kills = 0;
        let mut recent_oom: Option<(u64, u64)> = None; // (at_ms, bumped value)
        for s in samples {
            let at_ms = s.at_ms.min(now_ms);
            let value = sample_value(s);
            histogram.add(
                value,
                decay_weight(at_ms, ref_ms.unwrap_or(now_ms), half_life),
            );
            if s.oom_killed {
                oom_kills += 1;
                let young = ((now_ms - at_ms) as f64) < half_life_ms;
                // Most recent first; among equally recent ones, the larger bump.
                if young && recent_oom.is_none_or(|r| (at_ms, value) > r) {
                    recent_oom = Some((at_ms, value));
                }
            }
        }
        let effective_samples = match ref_ms {
            Some(r) => histogram.total_weight() * decay_weight(r, now_ms, half_life),
            None => 0.0,
        };
        // Capped: a history many half-lives old would overflow it; by then it counts for
        // nothing beside a fresh sample anyway.
        let now_weight = ref_ms.map_or(1.0, |r| decay_weight(now_ms, r, half_life).min(1e12));
        History {
            histogram,
            effective_samples,
            oom_kills,
            recent_oom_bytes: recent_oom.map(|(_, bumped)| bumped),
            now_weight,
        }
    }

    /// Adds the other hosts' peaks, each bucket at its upper bound with the weight of a fresh
    /// sample (counted in `effective_samples`); returns how many.
    /// An OOM kill on another host younger than one half-life lifts this host's limit at once
    /// too (the larger bump wins), so a function is not killed once per host.
    pub fn add_fleet(&mut self, fleet: &FleetPeaks) -> f64 {
        for &(bytes, count) in &fleet.buckets {
            self.histogram.add(bytes, count * self.now_weight);
        }
        self.effective_samples += fleet.count;
        self.recent_oom_bytes = self.recent_oom_bytes.max(fleet.recent_oom_bytes);
        fleet.count
    }

    /// Nothing in the histogram: no local samples, no fleet ones.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// 0..=1: `min(1, effective_samples / confidence_samples)`; 0 when undefined.
    pub fn confidence(&self, confidence_samples: f64) -> f64 {
        let confidence = (self.effective_samples / confidence_samples).clamp(0.0, 1.0);
        if confidence.is_nan() {
            0.0
        } else {
            confidence
        }
    }
}

/// The margin in force: thin history widens it, as the next peak can beat the few seen so
/// far by more than the margin.
pub fn margin_for(params: &PolicyParams, confidence: f64) -> f64 {
    params.margin + params.low_confidence_margin * (1.0 - confidence)
}

/// The recommendation as the chain carries it from step to step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Estimate {
    pub max_bytes: u64,
    /// 0 until [`WithHigh`] sets it.
    pub high_bytes: u64,
    /// The last bound that changed `max_bytes`.
    pub clamped_by: Option<ClampedBy>,
    /// Set when a recent OOM lifted `max_bytes` above the percentile with its margin.
    pub oom_bump_bytes: Option<u64>,
}

impl Estimate {
    /// Step 2, the base estimate: `percentile_bytes · (1 + margin)`, page-rounded up; 0
    /// without samples (the floor or a pin lifts it).
    pub fn percentile_with_margin(percentile_bytes: u64, margin: f64, no_samples: bool) -> Self {
        let max_bytes = if no_samples {
            0
        } else {
            page_up(f64_to_bytes(percentile_bytes as f64 * (1.0 + margin)))
        };
        Estimate {
            max_bytes,
            ..Estimate::default()
        }
    }
}

/// One step of the rule: the estimate so far in, the estimate changed by this step out.
pub trait Step {
    fn apply(&self, estimate: Estimate) -> Estimate;
}

/// Step 3: a recent OOM kill lifts `max_bytes` to at least its bumped value at once.
#[derive(Debug, Clone, Copy)]
pub struct WithOomAtOnce {
    pub recent_oom_bytes: Option<u64>,
}

impl Step for WithOomAtOnce {
    fn apply(&self, mut estimate: Estimate) -> Estimate {
        if let Some(bumped) = self.recent_oom_bytes.map(page_up) {
            if bumped > estimate.max_bytes {
                estimate.max_bytes = bumped;
                estimate.oom_bump_bytes = Some(bumped);
            }
        }
        estimate
    }
}

/// Step 4a: `max_bytes` at least the floor (page-rounded up).
#[derive(Debug, Clone, Copy)]
pub struct WithFloor {
    pub bytes: u64,
}

impl Step for WithFloor {
    fn apply(&self, mut estimate: Estimate) -> Estimate {
        let floor = page_up(self.bytes);
        if estimate.max_bytes < floor {
            estimate.max_bytes = floor;
            estimate.clamped_by = Some(ClampedBy::Floor);
        }
        estimate
    }
}

/// Step 4b: `max_bytes` at most the ceiling (page-rounded down, at least one page).
#[derive(Debug, Clone, Copy)]
pub struct WithCeiling {
    pub bytes: Option<u64>,
}

impl Step for WithCeiling {
    fn apply(&self, mut estimate: Estimate) -> Estimate {
        if let Some(ceiling) = self.bytes {
            let ceiling = page_down(ceiling).max(PAGE_BYTES);
            if estimate.max_bytes > ceiling {
                estimate.max_bytes = ceiling;
                estimate.clamped_by = Some(ClampedBy::Ceiling);
            }
        }
        estimate
    }
}

/// Step 4c: `max_bytes` at most host memory (page-rounded down); no cap when it is unknown.
#[derive(Debug, Clone, Copy)]
pub struct WithHostMemory {
    pub cap: Option<u64>,
}

impl WithHostMemory {
    /// `host_memory_bytes` 0: unknown.
    pub fn of(host_memory_bytes: u64) -> Self {
        WithHostMemory {
            cap: (host_memory_bytes > 0).then(|| page_down(host_memory_bytes).max(PAGE_BYTES)),
        }
    }

    /// `bytes` capped, and whether the cap changed it.
    fn clamp(&self, bytes: u64) -> (u64, bool) {
        match self.cap {
            Some(cap) if bytes > cap => (cap, true),
            _ => (bytes, false),
        }
    }
}

impl Step for WithHostMemory {
    fn apply(&self, mut estimate: Estimate) -> Estimate {
        let (max_bytes, clamped) = self.clamp(estimate.max_bytes);
        if clamped {
            estimate.max_bytes = max_bytes;
            estimate.clamped_by = Some(ClampedBy::HostMemory);
        }
        estimate
    }
}

/// Step 6 for memory.max: a pinned max replaces everything before it, except the host cap.
#[derive(Debug, Clone, Copy)]
pub struct WithPinnedMax {
    pub pin: Option<u64>,
    pub host: WithHostMemory,
}

impl Step for WithPinnedMax {
    fn apply(&self, estimate: Estimate) -> Estimate {
        let Some(pin) = self.pin else {
            return estimate;
        };
        self.host.apply(Estimate {
            max_bytes: pin,
            clamped_by: None,
            oom_bump_bytes: None,
            ..estimate
        })
    }
}

/// Steps 5 and 6 for memory.high: `max(max_bytes · fraction, p50_bytes)`, strictly below
/// `max_bytes`; or the pin (host-capped), which lifts an unpinned max to itself.
#[derive(Debug, Clone, Copy)]
pub struct WithHigh {
    pub pin: Option<u64>,
    pub max_pinned: bool,
    pub fraction: f64,
    pub p50_bytes: u64,
    pub host: WithHostMemory,
}

impl Step for WithHigh {
    fn apply(&self, mut estimate: Estimate) -> Estimate {
        if let Some(pin) = self.pin {
            let (high, _) = self.host.clamp(pin);
            // A kill below the user's throttle point would make the pin meaningless: an
            // unpinned max is lifted to it.
            if !self.max_pinned && estimate.max_bytes < high {
                estimate.max_bytes = high;
                estimate.clamped_by = None;
                estimate.oom_bump_bytes = None;
            }
            estimate.high_bytes = high;
            return estimate;
        }
        let max_bytes = estimate.max_bytes;
        let high = page_up(f64_to_bytes(max_bytes as f64 * self.fraction).max(self.p50_bytes));
        estimate.high_bytes = if high < max_bytes {
            high
        } else {
            // Strictly below max; a one-page max has no room below it.
            match page_down(max_bytes - 1) {
                0 => max_bytes,
                below => below,
            }
        };
        estimate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;
    const DAY_MS: u64 = 24 * HOUR_MS;
    const GIB: u64 = 1 << 30;
    /// A "now" far enough from 0 that samples days old do not underflow the u64 clock.
    const NOW: u64 = 1_700_000_000_000;

    fn peak(at_ms: u64, peak_bytes: u64) -> Sample {
        Sample {
            at_ms,
            peak_bytes,
            oom_killed: false,
            limit_bytes: None,
        }
    }

    fn oom(at_ms: u64, peak_bytes: u64, limit_bytes: Option<u64>) -> Sample {
        Sample {
            at_ms,
            peak_bytes,
            oom_killed: true,
            limit_bytes,
        }
    }

    /// `n` samples spread evenly over `center ± spread` (a fraction), one a minute up to `at_ms`.
    fn spread(n: u64, center: u64, spread: f64, at_ms: u64) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let x = if n == 1 {
                    0.0
                } else {
                    2.0 * i as f64 / (n - 1) as f64 - 1.0
                };
                peak(
                    at_ms - (n - 1 - i) * 60_000,
                    (center as f64 * (1.0 + spread * x)) as u64,
                )
            })
            .collect()
    }

    #[test]
    fn fleet_peaks_alone_give_a_first_instance_its_limits() {
        let params = PolicyParams::default();
        let mib = 1u64 << 20;
        let fleet = FleetPeaks::of_values((0..30).map(|i| (100 + i) * mib));
        let r = recommend_blended("f", &[], Some(&fleet), &params, NOW, 0).unwrap();
        assert_eq!(r.samples, 0);
        assert_eq!(r.fleet_samples, 30.0);
        // The same rule as local samples at the fleet's values: P50 of the bucket bounds.
        let local: Vec<Sample> = fleet
            .buckets
            .iter()
            .flat_map(|&(v, n)| (0..n as u64).map(move |_| peak(NOW, v)))
            .collect();
        let same = recommend("f", &local, &params, NOW, 0).unwrap();
        assert_eq!(
            (r.max_bytes, r.high_bytes),
            (same.max_bytes, same.high_bytes)
        );
        assert_eq!(r.confidence, same.confidence);
        // Nothing at all: no recommendation.
        assert!(
            recommend_blended("f", &[], Some(&FleetPeaks::default()), &params, NOW, 0).is_none()
        );
    }

    #[test]
    fn an_oom_kill_on_another_host_lifts_this_hosts_limit_at_once() {
        let params = PolicyParams::default();
        let mib = 1u64 << 20;
        let local: Vec<Sample> = (0..30).map(|i| peak(NOW - i * 60_000, 100 * mib)).collect();
        let mut fleet = FleetPeaks::of_values((0..30).map(|_| 100 * mib));
        let calm = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        fleet.recent_oom_bytes = Some(oom_bump(300 * mib));
        let r = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        assert!(calm.max_bytes < 130 * mib, "{calm:?}");
        assert_eq!(r.max_bytes, page_up(oom_bump(300 * mib)), "{r:?}");
        assert_eq!(r.oom_bump_bytes, Some(page_up(oom_bump(300 * mib))));
    }

    #[test]
    fn a_fleet_sample_weighs_what_a_fresh_local_one_weighs() {
        let params = PolicyParams::default();
        let mib = 1u64 << 20;
        let day = 86_400_000;
        // 100 local samples 5 half-lives old (effective ~3) against 30 fresh fleet ones: the
        // fleet's peaks are the median.
        let local: Vec<Sample> = (0..100)
            .map(|i| peak(NOW - 5 * day - i, 100 * mib))
            .collect();
        let fleet = FleetPeaks::of_values((0..30).map(|_| 300 * mib));
        let r = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        assert!(r.p50_bytes >= 300 * mib, "{r:?}");
        // The same 100 fresh: theirs.
        let local: Vec<Sample> = (0..100).map(|i| peak(NOW - i, 100 * mib)).collect();
        let r = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        assert!(r.p50_bytes < 110 * mib, "{r:?}");
    }

    #[test]
    fn fleet_and_local_samples_blend_by_counts() {
        let params = PolicyParams::default();
        let mib = 1u64 << 20;
        // 3 local samples at 100 MiB, 30 fleet ones at 200 MiB: the median is the fleet's.
        let local: Vec<Sample> = (0..3).map(|i| peak(NOW - i * 60_000, 100 * mib)).collect();
        let fleet = FleetPeaks::of_values((0..30).map(|_| 200 * mib));
        let r = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        let alone = recommend("f", &local, &params, NOW, 0).unwrap();
        assert!(
            r.p50_bytes >= 200 * mib && alone.p50_bytes < 110 * mib,
            "{r:?}"
        );
        assert_eq!((r.samples, r.fleet_samples), (3, 30.0));
        assert!(r.confidence > alone.confidence);
        assert_eq!(alone.fleet_samples, 0.0);
        // 30 local ones and 3 fleet ones: the local median.
        let local: Vec<Sample> = (0..30).map(|i| peak(NOW - i * 60_000, 100 * mib)).collect();
        let fleet = FleetPeaks::of_values((0..3).map(|_| 200 * mib));
        let r = recommend_blended("f", &local, Some(&fleet), &params, NOW, 0).unwrap();
        assert!(r.p50_bytes < 110 * mib, "{r:?}");
    }

    /// The defaults before the burst guard was on by default: what tests of the tail use.
    fn p95() -> PolicyParams {
        PolicyParams {
            percentile: 95.0,
            margin: 0.15,
            low_confidence_margin: 0.25,
            ..PolicyParams::default()
        }
    }

    fn rec(samples: &[Sample], params: &PolicyParams) -> Recommendation {
        recommend("f", samples, params, NOW, 0).expect("a recommendation")
    }

    // ---- histogram ----

    #[test]
    fn bucket_edges_grow_five_percent() {
        let n = DecayingHistogram::bucket_count();
        assert_eq!(DecayingHistogram::bucket_upper_edge(0), MIB);
        assert!(DecayingHistogram::bucket_upper_edge(n - 1) >= MAX_TRACKED_BYTES);
        assert!(DecayingHistogram::bucket_upper_edge(n - 2) < MAX_TRACKED_BYTES);
        assert!((200..260).contains(&n), "{n} buckets");
        let mut prev_lo = 0u64;
        let mut prev_width = 0u64;
        for i in 0..n {
            let hi = DecayingHistogram::bucket_upper_edge(i);
            let width = hi - prev_lo;
            if i > 0 {
                let ratio = width as f64 / prev_width as f64;
                assert!((ratio - 1.05).abs() < 1e-3, "bucket {i}: ratio {ratio}");
            }
            prev_lo = hi;
            prev_width = width;
        }
        assert_eq!(DecayingHistogram::bucket_upper_edge(usize::MAX), prev_lo);
    }

    #[test]
    fn bucket_of_is_consistent_with_edges() {
        for v in [
            0,
            1,
            MIB - 1,
            MIB,
            MIB + 1,
            80 * MIB,
            3 * GIB,
            1 << 40,
            u64::MAX,
        ] {
            let b = DecayingHistogram::bucket_of(v);
            let hi = DecayingHistogram::bucket_upper_edge(b);
            if b + 1 < DecayingHistogram::bucket_count() {
                assert!(v < hi, "{v} in bucket {b} with upper edge {hi}");
            }
            if b > 0 {
                assert!(v >= DecayingHistogram::bucket_upper_edge(b - 1));
            }
        }
        assert_eq!(DecayingHistogram::bucket_of(0), 0);
        assert_eq!(DecayingHistogram::bucket_of(MIB - 1), 0);
        assert_eq!(DecayingHistogram::bucket_of(MIB), 1);
        assert_eq!(
            DecayingHistogram::bucket_of(u64::MAX),
            DecayingHistogram::bucket_count() - 1
        );
    }

    #[test]
    fn empty_histogram() {
        let mut h = DecayingHistogram::new();
        assert!(h.is_empty());
        assert_eq!(h.percentile(50.0), 0);
        // Weights that are not positive and finite are ignored.
        h.add(10 * MIB, 0.0);
        h.add(10 * MIB, -1.0);
        h.add(10 * MIB, f64::NAN);
        h.add(10 * MIB, f64::INFINITY);
        h.add(10 * MIB, 2f64.powi(-2000)); // underflows to 0
        assert!(h.is_empty());
        assert_eq!(h.total_weight(), 0.0);
        assert_eq!(h.percentile(100.0), 0);
    }

    #[test]
    fn single_sample_gives_its_bucket_upper_edge() {
        let v = 80 * MIB;
        let mut h = DecayingHistogram::new();
        h.add(v, 0.25);
        let edge = DecayingHistogram::bucket_upper_edge(DecayingHistogram::bucket_of(v));
        assert!(edge > v && (edge as f64) < v as f64 * 1.06, "edge {edge}");
        for p in [0.0, 1.0, 50.0, 95.0, 100.0, f64::NAN, -5.0, 150.0] {
            assert_eq!(h.percentile(p), edge, "p = {p}");
        }
        assert_eq!(h.total_weight(), 0.25);
    }

    #[test]
    fn all_weight_in_one_bucket() {
        let mut h = DecayingHistogram::new();
        let lo = DecayingHistogram::bucket_upper_edge(99);
        let hi = DecayingHistogram::bucket_upper_edge(100);
        for i in 0..1000 {
            h.add(lo + (hi - lo - 1) * i / 999, 1.0);
        }
        assert_eq!(h.percentile(0.0), hi);
        assert_eq!(h.percentile(0.1), hi);
        assert_eq!(h.percentile(100.0), hi);
        assert_eq!(h.total_weight(), 1000.0);
    }

    #[test]
    fn percentile_walks_cumulative_weight() {
        let mut h = DecayingHistogram::new();
        let (a, b, c) = (10 * MIB, 100 * MIB, GIB);
        h.add(a, 1.0);
        h.add(b, 2.0);
        h.add(c, 1.0);
        let edge = |v| DecayingHistogram::bucket_upper_edge(DecayingHistogram::bucket_of(v));
        assert_eq!(h.percentile(0.0), edge(a));
        assert_eq!(h.percentile(25.0), edge(a));
        assert_eq!(h.percentile(25.1), edge(b));
        assert_eq!(h.percentile(75.0), edge(b));
        assert_eq!(h.percentile(75.1), edge(c));
        assert_eq!(h.percentile(100.0), edge(c));
    }

    #[test]
    fn percentile_100_survives_rounding() {
        // Many tiny weights: the bucket-by-bucket sum need not equal the running total.
        let mut h = DecayingHistogram::new();
        for i in 0..10_000u64 {
            h.add(MIB + i * 37 * 1024, 0.1 + (i % 7) as f64 * 1e-9);
        }
        h.add(5 * GIB, 1e-3);
        let top = DecayingHistogram::bucket_upper_edge(DecayingHistogram::bucket_of(5 * GIB));
        assert_eq!(h.percentile(100.0), top);
        assert!(h.percentile(99.999) < top);
    }

    #[test]
    fn values_beyond_one_tib_land_in_the_last_bucket() {
        let mut h = DecayingHistogram::new();
        h.add(4 << 40, 1.0);
        assert_eq!(
            h.percentile(50.0),
            DecayingHistogram::bucket_upper_edge(usize::MAX)
        );
    }

    #[test]
    fn decay_weight_halves_per_half_life() {
        let hl = Duration::from_secs(24 * 3600);
        assert_eq!(decay_weight(NOW, NOW, hl), 1.0);
        assert_eq!(decay_weight(NOW - DAY_MS, NOW, hl), 0.5);
        assert_eq!(decay_weight(NOW - 3 * DAY_MS, NOW, hl), 0.125);
        assert_eq!(decay_weight(NOW + DAY_MS, NOW, hl), 2.0);
        assert_eq!(decay_weight(0, NOW, hl), 0.0); // ~54 years: underflows
        assert_eq!(decay_weight(NOW - 1, NOW, Duration::ZERO), 0.0);
        assert_eq!(decay_weight(NOW, NOW, Duration::ZERO), 1.0);
    }

    #[test]
    fn oom_bump_is_vpa_rule() {
        assert_eq!(oom_bump(64 * MIB), 164 * MIB);
        assert_eq!(oom_bump(0), 100 * MIB);
        assert_eq!(oom_bump(GIB), (GIB as f64 * 1.2).ceil() as u64);
        assert_eq!(oom_bump(500 * MIB), 600 * MIB); // both rules agree at 500 MiB
        assert_eq!(oom_bump(u64::MAX), u64::MAX);
    }

    #[test]
    fn page_rounding() {
        assert_eq!(page_up(0), 0);
        assert_eq!(page_up(1), 4096);
        assert_eq!(page_up(4096), 4096);
        assert_eq!(page_up(4097), 8192);
        assert_eq!(page_up(u64::MAX), u64::MAX - 4095);
        assert_eq!(page_down(4095), 0);
        assert_eq!(page_down(8191), 4096);
    }

    // ---- recommend ----

    #[test]
    fn empty_gives_none() {
        assert_eq!(
            recommend("f", &[], &PolicyParams::default(), NOW, GIB),
            None
        );
    }

    /// The prior goes through the same steps: the floor lifts it, the host clamps it, high
    /// is below max; the recommendation says it came from the prior.
    #[test]
    fn a_prior_is_a_base_estimate_through_the_same_steps() {
        let d = PolicyParams::default();
        let r = recommend_from_prior("f", 100 * MIB, &d, NOW, GIB);
        assert_eq!((r.max_bytes, r.prior_bytes), (100 * MIB, Some(100 * MIB)));
        assert_eq!(
            r.high_bytes,
            page_up((100.0 * MIB as f64 * 0.9).ceil() as u64)
        );
        assert_eq!(r.clamped_by, None);
        let r = recommend_from_prior("f", MIB, &d, NOW, GIB);
        assert_eq!(
            (r.max_bytes, r.clamped_by),
            (16 * MIB, Some(ClampedBy::Floor))
        );
        let r = recommend_from_prior("f", 2 * GIB, &d, NOW, GIB);
        assert_eq!(
            (r.max_bytes, r.clamped_by),
            (GIB, Some(ClampedBy::HostMemory))
        );
    }

    #[test]
    fn known_peaks() {
        let samples = spread(50, 80 * MIB, 0.02, NOW);
        let top = samples.iter().map(|s| s.peak_bytes).max().unwrap();
        let r = rec(&samples, &PolicyParams::default());
        assert!(
            r.max_bytes >= top && r.max_bytes as f64 <= 80.0 * MIB as f64 * 1.25,
            "max {} MiB",
            r.max_bytes as f64 / MIB as f64
        );
        assert!(r.high_bytes < r.max_bytes);
        assert!(r.high_bytes >= r.p50_bytes);
        assert!(r.p50_bytes >= 80 * MIB && r.p50_bytes <= r.percentile_bytes);
        assert_eq!(r.max_bytes % PAGE_BYTES, 0);
        assert_eq!(r.high_bytes % PAGE_BYTES, 0);
        // Every number is explainable from the others.
        assert_eq!(
            r.max_bytes,
            page_up((r.percentile_bytes as f64 * 1.1).ceil() as u64)
        );
        assert_eq!(
            r.high_bytes,
            page_up(((r.max_bytes as f64 * 0.9).ceil() as u64).max(r.p50_bytes))
        );
        assert_eq!(r.samples, 50);
        assert_eq!(r.oom_kills, 0);
        assert_eq!(r.oom_bump_bytes, None);
        assert_eq!(r.clamped_by, None);
        assert!(!r.pinned);
        assert_eq!(r.percentile, 50.0);
        assert_eq!(r.margin, 0.1);
        assert_eq!(r.half_life_hours, 24.0);
        assert_eq!(r.computed_at_ms, NOW);
        assert_eq!(r.function, "f");
    }

    #[test]
    fn percentile_is_respected() {
        // 90 instances at 50 MiB, 10 at 200 MiB, all now (no decay): P90 sees only the small
        // ones, P95 the big.
        let mut samples: Vec<Sample> = (0..90).map(|_| peak(NOW, 50 * MIB)).collect();
        samples.extend((0..10).map(|_| peak(NOW, 200 * MIB)));
        let p90 = rec(
            &samples,
            &PolicyParams {
                percentile: 90.0,
                ..Default::default()
            },
        );
        assert!(p90.max_bytes < 70 * MIB, "{}", p90.max_bytes);
        let p95 = rec(&samples, &p95());
        assert!(p95.max_bytes > 200 * MIB);
        // P50 sits on the small ones: high = 0.9 · max.
        assert!(p95.p50_bytes < 55 * MIB);
    }

    #[test]
    fn decay_old_big_samples_lose_to_recent_small_ones() {
        let mut samples = spread(50, 500 * MIB, 0.0, NOW - 5 * DAY_MS);
        samples.extend(spread(50, 100 * MIB, 0.0, NOW));
        let r = rec(&samples, &p95());
        // Big ones weigh 2^-5 each: 50/32 of 51.6, about 3% < 5%.
        assert!(r.max_bytes < 130 * MIB, "{}", r.max_bytes);
        // One half-life ago they would still win.
        let mut samples = spread(50, 500 * MIB, 0.0, NOW - DAY_MS);
        samples.extend(spread(50, 100 * MIB, 0.0, NOW));
        let r = rec(&samples, &p95());
        assert!(r.max_bytes > 500 * MIB, "{}", r.max_bytes);
        // A shorter half-life forgets faster.
        let r = rec(
            &samples,
            &PolicyParams {
                half_life: Duration::from_secs(4 * 3600),
                ..p95()
            },
        );
        assert!(r.max_bytes < 130 * MIB, "{}", r.max_bytes);
    }

    #[test]
    fn thin_history_gets_more_margin() {
        let p = PolicyParams::default();
        let few = rec(&spread(2, 80 * MIB, 0.0, NOW), &p);
        let many = rec(&spread(40, 80 * MIB, 0.0, NOW), &p);
        assert_eq!(many.confidence, 1.0);
        assert!((many.margin - p.margin).abs() < 1e-9, "{}", many.margin);
        let want = p.margin + p.low_confidence_margin * (1.0 - few.confidence);
        assert!((few.margin - want).abs() < 1e-9, "{} vs {want}", few.margin);
        assert!(few.max_bytes > many.max_bytes);
        // Full confidence: the VPA-like bound of the issue, [peak, peak x 1.25].
        assert!(many.max_bytes >= 80 * MIB && many.max_bytes as f64 <= 80.0 * MIB as f64 * 1.25);
    }

    #[test]
    fn ancient_history_still_recommends() {
        // 10 years old: weights relative to now underflow, relative to the newest do not.
        let samples = spread(30, 80 * MIB, 0.0, NOW - 3650 * DAY_MS);
        let p = PolicyParams {
            low_confidence_margin: 0.0,
            ..Default::default()
        };
        let r = rec(&samples, &p);
        assert!(r.max_bytes >= 80 * MIB && r.max_bytes < 100 * MIB);
        assert_eq!(r.effective_samples, 0.0);
        assert_eq!(r.confidence, 0.0);
    }

    #[test]
    fn oom_raises_at_once() {
        let mut samples = spread(100, 20 * MIB, 0.05, NOW - HOUR_MS);
        let before = rec(&samples, &PolicyParams::default());
        assert!(before.max_bytes < 30 * MIB);
        samples.push(oom(NOW - 60_000, 64 * MIB, Some(64 * MIB)));
        let r = rec(&samples, &PolicyParams::default());
        assert!(r.max_bytes >= 164 * MIB, "{}", r.max_bytes);
        assert_eq!(r.oom_bump_bytes, Some(164 * MIB));
        assert_eq!(r.max_bytes, 164 * MIB);
        assert_eq!(r.oom_kills, 1);
        assert!(r.high_bytes < r.max_bytes);
        // The percentile alone would not have moved: one sample in 101.
        assert_eq!(r.percentile_bytes, before.percentile_bytes);
    }

    #[test]
    fn oom_uses_limit_or_peak_whichever_is_larger() {
        let base = spread(50, 10 * MIB, 0.0, NOW - HOUR_MS);
        let mut s = base.clone();
        s.push(oom(NOW, 300 * MIB, Some(200 * MIB)));
        assert_eq!(
            rec(&s, &PolicyParams::default()).oom_bump_bytes,
            Some(400 * MIB)
        );
        let mut s = base.clone();
        s.push(oom(NOW, 30 * MIB, None));
        assert_eq!(
            rec(&s, &PolicyParams::default()).oom_bump_bytes,
            Some(130 * MIB)
        );
        let mut s = base;
        s.push(oom(NOW, 600 * MIB, Some(GIB)));
        assert_eq!(
            rec(&s, &PolicyParams::default()).oom_bump_bytes,
            Some(page_up(oom_bump(GIB)))
        );
    }

    #[test]
    fn most_recent_young_oom_counts() {
        let mut samples = spread(50, 10 * MIB, 0.0, NOW - 2 * HOUR_MS);
        samples.push(oom(NOW - 2 * HOUR_MS, 500 * MIB, Some(500 * MIB)));
        samples.push(oom(NOW - HOUR_MS, 64 * MIB, Some(64 * MIB)));
        let r = rec(&samples, &PolicyParams::default());
        assert_eq!(r.oom_bump_bytes, Some(164 * MIB));
        assert_eq!(r.oom_kills, 2);
    }

    #[test]
    fn old_oom_does_not_bump_at_once() {
        let mut samples = spread(100, 20 * MIB, 0.05, NOW);
        samples.push(oom(NOW - DAY_MS - 1, 64 * MIB, Some(64 * MIB)));
        let r = rec(&samples, &PolicyParams::default());
        assert_eq!(r.oom_bump_bytes, None);
        assert!(r.max_bytes < 30 * MIB);
        assert_eq!(r.oom_kills, 1);
        // Still a sample of the histogram: at P100 it shows.
        let r = rec(
            &samples,
            &PolicyParams {
                percentile: 100.0,
                ..Default::default()
            },
        );
        assert!(r.percentile_bytes >= 164 * MIB);
    }

    #[test]
    fn oom_below_the_percentile_is_not_reported_as_a_bump() {
        let mut samples = spread(100, 400 * MIB, 0.0, NOW);
        samples.push(oom(NOW, 10 * MIB, Some(10 * MIB)));
        let r = rec(&samples, &PolicyParams::default());
        assert_eq!(r.oom_bump_bytes, None);
        assert!(r.max_bytes > 400 * MIB);
    }

    #[test]
    fn pins_win() {
        let samples = spread(50, 80 * MIB, 0.02, NOW);
        // Pinned max, computed high.
        let r = rec(
            &samples,
            &PolicyParams {
                pin_max_bytes: Some(GIB),
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, GIB);
        assert!(r.pinned);
        assert_eq!(r.high_bytes, page_up((GIB as f64 * 0.9) as u64));
        // Both pinned, even equal, even exotic: kept exactly.
        let r = rec(
            &samples,
            &PolicyParams {
                pin_max_bytes: Some(100_000_000),
                pin_high_bytes: Some(100_000_000),
                ..Default::default()
            },
        );
        assert_eq!((r.max_bytes, r.high_bytes), (100_000_000, 100_000_000));
        // A pin wins over an OOM bump, the floor and the ceiling.
        let mut s = samples.clone();
        s.push(oom(NOW, 64 * MIB, Some(64 * MIB)));
        let r = rec(
            &s,
            &PolicyParams {
                pin_max_bytes: Some(8 * MIB),
                ceiling_bytes: Some(4 * MIB),
                floor_bytes: 4 * MIB,
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, 8 * MIB);
        assert_eq!(r.oom_bump_bytes, None);
        assert_eq!(r.clamped_by, None);
        assert!(r.high_bytes < r.max_bytes);
        // Pinned max below the P50: high still strictly below max.
        let r = rec(
            &samples,
            &PolicyParams {
                pin_max_bytes: Some(40 * MIB + 123),
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, 40 * MIB + 123);
        assert_eq!(r.high_bytes, 40 * MIB);
    }

    #[test]
    fn pinned_high_alone() {
        let samples = spread(50, 80 * MIB, 0.02, NOW);
        let computed = rec(&samples, &PolicyParams::default());
        // Below the computed max: max untouched.
        let r = rec(
            &samples,
            &PolicyParams {
                pin_high_bytes: Some(50 * MIB),
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, computed.max_bytes);
        assert_eq!(r.high_bytes, 50 * MIB);
        assert!(r.pinned);
        // Above it: max lifted to it.
        let r = rec(
            &samples,
            &PolicyParams {
                pin_high_bytes: Some(GIB),
                ..Default::default()
            },
        );
        assert_eq!((r.max_bytes, r.high_bytes), (GIB, GIB));
    }

    #[test]
    fn pins_without_samples() {
        let r = recommend(
            "f",
            &[],
            &PolicyParams {
                pin_max_bytes: Some(256 * MIB),
                ..Default::default()
            },
            NOW,
            0,
        )
        .expect("pinned");
        assert_eq!(r.max_bytes, 256 * MIB);
        assert!(r.high_bytes < r.max_bytes);
        assert_eq!((r.samples, r.percentile_bytes, r.p50_bytes), (0, 0, 0));
        assert_eq!(r.confidence, 0.0);
        assert_eq!(r.effective_samples, 0.0);
        let r = recommend(
            "f",
            &[],
            &PolicyParams {
                pin_high_bytes: Some(128 * MIB),
                ..Default::default()
            },
            NOW,
            0,
        )
        .expect("pinned");
        assert_eq!((r.max_bytes, r.high_bytes), (128 * MIB, 128 * MIB));
    }

    #[test]
    fn pins_never_exceed_host_memory() {
        let samples = spread(10, 80 * MIB, 0.0, NOW);
        let host = 2 * GIB + 100; // not a page multiple
        let r = recommend(
            "f",
            &samples,
            &PolicyParams {
                pin_max_bytes: Some(8 * GIB),
                pin_high_bytes: Some(4 * GIB),
                ..Default::default()
            },
            NOW,
            host,
        )
        .unwrap();
        assert_eq!(r.max_bytes, 2 * GIB);
        assert_eq!(r.high_bytes, 2 * GIB);
        assert_eq!(r.clamped_by, Some(ClampedBy::HostMemory));
    }

    #[test]
    fn floor_clamps() {
        let samples = spread(30, 2 * MIB, 0.1, NOW);
        let r = rec(&samples, &PolicyParams::default());
        assert_eq!(r.max_bytes, 16 * MIB);
        assert_eq!(r.clamped_by, Some(ClampedBy::Floor));
        assert!(r.high_bytes < r.max_bytes);
        assert_eq!(r.high_bytes, page_up((16.0 * MIB as f64 * 0.9) as u64));
        // VPA's floor.
        let r = rec(
            &samples,
            &PolicyParams {
                floor_bytes: 250 * MIB,
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, 250 * MIB);
        // A floor that is not a page multiple is rounded up.
        let r = rec(
            &samples,
            &PolicyParams {
                floor_bytes: 10_000_000,
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, page_up(10_000_000));
    }

    #[test]
    fn floor_yields_to_a_larger_oom_bump() {
        let mut samples = spread(30, 2 * MIB, 0.1, NOW);
        samples.push(oom(NOW, 16 * MIB, Some(16 * MIB)));
        let r = rec(&samples, &PolicyParams::default());
        assert_eq!(r.max_bytes, 116 * MIB);
        assert_eq!(r.oom_bump_bytes, Some(116 * MIB));
        assert_eq!(r.clamped_by, None);
    }

    #[test]
    fn ceiling_clamps() {
        let samples = spread(30, 3 * GIB, 0.1, NOW);
        let r = rec(
            &samples,
            &PolicyParams {
                ceiling_bytes: Some(2 * GIB + 5),
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, 2 * GIB);
        assert_eq!(r.clamped_by, Some(ClampedBy::Ceiling));
        // High: P50 is above max, so just below max.
        assert_eq!(r.high_bytes, 2 * GIB - PAGE_BYTES);
        // The ceiling also caps an OOM bump.
        let mut s = spread(30, 10 * MIB, 0.0, NOW);
        s.push(oom(NOW, 64 * MIB, Some(64 * MIB)));
        let r = rec(
            &s,
            &PolicyParams {
                ceiling_bytes: Some(100 * MIB),
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, 100 * MIB);
        assert_eq!(r.oom_bump_bytes, Some(164 * MIB));
        assert_eq!(r.clamped_by, Some(ClampedBy::Ceiling));
    }

    #[test]
    fn host_memory_clamps() {
        let samples = spread(30, 3 * GIB, 0.1, NOW);
        let r = recommend(
            "f",
            &samples,
            &PolicyParams {
                ceiling_bytes: Some(8 * GIB),
                ..Default::default()
            },
            NOW,
            GIB + 1,
        )
        .unwrap();
        assert_eq!(r.max_bytes, GIB);
        assert_eq!(r.clamped_by, Some(ClampedBy::HostMemory));
        assert!(r.high_bytes < r.max_bytes);
        // Host 0 = unknown: no clamp.
        let r = recommend("f", &samples, &PolicyParams::default(), NOW, 0).unwrap();
        assert!(r.max_bytes > 3 * GIB);
        assert_eq!(r.clamped_by, None);
    }

    #[test]
    fn confidence_grows_with_history() {
        let p = PolicyParams::default();
        let c = |n| rec(&spread(n, 80 * MIB, 0.0, NOW), &p).confidence;
        let (c1, c5, c10, c20, c40) = (c(1), c(5), c(10), c(20), c(40));
        assert!((c1 - 0.05).abs() < 1e-3, "{c1}");
        assert!(c1 < c5 && c5 < c10 && c10 < c20);
        // 20 samples of slightly different ages: just under full confidence.
        assert!(c20 > 0.99 && c20 <= 1.0, "{c20}");
        assert_eq!(c40, 1.0);
        // The same history a day older is worth half.
        let old = rec(&spread(10, 80 * MIB, 0.0, NOW - DAY_MS), &p);
        assert!((old.effective_samples - c10 * 20.0 / 2.0).abs() < 1e-3);
        assert!((old.confidence - c10 / 2.0).abs() < 1e-3);
    }

    #[test]
    fn high_stays_strictly_below_max() {
        // All peaks equal, no margin, high_fraction 1: high would equal max.
        let samples = spread(20, 80 * MIB, 0.0, NOW);
        let r = rec(
            &samples,
            &PolicyParams {
                margin: 0.0,
                low_confidence_margin: 0.0,
                high_fraction: 1.0,
                ..Default::default()
            },
        );
        assert_eq!(r.max_bytes, page_up(r.percentile_bytes));
        assert_eq!(r.high_bytes, r.max_bytes - PAGE_BYTES);
        // A small high_fraction: P50 holds high up.
        let r = rec(
            &samples,
            &PolicyParams {
                high_fraction: 0.1,
                ..Default::default()
            },
        );
        assert_eq!(r.high_bytes, page_up(r.p50_bytes));
    }

    #[test]
    fn future_samples_count_as_now() {
        let samples = spread(20, 80 * MIB, 0.0, NOW + 10 * DAY_MS);
        let r = rec(&samples, &PolicyParams::default());
        assert!((r.effective_samples - 20.0).abs() < 1e-9);
        assert_eq!(r.confidence, 1.0);
    }

    #[test]
    fn order_of_samples_does_not_matter() {
        let mut samples = spread(40, 80 * MIB, 0.3, NOW);
        samples.push(oom(NOW - HOUR_MS, 90 * MIB, Some(90 * MIB)));
        let a = rec(&samples, &PolicyParams::default());
        samples.reverse();
        let b = rec(&samples, &PolicyParams::default());
        assert_eq!(a.max_bytes, b.max_bytes);
        assert_eq!(a.high_bytes, b.high_bytes);
        assert_eq!(a.oom_bump_bytes, b.oom_bump_bytes);
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(PolicyParams::default().validate(), Ok(()));
        let cases: Vec<(PolicyParams, &str)> = vec![
            (
                PolicyParams {
                    percentile: 0.0,
                    ..Default::default()
                },
                "percentile = 0",
            ),
            (
                PolicyParams {
                    percentile: 100.5,
                    ..Default::default()
                },
                "percentile = 100.5",
            ),
            (
                PolicyParams {
                    percentile: f64::NAN,
                    ..Default::default()
                },
                "percentile = NaN",
            ),
            (
                PolicyParams {
                    margin: -0.1,
                    ..Default::default()
                },
                "margin = -0.1",
            ),
            (
                PolicyParams {
                    high_fraction: 0.0,
                    ..Default::default()
                },
                "high_fraction = 0",
            ),
            (
                PolicyParams {
                    high_fraction: 1.5,
                    ..Default::default()
                },
                "high_fraction = 1.5",
            ),
            (
                PolicyParams {
                    half_life: Duration::ZERO,
                    ..Default::default()
                },
                "half_life = 0ns",
            ),
            (
                PolicyParams {
                    confidence_samples: 0.0,
                    ..Default::default()
                },
                "confidence_samples = 0",
            ),
            (
                PolicyParams {
                    floor_bytes: 100,
                    ..Default::default()
                },
                "floor_bytes = 100",
            ),
            (
                PolicyParams {
                    ceiling_bytes: Some(8 * MIB),
                    ..Default::default()
                },
                "floor_bytes = 16777216",
            ),
            (
                PolicyParams {
                    pin_max_bytes: Some(0),
                    ..Default::default()
                },
                "pin_max_bytes = 0",
            ),
            (
                PolicyParams {
                    pin_max_bytes: Some(MIB),
                    pin_high_bytes: Some(2 * MIB),
                    ..Default::default()
                },
                "pin_high_bytes = 2097152",
            ),
        ];
        for (p, want) in cases {
            let err = p.validate().expect_err(want);
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
        // Boundaries that are valid.
        let ok = PolicyParams {
            percentile: 100.0,
            margin: 0.0,
            high_fraction: 1.0,
            floor_bytes: 4096,
            ceiling_bytes: Some(4096),
            pin_max_bytes: Some(MIB),
            pin_high_bytes: Some(MIB),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn serde_round_trip() {
        let r = rec(&spread(20, 80 * MIB, 0.1, NOW), &PolicyParams::default());
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"max_bytes\":"));
        assert!(json.contains("\"clamped_by\":null"));
        let back: Recommendation = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let p = PolicyParams::default();
        let back: PolicyParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}

#[cfg(test)]
mod step_tests {
    //! Each step of the chain alone.
    use super::*;

    const MIB: u64 = 1 << 20;

    fn at(max_bytes: u64) -> Estimate {
        Estimate {
            max_bytes,
            ..Estimate::default()
        }
    }

    fn sample(at_ms: u64, peak_bytes: u64, oom_killed: bool) -> Sample {
        Sample {
            at_ms,
            peak_bytes,
            oom_killed,
            limit_bytes: None,
        }
    }

    #[test]
    fn history_weights_samples_and_keeps_the_recent_oom() {
        let day = Duration::from_secs(24 * 3600);
        let now = 10 * 24 * 3_600_000;
        let h = History::of(
            &[
                sample(now, 10 * MIB, false),
                sample(now - 3_600_000, 20 * MIB, true),
                sample(now - 5 * 24 * 3_600_000, 30 * MIB, true),
            ],
            now,
            day,
        );
        assert_eq!(h.oom_kills, 2);
        assert_eq!(
            h.recent_oom_bytes,
            Some(oom_bump(20 * MIB)),
            "the old OOM is too old"
        );
        assert!(h.effective_samples > 1.9 && h.effective_samples < 2.1);
        assert_eq!(h.confidence(20.0), h.effective_samples / 20.0);
        let empty = History::of(&[], now, day);
        assert_eq!(
            (empty.effective_samples, empty.confidence(20.0)),
            (0.0, 0.0)
        );
    }

    #[test]
    fn margin_widens_with_low_confidence() {
        let params = PolicyParams::default();
        assert_eq!(margin_for(&params, 1.0), params.margin);
        assert_eq!(
            margin_for(&params, 0.0),
            params.margin + params.low_confidence_margin
        );
    }

    #[test]
    fn base_is_the_percentile_with_its_margin_page_rounded() {
        assert_eq!(
            Estimate::percentile_with_margin(100 * MIB, 0.5, false).max_bytes,
            150 * MIB
        );
        assert_eq!(
            Estimate::percentile_with_margin(1000, 0.0, false).max_bytes,
            PAGE_BYTES
        );
        assert_eq!(
            Estimate::percentile_with_margin(100 * MIB, 0.5, true).max_bytes,
            0
        );
    }

    #[test]
    fn oom_at_once_lifts_only_upwards() {
        let step = WithOomAtOnce {
            recent_oom_bytes: Some(200 * MIB),
        };
        let lifted = step.apply(at(100 * MIB));
        assert_eq!(
            (lifted.max_bytes, lifted.oom_bump_bytes),
            (200 * MIB, Some(200 * MIB))
        );
        assert_eq!(step.apply(at(300 * MIB)), at(300 * MIB));
        let none = WithOomAtOnce {
            recent_oom_bytes: None,
        };
        assert_eq!(none.apply(at(1)), at(1));
    }

    #[test]
    fn floor_and_ceiling_bound_and_say_so() {
        let floor = WithFloor { bytes: 16 * MIB };
        let floored = floor.apply(at(MIB));
        assert_eq!(
            (floored.max_bytes, floored.clamped_by),
            (16 * MIB, Some(ClampedBy::Floor))
        );
        assert_eq!(floor.apply(at(32 * MIB)), at(32 * MIB));
        let ceiling = WithCeiling {
            bytes: Some(64 * MIB + 1),
        };
        let capped = ceiling.apply(at(100 * MIB));
        assert_eq!(
            (capped.max_bytes, capped.clamped_by),
            (64 * MIB, Some(ClampedBy::Ceiling))
        );
        assert_eq!(
            WithCeiling { bytes: None }.apply(at(100 * MIB)),
            at(100 * MIB)
        );
    }

    #[test]
    fn host_memory_caps_when_known() {
        let host = WithHostMemory::of(GIB_PLUS_ONE);
        let capped = host.apply(at(2 << 30));
        assert_eq!(
            (capped.max_bytes, capped.clamped_by),
            (1 << 30, Some(ClampedBy::HostMemory))
        );
        assert_eq!(WithHostMemory::of(0).apply(at(u64::MAX)), at(u64::MAX));
    }
    const GIB_PLUS_ONE: u64 = (1 << 30) + 1;

    #[test]
    fn a_pinned_max_replaces_all_but_the_host_cap() {
        let host = WithHostMemory::of(1 << 30);
        let before = Estimate {
            max_bytes: 100 * MIB,
            high_bytes: 0,
            clamped_by: Some(ClampedBy::Floor),
            oom_bump_bytes: Some(100 * MIB),
        };
        let pinned = WithPinnedMax {
            pin: Some(50 * MIB),
            host,
        };
        assert_eq!(pinned.apply(before.clone()), at(50 * MIB));
        let over = WithPinnedMax {
            pin: Some(2 << 30),
            host,
        }
        .apply(before.clone());
        assert_eq!(over.clamped_by, Some(ClampedBy::HostMemory));
        let unpinned = WithPinnedMax { pin: None, host };
        assert_eq!(unpinned.apply(before.clone()), before);
    }

    #[test]
    fn high_is_below_max_or_the_pin_that_lifts_max() {
        let host = WithHostMemory::of(0);
        let high = WithHigh {
            pin: None,
            max_pinned: false,
            fraction: 0.5,
            p50_bytes: 60 * MIB,
            host,
        };
        assert_eq!(
            high.apply(at(100 * MIB)).high_bytes,
            60 * MIB,
            "not below the median"
        );
        assert_eq!(
            high.apply(at(50 * MIB)).high_bytes,
            50 * MIB - PAGE_BYTES,
            "strictly below max"
        );
        assert_eq!(high.apply(at(PAGE_BYTES)).high_bytes, PAGE_BYTES);
        let pinned = WithHigh {
            pin: Some(200 * MIB),
            ..high
        };
        let lifted = pinned.apply(at(100 * MIB));
        assert_eq!(
            (lifted.max_bytes, lifted.high_bytes),
            (200 * MIB, 200 * MIB)
        );
        let both = WithHigh {
            max_pinned: true,
            ..pinned
        };
        assert_eq!(both.apply(at(100 * MIB)).max_bytes, 100 * MIB);
    }
}
