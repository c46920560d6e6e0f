//! GET /metrics: what the agent knows, in the Prometheus text format (prometheus-client's
//! OpenMetrics encoder), for Prometheus to scrape. Assembled at each scrape from the live
//! model and the agent's counters; nothing is kept between scrapes.
//!
//! Per function (label `function`), over the retained history:
//! - `emars_instance_peak_bytes`: histogram of instance peaks (the population of the
//!   function's own percentiles in `/v1/functions`), on every second of the recommender's
//!   bucket edges ([`peak_buckets`]), so `histogram_quantile` lands within one bucket of the
//!   agent's own percentile. It is a
//!   distribution of retained instances, not a counter: take quantiles of it as it is (no
//!   `rate()`); fleet-wide, `sum by (function, le)` over hosts.
//! - `emars_instances`, `emars_live_instances`, `emars_execs`, `emars_invocations`,
//!   `emars_oom_kills`: gauges over the retained days.
//! - `emars_recommended_max_bytes`, `emars_recommended_high_bytes`: the policy's limits.
//!
//! Per agent process: `emars_events_received_total`, `emars_events_lost_total`,
//! `emars_limit_writes_total{outcome}`, `emars_reactive_raises_total`,
//! `emars_admissions_total{answer}`, `emars_squeezes_total`, `emars_functions` and
//! `emars_max_functions` (gauges), `emars_functions_refused_total`, and per eBPF program
//! `emars_bpf_program_runs_total{program}` and `emars_bpf_program_run_seconds_total{program}`
//! (when the kernel's bpf_stats are on).
//!
//! Every labelled series is per function the store knows (at most `store.max_functions`), per
//! eBPF program, or per fixed outcome: nothing here grows with names a tenant makes up.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::model::{live::PeakHistogram, AgentInfo, FunctionSummary};

/// Upper bounds of the instance-peak histogram's buckets: every second edge of the
/// recommender's histogram (each of its buckets is 5% wider than the one before, after VPA),
/// from 2 MiB up to the first at or above 64 GiB: 83 buckets whose edges are the
/// recommender's own, at most 21% apart from 20 MiB up (11.5% from 200 MiB, 10.5% from 1 GiB).
pub fn peak_buckets() -> Vec<u64> {
    use crate::policy::recommend::DecayingHistogram as H;
    let mut out = Vec::new();
    for i in (1..H::bucket_count()).step_by(2) {
        let edge = H::bucket_upper_edge(i);
        out.push(edge);
        if edge >= 64 << 30 {
            break;
        }
    }
    out
}

/// One scrape's figures.
#[derive(Debug)]
pub struct Snapshot {
    pub bounds: Vec<u64>,
    pub peaks: Vec<(String, std::sync::Arc<PeakHistogram>)>,
    pub functions: Vec<FunctionSummary>,
    /// (function, memory.max, memory.high) as the policy recommends them now.
    pub limits: Vec<(String, u64, u64)>,
    pub info: AgentInfo,
}

impl Snapshot {
    /// The text exposition.
    pub fn render(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// One gauge per function.
fn per_function(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (String, u64)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (function, v) in values {
        let labels = [("function", function.as_str())];
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// One counter, unlabelled or with one label.
fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in values {
        if label.is_empty() {
            m.encode_counter::<NoLabelSet, _, u64>(v, None)?;
        } else {
            let labels = [(label, *value)];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        self.encode_peaks(&mut enc)?;
        self.encode_functions(&mut enc)?;
        self.encode_agent(&mut enc)?;
        self.encode_function_cap(&mut enc)?;
        self.encode_programs(&mut enc)
    }
}

impl Snapshot {
    /// The instance-peak histogram, per function.
    fn encode_peaks(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let mut m = enc.encode_descriptor(
            "emars_instance_peak_bytes",
            "Instance peaks of each function over its retained history (the kernel's watermark).",
            None,
            MetricType::Histogram,
        )?;
        for (function, h) in &self.peaks {
            let mut buckets: Vec<(f64, u64)> = self
                .bounds
                .iter()
                .zip(&h.buckets)
                .map(|(b, n)| (*b as f64, *n))
                .collect();
            let inside: u64 = h.buckets.iter().sum();
            buckets.push((f64::INFINITY, h.count.saturating_sub(inside)));
            let labels = [("function", function.as_str())];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum as f64,
                h.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }

    /// The per-function gauges: retained instances and what they did, the recommended limits.
    fn encode_functions(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let f = &self.functions;
        let each =
            |get: fn(&FunctionSummary) -> u64| f.iter().map(move |s| (s.name.clone(), get(s)));
        per_function(
            enc,
            "emars_instances",
            "Retained instances (live and ended).",
            each(|s| s.instances),
        )?;
        per_function(
            enc,
            "emars_live_instances",
            "Instances running now.",
            each(|s| s.live_instances),
        )?;
        per_function(
            enc,
            "emars_execs",
            "Execs in retained instances.",
            each(|s| s.execs),
        )?;
        per_function(
            enc,
            "emars_invocations",
            "Invocations reported or bound, retained days.",
            each(|s| s.invocations),
        )?;
        per_function(
            enc,
            "emars_oom_kills",
            "OOM kills in retained instances.",
            each(|s| s.oom_kills),
        )?;
        let limits = &self.limits;
        per_function(
            enc,
            "emars_recommended_max_bytes",
            "memory.max (v1 limit_in_bytes) the policy recommends now.",
            limits.iter().map(|(f, max, _)| (f.clone(), *max)),
        )?;
        per_function(
            enc,
            "emars_recommended_high_bytes",
            "memory.high (v1 soft_limit_in_bytes) the policy recommends now.",
            limits.iter().map(|(f, _, high)| (f.clone(), *high)),
        )?;
        Ok(())
    }

    /// The agent's counters: events, unnamed cgroups, limit writes, reactive mode.
    fn encode_agent(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let i = &self.info;
        counter(
            enc,
            "emars_events_received",
            "Kernel events read.",
            "",
            &[("", i.events_received)],
        )?;
        counter(
            enc,
            "emars_events_lost",
            "Kernel events the ring buffer had no room for.",
            "",
            &[("", i.events_lost)],
        )?;
        let unnamed: Vec<(&str, u64)> = i
            .cgroups_unnamed
            .iter()
            .map(|(why, n)| (why.as_str(), *n))
            .collect();
        counter(
            enc,
            "emars_cgroups_unnamed",
            "Cgroups a rule matched whose names cannot be used (not tracked), by reason.",
            "reason",
            &unnamed,
        )?;
        let e = &i.enforcement;
        counter(
            enc,
            "emars_limit_writes",
            "Limit writes by outcome (unchanged: the limits were in force, nothing written).",
            "outcome",
            &[
                ("ok", e.writes_ok),
                ("unchanged", e.unchanged),
                ("failed", e.writes_failed),
                ("refused", e.refusals),
            ],
        )?;
        let r = &i.reactive;
        counter(
            enc,
            "emars_reactive_raises",
            "Limits raised by the burst guard.",
            "",
            &[("", r.raises)],
        )?;
        counter(
            enc,
            "emars_admissions",
            "Admission answers.",
            "answer",
            &[("admit", r.admitted), ("refuse", r.refused)],
        )?;
        counter(
            enc,
            "emars_squeezes",
            "Idle instances squeezed under host memory pressure.",
            "",
            &[("", r.squeezes)],
        )?;
        Ok(())
    }

    /// Functions known, the cap on them, and the names it refused.
    fn encode_function_cap(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let i = &self.info;
        let known = self.functions.len() as u64;
        let mut m = enc.encode_descriptor(
            "emars_functions",
            "Functions the agent knows.",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&known)?;
        let cap = &i.function_cap;
        let mut m = enc.encode_descriptor(
            "emars_max_functions",
            "store.max_functions: functions the agent knows at most.",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&cap.max_functions)?;
        counter(
            enc,
            "emars_functions_refused",
            "New function names refused because store.max_functions were known (instances not \
             tracked, invocations reports and binds refused).",
            "",
            &[("", cap.refused)],
        )?;
        Ok(())
    }

    /// Per eBPF program, its runs and the time spent in it (kernel bpf_stats).
    fn encode_programs(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let i = &self.info;
        let progs: Vec<(&str, u64, u64)> = i
            .programs
            .iter()
            .filter(|p| p.attached)
            .filter_map(|p| Some((p.name.as_str(), p.run_count?, p.run_time_ns?)))
            .collect();
        counter(
            enc,
            "emars_bpf_program_runs",
            "Runs of each eBPF program (kernel bpf_stats).",
            "program",
            &progs.iter().map(|(n, c, _)| (*n, *c)).collect::<Vec<_>>(),
        )?;
        let mut m = enc.encode_descriptor(
            "emars_bpf_program_run_seconds",
            "Time spent in each eBPF program (kernel bpf_stats).",
            None,
            MetricType::Counter,
        )?;
        for (name, _, ns) in &progs {
            let labels = [("program", *name)];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, f64>(&(*ns as f64 / 1e9), None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_every_second_recommender_edge() {
        use crate::policy::recommend::DecayingHistogram as H;
        let b = peak_buckets();
        assert_eq!(b[0], H::bucket_upper_edge(1));
        assert_eq!(b[1], H::bucket_upper_edge(3));
        assert!(b
            .iter()
            .all(|e| H::bucket_upper_edge(H::bucket_of(*e) - 1) == *e));
        let last = *b.last().unwrap();
        assert!(last >= 64 << 30 && b[b.len() - 2] < 64 << 30, "{b:?}");
        let ratio = |w: &[u64]| w[1] as f64 / w[0] as f64;
        let from = |mib: u64| b.iter().position(|e| *e >= mib << 20).unwrap();
        assert!(b[from(20)..].windows(2).all(|w| ratio(w) < 1.21), "{b:?}");
        assert!(b[from(200)..].windows(2).all(|w| ratio(w) < 1.115), "{b:?}");
        assert!(
            b[from(1024)..].windows(2).all(|w| ratio(w) < 1.105),
            "{b:?}"
        );
        assert_eq!(b.len(), 83, "{b:?}");
    }

    #[test]
    fn exposition_has_the_histogram_and_the_counters() {
        let bounds = peak_buckets();
        let mut buckets = vec![0; bounds.len()];
        buckets[1] = 2; // two peaks in the second bucket
        let snap = Snapshot {
            peaks: vec![(
                "fn-a".into(),
                std::sync::Arc::new(PeakHistogram {
                    buckets,
                    count: 3,
                    sum: 100 << 30,
                }),
            )],
            bounds,
            functions: Vec::new(),
            limits: vec![("fn-a".into(), 64 << 20, 48 << 20)],
            info: AgentInfo {
                events_received: 7,
                function_cap: crate::model::FunctionCapInfo {
                    max_functions: 5,
                    refused: 11,
                },
                ..AgentInfo::default()
            },
        };
        let text = snap.render().unwrap();
        assert!(
            text.contains("# TYPE emars_instance_peak_bytes histogram"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "emars_instance_peak_bytes_bucket{{le=\"{}.0\",function=\"fn-a\"}} 2",
                peak_buckets()[1]
            )),
            "{text}"
        );
        assert!(
            text.contains("emars_instance_peak_bytes_bucket{le=\"+Inf\",function=\"fn-a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("emars_instance_peak_bytes_count{function=\"fn-a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("emars_recommended_max_bytes{function=\"fn-a\"} 67108864"),
            "{text}"
        );
        assert!(text.contains("emars_events_received_total 7"), "{text}");
        assert!(
            text.contains("emars_limit_writes_total{outcome=\"unchanged\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("\nemars_functions_refused_total 11\n"),
            "{text}"
        );
        assert!(text.contains("\nemars_max_functions 5\n"), "{text}");
        assert!(text.contains("\nemars_functions 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
