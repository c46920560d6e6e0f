//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) for the
//! tests: started on a free port with a storage of its own in a temporary directory, waited
//! for until it answers ready, queried over its HTTP API, killed when dropped.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{find_program, time_scale, wait_for, KillOnDrop};

/// Asks for Prometheus's protobuf exposition, which carries native histograms (Prometheus
/// 2.40 to 2.x; from 3.0 they are a scrape setting, `scrape_native_histograms`).
pub const NATIVE_HISTOGRAMS: &str = "--enable-feature=native-histograms";

/// A running Prometheus server. Killed (and reaped) on drop.
pub struct Prometheus {
    _server: KillOnDrop,
    /// Where it listens.
    pub addr: SocketAddr,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// One job, `job`, scraping `targets` (`host:port`) every second: a prometheus.yml for
    /// [`Prometheus::start`].
    pub fn config(job: &str, targets: &[&str]) -> String {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        )
    }

    /// Prometheus scraping `targets` as job `job` every second, run with `flags` (such as
    /// [`NATIVE_HISTOGRAMS`]).
    pub fn scraping(job: &str, targets: &[&str], flags: &[&str]) -> Result<Prometheus> {
        Self::start(&Self::config(job, targets), flags)
    }

    /// Prometheus with `config` as its prometheus.yml and `flags` besides those it needs here
    /// (config file, storage, listen address), once it answers ready.
    pub fn start(config: &str, flags: &[&str]) -> Result<Prometheus> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), config, flags)
    }

    /// [`Prometheus::start`] listening on `addr` (such as the host end of a test's network
    /// namespace, for an agent inside to ask).
    pub fn start_at(addr: SocketAddr, config: &str, flags: &[&str]) -> Result<Prometheus> {
        let Some(program) = find_program("prometheus") else {
            bail!("prometheus (Debian package) missing: run `cargo xtask setup`");
        };
        let dir = tempfile::tempdir()?;
        let config_file = dir.path().join("prometheus.yml");
        fs::write(&config_file, config)?;
        let log = fs::File::create(dir.path().join("prometheus.log"))?;
        let server = KillOnDrop(
            Command::new(program)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .args(flags)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting prometheus")?,
        );
        let prometheus = Prometheus {
            _server: server,
            addr,
            port: addr.port(),
            dir,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            let r = ureq::get(&prometheus.url("/-/ready")).call().ok()?;
            (r.status() == 200).then_some(())
        });
        if ready.is_none() {
            bail!(
                "prometheus did not answer ready on {addr} in {}s:\n{}",
                30 * time_scale(),
                prometheus.log()
            );
        }
        Ok(prometheus)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the server has logged so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    /// An instant query now (`/api/v1/query`): the whole JSON answer, whose `status` is
    /// "success" (an error answer is an Err).
    pub fn query(&self, promql: &str) -> Result<Value> {
        self.api(ureq::get(&self.url("/api/v1/query")).query("query", promql))
    }

    /// A range query (`/api/v1/query_range`) from `start` to `end` (Unix seconds) every `step`
    /// seconds: the whole JSON answer, as [`Prometheus::query`].
    pub fn query_range(&self, promql: &str, start: f64, end: f64, step: f64) -> Result<Value> {
        self.api(
            ureq::get(&self.url("/api/v1/query_range"))
                .query("query", promql)
                .query("start", &start.to_string())
                .query("end", &end.to_string())
                .query("step", &step.to_string()),
        )
    }

    fn api(&self, request: ureq::Request) -> Result<Value> {
        let body: Value = match request.call() {
            Ok(r) => r.into_json()?,
            // Prometheus answers a bad query with 400 and a JSON error.
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                bail!("prometheus answered {code}: {text}");
            }
            Err(e) => return Err(e.into()),
        };
        if body["status"] != "success" {
            bail!("prometheus answered {body}");
        }
        Ok(body)
    }

    /// The series of an answer (`data.result`; empty when there is none).
    pub fn result(answer: &Value) -> Vec<Value> {
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}
