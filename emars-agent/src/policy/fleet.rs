//! Fleet learning, the pure half: what the other hosts know of a function's peaks, read from
//! Prometheus's answer, and the `[fleet]` settings. Pure computation: the fetch is the
//! daemon's (`daemon::fleet`), the blend the recommender's ([`super::recommend::recommend_blended`]).
//!
//! Every agent exports its retained instance peaks per function as a native histogram
//! (`emars_instance_peak_bytes`, schema 4: `model::native`) and its identity as
//! `emars_agent_info{agent_id}`. The default query sums the histograms of every other agent
//! (`unless on (instance, job)` its own), so the view holds each of the fleet's outcomes once
//! and none of this host's, which it already holds exactly. A bucket's samples are taken at the
//! bucket's upper bound: at most 4.4 % above the peaks they stand for, never below.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;
use crate::model::native;
use crate::policy::recommend::{sample_value, History, Sample};

/// Where the default query puts the agent's own id.
pub const AGENT_ID_PLACEHOLDER: &str = "{agent_id}";

/// The default query: every other agent's instance-peak histograms, summed per function.
pub const DEFAULT_QUERY: &str = "sum by (function) (emars_instance_peak_bytes unless on (instance, job) emars_agent_info{agent_id=\"{agent_id}\"})";

/// The default OOM query: every other agent's most recent OOM bump per function.
pub const DEFAULT_OOM_QUERY: &str = "max by (function) (emars_recent_oom_bump_bytes unless on (instance, job) emars_agent_info{agent_id=\"{agent_id}\"})";

/// `[fleet]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The Prometheus (or Thanos / Mimir query front end) to ask, e.g.
    /// `http://prometheus:9090`; "" turns fleet learning off.
    pub prometheus_url: String,
    /// Seconds between fetches, at least 1.
    pub refresh_s: u64,
    /// Fleet data older than this (seconds since the last successful fetch) is dropped, at
    /// least `refresh_s`.
    pub max_age_s: u64,
    /// One fetch's time limit (connect and read), in seconds, at least 1.
    pub timeout_s: u64,
    /// The PromQL query; `{agent_id}` is replaced by this agent's id. Its answer is an instant
    /// vector per function of native histograms, or of classic buckets (`le` label).
    pub query: String,
    /// The PromQL query for the other hosts' recent OOM kills (an instant vector of bumps per
    /// function); "" asks nothing (OOM kills then reach the fleet only as bumped samples).
    pub oom_query: String,
    /// Answers larger than this many bytes are refused, at least 1 KiB.
    pub max_response_bytes: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            prometheus_url: String::new(),
            refresh_s: 60,
            max_age_s: 600,
            timeout_s: 10,
            query: DEFAULT_QUERY.to_owned(),
            oom_query: DEFAULT_OOM_QUERY.to_owned(),
            max_response_bytes: 64 << 20,
        }
    }
}

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.prometheus_url.is_empty()
    }

    pub fn refresh(&self) -> Duration {
        Duration::from_secs(self.refresh_s)
    }

    pub fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_s)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    /// The URL as it may be shown (`/v1/info`, logs): without the user and password a URL may
    /// carry for basic authentication, which no reader of the API may see.
    pub fn shown_url(&self) -> String {
        self.redact(&self.prometheus_url)
    }

    /// `text` (an error naming the URL) with the URL's credentials taken out.
    pub fn redact(&self, text: &str) -> String {
        match self.userinfo() {
            Some(userinfo) => text.replace(userinfo, ""),
            None => text.to_owned(),
        }
    }

    /// `user:password@` of `scheme://user:password@host/...`, if there is one.
    fn userinfo(&self) -> Option<&str> {
        let url = &self.prometheus_url;
        let after_scheme = url.find("://")? + 3;
        let authority_end = url[after_scheme..]
            .find('/')
            .map_or(url.len(), |i| after_scheme + i);
        let at = url[after_scheme..authority_end].rfind('@')? + after_scheme;
        Some(&url[after_scheme..=at])
    }

    /// The query with this agent's id in place.
    pub fn query_for(&self, agent_id: &str) -> String {
        self.query.replace(AGENT_ID_PLACEHOLDER, agent_id)
    }

    /// The OOM query with this agent's id in place (None: not asked).
    pub fn oom_query_for(&self, agent_id: &str) -> Option<String> {
        (!self.oom_query.trim().is_empty())
            .then(|| self.oom_query.replace(AGENT_ID_PLACEHOLDER, agent_id))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: format!("fleet.{key}"),
            value,
            reason: reason.to_owned(),
        };
        let url = &self.prometheus_url;
        let http = url.starts_with("http://") || url.starts_with("https://");
        if !url.is_empty() && !http {
            return Err(bad(
                "prometheus_url",
                url.clone(),
                "must start with http:// or https:// (or be \"\" for off)",
            ));
        }
        if self.refresh_s == 0 {
            return Err(bad("refresh_s", "0".into(), "must be at least 1"));
        }
        if self.max_age_s < self.refresh_s {
            return Err(bad(
                "max_age_s",
                self.max_age_s.to_string(),
                "must be at least refresh_s",
            ));
        }
        if self.timeout_s == 0 {
            return Err(bad("timeout_s", "0".into(), "must be at least 1"));
        }
        if self.query.trim().is_empty() {
            return Err(bad("query", String::new(), "must not be empty"));
        }
        if self.max_response_bytes < 1024 {
            return Err(bad(
                "max_response_bytes",
                self.max_response_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

/// One function's peaks on the other hosts: (value, count) per bucket, the value being the
/// bucket's upper bound in bytes, in ascending order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetPeaks {
    pub buckets: Vec<(u64, f64)>,
    /// The samples in all buckets.
    pub count: f64,
    /// The largest bump of an OOM kill younger than one half-life on another host
    /// (`emars_recent_oom_bump_bytes`): lifts this host's limit at once, as its own would.
    pub recent_oom_bytes: Option<u64>,
}

/// What a host exports of one function for the others: each retained sample as the
/// recommender takes it (an OOM-killed instance at VPA's bump of the limit it died at, not at
/// the cut-off peak, which would read as a small ordinary one), and the bump of its most recent
/// OOM kill younger than one half-life. The exporter (/metrics) and the replay both use it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exported {
    pub values: Vec<u64>,
    pub recent_oom_bytes: Option<u64>,
}

impl Exported {
    pub fn of(samples: &[Sample], now_ms: u64, half_life: Duration) -> Self {
        Exported {
            values: samples.iter().map(sample_value).collect(),
            recent_oom_bytes: History::of(samples, now_ms, half_life).recent_oom_bytes,
        }
    }
}

impl FleetPeaks {
    /// Exact peaks as Prometheus receives them from the exporters: each in its schema-4 bucket,
    /// taken at the bucket's upper bound (zeros left out).
    pub fn of_values(peaks: impl IntoIterator<Item = u64>) -> Self {
        let mut by_index: std::collections::BTreeMap<i32, f64> = Default::default();
        // Zero is no peak: the exporter leaves it out (`NativePeaks::of`), so does the view.
        for p in peaks.into_iter().filter(|p| *p > 0) {
            *by_index.entry(native::bucket_index(p)).or_default() += 1.0;
        }
        let mut buckets = Vec::with_capacity(by_index.len());
        buckets.extend(
            by_index
                .into_iter()
                .map(|(i, n)| (native::upper_bound_bytes(i), n)),
        );
        Self::from_buckets(buckets)
    }

    /// From (upper bound, count) pairs in any order; empty and non-finite counts dropped.
    fn from_buckets(mut buckets: Vec<(u64, f64)>) -> Self {
        buckets.retain(|(_, n)| *n > 0.0 && n.is_finite());
        buckets.sort_by_key(|(v, _)| *v);
        // One entry per value (classic `+Inf` lands on the largest bound's).
        let mut merged: Vec<(u64, f64)> = Vec::with_capacity(buckets.len());
        for (v, n) in buckets {
            match merged.last_mut() {
                Some((last, m)) if *last == v => *m += n,
                _ => merged.push((v, n)),
            }
        }
        let count = merged.iter().map(|(_, n)| n).sum();
        FleetPeaks {
            buckets: merged,
            count,
            recent_oom_bytes: None,
        }
    }

    /// The other hosts' exports of the function (a replay's fleet view).
    pub fn of_exports<'a>(exports: impl IntoIterator<Item = &'a Exported>) -> Self {
        let mut values = Vec::new();
        let mut recent_oom_bytes = None;
        for e in exports {
            values.extend_from_slice(&e.values);
            recent_oom_bytes = recent_oom_bytes.max(e.recent_oom_bytes);
        }
        FleetPeaks {
            recent_oom_bytes,
            ..Self::of_values(values)
        }
    }

    /// Nothing to blend: no samples and no recent OOM kill.
    pub fn is_empty(&self) -> bool {
        self.count <= 0.0 && self.recent_oom_bytes.is_none()
    }
}

/// The fleet's peaks per function, as of one successful fetch.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    pub functions: HashMap<String, Arc<FleetPeaks>>,
    pub fetched_at_ms: u64,
    /// Functions left out because the answer held more than the cap (the ones with the fewest
    /// samples go first).
    pub left_out: u64,
    /// At most this many functions.
    pub cap: usize,
}

/// Why Prometheus's answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("the answer is not Prometheus's query JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("Prometheus said {status}: {error}")]
    Failed { status: String, error: String },
    #[error("the answer is a {0}, not an instant vector")]
    NotAVector(String),
    #[error("series {0}: {1}")]
    BadSeries(String, String),
}

/// `/api/v1/query`'s envelope.
#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<AnswerData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerData {
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: HashMap<String, String>,
    /// A float sample: [time, "value"] (classic buckets).
    #[serde(default)]
    value: Option<(f64, String)>,
    /// A native histogram sample: [time, histogram].
    #[serde(default)]
    histogram: Option<(f64, NativeSample)>,
}

/// Prometheus's JSON for a native histogram: buckets as [boundary rule, lower, upper, count].
#[derive(Deserialize)]
struct NativeSample {
    #[serde(default)]
    buckets: Vec<(u8, String, String, String)>,
}

/// The instant vector of an `/api/v1/query` answer.
fn vector(body: &[u8]) -> Result<Vec<Series>, FleetError> {
    let answer: Answer = serde_json::from_slice(body)?;
    if answer.status != "success" {
        return Err(FleetError::Failed {
            status: answer.status,
            error: answer.error.unwrap_or_default(),
        });
    }
    let Some(data) = answer.data else {
        return Err(FleetError::NotAVector("answer without data".into()));
    };
    if data.result_type != "vector" {
        return Err(FleetError::NotAVector(data.result_type));
    }
    Ok(data.result)
}

fn number(series: &str, what: &str, s: &str) -> Result<f64, FleetError> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse::<f64>()
            .map_err(|_| FleetError::BadSeries(series.to_owned(), format!("{what} {s:?}"))),
    }
}

/// A bucket bound in bytes, rounded up (never below the peaks it stands for).
fn bound_bytes(v: f64) -> u64 {
    if v <= 0.0 {
        0
    } else {
        v.ceil().min(u64::MAX as f64) as u64
    }
}

impl FleetView {
    /// Reads Prometheus's answer to the fleet query (`/api/v1/query`): per function either
    /// one native histogram, or classic cumulative buckets (one series per `le`). Keeps at
    /// most `max_functions` functions, those with the most samples.
    pub fn from_answer(
        body: &[u8],
        fetched_at_ms: u64,
        max_functions: usize,
    ) -> Result<FleetView, FleetError> {
        let result = vector(body)?;
        let mut native: HashMap<String, Vec<(u64, f64)>> = HashMap::new();
        // function → (le, cumulative count)
        let mut classic: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for s in result {
            let Some(function) = s.metric.get("function").cloned() else {
                continue; // not per function: nothing to learn from
            };
            if !usable_name(&function) {
                continue; // no function of any host's store: nothing to learn
            }
            if let Some((_, h)) = s.histogram {
                let into = native.entry(function.clone()).or_default();
                for (_, lower, upper, count) in &h.buckets {
                    let upper = number(&function, "upper bound", upper)?;
                    let lower = number(&function, "lower bound", lower)?;
                    let count = number(&function, "count", count)?;
                    if upper < 0.0 || !upper.is_finite() || lower > upper {
                        continue; // negative values: not a peak
                    }
                    into.push((bound_bytes(upper), count));
                }
            } else if let (Some(le), Some((_, v))) = (s.metric.get("le"), s.value) {
                let le = number(&function, "le", le)?;
                let v = number(&function, "value", &v)?;
                classic.entry(function).or_default().push((le, v));
            }
        }
        let mut functions: Vec<(String, FleetPeaks)> = native
            .into_iter()
            .map(|(f, b)| (f, FleetPeaks::from_buckets(b)))
            .collect();
        // A function answered both ways counts once: its native histogram.
        let answered: std::collections::HashSet<String> =
            functions.iter().map(|(f, _)| f.clone()).collect();
        functions.extend(
            classic
                .into_iter()
                .filter(|(f, _)| !answered.contains(f))
                .filter_map(|(f, cumulative)| Some((f, classic_peaks(cumulative)?))),
        );
        functions.retain(|(_, p)| !p.is_empty());
        let mut left_out = 0;
        if functions.len() > max_functions {
            functions.sort_by(|a, b| b.1.count.total_cmp(&a.1.count).then(a.0.cmp(&b.0)));
            left_out = (functions.len() - max_functions) as u64;
            functions.truncate(max_functions);
        }
        Ok(FleetView {
            functions: functions
                .into_iter()
                .map(|(f, p)| (f, Arc::new(p)))
                .collect(),
            fetched_at_ms,
            left_out,
            cap: max_functions,
        })
    }

    /// Adds the answer to the OOM query: per function, the largest recent OOM bump on the
    /// other hosts (functions the view left out stay out).
    pub fn add_oom_answer(&mut self, body: &[u8]) -> Result<(), FleetError> {
        for s in vector(body)? {
            let (Some(function), Some((_, v))) = (s.metric.get("function"), s.value) else {
                continue;
            };
            if !usable_name(function) {
                continue;
            }
            let bytes = number(function, "value", &v)?;
            if !(bytes > 0.0 && bytes.is_finite()) {
                continue;
            }
            let bump = bound_bytes(bytes);
            let room = self.functions.len() < self.cap;
            match self.functions.get_mut(function) {
                Some(p) => {
                    let p = Arc::make_mut(p);
                    p.recent_oom_bytes = p.recent_oom_bytes.max(Some(bump));
                }
                None if room => {
                    self.functions.insert(
                        function.clone(),
                        Arc::new(FleetPeaks {
                            recent_oom_bytes: Some(bump),
                            ..Default::default()
                        }),
                    );
                }
                None => self.left_out += 1,
            }
        }
        Ok(())
    }

    /// The function's fleet peaks, if the fleet knows it.
    pub fn peaks(&self, function: &str) -> Option<&Arc<FleetPeaks>> {
        self.functions.get(function)
    }

    /// All samples in the view.
    pub fn samples(&self) -> f64 {
        self.functions.values().map(|p| p.count).sum()
    }
}

/// Classic cumulative buckets to per-bucket counts at their upper bounds. The `+Inf` bucket's
/// samples lie above every finite bound: they are taken at the largest one (the exporter's
/// last bound is far above any function's peaks; said in docs/metrics.md).
fn classic_peaks(mut cumulative: Vec<(f64, f64)>) -> Option<FleetPeaks> {
    // Bounds that are no size (NaN, negative, zero) say nothing of a peak.
    cumulative.retain(|(le, _)| *le > 0.0);
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Without a finite bound the samples have no size at all: nothing to learn.
    let largest_finite = cumulative
        .iter()
        .rev()
        .find(|(le, _)| le.is_finite())
        .map(|(le, _)| *le)?;
    let mut below = 0.0;
    let mut buckets = Vec::with_capacity(cumulative.len());
    for (le, total) in cumulative {
        // Cumulative counts summed over hosts can dip (a host's scrape between two others'):
        // never a negative bucket.
        let n = (total - below).max(0.0);
        below = below.max(total);
        let at = if le.is_finite() { le } else { largest_finite };
        buckets.push((bound_bytes(at), n));
    }
    Some(FleetPeaks::from_buckets(buckets))
}

/// A name some host's store could hold (the store refuses empty names and NUL bytes): one it
/// could not is skipped, not carried into every recomputation.
fn usable_name(function: &str) -> bool {
    !function.is_empty() && !function.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn peaks_go_to_their_bucket_upper_bounds_never_below() {
        let peaks = [100 * MIB, 100 * MIB + 1, 101 * MIB, 200 * MIB];
        let f = FleetPeaks::of_values(peaks.into_iter().chain([0]));
        assert_eq!(f.count, 4.0, "zero is no peak");
        let total: f64 = f.buckets.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 4.0);
        for p in peaks {
            let at = native::upper_bound_bytes(native::bucket_index(p));
            assert!(f.buckets.iter().any(|(v, _)| *v == at), "{p} → {at}");
            assert!(at >= p && (at as f64) <= p as f64 * 1.0444 + 1.0);
        }
        // Ascending.
        assert!(f.buckets.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn reads_native_histograms_per_function() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"fn-a"},"histogram":[1700000000.5,{"count":"3","sum":"3e8",
              "buckets":[[0,"95136244.0","99334334.0","2"],[0,"191739611","200000000","1"]]}]},
            {"metric":{"function":"fn-b"},"histogram":[1700000000.5,{"count":"0","sum":"0"}]},
            {"metric":{},"histogram":[1700000000.5,{"count":"1","sum":"1",
              "buckets":[[0,"1","2","1"]]}]}
        ]}}"#;
        let v = FleetView::from_answer(body, 7, 100).unwrap();
        assert_eq!(v.fetched_at_ms, 7);
        assert_eq!(
            v.functions.len(),
            1,
            "fn-b has no samples, the unnamed series no function"
        );
        let a = v.peaks("fn-a").unwrap();
        assert_eq!(a.buckets, vec![(99_334_334, 2.0), (200_000_000, 1.0)]);
        assert_eq!(a.count, 3.0);
    }

    #[test]
    fn reads_classic_buckets_per_function() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"fn-a","le":"+Inf"},"value":[1,"5"]},
            {"metric":{"function":"fn-a","le":"1048576"},"value":[1,"1"]},
            {"metric":{"function":"fn-a","le":"2097152"},"value":[1,"4"]}
        ]}}"#;
        let v = FleetView::from_answer(body, 0, 100).unwrap();
        let a = v.peaks("fn-a").unwrap();
        assert_eq!(a.buckets, vec![(1_048_576, 1.0), (2_097_152, 4.0)]);
        assert_eq!(a.count, 5.0);
    }

    #[test]
    fn recent_oom_kills_join_the_view() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"fn-a"},"histogram":[1,{"buckets":[[0,"1","2","1"]]}]}]}}"#;
        let mut v = FleetView::from_answer(body, 0, 2).unwrap();
        let oom = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"fn-a"},"value":[1,"314572800"]},
            {"metric":{"function":"fn-b"},"value":[1,"209715200"]},
            {"metric":{"function":"fn-c"},"value":[1,"104857600"]}]}}"#;
        v.add_oom_answer(oom).unwrap();
        assert_eq!(v.peaks("fn-a").unwrap().recent_oom_bytes, Some(300 << 20));
        let b = v.peaks("fn-b").unwrap();
        assert_eq!((b.count, b.recent_oom_bytes), (0.0, Some(200 << 20)));
        assert!(v.peaks("fn-c").is_none(), "over the cap of 2");
        assert_eq!(v.left_out, 1);
    }

    #[test]
    fn exports_take_kills_at_their_bump_and_the_recent_one() {
        let hl = Duration::from_secs(86_400);
        let now = 10 * 86_400_000;
        let s = |at_ms: u64, peak: u64, oom: bool| Sample {
            at_ms,
            peak_bytes: peak,
            oom_killed: oom,
            limit_bytes: oom.then_some(peak),
        };
        let e = Exported::of(
            &[s(now, 100 << 20, false), s(now - 1000, 200 << 20, true)],
            now,
            hl,
        );
        let bump = crate::policy::recommend::oom_bump(200 << 20);
        assert_eq!(e.values, vec![100 << 20, bump]);
        assert_eq!(e.recent_oom_bytes, Some(bump));
        let old = Exported::of(&[s(now - 2 * 86_400_000, 200 << 20, true)], now, hl);
        assert_eq!(old.recent_oom_bytes, None, "older than a half-life");
        let f = FleetPeaks::of_exports([&e, &old]);
        assert_eq!(f.count, 3.0);
        assert_eq!(f.recent_oom_bytes, Some(bump));
    }

    #[test]
    fn names_no_store_holds_and_sizeless_buckets_are_skipped() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":""},"histogram":[1,{"buckets":[[0,"1","2","1"]]}]},
            {"metric":{"function":"a\u0000"},"histogram":[1,{"buckets":[[0,"1","2","1"]]}]},
            {"metric":{"function":"inf-only","le":"+Inf"},"value":[1,"5"]},
            {"metric":{"function":"neg","le":"-1"},"value":[1,"5"]},
            {"metric":{"function":"neg","le":"+Inf"},"value":[1,"5"]},
            {"metric":{"function":"both"},"histogram":[1,{"buckets":[[0,"1","2","1"]]}]},
            {"metric":{"function":"both","le":"4"},"value":[1,"7"]}
        ]}}"#;
        let v = FleetView::from_answer(body, 0, 100).unwrap();
        let mut names: Vec<&str> = v.functions.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["both"]);
        assert_eq!(
            v.peaks("both").unwrap().count,
            1.0,
            "the native answer, once"
        );
        let mut v = v;
        v.add_oom_answer(
            br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":""},"value":[1,"5"]}]}}"#,
        )
        .unwrap();
        assert_eq!(v.functions.len(), 1);
    }

    #[test]
    fn keeps_the_functions_with_most_samples_under_the_cap() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"small"},"histogram":[1,{"buckets":[[0,"1","2","1"]]}]},
            {"metric":{"function":"big"},"histogram":[1,{"buckets":[[0,"1","2","9"]]}]}
        ]}}"#;
        let v = FleetView::from_answer(body, 0, 1).unwrap();
        assert!(v.peaks("big").is_some() && v.peaks("small").is_none());
        assert_eq!(v.left_out, 1);
    }

    #[test]
    fn says_why_an_answer_is_unusable() {
        let err = |b: &[u8]| FleetView::from_answer(b, 0, 10).unwrap_err().to_string();
        assert!(err(b"<html>").contains("not Prometheus's query JSON"));
        assert!(
            err(br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
                .contains("parse error")
        );
        assert!(
            err(br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#)
                .contains("matrix")
        );
        assert!(err(
            br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"function":"f"},"histogram":[1,{"buckets":[[0,"1","x","1"]]}]}]}}"#
        )
        .contains("upper bound \"x\""));
    }

    #[test]
    fn settings_are_validated() {
        assert!(FleetConfig::default().validate().is_ok());
        assert!(!FleetConfig::default().enabled());
        let with = |f: fn(&mut FleetConfig)| {
            let mut c = FleetConfig {
                prometheus_url: "http://p:9090".into(),
                ..Default::default()
            };
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(with(|_| {}).is_ok());
        assert!(with(|c| c.prometheus_url = "p:9090".into())
            .unwrap_err()
            .contains("fleet.prometheus_url"));
        assert!(with(|c| c.refresh_s = 0).unwrap_err().contains("refresh_s"));
        assert!(with(|c| c.max_age_s = 30)
            .unwrap_err()
            .contains("max_age_s"));
        assert!(with(|c| c.timeout_s = 0).unwrap_err().contains("timeout_s"));
        assert!(with(|c| c.query = " ".into())
            .unwrap_err()
            .contains("query"));
        assert!(with(|c| c.max_response_bytes = 10)
            .unwrap_err()
            .contains("max_response_bytes"));
        let secret = FleetConfig {
            prometheus_url: "https://emars:s3cret@mimir.example:443/prometheus".into(),
            ..Default::default()
        };
        assert_eq!(secret.shown_url(), "https://mimir.example:443/prometheus");
        assert_eq!(
            secret
                .redact("https://emars:s3cret@mimir.example:443/prometheus/api/v1/query: refused"),
            "https://mimir.example:443/prometheus/api/v1/query: refused"
        );
        let plain = FleetConfig {
            prometheus_url: "http://p:9090/a@b".into(),
            ..Default::default()
        };
        assert_eq!(
            plain.shown_url(),
            "http://p:9090/a@b",
            "an @ in the path is no user"
        );
        let c = FleetConfig::default();
        assert_eq!(
            c.query_for("abc"),
            "sum by (function) (emars_instance_peak_bytes unless on (instance, job) emars_agent_info{agent_id=\"abc\"})"
        );
    }
}
