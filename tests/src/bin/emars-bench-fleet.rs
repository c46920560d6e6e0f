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
//! memory the view adds.
//!
//! `--prometheus` also measures the Prometheus side: the H hosts' expositions (the agent's own
//! protobuf encoder, native histograms) served on H local ports, scraped by a real Prometheus
//! (`--enable-feature=native-histograms`, Debian's), and the fleet query asked of it R times:
//! the answer's size and the query's time, medians, and the parsed view checked against the
//! hosts' counts.

use std::{sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use emars_agent::policy::{fleet::FleetView, Policy};

const USAGE: &str =
    "usage: emars-bench-fleet [--functions F] [--hosts H] [--per-host N] [--local N] [--rounds R]
  --functions F  functions in the fleet and in this host's store (default 10000)
  --hosts H      other hosts (default 9)
  --per-host N   retained instances of each function on each other host (default 20)
  --local N      this host's instances of each function (default 5)
  --rounds R     repetitions of each measurement (default 5)
  --prometheus   also the query's time on a real Prometheus scraping the hosts' expositions";

struct Options {
    functions: u64,
    hosts: u64,
    per_host: u64,
    local: u64,
    rounds: usize,
    prometheus: bool,
}

fn options() -> Result<Options> {
    let mut o = Options {
        functions: 10_000,
        hosts: 9,
        per_host: 20,
        local: 5,
        rounds: 5,
        prometheus: false,
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
            "--prometheus" => o.prometheus = true,
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

/// Each other host's peaks per function: `peaks[host][function]`. Each function's size is
/// log-uniform over 16 MiB - 2 GiB, its peaks ±20 % around it.
fn fleet_peaks(o: &Options) -> Vec<Vec<Vec<u64>>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let centers: Vec<f64> = (0..o.functions)
        .map(|_| (16.0 * (128f64).powf(rng.next())) * (1u64 << 20) as f64)
        .collect();
    (0..o.hosts)
        .map(|_| {
            centers
                .iter()
                .map(|c| {
                    (0..o.per_host)
                        .map(|_| (c * (0.8 + 0.4 * rng.next())) as u64)
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Prometheus's answer to the fleet query: per function, the other hosts' peaks summed into
/// one native histogram (schema 4), written as /api/v1/query writes native histograms.
fn fleet_answer(o: &Options, peaks: &[Vec<Vec<u64>>]) -> String {
    use emars_agent::model::native;
    let mut out = String::from(r#"{"status":"success","data":{"resultType":"vector","result":["#);
    for f in 0..o.functions as usize {
        let center = peaks[0][f][0] as f64;
        let mut buckets = std::collections::BTreeMap::<i32, u64>::new();
        for host in peaks {
            for &peak in &host[f] {
                *buckets.entry(native::bucket_index(peak)).or_default() += 1;
            }
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

/// Gives free heap memory back to the kernel (glibc; musl's allocator has no such call).
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
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
    let peaks = fleet_peaks(&o);
    let answer = fleet_answer(&o, &peaks);
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
    trim();
    let before = rss_bytes();
    let view = Arc::new(FleetView::from_answer(answer.as_bytes(), now, usize::MAX)?);
    trim();
    let held = rss_bytes().saturating_sub(before);
    // Each round a new view for every function (set_fleet recomputes only what changed): the
    // view dropped first, untimed.
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        policy.set_fleet(None, now)?;
        let (t, c) = (Instant::now(), cpu());
        policy.set_fleet(Some(view.clone()), now)?;
        walls.push(t.elapsed().as_secs_f64() * 1000.0);
        cpus.push((cpu() - c).as_secs_f64() * 1000.0);
    }
    let (set_ms, set_cpu) = (median(walls), median(cpus));
    let (same_ms, _) = measure(o.rounds, || {
        policy.set_fleet(Some(view.clone()), now)?;
        Ok(())
    })?;
    println!(
        "set_fleet (every function recomputed with the blend): {set_ms:.1} ms median ({set_cpu:.1} ms CPU), {:.2}x the baseline",
        set_ms / base_ms
    );
    println!("set_fleet with an unchanged view (nothing recomputed): {same_ms:.1} ms median");
    // What the view's own allocations hold: names, buckets, the map's slots.
    let own: usize = view
        .functions
        .iter()
        .map(|(name, p)| {
            name.capacity()
                + std::mem::size_of::<emars_agent::policy::fleet::FleetPeaks>()
                + 16 // the Arc's counts
                + p.buckets.capacity() * std::mem::size_of::<(u64, f64)>()
        })
        .sum::<usize>()
        + view.functions.capacity() * (std::mem::size_of::<(String, Arc<()>)>() + 1);
    println!(
        "view held: {:.1} MiB of its own allocations ({:.0} bytes per function, {} samples); resident memory grew {:.1} MiB",
        own as f64 / (1 << 20) as f64,
        own as f64 / o.functions as f64,
        view.samples(),
        held as f64 / (1 << 20) as f64,
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
    if o.prometheus {
        prometheus_side(&o, &peaks)?;
    }
    Ok(())
}

/// Serves one host's exposition (the agent's protobuf encoder, native histograms) until the
/// process ends; returns its address.
fn serve_host(host: usize, peaks: &[Vec<u64>]) -> Result<String> {
    use emars_agent::api::metrics::{Format, PeakBuckets, Snapshot};
    use emars_agent::model::{live::NativePeaks, AgentInfo};
    let snapshot = Snapshot {
        peaks: PeakBuckets::Native(
            peaks
                .iter()
                .enumerate()
                .map(|(f, p)| {
                    (
                        format!("f{f}"),
                        Arc::new(NativePeaks::of(p.iter().copied())),
                    )
                })
                .collect(),
        ),
        functions: Vec::new(),
        limits: Vec::new(),
        recent_oom: Vec::new(),
        containers: Vec::new(),
        info: AgentInfo {
            agent_id: format!("{host:032x}"),
            ..AgentInfo::default()
        },
    };
    let body = snapshot.render(Format::Protobuf)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 8192];
            let _ = conn.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                emars_agent::api::metrics::PROTOBUF,
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    Ok(addr)
}

/// The fleet query's time and answer on a real Prometheus scraping the hosts.
fn prometheus_side(o: &Options, peaks: &[Vec<Vec<u64>>]) -> Result<()> {
    use emars_tests::prometheus::{Prometheus, NATIVE_HISTOGRAMS};
    let targets: Vec<String> = peaks
        .iter()
        .enumerate()
        .map(|(h, p)| serve_host(h, p))
        .collect::<Result<_>>()?;
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let config =
        Prometheus::config("emars", &refs).replace("scrape_interval: 1s", "scrape_interval: 15s");
    let prom = Prometheus::start(&config, &[NATIVE_HISTOGRAMS])?;
    // The query as the agent asks it, by an agent that is none of these hosts.
    let config = emars_agent::policy::fleet::FleetConfig::default();
    let query = config.query_for("ffffffffffffffffffffffffffffffff");
    let expected = (o.hosts * o.per_host) as f64;
    let started = Instant::now();
    loop {
        let count = prom
            .query("count(count by (instance) (emars_agent_info))")
            .ok()
            .and_then(|a| Prometheus::result(&a).first().cloned())
            .and_then(|r| r["value"][1].as_str().and_then(|v| v.parse::<u64>().ok()));
        if count == Some(o.hosts) {
            break;
        }
        if started.elapsed().as_secs() > 120 {
            bail!(
                "Prometheus did not scrape the {} hosts in 120 s:\n{}",
                o.hosts,
                prom.log()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let url = prom.url("/api/v1/query");
    let (mut times, mut bytes, mut view) = (Vec::new(), 0, None);
    for _ in 0..o.rounds {
        let t = Instant::now();
        let body = ureq::get(&url)
            .query("query", &query)
            .call()?
            .into_string()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
        view = Some(FleetView::from_answer(body.as_bytes(), 0, usize::MAX)?);
    }
    let view = view.context("no answer")?;
    println!(
        "prometheus: {} hosts x {} functions scraped (native histograms); fleet query {:.0} ms median, answer {:.1} MB",
        o.hosts,
        o.functions,
        median(times),
        bytes as f64 / 1e6
    );
    let f0 = view
        .peaks("f0")
        .context("f0 missing from Prometheus's answer")?;
    if view.functions.len() as u64 != o.functions || f0.count != expected {
        bail!(
            "Prometheus's answer: {} functions, f0 {} samples; expected {} and {expected}",
            view.functions.len(),
            f0.count,
            o.functions
        );
    }
    println!(
        "check: Prometheus's answer holds {} functions, f0 with {expected} samples",
        o.functions
    );
    Ok(())
}
