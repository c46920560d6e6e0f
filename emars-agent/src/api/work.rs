//! What API requests may cost, and where they run.
//!
//! - [`run`]: blocking work (store reads, encoding big answers) runs on the API runtime's own
//!   blocking threads, at most [`RUNNING`] at once with at most [`WAITING`] more queued; past
//!   that a request is answered 503 at once. Work still queued when its request is dropped
//!   (the client went away, the 30 s deadline passed) never starts. The agent's event loop and
//!   its store flush run on another runtime and never queue behind requests.
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

/// The gate every request's blocking work passes.
static GATE: Gate = Gate::new();

/// Requests refused with 503 since start.
pub fn refused() -> u64 {
    GATE.refused.load(Ordering::Relaxed) as u64
}

/// Runs `f` on a blocking thread of the calling (API) runtime, within the bounds above.
pub async fn run<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    GATE.run(f).await
}

/// At most [`RUNNING`] jobs at work and [`WAITING`] queued.
struct Gate {
    slots: Semaphore,
    queued: AtomicUsize,
    refused: AtomicUsize,
}

impl Gate {
    const fn new() -> Gate {
        Gate {
            slots: Semaphore::const_new(RUNNING),
            queued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        }
    }

    async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let queued = self.queue().ok_or_else(busy)?;
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
        if before >= WAITING {
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

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the agent is busy ({RUNNING} requests at work and {WAITING} waiting): try again \
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
    async fn full_queue_is_refused_and_dropped_work_never_starts() {
        let gate: &'static Gate = Box::leak(Box::new(Gate::new()));
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
        let e = gate.run(|| ()).await.unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(gate.refused.load(Ordering::SeqCst), 1);
        // The queued requests go away: their work never runs.
        for q in &queued {
            q.abort();
        }
        for q in queued {
            let _ = q.await;
        }
        assert_eq!(gate.queued.load(Ordering::SeqCst), 0);
        release.wait();
        for b in busy {
            b.await.unwrap().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(started.load(Ordering::SeqCst), RUNNING as u64);
    }
}
