//! State keyed by names tenants choose stays bounded (issue 19, item 7): a real agent, real
//! sled on disk, real HTTP, real cgroups and processes.
//!
//! - Past `store.max_functions`, new names are refused, through the API (507) and from
//!   cgroups (not tracked), counted exactly in GET /v1/info and /metrics; /metrics stays within
//!   a size the cap sets, the agent's memory does not grow with the names it refused, and
//!   admission answers are counted per function for at most that many names.
//! - Interned strings (function names, per-pod parent paths) go with retention: a store with
//!   old history, opened by the agent, prunes them, and the store read back with the library
//!   holds only what retained records name.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use emars_agent::{
    model::{InstanceRecord, Limits, PeakSource},
    store::Store,
};
use emars_tests::{names::*, *};
use serde_json::{json, Value};

/// The cap of the test (the default is 10,000; `emars-bench-api --names` measures that one).
const CAP: usize = 200;
/// Names reported first: they fill the cap and are refused past it.
const FIRST: usize = 10 * CAP;
/// Names reported once the cap is full: all refused, while the agent's memory is watched
/// (divided by `EMARS_TEST_TIME_SCALE` in the emulated VMs; without the cap each costs the
/// agent ~3 KB, so the host's 20,000 leave no doubt).
const MORE: usize = 20_000;
/// What /metrics writes per function: the peak histogram's 83 buckets, +Inf, sum and count,
/// five summary gauges and the two recommended limits (docs/metrics.md).
const LINES_PER_FUNCTION: usize = 83 + 3 + 5 + 2;
/// The longest of those lines without the function's name:
/// `emars_instance_peak_bytes_bucket{le="68719476736.0",function=""} ` and a 20-digit value.
const LINE_BYTES: usize = 64 + 20 + 2;
/// What /metrics writes whatever the functions: HELP and TYPE lines, the agent's counters, two
/// per eBPF program (at most a few dozen).
const FIXED_BYTES: usize = 32 << 10;
/// How much the agent's RSS may move while it refuses `MORE` names: allocator noise and the
/// HTTP connections, not a per-name cost (known functions cost ~1 KB and more each).
const RSS_SLACK: u64 = 6 << 20;

fn post(agent: &Agent, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    agent.post_raw(path, "application/json", body.to_string().as_bytes())
}

fn refused(agent: &Agent) -> anyhow::Result<u64> {
    Ok(u64_of(
        &agent.get_ok("/v1/info")?["function_cap"],
        "refused",
    ))
}

/// Waits until the agent counts `n` refusals in all.
fn wait_refused(agent: &Agent, n: u64) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(10), || {
        (refused(agent).ok()? == n).then_some(())
    })
    .ok_or_else(|| {
        anyhow::anyhow!(
            "refusals did not reach {n} (now {:?})\n{}",
            refused(agent).ok(),
            agent.log()
        )
    })
}

fn known_functions(agent: &Agent) -> anyhow::Result<Vec<String>> {
    let list = agent.get_ok("/v1/functions")?;
    Ok(list["functions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(5), || fs::remove_dir(dir).ok())
        .ok_or_else(|| anyhow::anyhow!("cannot remove {}", dir.display()))
}

/// Thousands of new names through the API and new functions' containers, past a cap of 200:
/// exactly the cap's worth are known (and the function the config names, past it), every
/// other name is refused and counted exactly; containers of refused functions are not tracked;
/// known functions go on; /metrics stays within what the cap allows and the agent's memory
/// does not grow with refused names.
#[test]
fn names_past_max_functions_are_refused_and_counted() -> anyhow::Result<()> {
    const TEST: &str = "names_past_max_functions_are_refused_and_counted";
    if !require_root(TEST) {
        return Ok(());
    }
    let test_start = Instant::now();
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "[store]\nmax_functions = {CAP}\n\n[policy]\nmode = \"enforce\"\n\
             export_dir = \"{{dir}}/export\"\n[[policy.functions]]\nname = \"pinned\"\n\
             pin_max_bytes = 268435456\n"
        ),
    )?;
    // The config's cap, nothing refused yet.
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(
        info["function_cap"],
        json!({"max_functions": CAP, "refused": 0}),
        "{info}"
    );

    // A function from a real container first, then names through the API until well past.
    let a1 = root.instance_dir("cg-a", "i1")?;
    assert!(run_alloc(&a1, 8, 0, 1)?.success());
    agent.wait_live("cg-a", "i1")?;
    let first = names("t", FIRST);
    let answers = report_names(&agent, &first, 4)?;
    assert_eq!(
        answers,
        Answers {
            counted: (CAP - 1) as u64,
            refused: (FIRST - CAP + 1) as u64
        }
    );
    let mut expected_refused = answers.refused;
    assert_eq!(refused(&agent)?, expected_refused);
    let known = known_functions(&agent)?;
    assert_eq!(known.len(), CAP, "{:?}", &known[..5]);
    // Known names are still counted (the same 200 again).
    let again: Vec<String> = known.iter().filter(|n| *n != "cg-a").cloned().collect();
    let answers = report_names(&agent, &again, 4)?;
    assert_eq!((answers.counted, answers.refused), ((CAP - 1) as u64, 0));

    // The agent's memory with the cap full, then while it refuses many more names.
    let (_, _) = scrape(&agent)?;
    let rss_full = rss_bytes(agent.pid())?;
    let parts_full = rss_parts(agent.pid())?;
    let more = MORE / time_scale() as usize;
    let start = Instant::now();
    let answers = report_names(&agent, &names("u", more), 4)?;
    let took = start.elapsed();
    assert_eq!(
        answers,
        Answers {
            counted: 0,
            refused: more as u64
        }
    );
    expected_refused += more as u64;
    let (_, _) = scrape(&agent)?;
    let rss_after = rss_bytes(agent.pid())?;
    let parts_after = rss_parts(agent.pid())?;
    println!("agent RSS (anon, file, shmem): {parts_full:?} then {parts_after:?}");
    println!(
        "agent RSS with {CAP} functions: {:.1} MiB; after refusing {more} more names ({:.0}/s): \
         {:.1} MiB",
        rss_full as f64 / MIB as f64,
        more as f64 / took.as_secs_f64(),
        rss_after as f64 / MIB as f64
    );
    assert!(
        rss_after <= rss_full + RSS_SLACK,
        "RSS grew from {rss_full} to {rss_after} refusing names"
    );

    // New functions' containers past the cap: not tracked, counted; a known function's new
    // container and the configured function's are.
    let mut over = Vec::new();
    for f in ["cg-over1", "cg-over2"] {
        let dir = root.instance_dir(f, "i1")?;
        assert!(run_alloc(&dir, 8, 0, 1)?.success());
        over.push(dir);
    }
    expected_refused += 2;
    wait_refused(&agent, expected_refused)?;
    let a2 = root.instance_dir("cg-a", "i2")?;
    let pinned = root.instance_dir("pinned", "p1")?;
    let rec = agent.wait_live("pinned", "p1")?;
    assert_eq!(rec["limits"]["max_bytes"], 268435456_u64, "{rec}");
    assert_eq!(root.hierarchy.max_limit(&pinned), Some(268435456));
    assert!(run_alloc(&a2, 8, 0, 1)?.success());
    agent.wait_live("cg-a", "i2")?;
    // Their rmdirs first, then one of a known instance: once that one's end is recorded, the
    // refused ones' rmdirs were read (events are applied in order) and made nothing.
    for dir in over.iter().chain([&pinned]) {
        remove_cgroup(dir)?;
    }
    remove_cgroup(&a2)?;
    agent.wait_ended("cg-a", 1)?;
    for f in ["cg-over1", "cg-over2"] {
        let (s, body) = agent.get(&format!("/v1/functions/{f}"))?;
        assert_eq!(s, 404, "{f} is known: {body}");
    }

    // A bind under a new name: 507 naming the setting; under a known one it works.
    let slot = root.dir.join("cg-1");
    fs::create_dir(&slot)?;
    let slot_s = slot.display().to_string();
    let (s, e) = post(
        &agent,
        "/v1/bind",
        json!({"cgroup": slot_s, "function": "bind-new", "instance": "x"}),
    )?;
    assert_eq!(s, 507, "{e}");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("store.max_functions = {CAP}"))),
        "{e}"
    );
    expected_refused += 1;
    let (s, b) = post(
        &agent,
        "/v1/bind",
        json!({"cgroup": slot_s, "function": "cg-a", "instance": "x"}),
    )?;
    assert_eq!(s, 200, "{b}");
    let (s, r) = post(&agent, "/v1/release", json!({"cgroup": slot_s}))?;
    assert_eq!(s, 200, "{r}");

    // Admission answers are counted one by one for at most as many names as functions.
    for name in names("adm", CAP + 50) {
        let (s, a) = post(&agent, "/v1/admission", json!({ "function": name }))?;
        assert_eq!(s, 200, "{a}");
    }
    let counts = agent.get_ok("/v1/admission")?;
    let per_function = counts["functions"].as_object().map_or(0, |m| m.len());
    assert_eq!(per_function, CAP, "admission counts kept per function");
    let r = &agent.get_ok("/v1/info")?["reactive"];
    assert_eq!(
        u64_of(r, "admitted") + u64_of(r, "refused"),
        (CAP + 50) as u64
    );

    // What the agent says: exact counts in /v1/info and /metrics.
    let mut known = known_functions(&agent)?;
    assert_eq!(known.len(), CAP + 1, "the cap and the configured function");
    known.retain(|n| n != "pinned");
    assert!(known.iter().all(|n| n == "cg-a" || n.starts_with("t-")));
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(
        info["function_cap"],
        json!({"max_functions": CAP, "refused": expected_refused}),
        "{info}"
    );
    assert_eq!(u64_of(&info["model"], "functions"), (CAP + 1) as u64);
    let (text, took) = scrape(&agent)?;
    assert_eq!(
        series_value(&text, "emars_functions_refused_total"),
        Some(expected_refused),
    );
    assert_eq!(series_value(&text, "emars_max_functions"), Some(CAP as u64));
    assert_eq!(
        series_value(&text, "emars_functions"),
        Some((CAP + 1) as u64)
    );
    let labels = function_labels(&text);
    assert_eq!(labels.len(), CAP + 1, "function label values in /metrics");
    let longest = labels.iter().map(|l| l.len()).max().unwrap_or(0);
    let bound = (CAP + 1) * LINES_PER_FUNCTION * (LINE_BYTES + longest) + FIXED_BYTES;
    println!(
        "/metrics: {} bytes in {:.1} ms for {} functions (bound {bound}); {expected_refused} \
         names refused",
        text.len(),
        took.as_secs_f64() * 1e3,
        CAP + 1
    );
    assert!(text.len() <= bound, "/metrics is {} bytes", text.len());
    // Logged, but not once per refusal: the first, then at most once a minute.
    let log = agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("store.max_functions"))
        .collect();
    let minutes = test_start.elapsed().as_secs() / 60;
    assert!(
        warnings
            .first()
            .is_some_and(|l| l.contains("refused: the agent knows store.max_functions")),
        "{log}"
    );
    assert!(
        warnings.len() as u64 <= 1 + minutes + 1,
        "{} warnings in {minutes} min: {warnings:?}",
        warnings.len()
    );
    Ok(())
}

/// A record as the agent writes it, in a pod of its own.
fn pod_record(function: &str, pod: u64, started_at_ms: u64, ended_at_ms: u64) -> InstanceRecord {
    InstanceRecord {
        function: function.into(),
        instance: format!("c{pod}"),
        cgroup_id: 1_000_000 + pod,
        cgroup_path: format!("/sys/fs/cgroup/kubepods/pod-{function}-{pod}/c{pod}"),
        started_at_ms,
        ended_at_ms: Some(ended_at_ms),
        execs: 1,
        peak_bytes: 16 << 20,
        peak_source: PeakSource::KernelWatermark,
        oom_kills: 0,
        limits: Limits::default(),
        input_bytes: None,
        connections: 0,
        requests: 0,
    }
}

/// A store with 30-day-old history of one function in 300 pods and recent history of another:
/// the agent opened on it prunes the old records by retention (14 days) and with them the
/// function's name and every pod path; the store read back afterwards holds exactly the
/// strings the retained records name.
#[test]
fn interned_strings_are_pruned_with_retention() -> anyhow::Result<()> {
    const TEST: &str = "interned_strings_are_pruned_with_retention";
    if !require_root(TEST) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("store");
    let day = 86_400_000;
    let now = emars_agent::clock::now_ms();
    {
        let store = Store::open(&path)?;
        for pod in 0..300 {
            let start = now - 30 * day + pod;
            store.put_instance(&pod_record("gone", pod, start, start + 1_000))?;
        }
        for pod in 0..3 {
            let start = now - day + pod;
            store.put_instance(&pod_record("stays", pod, start, start + 1_000))?;
        }
        assert_eq!(store.footprint().strings, 2 + 303);
    }
    let agent = Agent::start_with(&root, &path, "[store]\nretention_days = 14\n", None)?;
    // The agent prunes on its first tick.
    let info = wait_for(Duration::from_secs(20), || {
        let info = agent.get_ok("/v1/info").ok()?;
        (u64_of(&info["model"], "strings") < 305).then_some(info)
    })
    .ok_or_else(|| anyhow::anyhow!("strings not pruned:\n{}", agent.log()))?;
    assert_eq!(u64_of(&info["model"], "strings"), 4, "{info}");
    assert_eq!(agent.get("/v1/functions/gone")?.0, 404);
    assert_eq!(agent.instances("stays")?.len(), 3);
    assert!(agent.stop()?.success());

    // The store as the library reads it: the survivors' strings, and records that read back.
    let store = Store::open(&path)?;
    assert_eq!(store.footprint().strings, 4);
    assert_eq!(store.corrupt_at_open(), 0);
    assert_eq!(store.function_names()?, ["stays"]);
    let paths: Vec<String> = store
        .instances("stays")?
        .into_iter()
        .map(|r| r.cgroup_path)
        .collect();
    assert_eq!(
        paths,
        (0..3)
            .map(|p| format!("/sys/fs/cgroup/kubepods/pod-stays-{p}/c{p}"))
            .collect::<Vec<_>>()
    );
    Ok(())
}
