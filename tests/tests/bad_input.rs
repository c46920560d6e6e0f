//! Bad input gets a clear error and loses nothing: bad configs, bad API requests, cgroups that
//! vanish while the agent reads them.

use std::{fs, process::Command, time::Duration};

use emars_tests::*;

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    fs::write(&p, text).expect("write config");
    let out = Command::new(agent_bin())
        .arg("check-config")
        .arg(&p)
        .output()
        .expect("run emars check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bad config is refused with an error that names the key and the value.
#[test]
fn bad_config_names_key_and_value() {
    let cases = [
        (
            "[store]\nretention_days = 0\n",
            &["store.retention_days", "0"][..],
        ),
        (
            "[[cgroup.roots]]\npath = \"/x\"\n[[cgroup.roots.rules]]\nregex = \"(unclosed\"\n",
            &["regex", "(unclosed"][..],
        ),
        (
            "[api]\nlisten = \"not-an-address\"\n",
            &["listen", "not-an-address"][..],
        ),
        ("[probes]\nbogus_key = 1\n", &["bogus_key"][..]),
        (
            "[[cgroup.roots]]\npath = \"/\"\n",
            &["cgroup.roots[0].path", "/"][..],
        ),
        // The mistakes an operator makes (issue 20): a filesystem path for a root names the
        // root it means; a fraction for a percentile names the percentile meant; the burst
        // guard in observe mode names the mode; pins off bpffs name the filesystem.
        (
            "[[cgroup.roots]]\npath = \"/sys/fs/cgroup/memory/emars-x\"\n",
            &[
                "cgroup.roots[0].path",
                "filesystem path",
                "write \"/emars-x\"",
            ][..],
        ),
        (
            "[policy.defaults]\npercentile = 0.95\n",
            &["policy.defaults.percentile", "0.95", "did you mean 95?"][..],
        ),
        (
            "[reactive]\nenabled = true\n",
            &["reactive.enabled", "policy.mode = \"enforce\""][..],
        ),
        (
            "[probes]\npin_path = \"/tmp/emars-pins\"\n",
            &[
                "probes.pin_path",
                "/tmp/emars-pins",
                "not on a BPF filesystem",
            ][..],
        ),
    ];
    for (text, needles) in cases {
        let (ok, err) = check_config(text);
        assert!(!ok, "config accepted:\n{text}");
        for n in needles {
            assert!(
                err.contains(n),
                "error for\n{text}\ndoes not name {n:?}: {err}"
            );
        }
    }
    let (ok, err) = check_config("[store]\nretention_days = 7\n");
    assert!(ok, "a good config is accepted: {err}");
}

/// The agent itself refuses to start on a bad config, with the same clear error.
#[test]
fn agent_refuses_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    fs::write(&p, "[store]\nretention_days = 99999\n").expect("write");
    let out = Command::new(agent_bin())
        .args(["agent", "--config"])
        .arg(&p)
        .output()
        .expect("run emars agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store.retention_days") && err.contains("99999"),
        "{err}"
    );
}

/// Bad API requests get 4xx with a JSON error; unknown functions 404; nothing is recorded.
#[test]
fn bad_api_requests() -> anyhow::Result<()> {
    if !require_root("bad_api_requests") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let (s, b) = agent.get("/v1/functions/nope")?;
    assert_eq!(s, 404, "{b}");
    assert!(
        b["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{b}"
    );
    let (s, _) = agent.get("/v1/functions/nope/instances")?;
    assert_eq!(s, 404);
    let (s, _) = agent.get("/v1/no-such-route")?;
    assert_eq!(s, 404);
    let inv = "/v1/functions/okfn/invocations";
    for (ct, body, want) in [
        ("application/json", &b"{not json"[..], 400),
        ("application/json", br#"{"count": 0}"#, 400),
        ("application/json", br#"{"count": -3}"#, 400),
        ("application/json", br#"{"count": "many"}"#, 400),
        ("application/json", br#"{}"#, 400),
        ("text/plain", br#"{"count": 1}"#, 415),
    ] {
        let (s, b) = agent.post_raw(inv, ct, body)?;
        assert_eq!(s, want, "{} → {b}", String::from_utf8_lossy(body));
        assert!(b["error"].is_string(), "JSON error body: {b}");
    }
    let long = "x".repeat(300);
    let (s, _) = agent.post_raw(
        &format!("/v1/functions/{long}/invocations"),
        "application/json",
        br#"{"count": 1}"#,
    )?;
    assert_eq!(s, 400);
    // Times outside the retention, or too far ahead of the agent's clock, name the field: a
    // well-formed body the agent refuses for its clock and retention (422, as documented).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for at in [now + 3_600_000, now - 15 * 86_400_000, 0] {
        let body = format!("{{\"count\": 1, \"at_ms\": {at}}}");
        let (s, b) = agent.post_raw(inv, "application/json", body.as_bytes())?;
        assert_eq!(s, 422, "{at}: {b}");
        assert!(
            b["error"].as_str().is_some_and(|e| e.contains("at_ms")),
            "{b}"
        );
    }
    // None of the bad requests created anything.
    let (s, _) = agent.get("/v1/functions/okfn")?;
    assert_eq!(s, 404);
    let (s, _) = agent.post_raw(inv, "application/json", br#"{"count": 5}"#)?;
    assert_eq!(s, 200);
    let f = agent.get_ok("/v1/functions/okfn")?;
    assert_eq!(f["invocations"], 5);
    let export = agent.get_ok("/v1/export")?;
    assert!(export["functions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["function"] == "okfn")));
    Ok(())
}

/// Cgroups that appear and vanish as fast as the kernel allows, some with processes in them,
/// do not crash the agent, and every instance that ran ends up recorded and closed.
#[test]
fn vanishing_cgroups_do_not_crash() -> anyhow::Result<()> {
    if !require_root("vanishing_cgroups_do_not_crash") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let n = 200;
    for i in 0..n {
        let dir = root.instance_dir("churn", &format!("c{i}"))?;
        if i % 10 == 0 {
            run_alloc(&dir, 4, 0, 0)?;
        }
        fs::remove_dir(&dir)?;
    }
    // Nested cgroups below an instance, removed bottom-up at once.
    let dir = root.instance_dir("churn", "nested")?;
    fs::create_dir(dir.join("inner"))?;
    fs::remove_dir(dir.join("inner"))?;
    fs::remove_dir(&dir)?;
    let ended = agent.wait_ended("churn", n + 1)?;
    assert_eq!(ended.len(), n + 1);
    let ran: Vec<_> = ended.iter().filter(|r| u64_of(r, "execs") == 1).collect();
    assert_eq!(
        ran.len(),
        n / 10,
        "every instance that ran one process counted one exec"
    );
    for r in ran {
        assert!(u64_of(r, "peak_bytes") >= 4 * MIB, "{r}");
    }
    let (s, info) = agent.get("/v1/info")?;
    assert_eq!(s, 200);
    assert_eq!(info["events_lost"], 0, "no events lost: {info}");
    // Still alive and answering after the storm.
    assert!(wait_for(Duration::from_secs(2), || agent.get("/healthz").ok()).is_some());
    Ok(())
}

/// A full ring buffer is never silent: lost events are counted, and instances whose rmdir was
/// lost are closed by reconciliation instead of staying "live" forever.
#[test]
fn lost_events_are_counted_and_reconciled() -> anyhow::Result<()> {
    if !require_root("lost_events_are_counted_and_reconciled") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    // 64 KiB holds at most 1,024 records (the shortest is 64 bytes with the kernel's header),
    // and these carry paths: freeze the agent and make 800 mkdirs, then 800 rmdirs.
    const N: u64 = 800;
    let agent = Agent::start_configured(&root, "\n[probes]\nring_buffer_bytes = 65536\n")?;
    agent.pause();
    let mut dirs = Vec::new();
    for i in 0..N {
        dirs.push(root.instance_dir("flood", &format!("f{i}"))?);
    }
    for d in &dirs {
        fs::remove_dir(d)?;
    }
    agent.resume();
    let info = wait_for(Duration::from_secs(5), || {
        let (_, i) = agent.get("/v1/info").ok()?;
        (i["events_lost"].as_u64()? > 0).then_some(i)
    })
    .ok_or_else(|| anyhow::anyhow!("events lost not reported:\n{}", agent.log()))?;
    assert!(
        info["events_lost"].as_u64().unwrap_or(0) >= 2 * N - 65536 / 64,
        "{info}"
    );
    // Every instance the agent heard of is closed, by its rmdir or by reconciliation.
    let closed = wait_for(Duration::from_secs(20), || {
        let list = agent.instances("flood").ok()?;
        (!list.is_empty() && list.iter().all(|r| !r["ended_at_ms"].is_null())).then_some(list)
    })
    .ok_or_else(|| anyhow::anyhow!("instances left live:\n{}", agent.log()))?;
    let (_, info) = agent.get("/v1/info")?;
    assert_eq!(
        info["instances_reconciled"].as_u64(),
        Some(closed.len() as u64),
        "{info}"
    );
    Ok(())
}

/// A cgroup path longer than a kernel event carries is not filed under a cut-short name: the
/// agent finds the cgroup by id and records the whole instance name, and counts it.
#[test]
fn long_cgroup_paths_are_not_misattributed() -> anyhow::Result<()> {
    if !require_root("long_cgroup_paths_are_not_misattributed") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let name = format!("long-{}", "n".repeat(245));
    let dir = root.instance_dir("longfn", &name)?;
    // An event carries EVENT_NAME_LEN - 1 = 255 bytes of path.
    assert!(
        root.rel.len() + "/longfn/".len() + name.len() > 255,
        "the path must exceed what an event carries"
    );
    run_alloc(&dir, 8, 0, 0)?;
    fs::remove_dir(&dir)?;
    let ended = agent.wait_ended("longfn", 1)?;
    assert_eq!(ended[0]["instance"], name.as_str());
    let info = agent.get_ok("/v1/info")?;
    wait_for(Duration::from_secs(3), || {
        let info = agent.get_ok("/v1/info").ok()?;
        (u64_of(&info["kernel_counters"], "paths_truncated") == 1).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("truncation not counted: {info}"))?;
    Ok(())
}

/// A full kernel table is counted in /v1/info, and its size follows the config.
#[test]
fn full_watch_table_is_counted() -> anyhow::Result<()> {
    if !require_root("full_watch_table_is_counted") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(&root, "\n[probes]\nmax_watched_cgroups = 2\n")?;
    // The kernel watches every cgroup below the root, the function's directory too: five
    // inserts into a table of two.
    for i in 0..4 {
        root.instance_dir("full", &format!("i{i}"))?;
    }
    let counted = wait_for(Duration::from_secs(3), || {
        let info = agent.get_ok("/v1/info").ok()?;
        let n = u64_of(&info["kernel_counters"], "watch_table_full");
        (n == 3).then_some(n)
    });
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(
        counted,
        Some(3),
        "5 cgroups into a table of 2: {}",
        info["kernel_counters"]
    );
    Ok(())
}

/// A stop that comes the moment the agent says it listens ends it cleanly, every time: its
/// signal handlers are in place before it says so (they were installed when a task first ran,
/// and a SIGTERM in between killed it by the default action; seen once in CI).
#[test]
fn stop_right_after_start_is_clean() -> anyhow::Result<()> {
    if !require_root("stop_right_after_start_is_clean") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    for i in 0..10 {
        let agent = Agent::start_with(&root, &store, "", None)?;
        let log = agent.log();
        let status = agent.stop()?;
        assert!(
            status.success(),
            "start {i}: exit {status} on SIGTERM; log:\n{log}"
        );
    }
    Ok(())
}

/// Cgroups whose rule gives a name that cannot be used (a space, non-ASCII, shell and HTML
/// text, 130 characters) are no instances, but never silent: counted by reason in /v1/info and
/// /metrics, and the first of each reason is logged with what a valid name is.
#[test]
fn unusable_names_are_counted_and_said() -> anyhow::Result<()> {
    if !require_root("unusable_names_are_counted_and_said") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let long = "f".repeat(130);
    let bad_characters = ["a b", "café", "$(id)", "<b>x<"];
    for function in bad_characters.iter().copied().chain([long.as_str()]) {
        root.instance_dir(function, "1")?;
    }
    // A good one after them: once it is live, the agent has seen every mkdir before it.
    root.instance_dir("good", "1")?;
    agent.wait_live("good", "1")?;
    let counts = wait_for(Duration::from_secs(10), || {
        let info = agent.get_ok("/v1/info").ok()?;
        let n = |why: &str| info["cgroups_unnamed"][why].as_u64();
        let got = (n("function_characters")?, n("function_too_long")?);
        (got == (4, 1)).then_some(info)
    });
    let Some(info) = counts else {
        let info = agent.get_ok("/v1/info")?;
        panic!(
            "unnamed cgroups not counted 4 + 1: {}\n{}",
            info["cgroups_unnamed"],
            agent.log()
        );
    };
    assert_eq!(info["cgroups_unnamed"]["instance_characters"], 0, "{info}");
    let functions = agent.get_ok("/v1/functions")?;
    let names: Vec<&str> = functions["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["good"], "only the good name is a function");
    let metrics = ureq::get(&agent.url("/metrics")).call()?.into_string()?;
    for line in [
        "emars_cgroups_unnamed_total{reason=\"function_characters\"} 4",
        "emars_cgroups_unnamed_total{reason=\"function_too_long\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics"
        );
    }
    // Logged once per reason, with the rule a name must follow.
    let log = agent.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("its rule gives a name that cannot be used"))
        .collect();
    assert_eq!(said.len(), 2, "{said:#?}");
    assert!(
        said.iter()
            .any(|l| l.contains("function_characters") && l.contains("A-Z a-z 0-9 . _ : -")),
        "{said:#?}"
    );
    Ok(())
}

/// A root with `create = false` (a platform's own, such as kubepods.slice) is never created
/// by the agent when missing: it says so, and once the platform makes it, instances below it
/// are tracked.
#[test]
fn a_root_the_platform_makes_is_not_created() -> anyhow::Result<()> {
    if !require_root("a_root_the_platform_makes_is_not_created") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let later_rel = format!("{}-later", root.rel);
    let later = root.hierarchy.mount.join(&later_rel[1..]);
    // The extra text continues the first root's table, then adds the second root.
    let extra =
        format!("create = false\n[[cgroup.roots]]\npath = \"{later_rel}\"\ncreate = false\n");
    let agent = Agent::start_configured(&root, &extra)?;
    let said = wait_for(Duration::from_secs(10), || {
        agent
            .log()
            .contains(&format!("watched root {} does not exist", later.display()))
            .then_some(())
    });
    assert!(
        said.is_some(),
        "no word of the missing root:\n{}",
        agent.log()
    );
    assert!(!later.exists(), "the agent created {}", later.display());
    // The platform makes it now: what it creates below it is tracked.
    fs::create_dir(&later)?;
    let result = (|| -> anyhow::Result<()> {
        if root.hierarchy.version == Version::V2 {
            fs::write(later.join("cgroup.subtree_control"), "+memory")?;
        }
        let f = later.join("fn");
        fs::create_dir(&f)?;
        if root.hierarchy.version == Version::V2 {
            fs::write(f.join("cgroup.subtree_control"), "+memory")?;
        }
        fs::create_dir(f.join("i1"))?;
        agent.wait_live("fn", "i1")?;
        Ok(())
    })();
    remove_tree(&later);
    result
}
