//! Input-aware limits (`POST /v1/bind` with `input_bytes`, `[policy.sized]`): real processes
//! whose peak grows with their input run in a pooled cgroup that a real agent binds per
//! invocation; the limits then written at bind (read back from the cgroup's own files) and
//! answered by `GET .../limits?input_bytes=` are checked against the fit computed here from
//! the peaks those processes really reached.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use emars_agent::model::SizedSample;
use emars_agent::policy::sized::{self, SizedConfig};
use emars_tests::*;
use serde_json::{json, Value};

/// Every invocation allocates this much whatever its input ...
const BASE_MIB: u64 = 16;
/// ... plus its input (k = 1). Inputs grow so that each is within the fit's range of the
/// ones before it (and the percentile's limits of the first ones have room for it).
const TRAIN_INPUTS_MIB: [u64; 8] = [1, 2, 3, 4, 8, 16, 32, 64];

/// The training inputs jump to their peak at once and grow 64x over eight invocations: the
/// fallback before the fit must cover them, so the percentile is the older P95 x 1.15 (the
/// defaults' P50 leans on the burst guard, which a jump outruns on cgroup v1).
/// The fit needs each use's own peak: None (said loudly) on a kernel that cannot reset a
/// pooled cgroup's watermark (v2 before 6.12), where the agent fits nothing.
fn exact_per_use_peaks(agent: &Agent, test: &str) -> anyhow::Result<bool> {
    let info = agent.get_ok("/v1/info")?;
    let method = info["per_use_peak"].as_str().unwrap_or("");
    anyhow::ensure!(!method.is_empty(), "{info}");
    if method.starts_with("none") {
        skipped(test, &format!("exact per-use peaks: {method}"));
        return Ok(false);
    }
    Ok(true)
}

fn enforce_agent(root: &TestRoot) -> anyhow::Result<Agent> {
    Agent::start_configured(
        root,
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{dir}/export\"\n\
         [policy.defaults]\npercentile = 95.0\nmargin = 0.15\nlow_confidence_margin = 0.25\n",
    )
}

fn post(agent: &Agent, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    agent.post_raw(path, "application/json", body.to_string().as_bytes())
}

fn bind(agent: &Agent, slot: &Path, function: &str, instance: &str, input: u64) -> Value {
    let body = json!({"cgroup": slot.display().to_string(), "function": function,
        "instance": instance, "input_bytes": input});
    let (s, bound) = post(agent, "/v1/bind", &body).expect("bind");
    assert_eq!(s, 200, "{bound}\n{}", agent.log());
    assert_eq!(
        bound["input_bytes"], input,
        "the record keeps the hint: {bound}"
    );
    bound
}

/// Runs the workload for `input_mib` in the bound slot and releases it: the closed record.
fn run_and_release(agent: &Agent, slot: &Path, input_mib: u64) -> Value {
    let mut cmd = Command::new(alloc_bin());
    cmd.args([
        "--mib",
        &(BASE_MIB + input_mib).to_string(),
        "--hold-ms",
        "20",
    ]);
    let status = spawn_in(slot, cmd).expect("spawn").wait().expect("wait");
    assert!(status.success(), "workload of {input_mib} MiB: {status}");
    let (s, ended) = post(
        agent,
        "/v1/release",
        &json!({"cgroup": slot.display().to_string()}),
    )
    .expect("release");
    assert_eq!(s, 200, "{ended}");
    ended
}

/// Binds and runs one invocation per training input.
fn train(agent: &Agent, slot: &Path, function: &str) {
    for (n, mib) in TRAIN_INPUTS_MIB.iter().enumerate() {
        bind(agent, slot, function, &format!("train-{n}"), mib * MIB);
        let ended = run_and_release(agent, slot, *mib);
        assert_eq!(ended["oom_kills"], 0, "training killed: {ended}");
    }
}

/// The fit as the agent should have it: from the ended, hinted records the agent answers
/// (peaks the kernel measured for the test's processes), with the default settings.
fn expected_fit(agent: &Agent, function: &str, samples_now: usize) -> sized::SizedFit {
    let samples: Vec<SizedSample> = agent
        .instances(function)
        .expect("instances")
        .iter()
        .filter(|r| r["ended_at_ms"].is_u64() && r["input_bytes"].is_u64())
        .map(|r| SizedSample {
            at_ms: u64_of(r, "ended_at_ms"),
            input_bytes: u64_of(r, "input_bytes"),
            peak_bytes: u64_of(r, "peak_bytes"),
            oom_killed: u64_of(r, "oom_kills") > 0,
            limit_bytes: r["limits"]["max_bytes"].as_u64(),
        })
        .collect();
    assert_eq!(samples.len(), samples_now, "{samples:?}");
    sized::fit(&samples, &SizedConfig::default()).expect("the training gives a fit")
}

/// (memory.max, memory.high) the fit gives for `input`, bounded as the agent bounds it.
fn expected_limits(fit: &sized::SizedFit, input: u64) -> (u64, u64) {
    let config = emars_agent::config::Config::default();
    let params = emars_agent::policy::params_of(&config.policy.defaults);
    let predicted = fit
        .predict(input, SizedConfig::default().extrapolation)
        .expect("within the fit's range");
    let e = sized::bounded(predicted, &params, 0);
    (e.max_bytes, e.high_bytes)
}

/// Makes the agent recompute now (the tick does it within a second; this is a positive
/// signal instead of a wait).
fn recompute(agent: &Agent, function: &str) {
    agent
        .get_ok(&format!("/v1/functions/{function}/recommendation"))
        .expect("recommendation");
}

/// A fresh agent with `function` trained on a pooled cgroup (the root kept alive by the
/// caller); None, said, without root or exact per-use peaks.
fn trained(test: &str, function: &str) -> anyhow::Result<Option<(TestRoot, Agent, PathBuf)>> {
    if !require_root(test) {
        return Ok(None);
    }
    let root = TestRoot::new()?;
    let agent = enforce_agent(&root)?;
    if !exact_per_use_peaks(&agent, test)? {
        return Ok(None);
    }
    let slot = root.dir.join("cg-1");
    fs::create_dir(&slot)?;
    train(&agent, &slot, function);
    recompute(&agent, function);
    Ok(Some((root, agent, slot)))
}

/// Limits at bind for hints of 1 MiB and 64 MiB are what the fit of the processes' real peaks
/// says, in the cgroup's files and in `GET .../limits?input_bytes=`.
#[test]
fn limits_at_bind_follow_the_fit_of_peak_against_input() -> anyhow::Result<()> {
    let Some((root, agent, slot)) = trained(
        "limits_at_bind_follow_the_fit_of_peak_against_input",
        "resize",
    )?
    else {
        return Ok(());
    };
    let mut written = Vec::new();
    for (instance, mib) in [("small", 1u64), ("large", 64)] {
        let input = mib * MIB;
        let fit = expected_fit(&agent, "resize", TRAIN_INPUTS_MIB.len() + written.len());
        let (max, high) = expected_limits(&fit, input);
        let answer = agent.get_ok(&format!("/v1/functions/resize/limits?input_bytes={input}"))?;
        assert_eq!(answer["source"], "input_fit", "{answer} {fit:?}");
        assert_eq!(answer["input_bytes"], input, "{answer}");
        assert_eq!(
            (u64_of(&answer, "max_bytes"), u64_of(&answer, "high_bytes")),
            (max, high),
            "{answer} against {fit:?}"
        );
        bind(&agent, &slot, "resize", instance, input);
        assert_eq!(
            root.hierarchy.max_limit(&slot),
            Some(max),
            "{instance}: memory.max at bind, against {fit:?}\n{}",
            agent.log()
        );
        assert_eq!(root.hierarchy.high_limit(&slot), Some(high), "{instance}");
        let ended = run_and_release(&agent, &slot, mib);
        // The limit covered the peak it was predicted for, and by at most 15 % (a check of
        // the fit's own, not of the agent against this file's copy of it).
        let peak = u64_of(&ended, "peak_bytes");
        assert!(peak <= max, "{ended} over {max}");
        assert!(
            max as f64 <= 1.15 * peak as f64,
            "{max} for a peak of {peak}"
        );
        written.push(max);
        recompute(&agent, "resize");
        // The audit says where the limits came from.
        let audit = agent.get_ok("/v1/audit?limit=100")?;
        let from_fit = audit["audit"].as_array().map(|a| {
            a.iter()
                .filter(|r| r["instance"] == instance && r["reason"] == "input_fit")
                .count()
        });
        assert_eq!(from_fit, Some(1), "{audit}");
    }
    // 63 MiB more input: the fit's slope (1 MiB per MiB) times 63 MiB, with its margin.
    let grown = written[1] - written[0];
    assert!(
        (60 * MIB..70 * MIB).contains(&grown),
        "1 MiB -> {} MiB, 64 MiB -> {} MiB",
        written[0] / MIB,
        written[1] / MIB
    );
    Ok(())
}

/// A hint far outside the inputs seen (1 GiB, 16x the largest) is covered by the fallback:
/// the function's percentile recommendation, in the cgroup and in the answer, which says so.
#[test]
fn an_input_never_seen_gets_the_percentile_fallback() -> anyhow::Result<()> {
    let Some((root, agent, slot)) =
        trained("an_input_never_seen_gets_the_percentile_fallback", "parse")?
    else {
        return Ok(());
    };
    let input = 1 << 30;
    let fit = expected_fit(&agent, "parse", TRAIN_INPUTS_MIB.len());
    assert!(fit
        .predict(input, SizedConfig::default().extrapolation)
        .is_err());
    let percentile = agent.get_ok("/v1/functions/parse/limits")?;
    assert_eq!(percentile["source"], "history", "{percentile}");
    let answer = agent.get_ok(&format!("/v1/functions/parse/limits?input_bytes={input}"))?;
    assert_eq!(answer["source"], "fallback", "{answer}");
    assert_eq!(answer["fallback"], "extrapolation", "{answer}");
    assert_eq!(answer["max_bytes"], percentile["max_bytes"], "{answer}");
    assert_eq!(answer["high_bytes"], percentile["high_bytes"], "{answer}");
    bind(&agent, &slot, "parse", "huge", input);
    assert_eq!(
        root.hierarchy.max_limit(&slot),
        percentile["max_bytes"].as_u64(),
        "memory.max at bind\n{}",
        agent.log()
    );
    // Within the range again: the fit, not the percentile.
    let within = agent.get_ok(&format!(
        "/v1/functions/parse/limits?input_bytes={}",
        8 * MIB
    ))?;
    assert_eq!(within["source"], "input_fit", "{within}");
    assert!(
        u64_of(&within, "max_bytes") < u64_of(&percentile, "max_bytes"),
        "{within} {percentile}"
    );
    Ok(())
}

/// A bad `input_bytes` is refused naming it, in the bind's body and in the limits' query.
#[test]
fn bad_input_sizes_are_refused() -> anyhow::Result<()> {
    if !require_root("bad_input_sizes_are_refused") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = enforce_agent(&root)?;
    let slot = root.dir.join("cg-1");
    fs::create_dir(&slot)?;
    let cgroup = slot.display().to_string();
    for bad in [
        json!(-1),
        json!("12"),
        json!(1.5),
        json!([1]),
        json!(1e30),
        json!(9_223_372_036_854_775_808_u64),
    ] {
        let body = json!({"cgroup": cgroup, "function": "f", "instance": "i", "input_bytes": bad});
        let (s, e) = post(&agent, "/v1/bind", &body)?;
        assert_eq!(s, 400, "{bad}: {e}");
        assert!(
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("input_bytes")),
            "{bad}: {e}"
        );
    }
    // Nothing was bound by those.
    assert_eq!(agent.instances("f")?.len(), 0);
    // Train one sample so the function has limits to answer with.
    bind(&agent, &slot, "f", "ok", 3 * MIB);
    run_and_release(&agent, &slot, 3);
    recompute(&agent, "f");
    for query in [
        "input_bytes=abc",
        "input_bytes=-5",
        "input_bytes=1&input_bytes=2",
        "input_bytes=9223372036854775808",
        "input=5",
    ] {
        let (s, e) = agent.get(&format!("/v1/functions/f/limits?{query}"))?;
        assert_eq!(s, 400, "{query}: {e}");
    }
    let few = agent.get_ok(&format!("/v1/functions/f/limits?input_bytes={}", MIB))?;
    assert_eq!(few["source"], "fallback", "{few}");
    assert_eq!(few["fallback"], "few_samples", "{few}");
    Ok(())
}

/// The reference platform's sized run on a small trace: after 5 invocations every limit is
/// within 15 % above its invocation's peak, nothing is killed, and the fit holds less
/// memory-time than the percentile on the same invocations.
#[test]
fn the_sized_workload_meets_its_targets_on_a_small_trace() -> anyhow::Result<()> {
    if !require_root("the_sized_workload_meets_its_targets_on_a_small_trace") {
        return Ok(());
    }
    {
        let root = TestRoot::new()?;
        let agent = enforce_agent(&root)?;
        if !exact_per_use_peaks(
            &agent,
            "the_sized_workload_meets_its_targets_on_a_small_trace",
        )? {
            return Ok(());
        }
    }
    let o = emars_tests::sized::SizedOpts {
        invocations: 14,
        hold_ms: 20,
        ..Default::default()
    };
    let run = emars_tests::sized::run(&o)?;
    emars_tests::sized::print(&o, &run);
    let fit = emars_tests::sized::Summary::of(&run.fit, o.learn);
    let pct = emars_tests::sized::Summary::of(&run.percentile, o.learn);
    assert_eq!(fit.counted, o.invocations - o.learn, "{fit:?}");
    assert_eq!(fit.within_15, fit.counted, "{fit:?}");
    let killed = run.fit.iter().chain(&run.percentile).filter(|o| o.killed);
    assert_eq!(killed.count(), 0, "{run:?}");
    assert!(
        fit.memory_mib_s < pct.memory_mib_s,
        "{fit:?} against {pct:?}"
    );
    Ok(())
}
