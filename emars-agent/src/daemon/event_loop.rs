//! The event loop: waits for one source, then runs one pass for it (see [`EventLoop::pass`]).
//! Each source has its own method; the rule that a source acting on instances reads the ring
//! first is [`Input::reads_ring_first`], applied in one place.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::UnboundedReceiver,
    task::{JoinError, JoinHandle},
};

use crate::{
    clock::now_ms,
    kernel::notify::{PressureSignal, Signal},
    kernel::{probes::Probes, ring::EventRing},
    model::{
        tracker::{Effect, LimitsBy},
        AgentInfo, Limits,
    },
    policy::{actuator::Actuator, squeeze::Done, Generation, Policy},
    store::{Store, StoreError},
};

use super::pool::PoolCommand;
use super::{info, pool, Daemon};

/// How often records read from the ring are made durable (a flush of the store) and their room
/// given back to the kernel: once a second, in a pause of this long after the last limits
/// written into a new instance, and at the latest after `COMMIT_EVERY_AT_MOST`.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
const FLUSH_QUIET: Duration = Duration::from_millis(50);
const COMMIT_EVERY_AT_MOST: Duration = Duration::from_secs(5);

/// How often the agent reads the ring buffer without being woken: the bound on how late an
/// exec, exit, peak step, rmdir or (in observe mode) mkdir is seen; OOM kills, and mkdirs in
/// enforce mode, wake it at once.
const RING_DRAIN: Duration = Duration::from_millis(100);

/// Reconciliation runs every this many ticks.
const RECONCILE_EVERY_TICKS: u64 = 10;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The loop's sources besides the ring and its timers.
pub(super) struct Sources {
    /// The kernel's signals that an instance nears its memory.max (reactive mode).
    pub signals: Option<UnboundedReceiver<Signal>>,
    /// Memory pressure on the host or a watched root (the squeeze).
    pub pressure: Option<UnboundedReceiver<PressureSignal>>,
    /// Limits the API wrote into a live instance (apply, set-limit).
    pub api_limits: UnboundedReceiver<(u64, Limits)>,
    /// Binds and releases of pooled cgroups (POST /v1/bind, /v1/release).
    pub pool: UnboundedReceiver<PoolCommand>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// What the loop reads besides its own state.
pub(super) struct LoopContext<'a> {
    pub probes: &'a Probes,
    pub info: &'a RwLock<AgentInfo>,
    pub store: &'a Store,
    pub policy: &'a Arc<Policy>,
    pub actuator: &'a Actuator,
    pub retention: Duration,
}

/// One thing that happened, from one source.
pub(super) enum Input {
    LimitSignal(Signal),
    Pressure(PressureSignal),
    Squeezed(Vec<Done>),
    ApiLimits(u64, Limits),
    Pool(PoolCommand),
    /// The ring woke the agent, or its drain timer fired.
    Ring,
    Tick,
    Flushed(Result<Result<(), StoreError>, JoinError>),
}

impl Input {
    /// The drain-first rule: a source that acts on instances reads the ring first, since what
    /// it is about (a signal for a new instance, a bind of a cgroup just made, a pressure
    /// candidate just ended) may wait there as a mkdir, new limits or an rmdir. The squeeze's
    /// results, the API's limits and the tick act on instances the tracker knows already.
    pub(super) fn reads_ring_first(&self) -> bool {
        matches!(
            self,
            Input::LimitSignal(_) | Input::Pressure(_) | Input::Pool(_) | Input::Ring
        )
    }
}

/// Timers and the flush under way.
struct Housekeeping {
    /// The last generation survives restarts: a daily period is not reset by a restart.
    last_generation_ms: u64,
    last_prune: Instant,
    ticks: u64,
    last_flush: Instant,
    /// The store flush under way and the ring position it makes durable.
    flushing: Option<(u64, JoinHandle<Result<(), StoreError>>)>,
}

pub(super) struct EventLoop<'a> {
    daemon: Daemon,
    ring: AsyncFd<EventRing>,
    ctx: LoopContext<'a>,
    housekeeping: Housekeeping,
}

impl<'a> EventLoop<'a> {
    pub(super) fn new(
        daemon: Daemon,
        ring: EventRing,
        ctx: LoopContext<'a>,
    ) -> anyhow::Result<Self> {
        let last_generation_ms = ctx
            .store
            .generations::<Generation>(1)
            .ok()
            .and_then(|g| g.first().map(|g| g.generated_at_ms))
            .unwrap_or(0);
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        Ok(EventLoop {
            daemon,
            ring,
            ctx,
            housekeeping: Housekeeping {
                last_generation_ms,
                last_prune: Instant::now() - PRUNE_EVERY,
                ticks: 0,
                last_flush: Instant::now(),
                flushing: None,
            },
        })
    }

    /// Runs until `stop`; returns the daemon and the ring, read to the end, for the caller to
    /// commit once the store is saved.
    pub(super) async fn run(mut self, mut src: Sources) -> anyhow::Result<(Daemon, EventRing)> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut drain = tokio::time::interval(RING_DRAIN);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let input = tokio::select! {
                // An instance nears its memory.max: before anything else.
                biased;
                Some(sig) = recv(&mut src.signals) => Input::LimitSignal(sig),
                Some(sig) = recv(&mut src.pressure) => Input::Pressure(sig),
                done = squeezed(&mut self.daemon) => Input::Squeezed(done),
                Some((id, limits)) = src.api_limits.recv() => Input::ApiLimits(id, limits),
                Some(cmd) = src.pool.recv() => Input::Pool(cmd),
                guard = self.ring.readable_mut() => {
                    // Cleared before the drain reads: a record that comes after wakes it again.
                    guard.context("waiting for kernel events")?.clear_ready();
                    Input::Ring
                }
                // Events that do not wake the agent (exec, exit, attach, peak steps) are read
                // here, or with the next one that does.
                _ = drain.tick() => Input::Ring,
                _ = tick.tick() => Input::Tick,
                flushed = flushed(&mut self.housekeeping.flushing) => Input::Flushed(flushed),
                _ = src.stop.changed() => break,
            };
            self.pass(input);
        }
        if let Some((_, h)) = self.housekeeping.flushing.take() {
            let _ = h.await;
        }
        // What came in since the last drain: recorded now, saved by the caller's checkpoint.
        let mut ring = self.ring.into_inner();
        self.daemon.drain_ring(&mut ring);
        Ok((self.daemon, ring))
    }

    /// One pass: the ring read first where the source needs it, the source handled, the burst
    /// guard caught up with the limits the pass put in force, the store flushed when due.
    fn pass(&mut self, input: Input) {
        if input.reads_ring_first() {
            self.daemon.drain_ring(self.ring.get_mut());
            self.daemon.effects.catch_up(&mut self.daemon.tracker);
        }
        match input {
            Input::LimitSignal(sig) => self.on_limit_signal(sig),
            Input::Pressure(sig) => self.on_pressure(sig),
            Input::Squeezed(done) => self.on_squeezed(done),
            Input::ApiLimits(id, limits) => self.on_api_limits(id, limits),
            Input::Pool(cmd) => self.on_pool_command(cmd),
            Input::Ring => {}
            Input::Tick => self.on_tick(),
            Input::Flushed(result) => self.on_flushed(result),
        }
        self.daemon.effects.catch_up(&mut self.daemon.tracker);
        self.flush_when_due();
    }

    /// An instance neared its memory.max. A squeezed instance that crossed its hold woke up:
    /// its hold goes first, then the burst guard judges it by the limits it really has.
    fn on_limit_signal(&mut self, sig: Signal) {
        let d = &mut self.daemon;
        if let Some(s) = d.effects.squeeze.as_mut() {
            let why = "the instance crossed its hold (memory.events)";
            let effects = s.release(sig.cgroup_id, &d.tracker, why);
            d.carry_out(effects);
        }
        if let Some(b) = d.effects.burst.as_mut() {
            let effects = b.on_signal(sig, &d.tracker);
            d.carry_out(effects);
        }
    }

    /// The host or a watched root is under memory pressure: the squeeze takes idle instances.
    fn on_pressure(&mut self, sig: PressureSignal) {
        let d = &mut self.daemon;
        let ids = candidates(d);
        if let Some(s) = d.effects.squeeze.as_mut() {
            let effects = s.on_pressure(sig, &ids, &d.tracker);
            d.carry_out(effects);
        }
    }

    fn on_squeezed(&mut self, done: Vec<Done>) {
        let d = &mut self.daemon;
        if let Some(s) = d.effects.squeeze.as_mut() {
            let effects = s.record(done, &d.tracker);
            d.carry_out(effects);
        }
    }

    /// Limits the API wrote into a live instance: in force, like every other write.
    fn on_api_limits(&mut self, id: u64, limits: Limits) {
        self.daemon.carry_out(vec![Effect::LimitsInForce {
            cgroup_id: id,
            limits,
            by: LimitsBy::Api,
        }]);
    }

    /// A platform binds or releases a pooled cgroup.
    fn on_pool_command(&mut self, cmd: PoolCommand) {
        let d = &mut self.daemon;
        pool::on_pool_command(cmd, &mut d.tracker, &mut d.effects, self.ctx.actuator);
    }

    /// Once a second: the squeeze's clock, cgroups waiting for metadata, recommendations of
    /// functions whose instances ended, reconciliation every `RECONCILE_EVERY_TICKS`, the
    /// figures in /v1/info, and the whole-store work.
    fn on_tick(&mut self) {
        let d = &mut self.daemon;
        let ids = candidates(d);
        if let Some(s) = d.effects.squeeze.as_mut() {
            let effects = s.tick(&ids, &d.tracker, Instant::now());
            d.carry_out(effects);
        }
        let now = now_ms();
        let effects = d.tracker.settle_pending(now);
        d.carry_out(effects);
        let effects = d.tracker.recompute_dirty(now);
        d.carry_out(effects);
        self.housekeeping.ticks += 1;
        if self
            .housekeeping
            .ticks
            .is_multiple_of(RECONCILE_EVERY_TICKS)
        {
            self.daemon.reconcile(self.ring.get_mut(), now);
        }
        self.refresh_info();
        self.whole_store_work(now);
    }

    fn refresh_info(&self) {
        let d = &self.daemon;
        info::refresh(
            self.ctx.info,
            info::Sources {
                tracker: &d.tracker,
                probes: self.ctx.probes,
                policy: self.ctx.policy,
                actuator: self.ctx.actuator,
                effects: d.effects.stats(),
                burst: d.effects.burst.as_ref().map(|b| b.figures()),
                squeeze: d.effects.squeeze.as_ref().map(|s| s.figures()),
            },
        );
    }

    /// The periodic generation and retention: off the event loop, which must keep draining
    /// the ring.
    fn whole_store_work(&mut self, now: u64) {
        let h = &mut self.housekeeping;
        let policy = self.ctx.policy;
        if now.saturating_sub(h.last_generation_ms) >= policy.period().as_millis() as u64 {
            h.last_generation_ms = now;
            let p = policy.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = p.generate("period", now) {
                    tracing::error!("generating the per-function config: {e}");
                }
            });
        }
        if h.last_prune.elapsed() >= PRUNE_EVERY {
            h.last_prune = Instant::now();
            let st = self.ctx.store.clone();
            let retention = self.ctx.retention;
            tokio::task::spawn_blocking(move || match st.prune(now, retention) {
                Ok(r) => tracing::debug!(?r, "retention"),
                Err(e) => tracing::error!("retention: {e}"),
            });
        }
    }

    /// The records read before this flush began are durable now: their room goes back to the
    /// kernel. Until then a pinned ring keeps them for the next agent, should this one be
    /// killed.
    fn on_flushed(&mut self, flushed: Result<Result<(), StoreError>, JoinError>) {
        if let Some((pos, _)) = self.housekeeping.flushing.take() {
            match flushed {
                Ok(Ok(())) => {}
                // Holding the records back would fill the ring and lose new events: they go
                // back to the kernel all the same.
                Ok(Err(e)) => tracing::error!("flushing the store: {e}"),
                Err(e) => tracing::error!("store flush task: {e}"),
            }
            self.ring.get_mut().commit(pos);
        }
    }

    /// One flush a second (sooner if a quarter of the ring waits on it), for everything
    /// written meanwhile (sled has no flusher of its own here), which also empties the audit
    /// journal. Each is a device cache flush, and an audit record's O_DSYNC write that meets
    /// one waits for it: so it waits for a pause in new instances, up to `COMMIT_EVERY_AT_MOST`
    /// (docs/design.md, "The audit journal", has what a flush per read cost).
    fn flush_when_due(&mut self) {
        let h = &mut self.housekeeping;
        let r = self.ring.get_ref();
        let due = h.last_flush.elapsed();
        let quiet = self
            .daemon
            .effects
            .stats()
            .last_enforce
            .is_none_or(|t| t.elapsed() >= FLUSH_QUIET);
        if h.flushing.is_none()
            && ((due >= COMMIT_EVERY && quiet)
                || due >= COMMIT_EVERY_AT_MOST
                || r.uncommitted() > r.size() / 4)
        {
            h.last_flush = Instant::now();
            let pos = r.position();
            let store = self.ctx.store;
            // Durable with the effects it vouches for, or not at all.
            if let Err(e) = store.set_ring_mark(r.identity(), pos) {
                tracing::error!("noting the ring position in the store: {e}");
            }
            let st = store.clone();
            h.flushing = Some((pos, tokio::task::spawn_blocking(move || st.flush())));
        }
    }
}

/// The squeeze's candidates: the burst guard's watched instances (those with limits).
fn candidates(d: &Daemon) -> Vec<u64> {
    d.effects
        .burst
        .as_ref()
        .map(|b| b.watched_ids())
        .unwrap_or_default()
}

/// The next message of an optional source; pending forever when it is off.
async fn recv<T>(rx: &mut Option<UnboundedReceiver<T>>) -> Option<T> {
    match rx.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The squeeze under way, done; pending forever when none is.
async fn squeezed(d: &mut Daemon) -> Vec<Done> {
    match d.effects.squeeze.as_mut() {
        Some(s) => s.squeezed().await,
        None => std::future::pending().await,
    }
}

/// The store flush under way, done; pending forever when none is.
async fn flushed(
    flushing: &mut Option<(u64, JoinHandle<Result<(), StoreError>>)>,
) -> Result<Result<(), StoreError>, JoinError> {
    match flushing.as_mut() {
        Some((_, h)) => h.await,
        None => std::future::pending().await,
    }
}
