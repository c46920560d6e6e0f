//! `emars tune` on a real kernel: a workload of known size (emars-alloc, 40 MiB) under limits
//! below and above it, in the real cgroups the command creates and removes.

use std::{fs, process::Command};

use emars_tests::*;
use serde_json::Value;

/// Runs `emars tune ARGS`; returns (success, stdout, stderr) and checks that its cgroup root is
/// gone afterwards.
fn tune(args: &[&str], cmd: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let child = Command::new(agent_bin())
        .arg("tune")
        .args(args)
        .arg("--")
        .args(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let h = Hierarchy::detect()?;
    let left = h.mount.join(format!("emars-tune-{pid}"));
    assert!(!left.exists(), "{} was left behind", left.display());
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn limit(report: &Value, mib: u64) -> &Value {
    report["limits"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["limit_bytes"] == mib * MIB))
        .unwrap_or_else(|| panic!("no {mib} MiB in {report:#}"))
}

#[test]
fn tune_finds_the_knee_of_a_40_mib_function() -> anyhow::Result<()> {
    let test = "tune_finds_the_knee_of_a_40_mib_function";
    if !require_root(test) {
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let dir = out.path().join("tune");
    let alloc = alloc_bin();
    let (ok, stdout, stderr) = tune(
        &[
            "--limits",
            "16Mi,32Mi,64Mi,128Mi",
            // Three runs: a true median, which one slow run cannot move.
            "--runs",
            "3",
            "--out",
            &dir.display().to_string(),
        ],
        &[
            &alloc.display().to_string(),
            "--mib",
            "40",
            // Long enough that the knee's 10 % latency tolerance (30 ms) is above the noise
            // of a loaded 2-core host.
            "--hold-ms",
            "300",
        ],
    )?;
    assert!(ok, "emars tune failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    let report: Value = serde_json::from_str(&fs::read_to_string(dir.join("tune.json"))?)?;

    let base = &report["baseline"];
    assert_eq!(base["runs"], 3, "{report:#}");
    assert_eq!(base["failures"], 0, "{report:#}");
    let base_peak = u64_of(base, "peak_bytes");
    assert!(
        (40 * MIB..48 * MIB).contains(&base_peak),
        "40 MiB and the program itself: {base_peak}"
    );
    for mib in [16, 32] {
        let r = limit(&report, mib);
        assert_eq!(r["runs"], 3, "{r}");
        assert_eq!(
            u64_of(r, "oom_kills"),
            3,
            "{mib} MiB: every run OOM-killed: {r}"
        );
        assert_eq!(u64_of(r, "failures"), 3, "{r}");
        assert!(
            u64_of(r, "peak_bytes") <= mib * MIB,
            "held to the limit: {r}"
        );
    }
    for mib in [64, 128] {
        let r = limit(&report, mib);
        assert_eq!(u64_of(r, "oom_kills"), 0, "{mib} MiB: no OOM: {r}");
        assert_eq!(u64_of(r, "failures"), 0, "{r}");
        assert!(
            close_to_watermark(u64_of(r, "peak_bytes"), base_peak),
            "{r}"
        );
    }
    assert_eq!(
        report["knee_bytes"],
        64 * MIB,
        "the knee is 64 MiB:\n{stdout}\n{report:#}"
    );
    assert!(
        stdout.contains("<- knee") && stdout.contains("knee: 64.0 MiB"),
        "{stdout}"
    );
    let svg = fs::read_to_string(dir.join("tune.svg"))?;
    assert!(svg.contains("knee 64 MiB"), "the knee is marked:\n{svg}");
    assert!(
        svg.contains("memory limit (MiB)") && svg.contains("OOM kills"),
        "{svg}"
    );
    Ok(())
}

#[test]
fn tune_refuses_bad_input_clearly() -> anyhow::Result<()> {
    let test = "tune_refuses_bad_input_clearly";
    if !require_root(test) {
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let dir = out.path().join("never");
    let d = dir.display().to_string();
    let (ok, _, stderr) = tune(&["--limits", "16M,12Q", "--out", &d], &["true"])?;
    assert!(!ok, "a bad size is an error");
    assert!(
        stderr.contains("bad size \"12Q\" in --limits: unknown unit"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing written for a refused command line");

    let (ok, _, stderr) = tune(&["--limits", "100", "--out", &d], &["true"])?;
    assert!(!ok && stderr.contains("below one page"), "{stderr}");

    let (ok, _, stderr) = tune(&["--limits", "64M", "--out", &d], &["/nonexistent/fn"])?;
    assert!(!ok, "a command that cannot run is an error");
    assert!(
        stderr.contains("running /nonexistent/fn: No such file"),
        "{stderr}"
    );

    let (ok, _, stderr) = tune(&["--limits", "64M", "--out", &d], &["false"])?;
    assert!(!ok && stderr.contains("failed without a limit"), "{stderr}");

    // Without `-- CMD` clap refuses the command line.
    let status = Command::new(agent_bin())
        .args(["tune", "--limits", "64M"])
        .stderr(std::process::Stdio::null())
        .status()?;
    assert!(!status.success());
    Ok(())
}
