//! What API requests may cost, and where they run.
//!
//! - [`run`]: blocking work (store reads, encoding big answers) runs on the API runtime's own
//!   blocking threads, at most [`RUNNING`] at once with at most [`WAITING`] more queued; past
//!   that a request is answered 503 at once. The local socket's peers have a slot and a queue
//!   of their own. Work still queued when its request is dropped (the client went away, the
//!   30 s deadline passed) never starts. The agent's event loop and its store flush run on
//!   another runtime and never queue behind requests.
//! - [`Snapshot`]: answers built from the whole model (`/metrics`, the function list, every
//!   recommendation, the export, the info) are built once and shared by every request until
//!   the model changes, and at most once a second however often it changes: a storm of such
//!   requests costs one build a second. Too busy to build, the last answer is given.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore};

use super::ApiError;

/// Blocking jobs running at once. The store's lock is shared with the event loop, so more
/// would only queue there.
pub const RUNNING: usize = 2;
/// Jobs waiting for one of those, beyond which requests are refused (503).
pub const WAITING: usize = 64;
/// The most often a whole-model answer is built.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// The gates every request's blocking work passes.
static GATES: Gates = Gates {
    tcp: Gate::new(RUNNING, WAITING),
    // The local socket's peers (root, the socket group): a slot and a queue of their own, so
    // that however many TCP clients keep the other busy, the operator's `emars` is served.
    local: Gate::new(1, 16),
};

tokio::task_local! {
    /// Whether the request being served came through the local socket.
    static LOCAL_PEER: bool;
}

/// Runs `f` (a request's handling) with what [`run`] needs to know of its peer.
pub async fn for_peer<F: std::future::Future>(local: bool, f: F) -> F::Output {
    LOCAL_PEER.scope(local, f).await
}

/// Requests refused with 503 since start.
pub fn refused() -> u64 {
    GATES.refused()
}

/// Runs `f` on a blocking thread of the calling (API) runtime, within the bounds above: the
/// local socket's gate for its peers' requests, the other for everyone else's.
pub async fn run<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    GATES.run(f).await
}

/// One gate for TCP clients, one for the local socket's peers.
struct Gates {
    tcp: Gate,
    local: Gate,
}

impl Gates {
    async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if LOCAL_PEER.try_with(|l| *l).unwrap_or(false) {
            self.local.run(f).await
        } else {
            self.tcp.run(f).await
        }
    }

    fn refused(&self) -> u64 {
        (self.tcp.refused.load(Ordering::Relaxed) + self.local.refused.load(Ordering::Relaxed))
            as u64
    }
}

/// At most `running` jobs at work and `waiting` queued.
struct Gate {
    slots: Semaphore,
    running: usize,
    waiting: usize,
    queued: AtomicUsize,
    refused: AtomicUsize,
}

impl Gate {
    const fn new(running: usize, waiting: usize) -> Gate {
        Gate {
            slots: Semaphore::const_new(running),
            running,
            waiting,
            queued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        }
    }

    async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let queued = self
            .queue()
            .ok_or_else(|| busy(self.running, self.waiting))?;
        // Dropped here (the request went away) the job never starts.
        let permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| ApiError::internal("the API work gate is closed"))?;
        drop(queued);
        let out = tokio::task::spawn_blocking(f).await;
        drop(permit);
        out.map_err(|e| ApiError::internal(format!("request task failed: {e}")))
    }

    /// A place in the queue, given back however the request ends; None when it is full.
    fn queue(&self) -> Option<Queued<'_>> {
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.waiting {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Queued(&self.queued))
    }
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn busy(running: usize, waiting: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the agent is busy ({running} requests at work and {waiting} waiting): try again \
             in a second"
        ),
    )
}

/// A whole-model answer (encoded, or any cheap-to-clone value) shared by every request until
/// the model changes (see the module).
#[derive(Debug)]
pub struct Snapshot<T = Bytes> {
    slot: Mutex<Option<Built<T>>>,
}

impl<T> Default for Snapshot<T> {
    fn default() -> Self {
        Snapshot {
            slot: Mutex::new(None),
        }
    }
}

#[derive(Debug)]
struct Built<T> {
    version: Option<u64>,
    at: Instant,
    body: T,
}

impl<T: Clone + Send + 'static> Snapshot<T> {
    /// The answer as of `version` (what the model's change counter says now; None: the answer
    /// moves all the time, as /metrics does, and is rebuilt once it is a second old). Concurrent
    /// callers wait for one build instead of each making theirs.
    pub async fn get<F>(&self, version: impl Fn() -> Option<u64>, build: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    {
        let mut slot = self.slot.lock().await;
        if let Some(b) = slot.as_ref() {
            let fresh = match version() {
                Some(v) => b.version == Some(v),
                None => b.at.elapsed() < SNAPSHOT_EVERY,
            };
            if fresh {
                return Ok(b.body.clone());
            }
            // Changed, but built less than a second ago: the next build waits for the second
            // to pass (every request arriving meanwhile gets that build).
            if let Some(wait) = SNAPSHOT_EVERY.checked_sub(b.at.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let version = version();
        let body = match run(build).await.and_then(|r| r) {
            Ok(b) => b,
            // Too busy to build: the last answer, a little old, rather than none.
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => match slot.as_ref() {
                Some(b) => return Ok(b.body.clone()),
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        *slot = Some(Built {
            version,
            at: Instant::now(),
            body: body.clone(),
        });
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_build_for_many_requests_and_a_new_one_on_change() {
        let snap = Arc::new(Snapshot::default());
        let builds = Arc::new(AtomicU64::new(0));
        let version = Arc::new(AtomicU64::new(1));
        let get = |snap: Arc<Snapshot>, builds: Arc<AtomicU64>, version: Arc<AtomicU64>| async move {
            let v = version.clone();
            snap.get(
                move || Some(v.load(Ordering::SeqCst)),
                move || {
                    std::thread::sleep(Duration::from_millis(20));
                    let n = builds.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(Bytes::from(n.to_string()))
                },
            )
            .await
            .unwrap()
        };
        let mut tasks = Vec::new();
        for _ in 0..50 {
            tasks.push(tokio::spawn(get(
                snap.clone(),
                builds.clone(),
                version.clone(),
            )));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Bytes::from("1"));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        // A change: the next answer is a new build, not older than the change, made only once
        // the second since the last build has passed.
        version.store(2, Ordering::SeqCst);
        let t0 = Instant::now();
        let body = get(snap.clone(), builds.clone(), version.clone()).await;
        assert_eq!(body, Bytes::from("2"));
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_is_refused_the_local_socket_served_and_dropped_work_never_starts() {
        let gates: &'static Gates = Box::leak(Box::new(Gates {
            tcp: Gate::new(RUNNING, WAITING),
            local: Gate::new(1, 16),
        }));
        let gate = &gates.tcp;
        let started = Arc::new(AtomicU64::new(0));
        let release = Arc::new(std::sync::Barrier::new(RUNNING + 1));
        let mut busy = Vec::new();
        for _ in 0..RUNNING {
            let (s, r) = (started.clone(), release.clone());
            busy.push(tokio::spawn(gate.run(move || {
                s.fetch_add(1, Ordering::SeqCst);
                r.wait();
            })));
        }
        while started.load(Ordering::SeqCst) < RUNNING as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The queue fills; one more is refused at once.
        let mut queued = Vec::new();
        for _ in 0..WAITING {
            let s = started.clone();
            queued.push(tokio::spawn(gate.run(move || {
                s.fetch_add(1, Ordering::SeqCst);
            })));
        }
        while gate.queued.load(Ordering::SeqCst) < WAITING {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Observed first and asserted once the busy jobs are let go, so that a failure fails
        // the test instead of leaving it waiting on them.
        let refused = gates.run(|| ()).await.map(|_| ()).map_err(|e| e.status);
        let tcp_refused = gate.refused.load(Ordering::SeqCst);
        // The local socket's peers are served all the same, on a gate of their own.
        let local = for_peer(true, gates.run(|| 7)).await.map_err(|e| e.status);
        // The queued requests go away: their work never runs.
        for q in &queued {
            q.abort();
        }
        for q in queued {
            let _ = q.await;
        }
        let queued_left = gate.queued.load(Ordering::SeqCst);
        release.wait();
        for b in busy {
            b.await.unwrap().unwrap();
        }
        assert_eq!(refused, Err(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(tcp_refused, 1);
        assert_eq!(local, Ok(7));
        assert_eq!(gates.refused(), 1);
        assert_eq!(queued_left, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(started.load(Ordering::SeqCst), RUNNING as u64);
    }
}
