//! emars-http-server: a minimal keep-alive HTTP/1.1 server for the socket program's benchmark
//! (a thread per connection, "ok" to every request), fast enough to take 10,000 requests/s on
//! two cores where Python's http.server cannot. It listens on a loopback port of the kernel's
//! choice and prints the port once listening.
//!
//! Requests carry no body (GET); "Connection: close" closes after the answer.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";

fn main() {
    let listener = match TcpListener::bind(("127.0.0.1", 0)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("emars-http-server: bind: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("{}", a.port()),
        Err(e) => {
            eprintln!("emars-http-server: local_addr: {e}");
            std::process::exit(1);
        }
    }
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                thread::spawn(move || serve(s));
            }
            Err(e) => eprintln!("emars-http-server: accept: {e}"),
        }
    }
}

/// Answers each request head read on `s`, one write for all the heads of one read.
fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut held = 0;
    let mut out = Vec::new();
    loop {
        if held == buf.len() {
            // A head larger than the buffer: not a client of this benchmark.
            return;
        }
        let n = match s.read(&mut buf[held..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        held += n;
        let mut start = 0;
        let mut close = false;
        while let Some(end) = find(&buf[start..held], b"\r\n\r\n") {
            let head = &buf[start..start + end];
            close |= contains_ignore_case(head, b"connection: close");
            out.extend_from_slice(ANSWER);
            start += end + 4;
        }
        buf.copy_within(start..held, 0);
        held -= start;
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
