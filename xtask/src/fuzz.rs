//! `cargo xtask fuzz`: builds the libFuzzer targets of fuzz/ with cargo-fuzz (nightly) and runs
//! each for a time budget, then prints executions, exec/s, corpus size and findings per target.
//!
//! The targets are built with `--sanitizer none`: the code under test is safe Rust, and what we
//! look for is panics and hangs, which libFuzzer catches without a sanitizer; the build is also
//! faster and the targets run several times faster. Each target's corpus is fuzz/corpus/NAME
//! (seeds committed as `seed-*`), its findings land in fuzz/artifacts/NAME.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{
    agent,
    cmd::{describe, flush_stdout, Cmd},
};

const PREFIX: &str = "emars fuzz";
/// A single input running longer than this (seconds) is a finding: a hang.
const UNIT_TIMEOUT_SECS: u32 = 10;
const SANITIZER: &str = "--sanitizer=none";

pub struct Options {
    /// Targets to run; empty: every target of fuzz/Cargo.toml.
    pub targets: Vec<String>,
    /// Budget per target.
    pub seconds: u64,
    /// Build without optimisation (`cargo fuzz --dev`): the test suite's short smoke run, where
    /// building every instrumented dependency dominates and a few seconds of slower execution
    /// still covers the shallow inputs it is there for.
    pub dev: bool,
}

impl Options {
    /// The build mode and sanitizer, the same for `cargo fuzz build` and `cargo fuzz run` (a
    /// difference would build the target again).
    fn build_args(&self) -> Vec<&'static str> {
        let mut args = vec![SANITIZER];
        if self.dev {
            args.push("--dev");
        }
        args
    }
}

/// What one target's run found.
struct Report {
    target: String,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    /// Inputs in the corpus directory after the run.
    corpus: usize,
    /// Artifacts (crash-*, timeout-*, oom-*, ...) written by this run.
    findings: Vec<PathBuf>,
    /// libFuzzer (through cargo fuzz) exited with a failure.
    failed: Option<String>,
}

impl Report {
    fn ok(&self) -> bool {
        self.failed.is_none() && self.findings.is_empty()
    }
}

fn fuzz_dir() -> Result<PathBuf> {
    Ok(agent::workspace_root()?.join("fuzz"))
}

/// `cargo +nightly fuzz ARGS` in the workspace root.
fn cargo_fuzz() -> Result<Cmd> {
    Ok(Cmd::new("cargo")
        .args(["+nightly", "fuzz"])
        .current_dir(agent::workspace_root()?))
}

/// Every target of fuzz/Cargo.toml, as `cargo fuzz list` prints them.
pub fn list_targets() -> Result<Vec<String>> {
    let out = cargo_fuzz()?.arg("list").read()?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Builds, runs every selected target for `opts.seconds`, prints a summary; fails when a
/// target failed or found something.
pub fn run(opts: &Options) -> Result<()> {
    let all = list_targets()?;
    let targets = if opts.targets.is_empty() {
        all
    } else {
        if let Some(unknown) = opts.targets.iter().find(|t| !all.contains(t)) {
            bail!(
                "no fuzz target {unknown:?}; the targets are: {}",
                all.join(", ")
            );
        }
        opts.targets.clone()
    };
    let mut build = cargo_fuzz()?.arg("build").args(opts.build_args());
    if targets.len() == 1 {
        build = build.arg(&targets[0]);
    }
    build
        .log(PREFIX)
        .run()
        .context("building the fuzz targets failed")?;

    let mut reports = Vec::new();
    for target in &targets {
        reports.push(run_target(target, opts)?);
    }
    print_summary(&reports);
    let bad: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.target.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("fuzzing found problems in {}", bad.join(", "));
    }
    Ok(())
}

fn run_target(target: &str, opts: &Options) -> Result<Report> {
    let seconds = opts.seconds;
    let fuzz = fuzz_dir()?;
    let artifacts = fuzz.join("artifacts").join(target);
    let before = list_files(&artifacts);
    let mut args: Vec<String> = ["+nightly", "fuzz", "run"].map(String::from).to_vec();
    args.extend(opts.build_args().into_iter().map(String::from));
    args.extend([target.to_string(), "--".to_string()]);
    args.push(format!("-max_total_time={seconds}"));
    args.push(format!("-timeout={UNIT_TIMEOUT_SECS}"));
    args.push("-print_final_stats=1".to_string());
    let dict = fuzz.join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        args.push(format!("-dict={}", dict.display()));
    }

    println!();
    println!("===== {PREFIX}: {target} ({seconds}s) =====");
    println!("{PREFIX}: $ cargo {}", args.join(" "));
    flush_stdout();
    let mut child = Command::new("cargo")
        .args(&args)
        // Built above: spare the log cargo's replay of the build's warnings.
        .env("CARGO_TERM_QUIET", "true")
        .current_dir(agent::workspace_root()?)
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `cargo fuzz run`")?;
    // libFuzzer reports on stderr: echo it (without the lines about each new input) and keep it
    // for the final stats.
    let mut log = String::new();
    if let Some(stderr) = child.stderr.take() {
        let mut err = std::io::stderr();
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading the fuzzer's output")?;
            if !is_progress_line(&line) {
                let _ = writeln!(err, "{line}");
            }
            log.push_str(&line);
            log.push('\n');
        }
    }
    let status = child.wait().context("waiting for `cargo fuzz run`")?;

    let stats = parse_stats(&log);
    let findings = list_files(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    Ok(Report {
        target: target.to_string(),
        executions: stats.executions,
        exec_per_sec: stats.exec_per_sec,
        corpus: list_files(&fuzz.join("corpus").join(target)).len(),
        findings,
        failed: (!status.success()).then(|| describe(status)),
    })
}

/// `#1234\tNEW ...`, `#1234\tREDUCE ...` and `\tNEW_FUNC[1/2]: 0x...`: lines about each input
/// added to the corpus.
fn is_progress_line(line: &str) -> bool {
    let per_input = line.strip_prefix('#').is_some_and(|rest| {
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        rest.starts_with("\tNEW") || rest.starts_with("\tREDUCE")
    });
    per_input || line.starts_with("\tNEW_FUNC")
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
}

/// Reads libFuzzer's `-print_final_stats=1` lines (`stat::number_of_executed_units: 123`).
fn parse_stats(log: &str) -> Stats {
    let stat = |name: &str| {
        log.lines()
            .filter_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .find_map(|v| v.trim().parse().ok())
    };
    Stats {
        executions: stat("stat::number_of_executed_units"),
        exec_per_sec: stat("stat::average_exec_per_sec"),
    }
}

/// Files directly in `dir`, sorted; none when it does not exist.
fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn print_summary(reports: &[Report]) {
    let num = |n: Option<u64>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    println!();
    println!("===== {PREFIX}: summary =====");
    println!(
        "  {:<16} {:<8} {:>12} {:>9} {:>7} {:>8}",
        "target", "result", "executions", "exec/s", "corpus", "findings"
    );
    for r in reports {
        println!(
            "  {:<16} {:<8} {:>12} {:>9} {:>7} {:>8}",
            r.target,
            if r.ok() { "ok" } else { "FAILED" },
            num(r.executions),
            num(r.exec_per_sec),
            r.corpus,
            r.findings.len()
        );
    }
    for r in reports {
        if let Some(how) = &r.failed {
            println!("  {}: the fuzzer failed ({how})", r.target);
        }
        for f in &r.findings {
            println!(
                "  {}: finding; reproduce with: cargo +nightly fuzz run {SANITIZER} {} {}",
                r.target,
                r.target,
                f.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_final_stats() {
        let log = "#105115885\tDONE   cov: 43 ft: 45 corp: 15/4369b exec/s: 1723211 rss: 66Mb\n\
                   Done 105115885 runs in 61 second(s)\n\
                   stat::number_of_executed_units: 105115885\n\
                   stat::average_exec_per_sec:     1723211\n\
                   stat::new_units_added:          20\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                executions: Some(105_115_885),
                exec_per_sec: Some(1_723_211),
            }
        );
        assert_eq!(
            parse_stats("==1== ERROR: libFuzzer: deadly signal\n"),
            Stats::default()
        );
    }

    #[test]
    fn progress_lines() {
        assert!(is_progress_line("#4096\tNEW    cov: 7415 ft: 26112"));
        assert!(is_progress_line("#12\tREDUCE cov: 27"));
        assert!(is_progress_line("\tNEW_FUNC[1/2]: 0x56148ff62c41"));
        assert!(!is_progress_line("#4194304\tpulse  cov: 43"));
        assert!(!is_progress_line("#8\tINITED cov: 27"));
        assert!(!is_progress_line(
            "thread '<unnamed>' panicked at src/lib.rs:1:1:"
        ));
    }
}
