//! The write path as an attacker would try it: an unprivileged local user, a web page in a
//! browser on the host, a cgroup swapped under the agent, symlinks planted where the agent
//! writes, a full disk under the audit log, `kill -9` right after a write, clients that never
//! finish their requests. Real agent, real users, real cgroups.

use std::{
    fs,
    io::Write as _,
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context};
use emars_tests::*;
use serde_json::Value;

/// The hard and soft limit files of a cgroup as raw text (what must not change).
fn limit_text(h: &Hierarchy, dir: &Path) -> (String, String) {
    let (max, high) = h.limit_files();
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    (read(max), read(high))
}

fn start(root: &TestRoot, policy: &str) -> anyhow::Result<Agent> {
    Agent::start_configured(
        root,
        &format!("\n[policy]\nexport_dir = \"{{dir}}/export\"\nmode = \"enforce\"\n{policy}\n"),
    )
}

/// A function with a known recommendation, and a live instance of it holding `mib` MiB.
fn live_instance(
    root: &TestRoot,
    agent: &Agent,
    function: &str,
    mib: u64,
) -> anyhow::Result<(PathBuf, std::process::Child)> {
    let dir = root.instance_dir(function, "live")?;
    let child = spawn_alloc(&dir, mib, 120_000, 0)?;
    agent.wait_live(function, "live")?;
    wait_for(Duration::from_secs(5), || {
        (root.hierarchy.usage(&dir).ok()? >= mib * MIB).then_some(())
    })
    .ok_or_else(|| anyhow!("instance not running with {mib} MiB"))?;
    Ok((dir, child))
}

fn audit_len(agent: &Agent) -> anyhow::Result<usize> {
    let a = agent.get_ok("/v1/audit")?;
    Ok(a["audit"].as_array().map_or(0, Vec::len))
}

/// Every write route of the API, with a body it would accept from root. Admission writes no
/// limit but counts its answers (GET /v1/admission, /metrics): a write all the same.
const WRITES: [(&str, &str, &str); 6] = [
    ("POST", "/v1/apply", "{}"),
    ("POST", "/v1/recommendations/generate", "{}"),
    ("POST", "/v1/functions/sec/invocations", r#"{"count": 1}"#),
    (
        "POST",
        "/v1/functions/sec/instances/live/limits",
        r#"{"max_bytes": 67108864}"#,
    ),
    ("POST", "/v1/admission", r#"{"function": "sec"}"#),
    // Methods and routes that do not exist yet are refused before anything else.
    ("DELETE", "/v1/functions/sec", ""),
];

/// As `nobody`: the CLI's write commands and raw requests to every write route are refused;
/// the live instance's limit files and the audit log are unchanged.
#[test]
fn nobody_cannot_write() -> anyhow::Result<()> {
    if !require_root("nobody_cannot_write") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    let (dir, mut child) = live_instance(&root, &agent, "sec", 16)?;
    let before = limit_text(&root.hierarchy, &dir);
    let audit_before = audit_len(&agent)?;

    // The token is root's alone.
    let mode = fs::metadata(&agent.token_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode {mode:o}");
    let store_mode = fs::metadata(&agent.store)?.permissions().mode() & 0o777;
    assert_eq!(store_mode, 0o700, "store mode {store_mode:o}");

    let (_keep, cli) = copy_for_nobody(&agent_bin())?;
    let commands: [&[&str]; 5] = [
        &["apply"],
        &["set-limit", "sec", "live", "--max", "64Mi"],
        &["recommend", "--generate"],
        &["invocations", "sec", "3"],
        &["admit", "sec"],
    ];
    for args in commands {
        let mut cmd = Command::new(&cli);
        cmd.args(args)
            .args(["--addr", &agent.addr, "--token-file"])
            .arg(&agent.token_file);
        let (ok, out, err) = run_as_nobody(cmd)?;
        assert!(!ok, "{args:?} succeeded as nobody: {out}");
        assert!(
            err.contains("401") && err.contains("cannot be read by this user"),
            "{args:?}: {err}"
        );
        // Through the local socket: the kernel refuses nobody (root's directory).
        let mut cmd = Command::new(&cli);
        cmd.args(args).arg("--socket").arg(&agent.socket);
        let (ok, out, err) = run_as_nobody(cmd)?;
        assert!(!ok, "{args:?} succeeded as nobody over the socket: {out}");
        assert!(err.contains("the socket is root's"), "{args:?}: {err}");
    }
    // The same user can still read.
    let mut cmd = Command::new(&cli);
    cmd.args(["functions", "--addr", &agent.addr]);
    let (ok, out, err) = run_as_nobody(cmd)?;
    assert!(ok && out.contains("sec"), "{out}{err}");

    // Raw requests without the token, or with a wrong one, on every write route.
    for (method, path, body) in WRITES {
        for auth in [None, Some("Bearer 0000"), Some("Basic cm9vdDpyb290")] {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let (s, b) = agent.request(method, path, &headers, body.as_bytes())?;
            assert_eq!(s, 401, "{method} {path} with {auth:?}: {b}");
        }
    }
    assert_eq!(limit_text(&root.hierarchy, &dir), before);
    assert_eq!(audit_len(&agent)?, audit_before);
    let f = agent.get_ok("/v1/functions/sec")?;
    assert_eq!(f["invocations"], 0, "no invocation was recorded");
    let counted = agent.get_ok("/v1/admission")?;
    assert_eq!(
        counted["functions"],
        serde_json::json!({}),
        "no admission was counted"
    );

    // Root, with the token, may.
    let (s, b) = agent.post_raw(WRITES[3].1, "application/json", WRITES[3].2.as_bytes())?;
    assert_eq!(s, 200, "{b}");
    assert_ne!(limit_text(&root.hierarchy, &dir), before);
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// What a web page can make a browser send: a cross-origin form POST, a rebound Host name, a
/// cross-site fetch. Refused on every route, with the token or without.
#[test]
fn browser_requests_are_refused() -> anyhow::Result<()> {
    if !require_root("browser_requests_are_refused") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    let (dir, mut child) = live_instance(&root, &agent, "sec", 16)?;
    let before = limit_text(&root.hierarchy, &dir);
    let auth = format!("Bearer {}", agent.token);
    let port = agent.addr.rsplit(':').next().unwrap_or("0").to_owned();
    let evil_host = format!("evil.example:{port}");
    let own_host = format!("127.0.0.1:{port}");
    let own_origin = format!("http://{own_host}");
    let limits = "/v1/functions/sec/instances/live/limits";
    // (method, path, headers, body, expected status)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str, u16);
    let cases: Vec<Case> = vec![
        // A plain HTML form: urlencoded, cross-origin, body-less route.
        (
            "POST",
            "/v1/apply",
            vec![
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", "http://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            "",
            403,
        ),
        // The same form, even if it somehow carried the token.
        (
            "POST",
            "/v1/apply",
            vec![
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", "http://evil.example"),
                ("Authorization", &auth),
            ],
            "",
            403,
        ),
        // text/plain is what a no-preflight fetch can send; refused even same-origin.
        (
            "POST",
            limits,
            vec![("Content-Type", "text/plain"), ("Authorization", &auth)],
            r#"{"max_bytes": 67108864}"#,
            415,
        ),
        // DNS rebinding: a page at evil.example:PORT resolved to 127.0.0.1.
        (
            "POST",
            limits,
            vec![
                ("Host", &evil_host),
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            r#"{"max_bytes": 67108864}"#,
            403,
        ),
        ("GET", "/v1/functions", vec![("Host", &evil_host)], "", 403),
        (
            "GET",
            "/v1/audit",
            vec![("Origin", "http://evil.example")],
            "",
            403,
        ),
        (
            "GET",
            "/v1/info",
            vec![("Sec-Fetch-Site", "cross-site")],
            "",
            403,
        ),
        // The agent's own origin is fine.
        (
            "GET",
            "/v1/info",
            vec![
                ("Host", &own_host),
                ("Origin", &own_origin),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            "",
            200,
        ),
    ];
    for (method, path, headers, body, want) in cases {
        let (s, b) = agent.request(method, path, &headers, body.as_bytes())?;
        assert_eq!(s, want, "{method} {path} {headers:?}: {b}");
        if want != 200 {
            assert!(b["error"].is_string(), "{b}");
        }
    }
    assert_eq!(limit_text(&root.hierarchy, &dir), before);
    assert_eq!(audit_len(&agent)?, 0);
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Listening beyond loopback needs `api.allow_remote = true`; the error names both keys.
#[test]
fn non_loopback_listen_needs_explicit_consent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    fs::write(&cfg, "[api]\nlisten = \"0.0.0.0:9750\"\n")?;
    let out = Command::new(agent_bin())
        .args(["check-config"])
        .arg(&cfg)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("api.listen") && err.contains("api.allow_remote"),
        "{err}"
    );
    fs::write(
        &cfg,
        "[api]\nlisten = \"0.0.0.0:9750\"\nallow_remote = true\nallowed_hosts = [\"node-1.example\"]\n",
    )?;
    let out = Command::new(agent_bin())
        .args(["check-config"])
        .arg(&cfg)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The command-line override obeys the same rule.
    let mut agent = Command::new(agent_bin())
        .args(["agent", "--listen", "0.0.0.0:0", "--store"])
        .arg(dir.path().join("store"))
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let exited = wait_for(Duration::from_secs(10), || agent.try_wait().ok().flatten());
    if exited.is_none() {
        agent.kill()?;
    }
    let out = agent.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited.is_some(), "the agent started on 0.0.0.0: {err}");
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("api.allow_remote"), "{err}");
    Ok(())
}

/// A cgroup removed and created again under the same path between the agent's record and the
/// write is another cgroup: it is not written, and the audit says why. The mkdir/rmdir programs
/// are off so the agent keeps its old record (as when events are lost) until reconciliation.
#[test]
fn recreated_cgroup_is_not_written() -> anyhow::Result<()> {
    if !require_root("recreated_cgroup_is_not_written") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let dir = root.instance_dir("swap", "i1")?;
    let marker = root.instance_dir("swap", "marker")?;
    let agent = start(
        &root,
        "[probes]\ndisable = [\"cgroup_mkdir\", \"raw_cgroup_rmdir\", \"cgroup_rmdir\"]\n",
    )?;
    let old_id = u64_of(&agent.wait_live("swap", "i1")?, "cgroup_id");
    // Right after a reconciliation pass (every 10 s), so the agent's record stays stale
    // while the swap and the write happen: a throwaway cgroup's removal marks the pass.
    let reconciled = |a: &Agent| {
        a.get_ok("/v1/info")
            .map(|i| u64_of(&i, "instances_reconciled"))
            .unwrap_or(0)
    };
    let n0 = reconciled(&agent);
    fs::remove_dir(&marker)?;
    wait_for(Duration::from_secs(15), || {
        (reconciled(&agent) > n0).then_some(())
    })
    .ok_or_else(|| anyhow!("no reconciliation pass:\n{}", agent.log()))?;

    fs::remove_dir(&dir)?;
    let dir = root.instance_dir("swap", "i1")?;
    let new_id = fs::metadata(&dir).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    assert_ne!(new_id, old_id);
    let before = limit_text(&root.hierarchy, &dir);
    let (s, b) = agent.post_raw(
        "/v1/functions/swap/instances/i1/limits",
        "application/json",
        br#"{"max_bytes": 134217728}"#,
    )?;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("created again")),
        "{b}"
    );
    assert_eq!(limit_text(&root.hierarchy, &dir), before);
    let audit = agent.get_ok("/v1/audit")?;
    let rec = &audit["audit"][0];
    assert_eq!(rec["outcome"], "refused", "{audit}");
    assert_eq!(rec["cgroup_id"], old_id);
    Ok(())
}

/// POST /v1/recommendations/generate once no other generation runs (the start-up one may:
/// 409 while it does); (status, body).
fn generate(agent: &Agent) -> anyhow::Result<(u16, Value)> {
    wait_for(Duration::from_secs(10), || {
        let r = agent
            .post_raw("/v1/recommendations/generate", "application/json", b"{}")
            .ok()?;
        (r.0 != 409).then_some(r)
    })
    .ok_or_else(|| anyhow!("generation busy for 10 s"))
}

/// Symlinks planted where the exporter writes are replaced or refused, never followed.
#[test]
fn export_never_follows_planted_symlinks() -> anyhow::Result<()> {
    if !require_root("export_never_follows_planted_symlinks") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let victims = tempfile::tempdir()?;
    let victim = |n: &str| victims.path().join(n);
    let agent = start(&root, "")?;
    let export = agent
        .store
        .parent()
        .ok_or_else(|| anyhow!("store has no parent"))?
        .join("export");
    fs::create_dir_all(&export)?;
    // The agent of the last version wrote through fixed temporary names; plant links at
    // those and at the targets themselves.
    let names = [
        ".emars-config.json.tmp",
        ".emars-config.toml.tmp",
        "emars-config.json",
        "emars-config.toml",
    ];
    for n in names {
        fs::write(victim(n), "precious")?;
        let _ = fs::remove_file(export.join(n));
        std::os::unix::fs::symlink(victim(n), export.join(n))?;
    }
    let (s, b) = generate(&agent)?;
    assert_eq!(s, 200, "{b}");
    for n in names {
        assert_eq!(fs::read_to_string(victim(n))?, "precious", "{n} followed");
    }
    for n in &names[2..] {
        let meta = fs::symlink_metadata(export.join(n))?;
        assert!(meta.file_type().is_file(), "{n} is not a regular file now");
    }
    let json: Value = serde_json::from_str(&fs::read_to_string(export.join(names[2]))?)?;
    assert_eq!(json["trigger"], "on_demand");
    drop(agent);

    // The export directory itself planted as a link: refused with a clear error.
    let linked = tempfile::tempdir()?;
    let target = victims.path().join("dir");
    fs::create_dir(&target)?;
    std::os::unix::fs::symlink(&target, linked.path().join("export"))?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nexport_dir = \"{}\"\n",
            linked.path().join("export").display()
        ),
    )?;
    let (s, b) = generate(&agent)?;
    assert_eq!(s, 500, "{b}");
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("symbolic link")),
        "{b}"
    );
    assert_eq!(fs::read_dir(&target)?.count(), 0, "nothing written there");
    Ok(())
}

/// A tmpfs of our own, unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("fs");
        fs::create_dir(&path)?;
        // libc rather than mount(8): the VM's initramfs has no mount binary.
        let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        let data = std::ffi::CString::new(format!("size={size}"))?;
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        anyhow::ensure!(
            rc == 0,
            "mounting a tmpfs at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(Tmpfs(path, dir))
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> anyhow::Result<PathBuf> {
        let p = self.0.join("filler");
        let mut f = fs::File::create(&p)?;
        let block = vec![0xa5u8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Fill the last partial page too.
        while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
        Ok(p)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid path string; MNT_DETACH never blocks.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// With the store on a full disk, the intent of a write cannot be made durable, so nothing is
/// written: 503, limit files unchanged.
#[test]
fn full_store_refuses_limit_writes() -> anyhow::Result<()> {
    if !require_root("full_store_refuses_limit_writes") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmpfs = Tmpfs::mount("64m")?;
    let store = tmpfs.0.join("store");
    let agent = Agent::start_with(
        &root,
        &store,
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"/nonexistent-emars-export\"\n",
        None,
    )?;
    let (dir, mut child) = live_instance(&root, &agent, "full", 16)?;
    let before = limit_text(&root.hierarchy, &dir);
    let filler = tmpfs.fill()?;
    // Write until the disk is needed: the store's last page may still hold a record or two,
    // and the audit journal keeps room written for some hundreds more (durable there), until
    // it has to be emptied into sled.
    let mut last = before;
    let mut refused = None;
    let mut written = Vec::new();
    for i in 0..5000u64 {
        let max = (128 + i) * MIB;
        let body = format!("{{\"max_bytes\": {max}}}");
        let (s, b) = agent.post_raw(
            "/v1/functions/full/instances/live/limits",
            "application/json",
            body.as_bytes(),
        )?;
        let now = limit_text(&root.hierarchy, &dir);
        if s != 200 {
            assert_eq!(s, 503, "{b}");
            // memory.max is the API's to write here; memory.high is the burst guard's (on
            // cgroup v2 it arms it below each new max, audited as its own write).
            assert_eq!(now.0, last.0, "a write without a durable audit record");
            refused = Some(b);
            break;
        }
        assert_eq!(
            now.0.trim(),
            max.to_string(),
            "answered 200 but memory.max holds the previous limit: {b}\nagent log:\n{}",
            agent.log()
        );
        written.push(max);
        last = now;
    }
    let b = refused.ok_or_else(|| anyhow!("5000 writes went through on a full disk"))?;
    assert!(
        b["error"].as_str().is_some_and(|e| e.contains("durable")),
        "{b}"
    );
    // Counted in /v1/info (refreshed every second).
    wait_for(Duration::from_secs(3), || {
        let info = agent.get_ok("/v1/info").ok()?;
        (u64_of(&info["enforcement"], "audit_errors") >= 1).then_some(())
    })
    .ok_or_else(|| anyhow!("audit error not counted in /v1/info"))?;
    // Every write that did happen is in the audit of a restarted agent (kill -9: nothing is
    // flushed on the way out), as ok or as interrupted with what the cgroup held.
    agent.kill()?;
    fs::remove_file(filler)?;
    let agent = Agent::start_with(
        &root,
        &store,
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"/nonexistent-emars-export\"\n",
        None,
    )?;
    let audit = agent.get_ok("/v1/audit?limit=1000")?;
    let recorded: Vec<u64> = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["new"]["max_bytes"].as_u64())
        .collect();
    for max in &written {
        assert!(
            recorded.contains(max),
            "write of {max} happened but is not in the audit: {recorded:?}"
        );
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// `kill -9` right after a write is answered: the restarted agent's audit shows the write.
#[test]
fn write_survives_kill_9_in_the_audit() -> anyhow::Result<()> {
    if !require_root("write_survives_kill_9_in_the_audit") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let extra = "\n[policy]\nmode = \"enforce\"\nexport_dir = \"/nonexistent-emars-export\"\n";
    let agent = Agent::start_with(&root, &store, extra, None)?;
    let (dir, mut child) = live_instance(&root, &agent, "k9", 16)?;
    let (s, b) = agent.post_raw(
        "/v1/functions/k9/instances/live/limits",
        "application/json",
        br#"{"max_bytes": 201326592}"#,
    )?;
    assert_eq!(s, 200, "{b}");
    agent.kill()?;
    assert_eq!(
        limit_text(&root.hierarchy, &dir).0.trim(),
        "201326592",
        "the write happened"
    );
    let agent = Agent::start_with(&root, &store, extra, None)?;
    let audit = agent.get_ok("/v1/audit")?;
    let rec = audit["audit"]
        .as_array()
        // The API's write (on cgroup v2 the burst guard arms memory.high after it).
        .and_then(|a| {
            a.iter()
                .find(|r| r["instance"] == "live" && r["reason"] == "api")
                .cloned()
        })
        .ok_or_else(|| anyhow!("write lost from the audit after kill -9: {audit}"))?;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["written"]["max_bytes"], 201326592u64);
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Clients (more than the TCP cap of 1,024) that open connections and never finish a request
/// cannot exhaust the agent's descriptors: the count stays under the cap, limits are still
/// written at mkdir, and the API answers again once their header deadline has passed.
#[test]
fn slow_clients_cannot_starve_the_agent() -> anyhow::Result<()> {
    if !require_root("slow_clients_cannot_starve_the_agent") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    // A function with a recommendation, so a new instance gets limits at mkdir.
    for i in 0..3 {
        let d = root.instance_dir("slow", &format!("h{i}"))?;
        run_alloc(&d, 12, 0, 0)?;
        fs::remove_dir(&d)?;
    }
    agent.wait_ended("slow", 3)?;
    let fds = || fs::read_dir(format!("/proc/{}/fd", agent.pid())).map(|d| d.count());
    let base = fds()?;
    // More clients than the agent's TCP connection cap (1,024), each holding half a request
    // line, never finished. The test needs a descriptor for each.
    let clients = 1200;
    raise_fd_limit(clients as u64 + 256)?;
    let mut conns = Vec::new();
    for _ in 0..clients {
        let mut c = TcpStream::connect(&agent.addr).context("connecting")?;
        c.write_all(b"GET /v1/info HTTP/1.1\r\nHost: 127")?;
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(500) * time_scale());
    let held = fds()?;
    assert!(
        held <= base + 1024 + 8,
        "agent holds {held} descriptors (was {base}) with {clients} idle clients"
    );
    // Cgroup writes do not wait for the API.
    let dir = root.instance_dir("slow", "new")?;
    let (max_file, _) = root.hierarchy.limit_files();
    let written = wait_for(Duration::from_secs(5), || {
        let t = fs::read_to_string(dir.join(max_file)).ok()?;
        t.trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v < 1 << 40)
            .map(|_| ())
    });
    if written.is_none() {
        drop(conns);
        std::thread::sleep(Duration::from_secs(6));
        panic!(
            "no limit written while the API was saturated:\n{}\naudit: {:?}\nrecommendation: {:?}",
            agent.log(),
            agent.get("/v1/audit"),
            agent.get("/v1/functions/slow/recommendation")
        );
    }
    // The API answers again within a few header deadlines.
    let t0 = Instant::now();
    let answered = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(40) * time_scale())
        .build()
        .get(&agent.url("/healthz"))
        .call()
        .map(|r| r.status());
    assert_eq!(answered.ok(), Some(200), "after {:?}", t0.elapsed());
    drop(conns);
    Ok(())
}

/// Raises this process's soft descriptor limit to at least `n` (within the hard limit).
fn raise_fd_limit(n: u64) -> anyhow::Result<()> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill, then to set.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if l.rlim_cur < n {
            l.rlim_cur = n.min(l.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                anyhow::bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    anyhow::ensure!(l.rlim_cur >= n, "descriptor limit {} below {n}", l.rlim_cur);
    Ok(())
}

/// `kill -9` at a different moment of container churn, again and again (50 times on a host,
/// 10 under emulation), on one store: the agent starts on it every time, and every limit a
/// new instance was seen to get is in the audit afterwards (as written, or as interrupted
/// when the agent died between the write and its outcome).
#[test]
fn store_and_audit_survive_repeated_kill_9_during_churn() -> anyhow::Result<()> {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    };
    if !require_root("store_and_audit_survive_repeated_kill_9_during_churn") {
        return Ok(());
    }
    let rounds = if time_scale() > 1 { 10 } else { 50 };
    let root = Arc::new(TestRoot::new()?);
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let extra = format!(
        "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{}/export\"\n",
        tmp.path().display()
    );
    // History, so that the function has a recommendation and its new instances get limits.
    let agent = Agent::start_with(&root, &store, &extra, None)?;
    for i in 0..3 {
        let d = root.instance_dir("k9churn", &format!("h{i}"))?;
        run_alloc(&d, 12, 0, 0)?;
        fs::remove_dir(&d)?;
    }
    agent.wait_ended("k9churn", 3)?;
    drop(agent);

    let (max_file, _) = root.hierarchy.limit_files();
    let limited = |t: &str| {
        let t = t.trim();
        t != "max" && t.len() < 18 && !t.is_empty()
    };
    let seen_limited: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut churned = 0usize;
    for round in 0..rounds {
        let agent = Agent::start_with(&root, &store, &extra, None)
            .with_context(|| format!("start {round} after kill -9"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (root, stop, seen) = (root.clone(), stop.clone(), seen_limited.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("r{round}-{n}");
                    let d = root.instance_dir("k9churn", &name)?;
                    // Each cgroup lives 3 ms (30 under emulation) or until its limits are
                    // seen, whichever comes first.
                    let until = Instant::now() + Duration::from_millis(3) * time_scale();
                    loop {
                        std::thread::sleep(Duration::from_millis(1));
                        if limited(&fs::read_to_string(d.join(max_file)).unwrap_or_default()) {
                            seen.lock().map_err(|_| anyhow!("poisoned"))?.push(name);
                            break;
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                    fs::remove_dir(&d)?;
                    n += 1;
                }
                Ok(n)
            })
        };
        // A different moment each round: 20 to 200 ms into the churn.
        std::thread::sleep(Duration::from_millis(20 + (round as u64 * 37) % 180));
        agent.kill()?;
        stop.store(true, Ordering::Relaxed);
        churned += churn
            .join()
            .map_err(|_| anyhow!("churn thread panicked"))??;
    }
    let seen = seen_limited
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .clone();
    assert!(
        !seen.is_empty(),
        "no instance got limits during {churned} created in {rounds} rounds"
    );
    let agent = Agent::start_with(&root, &store, &extra, None)?;
    let audit = agent.get_ok("/v1/audit?limit=10000")?;
    // instance → (outcome, whether the record says a memory.max was written)
    let recorded: std::collections::HashMap<String, (String, bool)> = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["function"] == "k9churn" && r["reason"] == "new_instance")
        .filter_map(|r| {
            Some((
                r["instance"].as_str()?.to_owned(),
                (
                    r["outcome"].as_str()?.to_owned(),
                    r["written"]["max_bytes"].is_u64(),
                ),
            ))
        })
        .collect();
    for name in &seen {
        let outcome = recorded.get(name).ok_or_else(|| {
            anyhow!(
                "instance {name} got limits but its write is not in the audit \
                 ({} of {} seen limited are)",
                seen.iter().filter(|n| recorded.contains_key(*n)).count(),
                seen.len()
            )
        })?;
        // "partial": the churn removed the cgroup between the two limit files; the record
        // must then say that memory.max, the limit seen, was written.
        let (outcome, max_written) = outcome;
        assert!(
            outcome == "ok" || outcome == "interrupted" || (outcome == "partial" && *max_written),
            "{name}: outcome {outcome}, memory.max written: {max_written}"
        );
    }
    eprintln!(
        "{rounds} kill -9 rounds, {churned} instances churned, {} got limits, all {} in the audit",
        seen.len(),
        seen.len()
    );
    Ok(())
}

/// The kernel side pinned in bpffs: a set of another version is replaced and said; a second
/// agent on the same pins is refused (two agents never read one ring); an unprivileged user can
/// neither remove the pins nor lock them; `emars unpin` is refused while the agent runs and
/// removes them once it has stopped; other settings make a new set that replaces the old one.
#[test]
fn pinned_kernel_side_is_locked_versioned_and_removable() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root("pinned_kernel_side_is_locked_versioned_and_removable") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    // What an older version left.
    let old = root.pin_path.join("v0_0_1-00000000deadbeef");
    fs::create_dir_all(&old)?;
    let agent = Agent::start_with(&root, &store, "", None)?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(
        info["probes_unpinned"],
        serde_json::json!(["v0_0_1-00000000deadbeef"]),
        "{info}"
    );
    assert!(!old.exists());
    let log = agent.log();
    let said = log
        .lines()
        .find(|l| l.contains("replaced the pinned kernel side v0_0_1-00000000deadbeef"))
        .ok_or_else(|| anyhow!("no word of the old set:\n{log}"))?;
    // What changed, and what became of its events (it has no ring: nothing to carry over).
    assert!(
        said.contains("version 0.0.1 → ") && said.contains("dropped"),
        "{said}"
    );
    let set = std::path::PathBuf::from(
        info["probes_pinned"]
            .as_str()
            .ok_or_else(|| anyhow!("not pinned: {info}"))?,
    );
    assert!(set.join("link_cgroup_mkdir").exists());
    let mode = fs::metadata(&root.pin_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "pin directory mode {mode:o}");

    // A second agent on the same pins (on a root of its own: one on the same root is refused
    // for the root before it reaches the pins).
    let tmp2 = tempfile::tempdir()?;
    let mut other = TestRoot::new()?;
    let own_pins = std::mem::replace(&mut other.pin_path, root.pin_path.clone());
    let second = Agent::start_with(&other, &tmp2.path().join("store"), "", None);
    other.pin_path = own_pins;
    let err = format!(
        "{:#}",
        second
            .err()
            .ok_or_else(|| anyhow!("a second agent started"))?
    );
    assert!(err.contains("in use by another running agent"), "{err}");

    // As nobody: refused.
    let (keep, cli) = copy_for_nobody(&agent_bin())?;
    let cfg = keep.path().join("pins.toml");
    fs::write(
        &cfg,
        format!("[probes]\npin_path = \"{}\"\n", root.pin_path.display()),
    )?;
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644))?;
    let mut cmd = Command::new(&cli);
    cmd.arg("unpin").arg("--config").arg(&cfg);
    let (ok, out, err) = run_as_nobody(cmd)?;
    assert!(!ok, "unpin succeeded as nobody: {out}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(set.exists());

    // As root while the agent runs: refused.
    let unpin = || {
        Command::new(agent_bin())
            .arg("unpin")
            .arg("--config")
            .arg(&cfg)
            .output()
    };
    let out = unpin()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "unpin went ahead under a running agent"
    );
    assert!(err.contains("in use by another running agent"), "{err}");
    assert!(set.exists());
    assert!(agent.stop()?.success());

    // Other settings: a new set replaces this one.
    let other = "\n[probes]\nring_buffer_bytes = 8388608\n";
    let agent = Agent::start_with(&root, &store, other, None)?;
    let info = agent.get_ok("/v1/info")?;
    let name = set
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(info["probes_unpinned"], serde_json::json!([name]), "{info}");
    assert_eq!(info["probes_adopted"], false);
    assert_ne!(info["probes_pinned"].as_str(), set.to_str());
    let log = agent.log();
    let status = agent.stop()?;
    assert!(
        status.success(),
        "agent exit {status} on SIGTERM; its log:\n{log}"
    );

    // Stopped: unpin removes it, and the next agent starts afresh.
    let out = unpin()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("removed") && said.contains("detached"),
        "{said}"
    );
    // Nothing is left, the directory it made included.
    assert!(
        !root.pin_path.exists(),
        "unpin left {}",
        root.pin_path.display()
    );
    let agent = Agent::start_with(&root, &store, other, None)?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["probes_adopted"], false, "{info}");
    assert_eq!(info["probes_unpinned"], serde_json::json!([]), "{info}");
    Ok(())
}

/// Every writing CLI command, as root runs them, with a squatter (user `nobody`) holding the
/// agent's default port 127.0.0.1:9750: through the local socket the squatter gets nothing;
/// with no agent at the socket the CLI fails instead of trying the port; with an explicit
/// `--addr` and no `--token-file` the squatter gets the request but no token. The assertions
/// are on the bytes the squatter received.
#[test]
fn a_squatter_on_the_port_gets_no_token() -> anyhow::Result<()> {
    if !require_root("a_squatter_on_the_port_gets_no_token") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(&root, "")?;
    let (_dir, mut child) = live_instance(&root, &agent, "sec", 16)?;

    let (keep, squat) = copy_for_nobody(&squat_bin())?;
    let log = keep.path().join("squatted.log");
    fs::write(&log, b"")?;
    fs::set_permissions(&log, fs::Permissions::from_mode(0o666))?;
    let mut squatter = {
        use std::os::unix::process::CommandExt as _;
        let mut c = Command::new(&squat);
        c.args(["--tcp", "127.0.0.1:9750", "--log"])
            .arg(&log)
            .uid(NOBODY)
            .gid(NOBODY)
            .current_dir("/")
            .stdout(std::process::Stdio::piped());
        KillOnDrop(c.spawn().context("starting the squatter as nobody")?)
    };
    let out = squatter
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    anyhow::ensure!(
        line.trim() == "listening",
        "the squatter could not take 127.0.0.1:9750 (is an agent running on this host? its \
         error is above)"
    );
    let squatted = || fs::read(&log).unwrap_or_default();

    // Every command that writes, or asks with the token today (admit).
    let commands: [&[&str]; 5] = [
        &["apply"],
        &["set-limit", "sec", "live", "--max", "134217728"],
        &["recommend", "--generate"],
        &["invocations", "sec", "3"],
        &["admit", "sec"],
    ];
    for args in commands {
        let out = agent.cli(args).output()?;
        assert!(
            out.status.success(),
            "{args:?} through the socket: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No agent at the socket: the command fails, and does not go looking for a port.
        let out = Command::new(agent_bin())
            .args(args)
            .args(["--socket", "/nonexistent/emars/api.sock"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} without an agent succeeded");
        assert!(err.contains("is the agent running"), "{args:?}: {err}");
    }
    assert_eq!(
        String::from_utf8_lossy(&squatted()),
        "",
        "the squatter received bytes while the CLI used the socket"
    );
    let f = agent.get_ok("/v1/functions/sec")?;
    assert_eq!(f["invocations"], 3, "the real agent got the invocations");

    // Told the port (and not the token file): the squatter gets a request, without a token.
    // (The squatter's forged `{}` does not decode as the CLI expects: what it answers is the
    // squatter's choice; what it received is the point.)
    Command::new(agent_bin())
        .args([
            "invocations",
            "sec",
            "1",
            "--new",
            "--addr",
            "127.0.0.1:9750",
        ])
        .output()?;
    let got = String::from_utf8_lossy(&squatted()).into_owned();
    assert!(
        got.starts_with("POST /v1/functions/sec/invocations "),
        "{got}"
    );
    assert!(!got.to_ascii_lowercase().contains("authorization"), "{got}");
    assert!(!got.contains(&agent.token), "{got}");
    drop(squatter);
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// A local socket whose file someone made world-accessible (systemd's default SocketMode is
/// 0666): the kernel lets `nobody` connect, and the agent refuses it by its credentials
/// before reading a byte; root is served.
#[test]
fn the_local_socket_refuses_other_users_by_their_credentials() -> anyhow::Result<()> {
    if !require_root("the_local_socket_refuses_other_users_by_their_credentials") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    fs::create_dir(&run)?;
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
    let socket = run.join("api.sock");
    let store = tmp.path().join("store");
    let extra = "\n[policy]\nmode = \"enforce\"\n";
    let agent = Agent::start_full(&root, &store, extra, None, &[], Some(&socket))?;
    let mode = fs::symlink_metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let (_keep, cli) = copy_for_nobody(&agent_bin())?;
    let nobody = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let mut cmd = Command::new(&cli);
        cmd.args(args).arg("--socket").arg(&socket);
        let (ok, _, err) = run_as_nobody(cmd)?;
        Ok((ok, err))
    };
    // The file's mode stops nobody first ...
    let (ok, err) = nobody(&["invocations", "sock", "5"])?;
    assert!(!ok && err.contains("the socket is root's"), "{err}");
    // ... and with the file opened to everyone, the agent's own check does.
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666))?;
    let (ok, err) = nobody(&["invocations", "sock", "5"])?;
    assert!(!ok, "nobody wrote through the socket");
    assert!(err.contains("cannot reach the EMARS agent"), "{err}");
    wait_for(Duration::from_secs(5), || {
        agent
            .log()
            .contains("API socket: peer refused")
            .then_some(())
    })
    .ok_or_else(|| anyhow!("no refusal logged:\n{}", agent.log()))?;
    assert!(agent.log().contains("uid=65534"), "{}", agent.log());
    let (status, _) = agent.get("/v1/functions/sock")?;
    assert_eq!(status, 404, "the function nobody reported must not exist");
    // Root through the same socket: served.
    let out = agent.cli(&["invocations", "sock", "2", "--new"]).output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent.get_ok("/v1/functions/sock")?["invocations"], 2);
    Ok(())
}

/// A storm of API clients (heavy GETs of whole-model answers in a loop, and more half-sent
/// requests than the 128 connections the agent once took at a time) while containers start: every new instance still gets its limits, no kernel event
/// is lost, every request is answered (200, or 503 when the agent is too busy to start its
/// work), the operator's CLI through the local socket is served, and `/healthz` answers within
/// a second throughout, over TCP and through the local socket. Its figures at full scale (3,000 + 600 clients, 500 containers) are
/// `emars-bench-load`'s.
#[test]
fn an_api_storm_never_delays_the_event_path() -> anyhow::Result<()> {
    if !require_root("an_api_storm_never_delays_the_event_path") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = start(
        &root,
        "[[policy.functions]]\nname = \"stormy\"\npin_max_bytes = 201326592\n",
    )?;
    raise_fd_limit(2048)?;
    // A function with instances, whose list is one of the answers the storm asks for.
    for i in 0..3 {
        let d = root.instance_dir("stormy", &format!("h{i}"))?;
        run_alloc(&d, 8, 0, 0)?;
        fs::remove_dir(&d)?;
    }
    agent.wait_ended("stormy", 3)?;
    // Under emulation fewer heavy clients (each is many times slower there); the half-sent
    // ones stay above 128 all the same.
    let heavy = if time_scale() > 1 { 60 } else { 300 };
    let storm = storm::Storm::start(&agent, heavy, 200, "stormy")?;
    let (max_file, high_file) = root.hierarchy.limit_files();
    let n = 40;
    let mut unlimited = Vec::new();
    let mut operator_refused = Vec::new();
    for i in 0..n {
        // The operator's reads through the local socket are served whatever TCP clients do
        // (a slot and a queue of their own).
        if i % 8 == 0 {
            let out = agent
                .cli(&["audit", "--limit", "1000", "--json"])
                .output()?;
            if !out.status.success() {
                operator_refused.push(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
        let dir = root.instance_dir("stormy", &format!("s{i}"))?;
        // Both limits (the agent writes memory.max, then memory.high) before it goes.
        let limited = wait_for(Duration::from_secs(5), || {
            let max = fs::read_to_string(dir.join(max_file)).ok()?;
            let high = fs::read_to_string(dir.join(high_file)).ok()?;
            let high_set = high.trim().parse::<u64>().ok().is_some_and(|h| h < 1 << 62);
            (max.trim().parse::<u64>().ok() == Some(201326592) && high_set).then_some(())
        });
        if limited.is_none() {
            unlimited.push(i);
        }
        fs::remove_dir(&dir)?;
    }
    let load = storm.stop()?;
    println!(
        "storm: {} answered, {} busy, {} other, {} failed, {} slow cycles; /healthz max {:.0} ms \
         (TCP) {:.0} ms (socket); agent RSS peak {:.0} MB",
        load.ok,
        load.refused,
        load.other,
        load.failed,
        load.slow_cycles,
        load.health.tcp_ms.iter().copied().fold(0.0, f64::max),
        load.health.local_ms.iter().copied().fold(0.0, f64::max),
        load.rss_peak_mb
    );
    assert!(
        unlimited.is_empty(),
        "instances without limits: {unlimited:?}"
    );
    assert!(load.ok > 0, "no heavy request was answered");
    assert_eq!((load.other, load.failed), (0, 0), "requests not answered");
    assert_eq!(
        (load.health.tcp_failed, load.health.local_failed),
        (0, 0),
        "/healthz failed"
    );
    let second = 1000.0 * f64::from(time_scale());
    for (how, ms) in [
        ("TCP", &load.health.tcp_ms),
        ("socket", &load.health.local_ms),
    ] {
        assert!(!ms.is_empty(), "no /healthz over {how}");
        assert!(
            ms.iter().all(|m| *m < second),
            "/healthz over {how} took over a second: {ms:?}"
        );
    }
    let audit = agent.get_ok("/v1/audit?limit=1000")?;
    let written = audit["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["function"] == "stormy" && a["reason"] == "new_instance")
        .filter(|a| a["instance"].as_str().is_some_and(|i| i.starts_with('s')))
        .filter(|a| a["outcome"] == "ok")
        .count();
    assert_eq!(written, n, "one audited limit write per instance");
    let lost = wait_for(Duration::from_secs(3), || {
        let info = agent.get_ok("/v1/info").ok()?;
        (info["events_received"].as_u64()? > 0).then_some(info["events_lost"].as_u64()?)
    });
    assert_eq!(lost, Some(0), "kernel events lost");
    Ok(())
}

/// What must not change in another tool's pinned directory: its mode and owner, and every
/// object in it (name and inode, so an object removed and pinned again shows).
fn pinned_tree(dir: &Path) -> anyhow::Result<Vec<(String, u32, u32, u64)>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let m = fs::symlink_metadata(&d)?;
        out.push((d.display().to_string(), m.mode(), m.uid(), m.ino()));
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                let m = e.metadata()?;
                out.push((e.path().display().to_string(), m.mode(), m.uid(), m.ino()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A symlink planted as `probes.pin_path` (bpffs is world-writable on many hosts) that leads
/// to another pinned directory, here a stopped agent's set, still recording: the agent
/// refuses it, runs unpinned and says so in `fallbacks`; `emars unpin` refuses it too, and a
/// path that only passes through a symlink as well. The victim's objects, mode and owner are
/// untouched, and its own agent adopts its set afterwards.
#[test]
fn planted_pin_symlink_is_refused() -> anyhow::Result<()> {
    if !require_root("planted_pin_symlink_is_refused") {
        return Ok(());
    }
    let victim_root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let victim_store = tmp.path().join("victim");
    let victim = Agent::start_with(&victim_root, &victim_store, "", None)?;
    let info = victim.get_ok("/v1/info")?;
    let set = PathBuf::from(
        info["probes_pinned"]
            .as_str()
            .ok_or_else(|| anyhow!("the victim is not pinned: {info}"))?,
    );
    assert!(victim.stop()?.success());
    // Another tool's directory as such a tool might leave it: readable by all.
    fs::set_permissions(&victim_root.pin_path, fs::Permissions::from_mode(0o755))?;
    let before = pinned_tree(&victim_root.pin_path)?;
    assert!(
        before
            .iter()
            .any(|e| e.0 == set.join("link_cgroup_mkdir").display().to_string()),
        "{before:?}"
    );

    let root = TestRoot::new()?;
    std::os::unix::fs::symlink(&victim_root.pin_path, &root.pin_path)?;
    // Other settings: an agent that followed the link would remove the victim's set as one
    // of another identity, after making its directory 0700.
    let agent = Agent::start_configured(&root, "\n[probes]\nring_buffer_bytes = 8388608\n")?;
    let info = agent.get_ok("/v1/info")?;
    assert_eq!(info["probes_pinned"], Value::Null, "{info}");
    let said = info["fallbacks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|f| f.starts_with("kernel side not pinned"))
        .ok_or_else(|| anyhow!("no pinning fallback in {info}"))?;
    assert!(
        said.contains(&root.pin_path.display().to_string()) && said.contains("symlink"),
        "{said}"
    );
    // It runs all the same: a new instance is recorded.
    let _dir = root.instance_dir("symlinked", "i1")?;
    agent.wait_live("symlinked", "i1")?;
    assert_eq!(pinned_tree(&victim_root.pin_path)?, before);
    assert!(agent.stop()?.success());

    // `emars unpin` on the symlink, and on a path through a symlinked directory.
    let through = TestRoot::new()?;
    fs::create_dir_all(&through.pin_path)?;
    let parent = victim_root
        .pin_path
        .parent()
        .ok_or_else(|| anyhow!("pin path without parent"))?;
    std::os::unix::fs::symlink(parent, through.pin_path.join("via"))?;
    let victim_name = victim_root
        .pin_path
        .file_name()
        .ok_or_else(|| anyhow!("pin path without name"))?;
    for pin_path in [
        root.pin_path.clone(),
        through.pin_path.join("via").join(victim_name),
    ] {
        let cfg = tmp.path().join("unpin.toml");
        fs::write(
            &cfg,
            format!("[probes]\npin_path = \"{}\"\n", pin_path.display()),
        )?;
        let out = Command::new(agent_bin())
            .arg("unpin")
            .arg("--config")
            .arg(&cfg)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "unpin of {} went ahead: {}",
            pin_path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains("symlink"), "{err}");
        assert_eq!(pinned_tree(&victim_root.pin_path)?, before);
    }

    // The victim's own agent finds its set whole and adopts it.
    let victim = Agent::start_with(&victim_root, &victim_store, "", None)?;
    let info = victim.get_ok("/v1/info")?;
    assert_eq!(info["probes_adopted"], true, "{info}");
    assert_eq!(info["probes_unpinned"], serde_json::json!([]), "{info}");
    Ok(())
}

/// Where no bpffs is mounted, the agent mounts its own at /sys/fs/bpf, root's alone (bpffs's
/// default is world-writable): run in a mount namespace of its own with the host's bpffs
/// detached there, so the host's stays as it is.
#[test]
fn own_bpffs_mount_is_root_only() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if !require_root("own_bpffs_mount_is_root_only") {
        return Ok(());
    }
    if find_program("unshare").is_none() {
        skipped("own_bpffs_mount_is_root_only", "needs unshare (util-linux)");
        return Ok(());
    }
    let root = TestRoot::new()?;
    let tmp = tempfile::tempdir()?;
    let wrapper: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "umount -l /sys/fs/bpf && exec \"$0\" \"$@\"",
    ]
    .map(String::from)
    .to_vec();
    let agent = Agent::start_under(&root, &tmp.path().join("store"), "", None, &wrapper)?;
    let info = agent.get_ok("/v1/info")?;
    assert!(info["probes_pinned"].is_string(), "{info}");
    assert!(
        agent.log().contains("mounted bpffs at /sys/fs/bpf"),
        "{}",
        agent.log()
    );
    // The agent's view of /sys/fs/bpf, through its own root.
    let mount = PathBuf::from(format!("/proc/{}/root/sys/fs/bpf", agent.pid()));
    let mode = fs::metadata(&mount)?.mode() & 0o777;
    assert_eq!(mode, 0o700, "{} mode {mode:o}", mount.display());
    Ok(())
}

/// A second agent on a root another agent watches (its own store, no pins: nothing else stops
/// it) is refused, naming the agent that holds the root: two agents would both write its
/// limits. Once the first stops, the root is free.
#[test]
fn a_second_agent_on_a_watched_root_is_refused() -> anyhow::Result<()> {
    if !require_root("a_second_agent_on_a_watched_root_is_refused") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let first = Agent::start(&root)?;
    let second = Agent::start_configured(&root, "[probes]\npin = false\n");
    let err = format!(
        "{:#}",
        second
            .err()
            .ok_or_else(|| anyhow!("a second agent started on the same root"))?
    );
    let want = format!(
        "another agent (pid {}) watches {}",
        first.pid(),
        root.dir.display()
    );
    assert!(err.contains(&want), "{want:?} not in {err}");
    assert!(first.stop()?.success());
    let third = Agent::start_configured(&root, "[probes]\npin = false\n")?;
    assert!(third.stop()?.success());
    Ok(())
}
