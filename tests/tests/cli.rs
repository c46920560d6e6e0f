//! The `emars` CLI against a real agent: what a user types, and what comes back.

use std::{fs, process::Command};

use emars_tests::*;

/// `emars ARGS` as root runs it: through the agent's local socket.
fn emars(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    run(agent.cli(args))
}

/// `emars ARGS` over TCP, with the token: for an agent elsewhere.
fn emars_tcp(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(agent_bin());
    c.args(args)
        .args(["--addr", &agent.addr])
        .arg("--token-file")
        .arg(&agent.token_file);
    run(c)
}

fn run(mut c: Command) -> (bool, String, String) {
    let out = c.output().expect("run emars");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_reports_what_the_api_knows() -> anyhow::Result<()> {
    if !require_root("cli_reports_what_the_api_knows") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    for i in 0..3 {
        let dir = root.instance_dir("clifn", &format!("c{i}"))?;
        run_alloc(&dir, 20, 0, 0)?;
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended("clifn", 3)?;

    let (ok, out, err) = emars(&agent, &["health"]);
    assert!(ok && out == "ok\n", "{out}{err}");
    let (ok, out, err) = emars(&agent, &["info"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cgroup mode") && out.contains("cgroup_mkdir"),
        "{out}"
    );

    let (ok, out, err) = emars(&agent, &["functions"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("clifn"))
        .unwrap_or_else(|| panic!("no clifn row:\n{out}"));
    assert!(
        line.split_whitespace().nth(1) == Some("3"),
        "3 instances: {line}"
    );

    let (ok, out, err) = emars(&agent, &["functions", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["functions"][0]["name"], "clifn");

    let (ok, out, err) = emars(&agent, &["function", "clifn"]);
    assert!(ok, "{err}");
    assert!(out.contains("instances:") && out.contains("c2"), "{out}");

    let (ok, out, err) = emars(&agent, &["recommend", "clifn", "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out)?;
    assert!(u64_of(&r, "max_bytes") >= 20 * MIB, "{r}");

    let (ok, out, err) = emars(&agent, &["invocations", "clifn", "4"]);
    assert!(ok, "{err}: {out}");
    // The same over TCP, told the address and the token file.
    let (ok, out, err) = emars_tcp(&agent, &["invocations", "clifn", "3"]);
    assert!(ok, "{err}: {out}");
    let (ok, out, _) = emars(&agent, &["export"]);
    assert!(ok && out.contains("\"requests_per_hour\": 7"), "{out}");

    // Observe mode (this agent's): the write commands are refused, naming the setting.
    for args in [
        &["apply"][..],
        &["set-limit", "clifn", "c0", "--max", "67108864"],
    ] {
        let (ok, out, err) = emars(&agent, args);
        assert!(!ok, "{args:?}: {out}");
        assert!(
            err.contains("409") && err.contains("policy.mode = \"enforce\""),
            "{args:?}: {err}"
        );
    }

    // Unknown function: non-zero exit and an error that says what was wrong.
    let (ok, _, err) = emars(&agent, &["function", "nobody"]);
    assert!(!ok);
    assert!(err.contains("nobody") && err.contains("404"), "{err}");
    // The agent's stderr is a pipe here, as under a service manager writing a file: plain
    // text, no colour escapes (which is what a log file used to get).
    let log = agent.log();
    assert!(log.contains("API listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal:\n{log}"
    );
    Ok(())
}

/// Shell completions: generated for each shell, and bash's loads and completes subcommands.
#[test]
fn completions_load_in_bash() -> anyhow::Result<()> {
    for (shell, marker) in [
        ("bash", "_emars()"),
        ("zsh", "#compdef emars"),
        ("fish", "complete -c emars"),
    ] {
        let out = Command::new(agent_bin())
            .args(["completions", shell])
            .output()?;
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell} completion lacks {marker:?}");
        assert!(
            text.contains("set-limit"),
            "{shell} completion lacks set-limit"
        );
    }
    // bash is the shell of the hosts this runs on; the VMs' initramfs has none.
    if find_program("bash").is_none() {
        skipped(
            "completions_load_in_bash",
            "no bash on this machine (the VM initramfs)",
        );
        return Ok(());
    }
    let script = tempfile::NamedTempFile::new()?;
    let out = Command::new(agent_bin())
        .args(["completions", "bash"])
        .output()?;
    fs::write(script.path(), &out.stdout)?;
    // Complete "emars se" as bash would at a prompt.
    let probe = format!(
        "source {}; COMP_WORDS=(emars se); COMP_CWORD=1; COMP_LINE='emars se'; COMP_POINT=8; \
         _emars emars se emars; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.path().display()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()?;
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{got}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(got.lines().collect::<Vec<_>>(), vec!["set-limit"], "{got}");
    Ok(())
}

/// Without an agent, the CLI says so once, with what to check: over TCP and at a socket.
#[test]
fn cli_without_agent_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("api.sock");
    let socket = socket.to_str().expect("utf-8 path");
    for (how, args) in [
        ("tcp", ["functions", "--addr", "127.0.0.1:1"]),
        ("socket", ["functions", "--socket", socket]),
    ] {
        let out = Command::new(agent_bin())
            .args(args)
            .output()
            .expect("run emars");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is the agent running"), "{how}: {err}");
        let cause = if how == "tcp" {
            "Connection refused"
        } else {
            "No such file or directory"
        };
        assert_eq!(err.matches(cause).count(), 1, "{how}: said once: {err}");
    }
}
