//! The deployment files: the systemd unit passes `systemd-analyze verify`, and the agent does
//! its whole job (programs attached, kernel side pinned, limits written at mkdir) with exactly
//! the capabilities the unit grants; the Kubernetes DaemonSet has the host mounts, host PID
//! and the same capabilities, and carries a config the agent accepts.

use std::{fs, path::PathBuf, process::Command, time::Duration};

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
    // verify checks that ExecStart's binary exists: point it at this build's.
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("emars.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/emars", &agent_bin().display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("emars.service"),
        "systemd-analyze has remarks on the unit:\n{err}"
    );
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
    Ok(())
}
