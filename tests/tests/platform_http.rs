//! The reference platform's HTTP mode (`emars-platform --http`) end to end: every invocation of
//! a small trace one real HTTP request into a warm sandbox (an instance cgroup with the tests'
//! function server inside, over a keep-alive connection the platform holds), no platform
//! report. The agent's per-function requests, counted in the kernel, must be the trace's
//! exactly; the binary fails otherwise, and this test reads its JSON.
//!
//! A test binary of its own (not in platform.rs): the VM matrix runs it, and the two-mode runs
//! of platform.rs would take minutes there.

use std::{fs, process::Command};

use emars_tests::*;
use serde_json::Value;

/// Three functions over four trace minutes: "0" steady (one sandbox kept warm), "1" bursty,
/// "2" busy and long (several sandboxes at once, each serving many requests).
fn write_trace(dir: &std::path::Path) -> anyhow::Result<()> {
    let minutes: Vec<String> = (1..=60).map(|m| m.to_string()).collect();
    let quiet = ",0".repeat(56);
    fs::write(
        dir.join("invocation_traces_public.csv"),
        format!(
            "HashFunction,Trigger,{}\n0,http,4,4,4,4{quiet}\n1,http,0,6,0,6{quiet}\n\
             2,http,20,20,20,20{quiet}\n",
            minutes.join(",")
        ),
    )?;
    fs::write(
        dir.join("memory_traces_public.csv"),
        "HashFunction,SampleCount,AverageAllocatedMb,AverageAllocatedMb_pct1,AverageAllocatedMb_pct5,\
         AverageAllocatedMb_pct25,AverageAllocatedMb_pct50,AverageAllocatedMb_pct75,\
         AverageAllocatedMb_pct95,AverageAllocatedMb_pct99,AverageAllocatedMb_pct100,Ideal\n\
         0,10,40,30,32,36,40,44,48,50,52,40\n1,10,120,100,104,110,120,130,140,150,160,120\n\
         2,10,24,16,16,20,24,28,30,32,32,24\n",
    )?;
    fs::write(
        dir.join("duration_traces_public.csv"),
        "HashFunction,Average,Count\n0,3000,16\n1,6000,12\n2,20000,80\n",
    )?;
    Ok(())
}

#[test]
fn http_sandboxes_requests_are_counted_exactly_per_function() -> anyhow::Result<()> {
    if !require_root("http_sandboxes_requests_are_counted_exactly_per_function") {
        return Ok(());
    }
    let data = tempfile::tempdir()?;
    write_trace(data.path())?;
    let json = data.path().join("http.json");
    let out = Command::new(platform_bin())
        .arg("--http")
        .arg("--data")
        .arg(data.path())
        .args(["--functions", "3", "--minutes", "4", "--pool", "16"])
        .args(["--minute-ms", &(600 * time_scale()).to_string()])
        .args(["--mem-scale", "0.25", "--fixed-mib", "128"])
        .arg("--json")
        .arg(&json)
        .env("EMARS_BIN", agent_bin())
        .env("EMARS_HTTP_SERVER_BIN", http_server_bin())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    // The binary's own check: exit 1 unless every function's requests were counted exactly.
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: Value = serde_json::from_slice(&fs::read(&json)?)?;
    assert_eq!(v["mode"], "http", "{v}");
    assert_eq!(
        (
            u64_of(&v, "functions_total"),
            u64_of(&v, "functions_matched")
        ),
        (3, 3),
        "{v}"
    );
    // Every invocation of the trace sent once and counted once: 16 + 12 + 80.
    assert_eq!(
        (u64_of(&v, "sent"), u64_of(&v, "counted")),
        (108, 108),
        "{v}"
    );
    let functions = v["functions"].as_array().cloned().unwrap_or_default();
    let by_trace: [(&str, u64); 3] = [("az0", 16), ("az1", 12), ("az2", 80)];
    for (name, n) in by_trace {
        let f = functions
            .iter()
            .find(|f| f["function"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"));
        assert_eq!((u64_of(f, "sent"), u64_of(f, "counted")), (n, n), "{f}");
        assert_eq!((u64_of(f, "failed"), u64_of(f, "dropped")), (0, 0), "{f}");
        assert_eq!(f["requests_source"], "kernel_requests", "{f}");
        assert_eq!(u64_of(f, "platform_reports"), 0, "{f}");
        // One kept-alive connection per sandbox, each counted once.
        assert_eq!(u64_of(f, "connections"), u64_of(f, "sandboxes"), "{f}");
        assert!(u64_of(f, "sandboxes") >= 1, "{f}");
    }
    // The busy function ran sandboxes side by side, and kept-alive ones served many requests
    // each: fewer connections than requests is what only request counting sees.
    let busy = functions
        .iter()
        .find(|f| f["function"] == "az2")
        .cloned()
        .unwrap_or_default();
    assert!(u64_of(&busy, "sandboxes") > 1, "{busy}");
    assert!(
        u64_of(&busy, "sandboxes") * 2 < u64_of(&busy, "sent"),
        "{busy}"
    );
    Ok(())
}
