//! The daemon: the agent's run from start-up to stop. It owns the tracker (the live model of
//! instances), the [`Effects`] that carry out what the tracker decides (with the burst guard and
//! the squeeze in reactive mode), the kernel's event ring, and the API's command channels.
//!
//! - `start`: the wiring, as named steps (sockets, hierarchy, store, probes, policy, reactive
//!   mode, recovery, the API), then the event loop, then the shutdown.
//! - `recover`: what the last run left (live records, events queued while no agent ran, the
//!   cgroups there now) brought into the tracker before the loop starts.
//! - `event_loop`: one method per source (ring, limit signal, pressure, squeeze done, API limits,
//!   pool command, tick, flush); the rule that a source acting on instances reads the ring first
//!   is kept in one place, [`event_loop::Input::reads_ring_first`].
//! - `effects`: carries out effects; every limit write ends in `Effect::LimitsInForce`, told
//!   there to the record and the burst guard.
//! - `pool`: binds and releases of pooled cgroups (POST /v1/bind, /v1/release).
//! - `info`: the one place /v1/info's (and so /metrics') agent figures are assembled.
//! - `host`: the host's side of start-up (privileges, watched roots and their locks).
//!
//! One pass of the loop: wait for a source; read the ring first where the source acts on
//! instances (apply each batch with [`Tracker::apply_batch`], carrying each event's effects out
//! before the next); handle the source; let the burst guard catch up with the limits the pass
//! put in force; flush the store when due.

mod effects;
mod event_loop;
mod fleet;
mod host;
mod info;
mod pool;
mod recover;
mod start;

pub use effects::{EffectStats, Effects};
pub use host::check_privilege;
pub use pool::{bind_pooled, Bind, PoolCommand, PoolReply};
pub use start::{run, ApiParts, ApiThread};

use crate::{
    kernel::{events, ring::EventRing},
    model::tracker::{Effect, Tracker},
};

/// What each pass changes: the tracker and the effects that carry out its decisions.
pub(crate) struct Daemon {
    tracker: Tracker,
    effects: Effects,
    /// Event records that could not be decoded, said at the end.
    decode_errors: u64,
}

impl Daemon {
    fn new(tracker: Tracker, effects: Effects) -> Self {
        Daemon {
            tracker,
            effects,
            decode_errors: 0,
        }
    }

    /// Carries out what the tracker (or the burst guard, the squeeze, the API) decided.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        self.effects.run(&mut self.tracker, effects);
    }

    /// Applies every record waiting in the ring buffer (without giving their room back: see
    /// [`EventRing`]), skipping those up to ring position `applied` (read by an agent that was
    /// killed after its store had saved their effects, before it gave their room back);
    /// returns how many were read.
    fn drain_ring_after(&mut self, ring: &mut EventRing, applied: u64) -> usize {
        let mut batch = Vec::new();
        let decode_errors = &mut self.decode_errors;
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
        let effects = &mut self.effects;
        self.tracker
            .apply_batch(batch, |tracker, fx| effects.run(tracker, fx));
        n
    }

    fn drain_ring(&mut self, ring: &mut EventRing) -> usize {
        self.drain_ring_after(ring, 0)
    }

    /// Drains the ring until a read finds nothing (a few reads at most): applying a batch
    /// takes time (limit writes), in which instances may end; reconciliation, which comes
    /// next, must find their rmdirs applied, not take them for lost events.
    fn drain_until_quiet(&mut self, ring: &mut EventRing) {
        for _ in 0..8 {
            if self.drain_ring(ring) == 0 {
                break;
            }
        }
    }

    /// Closes instances whose cgroup is gone with no rmdir event, after the ring's rmdirs
    /// (drained until quiet) are applied.
    fn reconcile(&mut self, ring: &mut EventRing, now_ms: u64) {
        self.drain_until_quiet(ring);
        let effects = self.tracker.reconcile(now_ms);
        self.carry_out(effects);
    }
}
