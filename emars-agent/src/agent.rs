//! The daemon: start-up (hierarchy, probes, scan of existing cgroups, store reconciliation),
//! then the event loop, the API server and housekeeping, until a signal stops it.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;

use crate::{
    api::{
        self, guard::Guard, listen::Inherited, server::Bounds, token::Token, ApiState, Predictive,
    },
    clock::{now_ms, wall_ms_of},
    config::Config,
    kernel::cgroupfs::{self, CgroupVersion, MemoryHierarchy},
    kernel::events,
    kernel::notify::{PressureSignal, Signal},
    kernel::probes::{replaced::CarriedRing, Probes},
    kernel::ring::EventRing,
    model::registry::Registry,
    model::tracker::{gone_in_batch, mkdirs_first, Effect, Found, Tracker},
    model::{AgentInfo, InstanceRecord, Limits},
    policy::actuator::Actuator,
    policy::burst::{BurstGuard, Origin},
    policy::enforcer::Enforcer,
    policy::squeeze::{release_kept_holds, Squeezer},
    policy::Policy,
    store::Store,
};

/// Runs the agent until `shutdown` resolves. `inherited`: the API sockets a service manager
/// handed over ([`Inherited::take_from_env`], taken before any thread started).
pub async fn run(
    config: Config,
    inherited: Inherited,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The API's sockets first, before anything slow: the port and the local socket are the
    // agent's from its first moment (connections wait in the backlog until it serves).
    for ignored in &inherited.ignored {
        tracing::warn!(
            "socket activation: {ignored} is not a stream socket the API serves: ignored"
        );
    }
    let listeners =
        api::listen::open(&config.api, inherited).context("opening the API's sockets")?;
    let hierarchy = MemoryHierarchy::detect(config.cgroup.mode, config.cgroup.mount.as_deref())
        .context("finding the memory cgroup hierarchy")?;
    let registry = Registry::new(&config.cgroup.roots).context("compiling cgroup rules")?;
    let roots = registry.roots();
    // The registry keeps the configured roots' order.
    for (root, configured) in roots.iter().zip(&config.cgroup.roots) {
        ensure_root(&hierarchy, root, configured.create)?;
    }
    let (store, store_moved_aside) =
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

    // Two agents on one root would both write its limits (each with its own store and pins,
    // nothing else stops them): each root is this agent's while it runs.
    let _root_locks = lock_roots(&hierarchy, &roots)?;

    // Cgroups created from here on are new instances, whether their mkdir event or the scan
    // below reports them first.
    let agent_start_ms = now_ms();
    // Attach before scanning, so no cgroup created in between is missed.
    let mut probes = Probes::load(
        &hierarchy,
        &config.probes,
        &roots,
        config.policy.mode == crate::config::EnforceMode::Enforce,
    )
    .context("loading eBPF programs")?;
    let mut ring = probes.take_events()?;
    let mut carried = probes.take_carried();

    let info = Arc::new(RwLock::new(AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        kernel: kernel_release(),
        cgroup_mode: hierarchy.version.as_str().into(),
        memory_hierarchy: hierarchy.mount.display().to_string(),
        roots: roots
            .iter()
            .map(|r| hierarchy.dir(r).display().to_string())
            .collect(),
        features: probes.report.features.clone(),
        programs: probes.report.programs.clone(),
        fallbacks: probes.report.fallbacks.clone(),
        notes: probes.report.notes.clone(),
        events_received: 0,
        events_lost: 0,
        instances_reconciled: 0,
        container_metadata: Default::default(),
        cgroups_unnamed: Default::default(),
        started_at_ms: now_ms(),
        enforcement: Default::default(),
        kernel_counters: Default::default(),
        probes_pinned: probes.report.pinned.clone(),
        probes_adopted: probes.report.adopted,
        probes_unpinned: probes.report.unpinned.clone(),
        model: Default::default(),
        reactive: Default::default(),
        per_use_peak: per_use_peak_method(&hierarchy, &roots),
        function_cap: Default::default(),
        store_moved_aside,
    }));
    for f in &probes.report.fallbacks {
        tracing::warn!("fallback: {f}");
    }
    for n in &probes.report.notes {
        tracing::info!("{n}");
    }

    let actuator = Arc::new(
        Actuator::new(
            hierarchy.clone(),
            &roots,
            config.policy.headroom_bytes,
            config.policy.mode == crate::config::EnforceMode::Enforce,
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
    // Recommendations are ready before the first new instance can ask for them. A store that
    // cannot be read fully is said, not fatal: the agent still tracks new instances.
    if let Err(e) = policy
        .compute_all(now_ms())
        .and_then(|_| policy.compute_configured(now_ms()))
    {
        tracing::error!("computing recommendations at start-up: {e}");
    }
    tracing::info!("policy mode: {:?}", config.policy.mode);
    // The burst guard writes limits: on only where writes are allowed.
    let burst = if config.reactive.enabled && actuator.writes_allowed() {
        match BurstGuard::new(
            config.reactive.clone(),
            hierarchy.clone(),
            actuator.clone(),
            policy.clone(),
            store.clone(),
        ) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!("reactive mode off: cannot set up the kernel's limit signals: {e}");
                None
            }
        }
    } else {
        if config.reactive.enabled {
            tracing::warn!("reactive.enabled needs policy.mode = \"enforce\": burst guard off");
        }
        None
    };
    // The squeeze writes holds too, and works on the burst guard's instances (those with
    // limits): on only with it.
    let squeeze = if config.reactive.squeeze && burst.is_some() {
        let dirs: Vec<std::path::PathBuf> = roots.iter().map(|r| hierarchy.dir(r)).collect();
        Some(Squeezer::new(
            config.reactive.clone(),
            hierarchy.clone(),
            actuator.clone(),
            store.clone(),
            &dirs,
        ))
    } else {
        if config.reactive.squeeze {
            tracing::warn!(
                "reactive.squeeze needs reactive.enabled and policy.mode = \"enforce\": squeeze off"
            );
        }
        None
    };
    let mut tracker = Tracker::new(hierarchy.clone(), registry)
        .with_metadata_wait_ms(config.cgroup.metadata_wait_ms)
        .with_admission(Box::new(store.clone()))
        .with_own_writes(own_writes(&store));
    let mut enforcer = Enforcer::new(store.clone())
        .with_policy(policy.clone(), actuator.clone())
        .tracking_limits(burst.is_some());
    let mut stale = store.live_instances().unwrap_or_else(|e| {
        tracing::error!("reading the live instances of the last run: {e}");
        Vec::new()
    });
    let mut decode_errors = 0u64;
    // Records the last run read, applied and saved, but was killed before giving back.
    let mark = store.ring_mark();
    let applied_in = |ring: &EventRing| {
        mark.as_ref()
            .filter(|(id, _)| id == ring.identity())
            .map_or(0, |(_, pos)| *pos)
    };
    let recorded_meanwhile = probes.adopted() || !carried.is_empty();
    if recorded_meanwhile {
        // The kernel side kept recording while no agent ran: the last run's live instances
        // first, then what the ring holds (their ends with exact peaks, instances that came
        // and went meanwhile), then the scan finds only what neither knows.
        resume(&mut tracker, &mut enforcer, std::mem::take(&mut stale));
    }
    // A replaced kernel side's records (another ring size, another probes.disable...): the
    // older, before anything of the new one.
    for c in &mut carried {
        let applied = applied_in(&c.ring);
        let n = drain_ring_after(
            &mut c.ring,
            &mut tracker,
            &mut enforcer,
            &mut decode_errors,
            applied,
        );
        tracing::info!(
            "read {n} events the replaced kernel side {} queued while no agent ran",
            c.set
        );
    }
    if probes.adopted() {
        let applied = applied_in(&ring);
        let n = drain_ring_after(
            &mut ring,
            &mut tracker,
            &mut enforcer,
            &mut decode_errors,
            applied,
        );
        tracing::info!("read {n} events queued while no agent ran");
    }
    scan_existing(
        &mut tracker,
        &mut enforcer,
        &mut probes,
        stale,
        &roots,
        agent_start_ms,
    )?;
    if recorded_meanwhile {
        // What came in while the queue was applied and the scan ran first: reconciliation must
        // not close an instance whose exact end waits in the ring (seen with churn through a
        // restart: ended with no peak, then recorded again from its rmdir).
        drain_until_quiet(&mut ring, &mut tracker, &mut enforcer, &mut decode_errors);
        // Resumed instances whose cgroup is gone with no rmdir in the ring (it overflowed).
        let effects = tracker.reconcile(now_ms());
        enforcer.run(&mut tracker, effects);
        save_recorded_meanwhile(&probes, &store, carried, &mut ring);
    }
    // The last run's reactive state, now that the live instances are known: its instances
    // guarded again, its squeeze holds taken back (or released, with the squeeze off).
    let mut burst = burst;
    let mut squeeze = squeeze;
    if let Some((b, _)) = burst.as_mut() {
        b.rearm(&mut tracker, &mut enforcer);
    }
    match squeeze.as_mut() {
        Some((s, _)) => s.adopt(&tracker),
        None => release_kept_holds(&actuator, &hierarchy, &store, &tracker),
    }

    // Limits the API writes (apply, set-limit): the event loop keeps records and watches in step.
    let (limits_tx, limits_rx) = tokio::sync::mpsc::unbounded_channel();
    let (pool_tx, pool_rx) = tokio::sync::mpsc::unbounded_channel();
    let token = Token::load_or_create(&config.api.token_file)?;
    raise_fd_limit();
    let local = listeners
        .tcp
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .context("the API's TCP address")?
        .unwrap_or(config.api.listen);
    tracing::info!("API listening on http://{local}");
    match &listeners.local {
        Some((_, Some(path), _)) => tracing::info!("API socket at {}", path.display()),
        Some((_, None, _)) => tracing::info!("API socket handed over (no path)"),
        None => tracing::info!("API socket off (api.socket is empty): the CLI needs --addr"),
    }
    if listeners.inherited {
        tracing::info!("API sockets handed over by the service manager (socket activation)");
    }
    let guard = Arc::new(Guard::new(token, local, &config.api.allowed_hosts));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_state = ApiState {
        store: store.clone(),
        info: info.clone(),
        predictive: Some(Predictive {
            policy: policy.clone(),
            actuator: actuator.clone(),
            reactive: config.reactive.clone(),
            limits_written: Some(limits_tx),
            admissions: Default::default(),
        }),
        retention_ms: u64::from(config.store.retention_days) * 86_400_000,
        pool: Some(pool_tx),
        snapshots: Default::default(),
    };
    let mut api_stop = stop_rx.clone();
    let api_thread = api::spawn(listeners, api_state, guard, Bounds::default(), async move {
        let _ = api_stop.changed().await;
    })
    .context("starting the API's threads")?;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let retention = Duration::from_secs(u64::from(config.store.retention_days) * 86_400);
    let ctx = LoopContext {
        probes: &probes,
        info: &info,
        store: &store,
        policy: &policy,
        actuator: &actuator,
        retention,
    };
    let result = event_loop(
        ring,
        &mut tracker,
        &mut enforcer,
        LimitInputs {
            burst,
            squeeze,
            api_limits: limits_rx,
            pool: pool_rx,
        },
        &ctx,
        stop_rx,
        &mut decode_errors,
    )
    .await;
    // The next start loads the live model from here instead of scanning every record.
    if let Ok(r) = &result {
        if let Err(e) = store.set_ring_mark(r.identity(), r.position()) {
            tracing::error!("noting the ring position in the store: {e}");
        }
    }
    let saved = store.checkpoint();
    if let Err(e) = &saved {
        tracing::error!("writing the store's checkpoint: {e}");
    }
    if decode_errors > 0 {
        tracing::warn!("{decode_errors} undecodable event records");
    }
    let result = result.map(|mut ring| {
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

/// How this kernel measures one use of a pooled cgroup. v2: a per-descriptor reset of a
/// watched root's memory.peak, which changes nothing for any other reader; v1 is known
/// without trying (its reset would clear the root's own watermark).
fn per_use_peak_method(hierarchy: &MemoryHierarchy, roots: &[String]) -> String {
    use crate::kernel::cgroupfs::{CgroupVersion, UsePeak};
    match hierarchy.version {
        CgroupVersion::V1 => UsePeak::V1.method().to_owned(),
        CgroupVersion::V2 => roots
            .iter()
            .find_map(|r| hierarchy.open_root(r).and_then(|d| d.reset_peak()).ok())
            .map(|p| p.method().to_owned())
            .unwrap_or_default(),
    }
}

/// Carries out a bind or release and answers it.
fn on_pool_command(
    cmd: crate::api::PoolCommand,
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    actuator: &Actuator,
) {
    use crate::api::PoolCommand;
    // The request may name the directory or the path below the hierarchy.
    let rel = |cgroup: &str| {
        tracker
            .cgroups()
            .rel_path(std::path::Path::new(cgroup))
            .unwrap_or_else(|| cgroup.trim_end_matches('/').to_owned())
    };
    match cmd {
        PoolCommand::Bind { body, reply } => {
            let path = rel(&body.cgroup);
            // The cgroup the bind is asked for: the reset goes only into this one.
            let id = cgroupfs::cgroup_id(&tracker.cgroups().dir(&path)).unwrap_or(0);
            let _ = reply.send(bind_pooled(tracker, enforcer, actuator, &path, id, &body));
        }
        PoolCommand::Release { body, reply } => {
            let answer = tracker
                .release(&rel(&body.cgroup), now_ms())
                .map(|(rec, effects)| {
                    enforcer.run(tracker, effects);
                    rec
                });
            let _ = reply.send(answer);
        }
    }
}

/// POST /v1/bind, carried out: `rel_path` (below the hierarchy) starts serving the body's
/// function as its instance, provided it is still the cgroup `cgroup_id` read when the bind was
/// asked for. The watermark reset is audited before it happens (reason `bind`, then `ok`, or
/// `refused` with why), and made through the cgroup's directory opened below its root and
/// checked against that id, as limit writes are.
pub fn bind_pooled(
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    actuator: &Actuator,
    rel_path: &str,
    cgroup_id: u64,
    body: &crate::api::wire::BindBody,
) -> Result<InstanceRecord, crate::api::BindError> {
    let dir = tracker.cgroups().dir(rel_path);
    let intent = InstanceRecord {
        function: body.function.clone(),
        instance: body.instance.clone(),
        cgroup_id,
        cgroup_path: dir.display().to_string(),
        started_at_ms: now_ms(),
        ended_at_ms: None,
        execs: 0,
        peak_bytes: 0,
        peak_source: Default::default(),
        oom_kills: 0,
        limits: tracker.cgroups().limits(&dir).unwrap_or_default(),
    };
    let bound = actuator
        .audited(&intent, "bind", || {
            tracker.bind(
                rel_path,
                cgroup_id,
                &body.function,
                &body.instance,
                now_ms(),
            )
        })
        .map_err(|e| {
            tracing::error!("bind not made: {e}");
            crate::api::BindError::Unavailable(e.to_string())
        })?;
    let (id, effects) = bound?;
    enforcer.run(tracker, effects);
    tracker
        .live_record(id)
        .cloned()
        .ok_or_else(|| crate::api::BindError::NotFound {
            path: body.cgroup.clone(),
        })
}

/// Where limits change besides new instances: the burst guard with its kernel signals (when
/// reactive mode is on), and the limits the API wrote.
struct LimitInputs {
    burst: Option<(BurstGuard, tokio::sync::mpsc::UnboundedReceiver<Signal>)>,
    squeeze: Option<(
        Squeezer,
        tokio::sync::mpsc::UnboundedReceiver<PressureSignal>,
    )>,
    api_limits: tokio::sync::mpsc::UnboundedReceiver<(u64, Limits)>,
    /// Binds and releases of pooled cgroups (POST /v1/bind, /v1/release).
    pool: tokio::sync::mpsc::UnboundedReceiver<crate::api::PoolCommand>,
}

/// What the event loop reads besides the ring buffer.
struct LoopContext<'a> {
    probes: &'a Probes,
    info: &'a RwLock<AgentInfo>,
    store: &'a Store,
    policy: &'a Arc<Policy>,
    actuator: &'a Actuator,
    retention: Duration,
}

/// Runs until `stop`; returns the ring, read to the end, for the caller to commit once the
/// store is saved.
async fn event_loop(
    ring: EventRing,
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    inputs: LimitInputs,
    ctx: &LoopContext<'_>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    decode_errors: &mut u64,
) -> anyhow::Result<EventRing> {
    let LoopContext {
        probes,
        info,
        store,
        policy,
        actuator,
        retention,
    } = *ctx;
    // The last generation survives restarts: a daily period is not reset by a restart.
    let mut last_generation_ms = store
        .generations::<crate::policy::Generation>(1)
        .ok()
        .and_then(|g| g.first().map(|g| g.generated_at_ms))
        .unwrap_or(0);
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut drain = tokio::time::interval(RING_DRAIN);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
    let mut ticks = 0u64;
    let mut last_flush = std::time::Instant::now();
    // The store flush under way and the ring position it makes durable.
    let mut flushing: Option<(
        u64,
        tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
    )> = None;
    let policy_handle = policy.clone();
    let LimitInputs {
        burst,
        squeeze,
        mut api_limits,
        mut pool,
    } = inputs;
    let (mut burst, mut signals) = match burst {
        Some((b, rx)) => (Some(b), Some(rx)),
        None => (None, None),
    };
    let (mut squeeze, mut pressure) = match squeeze {
        Some((s, rx)) => (Some(s), Some(rx)),
        None => (None, None),
    };
    let candidates =
        |b: &Option<BurstGuard>| b.as_ref().map(|b| b.watched_ids()).unwrap_or_default();
    loop {
        if let Some(b) = burst.as_mut() {
            b.sync(enforcer, tracker);
        }
        tokio::select! {
            // An instance nears its memory.max: before anything else.
            biased;
            Some(sig) = async {
                match signals.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                // Rmdirs and new limits read first: the signal may be for either.
                drain_ring(ring.get_mut(), tracker, enforcer, decode_errors);
                // A squeezed instance that crossed its hold woke up: its hold goes first,
                // then the burst guard judges it by the limits it really has.
                if let Some(s) = squeeze.as_mut() {
                    s.release(sig.cgroup_id, tracker, "the instance crossed its hold (memory.events)");
                }
                if let Some(b) = burst.as_mut() {
                    b.sync(enforcer, tracker);
                    b.on_signal(sig, tracker, enforcer);
                }
            }
            // The host or a watched root is under memory pressure.
            Some(sig) = async {
                match pressure.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                drain_ring(ring.get_mut(), tracker, enforcer, decode_errors);
                if let Some(b) = burst.as_mut() {
                    b.sync(enforcer, tracker);
                }
                let ids = candidates(&burst);
                if let Some(s) = squeeze.as_mut() {
                    s.on_pressure(sig, &ids, tracker);
                }
            }
            done = async {
                match squeeze.as_mut() {
                    Some(s) => s.squeezed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(s) = squeeze.as_mut() {
                    s.record(done, tracker);
                }
            }
            // Limits the API wrote into a live instance: its record keeps them, and the burst
            // guard watches it at its new early-warning point, with a ceiling on the new base.
            Some((id, limits)) = api_limits.recv() => {
                let effects = tracker.limits_changed(id, limits);
                enforcer.run(tracker, effects);
                if let Some(b) = burst.as_mut() {
                    b.watch_instance(tracker, enforcer, id, limits, Origin::Explicit);
                }
            }
            // A platform binds or releases a pooled cgroup: mkdirs and rmdirs read first.
            Some(cmd) = pool.recv() => {
                drain_ring(ring.get_mut(), tracker, enforcer, decode_errors);
                on_pool_command(cmd, tracker, enforcer, actuator);
                if let Some(b) = burst.as_mut() {
                    b.sync(enforcer, tracker);
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for kernel events")?;
                drain_ring(guard.get_inner_mut(), tracker, enforcer, decode_errors);
                guard.clear_ready();
            }
            // Events that do not wake the agent (exec, exit, attach, peak steps) are read
            // here, or with the next one that does.
            _ = drain.tick() => {
                drain_ring(ring.get_mut(), tracker, enforcer, decode_errors);
            }
            _ = tick.tick() => {
                if let Some(s) = squeeze.as_mut() {
                    let ids = candidates(&burst);
                    s.tick(&ids, tracker, std::time::Instant::now());
                }
                let now = now_ms();
                let effects = tracker.settle_pending(now);
                enforcer.run(tracker, effects);
                let effects = tracker.recompute_dirty(now);
                enforcer.run(tracker, effects);
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    // Rmdir events still in the ring first: reconciliation must not close an
                    // instance whose exact end is waiting there.
                    drain_until_quiet(ring.get_mut(), tracker, enforcer, decode_errors);
                    let effects = tracker.reconcile(now);
                    enforcer.run(tracker, effects);
                }
                let lost = probes.events_lost();
                // Not waiting for the lock: a reader on a (lower-priority) API thread may hold
                // it, and this loop must not queue behind the API; the next tick updates.
                if let Ok(mut i) = info.try_write() {
                    if lost > i.events_lost {
                        tracing::warn!("{} kernel events lost (ring buffer full)", lost - i.events_lost);
                    }
                    i.events_received = tracker.stats.events;
                    i.events_lost = lost;
                    i.instances_reconciled = tracker.stats.reconciled;
                    i.container_metadata = crate::model::MetadataInfo {
                        waiting: tracker.pending_count() as u64,
                        waited: tracker.stats.metadata_waits,
                        named_after_wait: tracker.stats.metadata_named,
                        fallbacks: tracker.stats.metadata_fallbacks,
                    };
                    i.cgroups_unnamed = tracker
                        .stats
                        .unnamed_by_reason()
                        .map(|(why, n)| (why.as_str().to_owned(), n))
                        .collect();
                    i.kernel_counters = crate::model::KernelCounters {
                        paths_truncated: tracker.stats.paths_truncated,
                        paths_unresolved: tracker.stats.paths_unresolved,
                        ..probes.kernel_counters()
                    };
                    i.programs = probes.program_stats();
                    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                    if let Some(b) = burst.as_ref() {
                        b.fill_info(&mut i.reactive);
                    }
                    if let Some(s) = squeeze.as_ref() {
                        s.fill_info(&mut i.reactive);
                    }
                    i.enforcement = crate::model::EnforcementInfo {
                        mode: format!("{:?}", policy.mode()).to_lowercase(),
                        new_instance_writes: enforcer.stats.enforced,
                        writes_ok: load(&actuator.stats.writes_ok),
                        unchanged: load(&actuator.stats.unchanged),
                        writes_failed: load(&actuator.stats.writes_failed),
                        refusals: load(&actuator.stats.refusals),
                        audit_errors: load(&actuator.stats.audit_errors),
                        max_mkdir_to_write_us: enforcer.stats.max_enforce_delay_us,
                    };
                }
                // Whole-store work runs off the event loop, which must keep draining the ring.
                if now.saturating_sub(last_generation_ms) >= policy.period().as_millis() as u64 {
                    last_generation_ms = now;
                    let p = policy_handle.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = p.generate("period", now) {
                            tracing::error!("generating the per-function config: {e}");
                        }
                    });
                }
                if last_prune.elapsed() >= Duration::from_secs(3600) {
                    last_prune = std::time::Instant::now();
                    let st = store.clone();
                    tokio::task::spawn_blocking(move || match st.prune(now, retention) {
                        Ok(r) => tracing::debug!(?r, "retention"),
                        Err(e) => tracing::error!("retention: {e}"),
                    });
                }
            }
            // The records read before this flush began are durable now: their room goes back
            // to the kernel. Until then a pinned ring keeps them for the next agent, should
            // this one be killed.
            flushed = async {
                match flushing.as_mut() {
                    Some((_, h)) => h.await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((pos, _)) = flushing.take() {
                    match flushed {
                        Ok(Ok(())) => {}
                        // Holding the records back would fill the ring and lose new events:
                        // they go back to the kernel all the same.
                        Ok(Err(e)) => tracing::error!("flushing the store: {e}"),
                        Err(e) => tracing::error!("store flush task: {e}"),
                    }
                    ring.get_mut().commit(pos);
                }
            }
            _ = stop.changed() => break,
        }
        // One flush a second (sooner if a quarter of the ring waits on it), for everything
        // written meanwhile (sled has no flusher of its own here), which also empties the
        // audit journal: each is a device cache flush, and an audit record's O_DSYNC write
        // that meets one waits for it (measured: the mkdir-to-limits p99 went from 6.5 to 11
        // ms with a flush per read). So it waits for a pause in new instances, up to 5 s.
        let r = ring.get_ref();
        let due = last_flush.elapsed();
        let quiet = enforcer
            .stats
            .last_enforce
            .is_none_or(|t| t.elapsed() >= FLUSH_QUIET);
        if flushing.is_none()
            && ((due >= COMMIT_EVERY && quiet)
                || due >= COMMIT_EVERY_AT_MOST
                || r.uncommitted() > r.size() / 4)
        {
            last_flush = std::time::Instant::now();
            let pos = r.position();
            // Durable with the effects it vouches for, or not at all.
            if let Err(e) = store.set_ring_mark(r.identity(), pos) {
                tracing::error!("noting the ring position in the store: {e}");
            }
            let st = store.clone();
            flushing = Some((pos, tokio::task::spawn_blocking(move || st.flush())));
        }
    }
    if let Some((_, h)) = flushing.take() {
        let _ = h.await;
    }
    // What came in since the last drain: recorded now, saved by the caller's checkpoint.
    let mut ring = ring.into_inner();
    drain_ring(&mut ring, tracker, enforcer, decode_errors);
    Ok(ring)
}

/// How often records read from the ring are made durable (a flush of the store) and their room
/// given back to the kernel: once a second, in a pause of this long after the last limits
/// written into a new instance, and at the latest after 5 s.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
const FLUSH_QUIET: Duration = Duration::from_millis(50);
const COMMIT_EVERY_AT_MOST: Duration = Duration::from_secs(5);

/// How often the agent reads the ring buffer without being woken: the bound on how late an
/// exec, exit, peak step, rmdir or (in observe mode) mkdir is seen; OOM kills, and mkdirs in
/// enforce mode, wake it at once.
const RING_DRAIN: Duration = Duration::from_millis(100);

/// Applies every record waiting in the ring buffer (without giving their room back: see
/// [`EventRing`]); returns how many were read.
fn drain_ring(
    ring: &mut EventRing,
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    decode_errors: &mut u64,
) -> usize {
    drain_ring_after(ring, tracker, enforcer, decode_errors, 0)
}

/// Drains the ring until a read finds nothing (a few reads at most): applying a batch takes
/// time (limit writes), in which instances may end; reconciliation, which comes next, must find
/// their rmdirs applied, not take them for lost events.
fn drain_until_quiet(
    ring: &mut EventRing,
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    decode_errors: &mut u64,
) {
    for _ in 0..8 {
        if drain_ring(ring, tracker, enforcer, decode_errors) == 0 {
            break;
        }
    }
}

/// The same, skipping the records before ring position `applied`: read by an agent that was
/// killed after its store had saved their effects, before it gave their room back.
fn drain_ring_after(
    ring: &mut EventRing,
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    decode_errors: &mut u64,
    applied: u64,
) -> usize {
    let mut batch = Vec::new();
    let n = ring.read(|end, rec| match events::decode(rec) {
        Ok(_) if end <= applied => {}
        Ok(t) => batch.push(t),
        Err(e) => {
            *decode_errors += 1;
            tracing::error!("bad event record: {e}");
        }
    });
    if !batch.is_empty() {
        tracing::trace!(events = batch.len(), "batch");
    }
    let gone = gone_in_batch(&batch);
    for t in mkdirs_first(batch) {
        let came_and_went = matches!(t.event, events::KernelEvent::CgroupMkdir { id, .. }
            if gone.contains(&(id, t.ts_ns)));
        let mut effects = tracker.apply(t.event, wall_ms_of(t.ts_ns), t.ts_ns);
        if came_and_went {
            effects.retain(|e| !matches!(e, Effect::Enforce { .. }));
        }
        enforcer.run(tracker, effects);
    }
    n
}

/// Saves at once what start-up applied from the rings (a replaced kernel side's, then the
/// adopted one's), each with its ring mark, and gives their room back; then unpins the
/// replaced sets. Until then a restart finds them and reads them again, skipping what the ring
/// mark says was saved: an agent killed moments after its start would otherwise apply the same
/// events twice.
fn save_recorded_meanwhile(
    probes: &Probes,
    store: &Store,
    carried: Vec<CarriedRing>,
    ring: &mut EventRing,
) {
    let save = |ring: &EventRing| {
        store
            .set_ring_mark(ring.identity(), ring.position())
            .and_then(|()| store.flush())
    };
    for mut c in carried {
        match save(&c.ring) {
            Ok(()) => {
                c.ring.commit(c.ring.position());
                probes.release_carried(&c.set);
            }
            // Kept pinned: the next start reads it again.
            Err(e) => tracing::error!(
                "saving the events of the replaced kernel side {}: {e}; it stays pinned",
                c.set
            ),
        }
    }
    match save(ring) {
        Ok(()) => ring.commit(ring.position()),
        Err(e) => tracing::error!("saving the events queued while no agent ran: {e}"),
    }
}

/// Puts the last run's live instances back into the tracker as they were saved, before the
/// events queued meanwhile are applied to them.
fn resume(tracker: &mut Tracker, enforcer: &mut Enforcer, stale: Vec<InstanceRecord>) {
    for rec in stale {
        let Some(rel) = tracker.cgroups().rel_path(Path::new(&rec.cgroup_path)) else {
            continue;
        };
        let (id, started) = (rec.cgroup_id, rec.started_at_ms);
        let effects = tracker.add_cgroup(
            id,
            &rel,
            started,
            Some(rec),
            Found::Existing {
                new_since_start: false,
            },
        );
        enforcer.run(tracker, effects);
    }
}

/// Audit records read at start-up for [`own_writes`]: a cgroup whose live record the last
/// agent did not save before it died had its limits written moments before, among the newest.
const OWN_WRITES_SCANNED: usize = 10_000;

/// The memory.max the agent last wrote (or was about to, when killed) into each cgroup, from
/// the newest audit records: what a restarted agent must not take for a runtime's limit.
fn own_writes(store: &Store) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    let records = match store.audit::<crate::policy::actuator::AuditRecord>(OWN_WRITES_SCANNED) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reading the audit for the limits written before: {e}");
            return out;
        }
    };
    // Newest first: the first seen per cgroup is its last.
    for r in records {
        let max = match r.outcome.as_str() {
            "ok" | "partial" => r.written.max_bytes.or(r.new.max_bytes),
            "interrupted" => r.new.max_bytes,
            _ => None,
        };
        if let Some(max) = max {
            out.entry(r.cgroup_id).or_insert(max);
        }
    }
    out
}

/// Raises the soft limit on open descriptors to the hard one: the API's connection cap is far
/// below either, and cgroup writes must never run short.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::debug!("raising RLIMIT_NOFILE: {e}");
        }
    }
}

/// Creates a missing watched root (`create`): it is EMARS's own, so a platform can start
/// creating instances in it. On v2, enables the memory controller for its children. A missing
/// root the operator expects a platform to make is reported and left alone: cgroups created
/// under it later are still seen (the kernel side matches their paths).
fn ensure_root(h: &MemoryHierarchy, root: &str, create: bool) -> anyhow::Result<()> {
    let dir = h.dir(root);
    // A root given with the hierarchy's own mount in front (a custom cgroup.mount).
    let mount = h.mount.to_string_lossy();
    if mount.len() > 1 && root.starts_with(&format!("{mount}/")) {
        anyhow::bail!(
            "watched root {root} is a filesystem path: a root is the path below the memory \
             hierarchy's mount {mount}, as /proc/<pid>/cgroup shows it: write \"{}\"",
            &root[mount.len()..]
        );
    }
    if dir.is_dir() {
        return Ok(());
    }
    if !create {
        tracing::warn!(
            "watched root {} does not exist (create = false): nothing is tracked until it is \
             made; if it should be there, check its path ({})",
            dir.display(),
            top_level_cgroups(h)
        );
        return Ok(());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating watched root {}", dir.display()))?;
    if root == crate::config::DEFAULT_ROOT {
        // The default root is EMARS's own: made at every boot, nothing to check.
        tracing::info!("created watched root {}", dir.display());
    } else {
        tracing::warn!(
            "created watched root {}: it did not exist; instances are the cgroups a platform \
             creates below it. If a platform should have made it, check the path and set \
             create = false for it ({})",
            dir.display(),
            top_level_cgroups(h)
        );
    }
    if h.version == CgroupVersion::V2 {
        let ctl = dir.join("cgroup.subtree_control");
        std::fs::write(&ctl, "+memory")
            .with_context(|| format!("enabling the memory controller in {}", ctl.display()))?;
    }
    Ok(())
}

/// Refuses to start without the privilege the agent needs, with what it needs, rather than a
/// bare EPERM from the first bpf() or cgroup write: root, or CAP_BPF with CAP_PERFMON (or
/// CAP_SYS_ADMIN) for the programs, and CAP_SYS_RESOURCE and CAP_DAC_OVERRIDE for the files.
pub fn check_privilege() -> anyhow::Result<()> {
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let eff = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map_or(0, |s| s.capeff);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let programs = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if programs && has(CAP_SYS_RESOURCE) && has(CAP_DAC_OVERRIDE) {
        return Ok(());
    }
    anyhow::bail!(
        "emars agent needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE and \
         CAP_DAC_OVERRIDE): it loads eBPF programs and writes cgroup limits. Run it with sudo, \
         or as the emars.service unit (deploy/systemd); the other commands need no privilege \
         to read"
    )
}

/// Takes an exclusive lock (flock) on each existing watched root's directory for the agent's
/// life; the kernel drops it when the agent exits, a kill -9 included. Refuses to start when
/// another process holds one, naming it.
fn lock_roots(h: &MemoryHierarchy, roots: &[String]) -> anyhow::Result<Vec<std::fs::File>> {
    use rustix::fs::{flock, FlockOperation};
    let mut held = Vec::new();
    for root in roots {
        let dir = h.dir(root);
        // A root that does not exist yet (create = false) cannot be locked: said at start.
        let Ok(file) = std::fs::File::open(&dir) else {
            continue;
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => held.push(file),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = crate::files::lock_holder(&dir)
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "another agent{holder} watches {}: two agents on one root would both \
                     write its limits; stop it, or give this agent other cgroup.roots",
                    dir.display()
                );
            }
            Err(e) => tracing::warn!("locking watched root {}: {e}", dir.display()),
        }
    }
    Ok(held)
}

/// The cgroups at the top of the hierarchy, for messages about a root that is not there.
fn top_level_cgroups(h: &MemoryHierarchy) -> String {
    let mut names: Vec<String> = std::fs::read_dir(&h.mount)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| format!("/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    let more = names.len().saturating_sub(12);
    names.truncate(12);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("top-level cgroups here: {}{more}", names.join(", "))
}

/// Registers cgroups that existed before the agent started, resuming their store records.
fn scan_existing(
    tracker: &mut Tracker,
    enforcer: &mut Enforcer,
    probes: &mut Probes,
    stale: Vec<InstanceRecord>,
    roots: &[String],
    agent_start_ms: u64,
) -> anyhow::Result<()> {
    let h = tracker.cgroups().clone();
    let mut found = 0usize;
    for root in roots {
        let dirs = match cgroupfs::descendants(&h.dir(root)) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("scanning {root}: {e}");
                continue;
            }
        };
        for dir in dirs {
            // Any of these may vanish under us: skip, never fail start-up.
            let (Some(rel), Ok(id)) = (h.rel_path(&dir), cgroupfs::cgroup_id(&dir)) else {
                continue;
            };
            let usage = h.usage(&dir).unwrap_or(0);
            let peak = h.peak(&dir).ok().flatten().unwrap_or(usage);
            if let Err(e) = probes.watch(id, usage, peak) {
                tracing::warn!("watching {}: {e}", dir.display());
                continue;
            }
            for tid in h.tids(&dir).unwrap_or_default() {
                let _ = probes.track_task(tid, id);
            }
            let resumed = stale
                .iter()
                .find(|r| r.cgroup_id == id && Path::new(&r.cgroup_path) == dir)
                .cloned();
            let started = resumed
                .as_ref()
                .map(|r| r.started_at_ms)
                .unwrap_or_else(|| created_ms(&dir));
            let new_since_start = resumed.is_none() && started >= agent_start_ms;
            let effects = tracker.add_cgroup(
                id,
                &rel,
                started,
                resumed,
                Found::Existing { new_since_start },
            );
            enforcer.run(tracker, effects);
            found += 1;
        }
    }
    let effects = tracker.close_vanished(stale, now_ms());
    enforcer.run(tracker, effects);
    tracing::info!(
        "watching {found} existing cgroups, {} live instances",
        tracker.live_count()
    );
    Ok(())
}

/// Best estimate of when a pre-existing cgroup was created: its directory's ctime.
fn created_ms(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| (m.ctime() as u64) * 1000 + (m.ctime_nsec() as u64) / 1_000_000)
        .unwrap_or_else(|_| now_ms())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
