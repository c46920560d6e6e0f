//! A fleet on one machine: three hosts, each a network namespace of the test's own with its own
//! watched cgroup root, real instances and a real agent listening on the namespace's address,
//! and one real Prometheus (Debian's) in the root namespace scraping the three over their veth
//! links.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use emars_agent::{
    clock::now_ms,
    config::Config,
    kernel::host::memory_total_bytes,
    model::Sample,
    policy::{
        fleet::{FleetPeaks, FleetView},
        params_of,
        recommend::recommend_blended,
    },
};
use emars_tests::{
    hosts::Host,
    netns::NetNs,
    prometheus::{self, Prometheus},
    *,
};
use serde_json::Value;

/// Prometheus's scrape job for the agents.
const JOB: &str = "emars";

/// The value of each series of an instant-query answer, by its `instance` label.
fn by_instance(answer: &Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = Prometheus::result(answer)
        .iter()
        .filter_map(|s| {
            let instance = s["metric"]["instance"].as_str()?.to_owned();
            let value = s["value"][1].as_str()?.parse().ok()?;
            Some((instance, value))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Three hosts scraped over their links: `up` is 1 for each agent, and the peaks each agent
/// recorded of its own real instances are the ones Prometheus holds under its target.
#[test]
fn prometheus_scrapes_three_hosts_in_their_namespaces() -> Result<()> {
    let test = "prometheus_scrapes_three_hosts_in_their_namespaces";
    if !require_root(test) {
        return Ok(());
    }
    const FUNCTION: &str = "scraped";
    let hosts = [Host::start("")?, Host::start("")?, Host::start("")?];
    // Different peaks on each host, so that a target's series cannot be another's.
    let mut peaks = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let mibs: Vec<u64> = (0..=h as u64).map(|i| 8 + 8 * h as u64 + 4 * i).collect();
        peaks.push(host.run_instances(FUNCTION, &mibs)?);
    }
    let targets: Vec<String> = hosts.iter().map(Host::target).collect();
    let prometheus = Prometheus::scraping(
        JOB,
        &targets.iter().map(String::as_str).collect::<Vec<_>>(),
        &[prometheus::NATIVE_HISTOGRAMS],
    )?;

    let mut want_up: Vec<(String, f64)> = targets.iter().map(|t| (t.clone(), 1.0)).collect();
    want_up.sort_by(|a, b| a.0.cmp(&b.0));
    let up = wait_for(Duration::from_secs(20), || {
        let up = by_instance(&prometheus.query(&format!("up{{job=\"{JOB}\"}}")).ok()?);
        (up == want_up).then_some(up)
    });
    up.ok_or_else(|| {
        anyhow!(
            "not every target up: {:?}\n{}",
            prometheus.query("up").ok(),
            prometheus.log()
        )
    })?;

    // Per target: as many instances as that host ran, their peaks summed exactly.
    let mut want: Vec<(String, (f64, f64))> = targets
        .iter()
        .zip(&peaks)
        .map(|(t, p)| (t.clone(), (p.len() as f64, p.iter().sum::<u64>() as f64)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    // The agents' native histograms (protobuf exposition, asked for with the feature flag).
    let selector = format!("emars_instance_peak_bytes{{job=\"{JOB}\", function=\"{FUNCTION}\"}}");
    let (count_q, sum_q) = (
        format!("histogram_count({selector})"),
        format!("histogram_sum({selector})"),
    );
    let per_target = || -> Option<Vec<(String, (f64, f64))>> {
        let count = by_instance(&prometheus.query(&count_q).ok()?);
        let sum = by_instance(&prometheus.query(&sum_q).ok()?);
        Some(
            count
                .into_iter()
                .zip(sum)
                .filter(|(c, s)| c.0 == s.0)
                .map(|(c, s)| (c.0, (c.1, s.1)))
                .collect(),
        )
    };
    let got = wait_for(Duration::from_secs(20), || {
        per_target().filter(|got| *got == want)
    });
    got.ok_or_else(|| {
        anyhow!(
            "Prometheus's (count, sum) per target {:?} never matched the agents' {want:?}",
            per_target()
        )
    })?;
    Ok(())
}

/// The function the fleet knows: run on hosts A and B, new to host C.
const F: &str = "fleetfn";
/// Its instances' sizes (MiB) on A and on B.
const A_MIBS: [u64; 4] = [48, 52, 56, 60];
const B_MIBS: [u64; 3] = [64, 68, 72];
/// C's own functions (name, MiB): enough for C's prior (`policy.prior.min_functions`), all
/// above the policy's floor and far below F.
const C_OWN: [(&str, u64); 3] = [("small", 20), ("mid", 24), ("large", 28)];
/// The size of C's own instance of F (MiB).
const C_F_MIB: u64 = 32;
/// C's fleet settings: a fetch every second, each given at most TIMEOUT_S, a view dropped
/// MAX_AGE_S after the last successful fetch.
const REFRESH_S: u64 = 1;
const TIMEOUT_S: u64 = 2;
const MAX_AGE_S: u64 = 4;

/// Hosts A and B (fleet off) having run F, host C (enforce mode, fleet on) having run only its
/// own functions, and a Prometheus scraping the three, listening on C's side of C's link
/// (where C's agent asks it).
struct Fleet {
    /// A and B, kept running: Prometheus scrapes them.
    _a_and_b: [Host; 2],
    c: Host,
    /// None once stopped.
    prometheus: Option<Prometheus>,
    /// Where the Prometheus listens (for a stand-in once it is stopped).
    listen: SocketAddr,
    /// The peaks A and B recorded of F.
    fleet_peaks: Vec<u64>,
}

impl Fleet {
    fn start() -> Result<Fleet> {
        let (a, b) = (Host::start("")?, Host::start("")?);
        let c_ns = NetNs::new()?;
        let listen = SocketAddr::from((c_ns.host_addr, free_port(c_ns.host_addr)?));
        let c = Host::start_in(
            c_ns,
            &format!(
                "[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
                 [fleet]\nprometheus_url = \"http://{listen}\"\nrefresh_s = {REFRESH_S}\n\
                 timeout_s = {TIMEOUT_S}\nmax_age_s = {MAX_AGE_S}\n"
            ),
        )?;
        let mut fleet_peaks = a.run_instances(F, &A_MIBS)?;
        fleet_peaks.extend(b.run_instances(F, &B_MIBS)?);
        for (f, mib) in C_OWN {
            c.run_instances(f, &[mib])?;
        }
        let targets = [a.target(), b.target(), c.target()];
        let prometheus = Prometheus::start_at(
            listen,
            &Prometheus::config(JOB, &targets.each_ref().map(String::as_str)),
            &[prometheus::NATIVE_HISTOGRAMS],
        )?;
        Ok(Fleet {
            _a_and_b: [a, b],
            c,
            prometheus: Some(prometheus),
            listen,
            fleet_peaks,
        })
    }

    fn prometheus(&self) -> &Prometheus {
        self.prometheus.as_ref().expect("Prometheus is running")
    }

    /// C's agent settings, as it read them.
    fn c_config(&self) -> Result<Config> {
        Ok(Config::load(&self.c.agent.config_path)?)
    }

    /// C's `/v1/info` `fleet` object.
    fn c_fleet_info(&self) -> Result<Value> {
        Ok(self.c.agent.get_ok("/v1/info")?["fleet"].clone())
    }

    /// Prometheus's own answer to C's fleet query, read by the agent's parser: F's peaks, once
    /// the answer holds every instance A and B ran.
    fn prometheus_peaks(&self) -> Result<FleetPeaks> {
        let config = self.c_config()?;
        let agent_id = self.c.agent.get_ok("/v1/info")?["agent_id"]
            .as_str()
            .ok_or_else(|| anyhow!("C has no agent_id"))?
            .to_owned();
        let query = config.fleet.query_for(&agent_id);
        let want = self.fleet_peaks.len() as f64;
        let mut last = None;
        let peaks = wait_for(Duration::from_secs(30), || {
            let answer = serde_json::to_vec(&self.prometheus().query(&query).ok()?).ok()?;
            let view = FleetView::from_answer(&answer, now_ms(), config.store.max_functions);
            last = Some(format!("{view:?}"));
            let peaks = view.ok()?.peaks(F)?.as_ref().clone();
            (peaks.count == want).then_some(peaks)
        });
        peaks.ok_or_else(|| {
            anyhow!("Prometheus never answered {query} with {want} peaks of {F}: {last:?}")
        })
    }

    /// C's `GET /v1/functions/F/limits` once it has `fleet` fleet samples and `local` of its own.
    fn c_limits_with(&self, fleet: f64, local: u64) -> Result<Value> {
        let mut last = None;
        let l = wait_for(Duration::from_secs(10), || {
            let l = self
                .c
                .agent
                .get_ok(&format!("/v1/functions/{F}/limits"))
                .ok();
            last = l.clone();
            let l = l?;
            (l["fleet_samples"].as_f64() == Some(fleet)
                && l["local_samples"].as_u64() == Some(local))
            .then_some(l)
        });
        l.ok_or_else(|| anyhow!("C's limits for {F} never had {fleet} fleet and {local} local samples: {last:?}\nfleet: {:?}", self.c_fleet_info().ok()))
    }
}

fn free_port(ip: std::net::Ipv4Addr) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// The limits C's recommender gives F from `samples` of its own and `fleet`, with C's own
/// settings and this machine's memory.
fn blended(
    config: &Config,
    samples: &[Sample],
    fleet: Option<&FleetPeaks>,
    now_ms: u64,
) -> (u64, u64) {
    let params = params_of(&config.policy.for_function(F));
    let r = recommend_blended(F, samples, fleet, &params, now_ms, memory_total_bytes())
        .expect("samples or fleet peaks give a recommendation");
    (r.max_bytes, r.high_bytes)
}

/// The first instance of a function host C has never run, but A and B have, gets at mkdir the
/// limits the blend rule gives from Prometheus's own answer to C's query (no local samples),
/// which are what A and B recorded, bucketed as Prometheus holds them; not C's prior, which a
/// function unknown to the whole fleet gets.
#[test]
fn a_function_new_to_a_host_starts_at_the_fleet_informed_limit() -> Result<()> {
    let test = "a_function_new_to_a_host_starts_at_the_fleet_informed_limit";
    if !require_root(test) {
        return Ok(());
    }
    let fleet = Fleet::start()?;
    let from_prometheus = fleet.prometheus_peaks()?;
    // What A and B recorded, exactly as the schema-4 buckets Prometheus holds them in.
    assert_eq!(
        from_prometheus,
        FleetPeaks::of_values(fleet.fleet_peaks.iter().copied()),
        "Prometheus's answer against A's and B's recorded peaks {:?}",
        fleet.fleet_peaks
    );
    let config = fleet.c_config()?;
    let (want_max, want_high) = blended(&config, &[], Some(&from_prometheus), now_ms());

    // C's prior, as a function unknown to the fleet gets it: not what F is to get.
    let h = &fleet.c.root.hierarchy;
    let unknown = fleet.c.instance_dir("nobody_runs_this", "u0")?;
    let prior = wait_for(Duration::from_secs(5), || h.max_limit(&unknown))
        .ok_or_else(|| anyhow!("C wrote no prior at mkdir:\n{}", fleet.c.agent.log()))?;
    let l = fleet
        .c
        .agent
        .get_ok("/v1/functions/nobody_runs_this/limits")?;
    assert_eq!(
        (l["source"].as_str(), l["max_bytes"].as_u64()),
        (Some("prior"), Some(prior)),
        "{l}"
    );
    assert!(
        want_max > 2 * prior,
        "the test needs F's fleet limit {want_max} far from C's prior {prior}"
    );

    let l = fleet.c_limits_with(from_prometheus.count, 0)?;
    assert_eq!(l["source"], "fleet", "{l}");
    let dir = fleet.c.instance_dir(F, "first")?;
    let (max, high) = wait_for(Duration::from_secs(5), || {
        Some((h.max_limit(&dir)?, h.high_limit(&dir)?))
    })
    .ok_or_else(|| {
        anyhow!(
            "no limits at mkdir of C's first {F}:\n{}",
            fleet.c.agent.log()
        )
    })?;
    println!(
        "{F} on C: memory.limit_in_bytes {max}, soft {high} (fleet: {} peaks, {:.1} to {:.1} MiB); prior {prior}",
        from_prometheus.count,
        *fleet.fleet_peaks.iter().min().unwrap_or(&0) as f64 / MIB as f64,
        *fleet.fleet_peaks.iter().max().unwrap_or(&0) as f64 / MIB as f64,
    );
    assert_eq!(
        (max, high),
        (want_max, want_high),
        "C's first {F} against the blend of Prometheus's answer"
    );
    Ok(())
}

/// Milliseconds from `mkdir` of a new instance of `function` (which has limits) on `host` to
/// its hard limit in force (v1 memory.limit_in_bytes), for `n` instances made `gap` apart; sorted.
fn mkdir_to_limits(
    host: &Host,
    function: &str,
    tag: &str,
    n: usize,
    gap: Duration,
) -> Result<Vec<f64>> {
    let h = &host.root.hierarchy;
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let dir = host.root.function_dir(function)?.join(format!("{tag}{i}"));
        let started = Instant::now();
        fs::create_dir(&dir)?;
        let limited = loop {
            if h.max_limit(&dir).is_some() {
                break true;
            }
            if started.elapsed() > Duration::from_secs(10) * time_scale() {
                break false;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        took.push(started.elapsed().as_secs_f64() * 1000.0);
        fs::remove_dir(&dir)?;
        anyhow::ensure!(
            limited,
            "{function}/{tag}{i}: no limit in 10 s:\n{}",
            host.agent.log()
        );
        std::thread::sleep(gap);
    }
    took.sort_by(f64::total_cmp);
    Ok(took)
}

fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// A Prometheus that accepts connections and never answers: a listener of the test's own on
/// its address, each connection held open and unread. Counts the connections.
struct Silent {
    accepted: Arc<AtomicU64>,
}

impl Silent {
    fn listen(at: SocketAddr) -> Result<Silent> {
        let listener = TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().map_while(Result::ok) {
                held.push(conn);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok(Silent { accepted })
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// C's fleet view while Prometheus is up leaves C's own series out; once Prometheus is stopped
/// C says so within a refresh and a fetch timeout, drops the view after max_age_s, and its next
/// new instance of F gets the limits of C's local history alone. Meanwhile, new instances get
/// their limits as fast with Prometheus stopped, and with a Prometheus that never answers, as
/// with it up: the event loop never waits on a fetch.
#[test]
fn a_host_without_prometheus_falls_back_to_local_history_without_stalling() -> Result<()> {
    let test = "a_host_without_prometheus_falls_back_to_local_history_without_stalling";
    if !require_root(test) {
        return Ok(());
    }
    let fleet = Fleet::start()?;
    let from_prometheus = fleet.prometheus_peaks()?;
    let config = fleet.c_config()?;
    // C runs F once, far below the fleet (and above the floor): its own sample.
    let fleet_limits = fleet.c_limits_with(from_prometheus.count, 0)?;
    let own = fleet.c.run_instances(F, &[C_F_MIB])?;
    // Prometheus scrapes C's own F ...
    let c_own = format!(
        "histogram_count(emars_instance_peak_bytes{{function=\"{F}\", instance=\"{}\"}})",
        fleet.c.target()
    );
    wait_for(Duration::from_secs(20), || {
        let a = fleet.prometheus().query(&c_own).ok()?;
        (by_instance(&a).first()?.1 == 1.0).then_some(())
    })
    .ok_or_else(|| {
        anyhow!(
            "Prometheus never had C's own {F}: {:?}",
            fleet.prometheus().query(&c_own).ok()
        )
    })?;
    // ... and C's later fetches still leave it out: A's and B's samples, and its own one.
    let ok_before = fleet.c_fleet_info()?["refreshes_ok"].as_u64().unwrap_or(0);
    wait_for(Duration::from_secs(10), || {
        (fleet.c_fleet_info().ok()?["refreshes_ok"].as_u64()? >= ok_before + 2).then_some(())
    })
    .ok_or_else(|| anyhow!("C stopped refreshing: {:?}", fleet.c_fleet_info().ok()))?;
    let blended_limits = fleet.c_limits_with(from_prometheus.count, 1)?;
    assert_eq!(blended_limits["source"], "history", "{blended_limits}");

    // mkdir-to-limits of C's `small` (local history: its limits do not depend on the fleet).
    const N: usize = 20;
    let gap = Duration::from_millis(150);
    let up = mkdir_to_limits(&fleet.c, "small", "up", N, gap)?;

    // Prometheus stopped: connections refused. Said within one refresh and one fetch timeout.
    let mut fleet = fleet;
    fleet.prometheus = None;
    let failing = wait_for(Duration::from_secs(REFRESH_S + TIMEOUT_S), || {
        let i = fleet.c_fleet_info().ok()?;
        (i["state"] == "failing").then_some(i)
    })
    .ok_or_else(|| {
        anyhow!(
            "C did not say its fetches fail: {:?}",
            fleet.c_fleet_info().ok()
        )
    })?;
    let reason = failing["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused") && reason.contains(&fleet.listen.to_string()),
        "{failing}"
    );
    assert_eq!(failing["in_use"], true, "a young view is kept: {failing}");
    let refused = mkdir_to_limits(&fleet.c, "small", "refused", N, gap)?;

    // The view dropped max_age_s after the last successful fetch: local history alone.
    let expired = wait_for(Duration::from_secs(MAX_AGE_S + TIMEOUT_S), || {
        let i = fleet.c_fleet_info().ok()?;
        (i["state"] == "expired").then_some(i)
    })
    .ok_or_else(|| anyhow!("C kept its fleet view: {:?}", fleet.c_fleet_info().ok()))?;
    assert_eq!(
        (&expired["in_use"], &expired["functions"]),
        (&Value::Bool(false), &Value::from(0)),
        "{expired}"
    );
    let local = fleet.c_limits_with(0.0, 1)?;
    assert_eq!(local["source"], "history", "{local}");
    let record = fleet
        .c
        .agent
        .instances(F)?
        .into_iter()
        .find(|r| !r["ended_at_ms"].is_null())
        .ok_or_else(|| anyhow!("C's own {F} not recorded"))?;
    let sample = Sample {
        at_ms: u64_of(&record, "ended_at_ms"),
        peak_bytes: own[0],
        oom_killed: false,
        limit_bytes: None,
    };
    let want = blended(&config, &[sample], None, u64_of(&local, "computed_at_ms"));
    let h = &fleet.c.root.hierarchy;
    let dir = fleet.c.instance_dir(F, "after")?;
    let got = wait_for(Duration::from_secs(5), || {
        Some((h.max_limit(&dir)?, h.high_limit(&dir)?))
    })
    .ok_or_else(|| {
        anyhow!(
            "no limits at mkdir of C's {F} after:\n{}",
            fleet.c.agent.log()
        )
    })?;
    println!(
        "{F} on C: fleet only {}, fleet and local {}, local alone {} (bytes)",
        fleet_limits["max_bytes"], blended_limits["max_bytes"], got.0
    );
    assert_eq!(
        got, want,
        "C's {F} after the fleet view expired against its local history alone"
    );
    for other in [&fleet_limits, &blended_limits] {
        assert_ne!(
            Some(got.0),
            other["max_bytes"].as_u64(),
            "the test needs local history alone to give other limits: {other}"
        );
    }
    fs::remove_dir(&dir)?;

    // A Prometheus that never answers: each fetch ends at the timeout, back to back.
    let silent = Silent::listen(fleet.listen)?;
    let timing_out = wait_for(Duration::from_secs(REFRESH_S + 2 * TIMEOUT_S), || {
        let i = fleet.c_fleet_info().ok()?;
        i["reason"].as_str()?.contains("timed out").then_some(i)
    })
    .ok_or_else(|| {
        anyhow!(
            "C's fetches from a silent Prometheus did not time out: {:?}",
            fleet.c_fleet_info().ok()
        )
    })?;
    assert_eq!(timing_out["state"], "expired", "{timing_out}");
    let before = silent.accepted();
    let hung = mkdir_to_limits(&fleet.c, "small", "hung", N, gap)?;
    let fetches = silent.accepted() - before;

    println!(
        "mkdir to limits, median (max) ms over {N}: Prometheus up {:.2} ({:.2}); stopped {:.2} ({:.2}), \
         ratio {:.2}; silent {:.2} ({:.2}), ratio {:.2}, {fetches} fetches begun meanwhile",
        median(&up), up[N - 1], median(&refused), refused[N - 1], median(&refused) / median(&up),
        median(&hung), hung[N - 1], median(&hung) / median(&up)
    );
    // The window spans more than a fetch timeout: fetches hung while the instances came.
    assert!(fetches >= 1, "no fetch began while {N} instances came");
    // A loop that waited on fetches would have held most of these for up to TIMEOUT_S.
    let bound = TIMEOUT_S as f64 * 1000.0 / 4.0;
    for (how, took) in [("up", &up), ("stopped", &refused), ("silent", &hung)] {
        assert!(
            took[N - 1] < bound,
            "Prometheus {how}: mkdir to limits up to {:.1} ms: {took:?}",
            took[N - 1]
        );
    }
    Ok(())
}
