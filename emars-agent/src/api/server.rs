//! Serving the API with bounded work: a cap on open connections, a deadline for request
//! headers, for a whole request and for a connection's life. A slow or hostile client can hold
//! at most its share of connections for a bounded time; it can never take the descriptors that
//! cgroup writes need.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{http::StatusCode, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; further ones wait in the kernel's listen backlog.
    pub max_connections: usize,
    /// From the first byte of a request to the end of its headers.
    pub header_timeout: Duration,
    /// From the headers to the end of the answer (body read, handler run).
    pub request_timeout: Duration,
    /// A connection's whole life, keep-alive included.
    pub connection_lifetime: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_connections: 128,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// The router with the request deadline applied (408 when it passes).
pub fn with_deadline(app: Router, bounds: Bounds) -> Router {
    app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        bounds.request_timeout,
    ))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish for a
/// few seconds.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = with_deadline(app, bounds);
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin; the cap makes it rare.
                    tracing::warn!("API accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let life = tokio::time::sleep(bounds.connection_lifetime);
            tokio::pin!(life);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.changed() => {}
                _ = &mut life => {}
            }
            // Finish the request in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        });
    }
    let _ = closing_tx.send(true);
    let all = u32::try_from(bounds.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(6), slots.acquire_many(all)).await;
    Ok(())
}
