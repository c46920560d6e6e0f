//! `emars agent --demo`: runs the paper's two sample functions, `hello_world` and `mem_alloc`
//! (a Python function that builds a list of one million integers), as short-lived instances in
//! cgroups under the first watched root, so a newcomer sees real profiles within a minute.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
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

/// The demo's cgroups: dropped when the agent stops, it ends the demo and removes the
/// function cgroups it made (a demo must leave the host as it found it).
pub struct Demo {
    stop: Arc<AtomicBool>,
    function_dirs: Vec<PathBuf>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for dir in &self.function_dirs {
            // Instances first (one may be ending now: a few tries), then the function's own.
            for _ in 0..20 {
                let left: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect();
                for d in &left {
                    let _ = std::fs::remove_dir(d);
                }
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if dir.exists() {
                tracing::warn!("demo: could not remove {}", dir.display());
            }
        }
    }
}

/// Starts the demo on a background thread; the demo runs until the returned guard is dropped.
pub fn spawn(cfg: &Config) -> anyhow::Result<Demo> {
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
    // Only the function cgroups the demo makes are removed; ones there before are left alone.
    let function_dirs = FUNCTIONS
        .iter()
        .map(|(name, _)| root.join(name))
        .filter(|d| !d.exists())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("emars-demo".into())
        .spawn(move || demo_loop(&h, &root, &python, &stopped))
        .context("starting the demo thread")?;
    Ok(Demo {
        stop,
        function_dirs,
    })
}

fn demo_loop(h: &MemoryHierarchy, root: &Path, python: &Path, stop: &AtomicBool) {
    // The agent creates the root; wait for it (and for its probes) before the first instance.
    while !root.is_dir() {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    for round in 0u64.. {
        for (name, code) in FUNCTIONS {
            if stop.load(Ordering::Relaxed) {
                return;
            }
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
