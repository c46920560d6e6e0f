//! `cargo xtask setup`: everything the build and the tests need, installed
//! only when missing. Every step is idempotent and says what it does.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{is_root, which, Cmd};

/// Debian packages the project needs at build or test time (g++: libFuzzer, for the fuzz targets;
/// runc, crun and busybox-static: real OCI containers in the tests, on the host and in the VMs;
/// systemd: `systemd-analyze verify` of the unit in deploy/; prometheus: a real server scrapes
/// the agent in the metrics test; chromium: the web page's test renders it headless;
/// python3-venv: the virtual environment schemathesis is installed into).
pub const APT_PACKAGES: &[&str] = &[
    "python3",
    "python3-venv",
    "g++",
    "runc",
    "crun",
    "busybox-static",
    "systemd",
    "prometheus",
    // The fleet tests' network namespaces and veth pairs (`ip`), entered with nsenter.
    "iproute2",
    "util-linux",
    "chromium",
];

/// Components of the default (stable) toolchain used by `cargo xtask test`.
const STABLE_COMPONENTS: &[&str] = &["rustfmt", "clippy"];

const NIGHTLY: &str = "nightly";

/// What a command needs installed: building and running the agent needs the toolchains and
/// bpf-linker; the test suite needs the test tools too (fuzzing, containers, browsers...).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `build`, `run`, `bench`: the toolchains and bpf-linker; python3 for `run -- --demo`.
    Build,
    /// `setup`, `test`, `vm-test`, `fuzz`: everything.
    #[default]
    Test,
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    pub scope: Scope,
    /// Rebuild bpf-linker even when the installed one works.
    pub reinstall_bpf_linker: bool,
    /// Install bpf-linker with `cargo install --root DIR` (for testing the
    /// from-scratch path without touching the real installation).
    pub bpf_linker_root: Option<PathBuf>,
}

fn say(msg: impl AsRef<str>) {
    println!("emars setup: {}", msg.as_ref());
}

pub fn run(opts: &Options) -> Result<()> {
    ensure_cargo_bin_on_path()?;
    check_rustup()?;
    if opts.scope == Scope::Test {
        ensure_components(None, STABLE_COMPONENTS)?;
    }
    ensure_nightly()?;
    let nightly = Nightly::detect()?;
    say(format!(
        "nightly toolchain ok ({}, {}, LLVM {})",
        nightly.release, nightly.commit_date, nightly.llvm_version
    ));
    ensure_components(Some(NIGHTLY), &["rust-src"])?;
    ensure_bpf_linker(&nightly, opts)?;
    if opts.scope == Scope::Build {
        // The demo's sample functions are Python.
        ensure_apt_packages(&["python3"])?;
        say("done (what building and running need; `cargo xtask setup` adds the test tools)");
        return Ok(());
    }
    ensure_cargo_fuzz()?;
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_schemathesis()?;
    say("done");
    Ok(())
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set"))
}

pub fn cargo_home() -> Result<PathBuf> {
    match std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// Tools installed by `cargo install` (bpf-linker) must be on PATH for the
/// eBPF build; add `$CARGO_HOME/bin` for this process and its children.
pub fn ensure_cargo_bin_on_path() -> Result<()> {
    let bin = cargo_home()?.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if dirs.iter().any(|d| d == &bin) {
        return Ok(());
    }
    dirs.insert(0, bin);
    let joined = std::env::join_paths(dirs).context("cannot build a PATH with $CARGO_HOME/bin")?;
    // Edition 2021: set_var is safe; we are still single-threaded here.
    std::env::set_var("PATH", joined);
    Ok(())
}

fn check_rustup() -> Result<()> {
    if which("rustup").is_none() {
        bail!(
            "rustup not found on PATH. Install Rust with rustup \
             (https://rustup.rs) and make sure $HOME/.cargo/bin is on PATH"
        );
    }
    Ok(())
}

/// Makes sure `components` are installed for `toolchain` (None: the active
/// toolchain, i.e. the one `cargo` in this repository uses).
fn ensure_components(toolchain: Option<&str>, components: &[&str]) -> Result<()> {
    let mut list = Cmd::new("rustup").args(["component", "list", "--installed"]);
    if let Some(tc) = toolchain {
        list = list.args(["--toolchain", tc]);
    }
    let installed = list.read()?;
    let which_tc = toolchain.unwrap_or("the default toolchain");
    for comp in components {
        // `rust-src` is listed bare; most others carry a target triple
        // (`clippy-x86_64-unknown-linux-gnu`).
        let present = installed
            .lines()
            .map(str::trim)
            .any(|line| line == *comp || line.starts_with(&format!("{comp}-")));
        if present {
            say(format!("{comp} ok ({which_tc})"));
            continue;
        }
        say(format!("installing {comp} for {which_tc}..."));
        let mut add = Cmd::new("rustup").args(["component", "add", comp]);
        if let Some(tc) = toolchain {
            add = add.args(["--toolchain", tc]);
        }
        add.log("emars setup")
            .run()
            .with_context(|| format!("could not install the {comp} component for {which_tc}"))?;
    }
    Ok(())
}

/// `rustup target add TARGET` for the default toolchain, when missing.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["target", "list", "--installed"])
        .read()?;
    if installed.lines().any(|l| l.trim() == target) {
        say(format!("target {target} ok"));
        return Ok(());
    }
    say(format!("installing the {target} target..."));
    Cmd::new("rustup")
        .args(["target", "add", target])
        .log("emars setup")
        .run()
        .with_context(|| format!("could not install the {target} target"))
}

fn ensure_nightly() -> Result<()> {
    let list = Cmd::new("rustup").args(["toolchain", "list"]).read()?;
    let present = list
        .lines()
        .any(|l| l.trim_start().starts_with("nightly-") || l.trim() == NIGHTLY);
    if present {
        return Ok(());
    }
    say("nightly toolchain missing; installing it (rustup toolchain install nightly --profile minimal)...");
    Cmd::new("rustup")
        .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
        .log("emars setup")
        .run()
        .context(
            "could not install the nightly toolchain (the eBPF programs are built with nightly \
             and -Z build-std); install it by hand with \
             `rustup toolchain install nightly --profile minimal --component rust-src`",
        )
}

/// What we need to know about the nightly toolchain.
#[derive(Debug, Clone)]
pub struct Nightly {
    pub release: String,
    pub commit_date: String,
    pub llvm_version: String,
    pub llvm_major: u32,
    pub sysroot: PathBuf,
}

impl Nightly {
    pub fn detect() -> Result<Self> {
        let vv = Cmd::new("rustc").arg("+nightly").arg("-vV").read()?;
        let mut n = Self::parse_vv(&vv)?;
        let sysroot = Cmd::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .read()?;
        n.sysroot = PathBuf::from(sysroot.trim());
        Ok(n)
    }

    fn parse_vv(vv: &str) -> Result<Self> {
        let field = |name: &str| -> Option<String> {
            vv.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let release = field("release:")
            .ok_or_else(|| anyhow!("`rustc +nightly -vV` printed no release line:\n{vv}"))?;
        let commit_date = field("commit-date:").unwrap_or_else(|| "unknown".to_string());
        let llvm_version = field("LLVM version:")
            .ok_or_else(|| anyhow!("`rustc +nightly -vV` printed no LLVM version:\n{vv}"))?;
        let llvm_major = llvm_version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .ok_or_else(|| anyhow!("cannot parse the LLVM major version of {llvm_version:?}"))?;
        Ok(Self {
            release,
            commit_date,
            llvm_version,
            llvm_major,
            sysroot: PathBuf::new(),
        })
    }

    /// The cargo feature of bpf-linker matching this LLVM.
    pub fn llvm_feature(&self) -> String {
        format!("llvm-{}", self.llvm_major)
    }

    /// A name for this exact nightly, usable in a path.
    fn tag(&self) -> String {
        format!("{}-{}", self.release, self.commit_date)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

fn ensure_bpf_linker(nightly: &Nightly, opts: &Options) -> Result<()> {
    let feature = nightly.llvm_feature();
    let forced = opts.reinstall_bpf_linker || opts.bpf_linker_root.is_some();
    let existing = find_bpf_linker()?;
    if !forced {
        match check_bpf_linker(existing.as_deref(), &feature) {
            Ok(version) => {
                say(format!("bpf-linker ok (v{version}, {feature})"));
                return Ok(());
            }
            Err(reason) => say(format!("bpf-linker must be (re)installed: {reason:#}")),
        }
    }

    let prefix = llvm_prefix(nightly)?;
    say(format!(
        "installing bpf-linker ({feature}) against the nightly's libLLVM in {} \
         (a few minutes)...",
        prefix.display()
    ));
    let mut install = Cmd::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix);
    match &opts.bpf_linker_root {
        Some(root) => install = install.arg("--root").arg(root),
        // `cargo install` refuses to replace an installed version unless forced.
        None if existing.is_some() || forced => install = install.arg("--force"),
        None => {}
    }
    install
        .log("emars setup")
        .run()
        .context("could not build bpf-linker")?;

    let installed = match &opts.bpf_linker_root {
        Some(root) => root.join("bin").join("bpf-linker"),
        None => cargo_home()?.join("bin").join("bpf-linker"),
    };
    let version =
        bpf_linker_version(&installed).context("the freshly installed bpf-linker does not run")?;
    say(format!(
        "bpf-linker ok (v{version}, {feature}) at {}",
        installed.display()
    ));
    if opts.bpf_linker_root.is_none() {
        match which("bpf-linker") {
            Some(found) if found != installed => say(format!(
                "warning: {} comes first on PATH and shadows the new bpf-linker",
                found.display()
            )),
            _ => {}
        }
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` and the fuzz step of `cargo xtask test`.
fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(version) = Cmd::new("cargo").args(["fuzz", "--version"]).probe() {
        say(format!("{} ok", version.trim()));
        return Ok(());
    }
    say("installing cargo-fuzz (cargo install cargo-fuzz --locked)...");
    Cmd::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .log("emars setup")
        .run()
        .context("could not install cargo-fuzz")
}

/// The pinned packages of schemathesis (the API contract test's third-party tester).
const SCHEMATHESIS_REQUIREMENTS: &str = include_str!("../schemathesis-requirements.txt");
/// Where it is installed, below the target directory (the contract test looks there).
pub const SCHEMATHESIS_VENV: &str = "tools/schemathesis";
/// The oldest Python schemathesis 4 runs on.
const PYTHON_MIN: (u32, u32) = (3, 11);

/// schemathesis, for tests/tests/contract.rs: the pinned packages installed with pip into a
/// virtual environment of the project's own under the target directory. Nothing is fetched
/// when that environment holds exactly these packages already (a stamp of the requirements
/// it was made from), so that later runs work offline.
fn ensure_schemathesis() -> Result<()> {
    let venv = crate::agent::metadata()?.target_dir.join(SCHEMATHESIS_VENV);
    let bin = venv.join("bin").join("schemathesis");
    let stamp = venv.join("emars-requirements.txt");
    let current = fs::read_to_string(&stamp).ok();
    if current.as_deref() == Some(SCHEMATHESIS_REQUIREMENTS) {
        if let Some(version) = Cmd::new(&bin).arg("--version").probe() {
            say(format!("{} ok ({})", version.trim(), venv.display()));
            return Ok(());
        }
    }
    let python = which("python3").ok_or_else(|| anyhow!("python3 not found on PATH"))?;
    let version = Cmd::new(&python)
        .args([
            "-c",
            "import sys; print(sys.version_info[0], sys.version_info[1])",
        ])
        .read()?;
    let found = parse_python_version(&version).ok_or_else(|| {
        anyhow!(
            "cannot read the version of {}: {version:?}",
            python.display()
        )
    })?;
    if found < PYTHON_MIN {
        bail!(
            "{} is Python {}.{}; schemathesis needs {}.{} or newer",
            python.display(),
            found.0,
            found.1,
            PYTHON_MIN.0,
            PYTHON_MIN.1
        );
    }
    say(format!(
        "installing schemathesis and its pinned packages into {}...",
        venv.display()
    ));
    // A fresh environment: nothing of an earlier set of packages stays behind.
    Cmd::new(&python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .log("emars setup")
        .run()
        .context(
            "could not create the virtual environment (Debian: apt-get install python3-venv)",
        )?;
    let requirements = venv.join("requirements.txt");
    fs::write(&requirements, SCHEMATHESIS_REQUIREMENTS)
        .with_context(|| format!("cannot write {}", requirements.display()))?;
    Cmd::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--no-deps",
            "-r",
        ])
        .arg(&requirements)
        .log("emars setup")
        .run()
        .context("could not install schemathesis from PyPI")?;
    let version = Cmd::new(&bin)
        .arg("--version")
        .read()
        .context("the freshly installed schemathesis does not run")?;
    fs::write(&stamp, SCHEMATHESIS_REQUIREMENTS)
        .with_context(|| format!("cannot write {}", stamp.display()))?;
    say(format!("{} ok ({})", version.trim(), venv.display()));
    Ok(())
}

/// "3 11" → (3, 11).
fn parse_python_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split_whitespace().map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn find_bpf_linker() -> Result<Option<PathBuf>> {
    if let Some(p) = which("bpf-linker") {
        return Ok(Some(p));
    }
    let p = cargo_home()?.join("bin").join("bpf-linker");
    Ok(p.is_file().then_some(p))
}

fn bpf_linker_version(path: &Path) -> Result<String> {
    let out = Cmd::new(path).arg("--version").read()?;
    // "bpf-linker 0.13.0"
    Ok(out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| out.trim())
        .to_string())
}

/// Ok(version) when bpf-linker is installed, runs, and (if cargo recorded
/// how it was built) was built for `feature`.
fn check_bpf_linker(path: Option<&Path>, feature: &str) -> Result<String> {
    let path = path.ok_or_else(|| anyhow!("not installed"))?;
    let version = bpf_linker_version(path).context("`bpf-linker --version` does not run")?;
    if let Some(features) = recorded_bpf_linker_features()? {
        if !features.iter().any(|f| f == feature) {
            bail!(
                "it was built with features {features:?}, but the nightly toolchain needs {feature}"
            );
        }
    }
    Ok(version)
}

/// The features `cargo install` recorded for bpf-linker in
/// `$CARGO_HOME/.crates2.json`, if any.
fn recorded_bpf_linker_features() -> Result<Option<Vec<String>>> {
    let path = cargo_home()?.join(".crates2.json");
    Ok(fs::read_to_string(path)
        .ok()
        .and_then(|text| features_in_crates2(&text)))
}

fn features_in_crates2(text: &str) -> Option<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    json.get("installs")?
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with("bpf-linker "))?
        .1
        .get("features")?
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
}

/// A lasting LLVM "prefix" whose lib/ points at the nightly toolchain's own
/// libLLVM, so that bpf-linker links (and, through its rpath, loads) the
/// same LLVM that rustc +nightly emits bitcode for.
fn llvm_prefix(nightly: &Nightly) -> Result<PathBuf> {
    let prefix = home()?
        .join(".cache")
        .join("emars")
        .join(format!("llvm-{}", nightly.tag()));
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;

    let sys_lib = nightly.sysroot.join("lib");
    let entries =
        fs::read_dir(&sys_lib).with_context(|| format!("cannot read {}", sys_lib.display()))?;
    let mut wanted: Vec<(String, PathBuf)> = Vec::new();
    let mut main_lib = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", sys_lib.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            wanted.push((name, entry.path()));
        } else if name.starts_with("libLLVM-") && name.ends_with(".so") {
            main_lib = Some(entry.path());
        }
    }
    let main_lib = main_lib.ok_or_else(|| {
        anyhow!(
            "the nightly toolchain has no libLLVM-*.so in {}",
            sys_lib.display()
        )
    })?;
    if wanted.is_empty() {
        bail!(
            "the nightly toolchain has no libLLVM.so.* in {}",
            sys_lib.display()
        );
    }
    wanted.push(("libLLVM.so".to_string(), main_lib));

    // Drop stale links from an older toolchain with the same tag.
    for entry in fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", lib.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.iter().any(|(w, _)| *w == name) {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    for (name, target) in &wanted {
        symlink(target, &lib.join(name))?;
    }
    Ok(prefix)
}

/// Creates (or fixes) the symlink `link` -> `target`.
fn symlink(target: &Path, link: &Path) -> Result<()> {
    if let Ok(current) = fs::read_link(link) {
        if current == target {
            return Ok(());
        }
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

pub fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if which("dpkg-query").is_none() {
        say(format!(
            "not a Debian-like system (no dpkg-query); make sure these are installed: {}",
            packages.join(" ")
        ));
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say(format!("apt packages ok ({})", packages.join(" ")));
        return Ok(());
    }
    say(format!("installing apt packages: {}...", missing.join(" ")));
    let sudo: Option<PathBuf> = if is_root() {
        None
    } else {
        Some(which("sudo").ok_or_else(|| {
            anyhow!(
                "apt packages missing ({}) and not root, and sudo is not available; \
                 install them as root: apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            )
        })?)
    };
    let apt = |args: &[&str]| -> Cmd {
        let cmd = match &sudo {
            Some(sudo) => Cmd::new(sudo).arg("apt-get"),
            None => Cmd::new("apt-get"),
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args)
    };
    apt(&["update"])
        .log("emars setup")
        .run()
        .context("apt-get update failed")?;
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(missing.iter().copied());
    apt(&install_args)
        .log("emars setup")
        .run()
        .context("apt-get install failed")?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt packages still missing after install: {}",
            still.join(" ")
        );
    }
    say(format!("apt packages ok ({})", packages.join(" ")));
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .probe()
        .is_some_and(|s| s.contains("install ok installed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                  commit-date: 2026-05-19\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        let n = Nightly::parse_vv(vv).expect("parses");
        assert_eq!(n.release, "1.97.0-nightly");
        assert_eq!(n.commit_date, "2026-05-19");
        assert_eq!(n.llvm_major, 22);
        assert_eq!(n.llvm_feature(), "llvm-22");
        assert_eq!(n.tag(), "1.97.0-nightly-2026-05-19");
    }

    #[test]
    fn reads_recorded_features() {
        let json = r#"{"installs":{"bpf-linker 0.13.0 (registry+https://x)":
            {"features":["llvm-22"],"no_default_features":true}}}"#;
        assert_eq!(features_in_crates2(json), Some(vec!["llvm-22".to_string()]));
        assert_eq!(features_in_crates2(r#"{"installs":{}}"#), None);
        assert_eq!(features_in_crates2("not json"), None);
    }

    #[test]
    fn schemathesis_is_pinned_with_everything_it_needs() {
        let pins: Vec<(&str, &str)> = SCHEMATHESIS_REQUIREMENTS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                l.split_once("==")
                    .unwrap_or_else(|| panic!("not pinned: {l}"))
            })
            .collect();
        assert!(pins
            .iter()
            .any(|(p, v)| *p == "schemathesis" && v.starts_with("4.")));
        // --no-deps installs only what is listed: its dependencies must be there too.
        for dep in ["hypothesis", "requests", "jsonschema_rs", "click"] {
            assert!(pins.iter().any(|(p, _)| *p == dep), "{dep} is not pinned");
        }
        assert_eq!(parse_python_version("3 11\n"), Some((3, 11)));
        assert_eq!(parse_python_version("x"), None);
    }

    #[test]
    fn rejects_vv_without_llvm() {
        assert!(Nightly::parse_vv("release: 1.97.0-nightly\n").is_err());
    }
}
