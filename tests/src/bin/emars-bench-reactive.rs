//! emars-bench-reactive: reactive mode on the real kernel with the real agent, side by side in
//! one run. It prints a report; it is not a test.
//!
//! 1. Burst experiment: a function with a history of instances peaking at `--mib` MiB, then
//!    `--growers` instances that each grow to 1.5x the limit the history predicts (the limit
//!    written into the first of them at mkdir), at `--rate` MiB/s, `--parallel` at a time; once with `reactive.enabled = false` and once with
//!    it on, on fresh roots, the same workload. Prints OOM kills, raises, raises denied and the
//!    agent's signal-to-limit-written time (p50/p99/max over the raises).
//! 2. Admission: POST /v1/admission paced at `--admission-rps` requests/s for
//!    `--admission-secs` seconds over real HTTP (a connection per request, as a platform's
//!    hook would make), for a known function: latency p50/p99/max and the answers.
//! 3. Pressure experiment: `--idle` idle instances, each holding 8 MiB of heap and
//!    `--cache-mib` MiB of clean page cache (a file on disk, `$EMARS_DISK_DIR` or /var/tmp),
//!    then a busy one (no limits) growing `--busy-mib` MiB at 128 MiB/s into a limit on their
//!    common parent set 64 MiB above what is in use; squeeze off, then on, on fresh roots.
//!    Prints whether the busy one finished, its run time, how often the parent hit its limit
//!    and for how long (first to last hit), the idle instances' memory before and after, and
//!    the agent's squeezes, bytes reclaimed and signal-to-squeeze-done time.
//!
//! 4. Pooled cgroups: `--binds` bind/release pairs on one pooled cgroup over real HTTP (the
//!    cost a platform pays per use, or per invocation when it binds each): latency p50/p99/max,
//!    binding two functions with different (pinned) limits in turn, so that each bind writes
//!    limits, then one function again and again (a warm container serving invocations: its
//!    limits are in force, nothing is written).
//!
//! ```text
//! cargo build -p emars-agent --release && cargo build -p emars-tests --release --bins
//! sudo EMARS_BIN=target/release/emars target/release/emars-bench-reactive [--growers N] ...
//! ```

use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use emars_tests::{alloc_bin, run_alloc, spawn_in, wait_for, Agent, Hierarchy, TestRoot, MIB};
use serde_json::Value;

const USAGE: &str = "usage: emars-bench-reactive [--growers N] [--parallel P] [--mib M] [--rate R]
    [--admission-rps Q] [--admission-secs S] [--idle I] [--cache-mib C] [--busy-mib B] [--binds N]
    [--only K]
  --growers N         instances that outgrow their limit, per mode (default 20)
  --parallel P        growers at a time (default 2)
  --mib M             peak of the history instances, MiB (default 24)
  --rate R            growth rate of a grower, MiB/s (default 64)
  --admission-rps Q   paced admission requests per second (default 1000)
  --admission-secs S  seconds of admission requests (default 5)
  --idle I            idle instances in the pressure experiment (default 8)
  --cache-mib C       page cache each idle instance holds, MiB (default 64)
  --busy-mib B        what the busy instance grows to, MiB (default 256)
  --binds N           bind/release pairs on a pooled cgroup, per mode (default 500)
  --only K            run section K (1-4) alone
Runs as root. The agent binary is $EMARS_BIN (else target/<profile>/emars).";

const FUNCTION: &str = "bursty";
const HISTORY: usize = 5;

struct Opts {
    growers: usize,
    parallel: usize,
    mib: u64,
    rate: u64,
    admission_rps: u64,
    admission_secs: u64,
    idle: usize,
    cache_mib: u64,
    busy_mib: u64,
    binds: usize,
    /// Run this section alone.
    only: Option<u64>,
}

fn main() {
    match parse().and_then(|o| run(&o)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("emars-bench-reactive: {e:#}");
            std::process::exit(1);
        }
    }
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        growers: 20,
        parallel: 2,
        mib: 24,
        rate: 64,
        admission_rps: 1000,
        admission_secs: 5,
        idle: 8,
        cache_mib: 64,
        busy_mib: 256,
        binds: 500,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .with_context(|| format!("{a} needs a positive number\n{USAGE}"))
        };
        match a.as_str() {
            "--growers" => o.growers = num()? as usize,
            "--parallel" => o.parallel = num()? as usize,
            "--mib" => o.mib = num()?,
            "--rate" => o.rate = num()?,
            "--admission-rps" => o.admission_rps = num()?,
            "--admission-secs" => o.admission_secs = num()?,
            "--idle" => o.idle = num()? as usize,
            "--cache-mib" => o.cache_mib = num()?,
            "--busy-mib" => o.busy_mib = num()?,
            "--binds" => o.binds = num()? as usize,
            "--only" => o.only = Some(num()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

fn start(root: &TestRoot, reactive: bool) -> Result<Agent> {
    Agent::start_configured(
        root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
             [reactive]\nenabled = {reactive}\n"
        ),
    )
}

/// What one mode of the burst experiment gave.
struct Burst {
    label: &'static str,
    growers: usize,
    killed: usize,
    /// Limits written at mkdir into the first and the last grower (the agent learns from the
    /// first ones: an OOM kill bumps the recommendation, a rescue records the true peak).
    first_limit: u64,
    last_limit: u64,
    target_mib: u64,
    raises: u64,
    denied: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
}

fn burst(o: &Opts, reactive: bool) -> Result<Burst> {
    let root = TestRoot::new()?;
    let agent = start(&root, reactive)?;
    for i in 0..HISTORY {
        let dir = root.instance_dir(FUNCTION, &format!("h{i}"))?;
        if !run_alloc(&dir, o.mib, 0, 0)?.success() {
            bail!("history instance {i} failed");
        }
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(FUNCTION, HISTORY)?;
    let mut killed = 0;
    let mut first_limit = 0;
    let mut last_limit = 0;
    // Every grower needs 1.5x what the history predicts (the first grower's limit): the same
    // burst in both modes, whatever the agent learns from the first ones.
    let mut target_mib = 0;
    let mut next = 0;
    while next < o.growers {
        let batch: Vec<usize> = (next..(next + o.parallel).min(o.growers)).collect();
        next += batch.len();
        let mut running = Vec::new();
        for i in batch {
            let dir = root.instance_dir(FUNCTION, &format!("g{i}"))?;
            let limit = wait_for(Duration::from_secs(5), || root.hierarchy.max_limit(&dir))
                .with_context(|| format!("no limit written into g{i}"))?;
            if first_limit == 0 {
                first_limit = limit;
                target_mib = limit * 3 / 2 / MIB;
            }
            last_limit = limit;
            let mut cmd = Command::new(alloc_bin());
            cmd.args([
                "--mib",
                &target_mib.to_string(),
                "--rate-mib-s",
                &o.rate.to_string(),
            ]);
            running.push((dir.clone(), spawn_in(&dir, cmd)?));
        }
        for (dir, mut child) in running {
            if !child.wait()?.success() {
                killed += 1;
            }
            fs::remove_dir(&dir)?;
        }
    }
    agent.wait_ended(FUNCTION, HISTORY + o.growers)?;
    // The counters follow on the agent's 1 s tick.
    thread::sleep(Duration::from_millis(1200));
    let info = agent.get_ok("/v1/info")?;
    let r = &info["reactive"];
    let n = |k: &str| r[k].as_u64();
    let b = Burst {
        label: if reactive {
            "reactive on"
        } else {
            "reactive off"
        },
        growers: o.growers,
        killed,
        first_limit,
        last_limit,
        target_mib,
        raises: n("raises").unwrap_or(0),
        denied: n("denied").unwrap_or(0),
        p50_us: n("reaction_p50_us"),
        p99_us: n("reaction_p99_us"),
        max_us: n("reaction_max_us"),
    };
    agent.stop()?;
    Ok(b)
}

fn us(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.2}", v as f64 / 1000.0))
}

/// Admission latency at a paced rate, against an agent that knows the function.
fn admission(o: &Opts) -> Result<(Vec<Duration>, u64, u64)> {
    let root = TestRoot::new()?;
    let agent = start(&root, false)?;
    for i in 0..HISTORY {
        let dir = root.instance_dir(FUNCTION, &format!("h{i}"))?;
        run_alloc(&dir, o.mib, 0, 0)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(FUNCTION, HISTORY)?;
    let body = format!(r#"{{"function":"{FUNCTION}"}}"#);
    // Wait for the recommendation (the agent's next tick), so every answer has a prediction.
    wait_for(Duration::from_secs(5), || {
        let (s, b) = agent
            .post_raw("/v1/admission", "application/json", body.as_bytes())
            .ok()?;
        (s == 200 && b["predicted_bytes"].is_u64()).then_some(())
    })
    .context("no prediction for the function")?;
    let total = o.admission_rps * o.admission_secs;
    let gap = Duration::from_secs(1) / o.admission_rps as u32;
    let mut lat = Vec::with_capacity(total as usize);
    let (mut admitted, mut refused) = (0, 0);
    let start = Instant::now();
    for i in 0..total {
        let due = gap * i as u32;
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
        let t = Instant::now();
        let (s, b): (u16, Value) =
            agent.post_raw("/v1/admission", "application/json", body.as_bytes())?;
        lat.push(t.elapsed());
        if s != 200 {
            bail!("POST /v1/admission → {s}: {b}");
        }
        if b["admit"] == true {
            admitted += 1;
        } else {
            refused += 1;
        }
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "  paced at {} requests/s, achieved {achieved:.0}/s",
        o.admission_rps
    );
    agent.stop()?;
    Ok((lat, admitted, refused))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize]
}

/// What one mode of the pressure experiment gave.
struct Pressure {
    label: &'static str,
    finished: bool,
    busy_ms: u128,
    limit_hits: u64,
    pressure_ms: u128,
    idle_before_mib: u64,
    idle_after_mib: u64,
    squeezes: u64,
    reclaimed_mib: u64,
    squeeze_ms: Option<u64>,
    source: String,
}

/// The times a cgroup hit its hard limit (v1 memory.failcnt, v2 memory.events `max`).
fn limit_hits(h: &Hierarchy, dir: &std::path::Path) -> u64 {
    let (file, key) = match h.version {
        emars_tests::Version::V1 => ("memory.failcnt", None),
        emars_tests::Version::V2 => ("memory.events", Some("max")),
    };
    let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
    match key {
        None => text.trim().parse().unwrap_or(0),
        Some(k) => text
            .lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
            .unwrap_or(0),
    }
}

fn pressure(o: &Opts, squeeze: bool) -> Result<Pressure> {
    let disk = emars_tests::disk_dir().map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
             [reactive]\nenabled = true\nsqueeze = {squeeze}\npressure_stall_ms = 10\n\
             pressure_level_v1 = \"low\"\nidle_after_s = 2\nrelease_after_s = 5\n"
        ),
    )?;
    let idle_cmd = |hold_ms: u64| emars_tests::cache_holder(&disk, 8, o.cache_mib, hold_ms);
    for i in 0..3 {
        let dir = root.instance_dir("idler", &format!("h{i}"))?;
        if !spawn_in(&dir, idle_cmd(0))?.wait()?.success() {
            bail!("history instance {i} failed");
        }
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("idler", 3)?;
    let mut idle = Vec::new();
    let mut children = Vec::new();
    for i in 0..o.idle {
        let dir = root.instance_dir("idler", &format!("i{i}"))?;
        wait_for(Duration::from_secs(5), || root.hierarchy.max_limit(&dir))
            .context("no limit written at mkdir")?;
        children.push(spawn_in(&dir, idle_cmd(3_600_000))?);
        idle.push(dir);
    }
    let full = (o.cache_mib + 6) * MIB;
    for dir in &idle {
        wait_for(Duration::from_secs(30), || {
            (root.hierarchy.usage(dir).ok()? >= full).then_some(())
        })
        .context("an idle instance did not fill its cache")?;
    }
    // Idle for the agent: two samples of unchanged CPU time.
    thread::sleep(Duration::from_secs(5));
    let sum = |dirs: &[std::path::PathBuf]| -> u64 {
        dirs.iter()
            .filter_map(|d| root.hierarchy.usage(d).ok())
            .sum::<u64>()
            / MIB
    };
    let idle_before_mib = sum(&idle);
    let in_use = root.hierarchy.usage(&root.dir)?;
    root.hierarchy.set_limit(&root.dir, in_use + 64 * MIB)?;
    let hits0 = limit_hits(&root.hierarchy, &root.dir);
    let busy = root.instance_dir("busy", "b")?;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", &o.busy_mib.to_string(), "--rate-mib-s", "128"]);
    let t0 = Instant::now();
    let mut child = spawn_in(&busy, cmd)?;
    // The bench (not the agent) samples the parent's limit hits to time the pressure.
    let (mut last_hits, mut last_hit_at, mut first_hit_at) = (hits0, None, None);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        let h = limit_hits(&root.hierarchy, &root.dir);
        if h > last_hits {
            last_hits = h;
            last_hit_at = Some(t0.elapsed());
            first_hit_at.get_or_insert(t0.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    };
    let busy_ms = t0.elapsed().as_millis();
    if squeeze {
        wait_for(Duration::from_secs(10), || {
            let i = agent.get_ok("/v1/info").ok()?;
            (i["reactive"]["squeezes"].as_u64()? >= o.idle as u64).then_some(())
        });
    }
    let idle_after_mib = sum(&idle);
    let info = agent.get_ok("/v1/info")?;
    let r = &info["reactive"];
    let out = Pressure {
        label: if squeeze { "squeeze on" } else { "squeeze off" },
        finished: status.success(),
        busy_ms,
        limit_hits: last_hits - hits0,
        pressure_ms: match (first_hit_at, last_hit_at) {
            (Some(a), Some(b)) => (b - a).as_millis(),
            _ => 0,
        },
        idle_before_mib,
        idle_after_mib,
        squeezes: r["squeezes"].as_u64().unwrap_or(0),
        reclaimed_mib: r["reclaimed_bytes"].as_u64().unwrap_or(0) / MIB,
        squeeze_ms: r["last_squeeze_ms"].as_u64(),
        source: r["pressure_sources"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned(),
    };
    root.hierarchy.clear_limit(&root.dir)?;
    fs::remove_dir(&busy)?;
    emars_tests::stop_cache_holders(&disk, children);
    agent.stop()?;
    Ok(out)
}

/// Bind and release latencies over HTTP, one pooled cgroup.
/// Bind/release latencies on one pooled cgroup: `functions` bound in turn (each pinned to
/// other limits, so each bind writes them), or one function (limits in force after its first).
fn binds(o: &Opts, functions: &[&str]) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let root = TestRoot::new()?;
    let pins: String = ["fa", "fb"]
        .iter()
        .zip([256u64, 128])
        .map(|(f, mib)| {
            format!(
                "[[policy.functions]]\nname = \"{f}\"\npin_max_bytes = {}\n",
                mib * MIB
            )
        })
        .collect();
    let agent = Agent::start_configured(&root, &format!("\n[policy]\nmode = \"enforce\"\n{pins}"))?;
    let slot = root.dir.join("cg-1");
    fs::create_dir(&slot)?;
    let cgroup = slot.display().to_string();
    let (mut bind, mut release) = (Vec::new(), Vec::new());
    for i in 0..o.binds {
        let function = functions[i % functions.len()];
        let body = serde_json::json!({"cgroup": cgroup, "function": function, "instance": format!("u{i}")});
        let t = Instant::now();
        let (s, b) = agent.post_raw("/v1/bind", "application/json", body.to_string().as_bytes())?;
        bind.push(t.elapsed());
        if s != 200 {
            bail!("bind: {s} {b}");
        }
        let body = serde_json::json!({ "cgroup": cgroup });
        let t = Instant::now();
        let (s, b) = agent.post_raw(
            "/v1/release",
            "application/json",
            body.to_string().as_bytes(),
        )?;
        release.push(t.elapsed());
        if s != 200 {
            bail!("release: {s} {b}");
        }
    }
    // /v1/info's counters are brought up to date every second.
    std::thread::sleep(Duration::from_millis(1_200));
    let info = agent.get_ok("/v1/info")?;
    println!(
        "  {:<28} limits written {}, in force already {}",
        functions.join(", "),
        info["enforcement"]["writes_ok"],
        info["enforcement"]["unchanged"]
    );
    agent.stop()?;
    Ok((bind, release))
}

fn run(o: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (real cgroups, eBPF)");
    }
    let h = Hierarchy::detect()?;
    println!(
        "emars-bench-reactive: cgroup {:?}, {} growers ({} at a time) to 1.5x the predicted limit at {} MiB/s, history at {} MiB",
        h.version, o.growers, o.parallel, o.rate, o.mib
    );
    let section = |k: u64| o.only.is_none_or(|only| only == k);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if section(1) {
        burst_section(o)?;
    }
    if section(2) {
        println!("\n2. Admission (POST /v1/admission over HTTP)\n");
        let (mut lat, admitted, refused) = admission(o)?;
        lat.sort_unstable();
        println!(
            "  {} requests: {admitted} admitted, {refused} refused; latency p50 {:.3} / p99 {:.3} / max {:.3} ms",
            lat.len(),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 99.0)),
            ms(pct(&lat, 100.0))
        );
    }
    if section(3) {
        pressure_section(o)?;
    }
    if section(4) {
        println!("\n4. Pooled cgroups (POST /v1/bind then /v1/release, one cgroup, over HTTP)\n");
        let mut rows = Vec::new();
        for functions in [&["fa", "fb"][..], &["fa"][..]] {
            let (mut bind, mut release) = binds(o, functions)?;
            bind.sort_unstable();
            release.sort_unstable();
            rows.push((functions.join(", "), bind, release));
        }
        for (label, bind, release) in &rows {
            println!(
                "  {label:<28} {} pairs: bind p50 {:.3} / p99 {:.3} / max {:.3} ms; release p50 {:.3} / p99 {:.3} / max {:.3} ms",
                bind.len(),
                ms(pct(bind, 50.0)),
                ms(pct(bind, 99.0)),
                ms(pct(bind, 100.0)),
                ms(pct(release, 50.0)),
                ms(pct(release, 99.0)),
                ms(pct(release, 100.0))
            );
        }
        let ratio = ms(pct(&rows[0].1, 50.0)) / ms(pct(&rows[1].1, 50.0)).max(1e-9);
        println!("  bind p50, limits written / limits in force: {ratio:.2}x");
    }
    Ok(())
}

fn burst_section(o: &Opts) -> Result<()> {
    println!("\n1. Burst experiment (same workload, reactive off then on)\n");
    let rows = [burst(o, false)?, burst(o, true)?];
    println!(
        "  {:<14} {:>8} {:>10} {:>9} {:>22} {:>7} {:>7}  {:>28}",
        "mode",
        "growers",
        "OOM kills",
        "need MiB",
        "limit first/last MiB",
        "raises",
        "denied",
        "signal→write p50/p99/max ms"
    );
    for r in &rows {
        println!(
            "  {:<14} {:>8} {:>10} {:>9} {:>22} {:>7} {:>7}  {:>28}",
            r.label,
            r.growers,
            r.killed,
            r.target_mib,
            format!("{} / {}", r.first_limit / MIB, r.last_limit / MIB),
            r.raises,
            r.denied,
            format!("{} / {} / {}", us(r.p50_us), us(r.p99_us), us(r.max_us))
        );
    }
    Ok(())
}

fn pressure_section(o: &Opts) -> Result<()> {
    println!(
        "\n3. Pressure experiment ({} idle instances with 8 MiB heap + {} MiB page cache; a busy one \
         grows to {} MiB at 128 MiB/s under a parent limit 64 MiB above use)\n",
        o.idle, o.cache_mib, o.busy_mib
    );
    let rows = [pressure(o, false)?, pressure(o, true)?];
    println!(
        "  {:<12} {:>9} {:>8} {:>11} {:>12} {:>20} {:>9} {:>14} {:>17}",
        "mode",
        "busy ok",
        "busy ms",
        "limit hits",
        "pressure ms",
        "idle MiB before/after",
        "squeezed",
        "reclaimed MiB",
        "signal→done ms"
    );
    for r in &rows {
        println!(
            "  {:<12} {:>9} {:>8} {:>11} {:>12} {:>20} {:>9} {:>14} {:>17}",
            r.label,
            r.finished,
            r.busy_ms,
            r.limit_hits,
            r.pressure_ms,
            format!("{} / {}", r.idle_before_mib, r.idle_after_mib),
            r.squeezes,
            r.reclaimed_mib,
            r.squeeze_ms.map_or("-".into(), |v| v.to_string())
        );
    }
    println!("  pressure signal (squeeze on): {}", rows[1].source);
    Ok(())
}
