//! A real API server for tests ([`TestServer`]) and a plain HTTP client of it ([`TestClient`]):
//! the API's own tests use them, and the CLI's client is tested against the same server.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use serde::de::DeserializeOwned;

use super::{guard, listen, serve, server, token, AgentInfo, ApiState, ErrorBody, InstanceRecord};
use crate::model::{Limits, PeakSource};
use crate::store::Store;

pub(crate) const HOUR: u64 = 3_600_000;
pub(crate) const T0: u64 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR;

/// A real server on 127.0.0.1:0 over a real store, on its own runtime thread.
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    /// The local socket (this process's user may use it: it runs the server).
    pub socket: std::path::PathBuf,
    pub token: String,
    pub store: Store,
    pub info: Arc<RwLock<AgentInfo>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open store");
        let info = Arc::new(RwLock::new(AgentInfo {
            version: "0.1.0".into(),
            kernel: "6.1.0-test".into(),
            cgroup_mode: "v2".into(),
            ..AgentInfo::default()
        }));
        let state = ApiState {
            store: store.clone(),
            info: info.clone(),
            predictive: None,
            retention_ms: 3650 * 86_400_000,
            pool: None,
            snapshots: Default::default(),
        };
        let token = token::Token::load_or_create(&dir.path().join("token")).expect("token");
        let socket = dir.path().join("run/api.sock");
        let config = crate::config::ApiConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            socket: socket.clone(),
            ..Default::default()
        };
        let listeners = listen::open(&config, listen::Inherited::default()).expect("listeners");
        let token_text = token.as_str().to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let addr = listeners
                    .tcp
                    .as_ref()
                    .map(|l| l.local_addr())
                    .transpose()?
                    .ok_or_else(|| std::io::Error::other("no TCP listener"))?;
                let _ = addr_tx.send(addr);
                let guard = Arc::new(guard::Guard::new(token, addr, &[]));
                serve(
                    listeners,
                    state,
                    guard,
                    server::Bounds::default(),
                    async move {
                        let _ = rx.await;
                    },
                )
                .await
            })
        });
        let addr = addr_rx.recv().expect("server address");
        TestServer {
            addr,
            socket,
            token: token_text,
            store,
            info,
            shutdown: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// A client that sends the write token.
    pub fn client(&self) -> TestClient {
        TestClient {
            base: format!("http://{}", self.addr),
            token: self.token.clone(),
        }
    }

    /// A raw POST carrying the write token.
    pub fn post(&self, path: &str) -> ureq::Request {
        ureq::post(&self.url(path)).set("Authorization", &format!("Bearer {}", self.token))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn rec(
    function: &str,
    instance: &str,
    start: u64,
    end: Option<u64>,
    peak: u64,
) -> InstanceRecord {
    InstanceRecord {
        function: function.into(),
        instance: instance.into(),
        cgroup_id: start / 1000,
        cgroup_path: format!("/sys/fs/cgroup/fns/{function}/{instance}"),
        started_at_ms: start,
        ended_at_ms: end,
        execs: 2,
        peak_bytes: peak,
        peak_source: PeakSource::KernelWatermark,
        oom_kills: 0,
        limits: Limits {
            max_bytes: Some(256 << 20),
            high_bytes: None,
        },
        input_bytes: None,
        connections: 0,
        requests: 0,
    }
}

pub(crate) fn seeded() -> TestServer {
    let s = TestServer::start();
    s.store
        .put_instance(&rec("fn-a", "i1", T0, Some(T0 + 1000), 10 << 20))
        .unwrap();
    s.store
        .put_instance(&rec("fn-a", "i2", T0 + 2000, Some(T0 + 3000), 30 << 20))
        .unwrap();
    s.store
        .put_instance(&rec("fn-a", "i3", T0 + 4000, None, 20 << 20))
        .unwrap();
    s.store
        .put_instance(&rec("fn-b", "j1", T0 + HOUR, None, 5 << 20))
        .unwrap();
    s
}

/// Status and parsed JSON body of a raw request, error or not; checks the content type.
pub(crate) fn raw(resp: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    assert_eq!(resp.content_type(), "application/json", "status {status}");
    let v: serde_json::Value = resp.into_json().expect("JSON body");
    (status, v)
}

/// A request the server answered with an error, or one that did not reach it.
#[derive(Debug)]
pub(crate) enum TestError {
    /// The status and the body's `"error"`.
    Api { status: u16, message: String },
    /// Read only through `Debug`, in a failed test's message.
    #[allow(dead_code)]
    Transport(String),
}

/// A plain HTTP client of a [`TestServer`]: JSON in, JSON out, the token on every POST.
pub(crate) struct TestClient {
    base: String,
    token: String,
}

impl TestClient {
    pub fn get(&self, path: &str) -> Result<serde_json::Value, TestError> {
        Self::answer(ureq::get(&format!("{}{path}", self.base)).call())
    }

    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, TestError> {
        Self::answer(
            ureq::post(&format!("{}{path}", self.base))
                .set("Authorization", &format!("Bearer {}", self.token))
                .send_json(body),
        )
    }

    /// GET `path`, decoded as the wire type `T`.
    pub fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, TestError> {
        let v = self.get(path)?;
        serde_json::from_value(v).map_err(|e| TestError::Transport(format!("decoding: {e}")))
    }

    fn answer(resp: Result<ureq::Response, ureq::Error>) -> Result<serde_json::Value, TestError> {
        match resp {
            Ok(r) => r
                .into_json()
                .map_err(|e| TestError::Transport(format!("reading the body: {e}"))),
            Err(ureq::Error::Status(status, r)) => {
                let body: ErrorBody = r
                    .into_json()
                    .map_err(|e| TestError::Transport(format!("an error without its body: {e}")))?;
                Err(TestError::Api {
                    status,
                    message: body.error,
                })
            }
            Err(e) => Err(TestError::Transport(e.to_string())),
        }
    }
}
