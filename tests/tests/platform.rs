//! The reference platform (`emars-platform`) end to end on a small trace of the Azure sample's
//! format, written here: a pool of real cgroups, real processes, the real agent, both modes.
//! It fails if either mode fails, if the modes saw different invocations, or if the agent did
//! not record every use the platform made (the binary checks that itself).

use std::{fs, process::Command};

use emars_tests::*;

#[test]
fn reference_platform_runs_both_modes_on_a_trace() -> anyhow::Result<()> {
    if !require_root("reference_platform_runs_both_modes_on_a_trace") {
        return Ok(());
    }
    let data = tempfile::tempdir()?;
    // Two functions over the sample's 60 minutes, of which four are replayed: "0" steady,
    // "1" bursty and larger.
    let minutes: Vec<String> = (1..=60).map(|m| m.to_string()).collect();
    let quiet = ",0".repeat(56);
    fs::write(
        data.path().join("invocation_traces_public.csv"),
        format!(
            "HashFunction,Trigger,{}\n0,http,4,4,4,4{quiet}\n1,http,0,6,0,6{quiet}\n",
            minutes.join(",")
        ),
    )?;
    fs::write(
        data.path().join("memory_traces_public.csv"),
        "HashFunction,SampleCount,AverageAllocatedMb,AverageAllocatedMb_pct1,AverageAllocatedMb_pct5,\
         AverageAllocatedMb_pct25,AverageAllocatedMb_pct50,AverageAllocatedMb_pct75,\
         AverageAllocatedMb_pct95,AverageAllocatedMb_pct99,AverageAllocatedMb_pct100,Ideal\n\
         0,10,40,30,32,36,40,44,48,50,52,40\n1,10,120,100,104,110,120,130,140,150,160,120\n",
    )?;
    fs::write(
        data.path().join("duration_traces_public.csv"),
        "HashFunction,Average,Count\n0,3000,16\n1,6000,12\n",
    )?;
    let scale = time_scale();
    let out = Command::new(env!("CARGO_BIN_EXE_emars-platform"))
        .args(["--data"])
        .arg(data.path())
        .args(["--functions", "2", "--minutes", "4", "--pool", "4"])
        .args(["--minute-ms", &(1000 * scale).to_string()])
        .args(["--mem-scale", "0.5", "--fixed-mib", "48"])
        .env("EMARS_BIN", agent_bin())
        .env("EMARS_ALLOC_BIN", alloc_bin())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}");
    let row = |mode: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{mode} ")))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (ol, em) = (row("openlambda"), row("emars"));
    // mode, invocations, cold starts, OOM kills, refused, GiB·min, uses, "K of N" advice.
    assert_eq!(ol.len(), 10, "{stdout}");
    assert_eq!(em.len(), 10, "{stdout}");
    // Same arrivals in both modes: 28 invocations.
    assert_eq!(ol[1], "28", "{stdout}");
    assert_eq!(em[1], "28", "{stdout}");
    // Every invocation that ran was one bind and one release (the binary checks that the
    // agent recorded each as an ended instance).
    for r in [&ol, &em] {
        let ran = 28 - r[4].parse::<u64>()?;
        assert_eq!(r[6], ran.to_string(), "{stdout}");
    }
    Ok(())
}
