//! Fleet learning, the fetching half: every `refresh_s`, ask Prometheus for the other hosts'
//! peaks (`[fleet] query`), hand the view to the policy, and say in /v1/info how it went.
//!
//! Its own task, never the event loop's: the HTTP request, the read and the parse run on the
//! blocking pool under `timeout_s`, and so does `Policy::set_fleet`'s recomputation. The
//! enforcement path reads only the policy's cache, so a slow, failing or absent Prometheus
//! costs new instances nothing; it leaves the agent on its last view until that is older than
//! `max_age_s`, then on local history alone.

use std::{
    io::Read,
    sync::{Arc, RwLock},
    time::Instant,
};

use crate::{
    clock::now_ms,
    model::{AgentInfo, FleetInfo},
    policy::{
        fleet::{FleetConfig, FleetView},
        Policy,
    },
};

/// Why a fetch gave no view.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// ureq's message names the URL (with the query) itself.
    #[error("{source}")]
    Http { source: Box<ureq::Error> },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: reading the answer: {source}")]
    Read { url: String, source: std::io::Error },
    #[error("{url}: the answer is larger than max_response_bytes ({max})")]
    TooLarge { url: String, max: u64 },
    #[error("{url}: {source}")]
    Answer {
        url: String,
        source: crate::policy::fleet::FleetError,
    },
}

/// One fetch: the query's answer as a view (at most `max_functions` functions), with the OOM
/// query's answer added.
fn fetch(
    config: &FleetConfig,
    agent_id: &str,
    max_functions: usize,
) -> Result<(FleetView, Option<String>), FetchError> {
    let url = format!(
        "{}/api/v1/query",
        config.prometheus_url.trim_end_matches('/')
    );
    let agent = ureq::AgentBuilder::new().timeout(config.timeout()).build();
    let fetched_at_ms = now_ms();
    let answer = |query: &str| ask(&agent, &url, query, config.max_response_bytes);
    let body = answer(&config.query_for(agent_id))?;
    let mut view =
        FleetView::from_answer(&body, fetched_at_ms, max_functions).map_err(|source| {
            FetchError::Answer {
                url: url.clone(),
                source,
            }
        })?;
    // The OOM kills are a second query: its failure is said, the peaks kept.
    let mut oom_failed = None;
    if let Some(oom_query) = config.oom_query_for(agent_id) {
        let added = answer(&oom_query).and_then(|body| {
            view.add_oom_answer(&body)
                .map_err(|source| FetchError::Answer {
                    url: url.clone(),
                    source,
                })
        });
        if let Err(e) = added {
            oom_failed = Some(format!("oom_query: {e}"));
        }
    }
    Ok((view, oom_failed))
}

/// One query's answer, at most `max_bytes` of it.
fn ask(agent: &ureq::Agent, url: &str, query: &str, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    let url = url.to_owned();
    let response = match agent.get(&url).query("query", query).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(status, r)) => {
            // Prometheus says why in its JSON; a proxy may say it in HTML: a line of it.
            let mut body = String::new();
            let _ = r.into_reader().take(512).read_to_string(&mut body);
            return Err(FetchError::Status {
                url,
                status,
                body: body.trim().chars().take(300).collect(),
            });
        }
        Err(e) => {
            return Err(FetchError::Http {
                source: Box::new(e),
            })
        }
    };
    let mut body = Vec::new();
    response
        .into_reader()
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|source| FetchError::Read {
            url: url.clone(),
            source,
        })?;
    if body.len() as u64 > max_bytes {
        return Err(FetchError::TooLarge {
            url,
            max: max_bytes,
        });
    }
    Ok(body)
}

/// The fetcher's state between refreshes.
pub(super) struct Fetcher {
    config: FleetConfig,
    agent_id: String,
    max_functions: usize,
    policy: Arc<Policy>,
    info: Arc<RwLock<AgentInfo>>,
    status: FleetInfo,
}

impl Fetcher {
    /// None when fleet learning is off (said in /v1/info).
    pub(super) fn new(
        config: FleetConfig,
        agent_id: String,
        max_functions: usize,
        policy: Arc<Policy>,
        info: Arc<RwLock<AgentInfo>>,
    ) -> Option<Fetcher> {
        let mut status = FleetInfo {
            state: "off".into(),
            reason: Some("fleet.prometheus_url is not set".into()),
            ..Default::default()
        };
        if !config.enabled() {
            publish(&info, &status);
            return None;
        }
        status.state = "waiting".into();
        status.reason = None;
        status.prometheus_url = config.shown_url();
        publish(&info, &status);
        Some(Fetcher {
            config,
            agent_id,
            max_functions,
            policy,
            info,
            status,
        })
    }

    /// Refreshes until the task is dropped (the agent stops).
    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.refresh());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }

    /// One refresh: fetch, hand the view to the policy, or keep the last one while it is
    /// young enough.
    async fn refresh(&mut self) {
        let started = Instant::now();
        let (config, agent_id, max) = (
            self.config.clone(),
            self.agent_id.clone(),
            self.max_functions,
        );
        let policy = self.policy.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let (view, oom_failed) = fetch(&config, &agent_id, max)?;
            let view = Arc::new(view);
            if let Err(e) = policy.set_fleet(Some(view.clone()), now_ms()) {
                tracing::warn!("fleet view: recomputing recommendations: {e}");
            }
            Ok::<_, FetchError>((view, oom_failed))
        })
        .await;
        let now = now_ms();
        self.status.last_attempt_ms = Some(now);
        self.status.last_fetch_ms = Some(started.elapsed().as_millis() as u64);
        match outcome {
            Ok(Ok((view, oom_failed))) => {
                if let Some(why) = &oom_failed {
                    tracing::warn!("fleet fetch: {}", self.config.redact(why));
                }
                let s = &mut self.status;
                s.state = "ok".into();
                s.reason = oom_failed.map(|why| self.config.redact(&why));
                s.in_use = true;
                s.functions = view.functions.len() as u64;
                s.samples = view.samples();
                s.functions_left_out = view.left_out;
                s.last_success_ms = Some(view.fetched_at_ms);
                s.refreshes_ok += 1;
                if view.left_out > 0 {
                    tracing::warn!(
                        "fleet view: {} functions beyond store.max_functions left out",
                        view.left_out
                    );
                }
            }
            Ok(Err(e)) => {
                let why = self.config.redact(&e.to_string());
                self.failed(why, now).await
            }
            Err(e) => self.failed(format!("fetch task: {e}"), now).await,
        }
        self.status.age_s = self
            .status
            .last_success_ms
            .filter(|_| self.status.in_use)
            .map(|at| now.saturating_sub(at) / 1000);
        publish(&self.info, &self.status);
    }

    /// A failed fetch: said; the view in use dropped once older than `max_age_s`.
    async fn failed(&mut self, reason: String, now: u64) {
        if self.status.refreshes_failed == 0 || self.status.reason.as_deref() != Some(&reason) {
            tracing::warn!("fleet fetch failed: {reason}");
        }
        let s = &mut self.status;
        s.refreshes_failed += 1;
        s.reason = Some(reason);
        let max_age_ms = self.config.max_age_s.saturating_mul(1000);
        let expired = s
            .last_success_ms
            .is_none_or(|at| now.saturating_sub(at) >= max_age_ms);
        if !expired {
            s.state = "failing".into();
            return;
        }
        s.state = if s.last_success_ms.is_some() {
            "expired".into()
        } else {
            "failing".into()
        };
        if s.in_use {
            s.in_use = false;
            s.functions = 0;
            s.samples = 0.0;
            s.functions_left_out = 0;
            tracing::warn!("fleet view older than max_age_s dropped: local history alone");
            let policy = self.policy.clone();
            let dropped =
                tokio::task::spawn_blocking(move || policy.set_fleet(None, now_ms())).await;
            if let Ok(Err(e)) = dropped {
                tracing::warn!("fleet view dropped: recomputing recommendations: {e}");
            }
        }
    }
}

fn publish(info: &RwLock<AgentInfo>, status: &FleetInfo) {
    if let Ok(mut i) = info.write() {
        i.fleet = status.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use std::io::Write;
    use std::net::TcpListener;

    /// A one-route HTTP server of the test's own: answers every request with `answer()`'s
    /// (status, body), or never answers while `answer()` says None.
    fn prometheus_of_our_own(
        answer: impl Fn() -> Option<(u16, String)> + Send + 'static,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                match answer() {
                    Some((status, body)) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    // Held open, unanswered, until the client gives up.
                    None => std::thread::sleep(std::time::Duration::from_secs(5)),
                }
            }
        });
        format!("http://{addr}")
    }

    fn answer_for(function: &str, upper: u64, count: u64) -> String {
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"function":"{function}"}},"histogram":[1,{{"count":"{count}","sum":"0","buckets":[[0,"1","{upper}","{count}"]]}}]}}]}}}}"#
        )
    }

    fn fetcher(url: &str, max_age_s: u64) -> (tempfile::TempDir, Fetcher) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let policy = Arc::new(Policy::new(
            PolicyConfig {
                export_dir: dir.path().join("export"),
                ..PolicyConfig::default()
            },
            store,
            1 << 34,
        ));
        let config = FleetConfig {
            prometheus_url: url.to_owned(),
            refresh_s: 1,
            max_age_s,
            timeout_s: 1,
            ..Default::default()
        };
        let info = Arc::new(RwLock::new(AgentInfo::default()));
        let f = Fetcher::new(config, "id".into(), 100, policy, info).unwrap();
        (dir, f)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetched_view_gives_limits_and_a_failing_prometheus_leaves_local_history() {
        let up = Arc::new(std::sync::atomic::AtomicU8::new(0)); // 0 ok, 1 error, 2 silent
        let state = up.clone();
        let url = prometheus_of_our_own(move || match state.load(Ordering::SeqCst) {
            0 => Some((200, answer_for("fn-new", 100 << 20, 30))),
            1 => Some((
                503,
                "{\"status\":\"error\",\"error\":\"overloaded\"}".into(),
            )),
            _ => None,
        });
        use std::sync::atomic::Ordering;
        let (_dir, mut f) = fetcher(&url, 2);
        let info = f.info.clone();
        let fleet_info = || info.read().unwrap().fleet.clone();
        assert_eq!(fleet_info().state, "waiting");

        f.refresh().await;
        assert_eq!(fleet_info().state, "ok", "{:?}", fleet_info());
        assert_eq!((fleet_info().functions, fleet_info().samples), (1, 30.0));
        // A function this host never ran has the fleet's limits, from the cache.
        let r = f.policy.cached("fn-new").expect("fleet-informed limits");
        assert_eq!((r.samples, r.fleet_samples), (0, 30.0));
        assert!(r.max_bytes >= 100 << 20, "{r:?}");

        // Prometheus fails: said, the view kept while young.
        up.store(1, Ordering::SeqCst);
        f.refresh().await;
        let i = fleet_info();
        assert_eq!(i.state, "failing");
        assert!(i.reason.as_deref().unwrap().contains("overloaded"), "{i:?}");
        assert!(i.in_use);
        assert!(f.policy.cached("fn-new").is_some());

        // Silent past max_age_s: each fetch ends at the timeout, the view is dropped.
        up.store(2, Ordering::SeqCst);
        let started = Instant::now();
        f.refresh().await;
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        f.refresh().await;
        let i = fleet_info();
        assert_eq!(i.state, "expired", "{i:?}");
        assert!(!i.in_use && i.functions == 0);
        assert!(
            f.policy.cached("fn-new").is_none(),
            "fleet-only limits dropped"
        );
        assert_eq!((i.refreshes_ok, i.refreshes_failed), (1, 3));
    }

    #[test]
    fn off_without_a_url_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let policy = Arc::new(Policy::new(PolicyConfig::default(), store, 1 << 30));
        let info = Arc::new(RwLock::new(AgentInfo::default()));
        assert!(
            Fetcher::new(FleetConfig::default(), "id".into(), 1, policy, info.clone()).is_none()
        );
        let i = info.read().unwrap().fleet.clone();
        assert_eq!(i.state, "off");
        assert!(i.reason.unwrap().contains("prometheus_url"));
    }
}
