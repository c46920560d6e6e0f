//! What the commands print of the API's answers: `emars info`, `functions`, `function NAME`,
//! `recommend`, `generations`, `audit` (and `apply`, `set-limit`) and `admit`, as text tables.
//! Text from the agent is shown through [`clean`], so it cannot drive the terminal.

use std::fmt::Write as _;

use crate::api::wire::{
    Admission, AgentInfo, AuditRecord, FunctionSummary, Generation, HourBucket, InstanceRecord,
    Recommendation,
};
use crate::model::PeakSource;
use crate::view::text::{clean, count, format_time_ms, human_bytes, human_ms, table, Align};

/// Hour buckets shown by [`render_function`] (the most recent ones).
pub const SHOWN_HOURS: usize = 24;
/// Instances shown by [`render_function`] (the most recent ones).
pub const SHOWN_INSTANCES: usize = 20;

fn opt_u64(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// `emars admit`: the answer in one line, then its figures.
pub fn render_admission(a: &Admission) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    format!(
        "{}: {}\n  predicted memory.max: {}\n  available above the reserve: {}\n",
        if a.admit { "admit" } else { "refuse" },
        clean(&a.reason),
        a.predicted_bytes
            .map_or_else(|| "none (no history)".to_owned(), mib),
        mib(a.available_bytes)
    )
}

/// Agent status for `emars info`: what runs where, the model, the reactive side, the
/// policy, then the programs, features, fallbacks and notes.
pub fn render_info(v: &AgentInfo) -> String {
    let mut out = String::new();
    info_agent(&mut out, v);
    info_model(&mut out, v);
    info_reactive(&mut out, v);
    info_policy(&mut out, v);
    info_fleet(&mut out, v);
    info_programs(&mut out, v);
    info_lists(&mut out, v);
    out
}

/// The agent, its kernel and cgroups, the kernel side and its events, what was not tracked.
fn info_agent(out: &mut String, v: &AgentInfo) {
    let _ = writeln!(out, "EMARS agent {}", clean(&v.version));
    if !v.agent_id.is_empty() {
        let _ = writeln!(out, "  agent id:         {}", clean(&v.agent_id));
    }
    let _ = writeln!(
        out,
        "  started:          {} UTC",
        format_time_ms(v.started_at_ms)
    );
    let _ = writeln!(out, "  kernel:           {}", clean(&v.kernel));
    let _ = writeln!(
        out,
        "  cgroup mode:      {} (memory hierarchy at {})",
        clean(&v.cgroup_mode),
        clean(&v.memory_hierarchy)
    );
    if v.roots.is_empty() {
        let _ = writeln!(out, "  watched roots:    none");
    }
    for (i, root) in v.roots.iter().enumerate() {
        let label = if i == 0 { "watched roots:" } else { "" };
        let _ = writeln!(out, "  {label:<16}  {}", clean(root));
    }
    match &v.probes_pinned {
        Some(dir) => {
            let _ = writeln!(
                out,
                "  kernel side:      pinned at {}{} (records while no agent runs)",
                clean(dir),
                if v.probes_adopted {
                    ", adopted from the last run"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  kernel side:      not pinned (detaches when the agent stops)"
            );
        }
    }
    let _ = write!(
        out,
        "  events:           {} received, {} lost",
        v.events_received, v.events_lost
    );
    if v.events_lost > 0 {
        out.push_str(" (ring buffer was full: some kernel events were dropped)");
    }
    out.push('\n');
    if v.instances_reconciled > 0 {
        let _ = writeln!(
            out,
            "  reconciled:       {} closed without an rmdir event",
            count(v.instances_reconciled, "instance", "instances")
        );
    }
    let cm = &v.container_metadata;
    if cm.waited > 0 || cm.waiting > 0 {
        let _ = writeln!(
            out,
            "  container names:  {} from runtime metadata after a wait, {} by a later rule, {} waiting",
            cm.named_after_wait, cm.fallbacks, cm.waiting
        );
    }
    let unnamed: Vec<String> = v
        .cgroups_unnamed
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(why, n)| format!("{n} {why}"))
        .collect();
    if !unnamed.is_empty() {
        let _ = writeln!(
            out,
            "  not tracked:      {} (cgroups whose rule gives an unusable name: see the agent's \
             log and \"Names\" in docs/config.md)",
            unnamed.join(", ")
        );
    }
}

/// The live model, the cap on functions, a store moved aside.
fn info_model(out: &mut String, v: &AgentInfo) {
    let m = &v.model;
    let _ = writeln!(
        out,
        "  live model:       {}, {} live and {} ended instances, {} ({:.1} MB)",
        count(m.functions, "function", "functions"),
        m.live,
        m.ended,
        count(m.hours, "hour bucket", "hour buckets"),
        m.bytes as f64 / 1e6
    );
    let cap = &v.function_cap;
    if cap.refused > 0 {
        let _ = writeln!(
            out,
            "  function cap:     {} refused (store.max_functions = {})",
            count(cap.refused, "new function name", "new function names"),
            cap.max_functions
        );
    }
    if let Some(m) = &v.store_moved_aside {
        let _ = writeln!(
            out,
            "  !! store:         corrupt at this start ({}), moved aside to {}{}; this agent \
             started on a fresh one",
            clean(&m.reason),
            clean(&m.path),
            if m.again {
                " (the second time in a row: check the disk)"
            } else {
                ""
            }
        );
    }
}

/// The burst guard, the squeeze and admission.
fn info_reactive(out: &mut String, v: &AgentInfo) {
    let r = &v.reactive;
    let ms = |us: Option<u64>| {
        us.map_or_else(|| "-".to_owned(), |u| format!("{:.2}", u as f64 / 1000.0))
    };
    if r.enabled {
        let _ = writeln!(
            out,
            "  reactive:         on, {}; {} watched, {}, {} denied, signal → write \
             p50/p99/max {} / {} / {} ms",
            clean(&r.signal),
            count(r.watched, "instance", "instances"),
            count(r.raises, "raise", "raises"),
            r.denied,
            ms(r.reaction_p50_us),
            ms(r.reaction_p99_us),
            ms(r.reaction_max_us)
        );
    } else {
        let _ = writeln!(out, "  reactive:         off");
    }
    if r.squeeze {
        let _ = writeln!(
            out,
            "  squeeze:          {}, {} squeezed ({} held now), {:.1} MB reclaimed, {} \
             released, {} failed; watching {}",
            count(r.pressure_signals, "pressure signal", "pressure signals"),
            r.squeezes,
            r.squeezed_now,
            r.reclaimed_bytes as f64 / 1e6,
            r.releases,
            r.squeeze_failed,
            clean(&r.pressure_sources.join(", "))
        );
        for e in &r.pressure_errors {
            let _ = writeln!(out, "  squeeze: not armed: {}", clean(e));
        }
    }
    let _ = writeln!(
        out,
        "  admission:        {} admitted, {} refused",
        r.admitted, r.refused
    );
}

/// The policy's mode and its limit writes.
fn info_policy(out: &mut String, v: &AgentInfo) {
    let e = &v.enforcement;
    if !e.mode.is_empty() {
        let _ = writeln!(
            out,
            "  policy:           {} mode; {} ok, {} failed, {} refused; {} into new \
             instances, slowest mkdir → write {} µs",
            clean(&e.mode),
            count(e.writes_ok, "limit write", "limit writes"),
            e.writes_failed,
            e.refusals,
            e.new_instance_writes,
            e.max_mkdir_to_write_us
        );
    }
}

/// Fleet learning: its state, and why the agent is on local history when it is.
fn info_fleet(out: &mut String, v: &AgentInfo) {
    let f = &v.fleet;
    if f.state.is_empty() {
        return; // an agent from before fleet learning
    }
    let mut line = format!("  fleet:            {}", clean(&f.state));
    if f.in_use {
        let _ = write!(
            line,
            "; {} functions, {:.0} samples from {}",
            f.functions,
            f.samples,
            clean(&f.prometheus_url)
        );
        if let Some(age) = f.age_s {
            let _ = write!(line, ", {age} s old");
        }
    }
    if let Some(why) = &f.reason {
        let _ = write!(line, " ({})", clean(why));
    }
    let _ = writeln!(out, "{line}");
}

/// The kernel programs, as a table.
fn info_programs(out: &mut String, v: &AgentInfo) {
    out.push_str("\nprograms:\n");
    if v.programs.is_empty() {
        out.push_str("  none loaded\n");
    } else {
        let rows: Vec<Vec<String>> = v
            .programs
            .iter()
            .map(|p| {
                vec![
                    clean(&p.name),
                    clean(&p.tracepoint),
                    if p.attached { "✓" } else { "✗" }.to_string(),
                    opt_u64(p.run_count),
                    opt_u64(p.run_time_ns),
                    p.error.as_deref().map_or_else(String::new, clean),
                ]
            })
            .collect();
        let t = table(
            &[
                ("NAME", Align::Left),
                ("TRACEPOINT", Align::Left),
                ("ATTACHED", Align::Left),
                ("RUNS", Align::Right),
                ("RUN NS", Align::Right),
                ("ERROR", Align::Left),
            ],
            &rows,
        );
        for line in t.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
}

/// Features probed, fallbacks taken, notes on the configuration.
fn info_lists(out: &mut String, v: &AgentInfo) {
    out.push_str("\nfeatures:\n");
    if v.features.is_empty() {
        out.push_str("  none probed\n");
    }
    for (name, present) in &v.features {
        let mark = if *present { "✓" } else { "✗" };
        let _ = writeln!(out, "  {mark} {}", clean(name));
    }

    out.push_str("\nfallbacks:\n");
    if v.fallbacks.is_empty() {
        out.push_str("  none\n");
    }
    for f in &v.fallbacks {
        let _ = writeln!(out, "  - {}", clean(f));
    }
    if !v.notes.is_empty() {
        out.push_str("\nas configured:\n");
    }
    for n in &v.notes {
        let _ = writeln!(out, "  - {}", clean(n));
    }
}

/// Table of functions for `emars functions`.
pub fn render_functions(v: &[FunctionSummary]) -> String {
    if v.is_empty() {
        return "no functions recorded yet\n".to_string();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|f| {
            vec![
                clean(&f.name),
                f.instances.to_string(),
                f.live_instances.to_string(),
                f.execs.to_string(),
                f.invocations.to_string(),
                f.requests_per_hour.to_string(),
                f.requests_source.to_string(),
                f.oom_kills.to_string(),
                human_bytes(f.peak_bytes),
                human_bytes(f.peak_percentiles.p50),
                human_bytes(f.peak_percentiles.p95),
            ]
        })
        .collect();
    table(
        &[
            ("NAME", Align::Left),
            ("INSTANCES", Align::Right),
            ("LIVE", Align::Right),
            ("EXECS", Align::Right),
            ("INVOCATIONS", Align::Right),
            ("REQ/H", Align::Right),
            ("COUNTED FROM", Align::Left),
            ("OOM", Align::Right),
            ("PEAK", Align::Right),
            ("P50", Align::Right),
            ("P95", Align::Right),
        ],
        &rows,
    )
}

fn peak_source(s: PeakSource) -> &'static str {
    match s {
        PeakSource::None => "none",
        PeakSource::KernelWatermark => "watermark",
        PeakSource::ChargeEvents => "charge events",
        PeakSource::UseWatermark => "use watermark",
        PeakSource::LifetimeWatermark => "lifetime watermark (pooled, inexact)",
    }
}

/// One function for `emars function NAME`: the summary, the last [`SHOWN_HOURS`] hour
/// buckets (oldest first) and the last [`SHOWN_INSTANCES`] instances (newest first).
/// `hours` and `instances` are expected oldest first, as the API returns them.
pub fn render_function(
    s: &FunctionSummary,
    hours: &[HourBucket],
    instances: &[InstanceRecord],
) -> String {
    let mut out = String::new();
    function_summary(&mut out, s);
    out.push('\n');
    function_hours(&mut out, hours);
    out.push('\n');
    function_instances(&mut out, instances);
    out
}

/// A function's summary: counts, peak and percentiles, first and last seen.
fn function_summary(out: &mut String, s: &FunctionSummary) {
    let p = &s.peak_percentiles;
    let _ = writeln!(out, "function {}", clean(&s.name));
    let _ = writeln!(
        out,
        "  instances:    {} ({} live)",
        s.instances, s.live_instances
    );
    let _ = writeln!(out, "  execs:        {}", s.execs);
    let _ = writeln!(out, "  invocations:  {} (platform-reported)", s.invocations);
    let _ = writeln!(out, "  requests:     {} (kernel: HTTP)", s.requests);
    let _ = writeln!(out, "  connections:  {} (kernel: TCP)", s.connections);
    let _ = writeln!(
        out,
        "  requests/h:   {} at the busiest hour ({})",
        s.requests_per_hour,
        s.requests_source.describe()
    );
    let _ = writeln!(out, "  OOM kills:    {}", s.oom_kills);
    let _ = writeln!(out, "  peak:         {}", human_bytes(s.peak_bytes));
    let _ = writeln!(
        out,
        "  percentiles:  p50 {}  p90 {}  p95 {}  p99 {}",
        human_bytes(p.p50),
        human_bytes(p.p90),
        human_bytes(p.p95),
        human_bytes(p.p99)
    );
    let _ = writeln!(
        out,
        "  first seen:   {} UTC",
        format_time_ms(s.first_seen_ms)
    );
    let _ = writeln!(
        out,
        "  last seen:    {} UTC",
        format_time_ms(s.last_seen_ms)
    );
}

/// The last [`SHOWN_HOURS`] of `hours` (oldest first), as a table.
fn function_hours(out: &mut String, hours: &[HourBucket]) {
    if hours.is_empty() {
        out.push_str("hours: none recorded\n");
    } else {
        let shown = &hours[hours.len().saturating_sub(SHOWN_HOURS)..];
        let _ = writeln!(out, "hours (UTC), last {} of {}:", shown.len(), hours.len());
        let rows: Vec<Vec<String>> = shown
            .iter()
            .map(|h| {
                let mut t = format_time_ms(h.hour_start_ms);
                t.truncate(16); // drop the seconds: "YYYY-MM-DD HH:MM"
                vec![
                    t,
                    h.instances_started.to_string(),
                    h.execs.to_string(),
                    h.invocations.to_string(),
                    h.requests.to_string(),
                    h.connections.to_string(),
                    h.oom_kills.to_string(),
                    human_bytes(h.peak_bytes),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("HOUR", Align::Left),
                ("STARTED", Align::Right),
                ("EXECS", Align::Right),
                ("INVOCATIONS", Align::Right),
                ("HTTP REQS", Align::Right),
                ("CONNS", Align::Right),
                ("OOM", Align::Right),
                ("PEAK", Align::Right),
            ],
            &rows,
        ));
    }
}

/// The last [`SHOWN_INSTANCES`] of `instances` (given oldest first), newest first.
fn function_instances(out: &mut String, instances: &[InstanceRecord]) {
    if instances.is_empty() {
        out.push_str("instances: none recorded\n");
    } else {
        let n = instances.len().min(SHOWN_INSTANCES);
        let _ = writeln!(
            out,
            "recent instances, newest first ({n} of {}):",
            instances.len()
        );
        let rows: Vec<Vec<String>> = instances
            .iter()
            .rev()
            .take(n)
            .map(|i| {
                vec![
                    clean(&i.instance),
                    i.cgroup_id.to_string(),
                    format_time_ms(i.started_at_ms),
                    i.ended_at_ms
                        .map_or_else(|| "live".to_string(), format_time_ms),
                    i.execs.to_string(),
                    i.requests.to_string(),
                    i.connections.to_string(),
                    human_bytes(i.peak_bytes),
                    peak_source(i.peak_source).to_string(),
                    i.oom_kills.to_string(),
                    i.limits
                        .max_bytes
                        .map_or_else(|| "none".to_string(), human_bytes),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("INSTANCE", Align::Left),
                ("CGROUP ID", Align::Right),
                ("STARTED", Align::Left),
                ("ENDED", Align::Left),
                ("EXECS", Align::Right),
                ("HTTP REQS", Align::Right),
                ("CONNS", Align::Right),
                ("PEAK", Align::Right),
                ("SOURCE", Align::Left),
                ("OOM", Align::Right),
                ("LIMIT", Align::Right),
            ],
            &rows,
        ));
    }
}

/// `emars recommend`: one line per function; with `detail`, the inputs behind the first one.
pub fn render_recommendations(list: &[Recommendation], detail: bool) -> String {
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>5} {:>4} {:>7}\n",
        "FUNCTION", "MAX", "HIGH", "P(PCT)", "SAMPLES", "OOM", "CONF", "PINNED"
    );
    for r in list {
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>10} {:>10} {:>8} {:>5} {:>4.2} {:>7}",
            r.function,
            human_bytes(r.max_bytes),
            human_bytes(r.high_bytes),
            human_bytes(r.percentile_bytes),
            r.samples,
            r.oom_kills,
            r.confidence,
            if r.pinned { "yes" } else { "no" },
        );
    }
    if let (true, Some(r)) = (detail, list.first()) {
        let _ = writeln!(
            out,
            "\nP{:.0} of instance peaks = {}, + margin {:.2} → max {}; high = max x fraction, not \
             below the median peak ({}); OOM bump: {}; clamped by: {}; half-life {} h",
            r.percentile,
            human_bytes(r.percentile_bytes),
            r.margin,
            human_bytes(r.max_bytes),
            human_bytes(r.p50_bytes),
            oom_bump_text(r),
            r.clamped_by.as_ref().map_or("nothing", |c| c.as_str()),
            r.half_life_hours,
        );
    }
    out
}

/// What the OOM kills in a recommendation's history did to its max, and why.
fn oom_bump_text(r: &Recommendation) -> String {
    let kills = count(r.oom_kills, "OOM-killed instance", "OOM-killed instances");
    match r.oom_bump_bytes {
        Some(b) => format!(
            "max raised to {} by an OOM kill within the last half-life (VPA's rule: max(its \
             limit + 100 MiB, limit x 1.2))",
            human_bytes(b)
        ),
        None if r.oom_kills == 0 => "none (no OOM kill in the history)".to_owned(),
        None if r.pinned => format!("none: the pinned max wins over the {kills}"),
        None => format!(
            "none needed: {} in the percentile at {} bumped size (max(limit + 100 MiB, limit x \
             1.2)), and no kill within the last half-life ({} h) asks for more than max",
            if r.oom_kills == 1 {
                "the OOM-killed instance counts".to_owned()
            } else {
                format!("the {kills} count")
            },
            if r.oom_kills == 1 { "its" } else { "their" },
            r.half_life_hours
        ),
    }
}

/// `emars generations` and `recommend --generate`: each generated config, newest first, with
/// its functions' lines.
pub fn render_generations(list: &[Generation]) -> String {
    if list.is_empty() {
        return "no configs generated yet (the first one comes at the agent's start, then every \
                policy.period_secs; `emars recommend --generate` makes one now)\n"
            .to_owned();
    }
    let mut out = String::new();
    for (i, g) in list.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "generated {} UTC ({}), {}:",
            format_time_ms(g.generated_at_ms),
            clean(&g.trigger),
            count(g.functions.len() as u64, "function", "functions")
        );
        let rows: Vec<Vec<String>> = g
            .functions
            .iter()
            .map(|f| {
                vec![
                    clean(&f.function),
                    f.requests_per_hour.to_string(),
                    f.requests_source.to_string(),
                    human_bytes(f.max_memory_bytes),
                    human_bytes(f.memory_max_bytes),
                    human_bytes(f.memory_high_bytes),
                    format!("{:.2}", f.confidence),
                    if f.pinned { "yes" } else { "no" }.to_owned(),
                    human_ms(f.prewarm_ms),
                    human_ms(f.keepalive_ms),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("FUNCTION", Align::Left),
                ("REQ/H", Align::Right),
                ("COUNTED FROM", Align::Left),
                ("MAX MEMORY", Align::Right),
                ("MEMORY.MAX", Align::Right),
                ("MEMORY.HIGH", Align::Right),
                ("CONF", Align::Right),
                ("PINNED", Align::Left),
                ("PREWARM", Align::Right),
                ("KEEPALIVE", Align::Right),
            ],
            &rows,
        ));
    }
    out.push_str(
        "\nREQ/H: the busiest hour's requests, counted from the platform's reported invocations, \
         else HTTP requests counted in the kernel (kernel_requests), else TCP connections counted \
         in the kernel (kernel_connections), else execs (every exec counts, a wrapper's too); MAX \
         MEMORY: the largest instance peak seen\n",
    );
    out
}

/// `emars audit`, `apply`, `set-limit`: one line per write attempt.
pub fn render_audit(list: &[AuditRecord]) -> String {
    let lim = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_bytes);
    let mut out = format!(
        "{:<20} {:<16} {:<14} {:<12} {:>10} {:>10} {:>10} {:>10} {:>8}  OUTCOME\n",
        "TIME",
        "FUNCTION",
        "INSTANCE",
        "REASON",
        "OLD MAX",
        "NEW MAX",
        "OLD HIGH",
        "NEW HIGH",
        "DELAY"
    );
    for a in list {
        let outcome = match &a.error {
            Some(e) => format!("{}: {e}", a.outcome),
            None => a.outcome.to_string(),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<14} {:<12} {:>10} {:>10} {:>10} {:>10} {:>8}  {}",
            format_time_ms(a.at_ms),
            a.function,
            a.instance,
            a.reason,
            lim(a.old.max_bytes),
            lim(a.new.max_bytes),
            lim(a.old.high_bytes),
            lim(a.new.high_bytes),
            a.delay_us.map_or("-".into(), |d| format!("{d}us")),
            clean(&outcome),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Limits, PeakPercentiles, ProgramStatus, RequestSource};

    #[test]
    fn functions_table() {
        let f = |name: &str, peak: u64| FunctionSummary {
            name: name.into(),
            instances: 12,
            live_instances: 3,
            execs: 40,
            invocations: 1000,
            connections: 0,
            requests: 0,
            requests_source: RequestSource::Platform,
            requests_per_hour: 600,
            oom_kills: 1,
            peak_bytes: peak,
            peak_percentiles: PeakPercentiles {
                p50: 1536,
                p90: 2048,
                p95: 3 << 20,
                p99: peak,
            },
            first_seen_ms: 1,
            last_seen_ms: 2,
        };
        let out = render_functions(&[f("a", 512 << 20), f("long-function-name", 2 << 30)]);
        let expected = "\
NAME                INSTANCES  LIVE  EXECS  INVOCATIONS  REQ/H  COUNTED FROM  OOM       PEAK      P50      P95
a                          12     3     40         1000    600  platform        1  512.0 MiB  1.5 KiB  3.0 MiB
long-function-name         12     3     40         1000    600  platform        1    2.0 GiB  1.5 KiB  3.0 MiB
";
        assert_eq!(out, expected);
        assert_eq!(render_functions(&[]), "no functions recorded yet\n");
    }

    #[test]
    fn info_text() {
        let mut info = AgentInfo {
            version: "0.1.0".into(),
            kernel: "6.1.0".into(),
            cgroup_mode: "v2".into(),
            memory_hierarchy: "/sys/fs/cgroup".into(),
            roots: vec!["/sys/fs/cgroup/a".into(), "/sys/fs/cgroup/b".into()],
            programs: vec![
                ProgramStatus {
                    name: "on_exec".into(),
                    tracepoint: "sched:sched_process_exec".into(),
                    attached: true,
                    error: None,
                    run_count: Some(7),
                    run_time_ns: Some(900),
                },
                ProgramStatus {
                    name: "on_charge".into(),
                    tracepoint: "memcg:memcg_charge".into(),
                    attached: false,
                    error: Some("tracepoint not found".into()),
                    run_count: None,
                    run_time_ns: None,
                },
            ],
            fallbacks: vec!["no memcg tracepoints: peak from watermark reads".into()],
            events_received: 123,
            events_lost: 4,
            started_at_ms: 1_700_000_000_000,
            reactive: crate::model::ReactiveInfo {
                enabled: true,
                signal: "v2 memory.events".into(),
                watched: 4,
                raises: 7,
                reaction_p50_us: Some(810),
                reaction_p99_us: Some(1500),
                reaction_max_us: Some(2000),
                admitted: 9,
                refused: 1,
                squeeze: true,
                pressure_sources: vec![
                    "psi some 100000us/1000000us on /proc/pressure/memory".into()
                ],
                pressure_signals: 3,
                squeezes: 2,
                reclaimed_bytes: 96_000_000,
                releases: 2,
                ..Default::default()
            },
            model: crate::model::ModelFootprint {
                functions: 3,
                live: 2,
                ended: 40,
                hours: 9,
                bytes: 2_500_000,
                strings: 12,
            },
            ..AgentInfo::default()
        };
        info.features.insert("btf".into(), true);
        info.features.insert("memory.peak\x1b[31m".into(), false);
        assert!(!render_info(&info).contains("!! store"));
        assert!(
            !render_info(&info).contains("fleet:"),
            "nothing said by an older agent"
        );
        info.fleet = crate::model::FleetInfo {
            state: "failing".into(),
            reason: Some("http://p:9090/api/v1/query: Connection refused".into()),
            prometheus_url: "http://p:9090".into(),
            in_use: true,
            functions: 12,
            samples: 340.0,
            age_s: Some(75),
            ..Default::default()
        };
        assert!(
            render_info(&info).contains(
                "  fleet:            failing; 12 functions, 340 samples from http://p:9090, 75 s \
                 old (http://p:9090/api/v1/query: Connection refused)\n"
            ),
            "{}",
            render_info(&info)
        );
        info.store_moved_aside = Some(crate::model::StoreMovedAside {
            path: "/var/lib/emars/store.corrupt-1700000000".into(),
            reason: "sled: corrupted log".into(),
            at_ms: 1_700_000_000_000,
            again: true,
            removed: Vec::new(),
        });
        let out = render_info(&info);
        assert!(
            out.contains(
                "!! store:         corrupt at this start (sled: corrupted log), moved aside to \
                 /var/lib/emars/store.corrupt-1700000000 (the second time in a row: check the disk)"
            ),
            "{out}"
        );
        assert!(out.starts_with("EMARS agent 0.1.0\n"), "{out}");
        assert!(
            out.contains("  started:          2023-11-14 22:13:20 UTC\n"),
            "{out}"
        );
        assert!(out.contains("kernel:           6.1.0\n"), "{out}");
        assert!(
            out.contains("v2 (memory hierarchy at /sys/fs/cgroup)"),
            "{out}"
        );
        assert!(
            out.contains(
                "  watched roots:    /sys/fs/cgroup/a\n                    /sys/fs/cgroup/b\n"
            ),
            "{out}"
        );
        assert!(out.contains("123 received, 4 lost (ring buffer"), "{out}");
        assert!(
            out.contains("3 functions, 2 live and 40 ended instances, 9 hour buckets (2.5 MB)"),
            "{out}"
        );
        assert!(
            out.contains("on, v2 memory.events; 4 instances watched, 7 raises, 0 denied"),
            "{out}"
        );
        assert!(out.contains("p50/p99/max 0.81 / 1.50 / 2.00 ms"), "{out}");
        assert!(
            out.contains(
                "squeeze:          3 pressure signals, 2 squeezed (0 held now), 96.0 MB \
                 reclaimed, 2 released, 0 failed; watching psi some"
            ),
            "{out}"
        );
        assert!(
            out.contains("admission:        9 admitted, 1 refused"),
            "{out}"
        );
        assert!(
            out.contains(
                "  NAME       TRACEPOINT                ATTACHED  RUNS  RUN NS  ERROR\n  \
on_exec    sched:sched_process_exec  ✓            7     900\n  \
on_charge  memcg:memcg_charge        ✗            -       -  tracepoint not found\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("  ✓ btf\n  ✗ memory.peak\\u{1b}[31m\n"),
            "{out}"
        );
        assert!(
            out.contains("  - no memcg tracepoints: peak from watermark reads\n"),
            "{out}"
        );

        let empty = render_info(&AgentInfo::default());
        assert!(empty.contains("watched roots:    none"), "{empty}");
        assert!(empty.contains("programs:\n  none loaded\n"), "{empty}");
        assert!(empty.contains("fallbacks:\n  none\n"), "{empty}");
    }

    fn recommendation(oom_kills: u64, oom_bump_bytes: Option<u64>, pinned: bool) -> Recommendation {
        Recommendation {
            function: "f".into(),
            max_bytes: 164 << 20,
            high_bytes: 140 << 20,
            confidence: 1.0,
            samples: 10,
            effective_samples: 10.0,
            percentile: 95.0,
            percentile_bytes: 100 << 20,
            p50_bytes: 50 << 20,
            margin: 0.15,
            oom_kills,
            oom_bump_bytes,
            pinned,
            clamped_by: None,
            prior_bytes: None,
            fleet_samples: 0.0,
            half_life_hours: 24.0,
            computed_at_ms: 1,
        }
    }

    #[test]
    fn the_oom_bump_says_what_it_did_and_why() {
        let text = |r: Recommendation| render_recommendations(&[r], true);
        let t = text(recommendation(0, None, false));
        assert!(
            t.contains("OOM bump: none (no OOM kill in the history);"),
            "{t}"
        );
        let t = text(recommendation(1, Some(164 << 20), false));
        assert!(
            t.contains(
                "OOM bump: max raised to 164.0 MiB by an OOM kill within the last half-life"
            ),
            "{t}"
        );
        let t = text(recommendation(1, None, false));
        assert!(
            t.contains(
                "OOM bump: none needed: the OOM-killed instance counts in the percentile at its \
                 bumped size"
            ) && t.contains("no kill within the last half-life (24 h) asks for more than max"),
            "{t}"
        );
        let t = text(recommendation(2, None, true));
        assert!(
            t.contains("OOM bump: none: the pinned max wins over the 2 OOM-killed instances"),
            "{t}"
        );
    }

    #[test]
    fn generations_text() {
        use crate::policy::{GeneratedConfig, Generation};
        assert!(render_generations(&[]).starts_with("no configs generated yet"));
        let g = Generation {
            generated_at_ms: 1_700_000_000_000,
            trigger: "on_demand".into(),
            functions: vec![GeneratedConfig {
                function: "fn-a".into(),
                requests_per_hour: 7,
                requests_source: RequestSource::KernelRequests,
                max_memory_bytes: 30 << 20,
                memory_high_bytes: 28 << 20,
                memory_max_bytes: 40 << 20,
                confidence: 0.5,
                pinned: false,
                prewarm_ms: 0,
                keepalive_ms: 14_400_000,
            }],
        };
        let out = render_generations(&[g]);
        let expected = "\
generated 2023-11-14 22:13:20 UTC (on_demand), 1 function:
FUNCTION  REQ/H  COUNTED FROM     MAX MEMORY  MEMORY.MAX  MEMORY.HIGH  CONF  PINNED  PREWARM  KEEPALIVE
fn-a          7  kernel_requests    30.0 MiB    40.0 MiB     28.0 MiB  0.50  no            0        4 h
";
        assert!(out.starts_with(expected), "{out}");
        assert!(out.contains(
            "REQ/H: the busiest hour's requests, counted from the platform's reported invocations, \
             else HTTP requests counted in the kernel (kernel_requests)"
        ));
    }

    #[test]
    fn function_text() {
        let t0 = 1_699_999_200_000; // 2023-11-14 22:00:00 UTC
        let s = FunctionSummary {
            name: "fn-a".into(),
            instances: 2,
            live_instances: 1,
            execs: 4,
            invocations: 0,
            connections: 3,
            requests: 120,
            requests_source: RequestSource::KernelRequests,
            requests_per_hour: 120,
            oom_kills: 0,
            peak_bytes: 30 << 20,
            peak_percentiles: PeakPercentiles {
                p50: 10 << 20,
                p90: 30 << 20,
                p95: 30 << 20,
                p99: 30 << 20,
            },
            first_seen_ms: t0,
            last_seen_ms: t0 + 5000,
        };
        let hours = [HourBucket {
            hour_start_ms: t0,
            instances_started: 2,
            execs: 4,
            invocations: 0,
            oom_kills: 0,
            peak_bytes: 30 << 20,
            connections: 3,
            requests: 120,
        }];
        let inst = |name: &str, start: u64, end: Option<u64>, peak: u64, requests| InstanceRecord {
            function: "fn-a".into(),
            instance: name.into(),
            cgroup_id: 77,
            cgroup_path: "/x".into(),
            started_at_ms: start,
            ended_at_ms: end,
            execs: 2,
            peak_bytes: peak,
            peak_source: PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Limits {
                max_bytes: Some(256 << 20),
                high_bytes: None,
            },
            input_bytes: None,
            connections: 1 + requests / 100,
            requests,
        };
        let instances = [
            inst("i1", t0, Some(t0 + 1000), 10 << 20, 100),
            inst("i2", t0 + 2000, None, 30 << 20, 20),
        ];
        let out = render_function(&s, &hours, &instances);
        let expected = "\
function fn-a
  instances:    2 (1 live)
  execs:        4
  invocations:  0 (platform-reported)
  requests:     120 (kernel: HTTP)
  connections:  3 (kernel: TCP)
  requests/h:   120 at the busiest hour (kernel: HTTP requests)
  OOM kills:    0
  peak:         30.0 MiB
  percentiles:  p50 10.0 MiB  p90 30.0 MiB  p95 30.0 MiB  p99 30.0 MiB
  first seen:   2023-11-14 22:00:00 UTC
  last seen:    2023-11-14 22:00:05 UTC

hours (UTC), last 1 of 1:
HOUR              STARTED  EXECS  INVOCATIONS  HTTP REQS  CONNS  OOM      PEAK
2023-11-14 22:00        2      4            0        120      3    0  30.0 MiB

recent instances, newest first (2 of 2):
INSTANCE  CGROUP ID  STARTED              ENDED                EXECS  HTTP REQS  CONNS      PEAK  SOURCE     OOM      LIMIT
i2               77  2023-11-14 22:00:02  live                     2         20      1  30.0 MiB  watermark    0  256.0 MiB
i1               77  2023-11-14 22:00:00  2023-11-14 22:00:01      2        100      2  10.0 MiB  watermark    0  256.0 MiB
";
        assert_eq!(out, expected);

        let bare = render_function(&s, &[], &[]);
        assert!(
            bare.ends_with("hours: none recorded\n\ninstances: none recorded\n"),
            "{bare}"
        );
    }
}
