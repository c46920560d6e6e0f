//! The deployment files: the systemd units pass `systemd-analyze verify`, and the agent does
//! its whole job (programs attached, kernel side pinned, limits written at mkdir) with exactly
//! the capabilities the unit grants; socket activation as emars.socket does it (the sockets
//! handed over, and held across a restart); the Kubernetes DaemonSet has the host mounts, host
//! PID and the same capabilities, and carries a config the agent accepts.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use emars_tests::*;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// `CAP_BPF CAP_PERFMON` from the unit's `CapabilityBoundingSet=`.
fn unit_capabilities(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn systemd_unit_verifies() -> anyhow::Result<()> {
    let unit = fs::read_to_string(repo_file("deploy/systemd/emars.service"))?;
    if find_program("systemd-analyze").is_none() {
        panic!("systemd-analyze missing (the systemd package): run `cargo xtask setup`");
    }
    // verify checks that ExecStart's binary exists: point it at this build's. The socket unit
    // sits beside it (the service requires it).
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("emars.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/emars", &agent_bin().display().to_string()),
    )?;
    let socket_unit = fs::read_to_string(repo_file("deploy/systemd/emars.socket"))?;
    let socket_copy = dir.path().join("emars.socket");
    fs::write(&socket_copy, &socket_unit)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .arg(&socket_copy)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("emars.service") && !err.contains("emars.socket"),
        "systemd-analyze has remarks on the units:\n{err}"
    );
    // The socket unit holds the agent's default addresses, private.
    for key in [
        "ListenStream=127.0.0.1:9750",
        "ListenStream=/run/emars/api.sock",
        "SocketMode=0600",
        "DirectoryMode=0700",
    ] {
        assert!(
            socket_unit.lines().any(|l| l == key),
            "the socket unit lacks {key}"
        );
    }
    assert!(unit.lines().any(|l| l == "Requires=emars.socket"), "{unit}");
    let caps = unit_capabilities(&unit);
    assert_eq!(
        caps,
        ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE"],
        "{unit}"
    );
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=emars",
        "ReadWritePaths=/sys/fs/cgroup /sys/fs/bpf",
    ] {
        assert!(unit.lines().any(|l| l == key), "the unit lacks {key}");
    }
    Ok(())
}

/// The agent with only the unit's capabilities in its bounding set (as systemd would run it):
/// every program attaches, its kernel side is pinned, and a new instance gets its limits.
#[test]
fn agent_works_with_the_units_capabilities_only() -> anyhow::Result<()> {
    let test = "agent_works_with_the_units_capabilities_only";
    if !require_root(test) {
        return Ok(());
    }
    let Some(setpriv) = find_program("setpriv") else {
        panic!("{test}: setpriv (util-linux) missing");
    };
    let unit = fs::read_to_string(repo_file("deploy/systemd/emars.service"))?;
    let bounding: Vec<String> = unit_capabilities(&unit)
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let wrapper = vec![
        setpriv.display().to_string(),
        "--inh-caps=-all".to_owned(),
        "--bounding-set".to_owned(),
        format!("-all,{}", bounding.join(",")),
    ];
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let agent = Agent::start_under(
        &root,
        &tmp.path().join("store"),
        "\n[policy]\nmode = \"enforce\"\n\
         [[policy.functions]]\nname = \"capped\"\npin_max_bytes = 134217728\n",
        None,
        &wrapper,
    )?;
    // The bounding set really is the unit's: no CAP_SYS_ADMIN (bit 21) in the agent.
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    assert_eq!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN left in {status}");
    let info = agent.get_ok("/v1/info")?;
    for p in ["cgroup_mkdir", "sched_process_exec", "oom_mark_victim"] {
        assert!(program_attached(&info, p), "{p} not attached: {info}");
    }
    assert!(info["probes_pinned"].is_string(), "not pinned: {info}");
    let dir = root.instance_dir("capped", "c1")?;
    let limit = wait_for(Duration::from_secs(5), || {
        root.hierarchy.max_limit(&dir).filter(|l| *l == 134217728)
    });
    assert_eq!(limit, Some(134217728), "no limit written:\n{}", agent.log());
    fs::remove_dir(&dir)?;
    agent.wait_ended("capped", 1)?;
    Ok(())
}

fn get<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(y, |y, k| &y[*k])
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kubernetes_daemonset_has_what_the_agent_needs() -> anyhow::Result<()> {
    let text = fs::read_to_string(repo_file("deploy/kubernetes/emars-daemonset.yaml"))?;
    let docs = YamlLoader::load_from_str(&text)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "DaemonSet"]);
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some(), "{d:?}");
        assert!(get(d, &["metadata", "name"]).as_str().is_some(), "{d:?}");
    }
    let ds = &docs[2];
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let spec = get(ds, &["spec", "template", "spec"]);
    let labels = get(ds, &["spec", "template", "metadata", "labels"]);
    let selector = get(ds, &["spec", "selector", "matchLabels"]);
    assert_eq!(labels, selector, "the selector must match the pod labels");
    assert_eq!(spec["hostPID"].as_bool(), Some(true));
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    let containers = spec["containers"].as_vec().cloned().unwrap_or_default();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(strings(get(sc, &["capabilities", "drop"])), ["ALL"]);
    // The same capabilities as the systemd unit (which a test runs the agent with).
    let unit = fs::read_to_string(repo_file("deploy/systemd/emars.service"))?;
    let want: Vec<String> = unit_capabilities(&unit)
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(strings(get(sc, &["capabilities", "add"])), want);
    // Every mount names a volume, and the host paths the agent reads are there.
    let volumes = spec["volumes"].as_vec().cloned().unwrap_or_default();
    let volume = |name: &str| volumes.iter().find(|v| v["name"].as_str() == Some(name));
    let mut host_paths = Vec::new();
    for m in c["volumeMounts"].as_vec().cloned().unwrap_or_default() {
        let name = m["name"].as_str().unwrap_or_default();
        let v = volume(name).unwrap_or_else(|| panic!("mount {name} has no volume"));
        if let Some(p) = get(v, &["hostPath", "path"]).as_str() {
            assert_eq!(m["mountPath"].as_str(), Some(p), "{name} mounted elsewhere");
            host_paths.push(p.to_owned());
        }
    }
    for p in [
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/sys/kernel/tracing",
        "/sys/kernel/btf",
        "/var/lib/emars",
    ] {
        assert!(host_paths.iter().any(|h| h == p), "no host mount of {p}");
    }
    // The config it carries is one the agent accepts.
    let config = get(&docs[1], &["data", "config.toml"])
        .as_str()
        .unwrap_or_default();
    assert!(!config.is_empty());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.toml");
    fs::write(&path, config)?;
    let out = Command::new(agent_bin())
        .arg("check-config")
        .arg(&path)
        .output()?;
    assert!(
        out.status.success(),
        "the DaemonSet's config is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args = strings(&c["args"]);
    assert_eq!(args, ["agent", "--config", "/etc/emars/config.toml"]);
    init_container_renders_a_scrapeable_config(spec, config)
}

/// The init container's script, run as it is (busybox's sh) on the ConfigMap's config: with
/// SCRAPE=1 the agent listens on the node's address, which is also the Host Prometheus sends,
/// and the agent accepts the result.
fn init_container_renders_a_scrapeable_config(spec: &Yaml, config: &str) -> anyhow::Result<()> {
    let inits = spec["initContainers"].as_vec().cloned().unwrap_or_default();
    assert_eq!(inits.len(), 1, "{spec:?}");
    let command = strings(&inits[0]["command"]);
    assert_eq!(command[..2], ["sh", "-c"]);
    let env = inits[0]["env"].as_vec().cloned().unwrap_or_default();
    let node_ip = env.iter().find(|e| e["name"].as_str() == Some("NODE_IP"));
    assert_eq!(
        node_ip.map(|e| get(e, &["valueFrom", "fieldRef", "fieldPath"]).clone()),
        Some(Yaml::String("status.hostIP".into()))
    );
    let Some(sh) = find_program("busybox") else {
        panic!("busybox missing (busybox-static): run `cargo xtask setup`");
    };
    let dir = tempfile::tempdir()?;
    let (template, out) = (dir.path().join("emars-template"), dir.path().join("emars"));
    fs::create_dir(&template)?;
    fs::create_dir(&out)?;
    fs::write(template.join("config.toml"), config)?;
    let script = command[2]
        .replace("/etc/emars-template", &template.display().to_string())
        .replace("/etc/emars", &out.display().to_string());
    for (scrape, listen) in [("1", "10.1.2.3:9750"), ("0", "127.0.0.1:9750")] {
        let status = Command::new(&sh)
            .args(["sh", "-c", &script])
            .env("SCRAPE", scrape)
            .env("NODE_IP", "10.1.2.3")
            .status()?;
        assert!(status.success(), "the init container's script failed");
        let rendered = out.join("config.toml");
        let out = Command::new(agent_bin())
            .arg("check-config")
            .arg(&rendered)
            .output()?;
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            shown.contains(&format!("listen = \"{listen}\"")),
            "SCRAPE={scrape}: {shown}"
        );
    }
    Ok(())
}

/// The agent started the way emars.socket starts it: `systemd-socket-activate` (systemd's own
/// tool) holds a TCP port and a local socket and starts the agent on the first connection,
/// handing both over; a supervisor loop (as systemd's Restart=) starts it again after a
/// `kill -9`. The agent serves on the sockets it was handed, and while it is down the port
/// cannot be taken and a CLI write through the socket waits for the next agent and lands.
#[test]
fn socket_activation_holds_the_port_across_a_restart() -> anyhow::Result<()> {
    let test = "socket_activation_holds_the_port_across_a_restart";
    if !require_root(test) {
        return Ok(());
    }
    let (Some(activate), Some(bash)) = (
        find_program("systemd-socket-activate"),
        find_program("bash"),
    ) else {
        panic!("{test}: systemd-socket-activate or bash missing (the systemd package): cargo xtask setup");
    };
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    fs::create_dir(&run)?;
    let socket = run.join("api.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:1\"\nsocket = \"{}/unused.sock\"\ntoken_file = \"{}/token\"\n\
             [store]\npath = \"{}/store\"\n[[cgroup.roots]]\npath = \"{}\"\n[probes]\npin_path = \"{}\"\n",
            tmp.path().display(),
            tmp.path().display(),
            tmp.path().display(),
            root.rel,
            root.pin_path.display()
        ),
    )?;
    // What systemd does for emars.service: start it again when it dies. LISTEN_PID names the
    // process the sockets are for: the agent, exec'd in place of the subshell.
    let supervisor =
        r#"for i in 1 2; do ( LISTEN_PID=$BASHPID exec "$0" agent --config "$1" ); sleep 1; done"#;
    let mut activator = Command::new(&activate)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--listen={}", socket.display()))
        .arg("--setenv=EMARS_LOG=info")
        .arg(&bash)
        .args(["-c", supervisor])
        .arg(agent_bin())
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let log = Arc::new(Mutex::new(String::new()));
    {
        let log = log.clone();
        let stderr = activator.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
    }
    let log_text = || log.lock().map(|l| l.clone()).unwrap_or_default();
    let result = (|| -> anyhow::Result<()> {
        let base = format!("http://127.0.0.1:{port}");
        let http = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10) * time_scale())
            .build();
        // The first connection starts the agent (it waits in the backlog meanwhile).
        let first = wait_for(Duration::from_secs(60), || {
            http.get(&format!("{base}/healthz")).call().ok()
        });
        anyhow::ensure!(
            first.is_some(),
            "no answer on the handed-over port:\n{}",
            log_text()
        );
        let text = log_text();
        anyhow::ensure!(
            text.contains("handed over by the service manager"),
            "the agent did not say it took the sockets:\n{text}"
        );
        // The config's own addresses were not bound besides.
        anyhow::ensure!(
            !tmp.path().join("unused.sock").exists() && text.contains(&format!("127.0.0.1:{port}")),
            "the agent bound api.socket or api.listen itself:\n{text}"
        );
        let agent = agent_pid(&config).ok_or_else(|| anyhow::anyhow!("no agent process"))?;
        // Kill it; a write through the socket meanwhile waits for the next agent.
        // SAFETY: signalling the agent this test started.
        unsafe { libc::kill(agent as i32, libc::SIGKILL) };
        let killed_at = Instant::now();
        let cli = Command::new(agent_bin())
            .args(["invocations", "activated", "4", "--new", "--socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The killed agent is gone (SIGKILL lands when the kernel next runs it: on a busy
        // host not at once); no agent runs then (the supervisor restarts it a second later),
        // and the port is still taken.
        let gone = wait_for(Duration::from_secs(5), || {
            (agent_pid(&config) != Some(agent)).then_some(())
        });
        anyhow::ensure!(gone.is_some(), "the agent outlived kill -9");
        anyhow::ensure!(
            agent_pid(&config).is_none(),
            "an agent runs right after kill -9"
        );
        let squat = std::net::TcpListener::bind(("127.0.0.1", port));
        anyhow::ensure!(squat.is_err(), "the port was free during the restart");
        let out = cli.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "the write during the restart failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            log_text()
        );
        let next = agent_pid(&config).ok_or_else(|| anyhow::anyhow!("no second agent"))?;
        anyhow::ensure!(next != agent, "the same agent answered after kill -9");
        println!(
            "{test}: restart answered the waiting write {:.1} s after kill -9",
            killed_at.elapsed().as_secs_f64()
        );
        let v: serde_json::Value = http
            .get(&format!("{base}/v1/functions/activated"))
            .call()?
            .into_json()?;
        anyhow::ensure!(v["invocations"] == 4, "{v}");
        Ok(())
    })();
    let _ = activator.kill();
    let _ = activator.wait();
    if let Some(pid) = agent_pid(&config) {
        // SAFETY: the agent this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    result
}

/// The pid of the agent running with `config`, from /proc.
fn agent_pid(config: &Path) -> Option<u32> {
    let want = config.display().to_string();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_agent = args.iter().any(|a| *a == b"agent")
            && args.contains(&want.as_bytes())
            && !args.iter().any(|a| *a == b"-c");
        is_agent.then_some(pid)
    })
}
