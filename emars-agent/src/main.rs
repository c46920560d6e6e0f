//! `emars`: the agent daemon and its command-line client.

// No production function over 100 lines (clippy.toml); tests beside the code may be longer.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use emars_agent::{
    api::wire::{
        Admission, AdmissionBody, AuditRecord, AuditResponse, ExportResponse, FunctionDetail,
        FunctionsResponse, Generation, GenerationsResponse, InstanceRecord, InvocationsAccepted,
        InvocationsReport, LimitsBody, Recommendation, RecommendationsResponse, WritesResponse,
    },
    cli::client::{self, Client},
    cli::{locate, render},
};

#[derive(Parser)]
#[command(
    name = "emars",
    version,
    about = "Event-driven memory right-sizing for serverless functions"
)]
struct Cli {
    /// The agent's TOML config: for `emars agent` what it runs with, for the other commands
    /// which agent they talk to (its api.socket, api.listen, api.token_file) and, for `unpin`,
    /// its probes.pin_path. Without it: /etc/emars/config.toml where it exists, else the
    /// built-in default.
    #[arg(long, short, env = "EMARS_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The agent's local socket, instead of the api.socket of its config (--config). Root (or
    /// api.socket_group) may use it for everything, with no token; other users read over TCP.
    #[arg(long, env = "EMARS_SOCKET", global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The agent's TCP address instead of its socket, e.g. 127.0.0.1:9750. Writes then need
    /// --token-file: the token is sent to whoever listens there.
    #[arg(long, env = "EMARS_ADDR", global = true, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// With --addr: the agent's write token file (api.token_file), sent with every write. Never
    /// read, nor sent, without --addr.
    #[arg(
        long,
        env = "EMARS_TOKEN_FILE",
        requires = "addr",
        global = true,
        value_name = "FILE"
    )]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl ClientArgs {
    /// The client for the agent these flags name, else the one the agent's config describes
    /// (`config`: --config, EMARS_CONFIG; else the default path or the built-in default).
    fn client(&self, config: Option<&Path>) -> anyhow::Result<Client> {
        if let Some(addr) = &self.addr {
            // The token goes over TCP only where the user named both the address and the token
            // file: whoever holds a port gets what is sent to it.
            let c = Client::new(addr).tried("--addr");
            return Ok(match &self.token_file {
                Some(f) => c.with_token_file(f),
                None => c,
            });
        }
        if let Some(socket) = &self.socket {
            // Reads are open to every local user: one the socket refuses reads over TCP (with
            // no token), writes never leave the socket.
            let fallback = format!("127.0.0.1:{}", emars_agent::config::DEFAULT_LISTEN_PORT);
            return Ok(Client::local(socket)
                .tried("--socket")
                .with_read_fallback(&fallback));
        }
        let located = locate::find(config).context(
            "reading the agent's config, to find its socket (--socket or --addr name the agent \
             without it)",
        )?;
        locate::client(&located).map_err(anyhow::Error::msg)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (needs root: it loads eBPF programs) with --config FILE, else
    /// /etc/emars/config.toml where it exists, else the built-in default.
    Agent {
        /// Override api.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override store.path.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Also run the sample functions hello_world and mem_alloc in cgroups.
        #[arg(long)]
        demo: bool,
    },
    /// Remove the kernel side the agent leaves pinned in bpffs (it records while no agent runs)
    /// under the probes.pin_path of its config (--config); refused while an agent runs. Needs
    /// root.
    Unpin,
    /// Check a config file (else the one `emars agent` would use) and print it with defaults
    /// filled in.
    CheckConfig { path: Option<PathBuf> },
    /// Print the embedded default config.
    DefaultConfig,
    /// Whether the agent answers (GET /healthz): exit status 0 if it does. Through the local
    /// socket, whatever load TCP clients put on the agent: fit for a liveness probe.
    Health(ClientArgs),
    /// What the agent probed and attached on this kernel.
    Info(ClientArgs),
    /// Every function with its instance, exec and peak figures.
    Functions(ClientArgs),
    /// One function: summary, hourly buckets, recent instances.
    Function {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The per-function config {requests, max memory} (JSON).
    Export(ClientArgs),
    /// Recommended limits (all functions, or one with the inputs behind the numbers).
    Recommend {
        function: Option<String>,
        /// Generate and export a new per-function config now, as the period would.
        #[arg(long)]
        generate: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One-shot enforcement: write each function's recommended limits into its live instances.
    Apply(ClientArgs),
    /// Every limit write, newest first, with old and new values.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Generated configs, newest first (how a function's config changed).
    Generations {
        #[arg(long)]
        function: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set one live instance's limits by hand (refused below its usage plus headroom).
    SetLimit {
        function: String,
        instance: String,
        /// memory.max / memory.limit_in_bytes: bytes, or a size such as 64Mi (x1024²) or 64M
        /// (x1000²).
        #[arg(long, value_name = "SIZE", value_parser = emars_agent::size::parse_size_arg)]
        max: Option<u64>,
        /// memory.high / memory.soft_limit_in_bytes: bytes, or a size such as 48Mi or 1.5Gi.
        #[arg(long, value_name = "SIZE", value_parser = emars_agent::size::parse_size_arg)]
        high: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Whether a new instance of a function fits on this host now (exit status 1 when refused).
    Admit {
        function: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Report invocations of a function (for platforms that count requests). A name the agent
    /// has never seen is refused (a typo would make a function of its own): `--new` for one
    /// whose first instance has not started yet.
    Invocations {
        name: String,
        count: u64,
        /// Report for a function the agent does not know yet.
        #[arg(long)]
        new: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write SVG plots of every function's instance peaks against its limits, and an
    /// index.html linking them, into DIR.
    Report {
        /// Directory to write into (created when missing).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a command under a sweep of memory limits in cgroups of its own and find the knee:
    /// the smallest limit without OOM kills, failures or slowdown (root; no agent needed).
    Tune {
        /// Limits to try, e.g. 16Mi,32Mi,64Mi,1Gi (x1024ⁿ; 64M is x1000²) or bytes; default: 8
        /// from 0.5x to 2x the peak measured without a limit.
        #[arg(long, value_name = "SIZES")]
        limits: Option<String>,
        /// Runs per limit (and without a limit).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
        /// Directory for tune.json and tune.svg (created when missing).
        #[arg(long, default_value = "emars-tune")]
        out: PathBuf,
        /// Print the result as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<std::ffi::OsString>,
    },
    /// Print a shell completion script: `emars completions bash > /etc/bash_completion.d/emars`.
    Completions { shell: clap_complete::Shell },
    /// Print the API's OpenAPI 3.1 document (the agent serves it at /v1/openapi.json).
    Openapi,
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emars: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, with colours only on a terminal (and never with NO_COLOR set), so a log
/// file or a pipe gets plain text. Under systemd, when stderr is the journal (JOURNAL_STREAM
/// names it), they go to journald natively instead: its own timestamps, levels as priorities,
/// fields as journal fields. `EMARS_LOG` filters (default "info").
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMARS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("emars".to_owned()))
                .init();
            return;
        }
    }
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

/// systemd sets JOURNAL_STREAM to "<device>:<inode>" of the journal stream it connected stdout
/// and stderr to; stderr is the journal when its descriptor is that file.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Agent {
            listen,
            store,
            demo,
        } => run_agent(config, listen, store, demo),
        Command::Unpin => unpin(config),
        Command::CheckConfig { path } => check_config(path.as_deref().or(config)),
        Command::DefaultConfig => {
            print!("{}", emars_agent::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Health(c) => health(&c, config),
        Command::Info(c) => show(&c, &c.client(config)?.info()?, render::render_info),
        Command::Functions(c) => {
            let list: FunctionsResponse = c.client(config)?.get_as("/v1/functions")?;
            show(&c, &list, |l| render::render_functions(&l.functions))
        }
        Command::Function { name, client: c } => function(&c, config, &name),
        Command::Export(c) => {
            print_json(&c.client(config)?.get_as::<ExportResponse>("/v1/export")?)
        }
        Command::Recommend {
            function,
            generate,
            client: c,
        } => recommend(&c, config, function.as_deref(), generate),
        Command::Admit {
            function,
            client: c,
        } => admit(&c, config, function),
        Command::Apply(c) => apply(&c, config),
        Command::Audit { limit, client: c } => {
            let a: AuditResponse = c
                .client(config)?
                .get_as(&format!("/v1/audit?limit={limit}"))?;
            show(&c, &a.audit, |l| render::render_audit(l))
        }
        Command::Generations {
            function,
            limit,
            client: c,
        } => generations(&c, config, function.as_deref(), limit),
        Command::SetLimit {
            function,
            instance,
            max,
            high,
            client: c,
        } => set_limit(&c, config, &function, &instance, max, high),
        Command::Invocations {
            name,
            count,
            new,
            client: c,
        } => invocations(&c, config, &name, count, new),
        Command::Report { out, client: c } => {
            let (written, index) = emars_agent::cli::report::run(&c.client(config)?, &out)?;
            show(&c, &written, |w| {
                emars_agent::cli::report::render(w, &index)
            })
        }
        Command::Tune {
            limits,
            runs,
            out,
            json,
            command,
        } => tune(limits.as_deref(), runs, &out, json, &command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "emars", &mut std::io::stdout());
            Ok(())
        }
        Command::Openapi => {
            let doc = emars_agent::api::openapi_document()
                .to_pretty_json()
                .context("encoding the OpenAPI document")?;
            println!("{doc}");
            Ok(())
        }
    }
}

/// `emars agent`: the config with the command line's overrides, checked as the file is, then
/// the daemon until SIGTERM or SIGINT.
fn run_agent(
    config: Option<&Path>,
    listen: Option<SocketAddr>,
    store: Option<PathBuf>,
    demo: bool,
) -> anyhow::Result<()> {
    let located = locate::find(config)?;
    tracing::info!("config: {}", located.source);
    let mut cfg = located.config;
    if let Some(l) = listen {
        cfg.api.listen = l;
    }
    if let Some(s) = store {
        cfg.store.path = s;
    }
    // The overrides obey the same rules as the file (a non-loopback --listen needs
    // api.allow_remote, a relative --store is refused).
    cfg.validate()?;
    cfg.check_host()?;
    emars_agent::daemon::check_privilege()?;
    // Sockets handed over by a service manager: taken before any thread starts (it
    // clears their variables from the environment).
    let inherited = emars_agent::api::listen::Inherited::take_from_env();
    // The event loop's runtime: one thread, which also waits for the kernel's events,
    // so a mkdir wakes exactly the thread that writes its limits (with worker threads
    // the one holding the I/O driver woke the loop: two wake-ups, each a wait for a
    // CPU when a storm of API clients takes them). The API has a runtime of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        // The API's sockets first thing: the port and the local socket are the agent's from
        // its first moment.
        let listeners = emars_agent::api::start::open_sockets(&cfg, inherited)?;
        // Held while the agent runs: its drop ends the demo and removes its cgroups.
        let _demo = if demo {
            Some(emars_agent::cli::demo::spawn(&cfg)?)
        } else {
            None
        };
        let api_config = cfg.clone();
        let start_api = move |parts| emars_agent::api::start::start(&api_config, listeners, parts);
        emars_agent::daemon::run(cfg, start_api, shutdown_signal()?).await
    })
}

/// `emars unpin`: the kernel side pinned under the config's probes.pin_path, removed.
fn unpin(config: Option<&Path>) -> anyhow::Result<()> {
    let located = locate::find(config)?;
    let base = &located.config.probes.pin_path;
    // Said first: the default directory may be another agent's.
    eprintln!(
        "unpinning under {} (probes.pin_path of {})",
        base.display(),
        located.source
    );
    let removed = emars_agent::kernel::probes::pins::unpin_all(base)
        .with_context(|| format!("removing the pinned kernel side under {}", base.display()))?;
    if removed.is_empty() {
        eprintln!("nothing pinned under {}", base.display());
    }
    for r in removed {
        println!("removed {}/{r}: its programs are detached", base.display());
    }
    Ok(())
}

/// `emars check-config`: the config checked, printed with its defaults.
fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let located = locate::find(path)?;
    located.config.check_host()?;
    println!(
        "{}",
        toml::to_string_pretty(&located.config).context("printing the config")?
    );
    eprintln!("{}: ok", located.source);
    Ok(())
}

/// `emars health`: fails unless the agent says it is healthy.
fn health(c: &ClientArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let h: emars_agent::api::wire::Health = c.client(config)?.get_as("/healthz")?;
    show(c, &h, |h| {
        if h.ok {
            "ok\n".into()
        } else {
            "not ok\n".into()
        }
    })?;
    if !h.ok {
        anyhow::bail!("the agent says it is not healthy");
    }
    Ok(())
}

/// `emars function NAME`: its summary, hours and newest instances.
fn function(c: &ClientArgs, config: Option<&Path>, name: &str) -> anyhow::Result<()> {
    let (detail, instances) = c
        .client(config)?
        .function(name, Some(render::SHOWN_INSTANCES))?;
    #[derive(serde::Serialize)]
    struct View<'a> {
        function: &'a FunctionDetail,
        instances: &'a [InstanceRecord],
    }
    let view = View {
        function: &detail,
        instances: &instances,
    };
    show(c, &view, |v| {
        render::render_function(&v.function.summary, &v.function.hours, v.instances)
    })
}

/// `emars recommend [FUNCTION] [--generate]`.
fn recommend(
    c: &ClientArgs,
    config: Option<&Path>,
    function: Option<&str>,
    generate: bool,
) -> anyhow::Result<()> {
    let api = c.client(config)?;
    if generate {
        let g: Generation = api.post_as("/v1/recommendations/generate", &Empty {})?;
        return show(c, &g, |g| {
            render::render_generations(std::slice::from_ref(g))
        });
    }
    // --json prints the API's answer: one recommendation, or all with the mode.
    match function {
        Some(f) => {
            let r: Recommendation = api.get_as(&format!(
                "/v1/functions/{}/recommendation",
                client::encode_segment(f)
            ))?;
            show(c, &r, |r| {
                render::render_recommendations(std::slice::from_ref(r), true)
            })
        }
        None => {
            let all: RecommendationsResponse = api.get_as("/v1/recommendations")?;
            show(c, &all, |a| {
                render::render_recommendations(&a.recommendations, false)
            })
        }
    }
}

/// `emars admit FUNCTION`: fails when the agent refuses.
fn admit(c: &ClientArgs, config: Option<&Path>, function: String) -> anyhow::Result<()> {
    let body = AdmissionBody { function };
    let a: Admission = c.client(config)?.post_as("/v1/admission", &body)?;
    show(c, &a, render::render_admission)?;
    if !a.admit {
        anyhow::bail!("{}: not admitted", body.function);
    }
    Ok(())
}

/// `emars apply`: the writes, and the instances whose hand-set limits were kept.
fn apply(c: &ClientArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let w: WritesResponse = c.client(config)?.post_as("/v1/apply", &Empty {})?;
    show(c, &w, |w| {
        let mut out = render::render_audit(&w.writes);
        if !w.kept.is_empty() {
            let names: Vec<String> = w
                .kept
                .iter()
                .map(|k| format!("{}/{}", k.function, k.instance))
                .collect();
            out.push_str(&format!(
                "kept the limits set by hand (set-limit) of {}: until they end\n",
                names.join(", ")
            ));
        }
        out
    })
}

/// `emars generations [--function F] [--limit N]`.
fn generations(
    c: &ClientArgs,
    config: Option<&Path>,
    function: Option<&str>,
    limit: u32,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/generations?limit={limit}");
    if let Some(f) = function {
        path.push_str(&format!("&function={}", client::encode_segment(f)));
    }
    let g: GenerationsResponse = c.client(config)?.get_as(&path)?;
    show(c, &g, |g| render::render_generations(&g.generations))
}

/// `emars set-limit FUNCTION INSTANCE [--max SIZE] [--high SIZE]`.
fn set_limit(
    c: &ClientArgs,
    config: Option<&Path>,
    function: &str,
    instance: &str,
    max: Option<u64>,
    high: Option<u64>,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/functions/{}/instances/{}/limits",
        client::encode_segment(function),
        client::encode_segment(instance)
    );
    let body = LimitsBody {
        max_bytes: max,
        high_bytes: high,
    };
    let rec: AuditRecord = c.client(config)?.post_as(&path, &body)?;
    show(c, &[rec][..], render::render_audit)
}

/// `emars invocations NAME COUNT [--new]`: refused for a name the agent does not know, unless
/// `new`.
fn invocations(
    c: &ClientArgs,
    config: Option<&Path>,
    name: &str,
    count: u64,
    new: bool,
) -> anyhow::Result<()> {
    let seg = client::encode_segment(name);
    let agent = c.client(config)?;
    // Only the agent's definite "unknown" stops it; any other failure of this read is
    // left to the write, which says it its own way.
    if !new {
        if let Err(client::ClientError::Api { status: 404, .. }) =
            agent.get(&format!("/v1/functions/{seg}"))
        {
            anyhow::bail!(
                "the agent knows no function {name:?}: check the name (`emars \
                 functions`), or give --new to report invocations for a function whose \
                 first instance has not started yet"
            );
        }
    }
    let path = format!("/v1/functions/{seg}/invocations");
    let body = InvocationsReport { count, at_ms: None };
    let a: InvocationsAccepted = agent.post_as(&path, &body)?;
    show(c, &a, |a| {
        format!(
            "{}: {} counted in the hour of {} UTC\n",
            a.function,
            emars_agent::view::text::count(a.count, "invocation", "invocations"),
            emars_agent::view::text::format_time_ms(a.at_ms)
        )
    })
}

/// `emars tune`: the sweep, printed as a table (or JSON) with where its files went.
fn tune(
    limits: Option<&str>,
    runs: u32,
    out: &Path,
    json: bool,
    command: &[std::ffi::OsString],
) -> anyhow::Result<()> {
    use emars_agent::cli::tune;
    // A bad list is refused before anything runs.
    let limits = limits.map(tune::parse_limits).transpose()?;
    let report = tune::run(limits.as_deref(), runs as usize, out, command, &mut |l| {
        eprintln!("{l}")
    })?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", tune::render(&report));
        println!(
            "wrote {} and {}",
            out.join("tune.json").display(),
            out.join("tune.svg").display()
        );
    }
    Ok(())
}

/// The body of a write that needs no arguments: `{}`.
#[derive(serde::Serialize)]
struct Empty {}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The API's answer as a table, or as JSON with `--json`.
fn show<T: serde::Serialize + ?Sized>(
    c: &ClientArgs,
    v: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if c.json {
        print_json(&v)
    } else {
        print!("{}", render(v));
        Ok(())
    }
}

/// Installs the SIGTERM and SIGINT handlers now, and returns what resolves on either. Now, not
/// when first polled: the agent announces that it listens before its tasks first run, and a
/// stop sent right after would otherwise meet the default action and kill it uncleanly.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
