//! `cargo xtask test`: setup, format check, clippy, build, unit tests, the
//! integration suite and a short run of every fuzz target, with a summary
//! table at the end.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    agent,
    cmd::{describe, is_root, Cmd},
    fuzz, setup,
};

const PREFIX: &str = "emars test";
/// Budget per fuzz target: enough to catch shallow panics and hangs on every CI run;
/// `cargo xtask fuzz` runs longer.
const FUZZ_SECONDS: u64 = 20;

pub struct Options {
    pub release: bool,
    pub filter: Option<String>,
    pub setup: setup::Options,
}

/// Counts from cargo test's "test result:" lines, summed over test binaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// Sums every `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
/// Returns None when there is no such line.
pub fn parse_counts(output: &str) -> Option<Counts> {
    let mut total: Option<Counts> = None;
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            continue;
        };
        let mut counts = Counts::default();
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let [.., n, what] = words.as_slice() else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match *what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                "ignored" => counts.ignored += n,
                _ => {}
            }
        }
        total.get_or_insert_with(Counts::default).add(counts);
    }
    total
}

#[derive(Debug)]
enum Outcome {
    Ok,
    Failed,
}

struct StepResult {
    name: &'static str,
    outcome: Outcome,
    duration: Duration,
    counts: Option<Counts>,
}

struct Runner {
    steps: &'static [&'static str],
    results: Vec<StepResult>,
}

impl Runner {
    /// Runs one step: prints its header, times it, records the outcome.
    /// `f` may record test counts in its argument, even when it fails.
    fn step<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Option<Counts>) -> Result<T>,
    ) -> Result<T> {
        let index = self.results.len() + 1;
        println!();
        println!(
            "===== {PREFIX} [{index}/{}]: {name} =====",
            self.steps.len()
        );
        let start = Instant::now();
        let mut counts = None;
        let result = f(&mut counts);
        self.results.push(StepResult {
            name,
            outcome: if result.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
            duration: start.elapsed(),
            counts,
        });
        result
    }

    fn print_summary(&self) {
        println!();
        println!("===== {PREFIX}: summary =====");
        println!(
            "  {:<18} {:<8} {:>8} {:>7} {:>7} {:>8}",
            "step", "result", "time", "passed", "failed", "ignored"
        );
        let mut total_time = Duration::ZERO;
        let mut total: Option<Counts> = None;
        for name in self.steps {
            match self.results.iter().find(|r| r.name == *name) {
                Some(r) => {
                    total_time += r.duration;
                    let result = match r.outcome {
                        Outcome::Ok => "ok",
                        Outcome::Failed => "FAILED",
                    };
                    let (p, f, i) = match r.counts {
                        Some(c) => {
                            total.get_or_insert_with(Counts::default).add(c);
                            (
                                c.passed.to_string(),
                                c.failed.to_string(),
                                c.ignored.to_string(),
                            )
                        }
                        None => Default::default(),
                    };
                    let row = format!(
                        "  {:<18} {:<8} {:>8} {:>7} {:>7} {:>8}",
                        r.name,
                        result,
                        fmt_duration(r.duration),
                        p,
                        f,
                        i
                    );
                    println!("{}", row.trim_end());
                }
                None => println!("  {name:<18} not run"),
            }
        }
        let c = total.unwrap_or_default();
        println!(
            "  {:<18} {:<8} {:>8} {:>7} {:>7} {:>8}",
            "total",
            "",
            fmt_duration(total_time),
            c.passed,
            c.failed,
            c.ignored
        );
        if total.is_some() {
            // A plain closing line that CI systems can read.
            println!(
                "summary: {} passed, {} failed, {} skipped",
                c.passed, c.failed, c.ignored
            );
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

fn warn_not_root() {
    let bar = "!".repeat(72);
    println!("{bar}");
    println!("!! {PREFIX}: NOT RUNNING AS ROOT.");
    println!("!! Tests that load eBPF programs or touch cgroups will SKIP, so this");
    println!("!! run does not test the kernel side. Run as root: sudo -E cargo xtask test");
    println!("{bar}");
}

const STEPS: &[&str] = &[
    "setup",
    "fmt",
    "clippy",
    "clippy (eBPF)",
    "build",
    "unit tests",
    "integration tests",
    "fuzz",
];

pub fn run(opts: &Options) -> Result<()> {
    let root = is_root();
    if !root {
        warn_not_root();
    }
    let mut runner = Runner {
        steps: STEPS,
        results: Vec::new(),
    };
    let result = run_steps(&mut runner, opts, root);
    runner.print_summary();
    if !root {
        warn_not_root();
    }
    result
}

fn run_steps(runner: &mut Runner, opts: &Options, root: bool) -> Result<()> {
    runner.step("setup", |_| setup::run(&opts.setup))?;

    runner.step("fmt", |_| {
        agent::cargo_in_root()?
            .args(["fmt", "--all", "--", "--check"])
            .log(PREFIX)
            .run()
            .map_err(|e| e.context("the tree is not formatted: run `cargo fmt --all`"))?;
        // fuzz/ is a workspace of its own.
        agent::cargo_in_root()?
            .args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])
            .log(PREFIX)
            .run()
            .map_err(|e| {
                e.context("fuzz/ is not formatted: run `cargo fmt --manifest-path fuzz/Cargo.toml`")
            })
    })?;

    // emars-ebpf only builds for the BPF target: leave it out of host-side
    // clippy and tests (emars-agent's build.rs compiles it for real).
    let exclude = agent::exclude_bpf_only(&agent::metadata()?.members);

    runner.step("clippy", |_| {
        agent::cargo_in_root()?
            .args(["clippy", "--workspace"])
            .args(&exclude)
            .args(["--all-targets", "--", "-D", "warnings"])
            .log(PREFIX)
            .run()
    })?;

    // The eBPF crate, with nightly for its own target, in a target dir of its own so the
    // host build's artifacts are not invalidated.
    runner.step("clippy (eBPF)", |_| {
        let target_dir = agent::metadata()?.target_dir.join("clippy-ebpf");
        Cmd::new("cargo")
            .args(["+nightly", "clippy", "-p", "emars-ebpf"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .args(["--", "-D", "warnings"])
            .current_dir(agent::workspace_root()?)
            .log(PREFIX)
            .run()
    })?;

    let bin: PathBuf = runner.step("build", |_| agent::build(opts.release, PREFIX))?;

    runner.step("unit tests", |counts| {
        let mut cmd = agent::cargo_in_root()?
            .args(["test", "--workspace"])
            .args(&exclude)
            .args(["--lib", "--bins"]);
        if let Some(filter) = &opts.filter {
            cmd = cmd.arg("--").arg(filter);
        }
        // Unit tests that read the running kernel (BTF, tracefs) must run, not skip, as root.
        if root {
            cmd = cmd.env("EMARS_TEST_ROOT_REQUIRED", "1");
        }
        run_tests(cmd.log(PREFIX), counts)
    })?;

    runner.step("integration tests", |counts| {
        // Kernel sides pinned by the agents of a test run that was killed: detached here, or
        // their programs would go on running (and cost) on this host.
        let stale = std::path::Path::new("/sys/fs/bpf/emars-test");
        if root && stale.is_dir() {
            std::fs::remove_dir_all(stale)
                .with_context(|| format!("removing stale pins under {}", stale.display()))?;
        }
        let mut cmd = agent::cargo_in_root()?
            .args(["test", "-p", "emars-tests", "--"])
            .args(opts.filter.iter())
            .args(["--test-threads=1", "--nocapture"])
            .env("EMARS_BIN", &bin);
        if root {
            cmd = cmd.env("EMARS_TEST_ROOT_REQUIRED", "1");
        }
        run_tests(cmd.log(PREFIX), counts)
    })?;

    runner.step("fuzz", |_| {
        let mut targets = fuzz::list_targets()?;
        if let Some(filter) = &opts.filter {
            targets.retain(|t| t.contains(filter.as_str()));
            if targets.is_empty() {
                println!("{PREFIX}: no fuzz target matches --filter {filter:?}");
                return Ok(());
            }
        }
        fuzz::run(&fuzz::Options {
            targets,
            seconds: FUZZ_SECONDS,
            dev: true,
        })
    })?;
    Ok(())
}

/// Runs a `cargo test` command, echoing and counting its results.
fn run_tests(cmd: crate::cmd::Cmd, counts: &mut Option<Counts>) -> Result<()> {
    let shown = cmd.to_string();
    let (status, output) = cmd.tee()?;
    *counts = parse_counts(&output);
    if !status.success() {
        bail!("`{shown}` failed ({})", describe(status));
    }
    if counts.is_none() {
        return Err(anyhow!("`{shown}` printed no test results"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_test_result_lines() {
        let out = "running 2 tests\n\
                   test a ... ok\n\
                   test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\
                   \n\
                   test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.20s\n";
        assert_eq!(
            parse_counts(out),
            Some(Counts {
                passed: 5,
                failed: 1,
                ignored: 1
            })
        );
    }

    #[test]
    fn no_result_lines() {
        assert_eq!(parse_counts("error: could not compile\n"), None);
    }

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m05s");
    }
}
