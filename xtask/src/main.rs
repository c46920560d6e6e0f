//! Developer tasks for EMARS: `cargo xtask setup|build|run|test|bench|fuzz`.

mod agent;
mod cmd;
mod fuzz;
mod setup;
mod suite;
mod vm;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::cmd::{exit_code, is_root, which, Cmd};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "EMARS developer tasks",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (nightly + rust-src, bpf-linker, apt packages). Idempotent.
    Setup(SetupArgs),
    /// Setup, then build the `emars` binary (the eBPF programs are built by its build.rs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        #[command(flatten)]
        setup: SetupArgs,
    },
    /// Setup, build, then run `emars agent ARGS...` as root (via sudo -E if needed).
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        #[command(flatten)]
        setup: SetupArgs,
        /// Arguments for `emars agent`, e.g. `-- --demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup, fmt check, clippy, build, unit tests, integration tests (as root), a short fuzz run.
    Test {
        /// Build the `emars` binary under test with the release profile.
        #[arg(long)]
        release: bool,
        /// Only run tests whose name contains STR (unit and integration).
        #[arg(long, value_name = "STR")]
        filter: Option<String>,
        #[command(flatten)]
        setup: SetupArgs,
    },
    /// The integration suite in VMs on Debian kernels with pure cgroup v2 (qemu, TCG).
    VmTest {
        /// Kernels to test: 6.1, 6.12, 7.x or all (repeatable).
        #[arg(long, default_value = "all")]
        kernel: Vec<String>,
        /// Limit per VM, in seconds.
        #[arg(long, default_value_t = 1500)]
        timeout: u64,
        /// Multiplier of the suite's own timeouts in the emulated guest.
        #[arg(long, default_value_t = 10)]
        time_scale: u32,
        /// Use KVM when a 20 s smoke boot succeeds (off by default: KVM hangs on these hosts).
        #[arg(long)]
        try_kvm: bool,
        /// How many VMs run at once. One by default: guests sharing the cores run slower than
        /// the suite's memory checks allow for (docs/design.md, "CI time").
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Only run guest tests whose name contains STR.
        #[arg(long, value_name = "STR")]
        filter: Option<String>,
        #[command(flatten)]
        setup: SetupArgs,
    },
    /// Setup, build, then run the benchmarks with EMARS_BIN set: emars-bench (the programs,
    /// the agent), then emars-bench-net (the socket program).
    Bench {
        /// Benchmark the release build of the agent.
        #[arg(long)]
        release: bool,
        /// Run only emars-bench-net (the socket program's cost per packet and its effect on
        /// request latency); ARGS go to it.
        #[arg(long)]
        net: bool,
        #[command(flatten)]
        setup: SetupArgs,
        /// Arguments for emars-bench (for emars-bench-net with --net).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup, then run the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer); fails on any finding.
    Fuzz {
        /// Run only this target (repeatable); default: every target.
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Time budget per target, in seconds.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        #[command(flatten)]
        setup: SetupArgs,
    },
}

#[derive(Args, Clone, Default)]
struct SetupArgs {
    /// Rebuild and reinstall bpf-linker even if the installed one works.
    #[arg(long)]
    reinstall_bpf_linker: bool,
    /// Install bpf-linker into this `cargo install --root` instead (testing).
    #[arg(long, value_name = "DIR", hide = true)]
    bpf_linker_root: Option<PathBuf>,
}

impl SetupArgs {
    /// Setup for building and running the agent only.
    fn for_build(self) -> setup::Options {
        setup::Options {
            scope: setup::Scope::Build,
            ..self.into()
        }
    }
}

impl From<SetupArgs> for setup::Options {
    fn from(a: SetupArgs) -> Self {
        setup::Options {
            scope: setup::Scope::Test,
            reinstall_bpf_linker: a.reinstall_bpf_linker,
            bpf_linker_root: a.bpf_linker_root,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            cmd::flush_stdout();
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup(s) => {
            setup::run(&s.into())?;
        }
        Command::Build { release, setup: s } => {
            setup::run(&s.for_build())?;
            agent::build(release, "emars build")?;
        }
        Command::Run {
            release,
            setup: s,
            args,
        } => {
            setup::run(&s.for_build())?;
            let bin = agent::build(release, "emars run")?;
            return run_agent(&bin, &args);
        }
        Command::Test {
            release,
            filter,
            setup: s,
        } => {
            suite::run(&suite::Options {
                release,
                filter,
                setup: s.into(),
            })?;
        }
        Command::VmTest {
            kernel,
            timeout,
            time_scale,
            try_kvm,
            jobs,
            filter,
            setup: s,
        } => {
            setup::run(&s.into())?;
            vm::run(&vm::Options {
                kernels: kernel,
                timeout: std::time::Duration::from_secs(timeout),
                time_scale,
                try_kvm,
                filter,
                jobs,
            })?;
        }
        Command::Bench {
            release,
            net,
            setup: s,
            args,
        } => {
            setup::run(&s.for_build())?;
            let bin = agent::build(release, "emars bench")?;
            if !is_root() {
                println!("emars bench: warning: not root; benchmarks that load eBPF programs will fail or skip");
            }
            // The benches and the workloads they run (emars-alloc, emars-http-server), all
            // built here: a fresh clone has none.
            agent::cargo_in_root()?
                .args(["build", "--release", "-p", "emars-tests", "--bins"])
                .log("emars bench")
                .run()
                .context("building the benchmark binaries failed")?;
            let dir = agent::metadata()?.target_dir.join("release");
            let bench = |name: &str, args: &[OsString]| {
                Cmd::new(dir.join(name))
                    .args(args)
                    .env("EMARS_BIN", &bin)
                    .env("EMARS_ALLOC_BIN", dir.join("emars-alloc"))
                    .env("EMARS_HTTP_SERVER_BIN", dir.join("emars-http-server"))
                    .log("emars bench")
                    .status()
            };
            if !net {
                let code = exit_code(bench("emars-bench", &args)?);
                if code != 0 {
                    return Ok(pass_through(code));
                }
            }
            let net_args = if net { args.as_slice() } else { &[] };
            return Ok(pass_through(exit_code(bench("emars-bench-net", net_args)?)));
        }
        Command::Fuzz {
            targets,
            seconds,
            setup: s,
        } => {
            setup::run(&s.into())?;
            fuzz::run(&fuzz::Options {
                targets,
                seconds,
                dev: false,
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Replaces this process with `emars agent ARGS...`, as root.
fn run_agent(bin: &std::path::Path, args: &[OsString]) -> Result<ExitCode> {
    let cmd = if is_root() {
        Cmd::new(bin).arg("agent").args(args)
    } else {
        let sudo = which("sudo").ok_or_else(|| {
            anyhow!(
                "the agent must run as root (it loads eBPF programs) and sudo is not available; \
                 run as root: {} agent",
                bin.display()
            )
        })?;
        println!("emars run: not root; running the agent through sudo -E");
        Cmd::new(sudo).arg("-E").arg(bin).arg("agent").args(args)
    };
    let err = cmd.log("emars run").exec();
    Err(err).context("starting the agent")
}

fn pass_through(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
