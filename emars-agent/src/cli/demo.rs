//! `emars agent --demo`: runs the paper's two sample functions, `hello_world` and `mem_alloc`
//! (a Python function that builds a list of one million integers), as short-lived instances in
//! cgroups under the first watched root, so a newcomer sees real profiles within a minute.

use std::{
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
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(code);
    crate::kernel::cgroupfs::join_before_exec(&mut cmd, &dir)?;
    let out = cmd.output().context("running the function")?;
    if !out.status.success() {
        tracing::warn!("demo {name} exited with {}", out.status);
    }
    // The platform removes the instance at once, as serverless platforms do.
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
