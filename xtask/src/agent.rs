//! Building the `emars` binary (emars-agent; its build.rs builds the eBPF
//! programs with nightly + bpf-linker) and finding it afterwards.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use crate::cmd::Cmd;

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask has no parent directory"))
}

/// The `cargo` that runs us (so nested builds use the same toolchain).
pub fn cargo() -> Cmd {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::named(cargo, "cargo")
}

/// `cargo` in the workspace root.
pub fn cargo_in_root() -> Result<Cmd> {
    Ok(cargo().current_dir(workspace_root()?))
}

/// What we need from `cargo metadata`.
pub struct Metadata {
    /// The target directory cargo uses for this workspace (honours
    /// CARGO_TARGET_DIR and `build.target-dir`).
    pub target_dir: PathBuf,
    /// Names of the workspace's member packages.
    pub members: Vec<String>,
}

pub fn metadata() -> Result<Metadata> {
    let out = cargo_in_root()?
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .read()
        .context("cargo metadata failed")?;
    let json: serde_json::Value =
        serde_json::from_str(&out).context("cargo metadata printed invalid JSON")?;
    let target_dir = json
        .get("target_directory")
        .and_then(|t| t.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("cargo metadata printed no target_directory"))?;
    // With --no-deps, `packages` holds exactly the workspace members.
    let members = json
        .get("packages")
        .and_then(|p| p.as_array())
        .map(|packages| {
            packages
                .iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(Metadata {
        target_dir,
        members,
    })
}

/// Workspace members that only build for the BPF target (with nightly) and
/// must be left out of host-side `--workspace` clippy and test runs.
pub const BPF_ONLY_PACKAGES: &[&str] = &["emars-ebpf"];

/// `--exclude P` for each BPF-only package that is a workspace member.
pub fn exclude_bpf_only(members: &[String]) -> Vec<String> {
    BPF_ONLY_PACKAGES
        .iter()
        .filter(|p| members.iter().any(|m| m == *p))
        .flat_map(|p| ["--exclude".to_string(), p.to_string()])
        .collect()
}

pub fn profile_dir(release: bool) -> &'static str {
    if release {
        "release"
    } else {
        "debug"
    }
}

/// Builds emars-agent and returns the absolute path of the `emars` binary.
pub fn build(release: bool, prefix: &str) -> Result<PathBuf> {
    let mut cmd = cargo_in_root()?.args(["build", "-p", "emars-agent"]);
    if release {
        cmd = cmd.arg("--release");
    }
    cmd.log(prefix)
        .run()
        .context("building emars-agent failed")?;
    let bin = metadata()?
        .target_dir
        .join(profile_dir(release))
        .join("emars");
    if !bin.is_file() {
        return Err(anyhow!(
            "the build succeeded but {} does not exist",
            bin.display()
        ));
    }
    println!("{prefix}: binary: {}", bin.display());
    Ok(bin)
}
