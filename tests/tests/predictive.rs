//! Predictive mode end to end: recommendations from real instance peaks, limits written into
//! new instance cgroups in enforce mode, OOM bumps, pins, safety refusals, generated configs.

use std::{fs, path::Path, time::Duration};

use emars_tests::*;
use serde_json::Value;

/// The hard and soft limit files of a cgroup, as the kernel shows them (None = unlimited).
fn limits(h: &Hierarchy, dir: &Path) -> (Option<u64>, Option<u64>) {
    let (max, high) = h.limit_files();
    let read = |f: &str| {
        let s = fs::read_to_string(dir.join(f)).unwrap_or_default();
        s.trim().parse::<u64>().ok().filter(|v| *v < 1 << 62)
    };
    (read(max), read(high))
}

/// Where `start` has the agent export its generated configs.
fn export_dir(agent: &Agent) -> anyhow::Result<std::path::PathBuf> {
    Ok(agent
        .store
        .parent()
        .ok_or_else(|| anyhow::anyhow!("store has no parent"))?
        .join("export"))
}

fn start(root: &TestRoot, policy: &str) -> anyhow::Result<Agent> {
    Agent::start_configured(
        root,
        &format!("\n[policy]\nexport_dir = \"{{dir}}/export\"\n{policy}\n"),
    )
}

/// Runs `n` instances of `function` peaking at about `mib` MiB; returns their watermarks.
fn history(
    root: &TestRoot,
    agent: &Agent,
    function: &str,
    n: usize,
    mib: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut wms = Vec::new();
    for i in 0..n {
        let dir = root.instance_dir(function, &format!("h{i}"))?;
        run_alloc(&dir, mib, 0, 0)?;
        wms.push(root.hierarchy.watermark(&dir)?);
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(function, n)?;
    Ok(wms)
}

fn recommendation(agent: &Agent, function: &str) -> anyhow::Result<Value> {
    agent.get_ok(&format!("/v1/functions/{function}/recommendation"))
}

/// Instances peaking at ~80 MiB → memory.max within [peak, peak x 1.25], memory.high below it.
#[test]
fn recommendation_fits_known_peaks() -> anyhow::Result<()> {
    if !require_root("recommendation_fits_known_peaks") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    // 20 instances: full confidence, so no low-confidence widening of the margin.
    let wms = history(&root, &agent, "eighty", 20, 80)?;
    let peak = *wms.iter().max().unwrap_or(&0);
    let r = recommendation(&agent, "eighty")?;
    let max = u64_of(&r, "max_bytes");
    let high = u64_of(&r, "high_bytes");
    assert!(
        max >= peak && max as f64 <= peak as f64 * 1.25,
        "max {max} not in [{peak}, {peak} x 1.25]: {r}"
    );
    assert!(high < max, "high {high} below max {max}");
    assert_eq!(u64_of(&r, "samples"), 20);
    assert!(r["confidence"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(r["pinned"], false);
    // Unknown function: 404 with a clear error.
    let (s, b) = agent.get("/v1/functions/nobody/recommendation")?;
    assert_eq!(s, 404, "{b}");
    Ok(())
}

/// Enforce mode: a new instance of a known function gets its limits written at mkdir,
/// before anything runs in it; every write is in the audit log with old and new values.
#[test]
fn enforce_writes_limits_into_new_instances() -> anyhow::Result<()> {
    if !require_root("enforce_writes_limits_into_new_instances") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "mode = \"enforce\"")?;
    history(&root, &agent, "sized", 5, 24)?;
    let r = recommendation(&agent, "sized")?;
    let (want_max, want_high) = (u64_of(&r, "max_bytes"), u64_of(&r, "high_bytes"));

    let dir = root.instance_dir("sized", "new1")?;
    let got = wait_for(Duration::from_secs(2), || {
        let l = limits(&root.hierarchy, &dir);
        (l.0 == Some(want_max)).then_some(l)
    });
    let got = got.ok_or_else(|| {
        anyhow::anyhow!(
            "limits not written: {:?} (want {want_max}/{want_high})\n{}",
            limits(&root.hierarchy, &dir),
            agent.log()
        )
    })?;
    assert_eq!(got.1, Some(want_high));
    // The instance then runs under them.
    assert!(run_alloc(&dir, 16, 0, 0)?.success());
    fs::remove_dir(&dir)?;

    let audit = agent.get_ok("/v1/audit")?;
    let w = audit["audit"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["instance"] == "new1").cloned())
        .ok_or_else(|| anyhow::anyhow!("no audit record: {audit}"))?;
    assert_eq!(w["reason"], "new_instance");
    assert_eq!(w["outcome"], "ok");
    assert_eq!(w["new"]["max_bytes"], want_max);
    assert!(w["old"]["max_bytes"].is_null(), "was unlimited: {w}");
    assert!(w["delay_us"].as_u64().is_some());
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["enforcement"]["mode"], "enforce");
    // Instances of a function without history are left alone.
    let other = root.instance_dir("unknown_fn", "u1")?;
    // Once the agent knows u1 it has passed the point where it would have written limits.
    agent.wait_live("unknown_fn", "u1")?;
    assert_eq!(limits(&root.hierarchy, &other).0, None);
    Ok(())
}

/// A new instance that arrives right after its function's first instances ended (before the
/// agent's next periodic recompute) still gets limits: none is left unenforced.
#[test]
fn instance_right_after_history_gets_limits() -> anyhow::Result<()> {
    if !require_root("instance_right_after_history_gets_limits") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "mode = \"enforce\"")?;
    // No GET of the recommendation in between: that would compute it on the side.
    history(&root, &agent, "quick", 3, 12)?;
    let dir = root.instance_dir("quick", "next")?;
    let got = wait_for(Duration::from_secs(2), || limits(&root.hierarchy, &dir).0);
    assert!(
        got.is_some(),
        "no limits for an instance made right after the history:\n{}",
        agent.log()
    );
    Ok(())
}

/// Instances created while the agent starts (some before its scan, some after) all get their
/// function's limits, here pinned, so even the very first instance of the function has them.
#[test]
fn instances_made_during_start_up_get_limits() -> anyhow::Result<()> {
    if !require_root("instances_made_during_start_up_get_limits") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let maker = {
        let (stop, base) = (stop.clone(), root.function_dir("boot")?);
        std::thread::spawn(move || {
            let mut made = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && made.len() < 2000 {
                let d = base.join(format!("i{}", made.len()));
                if fs::create_dir(&d).is_ok() {
                    made.push(d);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            made
        })
    };
    let agent = start(
        &root,
        "mode = \"enforce\"\n[[policy.functions]]\nname = \"boot\"\npin_max_bytes = 209715200\npin_high_bytes = 104857600\n",
    )?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = maker
        .join()
        .map_err(|_| anyhow::anyhow!("maker thread panicked"))?;
    let started = u64_of(&agent.get_ok("/v1/info")?, "started_at_ms");
    let after: Vec<_> = made
        .iter()
        .filter(|d| {
            fs::metadata(d)
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.ctime() as u64) * 1000 + (m.ctime_nsec() as u64) / 1_000_000 > started
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        after.len() > 10,
        "{} of {} made after start-up",
        after.len(),
        made.len()
    );
    let missing = wait_for(Duration::from_secs(5), || {
        let m: Vec<_> = after
            .iter()
            .filter(|d| limits(&root.hierarchy, d).0 != Some(200 * MIB))
            .collect();
        m.is_empty().then_some(())
    });
    let left: Vec<_> = after
        .iter()
        .filter(|d| limits(&root.hierarchy, d).0 != Some(200 * MIB))
        .collect();
    assert!(
        missing.is_some(),
        "{} of {} instances made after start-up have no limits: {:?}",
        left.len(),
        after.len(),
        left.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// Observe mode (the default) writes nothing.
#[test]
fn observe_mode_writes_nothing() -> anyhow::Result<()> {
    if !require_root("observe_mode_writes_nothing") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    history(&root, &agent, "watched", 3, 8)?;
    let dir = root.instance_dir("watched", "n")?;
    // Wait for the agent to know the new instance: it has then passed the point where enforce
    // mode would have written its limits.
    agent.wait_live("watched", "n")?;
    assert_eq!(limits(&root.hierarchy, &dir), (None, None));
    // Nor do the explicit write commands, even with the token: 409, naming the setting.
    for (path, body) in [
        ("/v1/apply", &b"{}"[..]),
        (
            "/v1/functions/watched/instances/n/limits",
            br#"{"max_bytes": 536870912}"#,
        ),
    ] {
        let (s, b) = agent.post_raw(path, "application/json", body)?;
        assert_eq!(s, 409, "{path}: {b}");
        let msg = b["error"].as_str().unwrap_or("");
        assert!(msg.contains("policy.mode = \"enforce\""), "{msg}");
    }
    assert_eq!(limits(&root.hierarchy, &dir), (None, None));
    // Each refused write is in the audit (docs/config.md: refused ones are kept too), once,
    // saying why without repeating its outcome.
    let audit = agent.get_ok("/v1/audit")?;
    let mut records: Vec<(String, String, String, String)> = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            (s("reason"), s("instance"), s("outcome"), s("error"))
        })
        .collect();
    records.sort();
    assert_eq!(records.len(), 2, "{audit}");
    for ((reason, instance, outcome, error), want) in records.iter().zip(["api", "apply"]) {
        assert_eq!((reason.as_str(), instance.as_str()), (want, "n"), "{audit}");
        assert_eq!(outcome, "refused", "{audit}");
        assert!(error.contains("policy.mode = \"enforce\""), "{error}");
        assert!(!error.starts_with("refused"), "outcome repeated: {error}");
    }
    Ok(())
}

/// `apply` leaves an instance whose limits an operator set by hand (set-limit) as it is, and
/// says so; it writes the others.
#[test]
fn apply_keeps_limits_set_by_hand() -> anyhow::Result<()> {
    if !require_root("apply_keeps_limits_set_by_hand") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "mode = \"enforce\"")?;
    history(&root, &agent, "handy", 3, 8)?;
    let by_hand = root.instance_dir("handy", "manual")?;
    let other = root.instance_dir("handy", "auto")?;
    agent.wait_live("handy", "manual")?;
    agent.wait_live("handy", "auto")?;
    // Both got the recommendation at mkdir; the operator sets one by hand.
    let (s, b) = agent.post_raw(
        "/v1/functions/handy/instances/manual/limits",
        "application/json",
        br#"{"max_bytes": 268435456, "high_bytes": 201326592}"#,
    )?;
    assert_eq!(s, 200, "{b}");
    let (s, b) = agent.post_raw("/v1/apply", "application/json", b"{}")?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["kept"],
        serde_json::json!([{"function": "handy", "instance": "manual"}]),
        "{b}"
    );
    let written: Vec<&str> = b["writes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["instance"].as_str())
        .collect();
    assert_eq!(written, ["auto"], "{b}");
    assert_eq!(
        limits(&root.hierarchy, &by_hand),
        (Some(256 * MIB), Some(192 * MIB))
    );
    let auto = limits(&root.hierarchy, &other).0;
    assert!(
        auto.is_some_and(|m| m < 256 * MIB),
        "apply wrote the other: {auto:?}"
    );
    Ok(())
}

/// An OOM kill raises the recommendation at once (VPA's rule: max(+100 MiB, x1.2)): the very
/// next instance gets the bumped limit at mkdir, from the policy's cached recommendation (no
/// GET in between could have recomputed it).
#[test]
fn oom_bumps_recommendation_at_once() -> anyhow::Result<()> {
    if !require_root("oom_bumps_recommendation_at_once") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "mode = \"enforce\"")?;
    history(&root, &agent, "spiky", 6, 8)?;
    let before = u64_of(&recommendation(&agent, "spiky")?, "max_bytes");
    assert!(
        before < 64 * MIB,
        "8 MiB peaks give a small limit: {before}"
    );
    let dir = root.instance_dir("spiky", "boom")?;
    // The agent's own write at mkdir first, so that 32 MiB is the limit the kill meets (the
    // burst guard may raise it, never lower it).
    wait_for(Duration::from_secs(5), || {
        (limits(&root.hierarchy, &dir).0 == Some(before)).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("no limit written at mkdir:\n{}", agent.log()))?;
    root.hierarchy.set_limit(&dir, 32 * MIB)?;
    assert!(
        !run_alloc(&dir, 96, 0, 0)?.success(),
        "should be OOM-killed"
    );
    // The function summary reads the store only: it does not touch the recommendation.
    wait_for(Duration::from_secs(5), || {
        let f = agent.get_ok("/v1/functions/spiky").ok()?;
        (u64_of(&f, "oom_kills") >= 1).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("OOM not seen:\n{}", agent.log()))?;
    let next = root.instance_dir("spiky", "next")?;
    let written = wait_for(Duration::from_secs(5), || limits(&root.hierarchy, &next).0)
        .ok_or_else(|| anyhow::anyhow!("no limit written into the next instance"))?;
    assert!(
        written >= 32 * MIB + 100 * MIB,
        "the next instance got {written} (was {before}): the OOM did not bump at once"
    );
    let after = u64_of(&recommendation(&agent, "spiky")?, "max_bytes");
    assert_eq!(after, written, "GET agrees with what was written");
    fs::remove_dir(&dir)?;
    Ok(())
}

/// A user-pinned limit wins over the recommendation, and is what enforce mode writes.
#[test]
fn pinned_limit_wins() -> anyhow::Result<()> {
    if !require_root("pinned_limit_wins") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let policy = "mode = \"enforce\"\n[[policy.functions]]\nname = \"pinned\"\npin_max_bytes = 209715200\npin_high_bytes = 104857600\n";
    let agent = start(&root, policy)?;
    history(&root, &agent, "pinned", 3, 8)?;
    let r = recommendation(&agent, "pinned")?;
    assert_eq!(u64_of(&r, "max_bytes"), 200 * MIB, "{r}");
    assert_eq!(u64_of(&r, "high_bytes"), 100 * MIB);
    assert_eq!(r["pinned"], true);
    let dir = root.instance_dir("pinned", "p")?;
    let got = wait_for(Duration::from_secs(2), || {
        let l = limits(&root.hierarchy, &dir);
        (l.0 == Some(200 * MIB)).then_some(l)
    });
    assert!(got.is_some(), "{:?}", limits(&root.hierarchy, &dir));
    Ok(())
}

/// A request to set a limit below what the instance uses now is refused with a clear error and
/// changes nothing; a sane request is written; both are audited.
#[test]
fn limit_below_usage_is_refused() -> anyhow::Result<()> {
    if !require_root("limit_below_usage_is_refused") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "mode = \"enforce\"")?;
    let dir = root.instance_dir("busy", "b1")?;
    let mut child = spawn_alloc(&dir, 48, 60_000, 0)?;
    // The workload holds 48 MiB (read from the kernel, not the agent), and the agent knows
    // the instance.
    wait_for(Duration::from_secs(5), || {
        let known = !agent.instances("busy").ok()?.is_empty();
        (known && root.hierarchy.usage(&dir).ok()? >= 48 * MIB).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("instance not running with 48 MiB"))?;
    let path = "/v1/functions/busy/instances/b1/limits";
    let (s, b) = agent.post_raw(path, "application/json", br#"{"max_bytes": 16777216}"#)?;
    assert_eq!(s, 422, "{b}");
    let msg = b["error"].as_str().unwrap_or("");
    assert!(msg.contains("below the current usage"), "{msg}");
    let (s, b) = agent.post_raw(path, "application/json", br#"{"high_bytes": 1048576}"#)?;
    assert_eq!(
        s, 422,
        "memory.high below usage would throttle at once: {b}"
    );
    assert_eq!(limits(&root.hierarchy, &dir).0, None, "nothing written");
    let (s, b) = agent.post_raw(path, "application/json", br#"{"max_bytes": 134217728}"#)?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(limits(&root.hierarchy, &dir).0, Some(128 * MIB));
    let (s, _) = agent.post_raw(
        "/v1/functions/busy/instances/nope/limits",
        "application/json",
        br#"{"max_bytes": 134217728}"#,
    )?;
    assert_eq!(s, 404);
    let (s, _) = agent.post_raw(path, "application/json", br#"{"max_bytes": "lots"}"#)?;
    assert_eq!(s, 400);
    // The three writes asked for through the API (on cgroup v2 the burst guard, on by default
    // in enforce mode, then arms memory.high below the new max: a record of its own).
    let audit = agent.get_ok("/v1/audit")?;
    let outcomes: Vec<&str> = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["reason"] == "api")
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    assert_eq!(outcomes.len(), 3, "{audit}");
    assert!(outcomes.contains(&"ok"));
    assert!(outcomes.iter().any(|o| o.contains("refused")));
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// On demand, the generator keeps a generation per call and exports TOML and JSON files.
#[test]
fn generations_are_kept_and_exported() -> anyhow::Result<()> {
    if !require_root("generations_are_kept_and_exported") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    history(&root, &agent, "gen", 3, 12)?;
    agent.post_raw(
        "/v1/functions/gen/invocations",
        "application/json",
        br#"{"count": 30}"#,
    )?;
    // The first generation runs at start-up (no earlier one): make two more on demand.
    for _ in 0..2 {
        let (s, g) = agent.post_raw("/v1/recommendations/generate", "application/json", b"{}")?;
        assert_eq!(s, 200, "{g}");
    }
    let gens = agent.get_ok("/v1/generations?function=gen")?;
    let list = gens["generations"].as_array().cloned().unwrap_or_default();
    // The start-up one and the two above.
    assert_eq!(list.len(), 3, "{gens}");
    assert_eq!(list[0]["trigger"], "on_demand");
    assert_eq!(list[2]["trigger"], "period");
    let newest = &list[0]["functions"][0];
    assert_eq!(newest["function"], "gen");
    assert_eq!(newest["requests_per_hour"], 30);
    assert!(u64_of(newest, "memory_max_bytes") >= 12 * MIB);
    let export = export_dir(&agent)?;
    let json: Value = serde_json::from_str(&fs::read_to_string(export.join("emars-config.json"))?)?;
    assert_eq!(json["functions"][0]["function"], "gen");
    let toml = fs::read_to_string(export.join("emars-config.toml"))?;
    assert!(toml.contains("function = \"gen\""), "{toml}");
    Ok(())
}

/// GET /v1/functions/{name}/limits answers, from the live model, exactly what the agent writes
/// into a new instance at mkdir; GET .../keepalive answers from the idle times between the
/// function's uses: pre-warm at the bin of the shortest (5th percentile of 7), keep alive to
/// the end of the bin of the longest (99th), each with 10% margin; with too few uses, the
/// fixed window.
#[test]
fn limits_and_keepalive_answer_from_history() -> anyhow::Result<()> {
    if !require_root("limits_and_keepalive_answer_from_history") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    // Test-sized bins: 200 ms (scaled) x 50.
    let bin = 200 * u64::from(time_scale());
    let agent = start(
        &root,
        &format!(
            "mode = \"enforce\"\n[policy.keepalive]\nbin_ms = {bin}\nbins = 50\nmin_idle_times = 5\n"
        ),
    )?;
    let (s, _) = agent.get("/v1/functions/nobody/limits")?;
    assert_eq!(s, 404);
    let (s, _) = agent.get("/v1/functions/nobody/keepalive")?;
    assert_eq!(s, 404);
    let (s, _) = agent.get("/v1/functions/bad%20name/limits")?;
    assert_eq!(s, 400);
    // Eight uses one after another, about three bins apart.
    for i in 0..8 {
        let dir = root.instance_dir("regular", &format!("u{i}"))?;
        run_alloc(&dir, 16, 0, 0)?;
        fs::remove_dir(&dir)?;
        std::thread::sleep(Duration::from_millis(3 * bin + bin / 2));
    }
    let ended = agent.wait_ended("regular", 8)?;
    let mut uses: Vec<(u64, u64)> = ended
        .iter()
        .filter_map(|i| Some((i["started_at_ms"].as_u64()?, i["ended_at_ms"].as_u64()?)))
        .collect();
    uses.sort_unstable();
    assert_eq!(uses.len(), 8, "{ended:?}");
    let gaps: Vec<u64> = uses.windows(2).map(|w| w[1].0 - w[0].1).collect();
    let (shortest, longest) = (
        *gaps.iter().min().unwrap_or(&0),
        *gaps.iter().max().unwrap_or(&0),
    );
    let k = agent.get_ok("/v1/functions/regular/keepalive")?;
    assert_eq!(k["idle_times"], 7, "{k}");
    assert!(
        k["basis"]
            .as_str()
            .is_some_and(|b| b.starts_with("histogram")),
        "{k}"
    );
    let prewarm = (shortest / bin * bin) as f64 * 0.9;
    let until = ((longest / bin + 1) * bin) as f64 * 1.1;
    assert_eq!(
        k["prewarm_ms"].as_u64(),
        Some(prewarm as u64),
        "{k} gaps {gaps:?}"
    );
    assert_eq!(
        k["prewarm_ms"]
            .as_u64()
            .zip(k["keepalive_ms"].as_u64())
            .map(|(p, w)| p + w),
        Some(until as u64),
        "{k} gaps {gaps:?}"
    );
    // The same advice goes out with the generated config, for platforms that read files.
    let (s, g) = agent.post_raw("/v1/recommendations/generate", "application/json", b"{}")?;
    assert_eq!(s, 200, "{g}");
    let export = export_dir(&agent)?;
    let json: Value = serde_json::from_str(&fs::read_to_string(export.join("emars-config.json"))?)?;
    let line = json["functions"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["function"] == "regular"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("regular not exported: {json}"))?;
    assert_eq!(line["prewarm_ms"], k["prewarm_ms"], "{line}");
    assert_eq!(line["keepalive_ms"], k["keepalive_ms"], "{line}");
    // Two uses: one idle time, too few to judge; the fixed window (the default four hours).
    for i in 0..2 {
        let dir = root.instance_dir("rare", &format!("u{i}"))?;
        run_alloc(&dir, 8, 0, 0)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("rare", 2)?;
    let k = agent.get_ok("/v1/functions/rare/keepalive")?;
    assert_eq!(k["prewarm_ms"], 0, "{k}");
    assert_eq!(k["keepalive_ms"], 4 * 3_600_000, "{k}");
    assert!(
        k["basis"].as_str().is_some_and(|b| b.starts_with("fixed")),
        "{k}"
    );

    // Limits: what a new instance gets at mkdir, as the kernel shows it.
    let dir = root.instance_dir("regular", "new")?;
    let (max, high) = wait_for(Duration::from_secs(5), || {
        let (m, h) = limits(&root.hierarchy, &dir);
        Some((m?, h?))
    })
    .ok_or_else(|| anyhow::anyhow!("no limits at mkdir:\n{}", agent.log()))?;
    let l = agent.get_ok("/v1/functions/regular/limits")?;
    assert_eq!(l["max_bytes"].as_u64(), Some(max), "{l}");
    assert_eq!(l["high_bytes"].as_u64(), Some(high), "{l}");
    assert_eq!(l["source"], "history", "{l}");
    fs::remove_dir(&dir)?;
    Ok(())
}
