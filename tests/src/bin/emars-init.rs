//! /init of the VM-matrix initramfs (`cargo xtask vm-test`): mounts what a pure cgroup v2
//! host has, enables the memory controller, brings up loopback, reports what the agent probes
//! on this kernel, runs the integration test binaries in /tests, prints an unmistakable
//! success or failure marker, and powers the VM off.
//!
//! Lines starting with `EMARS-VM` are read by the xtask on the serial console.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

fn main() {
    let started = Instant::now();
    let ok = match run() {
        Ok(summary) => {
            println!(
                "EMARS-VM-RESULT {{\"passed\":{},\"failed\":{},\"skipped\":{},\"seconds\":{}}}",
                summary.passed,
                summary.failed,
                summary.skipped,
                started.elapsed().as_secs()
            );
            summary.failed == 0 && summary.passed > 0
        }
        Err(e) => {
            println!("EMARS-VM: error: {e}");
            false
        }
    };
    println!("EMARS-VM: {}", if ok { "SUCCESS" } else { "FAILURE" });
    let _ = std::io::stdout().flush();
    // SAFETY: sync and power off; we are PID 1 in a throwaway VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
}

#[derive(Default)]
struct Summary {
    passed: u64,
    failed: u64,
    skipped: u64,
    /// Tests that printed a SKIPPED marker and have not finished yet.
    skipping: std::collections::HashSet<String>,
    /// The test whose "test NAME ... " line came without its result yet.
    running: Option<String>,
}

fn run() -> Result<Summary, String> {
    mount("proc", "/proc", "proc", "")?;
    mount("sysfs", "/sys", "sysfs", "")?;
    mount("devtmpfs", "/dev", "devtmpfs", "")?;
    mount("tmpfs", "/tmp", "tmpfs", "")?;
    mount("tracefs", "/sys/kernel/tracing", "tracefs", "")?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", "")?;
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory")
        .map_err(|e| format!("enabling the memory controller: {e}"))?;
    loopback_up()?;
    let disk = mount_disk();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("EMARS-VM-KERNEL {}", kernel.trim());
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let scale = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("emars.scale="))
        .unwrap_or("10")
        .to_owned();
    let filter = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("emars.filter="))
        .map(str::to_owned);

    let env = [
        ("PATH", "/bin"),
        ("HOME", "/tmp"),
        ("TMPDIR", "/tmp"),
        ("EMARS_BIN", "/bin/emars"),
        ("EMARS_ALLOC_BIN", "/bin/emars-alloc"),
        ("EMARS_SQUAT_BIN", "/bin/emars-squat"),
        ("EMARS_HTTP_SERVER_BIN", "/bin/emars-http-server"),
        ("EMARS_PLATFORM_BIN", "/bin/emars-platform"),
        ("EMARS_TEST_ROOT_REQUIRED", "1"),
        ("EMARS_TEST_TIME_SCALE", scale.as_str()),
        ("EMARS_DISK_DIR", disk),
        ("RUST_BACKTRACE", "1"),
        ("NO_COLOR", "1"),
    ];
    report_probes(&env);

    let mut tests: Vec<_> = fs::read_dir("/tests")
        .map_err(|e| format!("/tests: {e}"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    tests.sort();
    let mut summary = Summary::default();
    for t in tests {
        println!("EMARS-VM: running {}", t.display());
        let mut cmd = Command::new(&t);
        cmd.args(["--test-threads=1", "--nocapture"]);
        if let Some(f) = &filter {
            cmd.arg(f);
        }
        cmd.env_clear()
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", t.display()))?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                count(&line, &mut summary);
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() && summary.failed == 0 {
            summary.failed += 1;
        }
    }
    Ok(summary)
}

/// Tallies libtest's per-test lines and the harness's loud SKIPPED markers: a test that said
/// it skipped and then returned "ok" counts as skipped, not passed. With --nocapture and one
/// thread, what a test prints lands between its "test NAME ... " and its result, which then
/// stands on a line of its own.
fn count(line: &str, s: &mut Summary) {
    if let Some(rest) = line.split("*** SKIPPED ").nth(1) {
        if let Some(name) = rest.split(':').next() {
            s.skipping.insert(name.trim().to_owned());
        }
        return;
    }
    let (name, result) = match line
        .strip_prefix("test ")
        .and_then(|l| l.split_once(" ..."))
    {
        Some((name, result)) => (name.to_owned(), result.trim()),
        None => match (s.running.take(), line.trim()) {
            (Some(name), r @ ("ok" | "FAILED")) => (name, r),
            (running, _) => {
                s.running = running;
                return;
            }
        },
    };
    match result {
        "ok" if s.skipping.remove(&name) => s.skipped += 1,
        "ok" => s.passed += 1,
        "FAILED" => s.failed += 1,
        _ => s.running = Some(name),
    }
}

/// Starts the agent briefly and prints its GET /v1/info as one line for the matrix table.
fn report_probes(env: &[(&str, &str)]) {
    let dir = "/tmp/probe";
    let _ = fs::create_dir_all(dir);
    let cfg = format!(
        "[api]\nlisten = \"127.0.0.1:9750\"\n[store]\npath = \"{dir}/store\"\n[[cgroup.roots]]\npath = \"/emars-probe\"\n"
    );
    if fs::write(format!("{dir}/config.toml"), cfg).is_err() {
        return;
    }
    let child = Command::new("/bin/emars")
        .args(["agent", "--config", &format!("{dir}/config.toml")])
        .env_clear()
        .envs(env.iter().copied())
        .env("EMARS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let Ok(mut child) = child else {
        println!("EMARS-VM-INFO {{\"error\":\"agent did not start\"}}");
        return;
    };
    let mut info = None;
    for _ in 0..600 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(out) = Command::new("/bin/emars")
            .args(["info", "--json", "--addr", "127.0.0.1:9750"])
            .env_clear()
            .envs(env.iter().copied())
            .output()
        {
            if out.status.success() {
                info = Some(String::from_utf8_lossy(&out.stdout).replace('\n', " "));
                break;
            }
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = fs::remove_dir("/sys/fs/cgroup/emars-probe");
    match info {
        Some(i) => println!("EMARS-VM-INFO {i}"),
        None => println!("EMARS-VM-INFO {{\"error\":\"agent did not answer\"}}"),
    }
}

/// The ext4 disk xtask attaches as NVMe (both built into Debian's cloud kernels), mounted at
/// /disk: page cache that the kernel can reclaim, which the initramfs's tmpfs is not. Returns
/// where the tests should put such files (/tmp, in memory, when there is no disk: the tests
/// that need one then say they skipped).
fn mount_disk() -> &'static str {
    let dev = std::path::Path::new("/dev/nvme0n1");
    let t = std::time::Instant::now();
    while !dev.exists() && t.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match mount("/dev/nvme0n1", "/disk", "ext4", "") {
        Ok(()) => {
            println!("EMARS-VM: disk /dev/nvme0n1 mounted at /disk");
            "/disk"
        }
        Err(e) => {
            println!("EMARS-VM: no disk ({e}); tests that need one will skip");
            "/tmp"
        }
    }
}

fn mount(src: &str, target: &str, fstype: &str, data: &str) -> Result<(), String> {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (src_c, target_c, fstype_c, data_c) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 && !Path::new(target).join(".").exists() {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if rc != 0 {
        println!(
            "EMARS-VM: mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `ip link set lo up`: the tests talk to the agent over 127.0.0.1.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a plain socket + SIOC[GS]IFFLAGS ioctl on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("bringing up lo: {err}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_that_said_it_skipped_counts_as_skipped_once() {
        let mut s = Summary::default();
        for line in [
            "running 6 tests",
            "test a ... ok",
            // What a test prints splits its line from its result.
            "test b ... ",
            "",
            "*** SKIPPED b: no memcg tracepoints on this kernel (\"6.1\") ***",
            "",
            "ok",
            "test c ... FAILED",
            "test d ... 42 instances: none lost",
            "ok",
            "test e ... ",
            "thread 'e' panicked at tests/x.rs:1:1:",
            "FAILED",
            "*** SKIPPED f: needs root ***",
            "test f ... ok",
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            count(line, &mut s);
        }
        assert_eq!((s.passed, s.failed, s.skipped), (2, 2, 2));
    }
}
