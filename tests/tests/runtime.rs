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
