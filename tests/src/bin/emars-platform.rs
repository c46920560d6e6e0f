//! emars-platform: a small serverless platform that runs the way stock OpenLambda does — a
//! pool of pre-created cgroups (`cg-N`) handed to sandboxes of any function, warm sandboxes
//! reused, idle ones recycled after a keep-alive, memory.max written when a cgroup is handed
//! out — with real processes allocating real memory in real cgroups, driven by the Azure
//! Functions 2019 sample's invocation timeline (time compressed). Two modes on the same
//! arrivals and the same drawn peaks, side by side in one run:
//!
//! - `openlambda`: a fixed memory.max for every sandbox and a fixed 10-minute keep-alive; the
//!   agent only watches (observe mode).
//! - `emars`: before a cold start the platform asks `POST /v1/admission` (a refusal drops the
//!   invocation); the agent writes the function's limits at bind (enforce mode; while a
//!   function has no history, the fixed limit, written through the agent so that its burst
//!   guard watches it); the burst guard is on; the keep-alive is the agent's advice (`GET
//!   /v1/functions/{name}/keepalive`, pre-warm plus keep-alive from the end of an
//!   invocation; OpenLambda's 10 minutes while the advice has too little to go on).
//!
//! In both modes the platform binds the sandbox's cgroup at each invocation and releases it
//! at its end (`/v1/bind`, `/v1/release`): every invocation is a record with its exact peak,
//! and the gaps between a function's invocations are what its keep-alive advice is made of.
//! A sandbox whose process the OOM killer took is recycled, not kept warm.
//!
//! Prints per mode: invocations, cold starts, OOM kills, refusals, memory-time reserved
//! (memory.max x time a sandbox holds a cgroup, in trace time) — and the paper's figure 4/5
//! view: how many sandboxes each memory.max was written for.
//!
//! ```text
//! cargo build --release -p emars-agent -p emars-tests --bins
//! sudo EMARS_BIN=target/release/emars target/release/emars-platform [--functions K]
//!     [--minutes M] [--minute-ms T] [--mem-scale S] [--fixed-mib F] [--pool P] [--data DIR]
//! ```
//! Data: `--data`, else `$EMARS_DATA_DIR`, else `<workspace>/../shared/data/azure2019`
//! (`invocation_traces_public.csv`, `memory_traces_public.csv`, `duration_traces_public.csv`).

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use emars_tests::azure::{self, inverse_cdf, Function, SplitMix64};
use emars_tests::{alloc_bin, spawn_in, Agent, TestRoot, MIB};
use serde_json::{json, Value};

const USAGE: &str = "usage: emars-platform [--functions K] [--minutes M] [--minute-ms T]
    [--mem-scale S] [--fixed-mib F] [--pool P] [--data DIR] [--plots DIR]
  --functions K   functions of the sample, spread from the busiest to the rarest (default 24)
  --minutes M     trace minutes replayed (default 30)
  --minute-ms T   real milliseconds per trace minute (default 2000)
  --mem-scale S   trace MiB x S = MiB a process allocates (default 0.25)
  --fixed-mib F   OpenLambda's fixed memory.max, MiB (default 128)
  --pool P        pre-created cgroups (default 16, OpenLambda's reserve of ready ones)
  --plots DIR     also write the table as SVG bar charts into DIR
  --sized ...     the input-aware run instead (emars_tests::sized; --sized --help)
Runs as root. The agent binary is $EMARS_BIN (else target/<profile>/emars).";

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
                    hold_ms: ((f.duration_ms * o.minute_ms as f64 / 60_000.0) as u64).max(5),
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
    /// Real ms (from the start) when it went idle.
    idle_since: u64,
    /// How long it stays warm once idle, real ms.
    keepalive_ms: u64,
    /// Real ms since which it has held its cgroup at `max_bytes`.
    since: u64,
    max_bytes: u64,
}

#[derive(Default)]
struct Tally {
    invocations: u64,
    cold: u64,
    oom: u64,
    refused: u64,
    dropped_no_cgroup: u64,
    /// MiB x real ms.
    mib_ms: f64,
    /// memory.max (MiB) → sandboxes started with it.
    limits: BTreeMap<u64, u64>,
    /// Binds released (one per invocation that ran).
    uses: u64,
    /// Functions whose last keep-alive advice came from their idle-time histogram.
    advised: std::collections::BTreeSet<usize>,
}

struct Platform<'a> {
    o: &'a Opts,
    mode: Mode,
    root: &'a TestRoot,
    agent: &'a Agent,
    fs: &'a [Function],
    free: VecDeque<usize>,
    boxes: Vec<Sandbox>,
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

    /// Recycles an idle sandbox: its cgroup goes back to the pool.
    fn recycle(&mut self, i: usize) {
        let b = self.boxes.swap_remove(i);
        let now = self.now();
        Self::count_held(&mut self.t, &b, now);
        self.free.push_back(b.slot);
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
        let now = self.now();
        let b = &mut self.boxes[i];
        if max != b.max_bytes {
            Self::count_held(&mut self.t, b, now);
            b.max_bytes = max;
            b.since = now;
        }
        Ok(max)
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

    fn expire(&mut self) {
        let now = self.now();
        while let Some(i) = self
            .boxes
            .iter()
            .position(|b| !b.busy && now >= b.idle_since + b.keepalive_ms)
        {
            self.recycle(i);
        }
    }

    fn keepalive_ms(&mut self, function: usize) -> u64 {
        let fixed = (FIXED_KEEPALIVE_MIN * self.o.minute_ms as f64) as u64;
        if self.mode == Mode::OpenLambda {
            return fixed;
        }
        let path = format!("/v1/functions/{}/keepalive", name(&self.fs[function]));
        match self.agent.get(&path) {
            // The agent sees real time: its advice is in real ms already.
            Ok((200, k)) => {
                if k["basis"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("histogram"))
                {
                    self.t.advised.insert(function);
                } else {
                    self.t.advised.remove(&function);
                }
                k["prewarm_ms"].as_u64().unwrap_or(0) + k["keepalive_ms"].as_u64().unwrap_or(0)
            }
            _ => fixed,
        }
    }

    /// A sandbox for an invocation, bound to its function for it: a warm one of its function,
    /// else a cold start on a pool cgroup (evicting the longest-idle warm sandbox when the pool
    /// is empty). None: refused or no cgroup.
    fn sandbox(&mut self, function: usize, invocation: usize) -> Result<Option<usize>> {
        if let Some(i) = self
            .boxes
            .iter()
            .position(|b| b.function == function && !b.busy)
        {
            self.bind(i, invocation)?;
            return Ok(Some(i));
        }
        let name = name(&self.fs[function]);
        if self.mode == Mode::Emars {
            let (s, a) = self.post("/v1/admission", json!({ "function": name }))?;
            if s != 200 {
                bail!("admission: {s} {a}");
            }
            if a["admit"] == false {
                self.t.refused += 1;
                return Ok(None);
            }
        }
        if self.free.is_empty() {
            let oldest = self
                .boxes
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.busy)
                .min_by_key(|(_, b)| b.idle_since)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => self.recycle(i),
                None => {
                    self.t.dropped_no_cgroup += 1;
                    return Ok(None);
                }
            }
        }
        let Some(slot) = self.free.pop_front() else {
            return Ok(None);
        };
        let dir = self.slot_dir(slot);
        self.t.cold += 1;
        // OpenLambda writes its fixed limit at hand-out. In emars mode the agent writes the
        // function's limits at bind; while the function has none, the fixed one stands in,
        // written through the agent (so that its burst guard watches it too).
        let agent_writes = self.mode == Mode::Emars
            && self
                .agent
                .get(&format!("/v1/functions/{name}/limits"))
                .map(|(s, _)| s == 200)
                .unwrap_or(false);
        let now = self.now();
        self.boxes.push(Sandbox {
            slot,
            function,
            busy: false,
            idle_since: now,
            keepalive_ms: 0,
            since: now,
            max_bytes: 0,
        });
        let i = self.boxes.len() - 1;
        if self.mode == Mode::OpenLambda {
            self.root
                .hierarchy
                .set_limit(&dir, self.o.fixed_mib * MIB)?;
        }
        let max = self.bind(i, invocation)?;
        let max = if self.mode == Mode::Emars && !agent_writes {
            let (s, a) = self.post(
                &format!("/v1/functions/{name}/instances/{name}-{invocation}/limits"),
                json!({ "max_bytes": self.o.fixed_mib * MIB }),
            )?;
            if s != 200 {
                bail!("set-limit: {s} {a}");
            }
            self.o.fixed_mib * MIB
        } else {
            max
        };
        self.boxes[i].max_bytes = max;
        *self.t.limits.entry(max / MIB).or_default() += 1;
        Ok(Some(i))
    }
}

/// An invocation ended: its sandbox goes warm for its keep-alive, or, when the OOM killer
/// took its process, is recycled (its next start gets a fresh limit).
fn finish(p: &mut Platform, slot: usize, killed: bool) -> Result<()> {
    p.release(slot)?;
    if killed {
        p.t.oom += 1;
        if let Some(i) = p.boxes.iter().position(|b| b.slot == slot) {
            p.recycle(i);
        }
        return Ok(());
    }
    let now = p.now();
    let function = p.boxes.iter().find(|b| b.slot == slot).map(|b| b.function);
    let ka = function.map(|f| p.keepalive_ms(f));
    if let Some(b) = p.boxes.iter_mut().find(|b| b.slot == slot) {
        b.busy = false;
        b.idle_since = now;
        b.keepalive_ms = ka.unwrap_or(0);
    }
    Ok(())
}

fn run_mode(o: &Opts, mode: Mode, fs: &[Function], invs: &[Invocation]) -> Result<Tally> {
    let root = TestRoot::new()?;
    // EMARS: predictive limits, keep-alive advice, admission, and the burst guard behind them.
    let (policy, reactive) = match mode {
        Mode::OpenLambda => ("observe", false),
        Mode::Emars => ("enforce", true),
    };
    // Keep-alive bins of one trace minute (in the real ms the agent sees), over the replayed
    // minutes; OpenLambda's 10 minutes when the histogram is not representative.
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"{policy}\"\nexport_dir = \"{{dir}}/export\"\n\
             [policy.keepalive]\nbin_ms = {}\nbins = {}\nmin_idle_times = 5\n\
             fixed_keepalive_ms = {}\n\
             [reactive]\nenabled = {reactive}\n",
            o.minute_ms,
            o.minutes.max(10),
            (FIXED_KEEPALIVE_MIN * o.minute_ms as f64) as u64
        ),
    )?;
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
        t: Tally::default(),
        start: Instant::now(),
    };
    let (done_tx, done_rx) = mpsc::channel::<(usize, bool)>();
    let mut running = 0usize;
    for (n, inv) in invs.iter().enumerate() {
        // Completions and expiries up to this arrival.
        loop {
            let wait = inv.at_ms.saturating_sub(p.now());
            match done_rx.recv_timeout(Duration::from_millis(wait.min(20))) {
                Ok((slot, killed)) => {
                    running -= 1;
                    finish(&mut p, slot, killed)?;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => bail!("workers: {e}"),
            }
            p.expire();
            if p.now() >= inv.at_ms {
                break;
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
    // Whatever is still warm ends with the replay.
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
    let fs = pick(o)?;
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
    let modes = [("openlambda", Mode::OpenLambda), ("emars", Mode::Emars)];
    let mut rows = Vec::new();
    for (label, m) in modes {
        eprintln!("running {label} ...");
        rows.push((label, run_mode(o, m, &fs, &invs)?));
    }
    println!(
        "\n  {:<11} {:>11} {:>11} {:>9} {:>9} {:>14} {:>11} {:>17}",
        "mode",
        "invocations",
        "cold starts",
        "OOM kills",
        "refused",
        "GiB·min held",
        "uses",
        "histogram advice"
    );
    for (label, t) in &rows {
        println!(
            "  {:<11} {:>11} {:>11} {:>9} {:>9} {:>14.2} {:>11} {:>17}",
            label,
            t.invocations,
            t.cold,
            t.oom,
            t.refused + t.dropped_no_cgroup,
            t.mib_ms / 1024.0 / 60_000.0,
            t.uses,
            format!("{} of {}", t.advised.len(), fs.len())
        );
    }
    println!("\n  sandboxes started per memory.max (the paper's figures 4/5):");
    for (label, t) in &rows {
        let l: Vec<String> = t
            .limits
            .iter()
            .map(|(mib, n)| format!("{mib} MiB: {n}"))
            .collect();
        println!("  {:<11} {}", label, l.join(", "));
    }
    if let Some(dir) = &o.plots {
        let bars = |f: fn(&Tally) -> f64| -> Vec<(String, f64)> {
            rows.iter().map(|(l, t)| (l.to_string(), f(t))).collect()
        };
        emars_tests::write_bar_charts(
            dir,
            &[
                (
                    "platform-memory",
                    emars_tests::bar_chart(
                        "memory held per mode",
                        "GiB·min",
                        bars(|t| t.mib_ms / 1024.0 / 60_000.0),
                    ),
                ),
                (
                    "platform-oom-kills",
                    emars_tests::bar_chart(
                        "OOM kills per mode",
                        "OOM kills",
                        bars(|t| t.oom as f64),
                    ),
                ),
                (
                    "platform-cold-starts",
                    emars_tests::bar_chart(
                        "cold starts per mode",
                        "cold starts",
                        bars(|t| t.cold as f64),
                    ),
                ),
                (
                    "platform-refused",
                    emars_tests::bar_chart(
                        "refused invocations per mode",
                        "refused",
                        bars(|t| (t.refused + t.dropped_no_cgroup) as f64),
                    ),
                ),
            ],
        )?;
    }
    Ok(())
}
