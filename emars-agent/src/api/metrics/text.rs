//! The text exposition (OpenMetrics), written by prometheus-client's encoder from the
//! snapshot's families. A native-histogram sample is written as a classic one whose buckets
//! are its own (the handler asks for classic buckets for text, so this is for completeness).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::{Family, Labels, Number, Peaks, Samples, Snapshot};
use crate::model::native;

type Fmt = Result<(), std::fmt::Error>;

/// The snapshot's families in the text format.
pub(super) fn render(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Text(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The snapshot as prometheus-client's registry takes it (it owns what it collects).
#[derive(Debug)]
struct Text(Snapshot);

impl Collector for Text {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        for family in self.0.families() {
            encode_family(&mut enc, &family)?;
        }
        Ok(())
    }
}

fn encode_family(enc: &mut DescriptorEncoder, f: &Family<'_>) -> Fmt {
    let kind = match f.samples {
        Samples::Gauges(_) => MetricType::Gauge,
        Samples::Counters(_) => MetricType::Counter,
        Samples::Histograms(_) => MetricType::Histogram,
    };
    let mut m = enc.encode_descriptor(f.name, f.help, None, kind)?;
    match &f.samples {
        Samples::Gauges(samples) => {
            for (labels, v) in samples {
                labelled(&mut m, labels, |m| match v {
                    Number::Int(v) => m.encode_gauge(v),
                    Number::Float(v) => m.encode_gauge(v),
                })?;
            }
        }
        Samples::Counters(samples) => {
            for (labels, v) in samples {
                labelled(&mut m, labels, |m| match v {
                    Number::Int(v) => m.encode_counter::<NoLabelSet, _, u64>(v, None),
                    Number::Float(v) => m.encode_counter::<NoLabelSet, _, f64>(v, None),
                })?;
            }
        }
        Samples::Histograms(samples) => {
            for (labels, peaks) in samples {
                let (sum, count, buckets) = classic(peaks);
                labelled(&mut m, labels, |m| {
                    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
                })?;
            }
        }
    }
    Ok(())
}

/// Writes one sample with `labels` (none: on the family's own line).
fn labelled(
    m: &mut MetricEncoder,
    labels: &Labels<'_>,
    write: impl FnOnce(&mut MetricEncoder) -> Fmt,
) -> Fmt {
    if labels.is_empty() {
        write(m)
    } else {
        write(&mut m.encode_family(labels)?)
    }
}

/// (sum, count, (upper bound, peaks in the bucket) up to +Inf) of a histogram sample.
fn classic(peaks: &Peaks<'_>) -> (f64, u64, Vec<(f64, u64)>) {
    match peaks {
        Peaks::Classic { bounds, histogram } => {
            let mut buckets: Vec<(f64, u64)> = bounds
                .iter()
                .zip(&histogram.buckets)
                .map(|(b, n)| (*b as f64, *n))
                .collect();
            let inside: u64 = histogram.buckets.iter().sum();
            buckets.push((f64::INFINITY, histogram.count.saturating_sub(inside)));
            (histogram.sum as f64, histogram.count, buckets)
        }
        Peaks::Native(n) => {
            let mut buckets: Vec<(f64, u64)> = n
                .buckets
                .iter()
                .map(|(i, c)| (native::upper_bound(*i), *c))
                .collect();
            buckets.push((f64::INFINITY, 0));
            (n.sum as f64, n.count, buckets)
        }
    }
}
