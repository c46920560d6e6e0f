//! The CLI side of the API: a small blocking client, over the agent's TCP port or its local
//! socket ([`super::local`]), that decodes answers as the API's wire types. What the commands
//! print of them is [`super::render`]'s.

use std::fmt::Write as _;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::api::wire::{AgentInfo, ErrorBody, FunctionDetail, InstanceRecord, InstancesResponse};
use crate::view::text::clean;

/// The largest page of instances the API answers.
pub const MAX_PAGE: usize = crate::api::paging::MAX_LIMIT;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `cause` is the innermost error's text alone: the transport's chain repeats it. `tried`
    /// names the address and where it came from, `hint` what to check.
    #[error("cannot reach the EMARS agent at {tried}: {cause}; {hint}")]
    Connect {
        tried: String,
        cause: String,
        hint: String,
    },
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
    /// A write this client would not send (see [`Client::refuse_writes`]).
    #[error("the write was not sent: {0}")]
    NotSent(String),
    #[error("cannot decode the agent's answer to {path}: {source}")]
    Decode {
        path: String,
        source: serde_json::Error,
    },
}

/// How requests reach the agent.
#[derive(Debug, Clone)]
enum Transport {
    /// Its TCP port (`--addr`): whoever listens there gets what is sent, so the token goes
    /// only where the user named both the address and the token file.
    Tcp { base: String, agent: ureq::Agent },
    /// Its local socket (`api.socket`): checked by the agent, no token needed. A user the
    /// socket refuses (not root) may read through `reads_over` (TCP, no token) instead.
    Local {
        socket: std::path::PathBuf,
        reads_over: Option<Box<Transport>>,
    },
}

/// Blocking client of the agent's HTTP API.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    /// The write token (TCP only), when it was given and could be read; else why not.
    token: Option<String>,
    token_problem: Option<String>,
    /// Where the address came from, for errors: "--socket", "api.socket of FILE".
    tried: Option<String>,
    /// Why writes are not sent at all, when they are not.
    writes_refused: Option<String>,
}

/// What to check when the agent's socket does not answer.
const SOCKET_HINT: &str = "is the agent running (`systemctl status emars`)? If it runs with a \
    config of its own, name that config (--config FILE, or EMARS_CONFIG), or its socket \
    (--socket PATH), or its TCP port (--addr HOST:PORT)";

/// What to check when the agent's TCP port does not answer.
const TCP_HINT: &str = "is the agent running (`systemctl status emars`), and is that its \
    api.listen? Name another address with --addr HOST:PORT (EMARS_ADDR), or the agent's config \
    with --config FILE (EMARS_CONFIG)";

/// Per request, connection and answer included.
const TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// Over TCP: `addr` is `host:port` or a URL (`http://127.0.0.1:9750`); a trailing `/` is
    /// ignored. No token is sent unless one is given ([`Client::with_token_file`]).
    pub fn new(addr: &str) -> Client {
        Client {
            transport: Self::tcp(addr),
            token: None,
            token_problem: None,
            tried: None,
            writes_refused: None,
        }
    }

    /// Through the agent's local socket at `socket`.
    pub fn local(socket: &std::path::Path) -> Client {
        Client {
            transport: Transport::Local {
                socket: socket.to_owned(),
                reads_over: None,
            },
            token: None,
            token_problem: None,
            tried: None,
            writes_refused: None,
        }
    }

    /// For a local client: GETs go to `addr` over TCP (without a token) when the socket
    /// refuses this user, since reads are open to every local user.
    pub fn with_read_fallback(mut self, addr: &str) -> Client {
        if let Transport::Local { reads_over, .. } = &mut self.transport {
            *reads_over = Some(Box::new(Self::tcp(addr)));
        }
        self
    }

    fn tcp(addr: &str) -> Transport {
        let addr = addr.trim().trim_end_matches('/');
        let base = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(TIMEOUT)
            .build();
        Transport::Tcp { base, agent }
    }

    /// Sends the write token of `path` with every write over TCP. When it cannot be read, a
    /// refused write says why.
    pub fn with_token_file(mut self, path: &std::path::Path) -> Client {
        match crate::api::token::Token::read_for_client(path) {
            Ok(t) => self.token = Some(t),
            Err(e) => self.token_problem = Some(e.to_string()),
        }
        self
    }

    /// Sends no write at all, for this reason (which the error gives): for an address whose
    /// writes would need a token that must not go there.
    pub fn refuse_writes(mut self, why: &str) -> Client {
        self.token = None;
        self.writes_refused = Some(why.to_owned());
        self
    }

    /// Says in errors where the address came from (`--addr`, `api.socket of FILE`).
    pub fn tried(mut self, source: impl Into<String>) -> Client {
        self.tried = Some(source.into());
        self
    }

    /// The address and where it came from, as errors name them.
    fn tried_at(&self, transport: &Transport) -> String {
        let at = match transport {
            Transport::Tcp { base, .. } => base.clone(),
            Transport::Local { socket, .. } => format!("unix:{}", socket.display()),
        };
        // The source names the first way in, not the read fallback's port.
        match &self.tried {
            Some(source) if std::ptr::eq(transport, &self.transport) => format!("{at} ({source})"),
            _ => at,
        }
    }

    /// Sends `token` with every write over TCP.
    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.to_owned());
        self
    }

    /// Where requests go: a URL, or `unix:` and the socket's path.
    pub fn base(&self) -> String {
        match &self.transport {
            Transport::Tcp { base, .. } => base.clone(),
            Transport::Local { socket, .. } => format!("unix:{}", socket.display()),
        }
    }

    /// GET `path` (starting with `/`); a non-2xx answer is [`ClientError::Api`].
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.request(&self.transport, "GET", path, None)
    }

    /// POST `body` as JSON to `path`; a non-2xx answer is [`ClientError::Api`].
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        if let Some(why) = &self.writes_refused {
            return Err(ClientError::NotSent(why.clone()));
        }
        let r = self.request(&self.transport, "POST", path, Some(body));
        match (r, &self.transport) {
            (
                Err(ClientError::Api {
                    status: 401,
                    message,
                }),
                Transport::Tcp { .. },
            ) => {
                let why = match (&self.token, &self.token_problem) {
                    (None, Some(problem)) => format!("no token sent: {problem}"),
                    (None, None) => "no token sent: over TCP the CLI sends one only with \
                                     --token-file; as root, leave out --addr to write through \
                                     the agent's local socket"
                        .to_owned(),
                    (Some(_), _) => "the token sent is not this agent's".to_owned(),
                };
                Err(ClientError::Api {
                    status: 401,
                    message: format!("{message} ({why})"),
                })
            }
            (r, _) => r,
        }
    }

    fn request(
        &self,
        transport: &Transport,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let (status, bytes) = match transport {
            Transport::Tcp { base, agent } => {
                let mut req = agent.request(method, &format!("{base}{path}"));
                if let (Some(t), Some(_)) = (&self.token, body) {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
                let sent = match body {
                    Some(b) => req.send_json(b),
                    None => req.call(),
                };
                match sent {
                    Ok(resp) => (resp.status(), read_body(resp)),
                    Err(ureq::Error::Status(status, resp)) => (status, read_body(resp)),
                    Err(ureq::Error::Transport(t)) => {
                        return Err(ClientError::Connect {
                            tried: self.tried_at(transport),
                            cause: innermost(&t),
                            hint: TCP_HINT.into(),
                        })
                    }
                }
            }
            Transport::Local { socket, reads_over } => {
                let json = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
                let method = if body.is_some() {
                    hyper::Method::POST
                } else {
                    hyper::Method::GET
                };
                match super::local::exchange(socket, method, path, json, TIMEOUT) {
                    Ok(a) => (a.status, a.body),
                    Err(e)
                        if e.is_permission_denied() && body.is_none() && reads_over.is_some() =>
                    {
                        let over = reads_over.as_deref().unwrap_or(transport);
                        // Both tries named: the socket this user may not use, then the port.
                        return self.request(over, "GET", path, None).map_err(|e| match e {
                            ClientError::Connect { tried, cause, .. } => ClientError::Connect {
                                tried: format!(
                                    "{}, which is root's or api.socket_group's (not this \
                                     user's), nor for reads at {tried}",
                                    self.tried_at(transport)
                                ),
                                cause,
                                hint: TCP_HINT.into(),
                            },
                            other => other,
                        });
                    }
                    Err(e) => {
                        let hint = if e.is_permission_denied() {
                            "the socket is root's (or api.socket_group's): run the command as root"
                        } else {
                            SOCKET_HINT
                        };
                        return Err(ClientError::Connect {
                            tried: self.tried_at(transport),
                            cause: innermost(&e),
                            hint: hint.into(),
                        });
                    }
                }
            }
        };
        if !(200..300).contains(&status) {
            return Err(ClientError::Api {
                status,
                message: error_message(status, &bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            path: path.to_string(),
            source,
        })
    }

    /// GET `path`, decoded as the wire type `T`.
    pub fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode_as(path, self.get(path)?)
    }

    /// POST `body` to `path`, the answer decoded as the wire type `T`.
    pub fn post_as<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_value(body).map_err(|source| ClientError::Decode {
            path: path.to_string(),
            source,
        })?;
        decode_as(path, self.post(path, &body)?)
    }

    /// GET /v1/info.
    pub fn info(&self) -> Result<AgentInfo, ClientError> {
        self.get_as("/v1/info")
    }

    /// GET /v1/functions/{name} and its newest `limit` instances (all when None), oldest
    /// first: what [`super::render::render_function`] takes.
    pub fn function(
        &self,
        name: &str,
        limit: Option<usize>,
    ) -> Result<(FunctionDetail, Vec<InstanceRecord>), ClientError> {
        let seg = encode_segment(name);
        let d: FunctionDetail = self.get_as(&format!("/v1/functions/{seg}"))?;
        let mut newest = self.newest_instances(name, limit.unwrap_or(usize::MAX), MAX_PAGE)?;
        newest.reverse();
        Ok((d, newest))
    }

    /// Up to `want` of the newest instances of `function`, newest first: page after page (of
    /// at most `page` records) until there are as many or no more.
    pub fn newest_instances(
        &self,
        function: &str,
        want: usize,
        page: usize,
    ) -> Result<Vec<InstanceRecord>, ClientError> {
        let seg = encode_segment(function);
        let mut out: Vec<InstanceRecord> = Vec::new();
        let mut cursor: Option<String> = None;
        while out.len() < want {
            let limit = (want - out.len()).clamp(1, page.clamp(1, MAX_PAGE));
            let after = cursor.map_or_else(String::new, |c| format!("&cursor={c}"));
            let i: InstancesResponse = self.get_as(&format!(
                "/v1/functions/{seg}/instances?order=newest&limit={limit}{after}"
            ))?;
            out.extend(i.instances.into_iter().map(|v| v.record));
            match i.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        out.truncate(want);
        Ok(out)
    }
}

/// The text of the innermost cause of `e` (the others wrap and repeat it).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An answer's body, at most 64 MiB (a bound, not a figure the API comes near).
fn read_body(resp: ureq::Response) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let _ = resp.into_reader().take(64 << 20).read_to_end(&mut out);
    out
}

fn decode_as<T: DeserializeOwned>(path: &str, v: serde_json::Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|source| ClientError::Decode {
        path: path.to_string(),
        source,
    })
}

/// The `"error"` of an API error body, else the body text (bounded), else the status.
fn error_message(status: u16, body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return e.error;
    }
    let body = String::from_utf8_lossy(body);
    let body = body.trim();
    if body.is_empty() {
        format!("HTTP {status}")
    } else {
        clean(&body.chars().take(500).collect::<String>())
    }
}

/// Percent-encodes everything but unreserved characters, for use as one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests;
