//! `emars agent --demo`: runs the paper's two sample functions, `hello_world` and `mem_alloc`
//! (a Python function that builds a list of one million integers), as short-lived instances in
//! cgroups under the first watched root, so a newcomer sees real profiles within a minute.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    config::Config,
    kernel::cgroupfs::{CgroupVersion, MemoryHierarchy},
};

const FUNCTIONS: &[(&str, &str)] = &[
    ("hello_world", "print('hello world')"),
    (
        "mem_alloc",
        "a = list(range(1000000))\nprint('mem_alloc built', len(a), 'integers')",
    ),
];

/// Starts the demo on a background thread.
pub fn spawn(cfg: &Config) -> anyhow::Result<()> {
    let h = MemoryHierarchy::detect(cfg.cgroup.mode, cfg.cgroup.mount.as_deref())?;
    let root = cfg
        .cgroup
        .roots
        .first()
        .context("the demo needs a watched root in cgroup.roots")?;
    let root = h.dir(&root.path);
    let python = which("python3").context("the demo runs Python functions: python3 not found")?;
    // Wrappers such as pyenv's shims exec many programs per run; count the interpreter's only.
    let python = Command::new(&python)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.is_file())
        .unwrap_or(python);
    std::thread::Builder::new()
        .name("emars-demo".into())
        .spawn(move || demo_loop(&h, &root, &python))
        .context("starting the demo thread")?;
    Ok(())
}

fn demo_loop(h: &MemoryHierarchy, root: &Path, python: &Path) {
    // The agent creates the root; wait for it (and for its probes) before the first instance.
    while !root.is_dir() {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    for round in 0u64.. {
        for (name, code) in FUNCTIONS {
            if let Err(e) = run_instance(h, root, python, name, code, round) {
                tracing::warn!("demo {name}: {e:#}");
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn run_instance(
    h: &MemoryHierarchy,
    root: &Path,
    python: &Path,
    name: &str,
    code: &str,
    round: u64,
) -> anyhow::Result<()> {
    let function_dir = root.join(name);
    if !function_dir.is_dir() {
        std::fs::create_dir(&function_dir)
            .with_context(|| format!("creating {}", function_dir.display()))?;
        if h.version == CgroupVersion::V2 {
            // The demo owns this cgroup: let its instance children have the memory controller.
            std::fs::write(function_dir.join("cgroup.subtree_control"), "+memory")
                .with_context(|| format!("enabling memory in {}", function_dir.display()))?;
        }
    }
    let dir = function_dir.join(format!("demo-{}-{round}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let procs = dir.join("cgroup.procs");
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(code);
    let procs_c = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())?;
    // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || join_cgroup(&procs_c));
    }
    let out = cmd.output().context("running the function")?;
    if !out.status.success() {
        tracing::warn!("demo {name} exited with {}", out.status);
    }
    // The platform removes the instance at once, as serverless platforms do.
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// Moves the calling process into the cgroup whose cgroup.procs is `procs`.
pub fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: plain syscalls on a valid NUL-terminated path and a stack buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let buf = b"0\n";
        let n = libc::write(fd, buf.as_ptr().cast(), buf.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
