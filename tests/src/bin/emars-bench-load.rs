//! emars-bench-load: the agent's event path under a storm of API clients, on the real kernel
//! with the real agent. It prints a report; it is not a test.
//!
//! A real agent in enforce mode on a store seeded with history (`--functions` x `--records`
//! ended instances, written through the store's own path), then two rounds on the same agent:
//!
//! 1. Quiet: `--containers` new instances, one after another (mkdir, wait until the limits the
//!    agent writes are visible, run a process touching 8 MiB in it, rmdir), with no API
//!    client.
//! 2. Storm: the same churn while `--heavy` clients each GET whole-model answers in a loop
//!    (`/metrics`, `/v1/recommendations`, `/v1/functions`, `/v1/export`, a function's
//!    instance list of 10,000) on a new connection each, and `--slow` clients hold half-sent
//!    requests (a header byte a second, reconnecting when dropped); a prober GETs `/healthz`
//!    every 100 ms over TCP and through the local socket.
//!
//! Per round: instances limited, the agent's mkdir → limits written delay (its audit's
//! `delay_us`: kernel mkdir event to write completed) p50/p99/max, the platform's view (mkdir
//! returned → both limits visible), events lost, and for the storm the /healthz latency (max, p99)
//! over each transport, requests answered / refused (503) / failed, and the agent's RSS (peak
//! and at the end).
//!
//! ```text
//! cargo build -p emars-agent --release && cargo build -p emars-tests --release --bins
//! sudo EMARS_BIN=target/release/emars target/release/emars-bench-load [--containers N]
//!     [--heavy C] [--slow S] [--functions F] [--records R] [--agent-nice N]
//! ```

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use emars_tests::{
    run_alloc, seed_store,
    storm::{Load, Storm},
    Agent, TestRoot, MIB,
};
use serde_json::Value;

const USAGE: &str =
    "usage: emars-bench-load [--containers N] [--heavy C] [--slow S] [--functions F] [--records R]
  --containers N  new instances per round (default 500)
  --heavy C       clients GETting whole-model answers in a loop (default 3000)
  --slow S        clients holding half-sent requests (default 600)
  --functions F   functions in the seeded history (default 1000)
  --records R     ended instances per function in it (default 20)
  --agent-nice N  run the agent at niceness N (as the systemd unit's Nice= does)
Runs as root. The agent binary is $EMARS_BIN (else target/<profile>/emars).";

const FUNCTION: &str = "churn";
const LIMIT: u64 = 256 * MIB;

struct Opts {
    containers: usize,
    heavy: usize,
    slow: usize,
    functions: u64,
    records: u64,
    agent_nice: Option<i32>,
}

fn main() {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("emars-bench-load: {e:#}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("emars-bench-load: must run as root (cgroups, eBPF through the agent)");
        std::process::exit(2);
    }
    if let Err(e) = run(&opts) {
        eprintln!("emars-bench-load: {e:#}");
        std::process::exit(1);
    }
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        containers: 500,
        heavy: 3000,
        slow: 600,
        functions: 1000,
        records: 20,
        agent_nice: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> Result<u64> {
            args.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a} takes a number"))
        };
        match a.as_str() {
            "--containers" => o.containers = value()? as usize,
            "--heavy" => o.heavy = value()? as usize,
            "--slow" => o.slow = value()? as usize,
            "--functions" => o.functions = value()?,
            "--records" => o.records = value()?,
            "--agent-nice" => {
                let v = args.next().context("--agent-nice needs a value")?;
                o.agent_nice = Some(v.parse().context("--agent-nice takes a number")?);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn run(o: &Opts) -> Result<()> {
    raise_fd_limit();
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    eprintln!(
        "seeding {} functions x {} records ...",
        o.functions, o.records
    );
    // Within the default retention (14 days): over 10 days.
    let days = o.records.clamp(1, 10);
    let records = seed_store(&store, o.functions, days, o.records.div_ceil(days))?;
    let extra = format!(
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{}/export\"\n\
         [[policy.functions]]\nname = \"{FUNCTION}\"\npin_max_bytes = {LIMIT}\n",
        tmp.path().display()
    );
    // As the systemd unit runs it (Nice=), when asked: `nice -n N emars agent ...`.
    let wrapper: Vec<String> = match o.agent_nice {
        Some(n) => vec!["nice".into(), "-n".into(), n.to_string()],
        None => Vec::new(),
    };
    let agent = Agent::start_under(&root, &store, &extra, None, &wrapper)?;
    eprintln!("agent up with {records} seeded records");
    let quiet = churn_round(&root, &agent, o.containers, "q")?;
    let lost_before = events_lost(&agent)?;
    let storm = Storm::start(&agent, o.heavy, o.slow, "f0")?;
    let stormy = churn_round(&root, &agent, o.containers, "s")?;
    let load = storm.stop()?;
    let lost_after = events_lost(&agent)?;
    print_report(o, records, &quiet, &stormy, &load, lost_before, lost_after);
    Ok(())
}

/// What one churn round measured.
struct Round {
    n: usize,
    limited: usize,
    /// The agent's audit: kernel mkdir event → limits written, µs.
    audit_us: Vec<f64>,
    /// mkdir returned → both limits visible, µs.
    observed_us: Vec<f64>,
}

fn churn_round(root: &TestRoot, agent: &Agent, n: usize, tag: &str) -> Result<Round> {
    let (max_file, high_file) = root.hierarchy.limit_files();
    let set = |f: &str| -> Option<u64> {
        fs::read_to_string(f)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v < 1 << 62)
    };
    let mut observed_us = Vec::with_capacity(n);
    let mut limited = 0;
    let before = audit_keys(agent)?;
    for i in 0..n {
        let dir = root.instance_dir(FUNCTION, &format!("{tag}{i}"))?;
        let t = Instant::now();
        let seen = loop {
            // Both written (the agent writes max, then high): then the instance may go.
            let max = set(&dir.join(max_file).display().to_string());
            let high = set(&dir.join(high_file).display().to_string());
            match (max, high) {
                (Some(LIMIT), Some(_)) => break Some(t.elapsed()),
                _ if t.elapsed() > Duration::from_secs(5) => break None,
                // A short sleep, not a spin: on 2 cores a spinning reader takes the CPU the
                // agent's woken event loop needs, which the storm's clients already share.
                _ => thread::sleep(Duration::from_micros(100)),
            }
        };
        if let Some(d) = seen {
            limited += 1;
            observed_us.push(d.as_secs_f64() * 1e6);
        }
        // A container's life: a process that touches its memory and exits.
        run_alloc(&dir, 8, 0, 0)?;
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    // The audit of this round's writes (newest first; the round's are the new ones).
    let audit = wait_audit(agent, before.len() + n)?;
    let ours: Vec<&Value> = audit
        .iter()
        .filter(|a| {
            a["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with(tag) && !before.contains(&audit_key(a)))
        })
        .collect();
    let mut kinds = std::collections::BTreeMap::new();
    for a in &ours {
        let k = format!(
            "{}/{}/{}",
            a["reason"].as_str().unwrap_or("?"),
            a["outcome"].as_str().unwrap_or("?"),
            if a["delay_us"].is_number() {
                "timed"
            } else {
                "untimed"
            }
        );
        *kinds.entry(k).or_insert(0) += 1;
    }
    eprintln!("round {tag}: audit records {kinds:?}");
    let audit_us = ours
        .iter()
        .filter(|a| a["reason"] == "new_instance" && a["outcome"] == "ok")
        .filter_map(|a| a["delay_us"].as_f64())
        .collect();
    Ok(Round {
        n,
        limited,
        audit_us,
        observed_us,
    })
}

fn audit_key(a: &Value) -> String {
    format!("{}/{}", a["instance"], a["at_ms"])
}

/// GET through the agent's local socket, as the operator's CLI would: served whatever the
/// storm's TCP clients do.
fn local_get(agent: &Agent, path: &str) -> Result<Value> {
    Ok(emars_agent::cli::client::Client::local(&agent.socket).get(path)?)
}

fn audit_keys(agent: &Agent) -> Result<Vec<String>> {
    let a = local_get(agent, "/v1/audit?limit=10000")?;
    Ok(a["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .map(audit_key)
        .collect())
}

/// The newest audit records, once there are at least `n` (or after 30 s).
fn wait_audit(agent: &Agent, n: usize) -> Result<Vec<Value>> {
    let t = Instant::now();
    loop {
        let a = local_get(agent, "/v1/audit?limit=10000")?;
        let list = a["audit"].as_array().cloned().unwrap_or_default();
        if list.len() >= n || t.elapsed() > Duration::from_secs(30) {
            return Ok(list);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn events_lost(agent: &Agent) -> Result<u64> {
    // The agent refreshes its counters once a second.
    thread::sleep(Duration::from_millis(1200));
    Ok(local_get(agent, "/v1/info")?["events_lost"]
        .as_u64()
        .unwrap_or(u64::MAX))
}

fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill, then to set.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

fn spread(v: &[f64], unit: f64, digits: usize) -> String {
    format!(
        "p50 {:.d$} / p99 {:.d$} / max {:.d$}",
        pct(v, 50.0) / unit,
        pct(v, 99.0) / unit,
        pct(v, 100.0) / unit,
        d = digits
    )
}

fn print_report(
    o: &Opts,
    records: u64,
    quiet: &Round,
    storm: &Round,
    load: &Load,
    lost_before: u64,
    lost_after: u64,
) {
    println!();
    println!(
        "emars-bench-load: {} new instances per round; seeded history {} functions, {records} records",
        o.containers, o.functions
    );
    for (name, r) in [("quiet", quiet), ("storm", storm)] {
        println!("  {name}:");
        println!(
            "    instances limited: {} of {} (audit records: {})",
            r.limited,
            r.n,
            r.audit_us.len()
        );
        println!(
            "    mkdir → limits written (agent audit): {} ms",
            spread(&r.audit_us, 1e3, 2)
        );
        println!(
            "    mkdir returned → limits visible:       {} ms",
            spread(&r.observed_us, 1e3, 2)
        );
    }
    println!(
        "  storm clients: {} heavy GETs in a loop, {} half-sent requests; {:.0} s",
        o.heavy, o.slow, load.secs
    );
    println!(
        "    answered 200: {} ({:.0}/s), 503 busy: {}, other status: {}, connection failed: {}; half-sent connections dropped: {}",
        load.ok,
        load.ok as f64 / load.secs,
        load.refused,
        load.other,
        load.failed,
        load.slow_cycles
    );
    println!(
        "    /healthz over TCP:          {} ms, failed {}",
        spread(&load.health.tcp_ms, 1.0, 1),
        load.health.tcp_failed
    );
    println!(
        "    /healthz over the socket:   {} ms, failed {}",
        spread(&load.health.local_ms, 1.0, 1),
        load.health.local_failed
    );
    println!(
        "    agent RSS: peak {:.0} MB, at the end {:.0} MB",
        load.rss_peak_mb, load.rss_end_mb
    );
    println!(
        "  events lost: {} (before the storm {lost_before})",
        lost_after
    );
}
