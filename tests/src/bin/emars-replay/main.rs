//! emars-replay: replays the Azure Functions 2019 sample (500 functions) through several
//! memory-limit recommenders in one harness and prints what each would have reserved and how
//! often it would have killed an instance. Pure simulation: no kernel, no root.
//!
//! ```text
//! cargo run --release -p emars-tests --bin emars-replay [-- [--cap N] [--seed S] [--hour]]
//! cargo run --release -p emars-tests --bin emars-replay -- --hosts 10 [--spread timing]
//! ```
//!
//! With `--hosts N` (N > 1) the defaults are also replayed on N hosts, each learning alone and
//! each informed by the fleet, in a table of their own after the one-host tables (`hosts.rs`).
//!
//! # Workload
//!
//! * Data: `$EMARS_DATA_DIR`, else `<workspace>/../shared/data/azure2019` (found from this
//!   crate's CARGO_MANIFEST_DIR): `invocation_traces_public.csv`, `memory_traces_public.csv`,
//!   `duration_traces_public.csv`, joined on `HashFunction`.
//! * Instances: every invocation is one instance (the serverless cold-start view: one cgroup per
//!   invocation). A function with more than `--cap` (default 200) invocations keeps `cap` of
//!   them, evenly spaced over its time-ordered invocations, so the arrival shape is kept and the
//!   run stays fast.
//! * Time: by default the trace's hour is stretched onto a simulated day (trace minute `m` becomes
//!   simulated minutes `24·m .. 24·(m+1)`, its invocations evenly spread inside), so the 24 h
//!   half-life of the decaying histograms actually decays something. `--hour` replays the hour in
//!   real time instead. Durations are not stretched.
//! * Peaks: each instance's peak is drawn from the piecewise-linear inverse CDF through the
//!   function's (app's) `AverageAllocatedMb_pct{1,5,25,50,75,95,99,100}` points (u < 1% gives
//!   pct1), with a seeded splitmix64, so runs are reproducible. The trace's "MB" are read as MiB
//!   (2^20 bytes), as the platforms' "128 MB" sizes are. The `Ideal` column is never read.
//! * Duration: the function's `Average` ms (at least 1 ms), the same for all its instances.
//!
//! # Replay
//!
//! Every function's instances are replayed in one time line, in start order, so that a
//! function's first instances can be sized from what the host has learned of the others (the
//! agent's prior). An instance's outcome becomes known when it ends (start + duration): a
//! policy gives each instance a limit from the outcomes known strictly before its start. A
//! limit below the instance's peak is an exceedance (the kernel would OOM-kill it); the policy
//! then learns an OOM-killed sample whose peak is censored at the limit (`peak = limit`,
//! `limit_bytes = limit`), as the agent would see it. Otherwise it learns the true peak.
//! Until a function has any known outcome, a policy without the prior uses the cold default
//! of 256 MiB (so does one with it while the host knows fewer than `min_functions`).
//!
//! Policies (the first row is the agent's default configuration in enforce mode):
//! * `defaults`: `recommend()` with `PolicyParams::default()` (P50 x 1.1, 16 MiB floor, OOM
//!   bump at once), recomputed at every instance; the burst guard (`ReactiveConfig::default()`:
//!   raises of a quarter of the limit up to 4x the recommendation, as the agent makes them);
//!   a function's first instances at the host's prior (`PriorConfig::default()`: P50 of the
//!   other functions' median peaks x 1.1, the guard's ceiling 4x the largest median).
//! * `static-256`: 256 MiB for everyone (OpenWhisk's standard action limit).
//! * `vpa`: VPA's target rule, P90 of peaks x 1.15 with VPA's 250 MiB floor, using EMARS's
//!   decaying histogram (half-life 24 h, weights relative to the recompute time) and VPA's OOM
//!   rule (an OOM-killed instance contributes `max(+100 MiB, x1.2)` of `max(limit, peak)`).
//!   Each instance is one container, so VPA's one-peak-per-container-per-day aggregation gives
//!   one sample per instance, as in EMARS. Only the target is used (no confidence bounds).
//!   Recomputed every simulated 10 minutes (at ticks of a 10-minute grid, from the outcomes
//!   known before the tick), as VPA's recommender runs periodically.
//! * `vpa-nofloor`: the same without the floor.
//! * `p95`: the defaults before the guard was on by default (P95 x 1.15, more margin while
//!   history is thin, no guard, the cold default); `p99`: P99 x 1.1 likewise; `p95@10min`:
//!   `p95` on VPA's 10-minute cadence, to separate the rule from the cadence; `p95+r/2`: `p95`
//!   with the guard's older step of half the limit.
//! * `p75+r`: the defaults at P75; `defaults-np`: the defaults without the prior;
//!   `defaults-nr`: the defaults' limits without the guard (nor the prior, which needs it);
//!   `defaults+r/2`: the defaults with the guard's older step.
//!
//! Metrics: reserved memory = sum over instances of limit x duration (GiB·h), its ratio to
//! VPA's, and the part of it in the learning phase (instances started while fewer than 20
//! outcomes of their function were known), also above their own peaks; the plain sum of
//! limits; the share of instances whose peak exceeds the limit; functions with any
//! exceedance; the median and P95 of (limit - peak) / peak over instances that fit; the kills
//! split by how many outcomes the policy knew (none, 1-19, 20+). A killed instance counts its
//! full limit x duration (no retry is modelled); a rescued one its raised limit for its whole
//! run. An `oracle` line (limit = the instance's own peak) shows the floor of what any policy
//! could reserve.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use emars_agent::model::Limits;
use emars_agent::policy::fleet::FleetPeaks;
use emars_agent::policy::prior::{Prior, PriorConfig};
use emars_agent::policy::reactive::ReactiveConfig;
use emars_agent::policy::recommend::{
    decay_weight, oom_bump, page_up, recommend_blended, recommend_from_prior, DecayingHistogram,
    PolicyParams, Recommendation, Sample,
};
use emars_tests::azure::{data_dir, inverse_cdf, load, Function, SplitMix64};
use emars_tests::flag_number as number;

mod hosts;

const MIB: u64 = 1 << 20;
const MIB_F: f64 = MIB as f64;
const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
/// Limit of every function before it has any history, for all adaptive policies.
const COLD_DEFAULT_BYTES: u64 = 256 * MIB;
const STATIC_BYTES: u64 = 256 * MIB;
const VPA_FLOOR_BYTES: u64 = 250 * MIB;
const VPA_PERCENTILE: f64 = 90.0;
const VPA_MARGIN: f64 = 0.15;
const VPA_HALF_LIFE: Duration = Duration::from_secs(24 * 3600);
const PERIODIC_MS: u64 = 10 * MINUTE_MS;
/// Simulated start of the replay (any fixed unix ms).
const START_MS: u64 = 1_600_000_000_000;
const DEFAULT_CAP: usize = 200;
const DEFAULT_SEED: u64 = 2019;
const TIME_LIMIT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: emars-replay [--cap N] [--seed S] [--hour] [--host-gib G] [--plots DIR]
                    [--hosts N [--spread round-robin|timing] [--fleet-refresh-s S] [--scrape-s S]]
  --cap N       instances per function at most (default 200; 0 = no cap)
  --seed S      seed of the peak draws (default 2019)
  --hour        replay the trace hour in real time (default: stretch it onto a simulated day)
  --host-gib G  memory of the host in the second table (default: 1.25 x the memory the
                instances really used at their busiest moment)
  --plots DIR   also write the tables as SVG bar charts into DIR
  --hosts N     also spread each function's instances over N hosts and replay the defaults
                there twice: each host learning alone, and informed by the fleet (default 1:
                one host, no fleet table)
  --spread R    round-robin (default: a function's i-th instance on host (function + i) mod N)
                or timing (a warm container of the function if one idled less than 10 minutes,
                the most recently idle; else the host running the fewest instances)
  --fleet-refresh-s S  the agents' fleet refresh period, in simulated seconds (default 60)
  --scrape-s S  Prometheus's scrape interval, in simulated seconds (default 15; 0: none): an
                outcome reaches the fleet at its host's first scrape after it ended
Data: $EMARS_DATA_DIR, else <workspace>/../shared/data/azure2019.";

fn main() {
    let code = match Opts::parse().and_then(|o| run(&o)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("emars-replay: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

struct Opts {
    cap: usize,
    seed: u64,
    real_hour: bool,
    /// The host's memory for the second table; 0: sized from the workload (see `run`).
    host_gib: f64,
    plots: Option<std::path::PathBuf>,
    /// Hosts the instances are spread over in the fleet table; 1: no fleet table.
    hosts: usize,
    spread: hosts::Spread,
    fleet: hosts::FleetTiming,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            cap: DEFAULT_CAP,
            seed: DEFAULT_SEED,
            real_hour: false,
            host_gib: 0.0,
            plots: None,
            hosts: 1,
            spread: hosts::Spread::RoundRobin,
            fleet: hosts::FleetTiming::default(),
        }
    }
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut o = Opts::default();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--cap" => o.cap = number(&a, args.next())?,
                "--seed" => o.seed = number(&a, args.next())?,
                "--hour" => o.real_hour = true,
                "--plots" => {
                    o.plots = Some(
                        args.next()
                            .ok_or_else(|| anyhow!("--plots needs a directory"))?
                            .into(),
                    )
                }
                "--host-gib" => o.host_gib = number(&a, args.next())?,
                "--hosts" => o.hosts = number(&a, args.next())?,
                "--spread" => {
                    o.spread = args
                        .next()
                        .ok_or_else(|| anyhow!("--spread needs round-robin or timing"))?
                        .parse()?
                }
                "--fleet-refresh-s" => {
                    o.fleet.refresh_ms = number::<u64>(&a, args.next())?.saturating_mul(1000)
                }
                "--scrape-s" => {
                    o.fleet.scrape_ms = number::<u64>(&a, args.next())?.saturating_mul(1000)
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if o.hosts == 0 {
            bail!("--hosts must be at least 1");
        }
        if o.fleet.refresh_ms == 0 {
            bail!("--fleet-refresh-s must be at least 1");
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Synthetic instances
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Instance {
    start_ms: u64,
    end_ms: u64,
    peak_bytes: u64,
}

/// The function's instances in time order: arrivals spread evenly inside each (possibly
/// stretched) minute, thinned evenly to `cap`, peaks drawn from the memory percentiles.
fn instances(f: &Function, index: usize, opts: &Opts) -> Vec<Instance> {
    let slot_ms = if opts.real_hour {
        MINUTE_MS
    } else {
        24 * MINUTE_MS
    };
    let mut starts = Vec::new();
    for (m, &k) in f.per_minute.iter().enumerate() {
        for j in 0..k as u64 {
            starts.push(START_MS + m as u64 * slot_ms + (2 * j + 1) * slot_ms / (2 * k as u64));
        }
    }
    if opts.cap > 0 && starts.len() > opts.cap {
        let n = starts.len();
        starts = (0..opts.cap).map(|i| starts[i * n / opts.cap]).collect();
    }
    let mut rng = SplitMix64(opts.seed ^ (index as u64).wrapping_mul(0xd134_2543_de82_ef95));
    let duration_ms = f.duration_ms.ceil() as u64;
    starts
        .into_iter()
        .map(|start_ms| Instance {
            start_ms,
            end_ms: start_ms + duration_ms,
            peak_bytes: (inverse_cdf(&f.memory_mib, rng.next_f64()) * MIB_F).round() as u64,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Rule {
    Static(u64),
    /// VPA's target: P90 x 1.15, optional floor, VPA's OOM rule, 24 h half-life.
    Vpa {
        floor_bytes: u64,
    },
    Emars(PolicyParams),
}

#[derive(Debug, Clone)]
struct Policy {
    name: &'static str,
    rule: Rule,
    /// None: at every instance; Some(ms): at the ticks of a grid of this period.
    period_ms: Option<u64>,
    /// The agent's burst guard: an instance outgrowing its limit gets raises (the agent's own
    /// `ReactiveConfig::burst_raise`, ceiling = its limit x `ceiling_factor`) until it fits
    /// or no raise is left; the host is taken to have the memory.
    reactive: Option<ReactiveConfig>,
    /// A function's first instances sized from the host's other functions, as the agent
    /// does (else the cold default).
    prior: Option<PriorConfig>,
}

impl Rule {
    /// The limit from `known` outcomes (and the fleet's peaks, which only the agent's rule
    /// reads) at `now_ms`.
    fn limit(
        &self,
        function: &str,
        known: &[Sample],
        fleet: Option<&FleetPeaks>,
        now_ms: u64,
    ) -> u64 {
        match self {
            Rule::Static(bytes) => *bytes,
            Rule::Emars(params) => recommend_blended(function, known, fleet, params, now_ms, 0)
                .map_or(COLD_DEFAULT_BYTES, |r| r.max_bytes),
            _ if known.is_empty() => COLD_DEFAULT_BYTES,
            Rule::Vpa { floor_bytes } => {
                let mut hist = DecayingHistogram::new();
                for s in known {
                    let value = if s.oom_killed {
                        oom_bump(s.limit_bytes.unwrap_or(0).max(s.peak_bytes))
                    } else {
                        s.peak_bytes
                    };
                    hist.add(value, decay_weight(s.at_ms, now_ms, VPA_HALF_LIFE));
                }
                let target = (hist.percentile(VPA_PERCENTILE) as f64 * (1.0 + VPA_MARGIN)).ceil();
                page_up(target as u64).max(*floor_bytes)
            }
        }
    }
}

fn policies() -> Vec<Policy> {
    let p95 = PolicyParams {
        percentile: 95.0,
        margin: 0.15,
        low_confidence_margin: 0.25,
        ..PolicyParams::default()
    };
    let emars = |name, params, period_ms, reactive, prior| Policy {
        name,
        rule: Rule::Emars(params),
        period_ms,
        reactive,
        prior,
    };
    let plain = |name, rule, period_ms| Policy {
        name,
        rule,
        period_ms,
        reactive: None,
        prior: None,
    };
    // The burst guard as it was before its step became a quarter of the limit.
    let guard_half = ReactiveConfig {
        step_fraction: 0.5,
        ..ReactiveConfig::default()
    };
    vec![
        // The agent's default configuration in enforce mode: the recommender's defaults, the
        // burst guard on, a function's first instances from the host's prior.
        emars(
            "defaults",
            PolicyParams::default(),
            None,
            Some(ReactiveConfig::default()),
            Some(PriorConfig::default()),
        ),
        plain("static-256", Rule::Static(STATIC_BYTES), None),
        plain(
            "vpa",
            Rule::Vpa {
                floor_bytes: VPA_FLOOR_BYTES,
            },
            Some(PERIODIC_MS),
        ),
        plain(
            "vpa-nofloor",
            Rule::Vpa { floor_bytes: 0 },
            Some(PERIODIC_MS),
        ),
        // The defaults before issue 22: P95 x 1.15, no guard, the cold default.
        emars("p95", p95.clone(), None, None, None),
        emars(
            "p99",
            PolicyParams {
                percentile: 99.0,
                margin: 0.1,
                ..p95.clone()
            },
            None,
            None,
            None,
        ),
        emars("p95@10min", p95.clone(), Some(PERIODIC_MS), None, None),
        emars("p95+r/2", p95, None, Some(guard_half.clone()), None),
        emars(
            "p75+r",
            PolicyParams {
                percentile: 75.0,
                ..PolicyParams::default()
            },
            None,
            Some(ReactiveConfig::default()),
            Some(PriorConfig::default()),
        ),
        // The defaults without the prior (the cold default for a function's first instances),
        // and with the guard's old step.
        emars(
            "defaults-np",
            PolicyParams::default(),
            None,
            Some(ReactiveConfig::default()),
            None,
        ),
        emars("defaults-nr", PolicyParams::default(), None, None, None),
        emars(
            "defaults+r/2",
            PolicyParams::default(),
            None,
            Some(guard_half),
            Some(PriorConfig::default()),
        ),
    ]
}

#[derive(Debug, Default, Clone)]
struct Tally {
    instances: u64,
    /// Sum of limit x duration, MiB·ms.
    reserved_mib_ms: f64,
    /// Sum of limits, MiB.
    limits_mib: f64,
    exceeded: u64,
    /// Exceedances by the number of outcomes the policy knew: none (cold default), 1..=19,
    /// 20 and more.
    exceeded_by_history: [u64; 3],
    functions_exceeded: u64,
    /// Instances whose peak exceeded their limit and that the burst guard's raises saved.
    rescued: u64,
    /// Sum of limit x duration of the instances started while fewer than 20 outcomes of
    /// their function were known (the learning phase), MiB·ms.
    learning_mib_ms: f64,
    /// The same instances' own peaks x duration.
    learning_peaks_mib_ms: f64,
    /// Exceedances by the number of outcomes the host itself knew (without the fleet's).
    exceeded_by_local: [u64; 3],
    /// `learning_mib_ms` of the instances started while their host itself knew fewer than 20.
    learning_local_mib_ms: f64,
    /// Instances whose limit was computed with fleet samples.
    fleet_informed: u64,
    /// Every instance as the host sees it, for the host pass.
    placed: Vec<Placed>,
    /// (limit - peak) / peak of the instances that fit.
    slack: Vec<f64>,
}

/// An instance on the host: its run, the limit it started with and the limit it held (raised
/// by the burst guard, or the same); `killed` when its peak passed what it held.
#[derive(Debug, Clone, Copy)]
struct Placed {
    start_ms: u64,
    end_ms: u64,
    limit: u64,
    held: u64,
    killed: bool,
}

/// What a host of `capacity` bytes made of a policy's instances, in time order: an instance
/// whose limit does not fit next to the limits held by those running is refused (the paper's
/// Refuse: not started); a rescue that needs more than is free fails (the instance is
/// OOM-killed at its first limit).
#[derive(Debug, Default, Clone, Copy)]
struct HostOutcome {
    refused: u64,
    rescues_failed: u64,
    killed: u64,
    peak_held: u64,
    /// Sum of held limit x run time of the instances that ran, MiB·ms.
    reserved_mib_ms: f64,
}

fn host_pass(placed: &mut [Placed], capacity: u64) -> HostOutcome {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    placed.sort_by_key(|p| p.start_ms);
    let mut running: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new(); // (end, held)
    let mut held = 0u64;
    let mut out = HostOutcome::default();
    for p in placed.iter() {
        while let Some(Reverse((end, h))) = running.peek().copied() {
            if end > p.start_ms {
                break;
            }
            running.pop();
            held -= h;
        }
        if held + p.limit > capacity {
            out.refused += 1;
            continue;
        }
        let mut take = p.held;
        let mut killed = p.killed;
        if p.held > p.limit && held + p.held > capacity {
            out.rescues_failed += 1;
            take = p.limit;
            killed = true;
        }
        if killed {
            out.killed += 1;
        }
        held += take;
        out.peak_held = out.peak_held.max(held);
        out.reserved_mib_ms += take as f64 / MIB_F * (p.end_ms - p.start_ms) as f64;
        running.push(Reverse((p.end_ms, take)));
    }
    out
}

/// The limit a burst guard's raises reach for an instance peaking at `peak` that started with
/// `limit`, or None when it is OOM-killed (no raise left below its peak).
fn rescue(cfg: &ReactiveConfig, limit: u64, peak: u64, ceiling: u64) -> Option<u64> {
    let mut l = Limits {
        max_bytes: Some(limit),
        high_bytes: None,
    };
    loop {
        let max = l.max_bytes?;
        if peak <= max {
            return Some(max);
        }
        let usage = cfg.trigger_bytes(l)?;
        l = cfg.burst_raise(l, usage, ceiling, u64::MAX).ok()?;
    }
}

/// The host's view across functions: each function's median peak so far, as a multiset.
#[derive(Debug, Default)]
struct HostPrior {
    typical: std::collections::BTreeMap<u64, u32>,
}

impl HostPrior {
    fn replace(&mut self, old: Option<u64>, new: Option<u64>) {
        if let Some(o) = old {
            if let Some(c) = self.typical.get_mut(&o) {
                *c -= 1;
                if *c == 0 {
                    self.typical.remove(&o);
                }
            }
        }
        if let Some(n) = new {
            *self.typical.entry(n).or_default() += 1;
        }
    }

    /// The agent's prior from the functions' medians (`PriorConfig::of`).
    fn prior(&self, prior: &PriorConfig) -> Option<Prior> {
        let mut medians: Vec<u64> = self
            .typical
            .iter()
            .flat_map(|(&v, &c)| std::iter::repeat_n(v, c as usize))
            .collect();
        prior.of(&mut medians)
    }
}

/// One function's state on one host during a replay.
#[derive(Debug, Default)]
struct FnState {
    /// Outcomes known, in the order they became known (end order).
    known: Vec<Sample>,
    cached: Option<(u64, u64)>, // (tick, limit)
    any_exceeded: bool,
    typical: Option<u64>,
}

impl FnState {
    /// The function's recommendation on this host changed to `r` (None: it has none): its
    /// vote in the host's prior, by the agent's rule (`prior::vote`, as `Policy::prior`).
    fn set_typical(&mut self, prior: &mut HostPrior, r: Option<&Recommendation>) {
        let typical = r.and_then(emars_agent::policy::prior::vote);
        prior.replace(self.typical, typical);
        self.typical = typical;
    }
}

/// An instance's outcome, pending until its end: (end, function, instance, OOM-killed, the
/// peak learnt: the limit where it was killed).
type Outcome = (u64, usize, usize, bool, u64);

/// How many outcomes of its function an instance's limit was computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Known {
    /// This host's own.
    local: usize,
    /// The fleet's (the other hosts', as the last fleet refresh received them).
    fleet: usize,
}

impl Known {
    fn total(self) -> usize {
        self.local + self.fleet
    }
}

/// The index of `known` in the kills-by-history split: none, 1..=19, 20 and more.
fn history_class(known: usize) -> usize {
    match known {
        0 => 0,
        1..=19 => 1,
        _ => 2,
    }
}

/// Replays every function's instances through one policy on one host, in global time order,
/// so that a function's first instances can be sized from what the host knows of the others.
fn replay(policy: &Policy, fns: &[(&Function, Vec<Instance>)], tally: &mut Tally) {
    let one_host: Vec<Vec<usize>> = fns.iter().map(|(_, insts)| vec![0; insts.len()]).collect();
    let placement = hosts::Placement {
        host_of: &one_host,
        hosts: 1,
        fleet: None,
    };
    replay_on(policy, fns, &placement, tally);
}

/// Replays every function's instances through one policy on the hosts of `placement`, in one
/// global time line: each host learns from the outcomes of its own instances (its history per
/// function, its prior from the functions it knows) and, when `placement.fleet` is set, from
/// the fleet's view of the other hosts' outcomes.
fn replay_on(
    policy: &Policy,
    fns: &[(&Function, Vec<Instance>)],
    placement: &hosts::Placement,
    tally: &mut Tally,
) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let order = hosts::start_order(fns);
    let mut states: Vec<Vec<FnState>> = (0..placement.hosts)
        .map(|_| (0..fns.len()).map(|_| FnState::default()).collect())
        .collect();
    let mut priors: Vec<HostPrior> = (0..placement.hosts).map(|_| HostPrior::default()).collect();
    let prior_params = PolicyParams::default();
    let mut fleet = placement
        .fleet
        .map(|timing| hosts::Fleet::new(timing, half_life(policy), fns.len()));
    let mut pending: BinaryHeap<Reverse<Outcome>> = BinaryHeap::new();
    for (start_ms, fi, ii) in order {
        // Outcomes that ended before this start become known to their host, and the fleet's
        // refreshes up to it are taken, in time order (a refresh after the outcomes that ended
        // before it).
        loop {
            let outcome = pending
                .peek()
                .map(|Reverse(o)| o.0)
                .filter(|&end| end < start_ms);
            let refresh = fleet
                .as_ref()
                .map(hosts::Fleet::next_refresh_ms)
                .filter(|&at| at <= start_ms);
            match (outcome, refresh) {
                (Some(end), Some(at)) if end < at => {}
                (_, Some(_)) => {
                    if let Some(fleet) = fleet.as_mut() {
                        refresh_priors(policy, fleet, &mut states, &mut priors, &prior_params);
                    }
                    continue;
                }
                (Some(_), None) => {}
                (None, None) => break,
            }
            let Some(Reverse((end, f, i, killed, value))) = pending.pop() else {
                break;
            };
            let h = placement.host_of[f][i];
            states[h][f].known.push(Sample {
                at_ms: end,
                peak_bytes: value,
                oom_killed: killed,
                limit_bytes: Some(value),
            });
            if policy.prior.is_some() {
                // The agent recomputes the function's recommendation at its outcome, with the
                // fleet's view of the last refresh; the prior reads its median.
                let view = fleet
                    .as_mut()
                    .and_then(|fl| fl.view(f, &samples_of(&states, f), h, end));
                let st = &mut states[h][f];
                let r = recommend_blended("f", &st.known, view.as_ref(), &prior_params, end, 0);
                st.set_typical(&mut priors[h], r.as_ref());
            }
            if let Some(fleet) = fleet.as_mut() {
                fleet.ended(end, f);
            }
        }
        let (f, insts) = &fns[fi];
        let inst = insts[ii];
        let h = placement.host_of[fi][ii];
        let view = fleet
            .as_mut()
            .and_then(|fl| fl.view(fi, &samples_of(&states, fi), h, inst.start_ms));
        let st = &mut states[h][fi];
        let (limit, known, ceiling) =
            limit_for(policy, f, st, &priors[h], view.as_ref(), inst.start_ms);
        // A rescued instance holds its raised limit, counted (pessimistically) for its whole
        // run; it ends normally, so its true peak is learnt.
        let rescued = match &policy.reactive {
            Some(cfg) if inst.peak_bytes > limit => rescue(cfg, limit, inst.peak_bytes, ceiling),
            _ => None,
        };
        let held = rescued.unwrap_or(limit);
        let reserved = held as f64 / MIB_F * f.duration_ms;
        tally.instances += 1;
        tally.reserved_mib_ms += reserved;
        if known.total() < 20 {
            tally.learning_mib_ms += reserved;
            tally.learning_peaks_mib_ms += inst.peak_bytes as f64 / MIB_F * f.duration_ms;
        }
        if known.local < 20 {
            tally.learning_local_mib_ms += reserved;
        }
        if known.fleet > 0 {
            tally.fleet_informed += 1;
        }
        tally.limits_mib += limit as f64 / MIB_F;
        if rescued.is_some() {
            tally.rescued += 1;
        }
        tally.placed.push(Placed {
            start_ms: inst.start_ms,
            end_ms: inst.end_ms,
            limit,
            held,
            killed: inst.peak_bytes > held,
        });
        let (killed, value) = if inst.peak_bytes > held {
            tally.exceeded += 1;
            tally.exceeded_by_history[history_class(known.total())] += 1;
            tally.exceeded_by_local[history_class(known.local)] += 1;
            st.any_exceeded = true;
            (true, limit)
        } else {
            tally
                .slack
                .push((held - inst.peak_bytes) as f64 / inst.peak_bytes.max(1) as f64);
            (false, inst.peak_bytes)
        };
        pending.push(Reverse((inst.end_ms, fi, ii, killed, value)));
    }
    // A function counts once however many hosts saw it exceed.
    tally.functions_exceeded += (0..fns.len())
        .filter(|&f| states.iter().any(|host| host[f].any_exceeded))
        .count() as u64;
}

/// Every host's samples of function `f` (host `g`'s at `[g]`), in end order.
fn samples_of(states: &[Vec<FnState>], f: usize) -> Vec<&[Sample]> {
    states.iter().map(|host| host[f].known.as_slice()).collect()
}

/// The recommender's half-life of `policy` (the default's for a rule without one).
fn half_life(policy: &Policy) -> Duration {
    match &policy.rule {
        Rule::Emars(params) => params.half_life,
        _ => PolicyParams::default().half_life,
    }
}

/// The fleet's next refresh: each agent recomputes the functions whose view it changed
/// (`Policy::set_fleet`), and its prior reads the new medians, a function known from the
/// fleet alone included. (A median depends on the samples, not on when it is computed: the
/// functions whose view did not change keep theirs.)
fn refresh_priors(
    policy: &Policy,
    fleet: &mut hosts::Fleet,
    states: &mut [Vec<FnState>],
    priors: &mut [HostPrior],
    params: &PolicyParams,
) {
    let (at, changed) = fleet.refresh();
    if policy.prior.is_none() {
        return;
    }
    for f in changed {
        let samples = samples_of(states, f);
        let views: Vec<Option<FleetPeaks>> = (0..states.len())
            .map(|h| fleet.view(f, &samples, h, at))
            .collect();
        for (h, view) in views.into_iter().enumerate() {
            let st = &mut states[h][f];
            let r = recommend_blended("f", &st.known, view.as_ref(), params, at, 0);
            st.set_typical(&mut priors[h], r.as_ref());
        }
    }
}

/// The limit an instance of `f` starting at `start_ms` gets, the outcomes it was computed
/// from, and the burst guard's ceiling for it. `fleet`: the fleet's peaks of `f` (never with
/// a periodic policy).
fn limit_for(
    policy: &Policy,
    f: &Function,
    st: &mut FnState,
    host: &HostPrior,
    fleet: Option<&FleetPeaks>,
    start_ms: u64,
) -> (u64, Known, u64) {
    let fleet_known = fleet.map_or(0, |p| p.count.round() as usize);
    let (known, at) = match policy.period_ms {
        None => (st.known.len(), start_ms),
        Some(period) => {
            let tick = start_ms - start_ms % period;
            if let Some((t, limit)) = st.cached {
                if t == tick {
                    let n = st.known.partition_point(|s| s.at_ms < tick);
                    let known = Known {
                        local: n,
                        fleet: fleet_known,
                    };
                    return (limit, known, ceiling_of(policy, limit));
                }
            }
            (st.known.partition_point(|s| s.at_ms < tick), tick)
        }
    };
    // On the prior (nothing known here nor in the fleet): its limit, and the base of the
    // guard's ceiling (the largest median).
    let prior = match (&policy.prior, known, fleet, &policy.rule) {
        (Some(cfg), 0, None, Rule::Emars(params)) => host.prior(cfg).map(|p| {
            let limit = recommend_from_prior(&f.id, p.max_bytes, params, at, 0).max_bytes;
            (limit, p.ceiling_base_bytes())
        }),
        _ => None,
    };
    let limit = prior.map_or_else(
        || policy.rule.limit(&f.id, &st.known[..known], fleet, at),
        |p| p.0,
    );
    if policy.period_ms.is_some() {
        st.cached = Some((at, limit));
    }
    let base = prior.map_or(limit, |p| p.1);
    let known = Known {
        local: known,
        fleet: fleet_known,
    };
    (limit, known, ceiling_of(policy, base))
}

/// The burst guard's ceiling, as the agent sets it: `ceiling_factor` x its base (the
/// recommendation; for an instance on the prior, the largest median on the host).
fn ceiling_of(policy: &Policy, base: u64) -> u64 {
    policy
        .reactive
        .as_ref()
        .map_or(base, |cfg| (base as f64 * cfg.ceiling_factor) as u64)
}

/// Nearest-rank percentile (p in percent) of an ascending slice; NaN when empty.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Run
// ---------------------------------------------------------------------------------------------

fn run(opts: &Opts) -> Result<()> {
    let t0 = Instant::now();
    let dir = data_dir();
    let dir = dir.canonicalize().unwrap_or(dir);
    let workload = load(&dir)?;
    let load_time = t0.elapsed();

    let policies = policies();
    let mut tallies = vec![Tally::default(); policies.len()];
    let mut oracle_mib_ms = 0.0;
    let mut oracle_placed = Vec::new();
    let mut oracle_limits_mib = 0.0;
    let mut invocations = 0u64;
    let mut total_instances = 0u64;
    let mut total_duration_ms = 0.0;
    let mut all = Vec::with_capacity(workload.functions.len());
    for (index, f) in workload.functions.iter().enumerate() {
        invocations += f.per_minute.iter().map(|&k| u64::from(k)).sum::<u64>();
        let insts = instances(f, index, opts);
        total_instances += insts.len() as u64;
        for inst in &insts {
            oracle_placed.push(Placed {
                start_ms: inst.start_ms,
                end_ms: inst.end_ms,
                limit: inst.peak_bytes,
                held: inst.peak_bytes,
                killed: false,
            });
            oracle_mib_ms += inst.peak_bytes as f64 / MIB_F * f.duration_ms;
            oracle_limits_mib += inst.peak_bytes as f64 / MIB_F;
            total_duration_ms += f.duration_ms;
        }
        all.push((f, insts));
    }
    for (policy, tally) in policies.iter().zip(tallies.iter_mut()) {
        replay(policy, &all, tally);
    }
    let defaults = policies.iter().position(|p| p.name == "defaults");
    let across_hosts = match defaults {
        Some(d) if opts.hosts > 1 => Some(hosts::run(
            &policies[d],
            &all,
            opts.hosts,
            opts.spread,
            opts.fleet,
        )),
        _ => None,
    };
    let wall = t0.elapsed();

    println!(
        "emars-replay: Azure Functions 2019 sample, {}",
        dir.display()
    );
    println!(
        "  {} functions{}, {} invocations -> {} instances (cap {} per function), seed {}",
        workload.functions.len(),
        if workload.unmatched.is_empty() {
            String::new()
        } else {
            format!(
                " ({} without memory/duration rows left out)",
                workload.unmatched.len()
            )
        },
        invocations,
        total_instances,
        if opts.cap == 0 {
            "none".to_string()
        } else {
            opts.cap.to_string()
        },
        opts.seed
    );
    println!(
        "  time: {}; peaks in MiB from the apps' allocated-memory percentiles; cold default 256 MiB",
        if opts.real_hour {
            "the trace hour replayed in real time"
        } else {
            "the trace hour stretched onto a simulated day (1 trace minute = 24 min)"
        }
    );
    println!();

    // Ratios are to VPA's rule, the anchor the defaults are measured against.
    let vpa = policies.iter().position(|p| p.name == "vpa").unwrap_or(0);
    let base_reserved = tallies[vpa].reserved_mib_ms;
    let base_limits = tallies[vpa].limits_mib;
    let mut rows: Vec<Summary> = policies
        .iter()
        .zip(tallies.iter_mut())
        .map(|(policy, tally)| {
            tally.slack.sort_by(f64::total_cmp);
            Summary {
                name: policy.name,
                reserved_gib_h: tally.reserved_mib_ms / 1024.0 / HOUR_MS as f64,
                reserved_ratio: tally.reserved_mib_ms / base_reserved,
                learning_gib_h: tally.learning_mib_ms / 1024.0 / HOUR_MS as f64,
                learning_over_gib_h: (tally.learning_mib_ms - tally.learning_peaks_mib_ms)
                    / 1024.0
                    / HOUR_MS as f64,
                limits_gib: tally.limits_mib / 1024.0,
                limits_ratio: tally.limits_mib / base_limits,
                exceed_pct: 100.0 * tally.exceeded as f64 / tally.instances.max(1) as f64,
                exceeded_by_history: tally.exceeded_by_history,
                functions_exceeded: tally.functions_exceeded,
                rescued: tally.rescued,
                instances: tally.instances,
                slack_p50: nearest_rank(&tally.slack, 50.0),
                slack_p95: nearest_rank(&tally.slack, 95.0),
            }
        })
        .collect();
    rows.push(Summary {
        name: "oracle",
        reserved_gib_h: oracle_mib_ms / 1024.0 / HOUR_MS as f64,
        reserved_ratio: oracle_mib_ms / base_reserved,
        learning_gib_h: f64::NAN,
        learning_over_gib_h: 0.0,
        limits_gib: oracle_limits_mib / 1024.0,
        limits_ratio: oracle_limits_mib / base_limits,
        exceed_pct: 0.0,
        exceeded_by_history: [0; 3],
        functions_exceeded: 0,
        rescued: 0,
        instances: total_instances,
        slack_p50: 0.0,
        slack_p95: 0.0,
    });
    println!(
        "{:<12} {:>10} {:>6} {:>9} {:>9} {:>10} {:>6} {:>8} {:>15} {:>7} {:>8} {:>9} {:>9}",
        "policy",
        "GiB·h resv",
        "x vpa",
        "learning",
        "learn+",
        "Σlimit GiB",
        "x vpa",
        "exceed%",
        "kills 0/<20/20+",
        "fns exc",
        "rescued",
        "slack p50",
        "slack p95"
    );
    println!("{}", "-".repeat(133));
    for r in &rows {
        let [cold, learning, steady] = r.exceeded_by_history;
        println!(
            "{:<12} {:>10.2} {:>6.3} {:>9.2} {:>9.2} {:>10.1} {:>6.3} {:>8.2} {:>15} {:>7} {:>8} {:>8.1}% {:>8.1}%",
            r.name,
            r.reserved_gib_h,
            r.reserved_ratio,
            r.learning_gib_h,
            r.learning_over_gib_h,
            r.limits_gib,
            r.limits_ratio,
            r.exceed_pct,
            format!("{cold}/{learning}/{steady}"),
            r.functions_exceeded,
            r.rescued,
            100.0 * r.slack_p50,
            100.0 * r.slack_p95
        );
    }
    println!();
    println!(
        "columns: GiB·h resv = sum of limit x average duration; x vpa = its ratio to vpa's; \
         learning = GiB·h resv of the\n  instances started while fewer than 20 outcomes of \
         their function were known; learn+ = that part above their own peaks;\n  Σlimit = \
         plain sum of limits; exceed% = instances whose peak exceeds their limit (OOM \
         kill); kills 0/<20/20+ = those kills by the number of\n  outcomes the policy knew \
         (none: cold default; fewer than 20; 20 or more); fns exc = functions with any;\n  \
         rescued = instances past their limit that the burst guard's raises saved (+r policies; \
         they hold the raised limit\n  for their whole run in GiB·h resv, and Σlimit counts the \
         limit given at start);\n  slack = (limit - peak) / peak over the \
         instances that fit; oracle = limit equal to each instance's own peak."
    );
    println!();
    // Mean peak per instance and weighted by duration (MiB): are long runners larger?
    let mean_peak_mib = oracle_limits_mib / total_instances.max(1) as f64;
    let mean_peak_by_time_mib = oracle_mib_ms / total_duration_ms.max(1.0);
    interpret(&rows, mean_peak_mib, mean_peak_by_time_mib);
    println!();
    // The same instances on one host: refusals and failed rescues when memory runs short.
    let busiest = host_pass(&mut oracle_placed, u64::MAX).peak_held;
    let capacity = if opts.host_gib > 0.0 {
        (opts.host_gib * 1024.0 * MIB_F) as u64
    } else {
        busiest + busiest / 4
    };
    println!(
        "on one host of {:.2} GiB (the instances' own peaks at their busiest moment: {:.2} GiB):",
        capacity as f64 / 1024.0 / MIB_F,
        busiest as f64 / 1024.0 / MIB_F
    );
    println!(
        "{:<12} {:>10} {:>9} {:>8} {:>9} {:>15} {:>14}",
        "policy", "GiB·h resv", "refused%", "killed%", "rescues", "rescues failed", "peak held GiB"
    );
    println!("{}", "-".repeat(84));
    let mut host_rows = Vec::new();
    for (policy, tally) in policies.iter().zip(tallies.iter_mut()) {
        let h = host_pass(&mut tally.placed, capacity);
        let n = tally.instances.max(1) as f64;
        host_rows.push((
            policy.name.to_string(),
            100.0 * h.refused as f64 / n,
            100.0 * h.killed as f64 / n,
        ));
        println!(
            "{:<12} {:>10.2} {:>9.2} {:>8.2} {:>9} {:>15} {:>14.2}",
            policy.name,
            h.reserved_mib_ms / 1024.0 / HOUR_MS as f64,
            100.0 * h.refused as f64 / n,
            100.0 * h.killed as f64 / n,
            tally.rescued,
            h.rescues_failed,
            h.peak_held as f64 / 1024.0 / MIB_F
        );
    }
    println!(
        "  refused = not started: its limit did not fit next to the limits held by the running \
         instances; killed% counts\n  kills among those that ran, a failed rescue included \
         (no room left for the raise); GiB·h resv = of those that ran."
    );
    println!();
    if let (Some(run), Some(d)) = (&across_hosts, defaults) {
        hosts::report(run, &tallies[d], &tallies[vpa]);
        println!();
    }
    if let Some(dir) = &opts.plots {
        let bars = |f: fn(&Summary) -> f64| -> Vec<(String, f64)> {
            rows.iter().map(|r| (r.name.to_string(), f(r))).collect()
        };
        let host = |f: fn(&(String, f64, f64)) -> f64| -> Vec<(String, f64)> {
            host_rows.iter().map(|r| (r.0.clone(), f(r))).collect()
        };
        emars_tests::write_bar_charts(
            dir,
            &[
                (
                    "replay-reserved",
                    emars_tests::bar_chart(
                        "memory reserved per policy",
                        "GiB·h",
                        bars(|r| r.reserved_gib_h),
                    ),
                ),
                (
                    "replay-exceed",
                    emars_tests::bar_chart(
                        "instances over their limit (OOM kills) per policy",
                        "% of instances",
                        bars(|r| r.exceed_pct),
                    ),
                ),
                (
                    "replay-host-refused",
                    emars_tests::bar_chart(
                        "refused on one host per policy",
                        "% of instances",
                        host(|r| r.1),
                    ),
                ),
                (
                    "replay-host-killed",
                    emars_tests::bar_chart(
                        "killed on one host per policy",
                        "% of instances",
                        host(|r| r.2),
                    ),
                ),
            ],
        )?;
    }
    println!(
        "wall time {:.2} s (loading the CSVs {:.0} ms)",
        wall.as_secs_f64(),
        load_time.as_secs_f64() * 1000.0,
    );
    if wall > TIME_LIMIT {
        bail!(
            "the replay took {:.1} s, over its {} s budget",
            wall.as_secs_f64(),
            TIME_LIMIT.as_secs()
        );
    }
    Ok(())
}

/// One line of the table.
struct Summary {
    name: &'static str,
    reserved_gib_h: f64,
    reserved_ratio: f64,
    /// GiB·h of the learning phase (fewer than 20 outcomes known).
    learning_gib_h: f64,
    /// The learning phase's GiB·h above its instances' own peaks.
    learning_over_gib_h: f64,
    limits_gib: f64,
    limits_ratio: f64,
    exceed_pct: f64,
    exceeded_by_history: [u64; 3],
    functions_exceeded: u64,
    rescued: u64,
    instances: u64,
    slack_p50: f64,
    slack_p95: f64,
}

/// A short reading of the table, with its numbers.
fn interpret(rows: &[Summary], mean_peak_mib: f64, mean_peak_by_time_mib: f64) {
    let get = |name: &str| rows.iter().find(|r| r.name == name);
    let (Some(d), Some(st), Some(vpa), Some(vpn), Some(p95), Some(p95r), Some(np), Some(half)) = (
        get("defaults"),
        get("static-256"),
        get("vpa"),
        get("vpa-nofloor"),
        get("p95"),
        get("p95+r/2"),
        get("defaults-np"),
        get("defaults+r/2"),
    ) else {
        return;
    };
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let kills = |r: &Summary| r.exceeded_by_history.iter().sum::<u64>();
    println!("interpretation:");
    println!(
        "  The defaults (P50 x 1.1 of the peaks, the burst guard on with raises of a quarter \
         of the limit, a function's first\n  instances from the host's prior) reserve {:.2} \
         GiB·h, {:.3} x VPA's (target <= 0.80: {}), and kill {:.2}% of instances ({}; target \
         <= 0.1%:\n  {}); the guard rescues {} ({:.1}% of instances), each counted at its \
         raised limit for its whole run.",
        d.reserved_gib_h,
        d.reserved_ratio,
        met(d.reserved_ratio <= 0.80),
        d.exceed_pct,
        kills(d),
        met(d.exceed_pct <= 0.1),
        d.rescued,
        100.0 * d.rescued as f64 / d.instances.max(1) as f64,
    );
    println!(
        "  Learning phase (fewer than 20 outcomes known): {:.2} GiB·h against {:.2} with the \
         older defaults (p95: P95 x 1.15, no guard),\n  {:.2} x; above the instances' own \
         peaks {:.2} against {:.2}, {:.2} x (target: halved, {}). Their own peaks need {:.2} \
         GiB·h, so no\n  policy could halve the reserve itself.",
        d.learning_gib_h,
        p95.learning_gib_h,
        d.learning_gib_h / p95.learning_gib_h,
        d.learning_over_gib_h,
        p95.learning_over_gib_h,
        d.learning_over_gib_h / p95.learning_over_gib_h,
        met(d.learning_over_gib_h <= p95.learning_over_gib_h / 2.0),
        d.learning_gib_h - d.learning_over_gib_h,
    );
    println!(
        "  The prior: without it (defaults-np, the 256 MiB cold default, the guard's ceiling 4x \
         it) {} instances die with no outcome known\n  against {}, at {:.2} GiB·h. The \
         guard's step: at half the limit (defaults+r/2) a rescued instance holds more, {:.2} \
         GiB·h ({:.3} x VPA).",
        np.exceeded_by_history[0],
        d.exceeded_by_history[0],
        np.reserved_gib_h,
        half.reserved_gib_h,
        half.reserved_ratio,
    );
    println!(
        "  The older defaults without the guard (p95) kill {:.2}% at {:.3} x VPA; with the \
         guard behind them (p95+r/2) {:.2}%, still at {:.3} x.\n  VPA's rule (P90 x 1.15, \
         floor 250 MiB) kills {:.2}% (without the floor {:.2}%); static-256 kills {:.1}% in \
         the {} functions\n  whose peaks pass 256 MiB. Long runners are larger here (mean \
         peak {:.0} MiB weighted by time, {:.0} MiB by instance).",
        p95.exceed_pct,
        p95.reserved_ratio,
        p95r.exceed_pct,
        p95r.reserved_ratio,
        vpa.exceed_pct,
        vpn.exceed_pct,
        st.exceed_pct,
        st.functions_exceeded,
        mean_peak_by_time_mib,
        mean_peak_mib,
    );
    println!(
        "  Caveats: peaks are drawn independently per instance from per-app memory that the \
         provider averaged per minute (no short\n  spikes); a rescue assumes the raise lands \
         before the instance reaches its limit (the agent's signal-to-write time is\n  \
         milliseconds; see emars-bench-reactive); where the host knows fewer than \
         policy.prior.min_functions functions, the agent\n  writes no limit and the replay \
         gives the cold default."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use emars_agent::policy::recommend::recommend;

    #[test]
    fn instances_keep_the_cap_and_the_order() {
        let f = Function {
            id: "f".into(),
            per_minute: (0..60).map(|m| if m < 30 { 10 } else { 0 }).collect(),
            memory_mib: [50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0],
            duration_ms: 100.0,
        };
        let opts = Opts {
            cap: 200,
            seed: 1,
            ..Opts::default()
        };
        let insts = instances(&f, 0, &opts);
        assert_eq!(insts.len(), 200);
        assert!(insts.windows(2).all(|w| w[0].start_ms < w[1].start_ms));
        // All in the first half of the simulated day.
        assert!(insts.iter().all(|i| i.start_ms < START_MS + 12 * HOUR_MS));
        assert!(insts
            .iter()
            .all(|i| (50 * MIB..=120 * MIB).contains(&i.peak_bytes)));
    }

    #[test]
    fn an_exceeding_instance_is_fed_back_as_oom() {
        let f = Function {
            id: "f".into(),
            per_minute: vec![],
            memory_mib: [0.0; 8],
            duration_ms: 1.0,
        };
        let insts = [
            Instance {
                start_ms: START_MS,
                end_ms: START_MS + 1,
                peak_bytes: 300 * MIB,
            },
            Instance {
                start_ms: START_MS + 10,
                end_ms: START_MS + 11,
                peak_bytes: 300 * MIB,
            },
        ];
        let policy = Policy {
            name: "emars",
            rule: Rule::Emars(PolicyParams::default()),
            period_ms: None,
            reactive: None,
            prior: None,
        };
        let mut t = Tally::default();
        replay(&policy, &[(&f, insts.to_vec())], &mut t);
        // First at the cold default (killed); the second learns the OOM-killed sample, censored
        // at 256 MiB, and gets at least bump(256 MiB) = 356 MiB.
        assert_eq!(t.exceeded, 1);
        assert_eq!(t.exceeded_by_history, [1, 0, 0]);
        assert_eq!(t.functions_exceeded, 1);
        assert_eq!(t.slack.len(), 1);
        assert!(t.slack[0] >= 56.0 / 300.0, "{}", t.slack[0]);
        let want = recommend(
            "f",
            &[Sample {
                at_ms: START_MS + 1,
                peak_bytes: 256 * MIB,
                oom_killed: true,
                limit_bytes: Some(256 * MIB),
            }],
            &PolicyParams::default(),
            START_MS + 10,
            0,
        )
        .map_or(0, |r| r.max_bytes);
        let limit = (300 * MIB) as f64 * (1.0 + t.slack[0]);
        assert!((limit - want as f64).abs() < 1.0, "{limit} != {want}");
    }

    /// The burst guard's raises: with steps of half the limit 100 MiB -> 150 -> 225 -> ...,
    /// up to the ceiling (4x); a peak past it is killed. The default quarter: 100 -> 125 ->
    /// 156.25 -> ...
    #[test]
    fn rescue_follows_the_agents_raises() {
        let cfg = ReactiveConfig {
            step_fraction: 0.5,
            ..ReactiveConfig::default()
        };
        let c = 400 * MIB;
        assert_eq!(rescue(&cfg, 100 * MIB, 90 * MIB, c), Some(100 * MIB));
        assert_eq!(rescue(&cfg, 100 * MIB, 140 * MIB, c), Some(150 * MIB));
        assert_eq!(rescue(&cfg, 100 * MIB, 200 * MIB, c), Some(225 * MIB));
        assert_eq!(rescue(&cfg, 100 * MIB, 400 * MIB, c), Some(400 * MIB));
        assert_eq!(rescue(&cfg, 100 * MIB, 401 * MIB, c), None);
        // Above 256 MiB too (a raise is not bounded by a host taken as unbounded).
        assert_eq!(
            rescue(&cfg, 512 * MIB, 700 * MIB, 2048 * MIB),
            Some(768 * MIB)
        );
        let quarter = ReactiveConfig::default();
        assert_eq!(rescue(&quarter, 100 * MIB, 120 * MIB, c), Some(125 * MIB));
    }

    /// A function's first instance is sized from the other functions' medians once the host
    /// knows enough of them, and the guard's ceiling for it is the host's.
    #[test]
    fn first_instances_get_the_hosts_prior() {
        let f = |id: &str, peak_mib: u64| Function {
            id: id.into(),
            per_minute: vec![],
            memory_mib: [peak_mib as f64; 8],
            duration_ms: 1.0,
        };
        let one = |at: u64, peak_mib: u64| Instance {
            start_ms: START_MS + at,
            end_ms: START_MS + at + 1,
            peak_bytes: peak_mib * MIB,
        };
        let (a, b, c, big) = (f("a", 40), f("b", 60), f("c", 80), f("big", 900));
        let fns = vec![
            (&a, vec![one(0, 40)]),
            (&b, vec![one(1, 60)]),
            (&c, vec![one(2, 80)]),
            (&big, vec![one(10, 900)]),
        ];
        let policy = policies()
            .into_iter()
            .find(|p| p.name == "defaults")
            .unwrap();
        let mut t = Tally::default();
        replay(&policy, &fns, &mut t);
        // The first three met the cold default; the fourth the prior, from three medians (the
        // upper edges of their histogram buckets): P50 = b's, x 1.1; 900 MiB is past 4x the
        // largest median (80 MiB): killed.
        let limits: Vec<u64> = t.placed.iter().map(|p| p.limit).collect();
        assert_eq!(&limits[..3], &[COLD_DEFAULT_BYTES; 3]);
        let b_median = DecayingHistogram::bucket_upper_edge(DecayingHistogram::bucket_of(60 * MIB));
        assert_eq!(limits[3], page_up((b_median as f64 * 1.1).ceil() as u64));
        assert_eq!((t.rescued, t.exceeded), (0, 1));
        // At 300 MiB, within 4x the largest median though past 4x the prior: rescued.
        let big = f("big", 300);
        let fns = vec![
            (&a, vec![one(0, 40)]),
            (&b, vec![one(1, 60)]),
            (&c, vec![one(2, 80)]),
            (&big, vec![one(10, 300)]),
        ];
        let mut t = Tally::default();
        replay(&policy, &fns, &mut t);
        assert_eq!((t.rescued, t.exceeded), (1, 0));
    }

    /// On a host: an instance that does not fit is refused, a rescue without room fails and
    /// kills, room comes back when instances end.
    #[test]
    fn host_pass_refuses_and_fails_rescues_without_room() {
        let p = |start_ms, end_ms, limit, held| Placed {
            start_ms,
            end_ms,
            limit: limit * MIB,
            held: held * MIB,
            killed: false,
        };
        let mut placed = vec![
            p(0, 100, 60, 60),
            p(10, 100, 30, 50), // fits at 30, not raised to 50 (60 + 50 > 100): killed
            p(20, 100, 20, 20), // 60 + 30 + 20 > 100: refused
            p(100, 200, 20, 90), // all ended: room for the raise
        ];
        let h = host_pass(&mut placed, 100 * MIB);
        assert_eq!((h.refused, h.rescues_failed, h.killed), (1, 1, 1));
        assert_eq!(h.peak_held, 90 * MIB);
    }
}
