//! GET /metrics: what the agent knows, for Prometheus to scrape. Assembled at each scrape from
//! the live model and the agent's counters; nothing is kept between scrapes.
//!
//! Two formats, by the request's `Accept` ([`Format::of_accept`]), written from one list of
//! metric families ([`Snapshot::families`]), so that both carry the same metrics:
//! - the text format (OpenMetrics, prometheus-client's encoder: [`text`]), by default;
//! - Prometheus's protobuf format ([`PROTOBUF`]: length-delimited `io.prometheus.client.MetricFamily`
//!   messages, [`protobuf`]), which Prometheus asks for when run with
//!   `--enable-feature=native-histograms`.
//!
//! They differ in one thing: `emars_instance_peak_bytes` is a classic histogram in text (the
//! 83 buckets of [`peak_buckets`]) and a native histogram in protobuf (schema 4, buckets
//! 4.4 % apart: [`crate::model::native`]), some 10 to 60 sparse buckets a function.
//!
//! Per function (label `function`), over the retained history:
//! - `emars_instance_peak_bytes`: histogram of instance peaks (the population of the
//!   function's own percentiles in `/v1/functions`). It is a distribution of retained
//!   instances, not a counter: take quantiles of it as it is (no `rate()`); fleet-wide, sum it
//!   over hosts (`sum by (function)` of the native histogram, `sum by (function, le)` of the
//!   classic buckets).
//! - `emars_instances`, `emars_live_instances`, `emars_execs`, `emars_invocations`,
//!   `emars_kernel_connections`, `emars_kernel_requests`, `emars_oom_kills`: gauges over the
//!   retained days.
//! - `emars_requests_per_hour{function, source}`: the busiest retained hour's requests, counted
//!   from `source` ([`crate::model::RequestSource`]: one series per function).
//! - `emars_recommended_max_bytes`, `emars_recommended_high_bytes`: the policy's limits.
//!
//! Per Kubernetes container (an instance whose runtime metadata names its namespace, pod and
//! container: [`crate::model::containers`]): `emars_container_memory_peak_bytes{namespace, pod,
//! container, function}`, the instance's exact peak so far, in the label names VPA's
//! Prometheus history provider is told to read (docs/kubernetes.md); live containers and those
//! ended in the last 10 minutes, at most 10,000.
//!
//! Per agent process: `emars_agent_info{agent_id, version}` (1), `emars_events_received_total`,
//! `emars_events_lost_total`, `emars_limit_writes_total{outcome}`, `emars_reactive_raises_total`,
//! `emars_admissions_total{answer}`, `emars_squeezes_total`, `emars_functions` and
//! `emars_max_functions` (gauges), `emars_functions_refused_total`, and per eBPF program
//! `emars_bpf_program_runs_total{program}` and `emars_bpf_program_run_seconds_total{program}`
//! (when the kernel's bpf_stats are on).
//!
//! Every labelled series is per function the store knows (at most `store.max_functions`), per
//! eBPF program, or per fixed outcome: nothing here grows with names a tenant makes up.

mod protobuf;
mod text;

use std::sync::Arc;

use crate::model::{
    containers::ContainerPeak,
    live::{NativePeaks, PeakHistogram},
    AgentInfo, FunctionSummary,
};

/// The media type of Prometheus's protobuf exposition, as this answers it.
pub const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// The media type of the text exposition.
pub const TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// Which exposition a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Protobuf,
}

impl Format {
    /// The format an `Accept` header asks for: protobuf when it accepts [`PROTOBUF`] (its
    /// `proto` and `encoding` parameters included) at a quality no text type beats, else text.
    pub fn of_accept(accept: Option<&str>) -> Format {
        let (mut protobuf, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let (mut q, mut proto, mut delimited) = (1.0f32, false, false);
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.parse().unwrap_or(0.0),
                    "proto" => proto = v == "io.prometheus.client.MetricFamily",
                    "encoding" => delimited = v == "delimited",
                    _ => {}
                }
            }
            match media.as_str() {
                "application/vnd.google.protobuf" if proto && delimited => {
                    protobuf = protobuf.max(q);
                }
                "application/openmetrics-text" | "text/plain" | "text/*" | "*/*" => {
                    text = text.max(q);
                }
                _ => {}
            }
        }
        if protobuf > 0.0 && protobuf >= text {
            Format::Protobuf
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT,
            Format::Protobuf => PROTOBUF,
        }
    }
}

/// Each function's instance peaks, in the buckets the format carries.
#[derive(Debug)]
pub enum PeakBuckets {
    /// Classic buckets: the upper bounds ([`peak_buckets`]) and each function's counts.
    Classic {
        bounds: Vec<u64>,
        per_function: Vec<(String, Arc<PeakHistogram>)>,
    },
    /// Native-histogram buckets at schema 4.
    Native(Vec<(String, Arc<NativePeaks>)>),
}

/// One scrape's figures.
#[derive(Debug)]
pub struct Snapshot {
    pub peaks: PeakBuckets,
    pub functions: Vec<FunctionSummary>,
    /// (function, memory.max, memory.high) as the policy recommends them now.
    pub limits: Vec<(String, u64, u64)>,
    /// (function, bump) of each function's OOM kill younger than one half-life: what lifts
    /// the other hosts' limits at once (`[fleet] oom_query`).
    pub recent_oom: Vec<(String, u64)>,
    /// Kubernetes containers' peaks.
    pub containers: Vec<ContainerPeak>,
    pub info: AgentInfo,
}

/// Why an exposition could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("text: {0}")]
    Text(#[from] std::fmt::Error),
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::EncodeError),
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(u64),
    Float(f64),
}

/// A function's peaks as one histogram sample.
#[derive(Debug, Clone, Copy)]
pub enum Peaks<'a> {
    Classic {
        bounds: &'a [u64],
        histogram: &'a PeakHistogram,
    },
    Native(&'a NativePeaks),
}

/// A series' labels: (name, value).
pub type Labels<'a> = Vec<(&'static str, &'a str)>;

/// The samples of a family, of its type.
#[derive(Debug)]
pub enum Samples<'a> {
    Gauges(Vec<(Labels<'a>, Number)>),
    Counters(Vec<(Labels<'a>, Number)>),
    Histograms(Vec<(Labels<'a>, Peaks<'a>)>),
}

/// A metric family: its name (a counter's without `_total`, which each encoder adds as its
/// format has it), help, and samples.
#[derive(Debug)]
pub struct Family<'a> {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Samples<'a>,
}

impl<'a> Family<'a> {
    /// One gauge per function.
    fn per_function(
        name: &'static str,
        help: &'static str,
        values: impl Iterator<Item = (&'a str, u64)>,
    ) -> Family<'a> {
        let samples = values
            .map(|(function, v)| (vec![("function", function)], Number::Int(v)))
            .collect();
        Family {
            name,
            help,
            samples: Samples::Gauges(samples),
        }
    }

    /// One unlabelled gauge.
    fn gauge(name: &'static str, help: &'static str, v: Number) -> Family<'a> {
        Family {
            name,
            help,
            samples: Samples::Gauges(vec![(Vec::new(), v)]),
        }
    }

    /// One unlabelled counter.
    fn counter(name: &'static str, help: &'static str, v: u64) -> Family<'a> {
        Family {
            name,
            help,
            samples: Samples::Counters(vec![(Vec::new(), Number::Int(v))]),
        }
    }

    /// One counter per value of `label`.
    fn counters(
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: impl Iterator<Item = (&'a str, Number)>,
    ) -> Family<'a> {
        let samples = values.map(|(l, v)| (vec![(label, l)], v)).collect();
        Family {
            name,
            help,
            samples: Samples::Counters(samples),
        }
    }
}

impl Snapshot {
    /// The exposition in `format`.
    pub fn render(self, format: Format) -> Result<Vec<u8>, EncodeError> {
        match format {
            Format::Text => Ok(text::render(self)?.into_bytes()),
            Format::Protobuf => Ok(protobuf::render(&self.families())?),
        }
    }

    /// Every metric family of the exposition, in its order: the one list both formats write.
    pub fn families(&self) -> Vec<Family<'_>> {
        let mut out = vec![self.identity(), self.peak_family()];
        out.extend(self.function_families());
        out.push(self.container_family());
        out.extend(self.agent_families());
        out.extend(self.fleet_families());
        out.extend(self.cap_families());
        out.extend(self.program_families());
        out
    }

    /// `emars_agent_info{agent_id, version} 1`: which agent these series are from.
    fn identity(&self) -> Family<'_> {
        let labels = vec![
            ("agent_id", self.info.agent_id.as_str()),
            ("version", self.info.version.as_str()),
        ];
        Family {
            name: "emars_agent_info",
            help: "This agent: its id (kept with its store) and version.",
            samples: Samples::Gauges(vec![(labels, Number::Int(1))]),
        }
    }

    /// The instance-peak histogram, per function.
    fn peak_family(&self) -> Family<'_> {
        let samples = match &self.peaks {
            PeakBuckets::Classic {
                bounds,
                per_function,
            } => per_function
                .iter()
                .map(|(f, h)| {
                    let peaks = Peaks::Classic {
                        bounds,
                        histogram: h,
                    };
                    (vec![("function", f.as_str())], peaks)
                })
                .collect(),
            PeakBuckets::Native(per_function) => per_function
                .iter()
                .map(|(f, n)| (vec![("function", f.as_str())], Peaks::Native(n)))
                .collect(),
        };
        Family {
            name: "emars_instance_peak_bytes",
            help: "Instance peaks of each function over its retained history (the kernel's watermark).",
            samples: Samples::Histograms(samples),
        }
    }

    /// The per-function gauges: retained instances and what they did, the recommended limits.
    fn function_families(&self) -> Vec<Family<'_>> {
        let f = &self.functions;
        let each = |get: fn(&FunctionSummary) -> u64| f.iter().map(move |s| (&*s.name, get(s)));
        let limits = &self.limits;
        vec![
            Family::per_function(
                "emars_instances",
                "Retained instances (live and ended).",
                each(|s| s.instances),
            ),
            Family::per_function(
                "emars_live_instances",
                "Instances running now.",
                each(|s| s.live_instances),
            ),
            Family::per_function(
                "emars_execs",
                "Execs in retained instances.",
                each(|s| s.execs),
            ),
            Family::per_function(
                "emars_invocations",
                "Invocations reported or bound, retained days.",
                each(|s| s.invocations),
            ),
            Family::per_function(
                "emars_kernel_connections",
                "Inbound TCP connections accepted by retained instances, counted in the kernel.",
                each(|s| s.connections),
            ),
            Family::per_function(
                "emars_kernel_requests",
                "HTTP/1.x requests received by retained instances, counted in the kernel.",
                each(|s| s.requests),
            ),
            Family {
                name: "emars_requests_per_hour",
                help: "Busiest retained hour's requests (the export's requests_per_hour), counted from `source`: platform (reported invocations), kernel_requests, kernel_connections or execs.",
                samples: Samples::Gauges(
                    f.iter()
                        .map(|s| {
                            let labels = vec![
                                ("function", s.name.as_str()),
                                ("source", s.requests_source.as_str()),
                            ];
                            (labels, Number::Int(s.requests_per_hour))
                        })
                        .collect(),
                ),
            },
            Family::per_function(
                "emars_oom_kills",
                "OOM kills in retained instances.",
                each(|s| s.oom_kills),
            ),
            Family::per_function(
                "emars_recommended_max_bytes",
                "memory.max (v1 limit_in_bytes) the policy recommends now.",
                limits.iter().map(|(f, max, _)| (f.as_str(), *max)),
            ),
            Family::per_function(
                "emars_recommended_high_bytes",
                "memory.high (v1 soft_limit_in_bytes) the policy recommends now.",
                limits.iter().map(|(f, _, high)| (f.as_str(), *high)),
            ),
            Family::per_function(
                "emars_recent_oom_bump_bytes",
                "VPA's bump of the limit of the function's most recent OOM kill, while younger than one half-life (lifts the fleet's limits at once).",
                self.recent_oom.iter().map(|(f, b)| (f.as_str(), *b)),
            ),
        ]
    }

    /// Fleet learning (`[fleet]`): whether a fleet view is in use, the fetches, the view.
    fn fleet_families(&self) -> Vec<Family<'_>> {
        let f = &self.info.fleet;
        let mut out = vec![
            Family::gauge(
                "emars_fleet_up",
                "1 while a fleet view from Prometheus is blended into the recommendations; 0 on local history alone (off, failing too long, or none fetched yet).",
                Number::Int(u64::from(f.in_use)),
            ),
            Family::counters(
                "emars_fleet_refreshes",
                "Fleet fetches from Prometheus, by outcome.",
                "outcome",
                [
                    ("ok", Number::Int(f.refreshes_ok)),
                    ("failed", Number::Int(f.refreshes_failed)),
                ]
                .into_iter(),
            ),
            Family::gauge(
                "emars_fleet_functions",
                "Functions in the fleet view in use.",
                Number::Int(f.functions),
            ),
        ];
        if let Some(age) = f.age_s {
            out.push(Family::gauge(
                "emars_fleet_age_seconds",
                "Age of the fleet view in use, since its fetch.",
                Number::Int(age),
            ));
        }
        out
    }

    /// Each Kubernetes container's peak so far.
    fn container_family(&self) -> Family<'_> {
        let samples = self
            .containers
            .iter()
            .map(|c| {
                let labels = vec![
                    ("namespace", c.names.namespace.as_str()),
                    ("pod", c.names.pod.as_str()),
                    ("container", c.names.container.as_str()),
                    ("function", c.function.as_str()),
                ];
                (labels, Number::Int(c.peak_bytes))
            })
            .collect();
        Family {
            name: "emars_container_memory_peak_bytes",
            help: "Peak memory of each Kubernetes container so far (the kernel's watermark), \
                   live ones and those ended in the last 10 minutes.",
            samples: Samples::Gauges(samples),
        }
    }

    /// The agent's counters: events, unnamed cgroups, limit writes, reactive mode.
    fn agent_families(&self) -> Vec<Family<'_>> {
        let i = &self.info;
        let e = &i.enforcement;
        let r = &i.reactive;
        let int = |items: Vec<(&'static str, u64)>| {
            items
                .into_iter()
                .map(|(l, v)| (l, Number::Int(v)))
                .collect::<Vec<_>>()
        };
        vec![
            Family::counter(
                "emars_events_received",
                "Kernel events read.",
                i.events_received,
            ),
            Family::counter(
                "emars_events_lost",
                "Kernel events the ring buffer had no room for.",
                i.events_lost,
            ),
            Family::counters(
                "emars_cgroups_unnamed",
                "Cgroups a rule matched whose names cannot be used (not tracked), by reason.",
                "reason",
                i.cgroups_unnamed
                    .iter()
                    .map(|(why, n)| (why.as_str(), Number::Int(*n))),
            ),
            Family::counters(
                "emars_limit_writes",
                "Limit writes by outcome (unchanged: the limits were in force, nothing written).",
                "outcome",
                int(vec![
                    ("ok", e.writes_ok),
                    ("unchanged", e.unchanged),
                    ("failed", e.writes_failed),
                    ("refused", e.refusals),
                ])
                .into_iter(),
            ),
            Family::counter(
                "emars_reactive_raises",
                "Limits raised by the burst guard.",
                r.raises,
            ),
            Family::counters(
                "emars_admissions",
                "Admission answers.",
                "answer",
                int(vec![("admit", r.admitted), ("refuse", r.refused)]).into_iter(),
            ),
            Family::counter(
                "emars_squeezes",
                "Idle instances squeezed under host memory pressure.",
                r.squeezes,
            ),
        ]
    }

    /// Functions known, the cap on them, and the names it refused.
    fn cap_families(&self) -> Vec<Family<'_>> {
        let cap = &self.info.function_cap;
        vec![
            Family::gauge(
                "emars_functions",
                "Functions the agent knows.",
                Number::Int(self.functions.len() as u64),
            ),
            Family::gauge(
                "emars_max_functions",
                "store.max_functions: functions the agent knows at most.",
                Number::Int(cap.max_functions),
            ),
            Family::counter(
                "emars_functions_refused",
                "New function names refused because store.max_functions were known (instances \
                 not tracked, invocations reports and binds refused).",
                cap.refused,
            ),
        ]
    }

    /// Per eBPF program, its runs and the time spent in it (kernel bpf_stats).
    fn program_families(&self) -> Vec<Family<'_>> {
        let progs: Vec<(&str, u64, u64)> = self
            .info
            .programs
            .iter()
            .filter(|p| p.attached)
            .filter_map(|p| Some((p.name.as_str(), p.run_count?, p.run_time_ns?)))
            .collect();
        vec![
            Family::counters(
                "emars_bpf_program_runs",
                "Runs of each eBPF program (kernel bpf_stats).",
                "program",
                progs.iter().map(|(n, c, _)| (*n, Number::Int(*c))),
            ),
            Family::counters(
                "emars_bpf_program_run_seconds",
                "Time spent in each eBPF program (kernel bpf_stats).",
                "program",
                progs
                    .iter()
                    .map(|(n, _, ns)| (*n, Number::Float(*ns as f64 / 1e9))),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::protobuf::{MetricFamily, MetricType};
    use super::*;
    use crate::kernel::probes::ProgramStatus;
    use crate::model::native;

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

    /// Peaks of "fn-a" (three) and "fn-empty" (none yet).
    const PEAKS: [u64; 3] = [4 << 20, (4 << 20) + 1, 100 << 30];

    fn summary(name: &str) -> FunctionSummary {
        FunctionSummary {
            name: name.into(),
            instances: 3,
            live_instances: 1,
            execs: 4,
            invocations: 5,
            connections: 8,
            requests: 13,
            requests_source: crate::model::RequestSource::KernelRequests,
            requests_per_hour: 11,
            oom_kills: 6,
            peak_bytes: 0,
            peak_percentiles: Default::default(),
            first_seen_ms: 0,
            last_seen_ms: 0,
        }
    }

    /// A snapshot with a sample in every family, its peaks as `format` carries them.
    fn snapshot(format: Format) -> Snapshot {
        let peaks = match format {
            Format::Text => {
                let bounds = peak_buckets();
                let mut buckets = vec![0; bounds.len()];
                buckets[1] = 2; // two peaks in the second bucket, one above the last
                PeakBuckets::Classic {
                    bounds,
                    per_function: vec![(
                        "fn-a".into(),
                        Arc::new(PeakHistogram {
                            buckets,
                            count: 3,
                            sum: PEAKS.iter().sum(),
                        }),
                    )],
                }
            }
            Format::Protobuf => PeakBuckets::Native(vec![
                ("fn-a".into(), Arc::new(NativePeaks::of(PEAKS.into_iter()))),
                (
                    "fn-empty".into(),
                    Arc::new(NativePeaks::of([0].into_iter())),
                ),
            ]),
        };
        Snapshot {
            peaks,
            functions: vec![summary("fn-a"), summary("fn-empty")],
            limits: vec![("fn-a".into(), 64 << 20, 48 << 20)],
            recent_oom: vec![("fn-a".into(), 300 << 20)],
            containers: vec![ContainerPeak {
                names: crate::model::containers::KubernetesNames {
                    namespace: "shop".into(),
                    pod: "resize-1".into(),
                    container: "resize".into(),
                },
                function: "fn-a".into(),
                peak_bytes: 12 << 20,
                ended_at_ms: None,
            }],
            info: AgentInfo {
                agent_id: "0123456789abcdef0123456789abcdef".into(),
                version: "1.2.3".into(),
                events_received: 7,
                cgroups_unnamed: [("function_characters".to_string(), 2)].into(),
                programs: vec![ProgramStatus {
                    name: "on_exec".into(),
                    tracepoint: "sched:sched_process_exec".into(),
                    attached: true,
                    error: None,
                    run_count: Some(9),
                    run_time_ns: Some(1_500_000_000),
                }],
                function_cap: crate::model::FunctionCapInfo {
                    max_functions: 5,
                    refused: 11,
                },
                fleet: crate::model::FleetInfo {
                    in_use: true,
                    refreshes_ok: 12,
                    refreshes_failed: 1,
                    functions: 40,
                    age_s: Some(3),
                    ..Default::default()
                },
                ..AgentInfo::default()
            },
        }
    }

    fn decode(mut body: &[u8]) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        while !body.is_empty() {
            out.push(MetricFamily::decode_length_delimited(&mut body).unwrap());
        }
        out
    }

    #[test]
    fn text_exposition_has_the_histogram_and_the_counters() {
        let text = String::from_utf8(snapshot(Format::Text).render(Format::Text).unwrap()).unwrap();
        for line in [
            "# TYPE emars_instance_peak_bytes histogram\n".to_string(),
            format!(
                "emars_instance_peak_bytes_bucket{{le=\"{}.0\",function=\"fn-a\"}} 2\n",
                peak_buckets()[1]
            ),
            "emars_instance_peak_bytes_bucket{le=\"+Inf\",function=\"fn-a\"} 3\n".into(),
            "emars_instance_peak_bytes_count{function=\"fn-a\"} 3\n".into(),
            "emars_recommended_max_bytes{function=\"fn-a\"} 67108864\n".into(),
            "emars_oom_kills{function=\"fn-empty\"} 6\n".into(),
            "emars_kernel_connections{function=\"fn-a\"} 8\n".into(),
            "emars_kernel_requests{function=\"fn-a\"} 13\n".into(),
            "emars_requests_per_hour{function=\"fn-a\",source=\"kernel_requests\"} 11\n".into(),
            "emars_container_memory_peak_bytes{namespace=\"shop\",pod=\"resize-1\",\
             container=\"resize\",function=\"fn-a\"} 12582912\n"
                .into(),
            "\nemars_events_received_total 7\n".into(),
            "emars_limit_writes_total{outcome=\"unchanged\"} 0\n".into(),
            "emars_cgroups_unnamed_total{reason=\"function_characters\"} 2\n".into(),
            "emars_bpf_program_run_seconds_total{program=\"on_exec\"} 1.5\n".into(),
            "\nemars_functions_refused_total 11\n".into(),
            "\nemars_max_functions 5\n".into(),
            "\nemars_functions 2\n".into(),
            "emars_recent_oom_bump_bytes{function=\"fn-a\"} 314572800\n".into(),
            "\nemars_fleet_up 1\n".into(),
            "emars_fleet_refreshes_total{outcome=\"failed\"} 1\n".into(),
            "\nemars_fleet_functions 40\n".into(),
            "\nemars_fleet_age_seconds 3\n".into(),
            "\nemars_agent_info{agent_id=\"0123456789abcdef0123456789abcdef\",version=\"1.2.3\"} 1\n"
                .into(),
        ] {
            assert!(text.contains(&line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn protobuf_has_every_family_of_the_text_and_native_peaks() {
        let text = String::from_utf8(snapshot(Format::Text).render(Format::Text).unwrap()).unwrap();
        // (name of the series, type) of every family the text declares ...
        let declared: BTreeSet<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                let series = match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_owned(),
                };
                (series, kind.to_owned())
            })
            .collect();
        // ... is a family of the protobuf, of the same type.
        let families = decode(&snapshot(Format::Protobuf).render(Format::Protobuf).unwrap());
        let kind = |t: i32| match MetricType::try_from(t) {
            Ok(MetricType::Counter) => "counter",
            Ok(MetricType::Gauge) => "gauge",
            Ok(MetricType::Histogram) => "histogram",
            Err(_) => "unknown",
        };
        let written: BTreeSet<(String, String)> = families
            .iter()
            .map(|f| (f.name.clone(), kind(f.r#type).to_owned()))
            .collect();
        assert_eq!(declared, written);
        assert_eq!(declared.len(), 30, "{declared:?}");

        let family = |name: &str| families.iter().find(|f| f.name == name).unwrap();
        let info = &family("emars_agent_info").metric[0];
        let labels: Vec<(&str, &str)> = info
            .label
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("agent_id", "0123456789abcdef0123456789abcdef"),
                ("version", "1.2.3")
            ]
        );
        assert_eq!(info.gauge.as_ref().unwrap().value, 1.0);
        let seconds = &family("emars_bpf_program_run_seconds_total").metric[0];
        assert_eq!(seconds.counter.as_ref().unwrap().value, 1.5);

        // The peaks: one native histogram, for the function that has peaks.
        let peaks = family("emars_instance_peak_bytes");
        assert_eq!(peaks.metric.len(), 1, "{peaks:?}");
        assert_eq!(peaks.metric[0].label[0].value, "fn-a");
        let h = peaks.metric[0].histogram.as_ref().unwrap();
        assert_eq!(h.schema, 4);
        assert_eq!(
            (h.sample_count, h.zero_count, h.zero_threshold),
            (3, 0, 0.0)
        );
        assert_eq!(h.sample_sum, PEAKS.iter().sum::<u64>() as f64);
        assert!(h.bucket.is_empty(), "no classic buckets: {h:?}");
        // Read back as Prometheus does: each peak in the bucket whose bounds hold it.
        let mut index = 0;
        let mut count = 0i64;
        let mut deltas = h.positive_delta.iter();
        let mut read = Vec::new();
        for span in &h.positive_span {
            index += span.offset;
            for _ in 0..span.length {
                count += deltas.next().unwrap();
                read.push((index, count));
                index += 1;
            }
        }
        assert_eq!(deltas.next(), None);
        let at = |i: i32| (native::upper_bound(i - 1), native::upper_bound(i));
        // 4 MiB is a bucket's upper bound: one byte more is in the next bucket.
        assert_eq!(read.len(), 3, "{read:?}");
        for (peak, (i, n)) in PEAKS.iter().zip(&read) {
            let (low, high) = at(*i);
            assert!(
                low < *peak as f64 && *peak as f64 <= high,
                "{peak}: {read:?}"
            );
            assert_eq!(*n, 1, "{read:?}");
        }
        assert_eq!(read[1].0, read[0].0 + 1, "{read:?}");
        assert_eq!(read.iter().map(|(_, n)| n).sum::<i64>(), 3, "{read:?}");
    }

    #[test]
    fn native_buckets_become_spans_and_deltas() {
        let n = NativePeaks {
            buckets: vec![(5, 2), (6, 1), (7, 4), (10, 4), (11, 1), (20, 3)],
            count: 15,
            sum: 1,
        };
        let h = protobuf::native_histogram(&n);
        let spans: Vec<(i32, u32)> = h
            .positive_span
            .iter()
            .map(|s| (s.offset, s.length))
            .collect();
        assert_eq!(spans, [(5, 3), (2, 2), (8, 1)]);
        assert_eq!(h.positive_delta, [2, -1, 3, 0, -3, 2]);
    }

    #[test]
    fn peaks_fall_in_their_native_buckets() {
        let n = NativePeaks::of([0, 1 << 20, 1 << 20, (1 << 20) + 1, 3].into_iter());
        let one_mib = native::bucket_index(1 << 20);
        assert_eq!(
            n.buckets,
            [(native::bucket_index(3), 1), (one_mib, 2), (one_mib + 1, 1)]
        );
        assert_eq!((n.count, n.sum), (4, (3 << 20) + 4));
    }

    #[test]
    fn accept_picks_the_format() {
        // What Prometheus 2.42 sends with and without --enable-feature=native-histograms
        // (scrape/scrape.go).
        let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
            encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,\
            */*;q=0.1";
        let classic = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::of_accept(Some(native)), Format::Protobuf);
        assert_eq!(Format::of_accept(Some(classic)), Format::Text);
        assert_eq!(Format::of_accept(None), Format::Text);
        assert_eq!(Format::of_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::of_accept(Some(PROTOBUF)), Format::Protobuf);
        // Text preferred, protobuf refused, or another protobuf message or encoding.
        let text_first = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
            encoding=delimited;q=0.5,text/plain;q=0.9";
        assert_eq!(Format::of_accept(Some(text_first)), Format::Text);
        let refused = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
            encoding=delimited;q=0";
        assert_eq!(Format::of_accept(Some(refused)), Format::Text);
        let other =
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text";
        assert_eq!(Format::of_accept(Some(other)), Format::Text);
    }
}
