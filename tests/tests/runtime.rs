//! Real OCI containers (runc and crun, busybox rootfs, Docker's cgroupfs layout
//! `<parent>/<64-hex id>`, Kubernetes-style annotations): EMARS takes each container's function
//! from the runtime's metadata (`{label:io.kubernetes.container.name}`: runc's state.json as
//! Docker runs it; the bundle's config.json as containerd lays bundles out, for crun), falls
//! back to the path rule for a container without the annotation, records each with its exact
//! peak, and sizes the next container of a known function when the runtime starts it.

use std::time::Duration;

use emars_tests::{oci::Oci, *};
use serde_json::Value;

const ANNOTATION: &str = "io.kubernetes.container.name";

/// A container id as Docker makes them: 64 hex digits.
fn container_id(n: u32) -> String {
    format!("{:016x}{:048x}", std::process::id(), n)
}

/// Runs a container to its end, reads its cgroup's watermark before runc removes it, and
/// deletes it. Returns the watermark.
fn run_to_end(
    runc: &mut Oci,
    root: &TestRoot,
    id: &str,
    annotations: &[(&str, &str)],
    mib: u64,
) -> anyhow::Result<u64> {
    // /dev/shm is the container's own tmpfs: its pages are charged to the container.
    let script = format!("dd if=/dev/zero of=/dev/shm/fill bs=1M count={mib} 2>/dev/null");
    runc.create(id, annotations, &script)?;
    runc.start(id)?;
    runc.wait_stopped(id, Duration::from_secs(20 * u64::from(time_scale())))?;
    let dir = root
        .hierarchy
        .mount
        .join(runc.cgroup(id).trim_start_matches('/'));
    let watermark = root.hierarchy.watermark(&dir)?;
    runc.delete(id)?;
    Ok(watermark)
}

fn only_record(agent: &Agent, function: &str, id: &str) -> anyhow::Result<Value> {
    agent
        .wait_ended(function, 1)?
        .into_iter()
        .find(|r| r["instance"] == id)
        .ok_or_else(|| anyhow::anyhow!("no record of {function}/{id}:\n{}", agent.log()))
}

#[test]
fn runc_containers_are_named_by_their_annotations_and_sized() -> anyhow::Result<()> {
    containers_are_named_and_sized(
        "runc_containers_are_named_by_their_annotations_and_sized",
        "runc",
    )
}

/// crun refuses hybrid hosts ("cgroups in hybrid mode not supported"): it runs on pure v2.
#[test]
fn crun_containers_are_named_by_their_annotations_and_sized() -> anyhow::Result<()> {
    containers_are_named_and_sized(
        "crun_containers_are_named_by_their_annotations_and_sized",
        "crun",
    )
}

fn containers_are_named_and_sized(test: &str, runtime: &str) -> anyhow::Result<()> {
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    if runtime == "crun" && root.hierarchy.version == Version::V1 {
        skipped(test, "crun runs on pure cgroup v2 only; this host's memory controller is on v1 (the VMs run it)");
        return Ok(());
    }
    let Some(mut runc) = Oci::new(&root, runtime)? else {
        panic!(
            "{test}: {runtime} or /bin/busybox (busybox-static) missing: run `cargo xtask setup`"
        );
    };
    // runc: its state.json, written after the cgroup (the agent waits for it); crun: the
    // bundle's config.json, there before.
    let metadata = match runtime {
        "runc" => format!("{}/{{id}}/state.json", runc.state_root().display()),
        _ => format!("{}/{{id}}/config.json", runc.bundles().display()),
    };
    let extra = format!(
        r#"[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
metadata = "{metadata}"
function = "{{label:{ANNOTATION}}}"
instance = "{{id}}"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
function = "oci"
instance = "{{id}}"

[policy]
mode = "enforce"
"#
    );
    let agent = Agent::start_configured(&root, &extra)?;

    // A container of "resize" (its annotation), 40 MiB, to its end.
    let a1 = container_id(1);
    let wm_a1 = run_to_end(&mut runc, &root, &a1, &[(ANNOTATION, "resize")], 40)?;
    let rec = only_record(&agent, "resize", &a1)?;
    println!("resize/{a1}: peak {} (kernel {wm_a1})", rec["peak_bytes"]);
    assert_eq!(u64_of(&rec, "peak_bytes"), wm_a1, "{rec}");
    assert!(wm_a1 >= 40 * MIB, "the container held 40 MiB: {wm_a1}");
    assert_eq!(rec["peak_source"], "kernel_watermark", "{rec}");
    assert!(
        u64_of(&rec, "execs") >= 1,
        "the container's exec is counted: {rec}"
    );

    // One without the annotation: the path rule's fixed name.
    let b = container_id(2);
    let wm_b = run_to_end(&mut runc, &root, &b, &[("other", "x")], 20)?;
    let rec = only_record(&agent, "oci", &b)?;
    assert_eq!(u64_of(&rec, "peak_bytes"), wm_b, "{rec}");
    assert!((20 * MIB..40 * MIB).contains(&wm_b), "{wm_b}");
    assert!(
        agent
            .instances("resize")?
            .iter()
            .all(|r| r["instance"] != b),
        "the unannotated container is not filed under resize"
    );

    // The next "resize" container gets the function's limits when runc starts it.
    // The recommendation is brought up to date within a second of an instance's end.
    let limits = wait_for(Duration::from_secs(5), || {
        let (s, v) = agent.get("/v1/functions/resize/limits").ok()?;
        (s == 200).then_some(v)
    })
    .ok_or_else(|| anyhow::anyhow!("no limits for resize:\n{}", agent.log()))?;
    let (want_max, want_high) = (u64_of(&limits, "max_bytes"), u64_of(&limits, "high_bytes"));
    assert!(want_max > wm_a1, "{limits}");
    let a2 = container_id(3);
    runc.create(
        &a2,
        &[(ANNOTATION, "resize")],
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=30 2>/dev/null; exec sleep 600",
    )?;
    runc.start(&a2)?;
    let live = agent.wait_live("resize", &a2)?;
    let dir = root
        .hierarchy
        .mount
        .join(runc.cgroup(&a2).trim_start_matches('/'));
    let written = wait_for(Duration::from_secs(5), || {
        let max = root.hierarchy.max_limit(&dir)?;
        (max == want_max).then_some(max)
    });
    assert_eq!(
        written,
        Some(want_max),
        "limit in the container's cgroup (record {live})\n{}",
        agent.log()
    );
    assert_eq!(root.hierarchy.high_limit(&dir), Some(want_high));
    let audit = agent.get_ok("/v1/audit")?;
    let w = audit["audit"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["instance"] == a2.as_str()).cloned())
        .ok_or_else(|| anyhow::anyhow!("no audit record for {a2}: {audit}"))?;
    assert_eq!(
        (w["reason"].as_str(), w["outcome"].as_str()),
        (Some("new_instance"), Some("ok"))
    );
    assert_eq!(w["function"], "resize");
    runc.kill(&a2)?;
    runc.wait_stopped(&a2, Duration::from_secs(10))?;
    runc.delete(&a2)?;
    let ended = agent.wait_ended("resize", 2)?;
    assert_eq!(ended.len(), 2, "{ended:?}");
    // /v1/info's counters are brought up to date every second: nothing is left waiting.
    let info = wait_for(Duration::from_secs(5), || {
        let i = agent.get_ok("/v1/info").ok()?;
        (i["container_metadata"]["waiting"] == 0).then_some(i)
    });
    let info = info.ok_or_else(|| anyhow::anyhow!("a container still waits:\n{}", agent.log()))?;
    println!("container_metadata: {}", info["container_metadata"]);
    Ok(())
}

/// The memory limit a container was created with (`docker run --memory 64m`: the bundle's
/// `linux.resources.memory.limit`, which runc writes into the cgroup before its state) is a
/// ceiling: the function's larger limit (pinned 256 MiB) is clamped to it when the container
/// starts and at `emars apply`, and the audit says so; with `policy.override_runtime_limits`
/// the function's limit is written.
#[test]
fn the_limit_a_container_was_created_with_is_kept_as_a_ceiling() -> anyhow::Result<()> {
    const TEST: &str = "the_limit_a_container_was_created_with_is_kept_as_a_ceiling";
    if !require_root(TEST) {
        return Ok(());
    }
    for override_limits in [false, true] {
        let root = TestRoot::new()?;
        let Some(mut runc) = Oci::new(&root, "runc")? else {
            panic!(
                "{TEST}: runc or /bin/busybox (busybox-static) missing: run `cargo xtask setup`"
            );
        };
        let extra = format!(
            r#"[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{{64}})'
metadata = "{}/{{id}}/state.json"
function = "{{label:{ANNOTATION}}}"
instance = "{{id}}"

[policy]
mode = "enforce"
override_runtime_limits = {override_limits}

[[policy.functions]]
name = "capped"
pin_max_bytes = 268435456
"#,
            runc.state_root().display()
        );
        let agent = Agent::start_configured(&root, &extra)?;
        let id = container_id(10 + u32::from(override_limits));
        runc.create_limited(
            &id,
            &[(ANNOTATION, "capped")],
            "exec sleep 600",
            Some(64 * MIB),
        )?;
        runc.start(&id)?;
        agent.wait_live("capped", &id)?;
        let dir = root
            .hierarchy
            .mount
            .join(runc.cgroup(&id).trim_start_matches('/'));
        let audit_of = |reason: &str| {
            wait_for(Duration::from_secs(5), || {
                let a = agent.get_ok("/v1/audit").ok()?;
                a["audit"]
                    .as_array()?
                    .iter()
                    .find(|w| w["instance"] == id.as_str() && w["reason"] == reason)
                    .cloned()
            })
            .ok_or_else(|| anyhow::anyhow!("no {reason} record for {id}:\n{}", agent.log()))
        };
        let w = audit_of("new_instance")?;
        println!("override_runtime_limits = {override_limits}: {w}");
        if override_limits {
            assert_eq!(w["outcome"], "ok", "{w}");
            assert!(w.get("clamped_by").is_none(), "{w}");
            assert_eq!(u64_of(&w["new"], "max_bytes"), 256 * MIB, "{w}");
            assert_eq!(root.hierarchy.max_limit(&dir), Some(256 * MIB));
        } else {
            assert_eq!(w["clamped_by"], "runtime_limit", "{w}");
            assert_eq!(u64_of(&w["requested"], "max_bytes"), 256 * MIB, "{w}");
            assert_eq!(u64_of(&w["new"], "max_bytes"), 64 * MIB, "{w}");
            assert_eq!(root.hierarchy.max_limit(&dir), Some(64 * MIB));
            // memory.high (the soft limit) keeps the function's ratio under the clamped max.
            let high = root.hierarchy.high_limit(&dir).unwrap_or(u64::MAX);
            assert!((32 * MIB..64 * MIB).contains(&high), "high {high}");
            // A later write of the function's limits for every instance: clamped the same.
            let (s, b) = agent.post_raw("/v1/apply", "application/json", b"{}")?;
            assert_eq!(s, 200, "{b}");
            assert_eq!(root.hierarchy.max_limit(&dir), Some(64 * MIB));
            let applied = audit_of("apply")?;
            assert_eq!(applied["clamped_by"], "runtime_limit", "{applied}");
        }
        runc.kill(&id)?;
        runc.wait_stopped(&id, Duration::from_secs(10))?;
        runc.delete(&id)?;
        agent.wait_ended("capped", 1)?;
    }
    Ok(())
}

/// A limit someone else writes after the agent's own (a runtime that writes its limit after
/// the mkdir, which the agent answers at once; `docker update --memory`) is the runtime's
/// limit from then on: the next write of the function's limits (`emars apply`) is clamped to
/// it and says so.
#[test]
fn a_limit_written_after_the_agents_is_kept_as_a_ceiling() -> anyhow::Result<()> {
    const TEST: &str = "a_limit_written_after_the_agents_is_kept_as_a_ceiling";
    if !require_root(TEST) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        "\n[policy]\nmode = \"enforce\"\n[[policy.functions]]\nname = \"late\"\n\
         pin_max_bytes = 268435456\n",
    )?;
    let dir = root.instance_dir("late", "l1")?;
    let mut child = spawn_alloc(&dir, 8, 600_000, 0)?;
    let agents = wait_for(Duration::from_secs(5), || {
        root.hierarchy.max_limit(&dir).filter(|m| *m == 256 * MIB)
    });
    assert_eq!(agents, Some(256 * MIB), "{}", agent.log());
    // The runtime's own write, after the agent's.
    root.hierarchy.set_limit(&dir, 64 * MIB)?;
    let (s, b) = agent.post_raw("/v1/apply", "application/json", b"{}")?;
    assert_eq!(s, 200, "{b}");
    let w = b["writes"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["instance"] == "l1").cloned())
        .ok_or_else(|| anyhow::anyhow!("no apply write for l1: {b}"))?;
    assert_eq!(w["clamped_by"], "runtime_limit", "{w}");
    assert_eq!(u64_of(&w["new"], "max_bytes"), 64 * MIB, "{w}");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(64 * MIB));
    let _ = child.kill();
    child.wait()?;
    std::fs::remove_dir(&dir)?;
    Ok(())
}
