//! The CLI's way to the agent's local socket (`api.socket`): one HTTP/1.1 exchange per call
//! over a unix-domain connection (hyper's client on a small runtime of its own). The agent
//! checks who connects by the kernel's credentials, so nothing secret is sent: no token.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;

/// What the agent answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The socket is not there, refuses, or this user may not use it.
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("starting the client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl LocalError {
    /// The connection was refused for lack of permission (a user other than root).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, LocalError::Connect(e) if e.kind() == std::io::ErrorKind::PermissionDenied)
    }
}

/// `method` `uri` (a path and query) with an optional JSON body, answered within `timeout`.
pub fn exchange(
    socket: &Path,
    method: Method,
    uri: &str,
    json: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Answer, LocalError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LocalError::Runtime)?;
    rt.block_on(async {
        tokio::time::timeout(timeout, exchange_async(socket, method, uri, json))
            .await
            .map_err(|_| LocalError::Timeout(timeout))?
    })
}

async fn exchange_async(
    socket: &Path,
    method: Method,
    uri: &str,
    json: Option<Vec<u8>>,
) -> Result<Answer, LocalError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(LocalError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        // The agent wants a Host header; over the socket any name is its own.
        .header(header::HOST, "localhost");
    if json.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    Ok(Answer { status, body })
}
