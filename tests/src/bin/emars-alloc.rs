//! A workload with a known memory profile: optionally re-execs itself `--chain` times (to make a
//! known number of execs), waits `--delay-ms`, then allocates `--mib` MiB, touches every page
//! (at `--rate-mib-s` MiB/s when given: a function growing, not jumping; with `--step-mib N`,
//! in allocations of N MiB, so that a grower heading for more than the machine has is stopped
//! by its cgroup, not refused its first allocation),
//! holds it `--hold-ms`, and exits. With `--file-mib N` it first writes an N MiB file in
//! `--file-dir` (default `$EMARS_DISK_DIR`, else /var/tmp) and syncs it, so the cgroup holds N
//! MiB of clean page cache that the kernel can reclaim (removed at exit).
//! Used by the integration tests and the benchmark.

use std::{env, hint::black_box, os::unix::process::CommandExt, process::Command, time::Duration};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v:?}"))
        })
        .unwrap_or(default)
}

const USAGE: &str = "\
emars-alloc: a workload with a known memory profile (for tests, benchmarks and `emars tune`)

usage: emars-alloc [--mib N] [--kib N] [--hold-ms MS] [--delay-ms MS] [--rate-mib-s N] [--step-mib N]
                   [--chain N] [--file-mib N] [--file-dir DIR]

  --mib N         allocate N MiB and touch every page (default 0)
  --kib N         then N KiB more, touched at once (sizes finer than a MiB)
  --hold-ms MS    then hold it MS milliseconds before exiting (default 0)
  --delay-ms MS   wait MS milliseconds before allocating (default 0)
  --rate-mib-s N  touch the pages at N MiB/s instead of at once
  --step-mib N    allocate in pieces of N MiB (a grower its cgroup stops, not its first malloc)
  --chain N       re-exec itself N times first (N more execs in its cgroup)
  --file-mib N    first write and sync an N MiB file: clean page cache the kernel can reclaim
  --file-dir DIR  where that file goes (default $EMARS_DISK_DIR, else /var/tmp)

example: emars tune --limits 16Mi,32Mi,64Mi -- emars-alloc --mib 40 --hold-ms 100";

/// Every option takes a value; anything else is a mistake that would silently change the
/// profile (a misspelt `--mb 40` allocating nothing), so it is refused with the usage.
const OPTIONS: [&str; 9] = [
    "--chain",
    "--mib",
    "--kib",
    "--hold-ms",
    "--delay-ms",
    "--rate-mib-s",
    "--step-mib",
    "--file-mib",
    "--file-dir",
];

fn check_args() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    for pair in args.chunks(2) {
        if !OPTIONS.contains(&pair[0].as_str()) || pair.len() < 2 {
            eprintln!("emars-alloc: bad argument {:?}\n\n{USAGE}", pair[0]);
            std::process::exit(2);
        }
    }
}

fn main() {
    check_args();
    let chain = arg("--chain", 0);
    let mib = arg("--mib", 0);
    let hold_ms = arg("--hold-ms", 0);
    let delay_ms = arg("--delay-ms", 0);
    let rate = arg("--rate-mib-s", 0);
    if chain > 0 {
        let err = Command::new("/proc/self/exe")
            .args([
                "--chain",
                &(chain - 1).to_string(),
                "--mib",
                &mib.to_string(),
                "--hold-ms",
                &hold_ms.to_string(),
                "--delay-ms",
                &delay_ms.to_string(),
            ])
            .exec();
        panic!("re-exec failed: {err}");
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    let file_mib = arg("--file-mib", 0);
    let cache_file = (file_mib > 0).then(|| write_cache_file(file_mib));
    let step = match arg("--step-mib", 0) {
        0 => mib.max(1),
        s => s,
    };
    // Touch every page so the memory is really charged to the cgroup; with --rate-mib-s, at
    // that rate (a function growing as real ones do, not in one step).
    let start = std::time::Instant::now();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut done: u64 = 0;
    while done < mib {
        let size = step.min(mib - done);
        let mut buf = vec![0u8; (size as usize) << 20];
        for i in (0..buf.len()).step_by(4096) {
            buf[i] = 1;
            if rate > 0 && i % (1 << 20) == 0 {
                let at_mib = done as f64 + i as f64 / (1u64 << 20) as f64;
                let due = Duration::from_secs_f64(at_mib / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        chunks.push(black_box(buf));
        done += size;
    }
    let kib = arg("--kib", 0);
    if kib > 0 {
        let mut buf = vec![0u8; (kib as usize) << 10];
        for i in (0..buf.len()).step_by(4096) {
            buf[i] = 1;
        }
        chunks.push(black_box(buf));
    }
    std::thread::sleep(Duration::from_millis(hold_ms));
    black_box(&chunks);
    if let Some(p) = cache_file {
        let _ = std::fs::remove_file(p);
    }
}

/// Writes `mib` MiB to a new file and syncs it: clean page cache charged to this cgroup.
fn write_cache_file(mib: u64) -> std::path::PathBuf {
    use std::io::Write;
    let dir = env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0] == "--file-dir")
        .map(|w| w[1].clone())
        .or_else(|| env::var("EMARS_DISK_DIR").ok())
        .unwrap_or_else(|| "/var/tmp".into());
    let path = std::path::Path::new(&dir).join(format!("emars-alloc-{}.cache", std::process::id()));
    let mut f =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("syncing {}: {e}", path.display()));
    path
}
