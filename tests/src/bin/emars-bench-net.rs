//! emars-bench-net: what the socket program (`net_ingress`, cgroup_skb ingress) costs, measured
//! on the real kernel with the real agent. It prints a report; it is not a test.
//!
//! 1. ns per packet in isolation: BPF_PROG_TEST_RUN on the agent's loaded, pinned program, for
//!    an HTTP/1.1 request segment, a SYN, a pure ACK and a non-HTTP data segment.
//! 2. ns per packet on real traffic: the kernel's bpf_stats (kernel.bpf_stats_enabled, set for
//!    one round and restored) over a load round.
//! 3. Request latency with and without the program: an HTTP/1.1 keep-alive server
//!    (emars-http-server) in one instance cgroup, made as runc makes it, driven at a paced rate
//!    over several connections; rounds with the program attached alternate with rounds of an
//!    agent that has it disabled (`probes.disable`), the same in everything else. Each round
//!    with the program checks that the agent counted every request sent.
//!
//! ```text
//! cargo xtask bench --release --net [-- ARGS]      # or, built:
//! sudo EMARS_BIN=target/release/emars target/release/emars-bench-net [--rounds R] [--seconds S] [--rate Q]
//! ```

use std::{
    ffi::c_void,
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    programs::{CgroupSkb, CgroupSkbAttachType, ProgramInfo},
};
use emars_common::{names, NetCounts};
use emars_tests::bench::{check_interrupted, install_signal_handlers, BpfStatsGuard};
use emars_tests::{
    agent_bin, flag_number as number,
    http::{HttpServer, Sandbox},
    http_server_bin, program_attached, u64_of, Agent, Hierarchy, TestRoot,
};

const USAGE: &str = "usage: emars-bench-net [--runs N] [--repeat R] [--rounds P] [--seconds S] [--rate Q] [--connections C]
  --runs N         BPF_PROG_TEST_RUN runs per packet kind (default 31)
  --repeat R       repetitions per run (default 100000)
  --rounds P       round pairs with and without the program (default 5)
  --seconds S      measured seconds of load per round (default 3)
  --rate Q         requests per second into the container (default 10000)
  --connections C  keep-alive connections the load is spread over (default 4)
Runs as root. The agent binary is $EMARS_BIN (else target/<profile>/emars), the server
$EMARS_HTTP_SERVER_BIN (else emars-http-server beside this binary).";

const FUNCTION: &str = "web";
/// Load before each round's measured window (connections warm, caches warm): sent and
/// counted, not timed.
const WARMUP: Duration = Duration::from_millis(500);

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("emars-bench-net: {e:#}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "emars-bench-net: must run as root: it creates cgroups, runs the agent (which loads \
             eBPF programs), test-runs the program and sets kernel.bpf_stats_enabled"
        );
        std::process::exit(2);
    }
    install_signal_handlers();
    // run() returns before exit, so every guard (bpf_stats, agents, cgroups) has been dropped.
    let code = match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("\nemars-bench-net: FAILED: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Options, signals, bpf_stats guard
// ---------------------------------------------------------------------------------------------

struct Opts {
    runs: usize,
    repeat: u32,
    rounds: usize,
    seconds: f64,
    rate: f64,
    connections: usize,
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut o = Opts {
            runs: 31,
            repeat: 100_000,
            rounds: 5,
            seconds: 3.0,
            rate: 10_000.0,
            connections: 4,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--runs" => o.runs = number(&a, args.next())?,
                "--repeat" => o.repeat = number(&a, args.next())?,
                "--rounds" => o.rounds = number(&a, args.next())?,
                "--seconds" => o.seconds = number(&a, args.next())?,
                "--rate" => o.rate = number(&a, args.next())?,
                "--connections" => o.connections = number(&a, args.next())?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        if o.runs == 0 || o.repeat == 0 || o.rounds == 0 || o.connections == 0 {
            bail!("--runs, --repeat, --rounds and --connections must be at least 1");
        }
        if !(o.seconds > 0.0 && o.rate > 0.0) {
            bail!("--seconds and --rate must be positive");
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// The `q` quantile (0..=1) of sorted `v`, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> f64 {
    quantile(&sorted(v.to_vec()), 0.5)
}

// ---------------------------------------------------------------------------------------------
// 1. BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------------

/// `BPF_PROG_TEST_RUN`, bpf(2)'s command 10.
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `batch_size`. The
/// kernel reads what it knows of it and takes the rest as zero.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    /// Out: mean ns per repetition.
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs the program `repeat` times on `frame`; returns (its return value, mean ns per run).
fn test_run(prog_fd: i32, frame: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: data_in points at data_size_in readable bytes that outlive the call; no output
    // buffers are given.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.context("bpf(BPF_PROG_TEST_RUN)")?;
    Ok((attr.retval, attr.duration))
}

/// bpf(2) with `attr`, a `union bpf_attr` member of the command's (its prefix, sized as `T`);
/// the call's result (a file descriptor for the commands that make one).
///
/// # Safety
/// The pointers in `attr` must be valid for what the command reads and writes through them.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed value of the size given; what it points
    // to is the caller's to vouch for.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// `BPF_PROG_LOAD`, bpf(2)'s command 5; `BPF_PROG_TYPE_CGROUP_SKB`; `BPF_CGROUP_INET_INGRESS`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a cgroup_skb program that only returns 1 (`r0 = 1; exit`): what a test run costs
/// around any program, to tell the harness's share of a repetition from the program's.
fn load_empty_program() -> Result<OwnedFd> {
    let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 1, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"emars_null");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SKB,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_INET_INGRESS,
        ..ProgLoadAttr::default()
    };
    // SAFETY: insns and license point at live buffers of the lengths given (the license
    // NUL-terminated); no log buffer is given.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }
        .context("bpf(BPF_PROG_LOAD) of an empty program")?;
    // SAFETY: a new file descriptor of our own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An Ethernet + IPv4 + TCP frame, loopback to loopback port 8080; `flags` the TCP flags.
/// For a cgroup_skb test run the kernel strips the Ethernet header (eth_type_trans): the
/// program sees the packet from the IP header, as on real ingress.
fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload.len());
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF, fragment offset 0
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&[127, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[127, 0, 0, 1]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(flags));
    f.extend_from_slice(payload);
    f
}

/// [`frame`] over IPv6 (::1 to ::1).
fn frame6(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(74 + payload.len());
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x86, 0xdd]);
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[6] = 6; // TCP
    ip[7] = 64;
    ip[23] = 1;
    ip[39] = 1;
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(flags));
    f.extend_from_slice(payload);
    f
}

fn tcp_header(flags: u8) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&8080u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

struct Kind {
    name: &'static str,
    frame: Vec<u8>,
    /// What one run adds to the counts: (connections, requests).
    counts: (u64, u64),
}

fn kinds() -> Vec<Kind> {
    vec![
        Kind {
            name: "HTTP request (GET / HTTP/1.1)",
            frame: frame(PSH | ACK, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            counts: (0, 1),
        },
        Kind {
            name: "HTTP request over IPv6",
            frame: frame6(PSH | ACK, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            counts: (0, 1),
        },
        Kind {
            name: "SYN (connection)",
            frame: frame(SYN, b""),
            counts: (1, 0),
        },
        Kind {
            name: "data, not HTTP (64 B)",
            frame: frame(PSH | ACK, &[0x17; 64]),
            counts: (0, 0),
        },
        Kind {
            name: "pure ACK (no payload)",
            frame: frame(ACK, b""),
            counts: (0, 0),
        },
    ]
}

/// The cgroup v2 id of this process's cgroup: the cgroup of the dummy socket a test run's
/// packet belongs to (the kernel allocates it in the caller's context), so the program's map
/// lookup and update run as on real traffic, on that entry.
fn own_cgroup_id() -> Result<u64> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow!("no cgroup2 mount"))?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("no cgroup v2 line in /proc/self/cgroup"))?;
    let dir = mount.join(rel.trim_start_matches('/'));
    // A cgroup v2 directory's inode number is its cgroup id (64-bit kernfs).
    Ok(std::os::unix::fs::MetadataExt::ino(
        &fs::metadata(&dir).with_context(|| format!("stat {}", dir.display()))?,
    ))
}

/// The pinned set of the agent watching `root` (its one `v<version>-<hash>` directory).
fn pinned_set(root: &TestRoot) -> Result<PathBuf> {
    let set = fs::read_dir(&root.pin_path)
        .with_context(|| format!("reading {}", root.pin_path.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join(format!("prog_{}", names::NET_INGRESS)).exists());
    set.ok_or_else(|| {
        anyhow!(
            "no pinned {} under {}",
            names::NET_INGRESS,
            root.pin_path.display()
        )
    })
}

struct NetMap(HashMap<MapData, u64, NetCounts>);

impl NetMap {
    fn open(set: &Path) -> Result<Self> {
        let path = set.join(format!("map_{}", names::NET_COUNTS));
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(HashMap::try_from(Map::from_map_data(data)?)?))
    }

    fn get(&self, id: u64) -> Result<(u64, u64)> {
        match self.0.get(&id, 0) {
            Ok(c) => Ok((c.connections, c.requests)),
            Err(MapError::KeyNotFound) => Ok((0, 0)),
            Err(e) => Err(e.into()),
        }
    }
}

struct KindResult {
    name: &'static str,
    ns: Vec<f64>,
}

/// The runs of each packet kind, and the empty program's p50 (ns).
fn isolation(opts: &Opts) -> Result<(Vec<KindResult>, f64)> {
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let info = agent.get_ok("/v1/info")?;
    if !program_attached(&info, names::NET_INGRESS) {
        bail!(
            "{} not attached: {}",
            names::NET_INGRESS,
            serde_json::to_string_pretty(&info["programs"])?
        );
    }
    let set = pinned_set(&root)?;
    let prog = CgroupSkb::from_pin(
        set.join(format!("prog_{}", names::NET_INGRESS)),
        CgroupSkbAttachType::Ingress,
    )?;
    let fd = prog.fd()?.as_fd().as_raw_fd();
    let map = NetMap::open(&set)?;
    let id = own_cgroup_id()?;
    println!(
        "1. ns per packet in isolation: BPF_PROG_TEST_RUN on the agent's loaded program, {} runs \
         of {} repetitions per packet kind",
        opts.runs, opts.repeat
    );
    println!(
        "   (a test run's socket is a dummy in this process's cgroup, id {id}: the program's \
         map lookup and atomic update run as on real traffic, on that entry)"
    );
    // The harness alone: the same runs of an empty program on the request segment.
    let empty = load_empty_program()?;
    let mut empty_ns = Vec::with_capacity(opts.runs);
    test_run(empty.as_raw_fd(), &kinds()[0].frame, opts.repeat)?;
    for _ in 0..opts.runs {
        empty_ns.push(f64::from(
            test_run(empty.as_raw_fd(), &kinds()[0].frame, opts.repeat)?.1,
        ));
    }
    let empty_ns = sorted(empty_ns);
    println!(
        "   {:<32} p50 {:>4.0} ns  p90 {:>4.0} ns  (the test run's own cost per repetition, \
         included in each figure below)",
        "empty program (r0 = 1; exit)",
        quantile(&empty_ns, 0.5),
        quantile(&empty_ns, 0.9),
    );
    let mut out = Vec::new();
    for kind in kinds() {
        check_interrupted()?;
        let before = map.get(id)?;
        // One run first, not timed: the map entry exists from then on, as it does for an
        // instance after its first packet.
        let (retval, _) = test_run(fd, &kind.frame, opts.repeat)?;
        if retval != 1 {
            bail!("{}: the program returned {retval}, not 1 (pass)", kind.name);
        }
        let mut ns = Vec::with_capacity(opts.runs);
        for _ in 0..opts.runs {
            let (_, d) = test_run(fd, &kind.frame, opts.repeat)?;
            ns.push(f64::from(d));
        }
        let after = map.get(id)?;
        let times = (opts.runs as u64 + 1) * u64::from(opts.repeat);
        let counted = (after.0 - before.0, after.1 - before.1);
        let expected = (kind.counts.0 * times, kind.counts.1 * times);
        let s = sorted(ns.clone());
        println!(
            "   {:<32} p50 {:>4.0} ns  p90 {:>4.0} ns  min {:>4.0}  max {:>4.0}   counted \
             {} connections, {} requests ({})",
            kind.name,
            quantile(&s, 0.5),
            quantile(&s, 0.9),
            s[0],
            s[s.len() - 1],
            counted.0,
            counted.1,
            if counted == expected {
                "as expected".to_owned()
            } else {
                format!("EXPECTED {} and {}", expected.0, expected.1)
            }
        );
        out.push(KindResult {
            name: kind.name,
            ns,
        });
    }
    println!();
    drop(agent);
    Ok((out, quantile(&empty_ns, 0.5)))
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Load rounds
// ---------------------------------------------------------------------------------------------

/// What the client saw in a round's measured window.
struct Load {
    /// Requests sent in the whole round (warm-up included), each answered.
    sent: u64,
    /// Latency of each request of the measured window, µs, sorted.
    latency_us: Vec<f64>,
    /// Requests of the measured window sent later than one interval after their slot.
    late: u64,
    measured: Duration,
}

/// One keep-alive connection's share of the load: a request at each slot of its schedule
/// (slept to, never sent early), each answer read whole before the next slot.
fn connection_load(
    port: u16,
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
) -> Result<(u64, Vec<f64>, u64)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to the server")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = b"GET /bench HTTP/1.1\r\nHost: sandbox\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut latencies = Vec::new();
    let (mut sent, mut late) = (0u64, 0u64);
    let mut slot = first;
    while slot < end {
        let now = Instant::now();
        if slot > now {
            thread::sleep(slot - now);
        }
        let t = Instant::now();
        s.write_all(request)?;
        read_answer(&mut s, &mut buf)?;
        let took = t.elapsed();
        sent += 1;
        if slot >= measure_from {
            latencies.push(took.as_secs_f64() * 1e6);
            if t - slot > interval {
                late += 1;
            }
        }
        slot += interval;
        if sent % 1024 == 0 {
            check_interrupted()?;
        }
    }
    Ok((sent, latencies, late))
}

/// Reads one answer of emars-http-server: its head, then Content-Length bytes of body.
fn read_answer(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut held = 0;
    loop {
        let n = s.read(&mut buf[held..])?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        held += n;
        let Some(end) = buf[..held].windows(4).position(|w| w == b"\r\n\r\n") else {
            if held == buf.len() {
                bail!("answer head larger than {} bytes", buf.len());
            }
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("answer: {head:?}");
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow!("no Content-Length in {head:?}"))?;
        // One answer at a time on this connection: nothing past its body.
        if held >= end + 4 + length {
            return Ok(());
        }
    }
}

/// `rate` requests/s over `connections` connections for WARMUP then `measure`.
fn drive(port: u16, rate: f64, connections: usize, measure: Duration) -> Result<Load> {
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + WARMUP;
    let end = measure_from + measure;
    let handles: Vec<_> = (0..connections)
        .map(|k| {
            // Connections interleaved: one slot every 1/rate s overall.
            let first = start + interval.mul_f64(k as f64 / connections as f64);
            thread::spawn(move || connection_load(port, first, interval, measure_from, end))
        })
        .collect();
    let mut load = Load {
        sent: 0,
        latency_us: Vec::new(),
        late: 0,
        measured: measure,
    };
    for h in handles {
        let (sent, lat, late) = h.join().map_err(|_| anyhow!("a load thread panicked"))??;
        load.sent += sent;
        load.latency_us.extend(lat);
        load.late += late;
    }
    load.latency_us = sorted(load.latency_us);
    Ok(load)
}

struct Round {
    with_program: bool,
    load: Load,
    /// The agent's counts for the instance at its rmdir: (requests, connections).
    counted: (u64, u64),
    /// (run_time_ns, run_count) of the program over the measured window, when stats were on.
    stats: Option<(u64, u64)>,
}

fn round(opts: &Opts, with_program: bool, stats: bool) -> Result<Round> {
    check_interrupted()?;
    let root = TestRoot::new()?;
    let config = if with_program {
        String::new()
    } else {
        format!("[probes]\ndisable = [\"{}\"]\n", names::NET_INGRESS)
    };
    let agent = Agent::start_configured(&root, &config)?;
    let info = agent.get_ok("/v1/info")?;
    if program_attached(&info, names::NET_INGRESS) != with_program {
        bail!(
            "{} attached: {}, wanted {with_program}: {}",
            names::NET_INGRESS,
            !with_program,
            serde_json::to_string_pretty(&info["programs"])?
        );
    }
    let prog_pin = if with_program {
        Some(pinned_set(&root)?.join(format!("prog_{}", names::NET_INGRESS)))
    } else {
        None
    };
    let sandbox = Sandbox::new(&root, FUNCTION, "i1")?;
    let result = (|| {
        let server = HttpServer::start_program(Some(&sandbox), Command::new(http_server_bin()))?;
        agent.wait_live(FUNCTION, "i1")?;
        let read_stats = |p: &PathBuf| -> Result<(u64, u64)> {
            let i = ProgramInfo::from_pin(p)?;
            Ok((i.run_time().as_nanos() as u64, i.run_count()))
        };
        let guard = if stats {
            Some(BpfStatsGuard::enable("emars-bench-net")?)
        } else {
            None
        };
        let before = match (&guard, &prog_pin) {
            (Some(_), Some(p)) => Some(read_stats(p)?),
            _ => None,
        };
        let load = drive(
            server.port,
            opts.rate,
            opts.connections,
            Duration::from_secs_f64(opts.seconds),
        )?;
        let after = match (&guard, &prog_pin) {
            (Some(_), Some(p)) => Some(read_stats(p)?),
            _ => None,
        };
        drop(guard);
        let stats = before.zip(after).map(|(b, a)| (a.0 - b.0, a.1 - b.1));
        drop(server);
        Ok::<_, anyhow::Error>((load, stats))
    })();
    sandbox.remove();
    let (load, stats) = result?;
    let rec = agent
        .wait_ended(FUNCTION, 1)?
        .into_iter()
        .find(|i| i["instance"] == "i1")
        .ok_or_else(|| anyhow!("{FUNCTION}/i1 not ended"))?;
    Ok(Round {
        with_program,
        load,
        counted: (u64_of(&rec, "requests"), u64_of(&rec, "connections")),
        stats,
    })
}

fn print_round(opts: &Opts, n: usize, r: &Round) {
    let l = &r.load;
    let timed = l.latency_us.len();
    println!(
        "   round {n} {:<15} p50 {:>6.1} µs  p99 {:>6.1} µs  {:>6.0} req/s timed, {} late{}",
        if r.with_program {
            "with program:"
        } else {
            "without:"
        },
        quantile(&l.latency_us, 0.5),
        quantile(&l.latency_us, 0.99),
        timed as f64 / l.measured.as_secs_f64(),
        l.late,
        if r.with_program {
            let exact = r.counted == (l.sent, opts.connections as u64);
            format!(
                "; agent counted {} requests, {} connections of {} sent over {}{}",
                r.counted.0,
                r.counted.1,
                l.sent,
                opts.connections,
                if exact { " (exact)" } else { " (NOT EXACT)" }
            )
        } else {
            String::new()
        }
    );
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn run(opts: &Opts) -> Result<()> {
    for (what, p) in [("agent", agent_bin()), ("HTTP server", http_server_bin())] {
        if !p.is_file() {
            bail!(
                "{what} binary {} not found (build it, or set EMARS_BIN / EMARS_HTTP_SERVER_BIN)",
                p.display()
            );
        }
    }
    let hierarchy = Hierarchy::detect()?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "emars-bench-net: the socket program ({})",
        names::NET_INGRESS
    );
    println!(
        "host: kernel {}, {} CPUs, memory cgroup {:?} at {}; agent {}",
        kernel.trim(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        hierarchy.version,
        hierarchy.mount.display(),
        agent_bin().display()
    );
    println!();

    let (isolated, empty_p50) = isolation(opts)?;

    println!(
        "3. Latency: {} requests/s over {} keep-alive connections into one instance \
         (emars-http-server), {:.1} s timed per round after {:.1} s of warm-up; rounds with the \
         program and without it (probes.disable) alternated",
        opts.rate,
        opts.connections,
        opts.seconds,
        WARMUP.as_secs_f64()
    );
    let mut rounds = Vec::new();
    for pair in 1..=opts.rounds {
        // Which goes first alternates, so a drift of the host weighs on both alike.
        let order = if pair % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for with_program in order {
            let r = round(opts, with_program, false)?;
            print_round(opts, pair, &r);
            rounds.push(r);
        }
    }
    println!();

    println!("2. ns per packet on real traffic: one more round with the program, kernel.bpf_stats_enabled on");
    let stats_round = round(opts, true, true)?;
    print_round(opts, opts.rounds + 1, &stats_round);
    let under_load = stats_round.stats.map(|(ns, count)| {
        let per_packet = ns as f64 / count.max(1) as f64;
        let sent = stats_round.load.sent.max(1) as f64;
        println!(
            "   {count} packets into the instance's sockets during the round's {} requests \
             ({:.2} per request), {ns} ns in the program: {per_packet:.0} ns per packet \
             (mean), {:.0} ns per request",
            stats_round.load.sent,
            count as f64 / sent,
            ns as f64 / sent
        );
        per_packet
    });
    println!();

    // Summary.
    println!("Summary");
    for k in &isolated {
        let s = sorted(k.ns.clone());
        println!(
            "   isolated, {:<32} p50 {:>4.0} ns per packet (p90 {:.0}); less the empty \
             program's {empty_p50:.0} ns: {:.0} ns",
            k.name,
            quantile(&s, 0.5),
            quantile(&s, 0.9),
            quantile(&s, 0.5) - empty_p50
        );
    }
    if let Some(ns) = under_load {
        println!(
            "   under load ({} req/s): {ns:.0} ns per packet (mean, bpf_stats)",
            opts.rate
        );
    }
    let of = |with: bool, q: f64| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.with_program == with)
            .map(|r| quantile(&r.load.latency_us, q))
            .collect()
    };
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (with, without) = (of(true, q), of(false, q));
        let ratio = median(&with) / median(&without);
        let bmax = without.iter().copied().fold(f64::MIN, f64::max);
        let bmin = without.iter().copied().fold(f64::MAX, f64::min);
        let noise = bmax / bmin;
        println!(
            "   latency {label}: {:.1} µs with the program, {:.1} µs without (medians of {} \
             rounds): ratio {ratio:.3}; noise (max/min of the rounds without) {noise:.3}: {}",
            median(&with),
            median(&without),
            with.len(),
            if (ratio - 1.0).abs() <= noise - 1.0 {
                "within noise"
            } else {
                "OUTSIDE noise"
            }
        );
    }
    let exact = rounds
        .iter()
        .chain(std::iter::once(&stats_round))
        .filter(|r| r.with_program)
        .filter(|r| r.counted == (r.load.sent, opts.connections as u64))
        .count();
    let with_rounds = rounds.iter().filter(|r| r.with_program).count() + 1;
    println!(
        "   requests counted exactly by the agent in {exact}/{with_rounds} rounds with the program"
    );
    let late: u64 = rounds.iter().map(|r| r.load.late).sum();
    if late > 0 {
        println!(
            "   note: {late} requests were sent more than one interval after their slot (the \
             client or host could not keep the pace)"
        );
    }
    Ok(())
}
