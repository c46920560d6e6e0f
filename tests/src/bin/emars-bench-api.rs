//! Read latency of the API against the size of the history: the same requests against a small
//! store (100 functions x 1 day) and a large one (F functions x D days), side by side in one
//! run, over real HTTP and a real sled store filled through the store's own write path.
//!
//! ```sh
//! cargo run --release -p emars-tests --bin emars-bench-api -- [--functions F] [--days D]
//!     [--per-day N] [--requests R]
//! ```
//!
//! Prints per store: records, fill time, start-up (open, which builds the live model: "open"
//! after a kill -9 reads every record, "clean" after a clean stop loads the checkpoint), the
//! peak RSS of a process that opened the store (as the agent does), bytes on disk per instance
//! record, and p50/p99/max of GET /v1/functions, GET /v1/functions/{name}, and of the
//! platform-facing GET /v1/functions/{name}/limits and /keepalive. Each open runs
//! in a fresh process (this binary with `--open PATH`), so that its RSS and time are those of
//! an agent starting on that store.
//! Needs no root and no kernel features.
//!
//! `--scrape [--functions F] [--days D] [--per-day N] [--requests R]` measures `/metrics` alone
//! on one store of F functions x D days (default 10,000 x 30 at 10 a day: 3,000,000 records):
//! the text exposition against the protobuf one with native histograms (what Prometheus asks
//! for with `--enable-feature=native-histograms`), R scrapes of each (default 10), taken in
//! turns in this process, each at least a second after the last of its format (an answer is
//! built at most once a second), after one scrape of each that warms the model's per-function
//! caches (timed apart, as "first"). Prints bytes, bytes per function, and p50 (median) and max
//! times of each, and the ratios protobuf / text.
//!
//! `--names N [--max-functions M]` measures something else instead, on the real agent (as
//! root; the agent binary is $EMARS_BIN, else target/<profile>/emars): N distinct function
//! names reported through `POST /v1/functions/{name}/invocations` with the token, as a tenant
//! could, to an agent capped at M functions (default 10,000) and, for comparison, to one whose
//! cap admits them all. Prints per agent: functions known, names refused, the agent's RSS
//! before, once the names are in and after the reads (R scrapes of `/metrics`, R
//! `GET /v1/functions`), `/metrics` bytes and scrape time, `GET /v1/functions` bytes and time.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use emars_agent::{
    api::{self, guard::Guard, server::Bounds, token::Token, ApiState, Predictive},
    kernel::cgroupfs::{CgroupVersion, MemoryHierarchy},
    model::AgentInfo,
    policy::{actuator::Actuator, Policy},
    store::Store,
};

const USAGE: &str = "usage: emars-bench-api [--functions F] [--days D] [--per-day N] [--requests R]
       emars-bench-api --scrape [--functions F] [--days D] [--per-day N] [--requests R]
       emars-bench-api --names N [--max-functions M] [--requests R]
  --functions F     functions of the large store (default 1000)
  --days D          days of history of the large store (default 30)
  --per-day N       instances per function per day (default 10)
  --requests R      GETs of each kind per store (default 200; 20 scrapes with --names)
  --scrape          /metrics only: text against protobuf (defaults: 10000 functions, 10 scrapes)
  --names N         report N new function names to a real agent instead (needs root)
  --max-functions M that agent's store.max_functions (default 10000)";

struct Opts {
    functions: u64,
    days: u64,
    per_day: u64,
    requests: usize,
    names: Option<u64>,
    max_functions: u64,
    scrape: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if (3..=4).contains(&args.len()) && args[1] == "--open" {
        let rebuild = args.get(3).is_some_and(|a| a == "--rebuild");
        if let Err(e) = open_child(Path::new(&args[2]), rebuild) {
            eprintln!("emars-bench-api --open: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match parse().and_then(|o| match o.names {
        Some(n) => names::run(n, o.max_functions, o.requests),
        None if o.scrape => scrape::run(&o),
        None => run(&o),
    }) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("emars-bench-api: {e:#}");
            std::process::exit(1);
        }
    }
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        functions: 1000,
        days: 30,
        per_day: 10,
        requests: 200,
        names: None,
        max_functions: emars_agent::store::DEFAULT_MAX_FUNCTIONS as u64,
        scrape: false,
    };
    let (mut requests_given, mut functions_given) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .with_context(|| format!("{a} needs a positive number\n{USAGE}"))
        };
        match a.as_str() {
            "--functions" => {
                o.functions = num()?;
                functions_given = true;
            }
            "--scrape" => o.scrape = true,
            "--days" => o.days = num()?,
            "--per-day" => o.per_day = num()?,
            "--requests" => {
                o.requests = num()? as usize;
                requests_given = true;
            }
            "--names" => o.names = Some(num()?),
            "--max-functions" => o.max_functions = num()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.names.is_some() && !requests_given {
        o.requests = 20;
    }
    if o.scrape && !requests_given {
        o.requests = 10;
    }
    if o.scrape && !functions_given {
        o.functions = 10_000;
    }
    Ok(o)
}

/// What one store size measured.
struct Row {
    label: String,
    records: u64,
    fill: Duration,
    open: Duration,
    open_clean: Duration,
    /// Peak RSS of a start after kill -9 (every record read).
    rss_mb: f64,
    /// RSS once that start is done.
    rss_crash_mb: f64,
    /// RSS once a clean start is done: what the agent holds from then on.
    rss_after_mb: f64,
    bytes_per_record: f64,
    list: Vec<Duration>,
    one: Vec<Duration>,
    limits: Vec<Duration>,
    keepalive: Vec<Duration>,
    /// GET /metrics (every retained instance walked once).
    metrics: Vec<Duration>,
}

fn run(o: &Opts) -> Result<()> {
    let sizes = [(100, 1), (o.functions, o.days)];
    let mut rows = Vec::new();
    for (functions, days) in sizes {
        rows.push(measure(functions, days, o)?);
    }
    println!(
        "\n{:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>28}  {:>28}",
        "store",
        "records",
        "fill s",
        "open s",
        "clean s",
        "peak MB",
        "RSS MB",
        "clean MB",
        "B/record",
        "GET /v1/functions p50/p99/max",
        "GET /v1/functions/{n} p50/p99/max"
    );
    for r in &rows {
        println!(
            "{:<22} {:>10} {:>9.2} {:>9.3} {:>9.3} {:>9.0} {:>9.0} {:>9.0} {:>9.0}  {:>28}  {:>28}",
            r.label,
            r.records,
            r.fill.as_secs_f64(),
            r.open.as_secs_f64(),
            r.open_clean.as_secs_f64(),
            r.rss_mb,
            r.rss_crash_mb,
            r.rss_after_mb,
            r.bytes_per_record,
            triple(&r.list),
            triple(&r.one),
        );
    }
    println!(
        "\n{:<22} {:>34}  {:>34}  {:>28}",
        "store",
        "GET .../{n}/limits p50/p99/max",
        "GET .../{n}/keepalive p50/p99/max",
        "GET /metrics p50/p99/max"
    );
    for r in &rows {
        println!(
            "{:<22} {:>34}  {:>34}  {:>28}",
            r.label,
            triple(&r.limits),
            triple(&r.keepalive),
            triple(&r.metrics)
        );
    }
    let (small, large) = (&rows[0], &rows[1]);
    println!(
        "\nlarge / small: records {:.0}x, GET /v1/functions p99 {:.2}x, GET /v1/functions/{{name}} p99 {:.2}x",
        large.records as f64 / small.records as f64,
        ms(pct(&large.list, 99.0)) / ms(pct(&small.list, 99.0)),
        ms(pct(&large.one, 99.0)) / ms(pct(&small.one, 99.0)),
    );
    Ok(())
}

fn measure(functions: u64, days: u64, o: &Opts) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    // EMARS_BENCH_KEEP=1 leaves the stores behind (for profiling an open with `--open PATH`).
    let (root, _removed_at_end) = if std::env::var_os("EMARS_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("keeping {}", kept.display());
        (kept, None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    let path = root.join("store");
    let label = format!("{functions} fn x {days} d");
    eprintln!(
        "filling {label} ({} records) ...",
        functions * days * o.per_day
    );
    let t0 = Instant::now();
    let records = emars_tests::seed_store(&path, functions, days, o.per_day)?;
    let fill = t0.elapsed();
    let bytes_per_record = dir_bytes(&path) as f64 / records as f64;
    // Start-up after a kill -9 (no checkpoint: every record is read), which then stops
    // cleanly ...
    let (open, from_checkpoint, rss_mb, rss_crash_mb) = open_in_child(&path)?;
    if from_checkpoint {
        bail!("the store opened from a checkpoint after an unclean stop");
    }
    // ... and after that clean stop (the live model comes from the checkpoint).
    let (open_clean, from_checkpoint, _, rss_after_mb) = open_in_child(&path)?;
    if !from_checkpoint {
        bail!("the store did not open from its checkpoint");
    }
    let store = Store::open(&path)?;

    let (addr, _server) = serve(store, &root, &root)?;
    let http = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let get = |p: &str| -> Result<Duration> {
        let t = Instant::now();
        let r = http.get(&format!("http://{addr}{p}")).call()?;
        // Read to the end, whatever the size (a scrape of many functions is tens of MB).
        std::io::copy(&mut r.into_reader(), &mut std::io::sink())?;
        Ok(t.elapsed())
    };
    let mut list = Vec::with_capacity(o.requests);
    let mut one = Vec::with_capacity(o.requests);
    let mut limits = Vec::with_capacity(o.requests);
    let mut keepalive = Vec::with_capacity(o.requests);
    for i in 0..o.requests {
        let f = (i as u64 * 7919) % functions;
        list.push(get("/v1/functions")?);
        one.push(get(&format!("/v1/functions/f{f}"))?);
        limits.push(get(&format!("/v1/functions/f{f}/limits"))?);
        keepalive.push(get(&format!("/v1/functions/f{f}/keepalive"))?);
    }
    // A scrape is a walk of everything: a few are enough.
    let metrics = (0..o.requests.min(20))
        .map(|_| get("/metrics"))
        .collect::<Result<Vec<_>>>()?;
    let scrape = http.get(&format!("http://{addr}/metrics")).call()?;
    let mut body = Vec::new();
    std::io::copy(&mut scrape.into_reader(), &mut body)?;
    eprintln!(
        "{label}: GET /metrics is {:.1} MB ({} bytes per function)",
        body.len() as f64 / 1e6,
        body.len() as u64 / functions
    );
    Ok(Row {
        label,
        records,
        fill,
        open,
        open_clean,
        rss_mb,
        rss_crash_mb,
        rss_after_mb,
        bytes_per_record,
        list,
        one,
        limits,
        keepalive,
        metrics,
    })
}

/// `--open PATH`: opens the store as the agent does, stops cleanly, and prints the open time,
/// whether it came from the checkpoint, and the process's peak RSS.
fn open_child(path: &Path, rebuild: bool) -> Result<()> {
    let t0 = Instant::now();
    let store = if rebuild {
        Store::open_rebuilding(path)?
    } else {
        Store::open(path)?
    };
    let open = t0.elapsed();
    let from_checkpoint = store.opened_from_checkpoint();
    // The agent answers from the model at once: build the cached list as the first GET would.
    let _ = store.functions_json();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in /proc/self/status"))
    };
    // Peak during the open, and what stays once it is done (the agent's from then on).
    let (hwm_kb, rss_kb) = (kb("VmHWM:")?, kb("VmRSS:")?);
    store.checkpoint()?;
    println!(
        "{} {} {} {}",
        open.as_secs_f64(),
        from_checkpoint,
        hwm_kb,
        rss_kb
    );
    Ok(())
}

/// (open time, from the checkpoint, peak RSS MB, RSS MB after the open).
fn open_in_child(path: &Path) -> Result<(Duration, bool, f64, f64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--open")
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }

    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    let (Some(secs), Some(cp), Some(hwm), Some(rss)) = (f.next(), f.next(), f.next(), f.next())
    else {
        bail!("unexpected output of --open: {text}");
    };
    Ok((
        Duration::from_secs_f64(secs.parse()?),
        cp == "true",
        hwm.parse::<f64>()? / 1024.0,
        rss.parse::<f64>()? / 1024.0,
    ))
}

/// The real API router and server on 127.0.0.1:0, on a runtime of its own.
fn serve(
    store: Store,
    dir: &Path,
    tmp: &Path,
) -> Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let token = Token::load_or_create(&dir.join("token"))?;
    // The policy as the agent runs it, in observe mode (the actuator writes nothing: its
    // hierarchy is an empty directory), with every recommendation computed once, as at start.
    let hierarchy = MemoryHierarchy {
        version: CgroupVersion::V2,
        mount: tmp.join("no-cgroups"),
        hierarchy_id: 0,
    };
    let actuator = Arc::new(Actuator::new(
        hierarchy,
        &["/emars".to_string()],
        8 << 20,
        false,
        store.clone(),
    ));
    let config = emars_agent::config::PolicyConfig {
        export_dir: tmp.join("export"),
        ..Default::default()
    };
    let policy = Arc::new(Policy::new(config, store.clone(), actuator.host_memory()));
    policy.compute_all(emars_agent::clock::now_ms())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
                return;
            };
            let Ok(addr) = listener.local_addr() else {
                return;
            };
            let listeners = api::listen::Listeners {
                tcp: Some(listener),
                ..Default::default()
            };
            let state = ApiState {
                store,
                info: Arc::new(RwLock::new(AgentInfo::default())),
                predictive: Some(Predictive {
                    policy,
                    actuator,
                    reactive: Default::default(),
                    limits_written: None,
                    admissions: Default::default(),
                }),
                retention_ms: 3650 * 86_400_000,
                pool: None,
                snapshots: Default::default(),
            };
            let guard = Arc::new(Guard::new(token, addr, &[]));
            let _ = tx.send(addr);
            let _ = api::serve(
                listeners,
                state,
                guard,
                Bounds::default(),
                std::future::pending(),
            )
            .await;
        });
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .context("the API server did not start")?;
    Ok((addr, handle))
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1)) - 1;
    s.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn triple(v: &[Duration]) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        ms(pct(v, 50.0)),
        ms(pct(v, 99.0)),
        ms(pct(v, 100.0))
    )
}

/// `--scrape`: `/metrics` in the text format against the protobuf one, on one store.
mod scrape {
    use std::time::{Duration, Instant};

    use anyhow::{bail, Result};
    use emars_agent::api::metrics::{PROTOBUF, TEXT};

    use super::{ms, pct, serve, Opts};

    /// One format's scrapes.
    struct Format {
        name: &'static str,
        accept: &'static str,
        content_type: &'static str,
        bytes: usize,
        first: Duration,
        times: Vec<Duration>,
    }

    pub fn run(o: &Opts) -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("store");
        let records = o.functions * o.days * o.per_day;
        eprintln!(
            "filling {} functions x {} days ({records} records) ...",
            o.functions, o.days
        );
        emars_tests::seed_store(&path, o.functions, o.days, o.per_day)?;
        let store = emars_agent::store::Store::open(&path)?;
        let (addr, _server) = serve(store, tmp.path(), tmp.path())?;
        let http = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        let get = |f: &Format| -> Result<(usize, Duration)> {
            let t = Instant::now();
            let r = http
                .get(&format!("http://{addr}/metrics"))
                .set("Accept", f.accept)
                .call()?;
            if r.content_type() != f.content_type.split(';').next().unwrap_or_default() {
                bail!("{}: answered {}", f.name, r.content_type());
            }
            let mut body = Vec::new();
            // Read to the end, whatever the size (a text scrape of many functions is tens of MB).
            std::io::copy(&mut r.into_reader(), &mut body)?;
            Ok((body.len(), t.elapsed()))
        };
        let mut formats = [
            Format {
                name: "text (classic buckets)",
                accept: "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                content_type: TEXT,
                bytes: 0,
                first: Duration::ZERO,
                times: Vec::new(),
            },
            // What Prometheus 2.42 sends with native histograms on (scrape/scrape.go).
            Format {
                name: "protobuf (native)",
                accept: "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                         encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,\
                         text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                content_type: PROTOBUF,
                bytes: 0,
                first: Duration::ZERO,
                times: Vec::new(),
            },
        ];
        for f in &mut formats {
            (f.bytes, f.first) = get(f)?;
        }
        for _ in 0..o.requests {
            // A format's answer is built at most once a second: each scrape here builds one.
            std::thread::sleep(Duration::from_millis(1100));
            for f in &mut formats {
                let (bytes, took) = get(f)?;
                f.bytes = bytes;
                f.times.push(took);
            }
        }
        println!(
            "\n/metrics of {} functions ({records} records), {} scrapes of each format in turns\n",
            o.functions, o.requests
        );
        println!(
            "{:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "format", "bytes", "B/function", "first ms", "p50 ms", "max ms"
        );
        for f in &formats {
            println!(
                "{:<24} {:>12} {:>12.0} {:>12.1} {:>12.1} {:>12.1}",
                f.name,
                f.bytes,
                f.bytes as f64 / o.functions as f64,
                ms(f.first),
                ms(pct(&f.times, 50.0)),
                ms(pct(&f.times, 100.0)),
            );
        }
        let [text, proto] = &formats;
        println!(
            "\nprotobuf / text: bytes {:.3}x, p50 {:.3}x",
            proto.bytes as f64 / text.bytes as f64,
            ms(pct(&proto.times, 50.0)) / ms(pct(&text.times, 50.0))
        );
        Ok(())
    }
}

/// `--names`: many tenant-chosen names against the real agent, capped and not.
mod names {
    use std::time::{Duration, Instant};

    use anyhow::{bail, Result};
    use emars_tests::{names::*, require_root, Agent, TestRoot, MIB};

    use super::{pct, triple};

    /// What one agent measured.
    struct Run {
        max_functions: u64,
        known: u64,
        refused: u64,
        rate: f64,
        rss_idle: u64,
        /// Once the first `split` names are in, once all are, and once the scrapes and lists
        /// are done too.
        rss_split: u64,
        rss_names: u64,
        rss_after: u64,
        metrics_bytes: usize,
        scrapes: Vec<Duration>,
        list_bytes: usize,
        lists: Vec<Duration>,
        model_bytes: u64,
        strings: u64,
    }

    pub fn run(n: u64, max_functions: u64, requests: usize) -> Result<()> {
        if !require_root("emars-bench-api --names") {
            bail!("--names runs the real agent: run as root");
        }
        let split = max_functions.min(n) as usize;
        let mut runs = vec![measure(n, max_functions, split, requests)?];
        if max_functions < n {
            runs.push(measure(n, n, split, requests)?);
        }
        println!(
            "\n{n} distinct names reported (POST /v1/functions/{{name}}/invocations, 4 clients)\n"
        );
        println!(
            "{:>13} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>28} {:>10} {:>28} {:>9} {:>8}",
            "max_functions",
            "known",
            "refused",
            "names/s",
            "RSS idle",
            &format!("RSS {split}"),
            "RSS names",
            "RSS after",
            "/metrics",
            "scrape p50/p99/max",
            "/functions",
            "GET /v1/functions p50/p99/max",
            "model",
            "strings"
        );
        for r in &runs {
            println!(
                "{:>13} {:>7} {:>7} {:>9.0} {:>6.1} MB {:>6.1} MB {:>6.1} MB {:>6.1} MB {:>7.1} MB {:>28} {:>7.1} MB {:>28} {:>6.1} MB {:>8}",
                r.max_functions,
                r.known,
                r.refused,
                r.rate,
                r.rss_idle as f64 / MIB as f64,
                r.rss_split as f64 / MIB as f64,
                r.rss_names as f64 / MIB as f64,
                r.rss_after as f64 / MIB as f64,
                r.metrics_bytes as f64 / 1e6,
                triple(&r.scrapes),
                r.list_bytes as f64 / 1e6,
                triple(&r.lists),
                r.model_bytes as f64 / 1e6,
                r.strings
            );
        }
        if let [capped, all] = runs.as_slice() {
            println!(
                "\ncapped / all admitted: RSS with the names {:.2}x, after the reads {:.2}x, \
                 /metrics {:.3}x, scrape p50 {:.3}x",
                capped.rss_names as f64 / all.rss_names as f64,
                capped.rss_after as f64 / all.rss_after as f64,
                capped.metrics_bytes as f64 / all.metrics_bytes as f64,
                pct(&capped.scrapes, 50.0).as_secs_f64() / pct(&all.scrapes, 50.0).as_secs_f64()
            );
        }
        Ok(())
    }

    fn measure(n: u64, max_functions: u64, split: usize, requests: usize) -> Result<Run> {
        let root = TestRoot::new()?;
        let agent = Agent::start_configured(
            &root,
            &format!("[store]\nmax_functions = {max_functions}\n"),
        )?;
        // The agent's first tick (its first retention pass) is over.
        std::thread::sleep(Duration::from_secs(2));
        let rss_idle = rss_bytes(agent.pid())?;
        eprintln!("max_functions = {max_functions}: reporting {n} names ...");
        let all = names("tenant", n as usize);
        let start = Instant::now();
        let first = report_names(&agent, &all[..split], 4)?;
        let rss_split = rss_bytes(agent.pid())?;
        let rest = report_names(&agent, &all[split..], 4)?;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let answers = Answers {
            counted: first.counted + rest.counted,
            refused: first.refused + rest.refused,
        };
        let rss_names = rss_bytes(agent.pid())?;
        let mut scrapes = Vec::new();
        let mut metrics_bytes = 0;
        for _ in 0..requests {
            let (text, took) = scrape(&agent)?;
            metrics_bytes = text.len();
            scrapes.push(took);
        }
        let mut lists = Vec::new();
        let mut list_bytes = 0;
        for _ in 0..requests {
            let t = Instant::now();
            let body = ureq::get(&agent.url("/v1/functions")).call()?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut body.into_reader(), &mut text)?;
            lists.push(t.elapsed());
            list_bytes = text.len();
        }
        let rss_after = rss_bytes(agent.pid())?;
        let info = agent.get_ok("/v1/info")?;
        let refused = info["function_cap"]["refused"].as_u64().unwrap_or(0);
        if refused != answers.refused {
            bail!(
                "the agent counts {refused} refusals, the clients saw {}",
                answers.refused
            );
        }
        Ok(Run {
            max_functions,
            known: info["model"]["functions"].as_u64().unwrap_or(0),
            refused,
            rate,
            rss_idle,
            rss_split,
            rss_names,
            rss_after,
            metrics_bytes,
            scrapes,
            list_bytes,
            lists,
            model_bytes: info["model"]["bytes"].as_u64().unwrap_or(0),
            strings: info["model"]["strings"].as_u64().unwrap_or(0),
        })
    }
}
