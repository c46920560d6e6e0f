//! A storm of API clients against a real agent, for the load benchmark and the starvation
//! test: heavy clients GETting whole-model answers in a loop (a new connection each), slow
//! clients holding half-sent requests, a prober GETting `/healthz` every 100 ms over TCP and
//! through the local socket, and the agent's RSS sampled every 100 ms.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Agent;

/// The clients of the storm, running on a runtime of their own until stopped.
pub struct Storm {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    health: Arc<Mutex<Health>>,
    rss: Arc<Mutex<(u64, u64)>>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

#[derive(Default)]
pub struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
    slow_cycles: AtomicU64,
}

#[derive(Default)]
pub struct Health {
    pub tcp_ms: Vec<f64>,
    pub local_ms: Vec<f64>,
    pub tcp_failed: u64,
    pub local_failed: u64,
}

/// What the storm did.
pub struct Load {
    pub secs: f64,
    pub ok: u64,
    pub refused: u64,
    pub other: u64,
    pub failed: u64,
    pub slow_cycles: u64,
    pub health: Health,
    pub rss_peak_mb: f64,
    pub rss_end_mb: f64,
}

impl Storm {
    /// Starts `heavy` heavy and `slow` slow clients against `agent`, and lets them build up.
    /// `function`'s instances are one of the answers asked for (10,000 a request).
    pub fn start(agent: &Agent, heavy: usize, slow: usize, function: &str) -> Result<Storm> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let health = Arc::new(Mutex::new(Health::default()));
        let rss = Arc::new(Mutex::new((0, 0)));
        let addr: SocketAddr = agent.addr.parse().context("agent address")?;
        let paths = vec![
            "/metrics".to_owned(),
            "/v1/recommendations".to_owned(),
            "/v1/functions".to_owned(),
            "/v1/export".to_owned(),
            format!("/v1/functions/{function}/instances?limit=10000"),
        ];
        let mut threads = Vec::new();
        {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("client runtime");
                rt.block_on(clients(addr, paths, heavy, slow, stop, counts));
            }));
        }
        {
            let (stop, health) = (stop.clone(), health.clone());
            let socket = agent.socket.clone();
            threads.push(thread::spawn(move || probe(addr, &socket, &stop, &health)));
        }
        {
            let (stop, rss) = (stop.clone(), rss.clone());
            let pid = agent.pid();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kb) = status_kb(pid, "VmRSS:") {
                        if let Ok(mut r) = rss.lock() {
                            r.0 = r.0.max(kb);
                            r.1 = kb;
                        }
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        // Let the storm build up before the churn starts.
        thread::sleep(Duration::from_secs(3));
        Ok(Storm {
            stop,
            counts,
            health,
            rss,
            threads,
            started: Instant::now(),
        })
    }

    /// Stops every client and says what they saw.
    pub fn stop(self) -> Result<Load> {
        let secs = self.started.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let health = std::mem::take(&mut *self.health.lock().map_err(|_| anyhow::anyhow!("lock"))?);
        let (peak, end) = *self.rss.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let c = &self.counts;
        Ok(Load {
            secs,
            ok: c.ok.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            other: c.other.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            slow_cycles: c.slow_cycles.load(Ordering::Relaxed),
            health,
            rss_peak_mb: peak as f64 / 1024.0,
            rss_end_mb: end as f64 / 1024.0,
        })
    }
}

async fn clients(
    addr: SocketAddr,
    paths: Vec<String>,
    heavy: usize,
    slow: usize,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..heavy {
        let path = paths[i % paths.len()].clone();
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match heavy_get(addr, &path).await {
                    Ok(200) => counts.ok.fetch_add(1, Ordering::Relaxed),
                    Ok(503) => counts.refused.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => counts.other.fetch_add(1, Ordering::Relaxed),
                    Err(_) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        0
                    }
                };
            }
        });
    }
    for _ in 0..slow {
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = half_sent(addr, &stop).await;
                counts.slow_cycles.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One GET on a new connection, read to its end; the status.
async fn heavy_get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timeout"))??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut sink = [0u8; 65536];
    let read_all = async {
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    Ok(status)
}

/// A request that never finishes: half a header, then a byte a second until dropped.
async fn half_sent(addr: SocketAddr, stop: &AtomicBool) -> std::io::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /v1/functions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await?;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.write_all(b"a").await?;
    }
    Ok(())
}

/// GET /healthz every 100 ms on a new connection, over TCP and through the local socket.
fn probe(addr: SocketAddr, socket: &Path, stop: &AtomicBool, health: &Mutex<Health>) {
    let local = emars_agent::cli::client::Client::local(socket);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        // A client of its own each time, as a liveness probe is: no kept-alive connection.
        let tcp = emars_agent::cli::client::Client::new(&addr.to_string());
        let tcp_ok = tcp.get("/healthz").is_ok();
        let tcp_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let local_ok = local.get("/healthz").is_ok();
        let local_ms = t.elapsed().as_secs_f64() * 1e3;
        if let Ok(mut h) = health.lock() {
            if tcp_ok {
                h.tcp_ms.push(tcp_ms);
            } else {
                h.tcp_failed += 1;
            }
            if local_ok {
                h.local_ms.push(local_ms);
            } else {
                h.local_failed += 1;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
