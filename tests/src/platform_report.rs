//! The reference platform's (`emars-platform`) tallies and how it reports them: the table per
//! mode (with the emars row's memory-time as a ratio to openlambda's), the sandboxes started per
//! memory.max, `--json` per mode and per function, `--plots`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// What happened to one function's invocations and sandboxes.
#[derive(Default, Clone)]
pub struct FunctionTally {
    pub name: String,
    pub invocations: u64,
    pub cold_starts: u64,
    /// Sandboxes loaded at a pre-warm point ...
    pub prewarm_loads: u64,
    /// ... of which an invocation used.
    pub prewarm_hits: u64,
    /// Pre-warms skipped: no free cgroup, or admission refused.
    pub prewarms_skipped: u64,
    /// Sandboxes unloaded at the end of an invocation to be pre-warmed.
    pub unloads: u64,
    /// Index (among the function's invocations) of each cold start.
    pub cold_at: Vec<u64>,
}

#[derive(Default)]
pub struct Tally {
    pub invocations: u64,
    pub cold: u64,
    pub oom: u64,
    pub refused: u64,
    pub dropped_no_cgroup: u64,
    /// MiB x real ms.
    pub mib_ms: f64,
    /// memory.max (MiB) → sandboxes handed out with it (at a cold start, or a pre-warmed
    /// sandbox's first invocation).
    pub limits: BTreeMap<u64, u64>,
    /// Binds released (one per invocation that ran).
    pub uses: u64,
    /// Functions whose last keep-alive advice came from their idle times (the histogram, or
    /// regular ones), not the fixed window.
    pub advised: BTreeSet<usize>,
    pub functions: Vec<FunctionTally>,
}

impl Tally {
    pub fn sum(&self, f: fn(&FunctionTally) -> u64) -> u64 {
        self.functions.iter().map(f).sum()
    }
}

/// Memory-time held, GiB·min of trace time.
pub fn gib_min(t: &Tally) -> f64 {
    t.mib_ms / 1024.0 / 60_000.0
}

/// The modes' rows; the emars row's memory-time as a ratio to openlambda's (the first row).
pub fn print(rows: &[(&str, Tally)], functions: usize) {
    println!(
        "\n  {:<11} {:>11} {:>11} {:>9} {:>9} {:>14} {:>11} {:>17} {:>14} {:>13}",
        "mode",
        "invocations",
        "cold starts",
        "OOM kills",
        "refused",
        "GiB·min held",
        "uses",
        "histogram advice",
        "pre-warm loads",
        "memory-time"
    );
    let base = rows.first().map_or(0.0, |(_, t)| gib_min(t));
    for (label, t) in rows {
        println!(
            "  {:<11} {:>11} {:>11} {:>9} {:>9} {:>14.2} {:>11} {:>17} {:>14} {:>13}",
            label,
            t.invocations,
            t.cold,
            t.oom,
            t.refused + t.dropped_no_cgroup,
            gib_min(t),
            t.uses,
            format!("{} of {functions}", t.advised.len()),
            t.sum(|f| f.prewarm_loads),
            format!("{:.2}x", gib_min(t) / base),
        );
    }
    print_limits(rows);
}

/// `--json`: the table's figures per mode, and per function.
pub fn write_json(path: &Path, rows: &[(&str, Tally)]) -> Result<()> {
    let modes: Vec<Value> = rows
        .iter()
        .map(|(label, t)| {
            json!({
                "mode": label,
                "invocations": t.invocations,
                "cold_starts": t.cold,
                "prewarm_loads": t.sum(|f| f.prewarm_loads),
                "prewarm_hits": t.sum(|f| f.prewarm_hits),
                "prewarms_skipped": t.sum(|f| f.prewarms_skipped),
                "unloads": t.sum(|f| f.unloads),
                "oom_kills": t.oom,
                "refused": t.refused + t.dropped_no_cgroup,
                "uses": t.uses,
                "gib_min": gib_min(t),
                "functions": t.functions.iter().map(|f| json!({
                    "name": f.name,
                    "invocations": f.invocations,
                    "cold_starts": f.cold_starts,
                    "prewarm_loads": f.prewarm_loads,
                    "prewarm_hits": f.prewarm_hits,
                    "prewarms_skipped": f.prewarms_skipped,
                    "unloads": f.unloads,
                    "cold_at": f.cold_at,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&json!({ "modes": modes }))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// How many sandboxes each memory.max was written for (the paper's figures 4/5).
fn print_limits(rows: &[(&str, Tally)]) {
    println!("\n  sandboxes started per memory.max (the paper's figures 4/5):");
    for (label, t) in rows {
        let l: Vec<String> = t
            .limits
            .iter()
            .map(|(mib, n)| format!("{mib} MiB: {n}"))
            .collect();
        println!("  {:<11} {}", label, l.join(", "));
    }
}

/// `--plots`: the table as SVG bar charts in `dir`.
pub fn write_plots(dir: &Path, rows: &[(&str, Tally)]) -> Result<()> {
    let bars = |f: fn(&Tally) -> f64| -> Vec<(String, f64)> {
        rows.iter().map(|(l, t)| (l.to_string(), f(t))).collect()
    };
    crate::write_bar_charts(
        dir,
        &[
            (
                "platform-memory",
                crate::bar_chart("memory held per mode", "GiB·min", bars(gib_min)),
            ),
            (
                "platform-oom-kills",
                crate::bar_chart("OOM kills per mode", "OOM kills", bars(|t| t.oom as f64)),
            ),
            (
                "platform-cold-starts",
                crate::bar_chart(
                    "cold starts per mode",
                    "cold starts",
                    bars(|t| t.cold as f64),
                ),
            ),
            (
                "platform-refused",
                crate::bar_chart(
                    "refused invocations per mode",
                    "refused",
                    bars(|t| (t.refused + t.dropped_no_cgroup) as f64),
                ),
            ),
        ],
    )?;
    Ok(())
}
