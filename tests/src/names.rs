//! Many function names sent to a real agent, as a tenant with the token could: what the
//! bounded-state test (`tests/bounds.rs`) and `emars-bench-api --names` share.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::Agent;

/// How the agent answered a batch of invocation reports, by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Answers {
    /// 200: counted (the function was known, or there was room for it).
    pub counted: u64,
    /// 507: refused by `store.max_functions`, with the message naming it.
    pub refused: u64,
}

/// `POST /v1/functions/{name}/invocations` (count 1) for every name, from `threads` clients
/// with a connection each, as the token holder. Any answer other than 200, or 507 naming
/// `store.max_functions`, is an error.
pub fn report_names(agent: &Agent, names: &[String], threads: usize) -> Result<Answers> {
    let next = AtomicUsize::new(0);
    let auth = format!("Bearer {}", agent.token);
    let results: Vec<Result<Answers>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<Answers> {
                    let client = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(30))
                        .build();
                    let mut a = Answers::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(name) = names.get(i) else {
                            return Ok(a);
                        };
                        let path = format!("/v1/functions/{name}/invocations");
                        let r = client
                            .post(&agent.url(&path))
                            .set("Authorization", &auth)
                            .set("Content-Type", "application/json")
                            .send_string(r#"{"count":1}"#);
                        match r {
                            Ok(r) if r.status() == 200 => a.counted += 1,
                            Err(ureq::Error::Status(507, r)) => {
                                let body = r.into_string().unwrap_or_default();
                                if !body.contains("store.max_functions") {
                                    bail!("{path}: 507 without naming the setting: {body}");
                                }
                                a.refused += 1;
                            }
                            Err(ureq::Error::Status(code, r)) => {
                                bail!("{path}: {code} {}", r.into_string().unwrap_or_default())
                            }
                            Ok(r) => bail!("{path}: {}", r.status()),
                            Err(e) => bail!("{path}: {e}"),
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow!("a client panicked")))
            })
            .collect()
    });
    let mut total = Answers::default();
    for r in results {
        let a = r?;
        total.counted += a.counted;
        total.refused += a.refused;
    }
    Ok(total)
}

/// The agent's resident memory by kind, as /proc/PID/status says it: (RssAnon, RssFile,
/// RssShmem) in bytes. Shared mappings (the ring buffer, BPF maps) are not its heap.
pub fn rss_parts(pid: u32) -> Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")?, field("RssShmem:")?))
}

/// The agent's resident memory now (`VmRSS` of /proc/PID/status), in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// One scrape of `/metrics`: its text and how long it took.
pub fn scrape(agent: &Agent) -> Result<(String, Duration)> {
    use std::io::Read;
    let start = Instant::now();
    let mut text = String::new();
    // Read whole, however large (ureq's into_string stops at 10 MB).
    ureq::get(&agent.url("/metrics"))
        .call()
        .context("GET /metrics")?
        .into_reader()
        .read_to_string(&mut text)
        .context("reading /metrics")?;
    Ok((text, start.elapsed()))
}

/// The value of an unlabelled series in an exposition.
pub fn series_value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The distinct `function` label values of an exposition.
pub fn function_labels(text: &str) -> std::collections::BTreeSet<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("function=\"").nth(1)?.split('"').next())
        .collect()
}

/// `n` distinct function names `<prefix>-00000…`.
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}
