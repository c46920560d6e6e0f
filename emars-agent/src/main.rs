//! `emars`: the agent daemon and its command-line client.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use emars_agent::{
    client::{self, Client},
    config::Config,
    model::{AgentInfo, FunctionSummary, HourBucket, InstanceRecord},
};

#[derive(Parser)]
#[command(
    name = "emars",
    version,
    about = "Event-driven memory right-sizing for serverless functions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Address of the agent's API.
    #[arg(
        long,
        env = "EMARS_ADDR",
        default_value = "127.0.0.1:9750",
        global = true
    )]
    addr: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (needs root: it loads eBPF programs).
    Agent {
        /// TOML config; the embedded default is used without one.
        #[arg(long, short)]
        config: Option<PathBuf>,
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
    /// Check a config file and print it with defaults filled in.
    CheckConfig { path: PathBuf },
    /// Print the embedded default config.
    DefaultConfig,
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
    /// Report invocations of a function (for platforms that count requests).
    Invocations {
        name: String,
        count: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMARS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emars: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            config,
            listen,
            store,
            demo,
        } => {
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::embedded_default(),
            };
            if let Some(l) = listen {
                cfg.api.listen = l;
            }
            if let Some(s) = store {
                cfg.store.path = s;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                if demo {
                    emars_agent::demo::spawn(&cfg)?;
                }
                emars_agent::agent::run(cfg, shutdown_signal()).await
            })
        }
        Command::CheckConfig { path } => {
            let cfg = Config::load(&path)?;
            println!(
                "{}",
                toml::to_string_pretty(&cfg).context("printing the config")?
            );
            eprintln!("{}: ok", path.display());
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", emars_agent::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Info(c) => show(&c, "/v1/info", |v| {
            let info: AgentInfo = serde_json::from_value(v)?;
            Ok(client::render_info(&info))
        }),
        Command::Functions(c) => show(&c, "/v1/functions", |v| {
            let list: Vec<FunctionSummary> =
                serde_json::from_value(v.get("functions").cloned().unwrap_or_default())?;
            Ok(client::render_functions(&list))
        }),
        Command::Function { name, client: c } => {
            let api = Client::new(&c.addr);
            let path = format!("/v1/functions/{}", urlencode(&name));
            let summary = api.get(&path)?;
            let instances = api.get(&format!("{path}/instances?limit=20"))?;
            if c.json {
                let both =
                    serde_json::json!({"function": summary, "instances": instances["instances"]});
                println!("{}", serde_json::to_string_pretty(&both)?);
                return Ok(());
            }
            let s: FunctionSummary = serde_json::from_value(summary.clone())?;
            let hours: Vec<HourBucket> =
                serde_json::from_value(summary.get("hours").cloned().unwrap_or_default())?;
            let inst: Vec<InstanceRecord> =
                serde_json::from_value(instances.get("instances").cloned().unwrap_or_default())?;
            print!("{}", client::render_function(&s, &hours, &inst));
            Ok(())
        }
        Command::Export(c) => {
            let v = Client::new(&c.addr).get("/v1/export")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Invocations {
            name,
            count,
            client: c,
        } => {
            let path = format!("/v1/functions/{}/invocations", urlencode(&name));
            let v = Client::new(&c.addr).post(&path, &serde_json::json!({ "count": count }))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

fn show(
    c: &ClientArgs,
    path: &str,
    render: impl FnOnce(serde_json::Value) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let v = Client::new(&c.addr).get(path)?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(v)?);
    }
    Ok(())
}

/// Percent-encodes a path segment (function names are plain, but be safe with user input).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Cannot install handlers: run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
