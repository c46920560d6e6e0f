//! emars-platform: a small serverless platform that runs the way stock OpenLambda does — a
//! pool of pre-created cgroups (`cg-N`) handed to sandboxes of any function, warm sandboxes
//! reused, idle ones recycled after a keep-alive, memory.max written when a cgroup is handed
//! out, the longest-idle warm sandbox evicted when a cold start finds the pool empty — with
//! real processes allocating real memory in real cgroups, driven by the Azure Functions 2019
//! sample's invocation timeline (time compressed). Two modes on the same arrivals and the same
//! drawn peaks, side by side in one run:
//!
//! - `openlambda`: a fixed memory.max for every sandbox and a fixed 10-minute keep-alive; the
//!   agent only watches (observe mode).
//! - `emars`: before a cold start the platform asks `POST /v1/admission` (a refusal drops the
//!   invocation); the agent writes the function's limits at bind (enforce mode; while a
//!   function has no history, the fixed limit, written through the agent so that its burst
//!   guard watches it); the burst guard is on; the keep-alive is the agent's advice (`GET
//!   /v1/functions/{name}/keepalive`) as the hybrid histogram policy means it (Shahrad et al.,
//!   ATC'20): when the advice has a pre-warm, the sandbox is unloaded when the invocation
//!   ends (its cgroup goes back to the pool) and a sandbox of the function is loaded again at
//!   the pre-warm point, kept for the keep-alive from then; without one, the sandbox stays
//!   warm for the keep-alive from the end.
//!
//! A pre-warm load is a sandbox start no invocation waits for, so not a cold start; an
//! invocation that arrives before its function's pre-warm point finds no sandbox and is one
//! (it takes the place of that pending pre-warm). A pre-warm takes a free cgroup only: it
//! never evicts a warm sandbox (that would trade a sandbox that may be used for one that may
//! be), and is skipped, and counted, when the pool is empty or admission refuses it.
//!
//! In both modes the platform binds the sandbox's cgroup at each invocation and releases it
//! at its end (`/v1/bind`, `/v1/release`): every invocation is a record with its exact peak,
//! and the gaps between a function's invocations are what its keep-alive advice is made of.
//! A sandbox whose process the OOM killer took is recycled, not kept warm or pre-warmed.
//!
//! Prints per mode: invocations, cold starts, pre-warm loads, OOM kills, refusals,
//! memory-time reserved (memory.max x time a sandbox holds a cgroup, in trace time; an
//! unloaded sandbox holds none) and the emars row's ratio to openlambda's — and the paper's
//! figure 4/5 view: how many sandboxes each memory.max was written for. `--json FILE` writes
//! the same per mode and per function (cold starts, pre-warm loads and hits, unloads).
//! `--synthetic-gap G` replaces the sample with one function invoked every G trace minutes.
//!
//! `--http` runs a third platform instead of the two modes, one whose functions serve HTTP as
//! long-lived function servers do (Knative, OpenWhisk's action containers, of-watchdog), on the
//! same arrivals and drawn peaks: each sandbox is an instance cgroup of its function,
//! `<root>/<function>/sb-N` (on a hybrid host also at the same path in the unified hierarchy,
//! as runc makes it: [`emars_tests::http::Sandbox`]), memory.max at `--fixed-mib`; its cold
//! start starts the tests' function server inside (`emars-http-server`) and opens one
//! keep-alive connection to it; each invocation is one `POST /invoke?mib=N&ms=T` over that
//! connection (the server allocates and touches N MiB, holds them T ms, frees them); warm
//! sandboxes are reused, kept OpenLambda's 10 minutes, the longest-idle one evicted when
//! `--pool` sandboxes are up (an invocation that finds them all busy is dropped); recycling
//! kills the server and removes the cgroups (the agent reads the last counts at rmdir). No
//! bind, no release, no invocation report: the agent (observe mode) knows the requests only
//! from its kernel counts. At the end it compares, per function, the requests sent with the
//! sum of the agent's `hours[].requests` (`GET /v1/functions/{name}`), whose
//! `requests_source` must be `kernel_requests`, with one connection per sandbox and no
//! platform report; it prints the table (`--json FILE` writes it), and exits 1 unless every
//! function matches exactly. Per hour it only shows the figures (when the run spans more than
//! one hour): trace hours are compressed into seconds, and the agent files counts under the
//! wall-clock hour it reads them in, so the per-function totals are the exact check. A
//! request an OOM kill interrupts was sent and is counted; the sandbox is recycled.
//!
//! ```text
//! cargo build --release -p emars-agent -p emars-tests --bins
//! sudo EMARS_BIN=target/release/emars target/release/emars-platform [--functions K]
//!     [--minutes M] [--minute-ms T] [--mem-scale S] [--fixed-mib F] [--pool P] [--data DIR]
//!     [--synthetic-gap G] [--no-prewarm] [--json FILE] [--plots DIR]
//! sudo EMARS_BIN=target/release/emars target/release/emars-platform --http [--functions K]
//!     [--minutes M] [--minute-ms T] [--mem-scale S] [--fixed-mib F] [--pool P] [--json FILE]
//! ```
//! Data: `--data`, else `$EMARS_DATA_DIR`, else `<workspace>/../shared/data/azure2019`
//! (`invocation_traces_public.csv`, `memory_traces_public.csv`, `duration_traces_public.csv`).

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::{BufReader, Write},
    net::TcpStream,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use emars_tests::azure::{self, inverse_cdf, Function, SplitMix64};
use emars_tests::http;
use emars_tests::platform_report::{self as report, FunctionTally, Tally};
use emars_tests::{
    alloc_bin, http_server_bin, program_attached, spawn_in, wait_for, Agent, TestRoot, MIB,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: emars-platform [--functions K] [--minutes M] [--minute-ms T]
    [--mem-scale S] [--fixed-mib F] [--pool P] [--data DIR] [--plots DIR]
    [--synthetic-gap G] [--no-prewarm] [--json FILE] [--http]
  --functions K   functions of the sample, spread from the busiest to the rarest (default 24)
  --minutes M     trace minutes replayed (default 30)
  --minute-ms T   real milliseconds per trace minute (default 2000)
  --mem-scale S   trace MiB x S = MiB a process allocates (default 0.25)
  --fixed-mib F   OpenLambda's fixed memory.max, MiB (default 128)
  --pool P        pre-created cgroups (default 16, OpenLambda's reserve of ready ones)
  --plots DIR     also write the table as SVG bar charts into DIR
  --synthetic-gap G  instead of the sample, one function invoked every G trace minutes
  --no-prewarm    emars mode keeps a sandbox from the end of an invocation for pre-warm plus
                  keep-alive instead of unloading it and loading one at the pre-warm point
  --json FILE     also write the figures per mode and per function as JSON to FILE
  --http          instead of the two modes: each sandbox an instance cgroup with a function
                  server (emars-http-server) inside, each invocation an HTTP request to it;
                  fails unless the agent counted every function's requests in the kernel
  --sized ...     the input-aware run instead (emars_tests::sized; --sized --help)
Runs as root. The agent binary is $EMARS_BIN (else target/<profile>/emars); the workload
$EMARS_ALLOC_BIN, the function server $EMARS_HTTP_SERVER_BIN (else beside this binary).";

/// OpenLambda's keep-alive in trace minutes.
const FIXED_KEEPALIVE_MIN: f64 = 10.0;

struct Opts {
    functions: usize,
    minutes: usize,
    minute_ms: u64,
    mem_scale: f64,
    fixed_mib: u64,
    pool: usize,
    data: PathBuf,
    plots: Option<PathBuf>,
    /// One function every this many trace minutes instead of the sample.
    synthetic_gap: Option<f64>,
    /// Keep from the end (the platform before pre-warm was real), for comparison.
    no_prewarm: bool,
    json: Option<PathBuf>,
    /// Invocations as HTTP requests into warm sandboxes of the platform's own server.
    http: bool,
}

fn main() {
    if std::env::args().any(|a| a == "--sized") {
        if let Err(e) = emars_tests::sized::main_with_args(std::env::args().skip(1)) {
            eprintln!("emars-platform --sized: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = parse().and_then(|o| run(&o)) {
        eprintln!("emars-platform: {e:#}");
        std::process::exit(1);
    }
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        functions: 24,
        minutes: 30,
        minute_ms: 2000,
        mem_scale: 0.25,
        fixed_mib: 128,
        pool: 16,
        data: std::env::var_os("EMARS_DATA_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/azure2019"),
            PathBuf::from,
        ),
        plots: None,
        synthetic_gap: None,
        no_prewarm: false,
        json: None,
        http: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        let num = |v: String| -> Result<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|x| *x > 0.0)
                .with_context(|| format!("{a} needs a positive number\n{USAGE}"))
        };
        match a.as_str() {
            "--functions" => o.functions = num(val()?)? as usize,
            "--minutes" => o.minutes = num(val()?)? as usize,
            "--minute-ms" => o.minute_ms = num(val()?)? as u64,
            "--mem-scale" => o.mem_scale = num(val()?)?,
            "--fixed-mib" => o.fixed_mib = num(val()?)? as u64,
            "--pool" => o.pool = num(val()?)? as usize,
            "--data" => o.data = PathBuf::from(val()?),
            "--plots" => o.plots = Some(PathBuf::from(val()?)),
            "--synthetic-gap" => o.synthetic_gap = Some(num(val()?)?),
            "--no-prewarm" => o.no_prewarm = true,
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--http" => o.http = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// The replayed functions of the sample: at most 20 invocations a minute (real processes on a
/// small host), at least one in the replayed minutes; then K spread evenly from the busiest to
/// the rarest, so that some keep their sandboxes warm and others come and go.
fn pick(o: &Opts) -> Result<Vec<Function>> {
    let mut out = azure::load(&o.data)?.functions;
    for f in &mut out {
        f.per_minute.truncate(o.minutes);
    }
    out.retain(|f| f.per_minute.iter().all(|n| *n <= 20) && f.per_minute.iter().any(|n| *n > 0));
    out.sort_by_key(|f| std::cmp::Reverse(f.per_minute.iter().sum::<u32>()));
    if out.len() > o.functions {
        let stride = out.len() as f64 / o.functions as f64;
        let picked: Vec<usize> = (0..o.functions)
            .map(|i| (i as f64 * stride) as usize)
            .collect();
        out = out
            .into_iter()
            .enumerate()
            .filter(|(i, _)| picked.contains(i))
            .map(|(_, f)| f)
            .collect();
    }
    if out.is_empty() {
        bail!("no function to replay in {}", o.data.display());
    }
    Ok(out)
}

/// `--synthetic-gap`: one function, 64 MiB in the trace, running 1 s of trace time.
fn synthetic() -> Vec<Function> {
    vec![Function {
        id: "synthetic".into(),
        per_minute: Vec::new(),
        memory_mib: [64.0; 8],
        duration_ms: 1000.0,
    }]
}

fn name(f: &Function) -> String {
    format!("az{}", f.id)
}

/// One invocation: when (ms of real time from the start), which function, how much memory
/// (MiB, drawn once for both modes), how long (real ms).
#[derive(Clone)]
struct Invocation {
    at_ms: u64,
    function: usize,
    mib: u64,
    hold_ms: u64,
}

fn arrivals(o: &Opts, fs: &[Function]) -> Vec<Invocation> {
    let hold_ms = |f: &Function| ((f.duration_ms * o.minute_ms as f64 / 60_000.0) as u64).max(5);
    if let (Some(gap), [f]) = (o.synthetic_gap, fs) {
        // Every `gap` trace minutes, from half a minute in.
        return (0..)
            .map(|k| (k as f64 * gap + 0.5) * o.minute_ms as f64)
            .take_while(|at| *at < (o.minutes as u64 * o.minute_ms) as f64)
            .map(|at| Invocation {
                at_ms: at as u64,
                function: 0,
                mib: ((f.memory_mib[0] * o.mem_scale) as u64).max(1),
                hold_ms: hold_ms(f),
            })
            .collect();
    }
    let mut rng = SplitMix64(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    for (fi, f) in fs.iter().enumerate() {
        for (m, n) in f.per_minute.iter().enumerate() {
            for k in 0..*n {
                let mib = inverse_cdf(&f.memory_mib, rng.next_f64());
                let at = (m as f64 + (k as f64 + 0.5) / *n as f64) * o.minute_ms as f64;
                out.push(Invocation {
                    at_ms: at as u64,
                    function: fi,
                    mib: ((mib * o.mem_scale) as u64).max(1),
                    hold_ms: hold_ms(f),
                });
            }
        }
    }
    out.sort_by_key(|i| i.at_ms);
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    OpenLambda,
    Emars,
}

/// A sandbox: a pool cgroup bound to a function, busy or warm.
struct Sandbox {
    slot: usize,
    function: usize,
    busy: bool,
    /// Loaded and not yet bound to an invocation: its first bind is its hand-out (limits).
    fresh: bool,
    /// Loaded at a pre-warm point (its first invocation is a pre-warm hit).
    prewarmed: bool,
    /// Real ms (from the start) when it went idle.
    idle_since: u64,
    /// How long it stays warm once idle, real ms.
    keepalive_ms: u64,
    /// Real ms since which it has held its cgroup at `max_bytes`.
    since: u64,
    max_bytes: u64,
}

/// A pre-warm owed to a function whose sandbox was unloaded: load one at `at_ms` (real ms
/// from the start) and keep it `keepalive_ms`; until its first bind it holds the limit its
/// function's last sandbox had.
struct Prewarm {
    function: usize,
    at_ms: u64,
    keepalive_ms: u64,
    max_bytes: u64,
}

/// The keep-alive a sandbox gets when an invocation ends: load again `prewarm_ms` after the
/// end (0: stay loaded), keep `keepalive_ms` from then; real ms.
struct Advice {
    prewarm_ms: u64,
    keepalive_ms: u64,
}

struct Platform<'a> {
    o: &'a Opts,
    mode: Mode,
    root: &'a TestRoot,
    agent: &'a Agent,
    fs: &'a [Function],
    free: VecDeque<usize>,
    boxes: Vec<Sandbox>,
    prewarms: Vec<Prewarm>,
    t: Tally,
    start: Instant,
}

impl Platform<'_> {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn slot_dir(&self, slot: usize) -> PathBuf {
        self.root.dir.join(format!("cg-{slot}"))
    }

    fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.agent
            .post_raw(path, "application/json", body.to_string().as_bytes())
    }

    /// Adds the memory-time sandbox `b` held at its memory.max since `b.since`.
    fn count_held(t: &mut Tally, b: &Sandbox, now: u64) {
        t.mib_ms += (b.max_bytes / MIB) as f64 * now.saturating_sub(b.since) as f64;
    }

    /// Sandbox `i` holds its cgroup at `max` from now on.
    fn hold_at(&mut self, i: usize, max: u64) {
        let now = self.now();
        let b = &mut self.boxes[i];
        if max != b.max_bytes {
            Self::count_held(&mut self.t, b, now);
            b.max_bytes = max;
            b.since = now;
        }
    }

    /// Recycles (or unloads) an idle sandbox: its cgroup goes back to the pool.
    fn recycle(&mut self, i: usize) -> Sandbox {
        let b = self.boxes.swap_remove(i);
        let now = self.now();
        Self::count_held(&mut self.t, &b, now);
        self.free.push_back(b.slot);
        b
    }

    /// A sandbox of `function` on a free cgroup, idle and not yet handed out; `evict`: when
    /// the pool is empty, recycle the longest-idle warm sandbox for it (a cold start does,
    /// a pre-warm does not). None: no cgroup.
    fn load(&mut self, function: usize, evict: bool, max_bytes: u64) -> Option<usize> {
        if self.free.is_empty() && evict {
            let oldest = self
                .boxes
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.busy)
                .min_by_key(|(_, b)| b.idle_since)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                self.recycle(i);
            }
        }
        let slot = self.free.pop_front()?;
        let now = self.now();
        self.boxes.push(Sandbox {
            slot,
            function,
            busy: false,
            fresh: true,
            prewarmed: false,
            idle_since: now,
            keepalive_ms: 0,
            since: now,
            max_bytes,
        });
        Some(self.boxes.len() - 1)
    }

    /// An invocation starts in sandbox `i`: its cgroup is bound to the function for it (the
    /// agent writes the function's limits when they differ from those in force). Returns the
    /// memory.max in force (0: none).
    fn bind(&mut self, i: usize, invocation: usize) -> Result<u64> {
        let (slot, function) = (self.boxes[i].slot, self.boxes[i].function);
        let name = name(&self.fs[function]);
        let dir = self.slot_dir(slot);
        let (s, rec) = self.post(
            "/v1/bind",
            json!({"cgroup": dir.display().to_string(), "function": name,
                   "instance": format!("{name}-{invocation}")}),
        )?;
        if s != 200 {
            bail!("bind: {s} {rec}");
        }
        // Unlimited only at a cold start in emars mode, before the fixed limit stands in.
        let max = self.root.hierarchy.max_limit(&dir).unwrap_or(0);
        self.hold_at(i, max);
        Ok(max)
    }

    /// The first invocation in a loaded sandbox `i`: its hand-out. OpenLambda writes its
    /// fixed limit. In emars mode the agent writes the function's limits at bind; while the
    /// function has none, the fixed one stands in, written through the agent (so that its
    /// burst guard watches it too).
    fn hand_out(&mut self, i: usize, invocation: usize) -> Result<()> {
        let name = name(&self.fs[self.boxes[i].function]);
        let agent_writes = self.mode == Mode::Emars
            && self
                .agent
                .get(&format!("/v1/functions/{name}/limits"))
                .map(|(s, _)| s == 200)
                .unwrap_or(false);
        if self.mode == Mode::OpenLambda {
            let dir = self.slot_dir(self.boxes[i].slot);
            self.root
                .hierarchy
                .set_limit(&dir, self.o.fixed_mib * MIB)?;
        }
        let mut max = self.bind(i, invocation)?;
        if self.mode == Mode::Emars && !agent_writes {
            let (s, a) = self.post(
                &format!("/v1/functions/{name}/instances/{name}-{invocation}/limits"),
                json!({ "max_bytes": self.o.fixed_mib * MIB }),
            )?;
            if s != 200 {
                bail!("set-limit: {s} {a}");
            }
            max = self.o.fixed_mib * MIB;
            self.hold_at(i, max);
        }
        self.boxes[i].fresh = false;
        *self.t.limits.entry(max / MIB).or_default() += 1;
        Ok(())
    }

    /// The invocation in `slot` ended: its use is released.
    fn release(&mut self, slot: usize) -> Result<()> {
        let (s, body) = self.post(
            "/v1/release",
            json!({"cgroup": self.slot_dir(slot).display().to_string()}),
        )?;
        if s != 200 {
            bail!("release: {s} {body}");
        }
        self.t.uses += 1;
        Ok(())
    }

    /// Emars mode: may the function start a new instance (`POST /v1/admission`)?
    fn admitted(&self, function: usize) -> Result<bool> {
        if self.mode != Mode::Emars {
            return Ok(true);
        }
        let name = name(&self.fs[function]);
        let (s, a) = self.post("/v1/admission", json!({ "function": name }))?;
        if s != 200 {
            bail!("admission: {s} {a}");
        }
        Ok(a["admit"] != false)
    }

    /// Idle sandboxes whose keep-alive ended by `now` (real ms from the start) are recycled;
    /// pre-warms whose point has come by then are loaded. When the platform runs behind, `now`
    /// is the next arrival's time, not the clock's: a sandbox still warm when the invocation
    /// arrived serves it.
    fn expire(&mut self, now: u64) -> Result<()> {
        while let Some(i) = self
            .boxes
            .iter()
            .position(|b| !b.busy && now >= b.idle_since + b.keepalive_ms)
        {
            self.recycle(i);
        }
        while let Some(k) = self.prewarms.iter().position(|p| now >= p.at_ms) {
            let p = self.prewarms.swap_remove(k);
            let loaded = match self.admitted(p.function)? {
                true => self.load(p.function, false, p.max_bytes),
                false => None,
            };
            let f = &mut self.t.functions[p.function];
            match loaded {
                Some(i) => {
                    f.prewarm_loads += 1;
                    let b = &mut self.boxes[i];
                    b.prewarmed = true;
                    // Kept from its pre-warm point, however late the platform loads it.
                    b.idle_since = p.at_ms;
                    b.keepalive_ms = p.keepalive_ms;
                }
                None => f.prewarms_skipped += 1,
            }
        }
        Ok(())
    }

    fn advice(&mut self, function: usize) -> Advice {
        let fixed = Advice {
            prewarm_ms: 0,
            keepalive_ms: (FIXED_KEEPALIVE_MIN * self.o.minute_ms as f64) as u64,
        };
        if self.mode == Mode::OpenLambda {
            return fixed;
        }
        let path = format!("/v1/functions/{}/keepalive", name(&self.fs[function]));
        match self.agent.get(&path) {
            // The agent sees real time: its advice is in real ms already.
            Ok((200, k)) => {
                if k["basis"].as_str().is_some_and(|b| !b.starts_with("fixed")) {
                    self.t.advised.insert(function);
                } else {
                    self.t.advised.remove(&function);
                }
                let (prewarm_ms, keepalive_ms) = (
                    k["prewarm_ms"].as_u64().unwrap_or(0),
                    k["keepalive_ms"].as_u64().unwrap_or(0),
                );
                match self.o.no_prewarm {
                    true => Advice {
                        prewarm_ms: 0,
                        keepalive_ms: prewarm_ms + keepalive_ms,
                    },
                    false => Advice {
                        prewarm_ms,
                        keepalive_ms,
                    },
                }
            }
            _ => fixed,
        }
    }

    /// A sandbox for an invocation, bound to its function for it: a warm one of its function,
    /// else a cold start on a pool cgroup (evicting the longest-idle warm sandbox when the pool
    /// is empty; it takes the place of the function's earliest pending pre-warm). None:
    /// refused or no cgroup.
    fn sandbox(&mut self, function: usize, invocation: usize) -> Result<Option<usize>> {
        let nth = self.t.functions[function].invocations;
        self.t.functions[function].invocations += 1;
        if let Some(i) = self
            .boxes
            .iter()
            .position(|b| b.function == function && !b.busy)
        {
            if self.boxes[i].prewarmed {
                self.boxes[i].prewarmed = false;
                self.t.functions[function].prewarm_hits += 1;
            }
            match self.boxes[i].fresh {
                true => self.hand_out(i, invocation)?,
                false => _ = self.bind(i, invocation)?,
            }
            return Ok(Some(i));
        }
        if !self.admitted(function)? {
            self.t.refused += 1;
            return Ok(None);
        }
        if let Some(k) = self
            .prewarms
            .iter()
            .enumerate()
            .filter(|(_, p)| p.function == function)
            .min_by_key(|(_, p)| p.at_ms)
            .map(|(k, _)| k)
        {
            self.prewarms.swap_remove(k);
        }
        let Some(i) = self.load(function, true, 0) else {
            self.t.dropped_no_cgroup += 1;
            return Ok(None);
        };
        self.t.cold += 1;
        let f = &mut self.t.functions[function];
        f.cold_starts += 1;
        f.cold_at.push(nth);
        self.hand_out(i, invocation)?;
        Ok(Some(i))
    }
}

/// An invocation ended: its sandbox goes warm for its keep-alive, or is unloaded until its
/// pre-warm point when the advice has one, or, when the OOM killer took its process, is
/// recycled (its next start gets a fresh limit).
fn finish(p: &mut Platform, slot: usize, killed: bool) -> Result<()> {
    p.release(slot)?;
    let Some(i) = p.boxes.iter().position(|b| b.slot == slot) else {
        return Ok(());
    };
    if killed {
        p.t.oom += 1;
        p.recycle(i);
        return Ok(());
    }
    let function = p.boxes[i].function;
    let advice = p.advice(function);
    let now = p.now();
    if advice.prewarm_ms > 0 {
        let b = p.recycle(i);
        p.t.functions[function].unloads += 1;
        p.prewarms.push(Prewarm {
            function,
            at_ms: now + advice.prewarm_ms,
            keepalive_ms: advice.keepalive_ms,
            max_bytes: b.max_bytes,
        });
        return Ok(());
    }
    let b = &mut p.boxes[i];
    b.busy = false;
    b.idle_since = now;
    b.keepalive_ms = advice.keepalive_ms;
    Ok(())
}

/// The agent's configuration for a mode. EMARS: predictive limits, keep-alive advice,
/// admission, and the burst guard behind them (named, whatever the defaults). Keep-alive bins
/// of one trace minute (in the real ms the agent sees), over the replayed minutes; OpenLambda's
/// 10 minutes when the histogram is not representative.
fn agent_config(o: &Opts, mode: Mode) -> String {
    let (policy, reactive) = match mode {
        Mode::OpenLambda => ("observe", false),
        Mode::Emars => ("enforce", true),
    };
    format!(
        "\n[policy]\nmode = \"{policy}\"\nexport_dir = \"{{dir}}/export\"\n\
         [policy.keepalive]\nbin_ms = {}\nbins = {}\nmin_idle_times = 5\n\
         fixed_keepalive_ms = {}\n\
         [reactive]\nenabled = {reactive}\n",
        o.minute_ms,
        o.minutes.max(10),
        (FIXED_KEEPALIVE_MIN * o.minute_ms as f64) as u64
    )
}

fn run_mode(o: &Opts, mode: Mode, fs: &[Function], invs: &[Invocation]) -> Result<Tally> {
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(&root, &agent_config(o, mode))?;
    for slot in 0..o.pool {
        fs::create_dir(root.dir.join(format!("cg-{slot}")))?;
    }
    let mut p = Platform {
        o,
        mode,
        root: &root,
        agent: &agent,
        fs,
        free: (0..o.pool).collect(),
        boxes: Vec::new(),
        prewarms: Vec::new(),
        t: Tally {
            functions: fs
                .iter()
                .map(|f| FunctionTally {
                    name: name(f),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        start: Instant::now(),
    };
    let (done_tx, done_rx) = mpsc::channel::<(usize, bool)>();
    let mut running = 0usize;
    for (n, inv) in invs.iter().enumerate() {
        // Completions and expiries up to this arrival: every invocation that has ended frees
        // its sandbox before the arrival looks for one (when the platform runs behind, several
        // have).
        loop {
            while let Ok((slot, killed)) = done_rx.try_recv() {
                running -= 1;
                finish(&mut p, slot, killed)?;
            }
            p.expire(inv.at_ms.min(p.now()))?;
            let wait = inv.at_ms.saturating_sub(p.now());
            if wait == 0 {
                break;
            }
            match done_rx.recv_timeout(Duration::from_millis(wait.min(20))) {
                Ok((slot, killed)) => {
                    running -= 1;
                    finish(&mut p, slot, killed)?;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => bail!("workers: {e}"),
            }
        }
        p.t.invocations += 1;
        let Some(i) = p.sandbox(inv.function, n)? else {
            continue;
        };
        p.boxes[i].busy = true;
        let slot = p.boxes[i].slot;
        let mut cmd = Command::new(alloc_bin());
        cmd.args([
            "--mib",
            &inv.mib.to_string(),
            "--hold-ms",
            &inv.hold_ms.to_string(),
        ]);
        let mut child = spawn_in(&p.slot_dir(slot), cmd)?;
        let tx = done_tx.clone();
        running += 1;
        thread::spawn(move || {
            let killed = child
                .wait()
                .map(|s| s.signal() == Some(libc::SIGKILL))
                .unwrap_or(false);
            let _ = tx.send((slot, killed));
        });
    }
    while running > 0 {
        let (slot, killed) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .context("an invocation did not finish")?;
        running -= 1;
        finish(&mut p, slot, killed)?;
    }
    // Whatever is still warm ends with the replay; pre-warms still owed are not made.
    p.prewarms.clear();
    while !p.boxes.is_empty() {
        p.recycle(0);
    }
    let mut t = p.t;
    let uses = t.uses as usize;
    agent_uses(&agent, fs, uses)?;
    t.mib_ms *= 60_000.0 / o.minute_ms as f64; // back to trace time
    agent.stop()?;
    Ok(t)
}

/// The agent recorded every use as an ended instance.
fn agent_uses(agent: &Agent, fs: &[Function], uses: usize) -> Result<()> {
    let mut seen = 0;
    for f in fs {
        // Every page of the function's instances.
        seen += agent
            .instances(&name(f))?
            .iter()
            .filter(|i| i["ended_at_ms"].is_u64())
            .count();
    }
    if seen != uses {
        bail!("the agent recorded {seen} uses, the platform made {uses}");
    }
    Ok(())
}

fn run(o: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (real cgroups, eBPF)");
    }
    let fs = match o.synthetic_gap {
        Some(_) => synthetic(),
        None => pick(o)?,
    };
    let invs = arrivals(o, &fs);
    println!(
        "emars-platform: {} functions, {} invocations over {} trace minutes ({} ms each), pool of {} cgroups, memory x {}",
        fs.len(),
        invs.len(),
        o.minutes,
        o.minute_ms,
        o.pool,
        o.mem_scale
    );
    if o.http {
        return run_http(o, &fs, &invs);
    }
    let modes = [("openlambda", Mode::OpenLambda), ("emars", Mode::Emars)];
    let mut rows = Vec::new();
    for (label, m) in modes {
        eprintln!("running {label} ...");
        rows.push((label, run_mode(o, m, &fs, &invs)?));
    }
    report::print(&rows, fs.len());
    if let Some(path) = &o.json {
        report::write_json(path, &rows)?;
    }
    if let Some(dir) = &o.plots {
        report::write_plots(dir, &rows)?;
    }
    Ok(())
}

// ---- `--http`: invocations as real HTTP requests into warm sandboxes ----

/// A sandbox of the HTTP mode: an instance cgroup of its function (`<root>/<function>/sb-N`, as
/// runc makes it), its function server, and the keep-alive connection the platform holds to it
/// (None while an invocation has it).
struct HttpBox {
    id: u64,
    function: usize,
    sandbox: http::Sandbox,
    server: Child,
    conn: Option<Conn>,
    /// Real ms (from the start) when it went idle.
    idle_since: u64,
}

/// The platform's keep-alive connection to a sandbox's server.
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

/// How long an answer may take beyond the invocation's own hold.
const ANSWER_SLACK: Duration = Duration::from_secs(60);

impl Conn {
    fn open(port: u16) -> Result<Conn> {
        let writer =
            TcpStream::connect(("127.0.0.1", port)).context("connecting to the sandbox")?;
        writer.set_nodelay(true)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Conn { writer, reader })
    }

    /// Sends one invocation's request (its head in one write, as HTTP clients send it: one
    /// segment whose first bytes are the request line) and reads its answer whole. `sent` is
    /// set once the request is written: the server has it, whatever comes back.
    fn invoke(&mut self, inv: &Invocation, sent: &mut bool) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(inv.hold_ms) + ANSWER_SLACK))?;
        let request = format!(
            "POST /invoke?mib={}&ms={} HTTP/1.1\r\nHost: sandbox\r\nContent-Length: 0\r\n\r\n",
            inv.mib, inv.hold_ms
        );
        self.writer.write_all(request.as_bytes())?;
        *sent = true;
        http::read_answer(&mut self.reader)
    }
}

/// What one function's invocations were, as the platform made them.
#[derive(Default)]
struct HttpFunction {
    /// Requests written to its sandboxes.
    sent: u64,
    /// Of which the answer did not come ...
    failed: u64,
    /// ... because the server was killed (the OOM killer, at its memory.max).
    oom_killed: u64,
    /// Invocations dropped: every sandbox slot busy.
    dropped: u64,
    /// Sandboxes started (cold starts), each with one connection.
    sandboxes: u64,
    /// Requests sent per trace hour (the arrival's hour in the trace).
    per_trace_hour: BTreeMap<u64, u64>,
    /// Requests sent per wall-clock hour (unix ms of the hour's start, the agent's buckets).
    per_wall_hour: BTreeMap<u64, u64>,
}

/// A finished invocation: its sandbox, the connection back (None when it broke), whether its
/// request was sent and when (unix ms).
struct HttpDone {
    box_id: u64,
    conn: Option<Conn>,
    sent_at_unix_ms: Option<u64>,
    error: Option<String>,
}

struct HttpPlatform<'a> {
    o: &'a Opts,
    root: &'a TestRoot,
    fs: &'a [Function],
    boxes: Vec<HttpBox>,
    next_id: u64,
    tally: Vec<HttpFunction>,
    keepalive_ms: u64,
    start: Instant,
}

impl HttpPlatform<'_> {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A cold start: the function's instance cgroup (memory.max at the fixed limit, as
    /// OpenLambda writes it), its server started inside and listening, one connection to it.
    fn cold_start(&mut self, function: usize) -> Result<usize> {
        let id = self.next_id;
        self.next_id += 1;
        let name = name(&self.fs[function]);
        let sandbox = http::Sandbox::new(self.root, &name, &format!("sb-{id}"))?;
        self.root
            .hierarchy
            .set_limit(&sandbox.memory, self.o.fixed_mib * MIB)?;
        let mut cmd = Command::new(http_server_bin());
        cmd.stdout(Stdio::piped());
        let mut server = sandbox.spawn(cmd)?;
        let port = match http::read_port(&mut server) {
            Ok(p) => p,
            Err(e) => {
                let _ = server.kill();
                let _ = server.wait();
                sandbox.remove();
                return Err(e.context(format!("starting the server of {name}/sb-{id}")));
            }
        };
        let conn = Conn::open(port)?;
        self.tally[function].sandboxes += 1;
        self.boxes.push(HttpBox {
            id,
            function,
            sandbox,
            server,
            conn: Some(conn),
            idle_since: self.now(),
        });
        Ok(self.boxes.len() - 1)
    }

    /// Recycles sandbox `i`: the connection closed, the server killed, the cgroups removed
    /// (the agent reads the instance's last counts at rmdir).
    fn recycle(&mut self, i: usize) {
        let mut b = self.boxes.swap_remove(i);
        drop(b.conn.take());
        let _ = b.server.kill();
        let _ = b.server.wait();
        b.sandbox.remove();
    }

    /// Idle sandboxes whose keep-alive ended by `now` are recycled.
    fn expire(&mut self, now: u64) {
        while let Some(i) = self
            .boxes
            .iter()
            .position(|b| b.conn.is_some() && now >= b.idle_since + self.keepalive_ms)
        {
            self.recycle(i);
        }
    }

    /// A warm sandbox of `function` (its connection taken for the invocation), else a cold
    /// start, evicting the longest-idle warm sandbox when `--pool` sandboxes are up. None: all
    /// are busy.
    fn sandbox(&mut self, function: usize) -> Result<Option<(u64, Conn)>> {
        let warm = self
            .boxes
            .iter()
            .position(|b| b.function == function && b.conn.is_some());
        let i = match warm {
            Some(i) => i,
            None => {
                if self.boxes.len() >= self.o.pool {
                    let oldest = self
                        .boxes
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| b.conn.is_some())
                        .min_by_key(|(_, b)| b.idle_since)
                        .map(|(i, _)| i);
                    match oldest {
                        Some(i) => self.recycle(i),
                        None => return Ok(None),
                    }
                }
                self.cold_start(function)?
            }
        };
        let b = &mut self.boxes[i];
        Ok(b.conn.take().map(|c| (b.id, c)))
    }

    /// An invocation ended: its sandbox is warm again from now, or recycled when its
    /// connection broke.
    fn finish(&mut self, done: HttpDone, trace_hour: u64) {
        let Some(i) = self.boxes.iter().position(|b| b.id == done.box_id) else {
            return;
        };
        let f = &mut self.tally[self.boxes[i].function];
        if let Some(at) = done.sent_at_unix_ms {
            f.sent += 1;
            *f.per_trace_hour.entry(trace_hour).or_default() += 1;
            *f.per_wall_hour.entry(at - at % HOUR_MS).or_default() += 1;
        }
        if let Some(e) = &done.error {
            f.failed += 1;
            // A server that died closed the connection as it went: its status is there, or
            // nearly.
            let b = &mut self.boxes[i];
            let exited = wait_for(Duration::from_secs(1), || {
                b.server.try_wait().ok().flatten()
            });
            if exited.is_some_and(|s| s.signal() == Some(libc::SIGKILL)) {
                f.oom_killed += 1;
            }
            let how = exited.map_or("still running".to_owned(), |s| s.to_string());
            eprintln!(
                "{}/sb-{}: {e} (server: {how})",
                name(&self.fs[b.function]),
                b.id
            );
        }
        match done.conn {
            Some(c) if done.error.is_none() => {
                let now = self.now();
                let b = &mut self.boxes[i];
                b.conn = Some(c);
                b.idle_since = now;
            }
            _ => self.recycle(i),
        }
    }
}

const HOUR_MS: u64 = 3_600_000;

/// The port the server says once it listens.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One function's requests as the platform sent them and as the agent counted them.
struct Compared {
    name: String,
    sent: u64,
    counted: u64,
    connections: u64,
    sandboxes: u64,
    source: String,
    /// Platform reports the agent holds for it (none are made: must be 0).
    reported: u64,
    agent_hours: Vec<(u64, u64)>,
}

impl Compared {
    /// Exact: every request sent counted, as kernel requests, one connection per sandbox, no
    /// platform report. A function none of whose invocations ran is matched by no record.
    fn matched(&self) -> bool {
        let source_ok = self.source == "kernel_requests" || (self.sent == 0 && self.counted == 0);
        self.counted == self.sent
            && self.connections == self.sandboxes
            && self.reported == 0
            && source_ok
    }
}

/// The agent's counts for `function` once every sandbox of it has ended.
fn compare(agent: &Agent, function: &str, t: &HttpFunction) -> Result<Compared> {
    if t.sandboxes > 0 {
        agent.wait_ended(function, t.sandboxes as usize)?;
    }
    let (status, f) = agent.get(&format!("/v1/functions/{function}"))?;
    let (hours, source) = match status {
        200 => (
            f["hours"].as_array().cloned().unwrap_or_default(),
            f["requests_source"].as_str().unwrap_or("").to_owned(),
        ),
        404 => (Vec::new(), "none".to_owned()),
        s => bail!("GET /v1/functions/{function}: {s} {f}"),
    };
    let field = |h: &Value, k: &str| h[k].as_u64().unwrap_or(0);
    let sum = |k: &str| hours.iter().map(|h| field(h, k)).sum::<u64>();
    Ok(Compared {
        name: function.to_owned(),
        sent: t.sent,
        counted: sum("requests"),
        connections: sum("connections"),
        sandboxes: t.sandboxes,
        source,
        reported: sum("invocations"),
        agent_hours: hours
            .iter()
            .map(|h| (field(h, "hour_start_ms"), field(h, "requests")))
            .collect(),
    })
}

/// `--http`: each sandbox an instance cgroup of its function with a function server inside,
/// each invocation one HTTP request over the platform's keep-alive connection to a warm
/// sandbox; no bind, no release, no platform report. The agent only watches. At the end, the
/// requests sent per function against those the agent counted in the kernel; an error on any
/// mismatch.
fn run_http(o: &Opts, fs: &[Function], invs: &[Invocation]) -> Result<()> {
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(&root, "\n[policy]\nmode = \"observe\"\n")?;
    let info = agent.get_ok("/v1/info")?;
    if !program_attached(&info, "net_ingress") {
        bail!(
            "the agent counts no requests (net_ingress not attached): {}",
            info["fallbacks"]
        );
    }
    let keepalive_ms = (FIXED_KEEPALIVE_MIN * o.minute_ms as f64) as u64;
    let mut p = HttpPlatform {
        o,
        root: &root,
        fs,
        boxes: Vec::new(),
        next_id: 0,
        tally: fs.iter().map(|_| HttpFunction::default()).collect(),
        keepalive_ms,
        start: Instant::now(),
    };
    let trace_hour = |inv: &Invocation| inv.at_ms / (60 * o.minute_ms);
    let (done_tx, done_rx) = mpsc::channel::<(HttpDone, u64)>();
    let mut running = 0usize;
    for inv in invs {
        loop {
            while let Ok((done, hour)) = done_rx.try_recv() {
                running -= 1;
                p.finish(done, hour);
            }
            p.expire(inv.at_ms.min(p.now()));
            let wait = inv.at_ms.saturating_sub(p.now());
            if wait == 0 {
                break;
            }
            match done_rx.recv_timeout(Duration::from_millis(wait.min(20))) {
                Ok((done, hour)) => {
                    running -= 1;
                    p.finish(done, hour);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => bail!("workers: {e}"),
            }
        }
        let Some((box_id, mut conn)) = p.sandbox(inv.function)? else {
            p.tally[inv.function].dropped += 1;
            continue;
        };
        let (tx, inv, hour) = (done_tx.clone(), inv.clone(), trace_hour(inv));
        running += 1;
        thread::spawn(move || {
            let mut sent = false;
            let result = conn.invoke(&inv, &mut sent);
            let sent_at_unix_ms = sent.then(unix_ms);
            let error = result.err().map(|e| format!("{e:#}"));
            let conn = error.is_none().then_some(conn);
            let _ = tx.send((
                HttpDone {
                    box_id,
                    conn,
                    sent_at_unix_ms,
                    error,
                },
                hour,
            ));
        });
    }
    while running > 0 {
        let (done, hour) = done_rx
            .recv_timeout(Duration::from_secs(120))
            .context("an invocation did not finish")?;
        running -= 1;
        p.finish(done, hour);
    }
    while !p.boxes.is_empty() {
        p.recycle(0);
    }
    let tally = std::mem::take(&mut p.tally);
    let mut rows = Vec::new();
    for (f, t) in fs.iter().zip(&tally) {
        rows.push(compare(&agent, &name(f), t)?);
    }
    let matched = rows.iter().filter(|r| r.matched()).count();
    let sent: u64 = rows.iter().map(|r| r.sent).sum();
    let counted: u64 = rows.iter().map(|r| r.counted).sum();
    print_http(o, &rows, &tally, matched, sent, counted);
    if let Some(path) = &o.json {
        write_http_json(path, &rows, &tally, matched, sent, counted)?;
    }
    agent.stop()?;
    if matched != rows.len() {
        bail!(
            "{} of {} functions' requests not counted exactly by the agent",
            rows.len() - matched,
            rows.len()
        );
    }
    Ok(())
}

fn print_http(
    o: &Opts,
    rows: &[Compared],
    tally: &[HttpFunction],
    matched: usize,
    sent: u64,
    counted: u64,
) {
    println!(
        "{:<12} {:>6} {:>8} {:>6} {:>4} {:>10} {:>11} {:>6} {:>7}  source",
        "function",
        "sent",
        "counted",
        "failed",
        "oom",
        "sandboxes",
        "connections",
        "drops",
        "match"
    );
    for (r, t) in rows.iter().zip(tally) {
        println!(
            "{:<12} {:>6} {:>8} {:>6} {:>4} {:>10} {:>11} {:>6} {:>7}  {}",
            r.name,
            r.sent,
            r.counted,
            t.failed,
            t.oom_killed,
            r.sandboxes,
            r.connections,
            t.dropped,
            if r.matched() { "yes" } else { "NO" },
            r.source
        );
    }
    println!(
        "http: {matched}/{} functions counted exactly; requests sent {sent}, counted by the agent {counted}; failed {}, dropped {}",
        rows.len(),
        tally.iter().map(|t| t.failed).sum::<u64>(),
        tally.iter().map(|t| t.dropped).sum::<u64>(),
    );
    // Per hour: trace hours are compressed into real seconds, so they do not line up with the
    // agent's wall-clock hour buckets; and the agent files counts under the hour it reads them
    // in (exec, exit, reconcile, rmdir), not the packet's. The per-function totals are the
    // exact check; the hours are shown for reading.
    let trace_hours: BTreeMap<u64, u64> = tally.iter().flat_map(|t| t.per_trace_hour.iter()).fold(
        BTreeMap::new(),
        |mut m, (h, n)| {
            *m.entry(*h).or_default() += n;
            m
        },
    );
    let mut wall: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for t in tally {
        for (h, n) in &t.per_wall_hour {
            wall.entry(*h).or_default().0 += n;
        }
    }
    for r in rows {
        for (h, n) in &r.agent_hours {
            wall.entry(*h).or_default().1 += n;
        }
    }
    if trace_hours.len() > 1 || wall.len() > 1 || o.minutes > 60 {
        println!("per trace hour (sent): {trace_hours:?}");
        for (h, (s, c)) in &wall {
            println!("agent hour starting {h} (unix ms): sent {s}, counted {c}");
        }
        println!(
            "(trace hours are compressed to {} ms each and do not line up with the agent's \
             wall-clock hours, which take counts when the agent reads them: the per-function \
             totals are the exact check)",
            60 * o.minute_ms
        );
    }
}

fn write_http_json(
    path: &std::path::Path,
    rows: &[Compared],
    tally: &[HttpFunction],
    matched: usize,
    sent: u64,
    counted: u64,
) -> Result<()> {
    let hours = |m: &BTreeMap<u64, u64>| -> Value {
        m.iter()
            .map(|(h, n)| json!({"hour": h, "sent": n}))
            .collect()
    };
    let functions: Vec<Value> = rows
        .iter()
        .zip(tally)
        .map(|(r, t)| {
            json!({
                "function": r.name,
                "sent": r.sent,
                "counted": r.counted,
                "failed": t.failed,
                "oom_killed": t.oom_killed,
                "dropped": t.dropped,
                "sandboxes": r.sandboxes,
                "connections": r.connections,
                "platform_reports": r.reported,
                "requests_source": r.source,
                "matched": r.matched(),
                "sent_per_trace_hour": hours(&t.per_trace_hour),
                "sent_per_wall_hour": hours(&t.per_wall_hour),
                "counted_per_wall_hour": r.agent_hours.iter()
                    .map(|(h, n)| json!({"hour": h, "counted": n}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    let v = json!({
        "mode": "http",
        "functions_total": rows.len(),
        "functions_matched": matched,
        "sent": sent,
        "counted": counted,
        "functions": functions,
    });
    fs::write(path, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}
