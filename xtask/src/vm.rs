//! `cargo xtask vm-test`: the integration suite on Debian kernels of several versions with pure
//! cgroup v2, each booted under qemu (TCG) from an initramfs this module writes itself.
//!
//! Kernels come from Debian through an apt sources file of our own (never the machine's), and
//! are cached in `~/.cache/emars/vm` (or `$EMARS_VM_CACHE`) for later runs.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{agent, cmd::Cmd, setup};

/// A kernel of the matrix.
pub struct KernelSpec {
    /// What the user types: `--kernel 6.1`.
    pub name: &'static str,
    /// Debian suite holding it.
    pub suite: &'static str,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
    },
    KernelSpec {
        name: "6.12",
        suite: "bookworm-backports",
    },
    KernelSpec {
        name: "7.x",
        suite: "sid",
    },
];

const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "e2fsprogs",
    "runc",
    "crun",
    "busybox-static",
];
/// Host programs copied into the guest's /bin, with the shared libraries they load: the OCI
/// runtimes the `runtime` tests run, and the static busybox of their containers' rootfs.
const GUEST_HOST_PROGRAMS: &[&str] = &["runc", "crun", "busybox"];
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Integration test binaries run in the guest.
const GUEST_TESTS: &[&str] = &[
    "lifecycle",
    "bad_input",
    "predictive",
    "reactive",
    "binding",
    "cli",
    "security",
    "runtime",
    "report",
    "openapi",
    "bounds",
    "sized",
    "requests",
    "platform_http",
];

pub struct Options {
    pub kernels: Vec<String>,
    /// Per-VM limit.
    pub timeout: Duration,
    /// Multiplier for the suite's own timeouts inside the emulated guest.
    pub time_scale: u32,
    /// Use KVM if a smoke boot under a timeout succeeds (never by default: it hangs here).
    pub try_kvm: bool,
    pub filter: Option<String>,
    /// How many VMs run at once.
    pub jobs: usize,
}

fn say(msg: impl AsRef<str>) {
    println!("emars vm-test: {}", msg.as_ref());
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("EMARS_VM_CACHE") {
        return Ok(d.into());
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".cache/emars/vm"))
}

/// What one VM run found.
struct Outcome {
    kernel: String,
    release: String,
    boot: Option<Duration>,
    total: Duration,
    attached: Vec<String>,
    not_attached: Vec<String>,
    /// Not attached because another program does its job (cgroup_rmdir when raw rmdir is on).
    not_needed: Vec<String>,
    fallbacks: usize,
    passed: u64,
    failed: u64,
    skipped: u64,
    verdict: String,
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    setup::ensure_apt_packages(APT_PACKAGES)?;
    setup::ensure_target(MUSL)?;
    let specs: Vec<&KernelSpec> = if opts.kernels.iter().any(|k| k == "all") {
        KERNELS.iter().collect()
    } else {
        opts.kernels
            .iter()
            .map(|k| {
                KERNELS.iter().find(|s| s.name == k).ok_or_else(|| {
                    anyhow!(
                        "unknown kernel {k:?}; choose from {} or all",
                        KERNELS
                            .iter()
                            .map(|s| s.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let t = Instant::now();
    let mut kernels = Vec::new();
    for s in &specs {
        match fetch_kernel(&cache, s) {
            Ok(k) => kernels.push((s.name, Ok(k))),
            Err(e) => kernels.push((s.name, Err(e))),
        }
    }
    say(format!("kernels ready in {:.0?}", t.elapsed()));
    let t = Instant::now();
    let bins = build_guest_binaries()?;
    let initramfs = cache.join("initramfs.cpio");
    write_initramfs(&bins, &initramfs)?;
    say(format!(
        "guest binaries and initramfs ({} MiB) ready in {:.0?}",
        fs::metadata(&initramfs).map(|m| m.len() >> 20).unwrap_or(0),
        t.elapsed()
    ));
    let accel = if opts.try_kvm && kvm_smoke(&kernels, &initramfs) {
        "kvm"
    } else {
        "tcg"
    };
    let outcomes = boot_all(kernels, &initramfs, accel, opts);
    print_table(&outcomes);
    say(format!("total {:.0?} ({accel})", started.elapsed()));
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|o| o.verdict != "SUCCESS")
        .map(|o| format!("{}: {}", o.kernel, o.verdict))
        .collect();
    let passed: u64 = outcomes.iter().map(|o| o.passed).sum();
    let failed_n: u64 = outcomes.iter().map(|o| o.failed).sum();
    let skipped: u64 = outcomes.iter().map(|o| o.skipped).sum();
    println!("vm-test: {passed} passed, {failed_n} failed, {skipped} skipped");
    if !bad.is_empty() {
        bail!("VM matrix failed:\n  {}", bad.join("\n  "));
    }
    Ok(())
}

fn failed(kernel: &str, why: String) -> Outcome {
    Outcome {
        kernel: kernel.into(),
        release: "-".into(),
        boot: None,
        total: Duration::ZERO,
        attached: Vec::new(),
        not_attached: Vec::new(),
        not_needed: Vec::new(),
        fallbacks: 0,
        passed: 0,
        failed: 0,
        skipped: 0,
        verdict: format!("FAILURE ({why})"),
    }
}

/// apt-get/apt-cache with our own sources, lists and cache: the machine's are never read or
/// changed.
fn apt(tool: &str, dir: &Path) -> Cmd {
    let o = |k: &str, v: &Path| format!("{k}={}", v.display());
    Cmd::new(tool).args([
        "-o".to_string(),
        o("Dir::Etc::SourceList", &dir.join("sources.list")),
        "-o".into(),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "-o".into(),
        o("Dir::State::Lists", &dir.join("lists")),
        "-o".into(),
        o("Dir::Cache", &dir.join("cache")),
        "-o".into(),
        "Dir::State::status=/dev/null".into(),
        "-o".into(),
        "Debug::NoLocking=1".into(),
        "-o".into(),
        "APT::Get::List-Cleanup=0".into(),
    ])
}

/// Downloads (once) and unpacks the newest cloud kernel of a suite; returns its vmlinuz.
fn fetch_kernel(cache: &Path, spec: &KernelSpec) -> Result<PathBuf> {
    let dir = cache.join("kernels").join(spec.name);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        say(format!(
            "kernel {}: cached ({})",
            spec.name,
            fs::read_to_string(dir.join("package"))
                .unwrap_or_default()
                .trim()
        ));
        return Ok(vmlinuz);
    }
    let apt_dir = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt_dir.join(d))?;
    }
    let sources = apt_dir.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let mut text = String::new();
    for s in ["bookworm", "bookworm-backports", "sid"] {
        text.push_str(&format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {s} main\n"
        ));
    }
    fs::write(&sources, text)?;
    let result = (|| -> Result<PathBuf> {
        say(format!("kernel {}: updating our apt lists", spec.name));
        apt("apt-get", &apt_dir)
            .arg("update")
            .read()
            .with_context(|| format!("apt-get update for kernel {}", spec.name))?;
        // linux-image-cloud-amd64 in the suite depends on the versioned image package.
        let show = apt("apt-cache", &apt_dir)
            .args(["show", &format!("linux-image-cloud-amd64/{}", spec.suite)])
            .read()
            .with_context(|| format!("finding the cloud kernel of {}", spec.suite))?;
        let image = depends_on(&show, "linux-image-")
            .ok_or_else(|| anyhow!("no linux-image dependency in:\n{show}"))?;
        let unpack = dir.join("unpack");
        let _ = fs::remove_dir_all(&unpack);
        fs::create_dir_all(&unpack)?;
        let found = download_and_find(&apt_dir, &image, &unpack)?;
        let (pkg, path) = match found {
            Some(p) => (image.clone(), p),
            // sid splits the image into linux-binary-<version>-cloud-amd64.
            None => {
                let show = apt("apt-cache", &apt_dir).args(["show", &image]).read()?;
                let binary = depends_on(&show, "linux-binary-")
                    .ok_or_else(|| anyhow!("{image} holds no vmlinuz and names no linux-binary"))?;
                let p = download_and_find(&apt_dir, &binary, &unpack)?
                    .ok_or_else(|| anyhow!("no vmlinuz in {binary}"))?;
                (binary, p)
            }
        };
        fs::copy(&path, &vmlinuz)
            .with_context(|| format!("copying {} to {}", path.display(), vmlinuz.display()))?;
        fs::write(dir.join("package"), &pkg)?;
        let _ = fs::remove_dir_all(&unpack);
        say(format!("kernel {}: {pkg}", spec.name));
        Ok(vmlinuz)
    })();
    // Our sources file exists only while we fetch.
    let _ = fs::remove_file(&sources);
    result
}

/// The first package of a Depends: line starting with `prefix`.
fn depends_on(show: &str, prefix: &str) -> Option<String> {
    show.lines()
        .filter_map(|l| l.strip_prefix("Depends:"))
        .flat_map(|d| d.split(','))
        .map(|d| d.trim().split([' ', '|']).next().unwrap_or(""))
        .find(|p| p.starts_with(prefix))
        .map(str::to_owned)
}

fn download_and_find(apt_dir: &Path, package: &str, unpack: &Path) -> Result<Option<PathBuf>> {
    let debs = apt_dir.join("debs");
    fs::create_dir_all(&debs)?;
    say(format!("downloading {package}"));
    apt("apt-get", apt_dir)
        .args(["download", package])
        .current_dir(&debs)
        .read()
        .with_context(|| format!("apt-get download {package}"))?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))?;
    Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpack)
        .read()?;
    let _ = fs::remove_file(&deb);
    Ok(find_vmlinuz(unpack))
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if name == "vmlinuz" || name.starts_with("vmlinuz-") {
                return Some(p);
            }
        }
    }
    None
}

/// Static (musl) binaries for the guest: the agent, the workload, the init and the test suites.
struct GuestBinaries {
    emars: PathBuf,
    alloc: PathBuf,
    /// The security tests' port squatter.
    squat: PathBuf,
    /// The sandbox HTTP server of the requests tests and of the platform's HTTP mode.
    http_server: PathBuf,
    /// The reference platform (platform_http).
    platform: PathBuf,
    init: PathBuf,
    tests: Vec<(String, PathBuf)>,
    /// Host files at their place in the guest (absolute path without the leading '/').
    host_files: Vec<(String, PathBuf)>,
}

/// [`GUEST_HOST_PROGRAMS`] (into /bin) and the libraries `ldd` says they load (at the same
/// paths in the guest), from this host's Debian packages.
fn host_programs() -> Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for name in GUEST_HOST_PROGRAMS {
        let path = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| anyhow!("{name} is not installed (cargo xtask setup installs it)"))?;
        files.push((format!("bin/{name}"), path.clone()));
        let ldd = Command::new("ldd").arg(&path).output()?;
        // A static binary: "not a dynamic executable", exit status 1.
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .lines()
            .filter_map(ldd_library)
        {
            let rel = lib.trim_start_matches('/').to_owned();
            if !files.iter().any(|(r, _)| *r == rel) {
                files.push((rel, PathBuf::from(lib)));
            }
        }
    }
    Ok(files)
}

/// The library path of one line of `ldd` output, if it names one.
fn ldd_library(line: &str) -> Option<&str> {
    let line = line.trim();
    let path = match line.split_once("=>") {
        Some((_, rest)) => rest.trim(),
        None => line,
    };
    let path = path.split(" (").next()?.trim();
    path.starts_with('/').then_some(path)
}

fn build_guest_binaries() -> Result<GuestBinaries> {
    say("building static guest binaries (musl, release, stripped)");
    let out = agent::cargo_in_root()?
        .args([
            "build",
            "--release",
            "--target",
            MUSL,
            "-p",
            "emars-agent",
            "-p",
            "emars-tests",
            "--bins",
            "--tests",
            "--message-format=json-render-diagnostics",
        ])
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .read()
        .context("building the guest binaries")?;
    let mut emars = None;
    let mut alloc = None;
    let mut squat = None;
    let mut http_server = None;
    let mut platform = None;
    let mut init = None;
    let mut tests = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or("");
        let is_test = v["profile"]["test"] == true;
        match (name, is_test) {
            ("emars", false) => emars = Some(exe.into()),
            ("emars-alloc", false) => alloc = Some(exe.into()),
            ("emars-squat", false) => squat = Some(exe.into()),
            ("emars-http-server", false) => http_server = Some(exe.into()),
            ("emars-platform", false) => platform = Some(exe.into()),
            ("emars-init", false) => init = Some(exe.into()),
            (t, true) if GUEST_TESTS.contains(&t) => tests.push((t.to_owned(), exe.into())),
            _ => {}
        }
    }
    let need =
        |p: Option<PathBuf>, what: &str| p.ok_or_else(|| anyhow!("the build made no {what}"));
    if tests.len() != GUEST_TESTS.len() {
        bail!("expected test binaries {GUEST_TESTS:?}, found {tests:?}");
    }
    Ok(GuestBinaries {
        emars: need(emars, "emars")?,
        alloc: need(alloc, "emars-alloc")?,
        squat: need(squat, "emars-squat")?,
        http_server: need(http_server, "emars-http-server")?,
        platform: need(platform, "emars-platform")?,
        init: need(init, "emars-init")?,
        tests,
        host_files: host_programs()?,
    })
}

/// Writes a newc cpio: /init, /bin/{emars,emars-alloc,emars-squat,emars-platform,
/// emars-http-server}, /tests/*, mount points, /dev/console,
/// and the host's OCI runtimes, busybox and their libraries.
fn write_initramfs(b: &GuestBinaries, out: &Path) -> Result<()> {
    use cpio::newc::{trailer, Builder};
    let mut w = std::io::BufWriter::new(
        fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let mut ino = 1u32;
    let mut entry = |name: &str, mode: u32| {
        ino += 1;
        Builder::new(name).ino(ino).mode(mode).nlink(1)
    };
    let mut dirs: Vec<String> = ["bin", "dev", "proc", "sys", "tmp", "tests", "disk"]
        .map(String::from)
        .to_vec();
    // Parents of the host files (lib/x86_64-linux-gnu, lib64), each before what it holds.
    for (rel, _) in &b.host_files {
        let mut parent = String::new();
        for part in rel
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
            }
        }
    }
    for d in &dirs {
        entry(d, 0o040755).write(&mut w, 0).finish()?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    entry("dev/console", 0o020600)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut w, 0)
        .finish()?;
    let mut files: Vec<(String, &Path)> = vec![
        ("init".into(), &b.init),
        ("bin/emars".into(), &b.emars),
        ("bin/emars-alloc".into(), &b.alloc),
        ("bin/emars-squat".into(), &b.squat),
        ("bin/emars-http-server".into(), &b.http_server),
        ("bin/emars-platform".into(), &b.platform),
    ];
    for (name, p) in &b.tests {
        files.push((format!("tests/{name}"), p));
    }
    for (rel, p) in &b.host_files {
        files.push((rel.clone(), p));
    }
    for (name, path) in files {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let len = u32::try_from(data.len()).context("binary over 4 GiB")?;
        let mut fw = entry(&name, 0o100755).write(&mut w, len);
        fw.write_all(&data)?;
        fw.finish()?;
    }
    trailer(&mut w)?;
    w.flush()?;
    Ok(())
}

/// A fresh ext4 image for one boot (sparse, 512 MiB): the guest's disk, whose page cache the
/// kernel can reclaim (the initramfs is tmpfs, which only swap could take).
fn fresh_disk(cache: &Path, kernel: &str) -> Result<PathBuf> {
    let img = cache.join(format!("disk-{kernel}.img"));
    let f = fs::File::create(&img).with_context(|| format!("creating {}", img.display()))?;
    f.set_len(512 << 20)?;
    drop(f);
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&img)
        .read()
        .with_context(|| format!("mkfs.ext4 {}", img.display()))?;
    Ok(img)
}

fn qemu(vmlinuz: &Path, initramfs: &Path, accel: &str, append: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", accel]);
    // cx16=off: Debian's qemu 7.2 TCG mis-emulates cmpxchg16b as 6.12's SLUB uses it (a
    // double fault in kmem_cache_alloc within seconds of fork/mkdir churn, with -cpu max and
    // Skylake alike, one vCPU or two); without cx16 the kernel takes its locked path.
    c.args([
        "-cpu",
        if accel == "kvm" {
            "host"
        } else {
            "max,cx16=off"
        },
    ]);
    c.args(["-m", "2048", "-smp", "2", "-nographic", "-no-reboot"]);
    c.args(["-nodefaults", "-serial", "stdio"]);
    if let Ok(disk) = cache_dir().and_then(|c| {
        let kernel = vmlinuz
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fresh_disk(&c, &kernel)
    }) {
        c.arg("-drive").arg(format!(
            "file={},if=none,id=disk,format=raw",
            disk.display()
        ));
        c.args(["-device", "nvme,drive=disk,serial=emars"]);
    }
    c.arg("-kernel").arg(vmlinuz);
    c.arg("-initrd").arg(initramfs);
    c.args(["-append", append]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// KVM is present on these machines but hangs: use it only if a short boot completes.
fn kvm_smoke(kernels: &[(&str, Result<PathBuf>)], initramfs: &Path) -> bool {
    let Some((_, Ok(k))) = kernels.iter().find(|(_, k)| k.is_ok()) else {
        return false;
    };
    say("trying KVM with a 20 s smoke boot");
    let Ok(mut child) = qemu(
        k,
        initramfs,
        "kvm",
        "console=ttyS0 panic=-1 emars.filter=no_test_matches",
    )
    .spawn() else {
        return false;
    };
    let ok = watch_console(&mut child, Duration::from_secs(20), &mut |_| {})
        .map(|c| c.verdict == "SUCCESS" || c.verdict == "FAILURE")
        .unwrap_or(false);
    say(if ok {
        "KVM works: using it"
    } else {
        "KVM did not boot: using TCG"
    });
    ok
}

struct Console {
    verdict: String,
    boot: Option<Duration>,
    release: String,
    info: Option<serde_json::Value>,
    counts: (u64, u64, u64),
}

/// Reads the serial console until a verdict marker, a panic, or the timeout (then kills qemu).
fn watch_console(
    child: &mut std::process::Child,
    timeout: Duration,
    echo: &mut dyn FnMut(&str),
) -> Result<Console> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no qemu stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut c = Console {
        verdict: format!("FAILURE (timeout after {timeout:.0?})"),
        boot: None,
        release: "-".into(),
        info: None,
        counts: (0, 0, 0),
    };
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if !c.verdict.starts_with("SUCCESS") && c.verdict.contains("timeout") {
                    c.verdict = "FAILURE (VM exited without a verdict)".into();
                }
                break;
            }
        };
        echo(&line);
        // Markers may follow terminal escape codes on the same line.
        let after = |m: &str| line.find(m).map(|i| &line[i + m.len()..]);
        if let Some(r) = after("EMARS-VM-KERNEL ") {
            c.boot = Some(start.elapsed());
            c.release = r.trim().to_owned();
        } else if let Some(j) = after("EMARS-VM-INFO ") {
            c.info = serde_json::from_str(j).ok();
        } else if let Some(j) = after("EMARS-VM-RESULT ") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(j) {
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                c.counts = (n("passed"), n("failed"), n("skipped"));
            }
        } else if line.ends_with("EMARS-VM: SUCCESS") {
            c.verdict = "SUCCESS".into();
            break;
        } else if line.ends_with("EMARS-VM: FAILURE") {
            c.verdict = "FAILURE (tests failed)".into();
            break;
        } else if line.contains("Kernel panic") {
            c.verdict = format!("FAILURE (kernel panic: {line})");
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(c)
}

fn boot(
    name: &str,
    vmlinuz: &Path,
    initramfs: &Path,
    accel: &str,
    opts: &Options,
) -> Result<Outcome> {
    let cache = cache_dir()?;
    let log_path = cache.join(format!("console-{name}.log"));
    let mut log = fs::File::create(&log_path)?;
    say(format!(
        "kernel {name}: booting under {accel} (console in {})",
        log_path.display()
    ));
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet psi=1 emars.scale={}",
        opts.time_scale
    );
    if let Some(f) = &opts.filter {
        append.push_str(&format!(" emars.filter={f}"));
    }
    let start = Instant::now();
    let mut child = qemu(vmlinuz, initramfs, accel, &append)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let prefix = format!("[{name}] ");
    let c = watch_console(&mut child, opts.timeout, &mut |line| {
        let _ = writeln!(log, "{line}");
        println!("{prefix}{line}");
    })?;
    let mut attached = Vec::new();
    let mut not_attached = Vec::new();
    let mut not_needed = Vec::new();
    let mut fallbacks = 0;
    if let Some(info) = &c.info {
        for p in info["programs"].as_array().into_iter().flatten() {
            let n = p["name"].as_str().unwrap_or("?").to_owned();
            if p["attached"] == true {
                attached.push(n);
            } else if p["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("not needed"))
            {
                not_needed.push(n);
            } else {
                not_attached.push(n);
            }
        }
        fallbacks = info["fallbacks"].as_array().map_or(0, Vec::len);
    }
    Ok(Outcome {
        kernel: name.into(),
        release: c.release,
        boot: c.boot,
        total: start.elapsed(),
        attached,
        not_attached,
        not_needed,
        fallbacks,
        passed: c.counts.0,
        failed: c.counts.1,
        skipped: c.counts.2,
        verdict: c.verdict,
    })
}

/// Boots the kernels, `opts.jobs` at a time, and returns their outcomes in matrix order.
///
/// Each boot has its own disk image and console log; the initramfs is shared read-only. The
/// suite's timeouts are scaled for the emulator (`emars.scale`), not for guests sharing cores.
fn boot_all(
    kernels: Vec<(&str, Result<PathBuf>)>,
    initramfs: &Path,
    accel: &str,
    opts: &Options,
) -> Vec<Outcome> {
    let queue = std::sync::Mutex::new(kernels.into_iter().enumerate().collect::<Vec<_>>());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| loop {
                // Take from the front so that the matrix starts in its own order.
                let next = {
                    let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                    (!q.is_empty()).then(|| q.remove(0))
                };
                let Some((i, (name, k))) = next else { break };
                let outcome = match k {
                    Ok(vmlinuz) => boot_with_retry(name, &vmlinuz, initramfs, accel, opts),
                    Err(e) => failed(name, format!("kernel not fetched: {e:#}")),
                };
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, outcome));
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, o)| o).collect()
}

fn boot_with_retry(
    name: &str,
    vmlinuz: &Path,
    initramfs: &Path,
    accel: &str,
    opts: &Options,
) -> Outcome {
    let run = || {
        boot(name, vmlinuz, initramfs, accel, opts)
            .unwrap_or_else(|e| failed(name, format!("{e:#}")))
    };
    let first = run();
    // A panic before the guest's init has run (seen under TCG: an int3 oops at a static-key
    // site in the idle path, 1 s into boot) is the emulator's, not anything of EMARS: one more
    // boot, said aloud. A panic once the suite runs still fails the matrix.
    if first.boot.is_none() && first.verdict.contains("kernel panic") {
        say(format!(
            "kernel {name}: panicked while booting, before any EMARS code ran ({}); booting \
             it once more",
            first.verdict
        ));
        run()
    } else {
        first
    }
}

fn print_table(outcomes: &[Outcome]) {
    println!();
    println!(
        "{:<6} {:<26} {:>7} {:>8} {:>9} {:>9} {:>6} {:>6} {:>7}  VERDICT",
        "KERNEL", "RELEASE", "BOOT", "TOTAL", "ATTACHED", "FALLBACK", "PASS", "FAIL", "SKIP"
    );
    for o in outcomes {
        println!(
            "{:<6} {:<26} {:>7} {:>8} {:>9} {:>9} {:>6} {:>6} {:>7}  {}",
            o.kernel,
            o.release,
            o.boot
                .map_or("-".into(), |b| format!("{:.1}s", b.as_secs_f64())),
            format!("{:.0}s", o.total.as_secs_f64()),
            format!(
                "{}/{}",
                o.attached.len(),
                o.attached.len() + o.not_attached.len()
            ),
            o.fallbacks,
            o.passed,
            o.failed,
            o.skipped,
            o.verdict
        );
        if !o.not_attached.is_empty() {
            println!("       not attached: {}", o.not_attached.join(", "));
        }
        if !o.not_needed.is_empty() {
            println!("       not needed:   {}", o.not_needed.join(", "));
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_lines() {
        assert_eq!(
            ldd_library("\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)"),
            Some("/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(
            ldd_library("\t/lib64/ld-linux-x86-64.so.2 (0x00007f)"),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(ldd_library("\tlinux-vdso.so.1 (0x00007ffd)"), None);
        assert_eq!(ldd_library("\tnot a dynamic executable"), None);
    }

    #[test]
    fn finds_dependencies() {
        let show = "Package: linux-image-cloud-amd64\nDepends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.0-50)\n";
        assert_eq!(
            depends_on(show, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-50-cloud-amd64")
        );
        let show = "Depends: kmod, linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1) | foo, bar\n";
        assert_eq!(
            depends_on(show, "linux-binary-").as_deref(),
            Some("linux-binary-7.2.13+deb14-cloud-amd64")
        );
        assert_eq!(depends_on("Depends: a, b\n", "linux-"), None);
    }
}
