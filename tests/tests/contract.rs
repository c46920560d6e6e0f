//! The API contract as a third party checks it: schemathesis (PyPI, pinned and installed by
//! `cargo xtask setup` into target/tools/schemathesis) reads the OpenAPI document a real
//! enforce-mode agent serves, generates requests from it — valid and invalid ones, unlisted
//! methods, sequences that follow the document's links — and checks every answer against it.
//! The agent watches only this test's own cgroup root; it has real instances (ended and live)
//! of known memory and pooled cgroups to bind, and the tester is told their names, so that its
//! requests (bind → release and → limits, listings → limits) reach real instances and really
//! write limits into the test's own cgroups. The run must find no failure at all.

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use emars_tests::*;
use serde_json::Value;

const FUNCTION: &str = "contract";
/// A fixed seed, so that a failure is reproducible with the command line the test prints.
const SEED: u64 = 19;
/// Cases per operation in the fuzzing phase (the coverage and examples phases are
/// deterministic and bounded by the document): about 5,000 cases in all, a minute on a 2-core
/// host with a debug agent (two under heavy load).
const MAX_EXAMPLES: u32 = 300;
/// Steps per stateful scenario.
const STATEFUL_STEPS: u32 = 15;
const PHASES: [&str; 4] = ["examples", "coverage", "fuzzing", "stateful"];

/// The schemathesis command: $EMARS_SCHEMATHESIS, else the one `cargo xtask setup` installs
/// under the target directory (this test binary is target/<profile>/deps/contract-…).
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMARS_SCHEMATHESIS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    Some(target.join("tools/schemathesis/bin/schemathesis")).filter(|p| p.is_file())
}

/// The project settings of the run (schemathesis.toml): what the tester is told of the real
/// resources, and where the document says a valid request may still be refused.
fn config(doc: &Value, pool: &[String]) -> String {
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut cfg = format!(
        "[generation]\ndatabase = \"none\"\n\n\
         [phases.stateful]\nmax-steps = {STATEFUL_STEPS}\n\n\
         [dictionaries.functions]\nvalues = [{FUNCTION:?}]\n\
         [dictionaries.instances]\nvalues = [\"live\"]\n\
         [dictionaries.cgroups]\nvalues = [{}]\n\n\
         [parameters]\n\
         \"path.name\" = {{ dictionary = \"functions\", probability = 0.5 }}\n\
         \"query.function\" = {{ dictionary = \"functions\", probability = 0.5 }}\n\
         \"path.instance\" = {{ dictionary = \"instances\", probability = 0.5 }}\n\
         \"body.function\" = {{ dictionary = \"functions\", probability = 0.5 }}\n\
         \"body.cgroup\" = {{ dictionary = \"cgroups\", probability = 0.5 }}\n",
        quoted(pool)
    );
    // A 422 is the documented answer to a well-formed request that the agent refuses for
    // what it finds (usage, clock, roots): valid data may get it where the document says so.
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if op["responses"].get("422").is_some() {
                cfg.push_str(&format!(
                    "\n[[operations]]\ninclude-name = \"{} {path}\"\n\
                     checks.positive_data_acceptance.expected-statuses = \
                     [\"2xx\", \"3xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\"]\n",
                    method.to_uppercase()
                ));
            }
        }
    }
    cfg
}

#[test]
fn schemathesis_finds_no_failure_against_a_real_agent() -> anyhow::Result<()> {
    let test = "schemathesis_finds_no_failure_against_a_real_agent";
    if !require_root(test) {
        return Ok(());
    }
    let Some(st) = schemathesis() else {
        let why = "schemathesis is not installed (run `cargo xtask setup`, or point \
                   EMARS_SCHEMATHESIS at a schemathesis command)";
        if std::env::var("EMARS_TEST_ROOT_REQUIRED").as_deref() == Ok("1") {
            panic!("{test}: {why}");
        }
        skipped(test, why);
        return Ok(());
    };
    let version = Command::new(&st).arg("--version").output()?;
    assert!(version.status.success(), "{} does not run", st.display());
    println!("{}", String::from_utf8_lossy(&version.stdout).trim());

    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
             [[policy.functions]]\nname = \"{FUNCTION}\"\npin_max_bytes = 268435456\n"
        ),
    )?;
    // Real instances: two ended (8 and 16 MiB), one live holding 12 MiB.
    for (i, mib) in [8u64, 16].iter().enumerate() {
        let dir = root.instance_dir(FUNCTION, &format!("e{i}"))?;
        assert!(run_alloc(&dir, *mib, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(FUNCTION, 2)?;
    let live_dir = root.instance_dir(FUNCTION, "live")?;
    let mut child = spawn_alloc(&live_dir, 12, 600_000, 0)?;
    agent.wait_live(FUNCTION, "live")?;
    // Pooled cgroups (one segment below the root), named both ways the API takes them.
    let mut pool = Vec::new();
    for n in 1..=2 {
        let slot = root.dir.join(format!("cg-{n}"));
        fs::create_dir(&slot)?;
        pool.push(slot.display().to_string());
        pool.push(format!("{}/cg-{n}", root.rel));
    }

    let (status, doc) = agent.get("/v1/openapi.json")?;
    assert_eq!(status, 200);
    let work = tempfile::tempdir()?;
    let cfg = work.path().join("schemathesis.toml");
    fs::write(&cfg, config(&doc, &pool))?;
    let reports = work.path().join("reports");
    let mut cmd = Command::new(&st);
    cmd.arg("--config-file")
        .arg(&cfg)
        .arg("--no-color")
        .arg("run")
        .arg(agent.url("/v1/openapi.json"))
        .args(["--phases", &PHASES.join(",")])
        .args(["--seed", &SEED.to_string()])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--workers", "1", "--request-timeout", "20"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", agent.token),
        ])
        .args(["--report", "json,junit", "--report-json-path"])
        .arg(reports.join("schemathesis.json"))
        .arg("--report-junit-path")
        .arg(reports.join("junit.xml"))
        .current_dir(work.path())
        .stdin(Stdio::null());
    println!("$ {}", shown(&cmd, &agent.token));
    let started = Instant::now();
    let out = cmd.output()?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(
        &fs::read_to_string(reports.join("schemathesis.json"))
            .map_err(|e| anyhow::anyhow!("no JSON report ({e}); output:\n{stdout}"))?,
    )?;
    let cases = &report["test_cases"];
    println!(
        "schemathesis: {} cases generated, {} with failures ({} unique), {} errored, in {:.0?}",
        cases["generated"],
        cases["with_failures"],
        cases["unique_failures"],
        cases["errored"],
        took
    );
    let failures = report["failures"].as_array().cloned().unwrap_or_default();
    for f in &failures {
        println!(
            "FAILURE {} ×{}: {} in {}",
            f["code"], f["count"], f["title"], f["operations"]
        );
    }
    assert!(
        failures.is_empty() && report["errors"].as_array().is_some_and(Vec::is_empty),
        "schemathesis found failures or errors: {:#}\nagent log:\n{}",
        report["failures"],
        agent.log()
    );
    assert_eq!(report["exit_code"], 0, "{report:#}");
    assert!(out.status.success(), "schemathesis: {}", out.status);
    // Every phase ran (none skipped for want of something to do), every operation was tested.
    for phase in PHASES {
        assert_eq!(
            report["phases"][phase]["status"], "success",
            "phase {phase}: {}",
            report["phases"][phase]
        );
    }
    let ops = &report["operations"];
    assert_eq!(ops["tested"], ops["total"], "{ops}");
    assert!(cases["generated"].as_u64().unwrap_or(0) > 500, "{cases}");

    // The requests reached the real resources: the live instance got limits from the API, and
    // a pooled cgroup was bound and released.
    let audit = agent.get_ok("/v1/audit?limit=10000")?;
    let reasons: BTreeSet<(String, String)> = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["outcome"] == "ok")
        .map(|w| {
            (
                w["reason"].as_str().unwrap_or("").to_owned(),
                w["instance"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        reasons.contains(&("api".to_owned(), "live".to_owned())),
        "no limit written into the live instance through the API: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|(r, _)| r == "bind"),
        "no pooled cgroup bound: {reasons:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// The command line as printed: the token replaced.
fn shown(cmd: &Command, token: &str) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy().replace(token, "<token>"));
    }
    s
}
