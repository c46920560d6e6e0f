//! Reactive mode against real cgroups, real eBPF, real processes and a real agent: the burst
//! guard raises the limits of an instance that outgrows its prediction before the OOM killer
//! acts (and only when it is on), and admission answers from the live recommendation.

use std::{fs, process::Command, time::Duration};

use emars_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn start(root: &TestRoot, reactive: &str) -> anyhow::Result<Agent> {
    Agent::start_configured(
        root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
             [[policy.functions]]\nname = \"giant\"\npin_max_bytes = 1099511627776\n\
             [reactive]\n{reactive}\n"
        ),
    )
}

/// Instances peaking at `mib` MiB, then one that grows to 1.5x the limit it was given, at 32
/// MiB/s. Returns (the limit written at mkdir, whether the grower finished, its cgroup).
fn burst(root: &TestRoot, agent: &Agent, mib: u64) -> anyhow::Result<(u64, bool)> {
    // Each history instance starts once the agent has the one before it ended, with its exact
    // peak: else (a slow guest) the next one may get a limit from a peak read half-way, and
    // burst (or, reactive off, be killed) itself.
    for i in 0..5 {
        let dir = root.instance_dir("bursty", &format!("h{i}"))?;
        run_alloc(&dir, mib, 0, 0)?;
        fs::remove_dir(&dir)?;
        agent.wait_ended("bursty", i + 1)?;
    }
    let dir = root.instance_dir("bursty", "grower")?;
    let max = wait_for(Duration::from_secs(5), || root.hierarchy.max_limit(&dir))
        .ok_or_else(|| anyhow::anyhow!("no limit written at mkdir:\n{}", agent.log()))?;
    let grow = max * 3 / 2 / MIB;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", &grow.to_string(), "--rate-mib-s", "32"]);
    let finished = spawn_in(&dir, cmd)?.wait()?.success();
    fs::remove_dir(&dir)?;
    Ok((max, finished))
}

/// The grower's record once the agent has it: not OOM-killed, its peak past the limit it was
/// given at mkdir.
fn rescued_grower(agent: &Agent, max_at_mkdir: u64) -> anyhow::Result<Value> {
    let ended = agent.wait_ended("bursty", 6)?;
    let grower = ended
        .iter()
        .find(|i| i["instance"] == "grower")
        .ok_or_else(|| anyhow::anyhow!("grower not recorded: {ended:?}"))?;
    let peak = grower["peak_bytes"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        peak > max_at_mkdir,
        "peak {peak} not past the first limit {max_at_mkdir}: {grower}"
    );
    anyhow::ensure!(grower["oom_kills"] == 0, "{grower}");
    Ok(grower.clone())
}

/// The same workload twice, reactive off then on: off, the grower is OOM-killed at the limit
/// it got at mkdir; on, the kernel's signal raises its limit in time, the raise is audited as
/// "burst", and the instance's recorded peak (past its first limit) teaches the function.
#[test]
fn burst_is_rescued_only_when_reactive_is_on() -> anyhow::Result<()> {
    if !require_root("burst_is_rescued_only_when_reactive_is_on") {
        return Ok(());
    }
    let off_root = TestRoot::new()?;
    let off = start(&off_root, "enabled = false")?;
    let (max_off, finished_off) = burst(&off_root, &off, 24)?;
    assert!(
        !finished_off,
        "reactive off: the grower should be OOM-killed at {max_off} bytes"
    );
    let info = off.get_ok("/v1/info")?;
    assert_eq!(info["reactive"]["enabled"], false);
    let audit = off.get_ok("/v1/audit")?;
    let reasons: Vec<&str> = audit["audit"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["reason"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        !reasons.contains(&"burst"),
        "reactive off wrote: {reasons:?}"
    );
    off.stop()?;
    drop(off_root);

    let root = TestRoot::new()?;
    let agent = start(&root, "enabled = true")?;
    let (max_on, finished_on) = burst(&root, &agent, 24)?;
    assert!(
        finished_on,
        "reactive on: the grower was killed at {max_on} bytes:\n{}",
        agent.log()
    );
    let grower = rescued_grower(&agent, max_on)?;
    let peak = grower["peak_bytes"].as_u64().unwrap_or(0);
    let raised = grower["limits"]["max_bytes"].as_u64().unwrap_or(0);
    assert!(raised > max_on, "record keeps the raised limit: {grower}");
    let audit = agent.get_ok("/v1/audit")?;
    let bursts: Vec<&Value> = audit["audit"]
        .as_array()
        .map(|a| a.iter().filter(|r| r["reason"] == "burst").collect())
        .unwrap_or_default();
    assert!(!bursts.is_empty(), "no burst in the audit: {audit}");
    for b in &bursts {
        assert_eq!(b["outcome"], "ok", "{b}");
        assert_eq!(b["instance"], "grower", "{b}");
        assert!(
            b["new"]["max_bytes"].as_u64() > b["old"]["max_bytes"].as_u64(),
            "{b}"
        );
    }
    // /v1/info's counters follow within a tick.
    let r = wait_for(Duration::from_secs(5), || {
        let info = agent.get_ok("/v1/info").ok()?;
        let r = info["reactive"].clone();
        (r["raises"].as_u64() == Some(bursts.len() as u64) && r["watched"] == 0).then_some(r)
    })
    .ok_or_else(|| anyhow::anyhow!("info: {}", agent.get_ok("/v1/info").unwrap_or_default()))?;
    assert_eq!(r["enabled"], true, "{r}");
    assert_eq!(r["denied"], 0, "{r}");
    let p99 = r["reaction_p99_us"].as_u64().unwrap_or(u64::MAX);
    println!(
        "burst: limit at mkdir {} MiB, peak {} MiB, {} raise(s), reaction p50 {} us, max {} us",
        max_on / MIB,
        peak / MIB,
        bursts.len(),
        r["reaction_p50_us"],
        r["reaction_max_us"]
    );
    assert!(
        p99 < 100_000 * u64::from(time_scale()),
        "reaction p99 {p99} us"
    );
    Ok(())
}

/// The defaults: a fresh agent in enforce mode with no `[reactive]` section has the burst
/// guard on, and an instance bursting past the limit predicted from its function's history is
/// rescued (its raises audited as "burst").
#[test]
fn the_guard_is_on_by_default_in_enforce_mode() -> anyhow::Result<()> {
    if !require_root("the_guard_is_on_by_default_in_enforce_mode") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{dir}/export\"\n",
    )?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["reactive"]["enabled"], true, "{}", info["reactive"]);
    let (max, finished) = burst(&root, &agent, 24)?;
    assert!(
        finished,
        "the grower was killed at its predicted {max} bytes:\n{}",
        agent.log()
    );
    rescued_grower(&agent, max)?;
    let audit = agent.get_ok("/v1/audit")?;
    let raises = audit["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["reason"] == "burst" && r["outcome"] == "ok")
                .count()
        })
        .unwrap_or(0);
    assert!(raises > 0, "no raise in the audit: {audit}");
    Ok(())
}

/// A new function's first instance, once the host knows three functions, gets the host's
/// prior at mkdir (P50 of their median peaks x 1.1; `GET .../limits` says "prior"), and
/// when it grows past 4x that (the ceiling a function with history would have) the guard
/// rescues it: a prior's raises are bounded by 4x the largest median on the host instead.
#[test]
fn a_new_function_starts_at_the_prior_and_is_rescued_past_it() -> anyhow::Result<()> {
    if !require_root("a_new_function_starts_at_the_prior_and_is_rescued_past_it") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    for (f, mib) in [("small", 16), ("mid", 24), ("large", 40)] {
        let dir = root.instance_dir(f, "h")?;
        run_alloc(&dir, mib, 0, 0)?;
        fs::remove_dir(&dir)?;
        agent.wait_ended(f, 1)?;
    }
    // The prior the agent should give, from its own medians of the three.
    let mut medians: Vec<u64> = ["small", "mid", "large"]
        .iter()
        .map(|f| {
            let r = agent.get_ok(&format!("/v1/functions/{f}/recommendation"))?;
            r["p50_bytes"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no p50 for {f}: {r}"))
        })
        .collect::<anyhow::Result<_>>()?;
    medians.sort_unstable();
    let largest = medians[2];
    let want = (medians[1] as f64 * 1.1).ceil() as u64;
    let want = want.div_ceil(4096) * 4096;
    let limits = wait_for(Duration::from_secs(5), || {
        let l = agent.get_ok("/v1/functions/newcomer/limits").ok()?;
        (l["max_bytes"].as_u64() == Some(want)).then_some(l)
    })
    .ok_or_else(|| {
        anyhow::anyhow!(
            "limits for a new function: {:?}, want {want}",
            agent.get_ok("/v1/functions/newcomer/limits")
        )
    })?;
    assert_eq!(limits["source"], "prior", "{limits}");
    let dir = root.instance_dir("newcomer", "first")?;
    let max = wait_for(Duration::from_secs(5), || root.hierarchy.max_limit(&dir))
        .ok_or_else(|| anyhow::anyhow!("no limit written at mkdir:\n{}", agent.log()))?;
    assert_eq!(max, want, "memory.max at mkdir is not the prior");
    // Half-way between the two ceilings.
    let grow = (4 * max + 4 * largest) / 2 / MIB;
    assert!(
        grow * MIB > 4 * max,
        "the test needs the largest median above the prior"
    );
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", &grow.to_string(), "--rate-mib-s", "32"]);
    let finished = spawn_in(&dir, cmd)?.wait()?.success();
    fs::remove_dir(&dir)?;
    assert!(
        finished,
        "grown to {grow} MiB from a prior of {max} bytes, killed:\n{}",
        agent.log()
    );
    let ended = agent.wait_ended("newcomer", 1)?;
    assert_eq!(ended[0]["oom_kills"], 0, "{}", ended[0]);
    assert!(
        ended[0]["limits"]["max_bytes"].as_u64().unwrap_or(0) > 4 * max,
        "raised past 4x the prior: {}",
        ended[0]
    );
    Ok(())
}

/// Limits written through the API (no history, so none at mkdir) are guarded as well: the
/// instance, given 32 MiB by hand, grows to 48 MiB and is rescued.
#[test]
fn limits_set_through_the_api_are_guarded_too() -> anyhow::Result<()> {
    if !require_root("limits_set_through_the_api_are_guarded_too") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "enabled = true")?;
    let dir = root.instance_dir("handset", "h")?;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", "48", "--rate-mib-s", "32", "--delay-ms"]);
    cmd.arg((2000 * time_scale()).to_string());
    let mut child = spawn_in(&dir, cmd)?;
    agent.wait_live("handset", "h")?;
    let (s, b) = agent.post_raw(
        "/v1/functions/handset/instances/h/limits",
        "application/json",
        br#"{"max_bytes": 33554432}"#,
    )?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(32 * MIB));
    let finished = child.wait()?.success();
    assert!(
        finished,
        "killed at the limit set by hand:\n{}",
        agent.log()
    );
    fs::remove_dir(&dir)?;
    let audit = agent.get_ok("/v1/audit")?;
    let bursts = audit["audit"]
        .as_array()
        .map(|a| a.iter().filter(|r| r["reason"] == "burst").count())
        .unwrap_or(0);
    assert!(bursts > 0, "{audit}");
    Ok(())
}

/// An agent on a store that outlives it (for restarts), with the reactive settings given.
fn start_on(root: &TestRoot, store: &std::path::Path, reactive: &str) -> anyhow::Result<Agent> {
    let dir = store.parent().unwrap_or(store).display().to_string();
    Agent::start_with(
        root,
        store,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{dir}/export\"\n[reactive]\n{reactive}\n"
        ),
        None,
    )
}

/// The audit records of `reason`, newest first.
fn audited(agent: &Agent, reason: &str) -> anyhow::Result<Vec<Value>> {
    let audit = agent.get_ok("/v1/audit")?;
    Ok(audit["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["reason"] == reason)
                .cloned()
                .collect()
        })
        .unwrap_or_default())
}

/// A function with no recommendation (first seen after the agent's first generation), given
/// 32 MiB through the API: the burst guard's ceiling is set once, at ceiling_factor (4) x 32
/// MiB, when it starts watching, and its own raises never move it. A grower heading for 4 GiB
/// is raised step by step to 128 MiB, refused there (audited once, with why) and OOM-killed at
/// that limit.
#[test]
fn the_burst_ceiling_is_kept_fixed_against_the_guards_own_raises() -> anyhow::Result<()> {
    const TEST: &str = "the_burst_ceiling_is_kept_fixed_against_the_guards_own_raises";
    if !require_root(TEST) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "enabled = true")?;
    // The generation at start-up is done: "unsized" gets no recommendation until its
    // instance ends or the next period.
    wait_for(Duration::from_secs(5), || {
        let g = agent.get_ok("/v1/generations").ok()?;
        (g["generations"].as_array()?.len() == 1).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("no generation at start-up:\n{}", agent.log()))?;
    let dir = root.instance_dir("unsized", "g")?;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", "4096", "--step-mib", "16", "--rate-mib-s", "32"]);
    cmd.args(["--delay-ms", &(2000 * time_scale()).to_string()]);
    let mut child = spawn_in(&dir, cmd)?;
    agent.wait_live("unsized", "g")?;
    let (s, b) = agent.get("/v1/functions/unsized/limits")?;
    assert_eq!(s, 404, "a recommendation: {b}");
    let (s, b) = agent.post_raw(
        "/v1/functions/unsized/instances/g/limits",
        "application/json",
        br#"{"max_bytes": 33554432}"#,
    )?;
    assert_eq!(s, 200, "{b}");
    let finished = child.wait()?.success();
    let ceiling = 128 * MIB;
    let limit = root.hierarchy.max_limit(&dir);
    fs::remove_dir(&dir)?;
    assert!(
        !finished,
        "the grower reached 4 GiB: raised past the ceiling to {limit:?}\n{}",
        agent.log()
    );
    assert_eq!(limit, Some(ceiling), "{}", agent.log());
    let ended = agent.wait_ended("unsized", 1)?;
    assert_eq!(ended[0]["oom_kills"], 1, "{}", ended[0]);
    assert_eq!(ended[0]["limits"]["max_bytes"], ceiling, "{}", ended[0]);
    let bursts = audited(&agent, "burst")?;
    let raises: Vec<u64> = bursts
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| r["new"]["max_bytes"].as_u64())
        .collect();
    println!("raises (newest first): {raises:?}");
    assert_eq!(raises.first(), Some(&ceiling), "{bursts:?}");
    assert!(raises.iter().all(|m| *m <= ceiling), "{bursts:?}");
    let refused: Vec<&Value> = bursts
        .iter()
        .filter(|r| r["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "said once: {bursts:?}");
    let why = refused[0]["error"].as_str().unwrap_or("");
    assert!(why.starts_with("at the ceiling 128 MiB"), "{}", refused[0]);
    assert_eq!(refused[0]["instance"], "g");
    let info = agent.get_ok("/v1/info")?;
    assert!(
        info["reactive"]["denied"].as_u64() >= Some(1),
        "{}",
        info["reactive"]
    );
    Ok(())
}

/// kill -9, a restart, then a burst in an instance that was live before: the restarted agent
/// watches it again (with the ceiling it kept) and rescues it.
#[test]
fn burst_watches_are_kept_across_a_kill_and_rescue_a_burst() -> anyhow::Result<()> {
    const TEST: &str = "burst_watches_are_kept_across_a_kill_and_rescue_a_burst";
    if !require_root(TEST) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let agent = start_on(&root, &store, "enabled = true")?;
    for i in 0..5 {
        let dir = root.instance_dir("bursty", &format!("h{i}"))?;
        run_alloc(&dir, 24, 0, 0)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("bursty", 5)?;
    let dir = root.instance_dir("bursty", "grower")?;
    let max = wait_for(Duration::from_secs(5), || root.hierarchy.max_limit(&dir))
        .ok_or_else(|| anyhow::anyhow!("no limit written at mkdir:\n{}", agent.log()))?;
    let watched = |agent: &Agent| {
        wait_for(Duration::from_secs(5), || {
            let info = agent.get_ok("/v1/info").ok()?;
            (info["reactive"]["watched"] == 1).then_some(())
        })
    };
    assert!(watched(&agent).is_some(), "{}", agent.log());
    agent.kill()?;

    let agent = start_on(&root, &store, "enabled = true")?;
    assert!(
        watched(&agent).is_some(),
        "the grower, live before the restart, is not watched:\n{}",
        agent.log()
    );
    let mut cmd = Command::new(alloc_bin());
    cmd.args([
        "--mib",
        &(max * 3 / 2 / MIB).to_string(),
        "--rate-mib-s",
        "32",
    ]);
    let finished = spawn_in(&dir, cmd)?.wait()?.success();
    fs::remove_dir(&dir)?;
    assert!(
        finished,
        "killed at {max} bytes after the restart:\n{}",
        agent.log()
    );
    let raises: Vec<Value> = audited(&agent, "burst")?
        .into_iter()
        .filter(|r| r["instance"] == "grower" && r["outcome"] == "ok")
        .collect();
    assert!(!raises.is_empty(), "no raise:\n{}", agent.log());
    assert!(raises
        .iter()
        .all(|r| r["new"]["max_bytes"].as_u64() > Some(max)));
    let grower = agent
        .wait_ended("bursty", 6)?
        .into_iter()
        .find(|i| i["instance"] == "grower")
        .ok_or_else(|| anyhow::anyhow!("grower not recorded"))?;
    assert_eq!(grower["oom_kills"], 0, "{grower}");
    assert!(grower["peak_bytes"].as_u64() > Some(max), "{grower}");
    Ok(())
}

/// Admission from the live recommendation: a function with history fits, one pinned at 1 TiB
/// does not, one never seen is admitted with no prediction; bad requests are 400 and a caller
/// without the token is refused.
#[test]
fn admission_admits_what_fits_and_refuses_what_does_not() -> anyhow::Result<()> {
    if !require_root("admission_admits_what_fits_and_refuses_what_does_not") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    for i in 0..3 {
        let dir = root.instance_dir("small", &format!("h{i}"))?;
        run_alloc(&dir, 8, 0, 0)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("small", 3)?;
    let asked = std::cell::Cell::new(0u64);
    let ask = |f: &str| {
        asked.set(asked.get() + 1);
        let body = format!(r#"{{"function":"{f}"}}"#);
        agent.post_raw("/v1/admission", "application/json", body.as_bytes())
    };
    // The recommendation of "small" is recomputed on the agent's next tick.
    let small = wait_for(Duration::from_secs(5), || {
        let (s, b) = ask("small").ok()?;
        (s == 200 && b["predicted_bytes"].is_u64()).then_some(b)
    })
    .ok_or_else(|| anyhow::anyhow!("no prediction for small:\n{}", agent.log()))?;
    assert_eq!(small["admit"], true, "{small}");
    let predicted = small["predicted_bytes"].as_u64().unwrap_or(0);
    assert!((8 * MIB..64 * MIB).contains(&predicted), "{small}");
    assert!(small["available_bytes"].as_u64().unwrap_or(0) > predicted);

    let (s, giant) = ask("giant")?;
    assert_eq!(s, 200);
    assert_eq!(giant["admit"], false, "{giant}");
    // Pinned at 1 TiB, capped by the recommender at the host's memory: more than is available.
    let giant_predicted = giant["predicted_bytes"].as_u64().unwrap_or(0);
    assert!(
        giant_predicted > giant["available_bytes"].as_u64().unwrap_or(u64::MAX),
        "{giant}"
    );
    assert!(
        giant["reason"].as_str().unwrap_or("").contains("exceeds"),
        "{giant}"
    );

    let (s, unknown) = ask("never-seen")?;
    assert_eq!(s, 200);
    assert_eq!(unknown["admit"], true);
    assert!(unknown["predicted_bytes"].is_null(), "{unknown}");

    let (s, b) = ask("bad name!")?;
    assert_eq!(s, 400, "{b}");
    let (s, b) = agent.post_raw("/v1/admission", "application/json", br#"{"fn":"x"}"#)?;
    assert_eq!(s, 400, "{b}");
    // Without the token (any local user): refused, and not counted.
    let (s, b) = agent.request(
        "POST",
        "/v1/admission",
        &[("Content-Type", "application/json")],
        br#"{"function":"small"}"#,
    )?;
    assert_eq!(s, 401, "{b}");
    // Every answered request counted: "small" (however often it was asked) and "never-seen"
    // admitted, "giant" refused; the two bad ones and the refused caller not at all. (Counted
    // as they are answered, not on the agent's tick.)
    let per_function = agent.get_ok("/v1/admission")?;
    assert_eq!(
        per_function["functions"]["giant"],
        serde_json::json!({"admitted": 0, "refused": 1}),
        "{per_function}"
    );
    assert_eq!(
        per_function["functions"]["small"]["admitted"].as_u64(),
        Some(asked.get() - 3),
        "{per_function}"
    );
    assert_eq!(
        per_function["functions"].as_object().map(|o| o.len()),
        Some(3)
    );
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["reactive"]["refused"], 1, "{}", info["reactive"]);
    assert_eq!(
        info["reactive"]["admitted"].as_u64(),
        Some(asked.get() - 2),
        "{}",
        info["reactive"]
    );
    Ok(())
}

/// Idle instances holding page cache, then a busy one growing into a limit on their common
/// parent: the kernel reclaims some of the idle cache for it either way. With the squeeze on,
/// the pressure signal makes the agent take back the rest from each idle instance (audited
/// "pressure", with the bytes) and hold it at its working set, and release the holds once
/// pressure is gone; with it off, the idle instances keep most of their cache.
#[test]
fn pressure_squeezes_idle_instances_then_releases() -> anyhow::Result<()> {
    const TEST: &str = "pressure_squeezes_idle_instances_then_releases";
    if !require_root(TEST) {
        return Ok(());
    }
    let disk = match disk_dir() {
        Ok(d) => d,
        Err(why) => {
            skipped(TEST, &format!("needs a disk-backed directory: {why}"));
            return Ok(());
        }
    };
    let settings = |squeeze: bool| {
        format!(
            "enabled = true\nsqueeze = {squeeze}\npressure_stall_ms = 5\npressure_window_ms = 500\n\
             pressure_level_v1 = \"low\"\nidle_after_s = 1\nrelease_after_s = {}\n{IDLER_POLICY}",
            3 * time_scale()
        )
    };
    // Squeeze off: what the kernel alone leaves the idle instances.
    let off_root = TestRoot::new()?;
    let off = start(&off_root, &settings(false))?;
    let (kept_off, _, children) = pressure(&off_root, &off, &disk, false)?;
    stop_cache_holders(&disk, children);
    let audit = off.get_ok("/v1/audit")?;
    assert!(
        !audit.to_string().contains("\"pressure\""),
        "squeeze off wrote: {audit}"
    );
    off.stop()?;
    drop(off_root);

    let root = TestRoot::new()?;
    let agent = start(&root, &settings(true))?;
    let (kept_on, holds, children) = pressure(&root, &agent, &disk, true)?;
    stop_cache_holders(&disk, children);
    println!("idle instances' usage after the busy one: squeeze off {kept_off:?} MiB, on {kept_on:?} MiB");
    for (off, on) in kept_off.iter().zip(&kept_on) {
        assert!(
            *off >= 20,
            "squeeze off: the kernel alone took nearly all: {kept_off:?}"
        );
        assert!(
            *on <= 16,
            "squeeze on: idle cache left: {kept_on:?}\n{}",
            agent.log()
        );
    }
    // Released once pressure is quiet: each hold back at what it was before the squeeze.
    // (Pressure may come and go more than once under emulation: every squeeze is released.)
    let r = wait_for(Duration::from_secs(15), || {
        let info = agent.get_ok("/v1/info").ok()?;
        let r = info["reactive"].clone();
        let squeezes = r["squeezes"].as_u64()?;
        (squeezes >= 3 && r["releases"].as_u64()? == squeezes && r["squeezed_now"] == 0)
            .then_some(r)
    })
    .ok_or_else(|| anyhow::anyhow!("holds not released:\n{}", agent.log()))?;
    for (dir, before) in &holds {
        assert_eq!(
            root.hierarchy.high_limit(dir),
            *before,
            "{} not put back:\n{}",
            dir.display(),
            agent.log()
        );
    }
    assert_eq!(r["squeeze"], true, "{r}");
    assert_eq!(r["squeeze_failed"], 0, "{r}");
    println!(
        "squeeze: {} pressure signals, {} MiB reclaimed, sources {}",
        r["pressure_signals"],
        r["reclaimed_bytes"].as_u64().unwrap_or(0) / MIB,
        r["pressure_sources"]
    );
    Ok(())
}

/// kill -9 while three idle instances are squeezed: each hold was kept with its instance in
/// the store before it was written, so the restarted agent takes the holds back and releases
/// them on its schedule (no pressure for release_after_s from its start): each memory.high
/// (v2) or soft limit (v1) back exactly at its value before the squeeze, audited "release".
#[test]
fn squeeze_holds_are_kept_across_a_kill_and_released_on_schedule() -> anyhow::Result<()> {
    const TEST: &str = "squeeze_holds_are_kept_across_a_kill_and_released_on_schedule";
    if !require_root(TEST) {
        return Ok(());
    }
    let disk = match disk_dir() {
        Ok(d) => d,
        Err(why) => {
            skipped(TEST, &format!("needs a disk-backed directory: {why}"));
            return Ok(());
        }
    };
    let settings = |release_after_s: u64| {
        format!(
            "enabled = true\nsqueeze = true\npressure_stall_ms = 5\npressure_window_ms = 500\n\
             pressure_level_v1 = \"low\"\nidle_after_s = 1\nrelease_after_s = {release_after_s}\n\
             {IDLER_POLICY}"
        )
    };
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    // The first agent would keep the holds for ten minutes.
    let agent = start_on(&root, &store, &settings(600))?;
    let (holds, children) = squeeze_three(&root, &agent, &disk)?;
    let written = audited(&agent, "pressure")?;
    let page = |v: Option<u64>| v.map(|v| v / 4096);
    for (dir, before) in &holds {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let hold = written
            .iter()
            .find(|r| r["instance"] == name && r["written"]["high_bytes"].is_u64())
            .and_then(|r| r["written"]["high_bytes"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("no hold written into {name}: {written:?}"))?;
        assert!(
            Some(hold) < *before,
            "{name}: hold {hold}, before {before:?}"
        );
        assert_eq!(
            page(root.hierarchy.high_limit(dir)),
            page(Some(hold)),
            "{name} at its hold when the agent is killed"
        );
    }
    agent.kill()?;

    let release_after_s = 3 * u64::from(time_scale());
    let agent = start_on(&root, &store, &settings(release_after_s))?;
    let started = u64_of(&agent.get_ok("/v1/info")?, "started_at_ms");
    // Each release audited with its outcome (the intent is on record before the write, the
    // outcome after it).
    let releases = wait_for(Duration::from_secs(20), || {
        let r = audited(&agent, "release").ok()?;
        let done = r.iter().all(|r| r["outcome"] != "pending");
        (r.len() == holds.len() && done).then_some(r)
    })
    .ok_or_else(|| anyhow::anyhow!("holds of the last run not released:\n{}", agent.log()))?;
    for (dir, before) in &holds {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(
            root.hierarchy.high_limit(dir),
            *before,
            "{name} not put back:\n{}",
            agent.log()
        );
        let r = releases
            .iter()
            .find(|r| r["instance"] == name)
            .ok_or_else(|| anyhow::anyhow!("no release of {name}: {releases:?}"))?;
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["new"]["high_bytes"].as_u64(), *before, "{r}");
        // On schedule: pressure quiet for release_after_s from the restarted agent's start.
        let at = u64_of(r, "at_ms");
        assert!(
            at >= started + release_after_s * 1000,
            "{name} released {} ms after the start",
            at.saturating_sub(started)
        );
    }
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(
        info["reactive"]["squeeze_failed"], 0,
        "{}",
        info["reactive"]
    );
    stop_cache_holders(&disk, children);
    Ok(())
}

/// Three idle instances of "idler" (8 MiB heap, 40 MiB of clean page cache, limits from
/// history), then "busy" (no history, no limits) grows 64 MiB into a limit on the root set 24
/// MiB above what is in use with the caches full. Returns each idle instance's usage (MiB) once the busy one
/// finished, each idle cgroup with its hold before the squeeze, and the idle processes (still
/// running: the caller stops them with [`stop_cache_holders`]).
/// The idle instances' limits leave room for their page cache: the older P95 x 1.15 (with
/// the defaults' P50 x 1.1 memory.high sits near their peak, and on cgroup v2 it reclaims the
/// cache the squeeze is meant to find).
const IDLER_POLICY: &str = "[[policy.functions]]\nname = \"idler\"\npercentile = 95.0\n\
                            margin = 0.15\nlow_confidence_margin = 0.25\n";

/// Three instances of "idler" with history (8 MiB heap, 40 MiB of clean page cache; their
/// limits from it), then three more that stay: each cgroup with the hold (memory.high, soft
/// limit) it got at mkdir, before any squeeze, and the processes.
#[allow(clippy::type_complexity)]
fn idle_instances(
    root: &TestRoot,
    agent: &Agent,
    disk: &std::path::Path,
) -> anyhow::Result<(
    Vec<(std::path::PathBuf, Option<u64>)>,
    Vec<std::process::Child>,
)> {
    let idle_cmd = |hold_ms: u64| cache_holder(disk, 8, 40, hold_ms);
    for i in 0..3 {
        let dir = root.instance_dir("idler", &format!("h{i}"))?;
        let ok = spawn_in(&dir, idle_cmd(0))?.wait()?.success();
        anyhow::ensure!(ok, "history instance h{i} failed");
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("idler", 3)?;
    let mut children = Vec::new();
    let mut holds = Vec::new();
    for i in 0..3 {
        let dir = root.instance_dir("idler", &format!("i{i}"))?;
        let high = wait_for(Duration::from_secs(5), || {
            root.hierarchy.max_limit(&dir)?;
            root.hierarchy.high_limit(&dir)
        })
        .ok_or_else(|| anyhow::anyhow!("no limits at mkdir:\n{}", agent.log()))?;
        holds.push((dir.clone(), Some(high)));
        children.push(spawn_in(&dir, idle_cmd(600_000))?);
    }
    Ok((holds, children))
}

/// The three idle instances of [`idle_instances`] squeezed and held at once: a busy instance
/// grows into a limit on their parent, as in [`pressure`] (a squeeze set off earlier by the
/// host's own reclaim, other work on the machine, does as well). Returns each idle cgroup with
/// its hold from before any squeeze, and the idle processes.
#[allow(clippy::type_complexity)]
fn squeeze_three(
    root: &TestRoot,
    agent: &Agent,
    disk: &std::path::Path,
) -> anyhow::Result<(
    Vec<(std::path::PathBuf, Option<u64>)>,
    Vec<std::process::Child>,
)> {
    let (holds, children) = idle_instances(root, agent, disk)?;
    for c in &children {
        let file = disk.join(format!("emars-alloc-{}.cache", c.id()));
        wait_for(Duration::from_secs(30), || {
            (fs::metadata(&file).ok()?.len() >= 40 * MIB).then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("{} not written", file.display()))?;
    }
    let info = |key: &str, n: u64| {
        wait_for(Duration::from_secs(20), || {
            let info = agent.get_ok("/v1/info").ok()?;
            (info["reactive"][key] == n).then_some(())
        })
    };
    info("idle_now", 3).ok_or_else(|| anyhow::anyhow!("not idle:\n{}", agent.log()))?;
    let in_use = root.hierarchy.usage(&root.dir)?;
    root.hierarchy.set_limit(&root.dir, in_use + 24 * MIB)?;
    let busy = root.instance_dir("busy", "b")?;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", "64", "--rate-mib-s", "32", "--hold-ms", "500"]);
    // Killed when the host's reclaim took the idle caches first: the pressure came all the same.
    spawn_in(&busy, cmd)?.wait()?;
    let held = info("squeezed_now", 3);
    root.hierarchy.clear_limit(&root.dir)?;
    fs::remove_dir(&busy)?;
    held.ok_or_else(|| anyhow::anyhow!("not all three held:\n{}", agent.log()))?;
    Ok((holds, children))
}

#[allow(clippy::type_complexity)]
fn pressure(
    root: &TestRoot,
    agent: &Agent,
    disk: &std::path::Path,
    squeeze: bool,
) -> anyhow::Result<(
    Vec<u64>,
    Vec<(std::path::PathBuf, Option<u64>)>,
    Vec<std::process::Child>,
)> {
    let (holds, children) = idle_instances(root, agent, disk)?;
    let idle: Vec<std::path::PathBuf> = holds.iter().map(|(d, _)| d.clone()).collect();
    for dir in &idle {
        // Writing and syncing 3 x 40 MiB takes seconds on a busy disk.
        wait_for(Duration::from_secs(30), || {
            (root.hierarchy.usage(dir).ok()? >= 46 * MIB).then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("{} did not fill its cache", dir.display()))?;
    }
    // What is in use with the caches full. Taken now: pressure from elsewhere on the host may
    // set off the squeeze before the busy instance starts (seen on 7.x under emulation), and a
    // limit 24 MiB above the squeezed use would leave the busy one no room at all.
    let in_use = root.hierarchy.usage(&root.dir)?;
    if squeeze {
        wait_for(Duration::from_secs(10), || {
            let info = agent.get_ok("/v1/info").ok()?;
            (info["reactive"]["idle_now"] == 3).then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("instances not idle:\n{}", agent.log()))?;
    }
    root.hierarchy.set_limit(&root.dir, in_use + 24 * MIB)?;
    let busy = root.instance_dir("busy", "b")?;
    let mut cmd = Command::new(alloc_bin());
    cmd.args(["--mib", "64", "--rate-mib-s", "32", "--hold-ms", "500"]);
    let finished = spawn_in(&busy, cmd)?.wait()?.success();
    if !finished {
        // Which cgroup ran out: the OOM counters and limits of the parent, the busy instance
        // and the idle ones.
        let mut why = String::new();
        for dir in std::iter::once(root.dir.clone())
            .chain(std::iter::once(busy.clone()))
            .chain(idle.iter().cloned())
        {
            let events = ["memory.events", "memory.oom_control"]
                .iter()
                .find_map(|f| fs::read_to_string(dir.join(f)).ok())
                .unwrap_or_default();
            why.push_str(&format!(
                "{}: usage {:?}, max {:?}, high {:?}\n{events}\n",
                dir.display(),
                root.hierarchy.usage(&dir).ok(),
                root.hierarchy.max_limit(&dir),
                root.hierarchy.high_limit(&dir),
            ));
        }
        panic!(
            "the busy instance was killed (squeeze {squeeze}, parent limit {} = use {in_use} + 24 MiB):\n{why}\n{}",
            in_use + 24 * MIB,
            agent.log()
        );
    }
    if squeeze {
        // Every idle instance reclaimed (under emulation pressure may come early, while
        // they fill their cache: then each is squeezed once it turns idle).
        let audit = wait_for(Duration::from_secs(10), || {
            let a = agent.get_ok("/v1/audit").ok()?;
            let squeezed: std::collections::BTreeSet<String> = a["audit"]
                .as_array()?
                .iter()
                .filter(|r| r["reason"] == "pressure" && r["reclaimed_bytes"].is_u64())
                .filter_map(|r| r["instance"].as_str().map(str::to_owned))
                .collect();
            (squeezed.len() == 3).then_some(a)
        })
        .ok_or_else(|| anyhow::anyhow!("not every idle instance squeezed:\n{}", agent.log()))?;
        for r in audit["audit"].as_array().into_iter().flatten() {
            if r["reason"] != "pressure" {
                continue;
            }
            assert_eq!(r["outcome"], "ok", "{r}");
            assert_eq!(r["function"], "idler", "{r}");
            assert!(r["signal"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
            if let Some(requested) = r["reclaim_requested_bytes"].as_u64() {
                // It asked for the page cache the instance held then (all 40 MiB once the
                // cache is full, less when pressure came while it filled) and got at least
                // half of it back; what the squeeze left is checked on usage below.
                let reclaimed = r["reclaimed_bytes"].as_u64().unwrap_or(0);
                assert!(reclaimed * 2 >= requested, "{r}");
            } else {
                // The hold: below the memory.high (soft limit) it had.
                assert!(
                    r["written"]["high_bytes"].as_u64() < r["old"]["high_bytes"].as_u64(),
                    "{r}"
                );
            }
        }
    }
    let kept = idle
        .iter()
        .map(|d| root.hierarchy.usage(d).map(|u| u / MIB))
        .collect::<anyhow::Result<Vec<_>>>()?;
    root.hierarchy.clear_limit(&root.dir)?;
    fs::remove_dir(&busy)?;
    Ok((kept, holds, children))
}
