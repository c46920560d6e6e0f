//! emars-http-server: a function's warm sandbox as the tests run it, as a container's
//! long-lived function server is (of-watchdog, OpenWhisk's action proxy): one exec, then every
//! invocation an HTTP/1.1 request over keep-alive connections. The server of the requests tests
//! (tests/requests.rs), of the net bench (emars-bench-net) and of the reference platform's HTTP
//! mode (`emars-platform --http`).
//!
//! Listens on 127.0.0.1 at a port of the kernel's choice (`--port P` to name one), prints the
//! port on stdout once listening, then serves each connection on a thread of its own:
//!
//! - `POST /invoke?mib=N&ms=T`: allocates N MiB and touches every page (charged to the
//!   sandbox's cgroup), holds them T ms, frees them, answers `200` — an invocation with the
//!   memory profile the trace drew for it;
//! - `GET` of any target: answers `200` at once;
//! - any other request: `404`.
//!
//! Keep-alive unless the request says `Connection: close`. The standard library and libc's
//! mmap only (the VM matrix runs it as a static musl binary).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

/// Largest request head or body accepted: the platform's are a few dozen bytes.
const MAX_HEAD: usize = 16 << 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match args.as_slice() {
        [] => 0,
        [flag, p] if flag == "--port" => p.parse().unwrap_or_else(|_| usage()),
        _ => usage(),
    };
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("emars-http-server: binding 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    // The platform reads this line: it means the server is listening.
    println!("{port}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            if let Err(e) = serve(conn) {
                eprintln!("emars-http-server: {e}");
            }
        });
    }
}

fn usage() -> ! {
    eprintln!("usage: emars-http-server [--port P]");
    std::process::exit(2);
}

/// Serves one connection until the client closes it or asks to.
fn serve(conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut body_len = 0usize;
        let mut close = false;
        let mut head_len = line.len();
        loop {
            let mut h = String::new();
            head_len += reader.read_line(&mut h)?;
            if head_len > MAX_HEAD {
                return answer(&mut out, "431 Request Header Fields Too Large", true);
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    body_len = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        if body_len > MAX_HEAD {
            return answer(&mut out, "413 Content Too Large", true);
        }
        let mut body = vec![0u8; body_len];
        reader.read_exact(&mut body)?;
        let mut parts = line.split_whitespace();
        let status = match (parts.next(), parts.next().and_then(invoke_query)) {
            (Some("POST"), Some((mib, ms))) => {
                invoke(mib, ms);
                "200 OK"
            }
            (Some("GET"), _) => "200 OK",
            _ => "404 Not Found",
        };
        answer(&mut out, status, close)?;
        if close {
            return Ok(());
        }
    }
}

/// `mib` and `ms` of `/invoke?mib=N&ms=T` (each 0 when absent); None for another target.
fn invoke_query(target: &str) -> Option<(u64, u64)> {
    let query = match target.split_once('?') {
        Some(("/invoke", q)) => q,
        None if target == "/invoke" => "",
        _ => return None,
    };
    let (mut mib, mut ms) = (0, 0);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("mib", v)) => mib = v.parse().ok()?,
            Some(("ms", v)) => ms = v.parse().ok()?,
            _ => return None,
        }
    }
    Some((mib, ms))
}

/// One invocation: `mib` MiB mapped and touched page by page, held `ms` ms, unmapped. Its own
/// mapping, not the allocator's: glibc's raises its mmap threshold after a free and would keep
/// the next invocation's pages in the heap, so the server's usage would not fall back.
fn invoke(mib: u64, ms: u64) {
    let len = (mib as usize) << 20;
    if len == 0 {
        thread::sleep(Duration::from_millis(ms));
        return;
    }
    // SAFETY: a fresh private anonymous mapping; no file, no address hint.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        eprintln!(
            "emars-http-server: mmap {mib} MiB: {}",
            std::io::Error::last_os_error()
        );
        thread::sleep(Duration::from_millis(ms));
        return;
    }
    let pages = p.cast::<u8>();
    for i in (0..len).step_by(4096) {
        // SAFETY: i < len, inside the mapping made above.
        unsafe { pages.add(i).write_volatile(1) };
    }
    thread::sleep(Duration::from_millis(ms));
    // SAFETY: the mapping made above, of that length, no reference into it left.
    unsafe { libc::munmap(p, len) };
}

fn answer(out: &mut TcpStream, status: &str, close: bool) -> std::io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    let body = "ok\n";
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    out.write_all(reply.as_bytes())
}
