//! Real OCI containers for the tests: runc or crun (installed by `cargo xtask setup`) running a
//! busybox rootfs, with Docker's cgroupfs layout (`<parent>/<64-hex id>`) and Kubernetes-style
//! annotations. Everything lives under a test root and temporary directories, and goes with
//! the [`Oci`] value.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::{find_program, wait_for, TestRoot};

/// The static busybox of Debian's busybox-static package: the containers' only program.
const BUSYBOX: &str = "/bin/busybox";

/// An OCI runtime (runc or crun) with a state root and bundles of its own, creating containers
/// below a test root.
pub struct Oci {
    bin: PathBuf,
    /// crun: its cgroup manager is named (cgroupfs, as runc's default).
    crun: bool,
    /// The machine's root is the initramfs (the VMs), which cannot be pivoted away from.
    no_pivot: bool,
    /// `--root`: where the runtime keeps each container's state.
    state: tempfile::TempDir,
    bundles: tempfile::TempDir,
    /// The test root's path in the hierarchy: the containers' cgroup parent.
    parent: String,
    created: Vec<String>,
}

/// True when `/` is the initramfs (rootfs), as in the VMs.
fn root_is_initramfs() -> bool {
    fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .rev()
                .find(|l| l.split(' ').nth(1) == Some("/"))
                .map(|l| l.split(' ').nth(2) == Some("rootfs"))
        })
        .unwrap_or(false)
}

impl Oci {
    /// `runtime`: "runc" or "crun". None when it or the static busybox is missing.
    pub fn new(root: &TestRoot, runtime: &str) -> Result<Option<Oci>> {
        let Some(bin) = find_program(runtime) else {
            return Ok(None);
        };
        if !Path::new(BUSYBOX).is_file() {
            return Ok(None);
        }
        let bundles = tempfile::tempdir()?;
        let rootfs = bundles.path().join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        fs::copy(BUSYBOX, rootfs.join("bin/busybox"))?;
        for tool in ["sh", "dd", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool))?;
        }
        Ok(Some(Oci {
            bin,
            crun: runtime == "crun",
            no_pivot: root_is_initramfs(),
            state: tempfile::tempdir()?,
            bundles,
            parent: root.rel.clone(),
            created: Vec::new(),
        }))
    }

    /// Where the runtime keeps its state (runc: `<id>/state.json`).
    pub fn state_root(&self) -> &Path {
        self.state.path()
    }

    /// Where container `id`'s bundle (and its `config.json`) is: containerd's layout, a
    /// directory per container id.
    pub fn bundles(&self) -> &Path {
        self.bundles.path()
    }

    /// The container's cgroup path in the hierarchy, as the kernel reports it.
    pub fn cgroup(&self, id: &str) -> String {
        format!("{}/{id}", self.parent)
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(self.state.path());
        if self.crun {
            c.arg("--cgroup-manager=cgroupfs");
        }
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cli()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {args:?}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} {args:?}: {}\n{}",
                self.bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates container `id` (the runtime makes its cgroup, then writes its state) running
    /// `/bin/sh -c script`, with these annotations; it starts at [`Runc::start`].
    pub fn create(&mut self, id: &str, annotations: &[(&str, &str)], script: &str) -> Result<()> {
        self.create_limited(id, annotations, script, None)
    }

    /// [`Oci::create`] with the bundle's `linux.resources.memory.limit` (what `docker run
    /// --memory` sets), which the runtime writes into the container's cgroup.
    pub fn create_limited(
        &mut self,
        id: &str,
        annotations: &[(&str, &str)],
        script: &str,
        memory_limit: Option<u64>,
    ) -> Result<()> {
        let bundle = self.bundles.path().join(id);
        fs::create_dir(&bundle)?;
        let spec = Command::new(&self.bin)
            .arg("spec")
            .current_dir(&bundle)
            .status()?;
        if !spec.success() {
            bail!("{} spec: {spec}", self.bin.display());
        }
        let path = bundle.join("config.json");
        let mut config: Value = serde_json::from_slice(&fs::read(&path)?)?;
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(["/bin/sh", "-c", script]);
        config["root"] = json!({"path": self.bundles.path().join("rootfs"), "readonly": true});
        config["linux"]["cgroupsPath"] = json!(self.cgroup(id));
        if let Some(limit) = memory_limit {
            config["linux"]["resources"]["memory"] = json!({ "limit": limit });
        }
        config["annotations"] = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let mut create = self.cli();
        create.args(["create", "--bundle"]).arg(&bundle);
        if self.no_pivot {
            create.arg("--no-pivot");
        }
        let status = create
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()?;
        if !status.success() {
            bail!("{} create {id}: {status}", self.bin.display());
        }
        self.created.push(id.to_owned());
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<()> {
        self.run(&["start", id]).map(drop)
    }

    /// `created`, `running` or `stopped`.
    pub fn status(&self, id: &str) -> Result<String> {
        let state: Value = serde_json::from_str(&self.run(&["state", id])?)?;
        state["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("state of {id}: no status in {state}"))
    }

    pub fn wait_stopped(&self, id: &str, timeout: Duration) -> Result<()> {
        wait_for(timeout, || {
            (self.status(id).ok()? == "stopped").then_some(())
        })
        .ok_or_else(|| anyhow!("container {id} did not stop in {timeout:?}"))
    }

    pub fn kill(&self, id: &str) -> Result<()> {
        self.run(&["kill", id, "KILL"]).map(drop)
    }

    /// Removes the container and its cgroups (the agent sees the rmdir).
    pub fn delete(&mut self, id: &str) -> Result<()> {
        self.run(&["delete", "--force", id])?;
        self.created.retain(|c| c != id);
        Ok(())
    }
}

impl Drop for Oci {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.created) {
            let _ = self.run(&["delete", "--force", &id]);
        }
        // On a v1 or hybrid host the runtime made the parent in every controller's hierarchy; the
        // test root removes the memory one, this the others (only ours: the unique name).
        let Ok(mounts) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for m in mounts.flatten() {
            let dir = m.path().join(self.parent.trim_start_matches('/'));
            if dir.is_dir() {
                crate::remove_tree(&dir);
            }
        }
    }
}
