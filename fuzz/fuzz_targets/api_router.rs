//! The HTTP router (`api::router`, behind its guard) on arbitrary requests, in predictive mode
//! with enforcement on and an actuator that writes into a fake cgroupfs.
//!
//! An input is a request as text: a `METHOD TARGET` line, `Name: value` header lines, an empty
//! line, then the body; `$TOKEN` in a header value stands for the agent's write token (see the
//! seeds in corpus/api_router). Besides never panicking or hanging:
//! - no file outside the watched root changes, although the store holds instances whose records
//!   point outside it (directly, through "..", through a symlink, through symlinked files);
//! - every error answer (but to HEAD) is `{"error": "...", "status": <its status>}`.
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once, PoisonError, RwLock};
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Uri};
use axum::Router;
use emars_agent::api::{guard::Guard, router, token::Token, ApiState, Predictive};
use emars_agent::config::{EnforceMode, PolicyConfig};
use emars_agent::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};
use emars_agent::model::{AgentInfo, InstanceRecord, Limits, PeakSource};
use emars_agent::policy::actuator::Actuator;
use emars_agent::policy::Policy;
use emars_agent::store::Store;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const MIB: u64 = 1 << 20;
const LISTEN: &str = "127.0.0.1:9750";

/// Inputs run against one harness before it is rebuilt: the store keeps what the inputs write
/// (functions, invocations, audit records), and memory grows with it.
const INPUTS_PER_HARNESS: u32 = 10_000;

struct Harness {
    /// Temp dir holding the fake hierarchy and the store.
    dir: PathBuf,
    inputs: u32,
    rt: tokio::runtime::Runtime,
    app: Router,
    token: String,
    mount: PathBuf,
    /// Every file of the fake hierarchy outside the watched root.
    outside: BTreeMap<PathBuf, FileState>,
}

static HARNESS: Mutex<Option<Harness>> = Mutex::new(None);

/// Runs `f` with the current harness, built fresh when there is none or it has run its share.
fn with_harness(f: impl FnOnce(&Harness)) {
    let mut slot = HARNESS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(old) = slot.take_if(|h| h.inputs >= INPUTS_PER_HARNESS) {
        let dir = old.dir.clone();
        drop(old);
        let _ = fs::remove_dir_all(dir);
    }
    let h = slot.get_or_insert_with(|| {
        static AT_EXIT: Once = Once::new();
        // SAFETY: registers a plain function, which only removes our temp dir.
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(remove_dir);
        });
        let dir = tempfile::Builder::new()
            .prefix("emars-fuzz-api-")
            .tempdir()
            .expect("temp dir")
            .keep();
        build(dir)
    });
    h.inputs += 1;
    f(h);
}

extern "C" fn remove_dir() {
    if let Ok(slot) = HARNESS.try_lock() {
        if let Some(h) = slot.as_ref() {
            let _ = fs::remove_dir_all(&h.dir);
        }
    }
}

/// A cgroup v2 directory with usage and unlimited limits.
fn fake_cgroup(dir: &Path, usage: u64) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("memory.current"), usage.to_string()).unwrap();
    fs::write(dir.join("memory.max"), "max").unwrap();
    fs::write(dir.join("memory.high"), "max").unwrap();
}

/// An instance of "fn"; `n` tells records apart in the store.
fn record(n: u64, instance: &str, dir: &Path, cgroup_id: u64, ended: bool) -> InstanceRecord {
    InstanceRecord {
        function: "fn".into(),
        instance: instance.into(),
        cgroup_id,
        cgroup_path: dir.display().to_string(),
        started_at_ms: 1_000 + n,
        ended_at_ms: ended.then_some(2_000),
        execs: 1,
        peak_bytes: 64 * MIB,
        peak_source: PeakSource::KernelWatermark,
        oom_kills: 0,
        limits: Limits::default(),
        input_bytes: None,
        connections: 0,
        requests: 0,
    }
}

fn ino(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

fn build(dir: PathBuf) -> Harness {
    let mount = dir.join("cg");
    let i1 = mount.join("emars/fn/i1");
    let i2 = mount.join("emars/fn/i2");
    let other = mount.join("other/x");
    fake_cgroup(&i1, 16 * MIB);
    fake_cgroup(&other, 16 * MIB);
    fs::create_dir_all(&i2).unwrap();
    fs::write(i2.join("memory.current"), (16 * MIB).to_string()).unwrap();
    symlink(other.join("memory.max"), i2.join("memory.max")).unwrap();
    symlink(other.join("memory.high"), i2.join("memory.high")).unwrap();
    let link = mount.join("emars/fn/link");
    symlink("../../other/x", &link).unwrap();

    let store = Store::open(&dir.join("store")).unwrap();
    // History, so that "fn" has a recommendation that /v1/apply writes.
    for n in 0..8 {
        let name = format!("old{n}");
        let rec = record(n, &name, &mount.join("emars/fn").join(&name), 100 + n, true);
        store.put_instance(&rec).unwrap();
    }
    // Live instances: real ones, and records pointing outside the root in every way.
    for (n, (name, path, id)) in (100..).zip([
        ("i1", i1.clone(), ino(&i1)),
        ("i2", i2.clone(), ino(&i2)),
        ("outside", other.clone(), ino(&other)),
        ("dotdot", mount.join("emars/fn/../../other/x"), ino(&other)),
        ("link", link, ino(&other)),
    ]) {
        store
            .put_instance(&record(n, name, &path, id, false))
            .unwrap();
    }

    let hierarchy = MemoryHierarchy {
        version: CgroupVersion::V2,
        mount: mount.clone(),
        hierarchy_id: 0,
    };
    let actuator = Arc::new(Actuator::new(
        hierarchy,
        &["/emars".to_string()],
        8 * MIB,
        true,
        store.clone(),
    ));
    let config = PolicyConfig {
        mode: EnforceMode::Enforce,
        export_dir: dir.join("export"),
        ..PolicyConfig::default()
    };
    let policy = Arc::new(Policy::new(config, store.clone(), actuator.host_memory()));
    let state = ApiState {
        store,
        info: Arc::new(RwLock::new(AgentInfo::default())),
        predictive: Some(Predictive {
            policy,
            actuator,
            reactive: Default::default(),
            limits_written: None,
            admissions: Default::default(),
        }),
        retention_ms: 14 * 86_400_000,
        pool: None,
        snapshots: Default::default(),
    };
    let token = Token::load_or_create(&dir.join("token")).unwrap();
    let token_text = token.as_str().to_string();
    let guard = Arc::new(Guard::new(token, LISTEN.parse().unwrap(), &[]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outside = snapshot_outside(&mount);
    assert!(
        outside.len() >= 3,
        "the fake hierarchy has files outside the root"
    );
    Harness {
        dir,
        inputs: 0,
        rt,
        app: router(state, guard),
        token: token_text,
        mount,
        outside,
    }
}

/// A file's modification time and contents (a symlink's: its target).
type FileState = (Option<SystemTime>, Vec<u8>);

/// Files below `mount` but not below `mount/emars`.
fn snapshot_outside(mount: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![mount.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if path == mount.join("emars") {
                continue;
            } else if meta.is_dir() {
                dirs.push(path);
            } else {
                let contents = if meta.is_symlink() {
                    fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes()
                } else {
                    fs::read(&path).unwrap()
                };
                files.insert(path, (meta.modified().ok(), contents));
            }
        }
    }
    files
}

/// Parses the text form of a request; None when it is not a valid HTTP request.
fn parse(data: &[u8], token: &str) -> Option<Request<Body>> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next()?;
    let space = first.iter().position(|&b| b == b' ')?;
    let method = Method::from_bytes(&first[..space]).ok()?;
    let uri = Uri::try_from(&first[space + 1..]).ok()?;
    let mut req = Request::builder().method(method).uri(uri);
    for line in lines.filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = line[colon + 1..].trim_ascii_start();
        let value = replace(value, b"$TOKEN", token.as_bytes());
        req = req.header(name, HeaderValue::from_bytes(&value).ok()?);
    }
    req.body(Body::from(body.to_vec())).ok()
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(i) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| with_harness(|h| run(h, data)));

fn run(h: &Harness, data: &[u8]) {
    let Some(req) = parse(data, &h.token) else {
        return;
    };
    let head = req.method() == Method::HEAD;
    let (status, body) = h.rt.block_on(async {
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("the answer's body");
        (status, body)
    });

    let error = status.is_client_error() || status.is_server_error();
    if error && !head {
        let error: serde_json::Value =
            serde_json::from_slice(&body).expect("an error answer is JSON");
        assert!(error["error"].is_string(), "{status}: {error}");
        assert_eq!(error["status"], status.as_u16(), "{error}");
    }
    let now = snapshot_outside(&h.mount);
    for (path, before) in &h.outside {
        assert!(
            now.get(path) == Some(before),
            "{} changed, outside the watched root",
            path.display()
        );
    }
    assert_eq!(
        now.len(),
        h.outside.len(),
        "files appeared outside the root"
    );
}
