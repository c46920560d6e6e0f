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
    /// The agent's write token (api.token_file), read when this user may (root); writes need it.
    #[arg(
        long,
        env = "EMARS_TOKEN_FILE",
        default_value = emars_agent::config::DEFAULT_TOKEN_FILE,
        global = true
    )]
    token_file: PathBuf,
}

impl ClientArgs {
    fn client(&self) -> Client {
        Client::new(&self.addr).with_token_file(&self.token_file)
    }
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
        /// memory.max / memory.limit_in_bytes, bytes.
        #[arg(long)]
        max: Option<u64>,
        /// memory.high / memory.soft_limit_in_bytes, bytes.
        #[arg(long)]
        high: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
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
            // The overrides obey the same rules as the file (a non-loopback --listen needs
            // api.allow_remote, a relative --store is refused).
            cfg.validate()?;
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
            let api = c.client();
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
            let v = c.client().get("/v1/export")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Recommend {
            function,
            generate,
            client: c,
        } => {
            let api = c.client();
            let v = match (&function, generate) {
                (_, true) => api.post("/v1/recommendations/generate", &serde_json::json!({}))?,
                (Some(f), false) => {
                    api.get(&format!("/v1/functions/{}/recommendation", urlencode(f)))?
                }
                (None, false) => api.get("/v1/recommendations")?,
            };
            if c.json || generate {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list = match v.get("recommendations") {
                    Some(l) => l.as_array().cloned().unwrap_or_default(),
                    None => vec![v.clone()],
                };
                print!("{}", render_recommendations(&list, function.is_some()));
            }
            Ok(())
        }
        Command::Apply(c) => {
            let v = c.client().post("/v1/apply", &serde_json::json!({}))?;
            print_audit(&v["writes"], c.json)
        }
        Command::Audit { limit, client: c } => {
            let v = c.client().get(&format!("/v1/audit?limit={limit}"))?;
            print_audit(&v["audit"], c.json)
        }
        Command::Generations {
            function,
            limit,
            client: c,
        } => {
            let mut path = format!("/v1/generations?limit={limit}");
            if let Some(f) = &function {
                path.push_str(&format!("&function={}", urlencode(f)));
            }
            let v = c.client().get(&path)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::SetLimit {
            function,
            instance,
            max,
            high,
            client: c,
        } => {
            let path = format!(
                "/v1/functions/{}/instances/{}/limits",
                urlencode(&function),
                urlencode(&instance)
            );
            let body = serde_json::json!({"max_bytes": max, "high_bytes": high});
            let v = c.client().post(&path, &body)?;
            print_audit(&serde_json::json!([v]), c.json)
        }
        Command::Invocations {
            name,
            count,
            client: c,
        } => {
            let path = format!("/v1/functions/{}/invocations", urlencode(&name));
            let v = c
                .client()
                .post(&path, &serde_json::json!({ "count": count }))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

fn render_recommendations(list: &[serde_json::Value], detail: bool) -> String {
    use client::human_bytes;
    let b = |v: &serde_json::Value| human_bytes(v.as_u64().unwrap_or(0));
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>5} {:>4} {:>7}\n",
        "FUNCTION", "MAX", "HIGH", "P(PCT)", "SAMPLES", "OOM", "CONF", "PINNED"
    );
    for r in list {
        out.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>10} {:>8} {:>5} {:>4.2} {:>7}\n",
            r["function"].as_str().unwrap_or("?"),
            b(&r["max_bytes"]),
            b(&r["high_bytes"]),
            b(&r["percentile_bytes"]),
            r["samples"].as_u64().unwrap_or(0),
            r["oom_kills"].as_u64().unwrap_or(0),
            r["confidence"].as_f64().unwrap_or(0.0),
            if r["pinned"] == true { "yes" } else { "no" },
        ));
    }
    if detail {
        if let Some(r) = list.first() {
            out.push_str(&format!(
                "\nP{:.0} of instance peaks = {}, + margin {:.2} → max {}; high = max x fraction, not \
                 below the median peak ({}); OOM bump: {}; clamped by: {}; half-life {} h\n",
                r["percentile"].as_f64().unwrap_or(0.0),
                b(&r["percentile_bytes"]),
                r["margin"].as_f64().unwrap_or(0.0),
                b(&r["max_bytes"]),
                b(&r["p50_bytes"]),
                r["oom_bump_bytes"]
                    .as_u64()
                    .map_or("none".into(), human_bytes),
                r["clamped_by"].as_str().unwrap_or("nothing"),
                r["half_life_hours"],
            ));
        }
    }
    out
}

fn print_audit(list: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    let lim = |v: &serde_json::Value| {
        v.as_u64()
            .map_or_else(|| "-".to_owned(), client::human_bytes)
    };
    println!(
        "{:<20} {:<16} {:<14} {:<12} {:>10} {:>10} {:>10} {:>10} {:>8}  OUTCOME",
        "TIME",
        "FUNCTION",
        "INSTANCE",
        "REASON",
        "OLD MAX",
        "NEW MAX",
        "OLD HIGH",
        "NEW HIGH",
        "DELAY"
    );
    for a in list.as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<16} {:<14} {:<12} {:>10} {:>10} {:>10} {:>10} {:>8}  {}",
            client::format_time_ms(a["at_ms"].as_u64().unwrap_or(0)),
            a["function"].as_str().unwrap_or("?"),
            a["instance"].as_str().unwrap_or("?"),
            a["reason"].as_str().unwrap_or("?"),
            lim(&a["old"]["max_bytes"]),
            lim(&a["new"]["max_bytes"]),
            lim(&a["old"]["high_bytes"]),
            lim(&a["new"]["high_bytes"]),
            a["delay_us"]
                .as_u64()
                .map_or("-".into(), |d| format!("{d}us")),
            a["outcome"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn show(
    c: &ClientArgs,
    path: &str,
    render: impl FnOnce(serde_json::Value) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let v = c.client().get(path)?;
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
