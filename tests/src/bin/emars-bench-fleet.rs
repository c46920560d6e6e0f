//! Fleet learning's cost on the agent, at fleet scale:
//!
//! cargo run --release -p emars-tests --bin emars-bench-fleet -- [--functions F] [--hosts H]
//!     [--per-host N] [--local N] [--rounds R]
//!
//! A fleet of H other hosts, each with N retained instances of each of F functions (peaks
//! log-uniform around a per-function size), is turned into Prometheus's answer to the fleet
//! query (`/api/v1/query` JSON with native histograms, as Prometheus 2.42 writes it); this
//! host's store holds `--local` instances of each function. Measured, R rounds, medians:
//! the answer's size; parsing it (`FleetView::from_answer`); `Policy::set_fleet` (every
//! function recomputed with the blend) against `Policy::compute_all` without a fleet (the
//! baseline, same process, same store); CPU time (user + system) of each; and the resident
//! memory the view adds. The Prometheus side (query time at this scale) is measured by
//! `--prometheus`, which needs the native-histogram exposition of a real agent.

use std::{sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use emars_agent::policy::{fleet::FleetView, Policy};

const USAGE: &str =
    "usage: emars-bench-fleet [--functions F] [--hosts H] [--per-host N] [--local N] [--rounds R]
  --functions F  functions in the fleet and in this host's store (default 10000)
  --hosts H      other hosts (default 9)
  --per-host N   retained instances of each function on each other host (default 20)
  --local N      this host's instances of each function (default 5)
  --rounds R     repetitions of each measurement (default 5)";

struct Options {
    functions: u64,
    hosts: u64,
    per_host: u64,
    local: u64,
    rounds: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        functions: 10_000,
        hosts: 9,
        per_host: 20,
        local: 5,
        rounds: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<u64> {
            args.next()
                .with_context(|| format!("{a} needs a number"))?
                .parse()
                .with_context(|| format!("{a}: not a number"))
        };
        match a.as_str() {
            "--functions" => o.functions = num()?,
            "--hosts" => o.hosts = num()?,
            "--per-host" => o.per_host = num()?,
            "--local" => o.local = num()?,
            "--rounds" => o.rounds = num()?.max(1) as usize,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// A deterministic generator (xorshift), so runs compare.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Prometheus's answer to the fleet query: per function, the other hosts' peaks summed into
/// one native histogram (schema 4), written as /api/v1/query writes native histograms.
fn fleet_answer(o: &Options) -> String {
    use emars_agent::model::native;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::from(r#"{"status":"success","data":{"resultType":"vector","result":["#);
    for f in 0..o.functions {
        // Each function's size: log-uniform over 16 MiB - 2 GiB; its peaks ±20 % around it.
        let center = (16.0 * (128f64).powf(rng.next())) * (1u64 << 20) as f64;
        let mut buckets = std::collections::BTreeMap::<i32, u64>::new();
        for _ in 0..o.hosts * o.per_host {
            let peak = (center * (0.8 + 0.4 * rng.next())) as u64;
            *buckets.entry(native::bucket_index(peak)).or_default() += 1;
        }
        if f > 0 {
            out.push(',');
        }
        let total: u64 = buckets.values().sum();
        out.push_str(&format!(
            r#"{{"metric":{{"function":"f{f}"}},"histogram":[1765000000.123,{{"count":"{total}","sum":"{}","buckets":["#,
            center * total as f64
        ));
        for (k, (i, n)) in buckets.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                r#"[0,"{}","{}","{n}"]"#,
                native::upper_bound(i - 1),
                native::upper_bound(*i)
            ));
        }
        out.push_str("]}]}");
    }
    out.push_str("]}}");
    out
}

/// User + system CPU time of this process so far.
fn cpu() -> std::time::Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is handed.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let t =
        |tv: libc::timeval| std::time::Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (wall ms, cpu ms) medians of `rounds` runs of `f`.
fn measure(rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let (mut wall, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (t, c) = (Instant::now(), cpu());
        f()?;
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        cpus.push((cpu() - c).as_secs_f64() * 1000.0);
    }
    Ok((median(wall), median(cpus)))
}

fn main() -> Result<()> {
    let o = options()?;
    let answer = fleet_answer(&o);
    println!(
        "fleet: {} functions, {} other hosts x {} instances each; this host: {} each",
        o.functions, o.hosts, o.per_host, o.local
    );
    println!(
        "answer: {:.1} MB ({:.0} bytes per function)",
        answer.len() as f64 / 1e6,
        answer.len() as f64 / o.functions as f64
    );
    let (parse_ms, parse_cpu) = measure(o.rounds, || {
        FleetView::from_answer(answer.as_bytes(), 0, usize::MAX)?;
        Ok(())
    })?;
    println!("parse: {parse_ms:.1} ms median ({parse_cpu:.1} ms CPU)");

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    // `local` instances of each function within the last day.
    emars_tests::seed_store(&path, o.functions, 1, o.local)?;
    let store = emars_agent::store::Store::open(&path)?;
    let policy = Policy::new(Default::default(), store, 64 << 30);
    let now = emars_agent::clock::now_ms();
    let (base_ms, base_cpu) = measure(o.rounds, || {
        policy.compute_all(now)?;
        Ok(())
    })?;
    println!("compute_all, local history alone (baseline): {base_ms:.1} ms median ({base_cpu:.1} ms CPU)");

    // Resident memory the view keeps: measured after the parse's garbage is given back.
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    let trim = || unsafe { libc::malloc_trim(0) };
    trim();
    let before = rss_bytes();
    let view = Arc::new(FleetView::from_answer(answer.as_bytes(), now, usize::MAX)?);
    trim();
    let held = rss_bytes().saturating_sub(before);
    let (set_ms, set_cpu) = measure(o.rounds, || {
        policy.set_fleet(Some(view.clone()), now)?;
        Ok(())
    })?;
    println!(
        "set_fleet (every function recomputed with the blend): {set_ms:.1} ms median ({set_cpu:.1} ms CPU), {:.2}x the baseline",
        set_ms / base_ms
    );
    println!(
        "view held: {:.1} MiB resident ({:.0} bytes per function, {} samples)",
        held as f64 / (1 << 20) as f64,
        held as f64 / o.functions as f64,
        view.samples()
    );
    let r = policy
        .cached("f0")
        .context("f0 has no recommendation after set_fleet")?;
    println!(
        "check: f0 blends {} local and {} fleet samples",
        r.samples, r.fleet_samples
    );
    if r.fleet_samples != (o.hosts * o.per_host) as f64 {
        bail!(
            "f0's fleet samples {} != {}",
            r.fleet_samples,
            o.hosts * o.per_host
        );
    }
    Ok(())
}
