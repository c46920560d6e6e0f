//! emars-http-server: a function's warm sandbox as the tests run it: an HTTP/1.1 server with
//! keep-alive on a loopback port of its choosing (printed on stdout once it listens), a thread
//! per connection, std only (static musl builds run it in the VMs).
//!
//! - `GET <anything>`: answers `ok`.
//! - `POST /invoke?mib=N&ms=T`: an invocation: allocates and touches N MiB, holds them T ms,
//!   frees them, answers `ok`.
//!
//! ```text
//! emars-http-server [--port P]
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

fn main() {
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--port", Some(p)) => port = p,
            _ => {
                eprintln!("usage: emars-http-server [--port P]");
                std::process::exit(2);
            }
        }
    }
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("emars-http-server: binding 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("{port}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(conn);
        });
    }
}

/// Answers the requests of one connection until the client closes it or asks to.
fn serve(conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        if method == "POST" {
            invoke(target);
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: {}\r\n\r\nok\n",
            if close { "close" } else { "keep-alive" }
        );
        out.write_all(answer.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// `/invoke?mib=N&ms=T`: N MiB touched page by page, held T ms.
fn invoke(target: &str) {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (mib, ms) = (param("mib"), param("ms"));
    let bytes = usize::try_from(mib << 20).unwrap_or(0);
    let mut held = vec![0u8; bytes];
    for i in (0..held.len()).step_by(4096) {
        held[i] = 1;
    }
    thread::sleep(Duration::from_millis(ms));
    std::hint::black_box(&held);
}
