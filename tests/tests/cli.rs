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
    // A misspelt name is refused, and no function is made of it; --new reports for a function
    // before its first instance.
    let (ok, out, err) = emars(&agent, &["invocations", "clifnn", "5"]);
    assert!(!ok, "a typo was counted: {out}");
    assert!(
        err.contains("knows no function \"clifnn\"") && err.contains("--new"),
        "{err}"
    );
    let (s, _) = agent.get("/v1/functions/clifnn")?;
    assert_eq!(s, 404, "the typo made a function");
    let (ok, out, err) = emars(&agent, &["invocations", "clifresh", "2", "--new"]);
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

/// `emars ARGS` with no flag naming the agent: what the config given in `env` (EMARS_CONFIG)
/// says.
fn emars_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> (bool, String, String) {
    let mut c = Command::new(agent_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(c)
}

/// The CLI given the agent's config (`--config`, `EMARS_CONFIG`) finds the agent through that
/// config's socket, with no other flag; `--max 64Mi` writes 67108864 bytes; `unpin` says which
/// directory of which config it acts on before anything; with the socket off in the config,
/// writes go over TCP with the config's token to a listener of the token's owner, and to
/// nobody else's (a squatter as `nobody` gets no byte).
#[test]
fn the_cli_follows_the_agents_config() -> anyhow::Result<()> {
    let test = "the_cli_follows_the_agents_config";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(&root, "[policy]\nmode = \"enforce\"\n")?;
    let dir = root.instance_dir("cfgfn", "i0")?;
    let _child = KillOnDrop(spawn_alloc(&dir, 8, 120_000, 0)?);
    agent.wait_live("cfgfn", "i0")?;
    let config = agent.config_path.display().to_string();

    let (ok, out, err) = emars_env(&["functions", "--config", &config], &[]);
    assert!(ok && out.contains("cfgfn"), "{out}{err}");
    let env = [("EMARS_CONFIG", agent.config_path.as_path())];
    let (ok, out, err) = emars_env(&["set-limit", "cfgfn", "i0", "--max", "64Mi"], &env);
    assert!(ok && out.contains("64.0 MiB"), "{out}{err}");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(67_108_864));
    // A size in a form people write but Kubernetes does not: refused before anything is sent.
    let (ok, _, err) = emars_env(&["set-limit", "cfgfn", "i0", "--max", "96MB"], &env);
    assert!(!ok && err.contains("write Mi for MiB"), "{err}");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(67_108_864));

    let (ok, _, err) = emars_env(&["unpin"], &env);
    assert!(!ok, "unpin while the agent runs: {err}");
    let said = format!(
        "unpinning under {} (probes.pin_path of {config})",
        root.pin_path.display()
    );
    assert!(err.starts_with(&said), "{err}");

    // The socket off: TCP to api.listen, with api.token_file's token (the agent is root's, and
    // so is the file).
    let tmp = tempfile::tempdir()?;
    let tcp_config = |listen: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = tmp
            .path()
            .join(format!("tcp-{}.toml", listen.replace(':', "-")));
        fs::write(
            &path,
            format!(
                "[api]\nlisten = \"{listen}\"\nsocket = \"\"\ntoken_file = \"{}\"\n",
                agent.token_file.display()
            ),
        )?;
        Ok(path)
    };
    let own = tcp_config(&agent.addr)?;
    let (ok, out, err) = emars_env(
        &["set-limit", "cfgfn", "i0", "--max", "0.09375Gi"],
        &[("EMARS_CONFIG", own.as_path())],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(96 * MIB));

    // A port held by nobody: the write is not sent there at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let squatted = format!("127.0.0.1:{port}");
    let (keep, squat) = copy_for_nobody(&squat_bin())?;
    let log = keep.path().join("squatted.log");
    fs::write(&log, b"")?;
    fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let mut squatter = {
        use std::os::unix::process::CommandExt as _;
        let mut c = Command::new(&squat);
        c.args(["--tcp", &squatted, "--log"])
            .arg(&log)
            .uid(NOBODY)
            .gid(NOBODY)
            .current_dir("/")
            .stdout(std::process::Stdio::piped());
        KillOnDrop(c.spawn()?)
    };
    let mut line = String::new();
    let out = squatter
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    assert_eq!(line.trim(), "listening");
    let theirs = tcp_config(&squatted)?;
    let (ok, _, err) = emars_env(
        &["set-limit", "cfgfn", "i0", "--max", "128Mi"],
        &[("EMARS_CONFIG", theirs.as_path())],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("the write was not sent") && err.contains(&format!("is held by uid {NOBODY}")),
        "{err}"
    );
    assert_eq!(fs::read(&log)?, b"", "the squatter received bytes");
    assert_eq!(root.hierarchy.max_limit(&dir), Some(96 * MIB));
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

/// Without an agent, the CLI says so once, with what it tried and what to check (whether the
/// agent runs, and whether the flags or the config name it): over TCP, at a socket, and at the
/// socket of a config.
#[test]
fn cli_without_agent_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("api.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let config = tmp.path().join("config.toml");
    fs::write(&config, format!("[api]\nsocket = \"{socket}\"\n")).expect("config");
    let config = config.to_str().expect("utf-8 path");
    for (how, args, tried, check) in [
        (
            "tcp",
            ["functions", "--addr", "127.0.0.1:1"],
            "http://127.0.0.1:1 (--addr)".to_owned(),
            "is that its api.listen",
        ),
        (
            "socket",
            ["functions", "--socket", socket],
            format!("unix:{socket} (--socket)"),
            "--config FILE",
        ),
        (
            "config",
            ["functions", "--config", config],
            format!("unix:{socket} (api.socket of {config})"),
            "--config FILE",
        ),
    ] {
        let out = Command::new(agent_bin())
            .args(args)
            .output()
            .expect("run emars");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is the agent running"), "{how}: {err}");
        assert!(
            err.contains(&format!("cannot reach the EMARS agent at {tried}: ")),
            "{how}: {err}"
        );
        assert!(err.contains(check), "{how}: {err}");
        let cause = if how == "tcp" {
            "Connection refused"
        } else {
            "No such file or directory"
        };
        assert_eq!(err.matches(cause).count(), 1, "{how}: said once: {err}");
    }
}
