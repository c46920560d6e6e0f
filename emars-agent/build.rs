//! Builds the eBPF programs (emars-ebpf) with the nightly toolchain and bpf-linker; the object
//! lands in OUT_DIR/emars and is embedded by `probes::loader`. `cargo xtask setup` installs both.
//!
//! aya-build hands every line of the inner cargo's output to the outer one as a warning (~35
//! "Compiling ..." lines on each fresh build). Its output is caught here: cargo's progress lines
//! are shown only when the build fails; directives and real compiler messages pass through.
use std::io::{Read, Seek, Write};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../emars-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?
        .to_owned();
    let (result, printed) = capture_stdout(|| {
        aya_build::build_ebpf(
            [Package {
                name: "emars-ebpf",
                root_dir: &root,
                ..Default::default()
            }],
            Toolchain::Nightly,
        )
    })?;
    let failed = result.is_err();
    let mut out = std::io::stdout().lock();
    for line in printed.lines() {
        if failed || !is_progress(line) {
            writeln!(out, "{line}")?;
        }
    }
    result
}

/// A line of cargo's own progress, forwarded as a warning.
fn is_progress(line: &str) -> bool {
    let Some(text) = line.strip_prefix("cargo:warning=") else {
        return false;
    };
    let word = text.split_whitespace().next().unwrap_or("");
    text.trim().is_empty()
        || matches!(
            word,
            "Compiling"
                | "Finished"
                | "Fresh"
                | "Updating"
                | "Locking"
                | "Adding"
                | "Downloading"
                | "Downloaded"
                | "Blocking"
                | "Checking"
                | "Building"
        )
}

/// Runs `f` with this process's standard output (fd 1, where aya-build prints) sent to a
/// temporary file; returns what `f` returned and what it printed.
fn capture_stdout<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    let mut file = tempfile_in_out_dir()?;
    std::io::stdout().flush()?;
    // SAFETY: plain descriptor calls on fds this process owns; fd 1 is restored below.
    let saved = unsafe { libc::dup(1) };
    anyhow::ensure!(saved >= 0, "dup(1): {}", std::io::Error::last_os_error());
    let redirected = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), 1) };
    anyhow::ensure!(redirected >= 0, "dup2: {}", std::io::Error::last_os_error());
    let value = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    let restored = unsafe { libc::dup2(saved, 1) };
    unsafe { libc::close(saved) };
    anyhow::ensure!(restored >= 0, "dup2: {}", std::io::Error::last_os_error());
    let mut printed = String::new();
    file.rewind()?;
    file.read_to_string(&mut printed)?;
    Ok((value, printed))
}

fn tempfile_in_out_dir() -> anyhow::Result<std::fs::File> {
    let dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?;
    let path = std::path::Path::new(&dir).join("aya-build-output.txt");
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?)
}
