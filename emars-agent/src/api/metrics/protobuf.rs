//! Prometheus's protobuf exposition: each family one `io.prometheus.client.MetricFamily`
//! message, length-delimited (a varint length, then the message), one after the other. The
//! messages below mirror the part of Prometheus's `prompb/io/prometheus/client/metrics.proto`
//! (proto3) this writes, with its field numbers; prost encodes them, nothing is generated.
//!
//! A histogram sample is native when it has spans (`positive_span`, deltas in
//! `positive_delta`); the instance peaks are, at [`native::SCHEMA`] with a zero threshold of 0
//! (a peak is at least one byte) and no classic buckets. Prometheus 2.x decides whether a
//! whole family is native from its first sample, and reads one with no buckets and a zero
//! threshold of 0 as classic: a function none of whose instances has a peak yet (count 0) has
//! no sample here.

use super::{Family, Labels, Number, Peaks, Samples};
use crate::model::{live::NativePeaks, native};

/// `message MetricFamily`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricFamily {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub help: String,
    #[prost(enumeration = "MetricType", tag = "3")]
    pub r#type: i32,
    #[prost(message, repeated, tag = "4")]
    pub metric: Vec<Metric>,
}

/// `enum MetricType` (the kinds written here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 4,
}

/// `message Metric` (no summary, untyped or timestamp: fields 4, 5 and 6).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(message, repeated, tag = "1")]
    pub label: Vec<LabelPair>,
    #[prost(message, optional, tag = "2")]
    pub gauge: Option<Gauge>,
    #[prost(message, optional, tag = "3")]
    pub counter: Option<Counter>,
    #[prost(message, optional, tag = "7")]
    pub histogram: Option<Histogram>,
}

/// `message LabelPair`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `message Gauge`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Gauge {
    #[prost(double, tag = "1")]
    pub value: f64,
}

/// `message Counter` (no exemplar: field 2).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Counter {
    #[prost(double, tag = "1")]
    pub value: f64,
}

/// `message Histogram`: the integer-count fields (no `*_float` ones: 4, 8, 11 and 14), no
/// negative buckets (9, 10: peaks are not negative).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Histogram {
    #[prost(uint64, tag = "1")]
    pub sample_count: u64,
    #[prost(double, tag = "2")]
    pub sample_sum: f64,
    /// Classic buckets, cumulative, in increasing order of `upper_bound`.
    #[prost(message, repeated, tag = "3")]
    pub bucket: Vec<Bucket>,
    #[prost(sint32, tag = "5")]
    pub schema: i32,
    #[prost(double, tag = "6")]
    pub zero_threshold: f64,
    #[prost(uint64, tag = "7")]
    pub zero_count: u64,
    #[prost(message, repeated, tag = "12")]
    pub positive_span: Vec<BucketSpan>,
    /// Each bucket's count less the one before it (the first: less zero), across spans.
    #[prost(sint64, repeated, tag = "13")]
    pub positive_delta: Vec<i64>,
}

/// `message Bucket` (no exemplar: field 3; no float count: 4).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Bucket {
    #[prost(uint64, tag = "1")]
    pub cumulative_count: u64,
    #[prost(double, tag = "2")]
    pub upper_bound: f64,
}

/// `message BucketSpan`: `length` consecutive buckets, `offset` buckets after the last one of
/// the span before (the first span: its first bucket's index).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BucketSpan {
    #[prost(sint32, tag = "1")]
    pub offset: i32,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// The families as length-delimited `MetricFamily` messages; families with no sample are
/// left out (Prometheus skips them).
pub(super) fn render(families: &[Family<'_>]) -> Result<Vec<u8>, prost::EncodeError> {
    let mut out = Vec::new();
    for family in families {
        let message = family_message(family);
        if !message.metric.is_empty() {
            prost::Message::encode_length_delimited(&message, &mut out)?;
        }
    }
    Ok(out)
}

fn family_message(f: &Family<'_>) -> MetricFamily {
    let (name, kind, metric) = match &f.samples {
        Samples::Gauges(samples) => (
            f.name.to_owned(),
            MetricType::Gauge,
            samples
                .iter()
                .map(|(labels, v)| Metric {
                    gauge: Some(Gauge { value: float(*v) }),
                    ..metric(labels)
                })
                .collect(),
        ),
        // The sample's name is the family's: a counter's carries `_total` (the text format's
        // encoder adds it to the sample).
        Samples::Counters(samples) => (
            format!("{}_total", f.name),
            MetricType::Counter,
            samples
                .iter()
                .map(|(labels, v)| Metric {
                    counter: Some(Counter { value: float(*v) }),
                    ..metric(labels)
                })
                .collect(),
        ),
        Samples::Histograms(samples) => (
            f.name.to_owned(),
            MetricType::Histogram,
            samples
                .iter()
                .filter_map(|(labels, peaks)| {
                    Some(Metric {
                        histogram: Some(histogram(peaks)?),
                        ..metric(labels)
                    })
                })
                .collect(),
        ),
    };
    MetricFamily {
        name,
        help: f.help.to_owned(),
        r#type: kind as i32,
        metric,
    }
}

/// A metric with `labels` and no value yet.
fn metric(labels: &Labels<'_>) -> Metric {
    Metric {
        label: labels
            .iter()
            .map(|(name, value)| LabelPair {
                name: (*name).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
        ..Metric::default()
    }
}

fn float(v: Number) -> f64 {
    match v {
        Number::Int(v) => v as f64,
        Number::Float(v) => v,
    }
}

/// A histogram sample: native for native peaks (None when it has no peak), classic for
/// classic ones.
fn histogram(peaks: &Peaks<'_>) -> Option<Histogram> {
    match peaks {
        Peaks::Native(n) if n.count == 0 => None,
        Peaks::Native(n) => Some(native_histogram(n)),
        Peaks::Classic { bounds, histogram } => {
            let mut cumulative = 0;
            let bucket = bounds
                .iter()
                .zip(&histogram.buckets)
                .map(|(b, n)| {
                    cumulative += n;
                    Bucket {
                        cumulative_count: cumulative,
                        upper_bound: *b as f64,
                    }
                })
                .collect();
            Some(Histogram {
                sample_count: histogram.count,
                sample_sum: histogram.sum as f64,
                bucket,
                ..Histogram::default()
            })
        }
    }
}

/// The peaks' buckets as spans of consecutive indices and count deltas.
pub(super) fn native_histogram(n: &NativePeaks) -> Histogram {
    let mut spans: Vec<BucketSpan> = Vec::new();
    let mut deltas = Vec::with_capacity(n.buckets.len());
    let (mut last_index, mut last_count): (Option<i32>, i64) = (None, 0);
    for &(index, count) in &n.buckets {
        match (last_index, spans.last_mut()) {
            (Some(last), Some(span)) if index == last + 1 => span.length += 1,
            (Some(last), _) => spans.push(BucketSpan {
                offset: index - last - 1,
                length: 1,
            }),
            (None, _) => spans.push(BucketSpan {
                offset: index,
                length: 1,
            }),
        }
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        deltas.push(count - last_count);
        (last_index, last_count) = (Some(index), count);
    }
    Histogram {
        sample_count: n.count,
        sample_sum: n.sum as f64,
        schema: native::SCHEMA,
        zero_threshold: 0.0,
        zero_count: 0,
        positive_span: spans,
        positive_delta: deltas,
        ..Histogram::default()
    }
}
