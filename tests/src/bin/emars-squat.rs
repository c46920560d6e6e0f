//! What a local attacker runs to collect what clients send to a port or socket they expect the
//! agent at: listens on a TCP address (`--tcp 127.0.0.1:9750`) or a unix socket path
//! (`--unix PATH`), appends every byte each client sends (headers and body, until the end of
//! the body or 2 s of silence) to `--log FILE`, and answers each with a forged `200 {}`.
//! Prints `listening` once bound. For the security tests, run as user `nobody`.

use std::{
    io::{Read, Write},
    time::Duration,
};

const USAGE: &str = "usage: emars-squat (--tcp ADDR | --unix PATH) --log FILE";

fn main() {
    if let Err(e) = run() {
        eprintln!("emars-squat: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let log_path = value("--log").ok_or(USAGE)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{log_path}: {e}"))?;
    match (value("--tcp"), value("--unix")) {
        (Some(addr), None) => {
            let l = std::net::TcpListener::bind(&addr).map_err(|e| format!("{addr}: {e}"))?;
            println!("listening");
            for s in l.incoming().flatten() {
                serve(s, &mut log);
            }
        }
        (None, Some(path)) => {
            let l = std::os::unix::net::UnixListener::bind(&path)
                .map_err(|e| format!("{path}: {e}"))?;
            println!("listening");
            for s in l.incoming().flatten() {
                serve(s, &mut log);
            }
        }
        _ => return Err(USAGE.into()),
    }
    Ok(())
}

/// Reads one request (to the end of its body, by Content-Length, or 2 s of silence), logs it
/// and answers a forged success.
fn serve<S: Read + Write + SetTimeout>(mut s: S, log: &mut std::fs::File) {
    s.set_timeout(Duration::from_secs(2));
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if request_complete(&got) {
            break;
        }
    }
    let _ = log.write_all(&got);
    let _ = log.flush();
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
}

/// Headers ended and as many body bytes as Content-Length says.
fn request_complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= end + 4 + len
}

trait SetTimeout {
    fn set_timeout(&self, d: Duration);
}

impl SetTimeout for std::net::TcpStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}

impl SetTimeout for std::os::unix::net::UnixStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}
