//! Serving the API with bounded work: for each listener its own cap on open connections, a
//! deadline for request headers, for a whole request and for a connection's life. A slow or
//! hostile client can hold at most its listener's share of connections for a bounded time; it
//! can never take the descriptors that cgroup writes need, nor the local socket's connections
//! (the CLI's way in), which have slots of their own.
//!
//! Each request carries its [`Peer`]: a TCP client (untrusted: the guard wants the token for
//! writes), or a local-socket peer whose kernel credentials passed the [`PeerRule`] when it
//! connected (refused ones are closed before a byte is read).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::Request, http::StatusCode, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{watch, Semaphore},
};

use super::listen::{Listeners, PeerRule};

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// TCP connections open at once; further ones wait in the kernel's listen backlog. An idle
    /// or half-sent connection costs a few KiB, so this is high: what a storm of clients costs
    /// is bounded by the request work gate ([`super::work`]), not by refusing to read them.
    pub max_connections: usize,
    /// Local-socket connections open at once (slots of their own).
    pub max_local_connections: usize,
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
            max_connections: 1024,
            max_local_connections: 64,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// Who sent a request: a request extension set for every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client: whoever can reach the port.
    Tcp(SocketAddr),
    /// A peer of the local socket, with the credentials the kernel gave for it.
    Local { uid: u32, gid: u32 },
}

/// The router with the request deadline applied (408 when it passes).
pub fn with_deadline(app: Router, bounds: Bounds) -> Router {
    app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        bounds.request_timeout,
    ))
}

/// Serves `app` on every listener of `listeners` until `shutdown` completes, then lets open
/// requests finish for a few seconds. Runs on the caller's runtime.
pub async fn serve(
    listeners: Listeners,
    app: Router,
    bounds: Bounds,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = with_deadline(app, bounds);
    let (closing_tx, closing) = watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    if let Some(l) = listeners.tcp {
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        loops.spawn(accept_loop(
            Listener::Tcp(l),
            app.clone(),
            bounds,
            closing.clone(),
        ));
    }
    if let Some((l, _, rule)) = listeners.local {
        l.set_nonblocking(true)?;
        let l = tokio::net::UnixListener::from_std(l)?;
        loops.spawn(accept_loop(
            Listener::Local(l, rule),
            app,
            bounds,
            closing.clone(),
        ));
    }
    shutdown.await;
    let _ = closing_tx.send(true);
    while loops.join_next().await.is_some() {}
    Ok(())
}

/// A listener being served.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Local(tokio::net::UnixListener, PeerRule),
}

impl Listener {
    /// Connections it may have open at once.
    fn cap(&self, bounds: &Bounds) -> usize {
        match self {
            Listener::Tcp(_) => bounds.max_connections,
            Listener::Local(..) => bounds.max_local_connections,
        }
    }

    /// Accepts one connection and has it served (taking `permit` along), or closes it at once
    /// when it is a local peer the rule does not allow.
    async fn accept(
        &self,
        app: &Router,
        bounds: Bounds,
        permit: tokio::sync::OwnedSemaphorePermit,
        closing: &watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                spawn_connection(
                    stream,
                    Peer::Tcp(addr),
                    app.clone(),
                    bounds,
                    permit,
                    closing,
                );
            }
            Listener::Local(l, rule) => {
                let (stream, _) = l.accept().await?;
                let cred = match stream.peer_cred() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("API socket: no peer credentials: {e}");
                        return Ok(());
                    }
                };
                if !rule.allows(cred.uid(), cred.gid(), cred.pid()) {
                    tracing::warn!(
                        uid = cred.uid(),
                        gid = cred.gid(),
                        pid = cred.pid(),
                        "API socket: peer refused (root or api.socket_group only)"
                    );
                    return Ok(());
                }
                let peer = Peer::Local {
                    uid: cred.uid(),
                    gid: cred.gid(),
                };
                spawn_connection(stream, peer, app.clone(), bounds, permit, closing);
            }
        }
        Ok(())
    }
}

/// Accepts connections on `listener` until closing, each within its cap.
async fn accept_loop(
    listener: Listener,
    app: Router,
    bounds: Bounds,
    mut closing: watch::Receiver<bool>,
) {
    let cap = listener.cap(&bounds);
    let slots = Arc::new(Semaphore::new(cap));
    loop {
        let Some(permit) = acquire(&slots, &mut closing).await else {
            break;
        };
        // The connection's own watch of closing (the loop's is borrowed for the select).
        let conn_closing = closing.clone();
        let accepted = tokio::select! {
            r = listener.accept(&app, bounds, permit, &conn_closing) => r,
            _ = closing.changed() => break,
        };
        if let Err(e) = accepted {
            accept_failed(e).await;
        }
    }
    drain(&slots, cap).await;
}

/// A free connection slot, or None once closing.
async fn acquire(
    slots: &Arc<Semaphore>,
    closing: &mut watch::Receiver<bool>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if *closing.borrow() {
        return None;
    }
    tokio::select! {
        p = slots.clone().acquire_owned() => p.ok(),
        _ = closing.changed() => None,
    }
}

/// EMFILE and the like: back off rather than spin; the caps make it rare.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("API accept: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Waits (a few seconds at most) for the connections of a listener to finish.
async fn drain(slots: &Semaphore, n: usize) {
    let all = u32::try_from(n).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(6), slots.acquire_many(all)).await;
}

/// Serves one connection with `peer` on every request, within the connection's life.
fn spawn_connection<S>(
    stream: S,
    peer: Peer,
    app: Router,
    bounds: Bounds,
    permit: tokio::sync::OwnedSemaphorePermit,
    closing: &watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = tower::ServiceExt::map_request(app, move |mut req: Request<_>| {
        req.extensions_mut().insert(peer);
        req
    });
    let service = hyper_util::service::TowerToHyperService::new(app);
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
