//! Instances, peaks and execs end to end: real cgroups, real processes that touch known amounts
//! of memory, the real agent, checked through its HTTP API against the kernel's own watermark.

use std::{fs, time::Duration};

use emars_tests::*;

/// Each instance appears under its function with a peak within 2 % (or 1 MiB) of the kernel
/// watermark, read by the test before the cgroup is removed; lifetimes from 100 ms to 2 s.
#[test]
fn peaks_match_kernel_watermark() -> anyhow::Result<()> {
    if !require_root("peaks_match_kernel_watermark") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let cases: &[(&str, u64, u64)] = &[
        ("i-8m-100ms", 8, 100),
        ("i-32m-300ms", 32, 300),
        ("i-80m-1s", 80, 1000),
        ("i-48m-2s", 48, 2000),
    ];
    let mut expected = Vec::new();
    for (inst, mib, hold) in cases {
        let dir = root.instance_dir("sizer", inst)?;
        let status = run_alloc(&dir, *mib, *hold, 0)?;
        assert!(status.success(), "{inst}: workload failed: {status}");
        let wm = root.hierarchy.watermark(&dir)?;
        assert!(wm >= mib * MIB, "{inst}: watermark {wm} below {mib} MiB");
        fs::remove_dir(&dir)?;
        expected.push((inst.to_string(), wm));
    }
    let ended = agent.wait_ended("sizer", cases.len())?;
    for (inst, wm) in &expected {
        let rec = ended
            .iter()
            .find(|r| r["instance"] == inst.as_str())
            .unwrap_or_else(|| panic!("instance {inst} missing: {ended:?}"));
        let peak = u64_of(rec, "peak_bytes");
        assert!(
            close_to_watermark(peak, *wm),
            "{inst}: reported peak {peak} vs kernel watermark {wm}"
        );
        assert_eq!(rec["function"], "sizer");
        assert_eq!(u64_of(rec, "execs"), 1, "{inst}: one exec");
    }
    let f = agent.get_ok("/v1/functions/sizer")?;
    assert_eq!(u64_of(&f, "instances"), cases.len() as u64);
    assert_eq!(u64_of(&f, "live_instances"), 0);
    let max_wm = expected.iter().map(|(_, w)| *w).max().unwrap_or(0);
    assert!(close_to_watermark(u64_of(&f, "peak_bytes"), max_wm));
    let list = agent.get_ok("/v1/functions")?;
    assert!(list["functions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|f| f["name"] == "sizer")));
    Ok(())
}

/// A platform that removes the cgroup the moment its last process exits (no sleep between
/// exit and rmdir) still gets an exact peak: the kernel side hands it over with the rmdir.
/// The agent is frozen meanwhile and high-water steps are off, so no watermark read and no
/// interim step can supply the figure: only the in-kernel handover can.
#[test]
fn peak_survives_immediate_rmdir() -> anyhow::Result<()> {
    immediate_rmdir("peak_survives_immediate_rmdir", "")
}

/// The same, with the raw rmdir program off: `charge_events = "auto"` then runs the memcg
/// charge programs, and the peak they summed in the kernel comes with the rmdir instead.
#[test]
fn peak_survives_immediate_rmdir_on_charge_events() -> anyhow::Result<()> {
    immediate_rmdir(
        "peak_survives_immediate_rmdir_on_charge_events",
        "disable = [\"raw_cgroup_rmdir\"]\n",
    )
}

fn immediate_rmdir(test: &str, probes: &str) -> anyhow::Result<()> {
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!("\n[probes]\npeak_step_bytes = 17179869184\n{probes}"),
    )?;
    let info = agent.get_ok("/v1/info")?;
    let attached = |name: &str| program_attached(&info, name);
    // Either hand-over works: the exact watermark read by raw_cgroup_rmdir, or the charge-event
    // peak kept by the memcg programs.
    let handover = attached("raw_cgroup_rmdir")
        || (attached("memcg_mod_memcg_state") && attached("memcg_mod_memcg_lruvec_state"));
    if !handover {
        skipped(
            test,
            &format!(
                "this kernel allows neither the raw cgroup_rmdir program nor memcg charge \
                 tracepoints (or the test turned one off); the agent runs on its documented \
                 watermark fallback ({})",
                info["fallbacks"]
            ),
        );
        return Ok(());
    }
    let n = 12;
    let mut expected = Vec::new();
    agent.pause();
    for i in 0..n {
        let inst = format!("fast-{i}");
        let dir = root.instance_dir("burst", &inst)?;
        let mib = 16 + 8 * (i % 4);
        run_alloc(&dir, mib, 0, 0)?;
        // Read the watermark and remove at once: the agent has had no chance to read it.
        let wm = root.hierarchy.watermark(&dir)?;
        fs::remove_dir(&dir)?;
        expected.push((inst, wm));
    }
    agent.resume();
    let ended = agent.wait_ended("burst", n as usize)?;
    for (inst, wm) in &expected {
        let rec = ended
            .iter()
            .find(|r| r["instance"] == inst.as_str())
            .unwrap_or_else(|| panic!("{inst} missing"));
        let peak = u64_of(rec, "peak_bytes");
        assert!(
            close_to_watermark(peak, *wm),
            "{inst}: peak {peak} vs watermark {wm} (source {})",
            rec["peak_source"]
        );
    }
    detach_and_settle(agent, root);
    Ok(())
}

/// Stops the agent and unpins its programs, then waits a moment before the next test: a
/// charge program's tracepoint being switched off while the next test's processes fault pages
/// twice crashed the 7.x guest under QEMU's emulation ("Oops: int3" at the static-key site in
/// __mod_memcg_lruvec_state, the kernel's text patching meeting emulated code). The wait keeps
/// the switch-off and the next test apart; it asserts nothing.
fn detach_and_settle(agent: Agent, root: TestRoot) {
    drop(agent);
    drop(root);
    std::thread::sleep(Duration::from_millis(300) * time_scale());
}

/// Exec counts are exact: each workload re-execs itself a known number of times.
#[test]
fn exec_counts_are_exact() -> anyhow::Result<()> {
    if !require_root("exec_counts_are_exact") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let chains = [0u32, 1, 4, 9];
    for (i, chain) in chains.iter().enumerate() {
        let dir = root.instance_dir("execer", &format!("c{i}"))?;
        run_alloc(&dir, 1, 0, *chain)?;
        // Two more processes in the same instance: forked children are attributed too.
        let mut kids = Vec::new();
        for _ in 0..2 {
            kids.push(spawn_alloc(&dir, 1, 50, 0)?);
        }
        for mut k in kids {
            k.wait()?;
        }
        fs::remove_dir(&dir)?;
    }
    let ended = agent.wait_ended("execer", chains.len())?;
    for (i, chain) in chains.iter().enumerate() {
        let rec = ended
            .iter()
            .find(|r| r["instance"] == format!("c{i}"))
            .unwrap_or_else(|| panic!("c{i} missing"));
        assert_eq!(
            u64_of(rec, "execs"),
            u64::from(*chain) + 1 + 2,
            "instance c{i}: {rec}"
        );
    }
    let f = agent.get_ok("/v1/functions/execer")?;
    let total: u64 = chains.iter().map(|c| u64::from(*c) + 3).sum();
    assert_eq!(u64_of(&f, "execs"), total);
    let hours = f["hours"].as_array().cloned().unwrap_or_default();
    let hour_execs: u64 = hours.iter().map(|h| u64_of(h, "execs")).sum();
    assert_eq!(hour_execs, total, "hourly buckets add up: {hours:?}");
    Ok(())
}

/// Live instances are visible while they run, with a peak that is already current.
#[test]
fn live_instance_is_visible() -> anyhow::Result<()> {
    if !require_root("live_instance_is_visible") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let dir = root.instance_dir("longrun", "l1")?;
    let mut child = spawn_alloc(&dir, 40, 3000, 0)?;
    let rec = wait_for(Duration::from_secs(5), || {
        let list = agent.instances("longrun").ok()?;
        let r = list.into_iter().next()?;
        (r["ended_at_ms"].is_null() && u64_of(&r, "peak_bytes") >= 40 * MIB).then_some(r)
    });
    let wm = root.hierarchy.watermark(&dir)?;
    child.wait()?;
    let rec = rec.ok_or_else(|| anyhow::anyhow!("live instance not reported:\n{}", agent.log()))?;
    assert!(u64_of(&rec, "peak_bytes") <= wm + MIB);
    let f = agent.get_ok("/v1/functions/longrun")?;
    assert_eq!(u64_of(&f, "live_instances"), 1);
    Ok(())
}

/// The agent restarted on the same store still reports everything it had, and picks up an
/// instance that kept running across the restart.
#[test]
fn restart_keeps_everything() -> anyhow::Result<()> {
    if !require_root("restart_keeps_everything") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let agent = Agent::start_with(&root, &store, "", None)?;
    for i in 0..3 {
        let dir = root.instance_dir("persist", &format!("p{i}"))?;
        run_alloc(&dir, 10 + i, 0, 1)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("persist", 3)?;
    agent.post_raw(
        "/v1/functions/persist/invocations",
        "application/json",
        br#"{"count": 42}"#,
    )?;
    // One instance keeps running across the restart.
    let live_dir = root.instance_dir("persist", "survivor")?;
    let mut child = spawn_alloc(&live_dir, 20, 2500, 0)?;
    // Seen with its exec counted: exec events reach the agent with its next drain (up to
    // 100 ms after the mkdir that woke it), and the snapshot below must include it.
    wait_for(Duration::from_secs(5), || {
        agent
            .instances("persist")
            .ok()?
            .iter()
            .any(|r| r["instance"] == "survivor" && r["execs"].as_u64() >= Some(1))
            .then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("survivor not seen with its exec"))?;
    let before_fn = agent.get_ok("/v1/functions/persist")?;
    let before_inst = agent.instances("persist")?;
    assert!(agent.stop()?.success(), "agent exits cleanly on SIGTERM");

    let agent = Agent::start_with(&root, &store, "", None)?;
    let after_inst = agent.instances("persist")?;
    assert_eq!(before_inst.len(), after_inst.len());
    for b in &before_inst {
        let a = after_inst
            .iter()
            .find(|a| a["instance"] == b["instance"])
            .unwrap_or_else(|| panic!("{} lost on restart", b["instance"]));
        assert!(u64_of(a, "peak_bytes") >= u64_of(b, "peak_bytes"));
        assert_eq!(a["execs"], b["execs"]);
        assert_eq!(a["started_at_ms"], b["started_at_ms"]);
    }
    let after_fn = agent.get_ok("/v1/functions/persist")?;
    assert_eq!(after_fn["invocations"], 42);
    assert_eq!(after_fn["execs"], before_fn["execs"]);
    // The survivor is tracked again: its end is recorded by the new agent.
    child.wait()?;
    let wm = root.hierarchy.watermark(&live_dir)?;
    fs::remove_dir(&live_dir)?;
    let ended = agent.wait_ended("persist", 4)?;
    let s = ended
        .iter()
        .find(|r| r["instance"] == "survivor")
        .ok_or_else(|| anyhow::anyhow!("survivor's end not recorded"))?;
    assert!(close_to_watermark(u64_of(s, "peak_bytes"), wm));
    Ok(())
}

/// An OOM kill in a limited instance is recorded against its function.
#[test]
fn oom_kill_is_recorded() -> anyhow::Result<()> {
    if !require_root("oom_kill_is_recorded") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let dir = root.instance_dir("hungry", "h1")?;
    root.hierarchy.set_limit(&dir, 32 * MIB)?;
    let status = run_alloc(&dir, 128, 0, 0)?;
    assert!(
        !status.success(),
        "the workload should have been OOM-killed"
    );
    fs::remove_dir(&dir)?;
    let ended = agent.wait_ended("hungry", 1)?;
    assert_eq!(u64_of(&ended[0], "oom_kills"), 1, "{:?}", ended[0]);
    assert_eq!(ended[0]["limits"]["max_bytes"], 32 * MIB);
    let f = agent.get_ok("/v1/functions/hungry")?;
    assert_eq!(u64_of(&f, "oom_kills"), 1);
    Ok(())
}

/// The kernel side stays pinned while no agent runs: instances that start and end while the
/// agent is stopped (SIGTERM) or killed (kill -9, at different moments of a churn of real
/// processes) are recorded by the next agent, each with the kernel's exact watermark; none is
/// lost. Without pinning, the programs detach with the agent and those instances are never
/// seen; without the commit after the store's flush, records read just before a kill -9 are.
#[test]
fn no_instance_lost_while_the_agent_is_down() -> anyhow::Result<()> {
    use std::{
        collections::BTreeMap,
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc, Mutex,
        },
    };
    if !require_root("no_instance_lost_while_the_agent_is_down") {
        return Ok(());
    }
    let root = Arc::new(TestRoot::new()?);
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    // instance → the kernel's watermark, read with no task left, just before its rmdir.
    let expected: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let run_one = |root: &TestRoot, name: &str, mib: u64| -> anyhow::Result<u64> {
        let d = root.instance_dir("down", name)?;
        run_alloc(&d, mib, 0, 0)?;
        let wm = root.hierarchy.watermark(&d)?;
        fs::remove_dir(&d)?;
        Ok(wm)
    };
    let record = |name: String, wm: u64| {
        if let Ok(mut e) = expected.lock() {
            e.insert(name, wm);
        }
    };

    let agent = Agent::start_with(&root, &store, "", None)?;
    let info = agent.get_ok("/v1/info")?;
    assert!(
        info["probes_pinned"].is_string(),
        "kernel side not pinned: {}",
        info["fallbacks"]
    );
    assert_eq!(info["probes_adopted"], false);
    let exact = program_attached(&info, "raw_cgroup_rmdir");
    for i in 0..2 {
        record(format!("up{i}"), run_one(&root, &format!("up{i}"), 6 + i)?);
    }
    agent.wait_ended("down", 2)?;
    // One instance runs across the stop and ends while no agent runs.
    let across = root.instance_dir("down", "across")?;
    let mut child = spawn_alloc(&across, 20, 300, 0)?;
    agent.wait_live("down", "across")?;
    assert!(agent.stop()?.success(), "agent exits cleanly on SIGTERM");

    // Stopped: instances come and go.
    child.wait()?;
    record("across".into(), root.hierarchy.watermark(&across)?);
    fs::remove_dir(&across)?;
    for i in 0..5 {
        record(
            format!("stopped{i}"),
            run_one(&root, &format!("stopped{i}"), 4 + 2 * i)?,
        );
    }
    let agent = Agent::start_with(&root, &store, "", None)?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["probes_adopted"], true, "not adopted: {info}");
    let ended = agent.wait_ended("down", 8)?;
    for r in &ended {
        if r["instance"]
            .as_str()
            .is_some_and(|n| n.starts_with("stopped"))
        {
            // Queued while no agent ran, applied once: exact exec counts.
            assert_eq!(u64_of(r, "execs"), 1, "{r}");
        }
    }

    // kill -9 at different moments of a churn that goes on while the agent is down.
    let rounds = if time_scale() > 1 { 3 } else { 8 };
    let mut agent = Some(agent);
    for round in 0..rounds {
        let a = match agent.take() {
            Some(a) => a,
            None => Agent::start_with(&root, &store, "", None)?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (root, stop, expected) = (root.clone(), stop.clone(), expected.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("k{round}-{n}");
                    let d = root.instance_dir("down", &name)?;
                    run_alloc(&d, 2 + n % 7, 0, 0)?;
                    let wm = root.hierarchy.watermark(&d)?;
                    fs::remove_dir(&d)?;
                    expected
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .insert(name, wm);
                    n += 1;
                }
                Ok(())
            })
        };
        std::thread::sleep(Duration::from_millis(60 + (round * 53) % 250));
        a.kill()?;
        // Churn on while no agent runs.
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, Ordering::Relaxed);
        churn
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    }

    let agent = Agent::start_with(&root, &store, "", None)?;
    let expected = expected
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let ended = agent.wait_ended("down", expected.len())?;
    let got: BTreeMap<String, u64> = ended
        .iter()
        .filter_map(|r| {
            Some((
                r["instance"].as_str()?.to_owned(),
                r["peak_bytes"].as_u64()?,
            ))
        })
        .collect();
    // Each ran one exec. The ring mark makes an adopting agent skip what its predecessor had
    // saved, but sled may also write records made while its flush ran, past the mark: an exec
    // of that moment is counted twice (said here, not asserted: seen once in CI). Never less.
    let twice = ended.iter().filter(|r| r["execs"] != 1).count();
    assert!(
        ended.iter().all(|r| r["execs"].as_u64() >= Some(1)),
        "an exec lost"
    );
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} instances lost: {missing:?}",
        missing.len(),
        expected.len()
    );
    for (name, wm) in &expected {
        let peak = got[name];
        if exact {
            assert_eq!(peak, *wm, "{name}: peak {peak}, kernel watermark {wm}");
        } else {
            assert!(
                close_to_watermark(peak, *wm),
                "{name}: peak {peak}, watermark {wm}"
            );
        }
    }
    let info = agent.get_ok("/v1/info")?;
    eprintln!(
        "{} instances, 1 stop and {rounds} kill -9 with churn while down: none lost, peaks \
         {}; events lost in the kernel: {}; execs counted twice: {twice}",
        expected.len(),
        if exact { "exact" } else { "within tolerance" },
        info["events_lost"]
    );
    Ok(())
}

/// Runs instances of `function` that allocate known memory and end while no agent runs; notes
/// each one's kernel watermark, read with no task left, just before its rmdir.
fn run_while_down(
    root: &TestRoot,
    function: &str,
    names: &[(String, u64)],
    expected: &mut std::collections::BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    for (name, mib) in names {
        let d = root.instance_dir(function, name)?;
        let status = run_alloc(&d, *mib, 0, 0)?;
        assert!(status.success(), "{name}: workload failed: {status}");
        let wm = root.hierarchy.watermark(&d)?;
        assert!(wm >= mib * MIB, "{name}: watermark {wm} below {mib} MiB");
        fs::remove_dir(&d)?;
        expected.insert(name.clone(), wm);
    }
    Ok(())
}

/// Runs instances of `function` one after another until `stop`, each allocating a few MiB; returns
/// each one's kernel watermark, read just before its rmdir.
fn churn(
    root: &TestRoot,
    function: &str,
    tag: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let name = format!("{tag}{n}");
        run_while_down(root, function, &[(name, 2 + n % 5)], &mut out)?;
        n += 1;
    }
    Ok(out)
}

/// Every instance of `expected` is recorded under `function`, once, with one exec and the
/// kernel's watermark as its peak (exactly where the raw rmdir program hands it over).
fn all_recorded(
    agent: &Agent,
    function: &str,
    expected: &std::collections::BTreeMap<String, u64>,
    exact: bool,
) -> anyhow::Result<()> {
    let ended = agent.wait_ended(function, expected.len())?;
    let mut seen = std::collections::BTreeMap::<&str, Vec<&serde_json::Value>>::new();
    for r in &ended {
        seen.entry(r["instance"].as_str().unwrap_or_default())
            .or_default()
            .push(r);
    }
    let twice: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "recorded more than once: {twice:?}");
    assert_eq!(ended.len(), expected.len(), "{ended:?}");
    for (name, wm) in expected {
        let rec = ended
            .iter()
            .find(|r| r["instance"] == name.as_str())
            .ok_or_else(|| anyhow::anyhow!("{name} not recorded: {ended:?}\n{}", agent.log()))?;
        let peak = u64_of(rec, "peak_bytes");
        if exact {
            assert_eq!(
                peak,
                *wm,
                "{name}: peak {peak}, kernel watermark {wm}: {rec}\n{}",
                agent.log()
            );
        } else {
            assert!(close_to_watermark(peak, *wm), "{name}: peak {peak} vs {wm}");
        }
        assert_eq!(u64_of(rec, "execs"), 1, "{name}: {rec}");
    }
    Ok(())
}

/// What an agent wrote into a pinned set's run-time settings (its SETTINGS map, read from bpffs).
fn pinned_run_settings(set: &str) -> anyhow::Result<emars_common::RunSettings> {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(std::path::Path::new(set).join("map_SETTINGS"))?;
    let arr: Array<MapData, emars_common::RunSettings> =
        Array::try_from(Map::from_map_data(data)?)?;
    Ok(arr.get(&0, 0)?)
}

fn pinned_set(info: &serde_json::Value) -> anyhow::Result<String> {
    info["probes_pinned"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("kernel side not pinned: {info}"))
}

/// The restart that turns enforcement on (and one that changes the peak step) adopts the
/// pinned kernel side as it is and writes only its run-time settings: the instances that ran
/// while no agent did, after a SIGTERM and after a kill -9, and those of a churn that goes on
/// through the stop and the restart, are all recorded, each with the kernel's exact watermark,
/// and no set is replaced. With policy.mode part of the set's identity the set was replaced and
/// they were lost.
#[test]
fn switching_to_enforce_loses_nothing_recorded_while_down() -> anyhow::Result<()> {
    if !require_root("switching_to_enforce_loses_nothing_recorded_while_down") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let agent = Agent::start_with(&root, &store, "", None)?;
    let info = agent.get_ok("/v1/info")?;
    let set = pinned_set(&info)?;
    let exact = program_attached(&info, "raw_cgroup_rmdir");
    assert_eq!(info["enforcement"]["mode"], "observe", "{info}");
    assert_eq!(pinned_run_settings(&set)?.wake_on_mkdir, 0);

    let mut expected = std::collections::BTreeMap::new();
    let batch = |tag: &str| -> Vec<(String, u64)> {
        (0..4).map(|i| (format!("{tag}{i}"), 4 + 3 * i)).collect()
    };
    // Enforced limits that no instance here can reach.
    let enforce = "\n[policy]\nmode = \"enforce\"\n\n[[policy.functions]]\nname = \"switch\"\n\
                   pin_max_bytes = 268435456\n";
    let stop = std::sync::atomic::AtomicBool::new(false);
    let agent = std::thread::scope(|scope| -> anyhow::Result<Agent> {
        let churned = scope.spawn(|| churn(&root, "switch", "through-restart", &stop));
        std::thread::sleep(Duration::from_millis(100));
        assert!(agent.stop()?.success(), "agent exits cleanly on SIGTERM");
        run_while_down(&root, "switch", &batch("observe-stopped"), &mut expected)?;
        let agent = Agent::start_with(&root, &store, enforce, None)?;
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let churned = churned
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
        eprintln!("{} instances ran through the restart", churned.len());
        expected.extend(churned);
        Ok(agent)
    })?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["probes_adopted"], true, "{info}");
    assert_eq!(info["probes_unpinned"], serde_json::json!([]), "{info}");
    assert_eq!(info["probes_pinned"].as_str(), Some(set.as_str()), "{info}");
    assert_eq!(info["enforcement"]["mode"], "enforce", "{info}");
    // Enforce mode's own setting reached the adopted programs: a new cgroup wakes the agent.
    assert_eq!(pinned_run_settings(&set)?.wake_on_mkdir, 1);
    all_recorded(&agent, "switch", &expected, exact)?;

    // Killed in enforce mode; back to observe, with another peak step. Killed once quiet past
    // its periodic save (1 s after the last limits written): what is tested here is what
    // happens while it is down; events read but not yet saved before a kill -9 are
    // no_instance_lost_while_the_agent_is_down's.
    std::thread::sleep(Duration::from_millis(1500) * time_scale());
    agent.kill()?;
    run_while_down(&root, "switch", &batch("enforce-killed"), &mut expected)?;
    let agent = Agent::start_with(
        &root,
        &store,
        "\n[probes]\npeak_step_bytes = 2097152\n",
        None,
    )?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["probes_adopted"], true, "{info}");
    assert_eq!(info["probes_unpinned"], serde_json::json!([]), "{info}");
    assert_eq!(info["probes_pinned"].as_str(), Some(set.as_str()), "{info}");
    let run = pinned_run_settings(&set)?;
    assert_eq!((run.wake_on_mkdir, run.peak_step_bytes), (0, 2 * MIB));
    all_recorded(&agent, "switch", &expected, exact)?;
    assert!(agent.stop()?.success());
    Ok(())
}

/// A restart with a setting that changes the kernel side itself (here the ring's size) replaces
/// the pinned set, but first reads what its ring recorded while no agent ran: those instances
/// are recorded, exactly, after a SIGTERM and after a kill -9; the log says which set was
/// replaced, what changed and how many events were carried over; the old set is gone once they
/// are saved.
#[test]
fn a_replaced_pinned_set_hands_over_what_it_recorded() -> anyhow::Result<()> {
    if !require_root("a_replaced_pinned_set_hands_over_what_it_recorded") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let mut expected = std::collections::BTreeMap::new();
    let batch = |tag: &str| -> Vec<(String, u64)> {
        (0..4).map(|i| (format!("{tag}{i}"), 5 + 2 * i)).collect()
    };
    let bigger = "\n[probes]\nring_buffer_bytes = 8388608\n";
    let mut agent = Agent::start_with(&root, &store, "", None)?;
    let exact = program_attached(&agent.get_ok("/v1/info")?, "raw_cgroup_rmdir");
    // (ring size before, after, how the agent ends)
    let steps = [
        (4194304u64, 8388608u64, "stopped"),
        (8388608, 4194304, "killed"),
    ];
    for (i, (before, after, how)) in steps.into_iter().enumerate() {
        let old = pinned_set(&agent.get_ok("/v1/info")?)?;
        if how == "killed" {
            agent.kill()?;
        } else {
            assert!(agent.stop()?.success());
        }
        run_while_down(&root, "replaced", &batch(how), &mut expected)?;
        agent = Agent::start_with(&root, &store, if i == 0 { bigger } else { "" }, None)?;
        let info = agent.get_ok("/v1/info")?;
        let old_name = old.rsplit('/').next().unwrap_or_default();
        assert_eq!(info["probes_adopted"], false, "{info}");
        assert_eq!(
            info["probes_unpinned"],
            serde_json::json!([old_name]),
            "{info}"
        );
        all_recorded(&agent, "replaced", &expected, exact)?;
        let log = agent.log();
        let said = log
            .lines()
            .find(|l| l.contains("replaced the pinned kernel side"))
            .ok_or_else(|| anyhow::anyhow!("no word of the replacement:\n{log}"))?;
        assert!(
            said.contains(old_name)
                && said.contains(&format!("probes.ring_buffer_bytes {before} → {after}"))
                && said.contains("pending events are carried over"),
            "{said}"
        );
        assert!(!std::path::Path::new(&old).exists(), "{old} left pinned");
        for line in log.lines().filter(|l| {
            [
                "replaced the pinned",
                "kernel side pinned at",
                "replaced kernel side",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            eprintln!("{line}");
        }
    }
    assert!(agent.stop()?.success());
    Ok(())
}

/// Charge events: off by default where the raw rmdir program hands over the exact watermark (the
/// programs cost every memory stat update on the host), on by request, where a live instance's
/// peak then follows its growth within the agent's next read, with no exec or exit to tell it.
#[test]
fn charge_events_stream_live_peaks_when_asked() -> anyhow::Result<()> {
    if !require_root("charge_events_stream_live_peaks_when_asked") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let info = agent.get_ok("/v1/info")?;
    if program_attached(&info, "raw_cgroup_rmdir") {
        assert!(!program_attached(&info, "memcg_mod_memcg_state"), "{info}");
        assert!(
            !program_attached(&info, "memcg_mod_memcg_lruvec_state"),
            "{info}"
        );
    }
    drop(agent);

    let agent = Agent::start_configured(&root, "\n[probes]\ncharge_events = \"on\"\n")?;
    let info = agent.get_ok("/v1/info")?;
    if info["features"]["tracepoint memcg:mod_memcg_lruvec_state"] != true {
        skipped(
            "charge_events_stream_live_peaks_when_asked",
            &format!(
                "no memcg charge tracepoints on this kernel ({})",
                info["kernel"]
            ),
        );
        return Ok(());
    }
    assert!(
        program_attached(&info, "memcg_mod_memcg_lruvec_state"),
        "{info}"
    );
    assert!(program_attached(&info, "memcg_mod_memcg_state"), "{info}");
    let dir = root.instance_dir("stream", "s1")?;
    // Exec at once (the agent reads the watermark then: nothing yet), 1 s later 48 MiB, then
    // 4 s of nothing: no exec or exit tells the agent of the growth.
    // Scaled under emulation, where the agent may take longer than 1 s to see the exec.
    let ms = |n: u32| (n * time_scale()).to_string();
    let mut cmd = std::process::Command::new(alloc_bin());
    cmd.args([
        "--delay-ms",
        &ms(1000),
        "--mib",
        "48",
        "--hold-ms",
        &ms(4000),
    ]);
    let mut child = spawn_in(&dir, cmd)?;
    agent.wait_live("stream", "s1")?;
    let events0 = u64_of(&agent.get_ok("/v1/info")?, "events_received");
    let seen = wait_for(Duration::from_secs(3), || {
        let r = agent.instances("stream").ok()?.into_iter().next()?;
        (r["ended_at_ms"].is_null() && u64_of(&r, "peak_bytes") >= 48 * MIB).then_some(r)
    });
    let wm = root.hierarchy.watermark(&dir)?;
    // It came from the kernel's peak steps, not a reconciliation pass that happened to fall in
    // the window: 48 of them in 4 KiB pages (this host), 24 where the kernel hands out 2 MiB
    // folios (the VMs); without them the instance makes some 5 events in all. The count is
    // published once a second, so `events0` may still miss the first few.
    let steps = wait_for(Duration::from_secs(3), || {
        let n = u64_of(&agent.get_ok("/v1/info").ok()?, "events_received") - events0;
        (n >= 16).then_some(n)
    });
    child.kill()?;
    child.wait()?;
    let rec = seen.ok_or_else(|| anyhow::anyhow!("live peak did not follow:\n{}", agent.log()))?;
    assert!(
        u64_of(&rec, "peak_bytes") <= wm + MIB,
        "{rec} vs watermark {wm}"
    );
    assert!(
        steps.is_some(),
        "no peak steps reached the agent during the growth: {} events before it, now {}\n{rec}",
        events0,
        agent.get_ok("/v1/info")?
    );
    detach_and_settle(agent, root);
    Ok(())
}

/// Every file below `dir` (relative name → bytes), and `dir`'s mode.
fn tree_bytes(
    dir: &std::path::Path,
) -> anyhow::Result<(std::collections::BTreeMap<String, Vec<u8>>, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir)?.display().to_string();
                out.insert(rel, fs::read(e.path())?);
            }
        }
    }
    Ok((out, fs::metadata(dir)?.permissions().mode() & 0o7777))
}

/// The moved-aside copies beside `store`.
fn moved_aside(store: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let name = format!(
        "{}.corrupt-",
        store
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let mut out: Vec<String> = fs::read_dir(store.parent().unwrap_or(store))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
        .map(|e| e.path().display().to_string())
        .collect();
    out.sort();
    Ok(out)
}

/// A store whose database is damaged is moved aside and the agent starts on a fresh one,
/// serves, and says so in GET /v1/info (from the second time on: `again`). Three damages to
/// sled's log: its first segment header (sled 0.34 would open it as a new, empty database and
/// overwrite it: caught before sled opens it, the copy byte for byte as it was), a record at
/// its start (sled's corruption error, after it may have zeroed the log from there: the copy
/// holds every other file as it was and the log at its length), and all of it. A store
/// another agent holds is never moved aside: the second agent fails as before.
#[test]
fn corrupt_store_is_moved_aside_and_the_agent_starts() -> anyhow::Result<()> {
    if !require_root("corrupt_store_is_moved_aside_and_the_agent_starts") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let agent = Agent::start_with(&root, &store, "", None)?;
    let dir = root.instance_dir("old", "i1")?;
    assert!(run_alloc(&dir, 8, 0, 0)?.success());
    fs::remove_dir(&dir)?;
    agent.wait_ended("old", 1)?;
    assert!(agent.stop()?.success());

    // (what, the damage, whether the copy is byte for byte)
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage, bool); 3] = [
        (
            "segment header",
            |db| db[..20].iter_mut().for_each(|b| *b ^= 0x5a),
            true,
        ),
        (
            "first record",
            |db| db[24..40].iter_mut().for_each(|b| *b ^= 0x5a),
            false,
        ),
        (
            "whole log",
            |db| db.iter_mut().for_each(|b| *b = 0xab),
            true,
        ),
    ];
    for (round, (what, damage, whole)) in damages.iter().enumerate() {
        let mut db = fs::read(store.join("db"))?;
        damage(&mut db);
        fs::write(store.join("db"), &db)?;
        let before = tree_bytes(&store)?;
        assert_eq!(before.1, 0o700);

        let agent = Agent::start_with(&root, &store, "", None)?;
        let info = agent.get_ok("/v1/info")?;
        let moved = &info["store_moved_aside"];
        let path = moved["path"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{what}: not moved aside: {info}"))?;
        assert_eq!(moved_aside(&store)?.last().map(String::as_str), Some(path));
        assert!(
            path.starts_with(&format!("{}.corrupt-", store.display())),
            "{path}"
        );
        assert_eq!(moved["again"], round > 0, "{moved}");
        assert!(
            moved["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{moved}"
        );
        println!("{what}: {moved}");
        assert!(
            agent.log().contains(&format!("moved aside to {path}")),
            "{}",
            agent.log()
        );
        // Every file byte for byte, and the directory's mode; where sled rewrote its log
        // while it opened it, the log at its length.
        let (mut copy, mode) = tree_bytes(std::path::Path::new(path))?;
        let (mut want, want_mode) = before;
        assert_eq!(mode, want_mode);
        if !whole {
            let (a, b) = (copy.remove("db"), want.remove("db"));
            assert_eq!(a.map(|d| d.len()), b.map(|d| d.len()), "{what}: log length");
        }
        assert!(copy == want, "{what}: copy differs");
        // A fresh store, serving: the old function is not in it, a new instance is.
        assert_eq!(agent.get("/v1/functions/old")?.0, 404);
        let name = format!("new{round}");
        let dir = root.instance_dir(&name, "i1")?;
        agent.wait_live(&name, "i1")?;
        fs::remove_dir(&dir)?;
        agent.wait_ended(&name, 1)?;
        // Held by this agent: a second one (on another root, so the pins do not stop it
        // first) fails as before, and nothing more is moved aside.
        let other = TestRoot::new()?;
        let second = Agent::start_with(&other, &store, "", None);
        let err = format!(
            "{:#}",
            second
                .err()
                .ok_or_else(|| anyhow::anyhow!("a second agent started"))?
        );
        assert!(
            err.contains(&format!(
                "another agent holds the store at {} (pid {})",
                store.display(),
                agent.pid()
            )),
            "{err}"
        );
        assert_eq!(moved_aside(&store)?.len(), round + 1);
        assert!(agent.stop()?.success());
    }
    Ok(())
}
