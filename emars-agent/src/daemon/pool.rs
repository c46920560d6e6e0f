//! Binds and releases of pooled cgroups (POST /v1/bind, /v1/release), carried out on the event
//! loop: the tracker decides, the effects act (a bound use's limits are a new instance's).

use crate::{
    clock::now_ms,
    kernel::cgroupfs,
    model::{
        tracker::{BindError, Tracker},
        InstanceRecord,
    },
    policy::actuator::Actuator,
};

use super::Effects;

/// Where a bind or release is answered.
pub type PoolReply = tokio::sync::oneshot::Sender<Result<InstanceRecord, BindError>>;

/// A bind: `cgroup` (its directory, or its path below the hierarchy) now serves `function` as
/// `instance`. Checked by whoever asks (the API) before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub cgroup: String,
    pub function: String,
    pub instance: String,
    /// The size of the invocation's input, when the platform gave it: the limits follow it
    /// (`policy::sized`).
    pub input_bytes: Option<u64>,
}

/// A bind or release for the event loop, with where to answer.
#[derive(Debug)]
pub enum PoolCommand {
    Bind { bind: Bind, reply: PoolReply },
    Release { cgroup: String, reply: PoolReply },
}

/// Carries out a bind or release and answers it.
pub(super) fn on_pool_command(
    cmd: PoolCommand,
    tracker: &mut Tracker,
    effects: &mut Effects,
    actuator: &Actuator,
) {
    // The request may name the directory or the path below the hierarchy.
    let rel = |tracker: &Tracker, cgroup: &str| {
        tracker
            .cgroups()
            .rel_path(std::path::Path::new(cgroup))
            .unwrap_or_else(|| cgroup.trim_end_matches('/').to_owned())
    };
    match cmd {
        PoolCommand::Bind { bind: body, reply } => {
            let path = rel(tracker, &body.cgroup);
            // The cgroup the bind is asked for: the reset goes only into this one.
            let id = cgroupfs::cgroup_id(&tracker.cgroups().dir(&path)).unwrap_or(0);
            let _ = reply.send(bind_pooled(tracker, effects, actuator, &path, id, &body));
        }
        PoolCommand::Release { cgroup, reply } => {
            let path = rel(tracker, &cgroup);
            let answer = tracker.release(&path, now_ms()).map(|(rec, fx)| {
                effects.run(tracker, fx);
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
    effects: &mut Effects,
    actuator: &Actuator,
    rel_path: &str,
    cgroup_id: u64,
    body: &Bind,
) -> Result<InstanceRecord, BindError> {
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
        input_bytes: body.input_bytes,
        connections: 0,
        requests: 0,
    };
    let bound = actuator
        .audited(&intent, crate::model::audit::Reason::Bind, || {
            tracker.bind(
                rel_path,
                cgroup_id,
                &body.function,
                &body.instance,
                body.input_bytes,
                now_ms(),
            )
        })
        .map_err(|e| {
            tracing::error!("bind not made: {e}");
            BindError::Unavailable(e.to_string())
        })?;
    let (id, fx) = bound?;
    effects.run(tracker, fx);
    tracker
        .live_record(id)
        .cloned()
        .ok_or_else(|| BindError::NotFound {
            path: body.cgroup.clone(),
        })
}
