//! Test harness for EMARS: real cgroups under a root of our own, real workload processes, the
//! real agent binary with its real store and HTTP API. Nothing of the kernel path is mocked.
//!
//! Tests that need root call [`require_root`]; without root they print a loud SKIPPED line, and
//! when `EMARS_TEST_ROOT_REQUIRED=1` (as `cargo xtask test` sets it under root/CI) they fail.

pub mod azure;
pub mod bench;
pub mod hosts;
pub mod http;
pub mod names;
pub mod netns;
pub mod oci;
pub mod platform_report;
pub mod prometheus;
pub mod sized;
pub mod storm;

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// True when the test may use the kernel. Prints why not, loudly, otherwise.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("EMARS_TEST_ROOT_REQUIRED").as_deref() == Ok("1") {
        panic!("{test} needs root (EMARS_TEST_ROOT_REQUIRED=1)");
    }
    skipped(test, "needs root (real cgroups and eBPF)");
    false
}

/// Says loudly that `test` did not check what it is for, in the form the VM summary counts
/// (on stdout, which the test harness passes on with --nocapture).
pub fn skipped(test: &str, why: &str) {
    println!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Which cgroup version holds the memory controller here, found independently of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct Hierarchy {
    pub version: Version,
    pub mount: PathBuf,
}

impl Hierarchy {
    pub fn detect() -> Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts")?;
        let mut v1 = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            match f[2] {
                "cgroup2" => {
                    let ctl = Path::new(f[1]).join("cgroup.controllers");
                    if fs::read_to_string(ctl)
                        .map(|s| s.split_whitespace().any(|c| c == "memory"))
                        .unwrap_or(false)
                    {
                        return Ok(Self {
                            version: Version::V2,
                            mount: f[1].into(),
                        });
                    }
                }
                "cgroup" if f[3].split(',').any(|o| o == "memory") => v1 = Some(f[1].to_owned()),
                _ => {}
            }
        }
        let mount = v1.ok_or_else(|| anyhow!("no memory cgroup hierarchy mounted"))?;
        Ok(Self {
            version: Version::V1,
            mount: mount.into(),
        })
    }

    /// The kernel's high watermark of a cgroup, read straight from cgroupfs.
    pub fn watermark(&self, dir: &Path) -> Result<u64> {
        let f = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        read_u64(&dir.join(f))
    }

    /// Bytes charged to a cgroup now (v1 memory.usage_in_bytes, v2 memory.current).
    pub fn usage(&self, dir: &Path) -> Result<u64> {
        let f = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        read_u64(&dir.join(f))
    }

    /// The hard and soft limit files (v1 limit_in_bytes / soft_limit_in_bytes, v2 max / high).
    pub fn limit_files(&self) -> (&'static str, &'static str) {
        match self.version {
            Version::V1 => ("memory.limit_in_bytes", "memory.soft_limit_in_bytes"),
            Version::V2 => ("memory.max", "memory.high"),
        }
    }

    /// The hard limit in force (v1 memory.limit_in_bytes, v2 memory.max); None when unlimited
    /// or unreadable.
    pub fn max_limit(&self, dir: &Path) -> Option<u64> {
        fs::read_to_string(dir.join(self.limit_files().0))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v < 1 << 62)
    }

    /// The soft limit in force (v1 memory.soft_limit_in_bytes, v2 memory.high); None when
    /// unlimited or unreadable.
    pub fn high_limit(&self, dir: &Path) -> Option<u64> {
        fs::read_to_string(dir.join(self.limit_files().1))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v < 1 << 62)
    }

    /// Lifts the hard limit of one of our cgroups.
    pub fn clear_limit(&self, dir: &Path) -> Result<()> {
        let p = dir.join(self.limit_files().0);
        let v = match self.version {
            Version::V1 => "-1",
            Version::V2 => "max",
        };
        fs::write(&p, v).with_context(|| format!("writing {}", p.display()))
    }

    /// Sets a hard limit (v1 memory.limit_in_bytes, v2 memory.max) on one of our cgroups.
    pub fn set_limit(&self, dir: &Path, bytes: u64) -> Result<()> {
        let p = dir.join(self.limit_files().0);
        fs::write(&p, bytes.to_string()).with_context(|| format!("writing {}", p.display()))?;
        if self.version == Version::V2 {
            // No swap for the test cgroup, so the limit really kills.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        Ok(())
    }
}

pub fn read_u64(p: &Path) -> Result<u64> {
    let s = fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("parsing {s:?} from {}", p.display()))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup subtree of our own (`/emars-test-<pid>-<n>` in the memory hierarchy), removed on drop
/// with everything below it. Never touches anything outside it.
pub struct TestRoot {
    pub hierarchy: Hierarchy,
    /// Path relative to the hierarchy, as the agent's config wants it ("/emars-test-1-0").
    pub rel: String,
    pub dir: PathBuf,
    /// Where agents watching this root pin their kernel side (`probes.pin_path`): shared by
    /// the agents a test restarts on this root, removed with it.
    pub pin_path: PathBuf,
}

/// Under which the test roots' agents pin their kernel side; `cargo xtask test` empties it
/// before a run (what a killed test run left).
pub const TEST_PIN_BASE: &str = "/sys/fs/bpf/emars-test";

impl TestRoot {
    pub fn new() -> Result<Self> {
        let hierarchy = Hierarchy::detect()?;
        let rel = format!(
            "/emars-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = hierarchy.mount.join(&rel[1..]);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pin_path = Path::new(TEST_PIN_BASE).join(&rel[1..]);
        let root = Self {
            hierarchy,
            rel,
            dir,
            pin_path,
        };
        root.enable_memory(&root.dir)?;
        Ok(root)
    }

    fn enable_memory(&self, dir: &Path) -> Result<()> {
        if self.hierarchy.version == Version::V2 {
            let p = dir.join("cgroup.subtree_control");
            fs::write(&p, "+memory").with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }

    /// Creates `<root>/<function>` (once) and returns its path.
    pub fn function_dir(&self, function: &str) -> Result<PathBuf> {
        let d = self.dir.join(function);
        if !d.is_dir() {
            fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            self.enable_memory(&d)?;
        }
        Ok(d)
    }

    /// Creates the instance cgroup `<root>/<function>/<instance>`.
    pub fn instance_dir(&self, function: &str, instance: &str) -> Result<PathBuf> {
        let d = self.function_dir(function)?.join(instance);
        fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        remove_tree(&self.dir);
        // Instances made as runc makes them on a hybrid host ([`http::Sandbox`]), and the
        // root an agent made there for its socket program.
        if let Some(unified) = http::unified_beside(self) {
            remove_tree(&unified.join(&self.rel[1..]));
        }
        // Unpinning detaches the programs its agents left recording.
        if let Err(e) = fs::remove_dir_all(&self.pin_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("removing {}: {e}", self.pin_path.display());
            }
        }
    }
}

/// Kills what is left in a cgroup tree and removes it, children first.
pub fn remove_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path());
        }
    }
    for _ in 0..50 {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: signalling a pid of our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove {}", dir.display());
}

/// A program on PATH (runc, chromium, prometheus, bash, ...).
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The workload binary (tests/src/bin/emars-alloc.rs).
pub fn alloc_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EMARS_ALLOC_BIN") {
        return p.into();
    }
    sibling_bin("emars-alloc")
}

/// The port squatter of the security tests (tests/src/bin/emars-squat.rs).
pub fn squat_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EMARS_SQUAT_BIN") {
        return p.into();
    }
    sibling_bin("emars-squat")
}

/// The sandbox HTTP server of the requests tests, the net bench and the platform's HTTP mode
/// (tests/src/bin/emars-http-server.rs): `$EMARS_HTTP_SERVER_BIN`, else next to this binary.
pub fn http_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EMARS_HTTP_SERVER_BIN") {
        return p.into();
    }
    sibling_bin("emars-http-server")
}

/// The reference platform (tests/src/bin/emars-platform.rs): `$EMARS_PLATFORM_BIN` (the VM
/// matrix's /bin/emars-platform), else next to this binary.
pub fn platform_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EMARS_PLATFORM_BIN") {
        return p.into();
    }
    sibling_bin("emars-platform")
}

/// The agent binary: $EMARS_BIN, else target/<profile>/emars next to this test binary.
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EMARS_BIN") {
        return p.into();
    }
    sibling_bin("emars")
}

pub(crate) fn sibling_bin(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Runs `emars-alloc` inside `cgroup` from its first instruction (joined before exec).
pub fn spawn_alloc(cgroup: &Path, mib: u64, hold_ms: u64, chain: u32) -> Result<Child> {
    let mut cmd = Command::new(alloc_bin());
    cmd.args([
        "--mib",
        &mib.to_string(),
        "--hold-ms",
        &hold_ms.to_string(),
        "--chain",
        &chain.to_string(),
    ]);
    spawn_in(cgroup, cmd)
}

/// Spawns `cmd` with its process already inside `cgroup` before exec.
pub fn spawn_in(cgroup: &Path, mut cmd: Command) -> Result<Child> {
    emars_agent::kernel::cgroupfs::join_before_exec(&mut cmd, cgroup)?;
    cmd.stdout(Stdio::null());
    cmd.spawn()
        .with_context(|| format!("spawning {:?} in {}", cmd, cgroup.display()))
}

/// Runs a workload to completion in `cgroup`.
pub fn run_alloc(cgroup: &Path, mib: u64, hold_ms: u64, chain: u32) -> Result<ExitStatus> {
    Ok(spawn_alloc(cgroup, mib, hold_ms, chain)?.wait()?)
}

/// A directory on a disk-backed filesystem, whose page cache the kernel can reclaim:
/// `$EMARS_DISK_DIR` (the VM matrix mounts a disk there), else /var/tmp. None (with the reason)
/// when it is tmpfs or ramfs, whose pages only swap could take.
pub fn disk_dir() -> std::result::Result<PathBuf, String> {
    let dir = PathBuf::from(std::env::var("EMARS_DISK_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "{}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let t = st.f_type as i64;
    if t == TMPFS_MAGIC || t == RAMFS_MAGIC {
        return Err(format!(
            "{} is in memory (tmpfs/ramfs): its page cache cannot be reclaimed",
            dir.display()
        ));
    }
    Ok(dir)
}

/// `emars-alloc` holding `heap_mib` MiB of heap and `cache_mib` MiB of clean page cache (a
/// synced file in `disk`) for `hold_ms`: an idle instance whose cache the kernel can reclaim.
pub fn cache_holder(disk: &Path, heap_mib: u64, cache_mib: u64, hold_ms: u64) -> Command {
    let mut c = Command::new(alloc_bin());
    c.args([
        "--mib",
        &heap_mib.to_string(),
        "--file-mib",
        &cache_mib.to_string(),
    ]);
    c.arg("--file-dir").arg(disk);
    c.args(["--hold-ms", &hold_ms.to_string()]);
    c
}

/// Kills the cache holders and removes their files (a killed one cannot).
pub fn stop_cache_holders(disk: &Path, children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
        let _ = fs::remove_file(disk.join(format!("emars-alloc-{}.cache", c.id())));
    }
}

/// Multiplier for every timeout of the suite: `EMARS_TEST_TIME_SCALE` (default 1). The VM matrix
/// sets it, since a kernel under TCG emulation runs many times slower than the host.
pub fn time_scale() -> u32 {
    std::env::var("EMARS_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1)
}

/// Polls `f` until it returns Some or `timeout` (scaled by [`time_scale`]) passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let timeout = timeout * time_scale();
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running agent with its own config, store and port. Killed on drop.
pub struct Agent {
    child: Child,
    pub addr: String,
    pub store: PathBuf,
    pub config_path: PathBuf,
    /// The agent's local socket (`api.socket`): the CLI's way in, no token needed.
    pub socket: PathBuf,
    /// The agent's write token (root-only file) and its content.
    pub token_file: PathBuf,
    pub token: String,
    log: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

/// `config` with `lines` put first into its table `header` ("[store]\n"); None when it opens
/// no such table.
fn into_table(config: &str, header: &str, lines: &str) -> Option<String> {
    let at = config.find(header)? + header.len();
    Some(format!("{}{lines}{}", &config[..at], &config[at..]))
}

/// Whether `config`'s table `header` sets `key`.
fn table_has(config: &str, header: &str, key: &str) -> bool {
    let Some(at) = config.find(header) else {
        return false;
    };
    let body = &config[at + header.len()..];
    let body = &body[..body.find("\n[").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| l.split_once('='))
        .any(|(k, _)| k.trim() == key)
}

impl Agent {
    /// Starts an agent watching `root` with a fresh store.
    pub fn start(root: &TestRoot) -> Result<Agent> {
        Self::start_configured(root, "")
    }

    /// Starts an agent with a fresh store and `extra` appended to its config; `{dir}` in
    /// `extra` stands for the agent's own temporary directory (for export dirs and the like).
    pub fn start_configured(root: &TestRoot, extra: &str) -> Result<Agent> {
        let tmp = tempfile::tempdir()?;
        let store = tmp.path().join("store");
        let extra = extra.replace("{dir}", &tmp.path().display().to_string());
        Self::start_with(root, &store, &extra, Some(tmp))
    }

    /// Starts an agent on a given store; `extra` is appended to the generated config.
    pub fn start_with(
        root: &TestRoot,
        store: &Path,
        extra: &str,
        tmp: Option<tempfile::TempDir>,
    ) -> Result<Agent> {
        Self::start_under(root, store, extra, tmp, &[])
    }

    /// [`Agent::start_with`], the agent run by `wrapper` (a command that takes the agent's
    /// command line after its own arguments, such as `setpriv ...`); none when empty.
    pub fn start_under(
        root: &TestRoot,
        store: &Path,
        extra: &str,
        tmp: Option<tempfile::TempDir>,
        wrapper: &[String],
    ) -> Result<Agent> {
        Self::start_full(root, store, extra, tmp, wrapper, None)
    }

    /// [`Agent::start_under`], its local socket at `socket` (else in its own directory).
    pub fn start_full(
        root: &TestRoot,
        store: &Path,
        extra: &str,
        tmp: Option<tempfile::TempDir>,
        wrapper: &[String],
        socket: Option<&Path>,
    ) -> Result<Agent> {
        let dir = store
            .parent()
            .ok_or_else(|| anyhow!("store path has no parent"))?;
        let config_path = dir.join(format!(
            "config-{}.toml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let token_file = dir.join("api-token");
        let socket = socket.map_or_else(|| dir.join("run").join("api.sock"), Path::to_owned);
        // The root's own pin directory, the store's path and the API's files, each in the
        // table of its own that `extra` may already open (for retention and the like).
        let pin = format!("pin_path = \"{}\"\n", root.pin_path.display());
        let extra = into_table(extra, "[probes]\n", &pin)
            .unwrap_or_else(|| format!("{extra}\n[probes]\n{pin}"));
        let store_path = format!("path = \"{}\"\n", store.display());
        let (store_table, extra) = match into_table(&extra, "[store]\n", &store_path) {
            Some(extra) => (String::new(), extra),
            None => (format!("[store]\n{store_path}\n"), extra),
        };
        let mut api = format!(
            "token_file = \"{}\"\nsocket = \"{}\"\n",
            token_file.display(),
            socket.display()
        );
        // Loopback on a port of the kernel's choice, unless `extra` says where.
        if !table_has(&extra, "[api]\n", "listen") {
            api.insert_str(0, "listen = \"127.0.0.1:0\"\n");
        }
        let (api_table, extra) = match into_table(&extra, "[api]\n", &api) {
            Some(extra) => (String::new(), extra),
            None => (format!("[api]\n{api}\n"), extra),
        };
        let config = format!(
            "{api_table}{store_table}[[cgroup.roots]]\npath = \"{}\"\n{extra}\n",
            root.rel
        );
        fs::write(&config_path, config)?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        // Its stderr is a pipe: the agent writes plain text, without colour escapes.
        let mut child = cmd
            .args(["agent", "--config"])
            .arg(&config_path)
            .env("EMARS_LOG", "info,emars_agent=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", agent_bin().display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("API listening on http://") {
                    let addr = line[i + "API listening on http://".len()..]
                        .trim()
                        .to_owned();
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = log2.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60) * time_scale()) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let l = log.lock().map(|l| l.clone()).unwrap_or_default();
                bail!("agent did not start listening in time; its log:\n{l}");
            }
        };
        let token = fs::read_to_string(&token_file)
            .with_context(|| format!("reading the agent's token {}", token_file.display()))?
            .trim()
            .to_owned();
        Ok(Agent {
            child,
            addr,
            store: store.to_owned(),
            config_path,
            socket,
            token_file,
            token,
            log,
            _tmp: tmp,
        })
    }

    /// `emars ARGS` as root's CLI runs it against this agent: through its local socket.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(agent_bin());
        c.args(args).arg("--socket").arg(&self.socket);
        c
    }

    /// The agent's process id (for CPU accounting from /proc/PID/stat).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET returning (status, JSON body).
    pub fn get(&self, path: &str) -> Result<(u16, Value)> {
        let resp = match ureq::get(&self.url(path)).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => bail!("GET {path}: {e}"),
        };
        let status = resp.status();
        let body: Value = resp.into_json().context("decoding JSON")?;
        Ok((status, body))
    }

    /// GET that must succeed.
    pub fn get_ok(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path} → {status}: {body}");
        }
        Ok(body)
    }

    /// POST raw bytes with a content type and the write token (as root's CLI sends it),
    /// returning (status, JSON body).
    pub fn post_raw(&self, path: &str, content_type: &str, body: &[u8]) -> Result<(u16, Value)> {
        let auth = format!("Bearer {}", self.token);
        self.request(
            "POST",
            path,
            &[("Content-Type", content_type), ("Authorization", &auth)],
            body,
        )
    }

    /// Any request with exactly the given headers (the Host header is ureq's own unless given),
    /// returning (status, JSON body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Value)> {
        let mut req = ureq::request(method, &self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match req.send_bytes(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => bail!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let body: Value = resp.into_json().context("decoding JSON")?;
        Ok((status, body))
    }

    /// Every instance of a function, oldest first (page after page), or an empty list while
    /// it is unknown.
    pub fn instances(&self, function: &str) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, body) = self.get(&format!(
                "/v1/functions/{function}/instances?limit=10000{cursor}"
            ))?;
            match status {
                200 => all.extend(body["instances"].as_array().cloned().unwrap_or_default()),
                404 => return Ok(Vec::new()),
                s => bail!("instances of {function}: {s} {body}"),
            }
            match body["next"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => return Ok(all),
            }
        }
    }

    /// Waits until the agent knows `instance` of `function` as live, and returns its record.
    pub fn wait_live(&self, function: &str, instance: &str) -> Result<Value> {
        wait_for(Duration::from_secs(5), || {
            self.instances(function)
                .ok()?
                .into_iter()
                .find(|i| i["instance"] == instance && i["ended_at_ms"].is_null())
        })
        .ok_or_else(|| {
            anyhow!(
                "{function}/{instance} not seen live:\nagent log:\n{}",
                self.log()
            )
        })
    }

    /// Waits until `function` has `n` ended instances and returns them.
    pub fn wait_ended(&self, function: &str, n: usize) -> Result<Vec<Value>> {
        wait_for(Duration::from_secs(10), || {
            let list = self.instances(function).ok()?;
            let ended: Vec<Value> = list
                .into_iter()
                .filter(|i| !i["ended_at_ms"].is_null())
                .collect();
            (ended.len() >= n).then_some(ended)
        })
        .ok_or_else(|| {
            anyhow!(
                "{function}: fewer than {n} ended instances in time: {:?}\nagent log:\n{}",
                self.instances(function).ok(),
                self.log()
            )
        })
    }

    /// Freezes the agent (SIGSTOP): the kernel keeps queueing events, the agent reads nothing.
    pub fn pause(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// Kills the agent with SIGKILL (no chance to flush anything) and waits for it.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.resume();
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Stops the agent with SIGTERM (as an operator would) and waits for it.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        self.resume();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10) * time_scale();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Ok(self.child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
    }
}

/// For benchmarks: writes into the store at `path` `per_day` instances per function (`f0`,
/// `f1`, ...) per day as the agent does, in time order across functions: the record when the
/// instance starts (live, with its start-hour bucket), again when it ends (with its peak and
/// the end-hour bucket), ending now. Stops without a checkpoint, as a kill -9 would. Returns
/// the records written.
pub fn seed_store(path: &Path, functions: u64, days: u64, per_day: u64) -> Result<u64> {
    use emars_agent::model::{HourDelta, InstanceRecord, Limits, PeakSource};
    use emars_agent::store::{Store, HOUR_MS};
    let store = Store::open(path)?;
    let now = emars_agent::clock::now_ms();
    let start = now - days * 24 * HOUR_MS;
    let step = 24 * HOUR_MS / per_day;
    let mut n = 0;
    for i in 0..days * per_day {
        for f in 0..functions {
            let name = format!("f{f}");
            let started = start + i * step + f % step;
            let mut rec = InstanceRecord {
                function: name.clone(),
                instance: format!("i{i}"),
                cgroup_id: 1_000_000 + n,
                cgroup_path: format!("/sys/fs/cgroup/memory/emars/{name}/i{i}"),
                started_at_ms: started,
                ended_at_ms: None,
                execs: 1,
                peak_bytes: 0,
                peak_source: PeakSource::None,
                oom_kills: 0,
                limits: Limits {
                    max_bytes: Some(256 << 20),
                    high_bytes: Some(230 << 20),
                },
                input_bytes: None,
                connections: 0,
                requests: 0,
            };
            store.put_instance(&rec)?;
            let start_delta = HourDelta {
                instances_started: 1,
                execs: 1,
                ..HourDelta::default()
            };
            store.add_hour(&name, started, start_delta)?;
            rec.ended_at_ms = Some(started + 1500);
            rec.peak_bytes = (16 + (i * 37 + f) % 200) << 20;
            rec.peak_source = PeakSource::KernelWatermark;
            store.put_instance(&rec)?;
            let end_delta = HourDelta {
                peak_bytes: rec.peak_bytes,
                ..HourDelta::default()
            };
            store.add_hour(&name, started + 1500, end_delta)?;
            n += 1;
        }
    }
    store.flush()?;
    Ok(n)
}

/// A child process killed (and reaped) when this goes out of scope, also when a test fails
/// half-way: helpers such as a port squatter must not outlive their test.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether GET /v1/info (`info`) lists program `name` as attached.
pub fn program_attached(info: &Value, name: &str) -> bool {
    info["programs"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == name && p["attached"] == true))
}

/// Bytes of a JSON number field.
pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// |a - b| within max(2 %, 1 MiB) — the accuracy EMARS promises against the kernel watermark.
pub fn close_to_watermark(reported: u64, watermark: u64) -> bool {
    let tol = (watermark / 50).max(MIB);
    reported.abs_diff(watermark) <= tol
}

/// The unprivileged user the security tests act as.
pub const NOBODY: u32 = 65534;

/// A copy of `bin` that user `nobody` may run (the build tree may sit in root's home), in a
/// temporary directory removed on drop.
pub fn copy_for_nobody(bin: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    let name = bin
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", bin.display()))?;
    let copy = dir.path().join(name);
    fs::copy(bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
    Ok((dir, copy))
}

/// Runs `cmd` as user and group `nobody` (supplementary groups dropped); returns (success,
/// stdout, stderr).
pub fn run_as_nobody(mut cmd: Command) -> Result<(bool, String, String)> {
    use std::os::unix::process::CommandExt as _;
    cmd.uid(NOBODY).gid(NOBODY).current_dir("/");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} as nobody"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Writes one SVG bar chart per column of a benchmark's table into `dir` (`--plots DIR` of
/// emars-replay and emars-platform), `<stem>.svg` each, drawn by the agent's plotting module.
/// Prints and returns the files.
pub fn write_bar_charts(
    dir: &Path,
    charts: &[(&str, emars_agent::view::plot::BarChart)],
) -> Result<Vec<PathBuf>> {
    use emars_agent::{files, view::plot};
    files::output_dir(dir)?;
    let mut files = Vec::new();
    for (stem, chart) in charts {
        let svg = plot::bar_chart_svg(chart)?;
        let file = dir.join(format!("{}.svg", plot::safe_stem(stem)));
        files::write_output(&file, svg.as_bytes())?;
        println!("wrote {}", file.display());
        files.push(file);
    }
    Ok(files)
}

/// A bar chart of `bars` titled `title` with `y_desc` on its y axis.
pub fn bar_chart(
    title: &str,
    y_desc: &str,
    bars: Vec<(String, f64)>,
) -> emars_agent::view::plot::BarChart {
    emars_agent::view::plot::BarChart {
        title: title.to_owned(),
        y_desc: y_desc.to_owned(),
        bars,
    }
}

/// A command-line flag's number (the benchmarks' and the replay's options).
pub fn flag_number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = value.ok_or_else(|| anyhow!("{flag} needs a value"))?;
    v.parse()
        .map_err(|e| anyhow!("{flag} takes a number, got {v:?}: {e}"))
}
