//! Real HTTP servers in instance cgroups and clients that send a known number of requests: the
//! ground truth for requests counted in the kernel.
//!
//! An instance is made as a container runtime makes it: its memory cgroup, and on a hybrid host
//! (memory controller on cgroup v1) its cgroup in the unified hierarchy under the same path, as
//! runc does. Socket programs act on the unified hierarchy only.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{http_server_bin, remove_tree, TestRoot, Version};

/// Where cgroup2 is mounted beside a v1 memory hierarchy (hybrid host); None on pure v2, where
/// the memory hierarchy is the unified one.
pub fn unified_beside(root: &TestRoot) -> Option<PathBuf> {
    if root.hierarchy.version == Version::V2 {
        return None;
    }
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// An instance cgroup as runc makes it.
pub struct Sandbox {
    /// The memory cgroup (the instance the agent records).
    pub memory: PathBuf,
    /// The same path in the unified hierarchy (hybrid hosts only).
    pub unified: Option<PathBuf>,
}

impl Sandbox {
    pub fn new(root: &TestRoot, function: &str, instance: &str) -> Result<Sandbox> {
        let memory = root.instance_dir(function, instance)?;
        let unified = match unified_beside(root) {
            Some(mount) => {
                let d = mount.join(&root.rel[1..]).join(function).join(instance);
                fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                Some(d)
            }
            None => None,
        };
        Ok(Sandbox { memory, unified })
    }

    /// `cmd` spawned inside the sandbox (every hierarchy it is in) before it execs.
    pub fn spawn(&self, mut cmd: Command) -> Result<Child> {
        emars_agent::kernel::cgroupfs::join_before_exec(&mut cmd, &self.memory)?;
        if let Some(u) = &self.unified {
            emars_agent::kernel::cgroupfs::join_before_exec(&mut cmd, u)?;
        }
        cmd.spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.memory.display()))
    }

    /// Removes the instance (its processes killed), as a runtime does when it deletes it.
    pub fn remove(&self) {
        remove_tree(&self.memory);
        if let Some(u) = &self.unified {
            remove_tree(u);
        }
    }
}

/// A keep-alive HTTP/1.1 server (tests/src/bin/emars-http-server.rs, a thread per
/// connection) on a loopback port of its choosing; killed when dropped.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

impl HttpServer {
    /// Starts the server in `sandbox` (None: on the host, outside any watched cgroup). Ready
    /// when it returns: it said its port once listening, so no probe connection is made.
    pub fn start(sandbox: Option<&Sandbox>) -> Result<HttpServer> {
        Self::start_program(sandbox, Command::new(http_server_bin()))
    }

    /// Starts `cmd`, a server that prints its loopback port once listening (as
    /// `emars-http-server` does), in `sandbox` (None: on the host).
    pub fn start_program(sandbox: Option<&Sandbox>, mut cmd: Command) -> Result<HttpServer> {
        cmd.stdout(Stdio::piped());
        let mut child = match sandbox {
            Some(s) => s.spawn(cmd)?,
            None => cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?,
        };
        match read_port(&mut child) {
            Ok(port) => Ok(HttpServer { child, port }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `n` requests, each on a connection of its own (closed after its answer).
    pub fn requests_on_new_connections(&self, n: u64) -> Result<()> {
        for _ in 0..n {
            let mut s = connect(self.port)?;
            let answers = exchange(&mut s, 1, true)?;
            if answers != 1 {
                bail!("{answers} answers to 1 request");
            }
        }
        Ok(())
    }

    /// `m` requests over one keep-alive connection, each sent after the answer to the last.
    pub fn requests_kept_alive(&self, m: u64) -> Result<()> {
        let mut s = connect(self.port)?;
        let answers = exchange(&mut s, m, false)?;
        if answers != m {
            bail!("{answers} answers to {m} requests");
        }
        Ok(())
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).context("connecting to the server")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `n` GETs one after the other, reading each answer whole; returns the answers read.
fn exchange(s: &mut TcpStream, n: u64, close: bool) -> Result<u64> {
    let connection = if close { "close" } else { "keep-alive" };
    let mut reader = BufReader::new(s.try_clone()?);
    for i in 0..n {
        // One write, as HTTP clients send a request's head.
        let request =
            format!("GET /{i} HTTP/1.1\r\nHost: sandbox\r\nConnection: {connection}\r\n\r\n");
        s.write_all(request.as_bytes())?;
        read_answer(&mut reader).with_context(|| format!("answer {i}"))?;
    }
    Ok(n)
}

/// Reads one answer whole (its head, then Content-Length bytes of body); an error unless it
/// is a 200.
pub fn read_answer(reader: &mut impl BufRead) -> Result<()> {
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        bail!("the server closed the connection");
    }
    if !status.starts_with("HTTP/1.1 200") {
        bail!("answer: {status:?}");
    }
    let mut length = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            bail!("the server closed the connection in the answer's head");
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0u8; length.ok_or_else(|| anyhow!("an answer without Content-Length"))?];
    reader.read_exact(&mut body)?;
    Ok(())
}

/// The port a server started with its stdout piped says it listens on (its first line).
pub fn read_port(server: &mut Child) -> Result<u16> {
    let out = server.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    line.trim()
        .parse()
        .with_context(|| format!("the server's port: {line:?}"))
}
