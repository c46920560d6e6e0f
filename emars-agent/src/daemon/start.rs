//! The daemon's wiring, as the named steps [`run`] takes in order: the memory hierarchy and its
//! watched roots, the store, the eBPF programs, the policy and its writer, reactive mode, the
//! tracker with the effects, recovery of the last run, the API (started by the caller's
//! [`ApiParts`] consumer: the daemon is below the API and never names it); then the event loop;
//! then the shutdown (ring mark, checkpoint, the API joined).

use std::sync::{Arc, RwLock};

use anyhow::Context as _;

use crate::{
    clock::now_ms,
    config::Config,
    kernel::cgroupfs::{mount_table, CgroupfsError, MemoryHierarchy},
    kernel::netcount::{NetCounter, NetHierarchy},
    kernel::notify::{PressureSignal, Signal},
    kernel::probes::{replaced::CarriedRing, Probes},
    kernel::ring::EventRing,
    model::{registry::Registry, tracker::Tracker, AgentInfo, Limits, StoreMovedAside},
    policy::{actuator::Actuator, burst::BurstGuard, squeeze::Squeezer, EnforceMode, Policy},
    store::Store,
};

use super::{
    event_loop::{EventLoop, LoopContext, Sources},
    fleet, host, info,
    pool::PoolCommand,
    recover::{self, LastRun},
    Daemon, Effects,
};

/// The API's thread, joined at shutdown.
pub type ApiThread = std::thread::JoinHandle<std::io::Result<()>>;

/// What the API is handed once the state it serves is ready: the store, the agent's figures,
/// the policy and its writer, and the channels by which it tells the event loop (limits it
/// wrote, pool commands) and learns that the agent stops.
pub struct ApiParts {
    pub store: Store,
    pub info: Arc<RwLock<AgentInfo>>,
    pub policy: Arc<Policy>,
    pub actuator: Arc<Actuator>,
    pub limits_written: tokio::sync::mpsc::UnboundedSender<(u64, Limits)>,
    pub pool: tokio::sync::mpsc::UnboundedSender<PoolCommand>,
    /// Turns true when the agent stops.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Runs the agent until `shutdown` resolves. `start_api` starts the API's threads on the parts
/// it is handed, once recovery is done (its sockets are the caller's to open first, so that the
/// port and the local socket are the agent's from its first moment).
pub async fn run(
    config: Config,
    start_api: impl FnOnce(ApiParts) -> anyhow::Result<ApiThread>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (hierarchy, net, registry) = open_hierarchy(&config)?;
    let roots = registry.roots();
    let (store, store_moved_aside) = open_store(&config)?;
    // Two agents on one root would both write its limits (each with its own store and pins,
    // nothing else stops them): each root is this agent's while it runs.
    let _root_locks = host::lock_roots(&hierarchy, &roots)?;
    // Cgroups created from here on are new instances, whether their mkdir event or the scan
    // reports them first.
    let agent_start_ms = now_ms();
    let (mut probes, mut ring, carried, net_counter) =
        load_probes(&config, &hierarchy, net, &roots)?;
    let info = Arc::new(RwLock::new(info::at_start(
        &hierarchy,
        &roots,
        &probes,
        store_moved_aside,
    )));
    let (actuator, policy) = open_policy(&config, &hierarchy, &roots, &store);
    let (burst, signals) = start_burst_guard(&config, &hierarchy, &actuator, &policy, &store);
    let (squeeze, pressure) = start_squeeze(&config, &hierarchy, &roots, &actuator, &store, &burst);
    let mut tracker = Tracker::new(hierarchy.clone(), registry)
        .with_metadata_wait_ms(config.cgroup.metadata_wait_ms)
        .with_admission(Box::new(store.clone()))
        .with_own_writes(recover::own_writes(&store));
    if let Some(counter) = net_counter {
        tracker = tracker.with_request_counts(Box::new(counter));
    }
    let effects = Effects::new(store.clone())
        .with_policy(policy.clone(), actuator.clone())
        .with_reactive(burst, squeeze);
    let mut daemon = Daemon::new(tracker, effects);
    let last = LastRun {
        probes: &mut probes,
        store: &store,
        carried,
        roots: &roots,
        agent_start_ms,
    };
    recover::recover(&mut daemon, &mut ring, last)?;
    recover::resume_reactive(&mut daemon, &actuator, &hierarchy, &store);
    let _fleet = start_fleet(&config, &store, &policy, &info);
    let (api_limits, pool, stop, parts) = api_parts(&store, &info, &policy, &actuator, shutdown);
    host::raise_fd_limit();
    let api = start_api(parts).context("starting the API's threads")?;
    let ctx = LoopContext {
        probes: &probes,
        info: &info,
        store: &store,
        policy: &policy,
        actuator: &actuator,
        retention: std::time::Duration::from_secs(u64::from(config.store.retention_days) * 86_400),
    };
    let sources = Sources {
        signals,
        pressure,
        api_limits,
        pool,
        stop,
    };
    let result = match EventLoop::new(daemon, ring, ctx) {
        Ok(event_loop) => event_loop.run(sources).await,
        Err(e) => Err(e),
    };
    shut_down(&store, result, api).await
}

/// The memory hierarchy, the cgroup v2 hierarchy the socket program counts requests in (or
/// why none), the rules that name instances, and the watched roots made where they are EMARS's
/// own, in both hierarchies.
fn open_hierarchy(
    config: &Config,
) -> anyhow::Result<(MemoryHierarchy, Result<NetHierarchy, String>, Registry)> {
    let mounts = mount_table()
        .map_err(CgroupfsError::NoMemoryController)
        .context("finding the memory cgroup hierarchy")?;
    let hierarchy =
        MemoryHierarchy::detect_in(&mounts, config.cgroup.mode, config.cgroup.mount.as_deref())
            .context("finding the memory cgroup hierarchy")?;
    let net = NetHierarchy::detect(&hierarchy, &mounts);
    let registry = Registry::new(&config.cgroup.roots).context("compiling cgroup rules")?;
    // The registry keeps the configured roots' order.
    for (root, configured) in registry.roots().iter().zip(&config.cgroup.roots) {
        host::ensure_root(&hierarchy, root, configured.create)?;
        if let Ok(net) = &net {
            host::ensure_net_root(net, root, configured.create);
        }
    }
    Ok((hierarchy, net, registry))
}

/// The store (moved aside when it cannot be opened), with its cap on functions.
fn open_store(config: &Config) -> anyhow::Result<(Store, Option<StoreMovedAside>)> {
    let (store, moved_aside) =
        Store::open_or_move_aside(&config.store.path).context("opening the store")?;
    // Functions the operator names are admitted whatever tenants' names took.
    store.set_function_cap(
        config.store.max_functions,
        config
            .policy
            .functions
            .iter()
            .filter_map(|f| f.name.clone()),
    );
    Ok((store, moved_aside))
}

/// The eBPF programs, attached before the scan of existing cgroups so that none created in
/// between is missed; their ring, the rings of a replaced kernel side, and the reader of the
/// socket program's request counts (None: not counted in the kernel).
fn load_probes(
    config: &Config,
    hierarchy: &MemoryHierarchy,
    net: Result<NetHierarchy, String>,
    roots: &[String],
) -> anyhow::Result<(Probes, EventRing, Vec<CarriedRing>, Option<NetCounter>)> {
    let enforce = config.policy.mode == EnforceMode::Enforce;
    let net_roots = net
        .as_ref()
        .map(|n| n.root_dirs(roots))
        .map_err(Clone::clone);
    let mut probes = Probes::load(hierarchy, &config.probes, roots, &net_roots, enforce)
        .context("loading eBPF programs")?;
    let ring = probes.take_events()?;
    let carried = probes.take_carried();
    let net_counter = match (net, probes.take_net_counts()) {
        (Ok(net), Some(map)) => Some(NetCounter::new(map, net)),
        _ => None,
    };
    for f in &probes.report.fallbacks {
        tracing::warn!("fallback: {f}");
    }
    for n in &probes.report.notes {
        tracing::info!("{n}");
    }
    Ok((probes, ring, carried, net_counter))
}

/// The only writer of limits (audited writes of the last run that were interrupted closed),
/// and the policy with its recommendations ready before the first new instance asks.
fn open_policy(
    config: &Config,
    hierarchy: &MemoryHierarchy,
    roots: &[String],
    store: &Store,
) -> (Arc<Actuator>, Arc<Policy>) {
    let actuator = Arc::new(
        Actuator::new(
            hierarchy.clone(),
            roots,
            config.policy.headroom_bytes,
            config.policy.mode == EnforceMode::Enforce,
            store.clone(),
        )
        .overriding_runtime_limits(config.policy.override_runtime_limits),
    );
    match actuator.close_interrupted() {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!("{n} limit writes of the last run were interrupted (see /v1/audit)")
        }
        Err(e) => tracing::error!("closing interrupted audit records: {e}"),
    }
    let policy = Arc::new(Policy::new(
        config.policy.clone(),
        store.clone(),
        actuator.host_memory(),
    ));
    // A store that cannot be read fully is said, not fatal: the agent still tracks new
    // instances.
    if let Err(e) = policy
        .compute_all(now_ms())
        .and_then(|_| policy.compute_configured(now_ms()))
    {
        tracing::error!("computing recommendations at start-up: {e}");
    }
    tracing::info!("policy mode: {:?}", config.policy.mode);
    (actuator, policy)
}

type Receiver<T> = tokio::sync::mpsc::UnboundedReceiver<T>;

/// Fleet learning (`[fleet]`): the fetcher's own task, stopped when the agent stops (the
/// handle's drop). None when off, said in /v1/info.
fn start_fleet(
    config: &Config,
    store: &Store,
    policy: &Arc<Policy>,
    info: &Arc<RwLock<AgentInfo>>,
) -> Option<AbortOnDrop> {
    let fetcher = fleet::Fetcher::new(
        config.fleet.clone(),
        store.agent_id().to_owned(),
        config.store.max_functions,
        policy.clone(),
        info.clone(),
    )?;
    tracing::info!(
        "fleet learning from {} every {} s",
        config.fleet.shown_url(),
        config.fleet.refresh_s
    );
    Some(AbortOnDrop(tokio::spawn(fetcher.run())))
}

/// A task that ends with its handle.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The burst guard and its kernel signals: on only where writes are allowed.
fn start_burst_guard(
    config: &Config,
    hierarchy: &MemoryHierarchy,
    actuator: &Arc<Actuator>,
    policy: &Arc<Policy>,
    store: &Store,
) -> (Option<BurstGuard>, Option<Receiver<Signal>>) {
    if !config.reactive.guard_on(actuator.writes_allowed()) {
        if config.reactive.enabled == Some(true) {
            tracing::warn!("reactive.enabled needs policy.mode = \"enforce\": burst guard off");
        }
        return (None, None);
    }
    match BurstGuard::new(
        config.reactive.clone(),
        hierarchy.clone(),
        actuator.clone(),
        policy.clone(),
        store.clone(),
    ) {
        Ok((b, rx)) => {
            policy.set_guarded(true);
            (Some(b), Some(rx))
        }
        Err(e) => {
            tracing::error!("reactive mode off: cannot set up the kernel's limit signals: {e}");
            (None, None)
        }
    }
}

/// The squeeze and its pressure signals: it writes holds too, and works on the burst guard's
/// instances (those with limits), so it is on only with the guard.
fn start_squeeze(
    config: &Config,
    hierarchy: &MemoryHierarchy,
    roots: &[String],
    actuator: &Arc<Actuator>,
    store: &Store,
    burst: &Option<BurstGuard>,
) -> (Option<Squeezer>, Option<Receiver<PressureSignal>>) {
    if !(config.reactive.squeeze && burst.is_some()) {
        if config.reactive.squeeze {
            tracing::warn!(
                "reactive.squeeze needs reactive.enabled and policy.mode = \"enforce\": squeeze off"
            );
        }
        return (None, None);
    }
    let dirs: Vec<std::path::PathBuf> = roots.iter().map(|r| hierarchy.dir(r)).collect();
    let (s, rx) = Squeezer::new(
        config.reactive.clone(),
        hierarchy.clone(),
        actuator.clone(),
        store.clone(),
        &dirs,
    );
    (Some(s), Some(rx))
}

/// The parts the API is started on, with the event loop's ends of its channels and the stop
/// signal both share (turned on when `shutdown` resolves).
#[allow(clippy::type_complexity)]
fn api_parts(
    store: &Store,
    info: &Arc<RwLock<AgentInfo>>,
    policy: &Arc<Policy>,
    actuator: &Arc<Actuator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    Receiver<(u64, Limits)>,
    Receiver<PoolCommand>,
    tokio::sync::watch::Receiver<bool>,
    ApiParts,
) {
    let (limits_tx, limits_rx) = tokio::sync::mpsc::unbounded_channel();
    let (pool_tx, pool_rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let parts = ApiParts {
        store: store.clone(),
        info: info.clone(),
        policy: policy.clone(),
        actuator: actuator.clone(),
        limits_written: limits_tx,
        pool: pool_tx,
        stop: stop_rx.clone(),
    };
    (limits_rx, pool_rx, stop_rx, parts)
}

/// After the loop: the ring position noted (the next start loads the live model from here
/// instead of scanning every record), the store's checkpoint written, the ring's room given
/// back once saved, the API's threads joined.
async fn shut_down(
    store: &Store,
    result: anyhow::Result<(Daemon, EventRing)>,
    api_thread: ApiThread,
) -> anyhow::Result<()> {
    if let Ok((_, r)) = &result {
        if let Err(e) = store.set_ring_mark(r.identity(), r.position()) {
            tracing::error!("noting the ring position in the store: {e}");
        }
    }
    let saved = store.checkpoint();
    if let Err(e) = &saved {
        tracing::error!("writing the store's checkpoint: {e}");
    }
    let result = result.map(|(daemon, mut ring)| {
        if daemon.decode_errors > 0 {
            tracing::warn!("{} undecodable event records", daemon.decode_errors);
        }
        // Saved: the kernel may reuse the room of everything read. (Unsaved, a pinned ring
        // keeps it for the next agent.)
        if saved.is_ok() {
            ring.commit(ring.position());
        }
    });
    match tokio::task::spawn_blocking(move || api_thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!("API server: {e}"),
        Ok(Err(_)) => tracing::error!("API thread panicked"),
        Err(e) => tracing::error!("API thread: {e}"),
    }
    result
}
