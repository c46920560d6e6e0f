//! Who may talk to the API, checked on every request before any route sees it.
//!
//! - Host: only this agent's own names (loopback names, the listen address, `api.allowed_hosts`)
//!   on its port. A foreign Host header is how a web page reaches a local service through DNS
//!   rebinding.
//! - Cross-site: a request a browser marks as coming from another site (`Origin` other than the
//!   agent's own, `Sec-Fetch-Site` other than `same-origin`/`none`) is refused on every route,
//!   whatever it carries.
//! - Writes: every method but GET and HEAD, on any route (today's and tomorrow's, and unknown
//!   ones), needs `Authorization: Bearer <token>` ([`super::token`]) ([`layer`], before
//!   routing), and POST/PUT/PATCH to a route a JSON content type ([`json_body`], after routing:
//!   a method the route does not take is a 405 with `Allow`, whatever its body). A browser form
//!   can send neither without a CORS preflight, which the agent never grants.
//! - The local socket: its peers were checked by their kernel credentials when they connected
//!   ([`super::listen::PeerRule`]), and no browser can reach a unix socket: no Host check and
//!   no token there (the JSON body rule holds all the same). A request without a [`Peer`] (not
//!   from [`super::server`]) is a TCP one.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{server::Peer, token::Token, ApiError};

/// What the guard accepts.
#[derive(Debug, Clone)]
pub struct Guard {
    token: Token,
    /// Accepted Host names, lowercase, without port ("localhost", "127.0.0.1", "[::1]").
    hosts: Vec<String>,
    port: u16,
}

impl Guard {
    /// `listen` is the bound address (its real port); `extra_hosts` are `api.allowed_hosts`.
    pub fn new(token: Token, listen: SocketAddr, extra_hosts: &[String]) -> Guard {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let ip = match listen.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        if !listen.ip().is_unspecified() {
            hosts.push(ip);
        }
        hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
        hosts.sort();
        hosts.dedup();
        Guard {
            token,
            hosts,
            port: listen.port(),
        }
    }

    /// `host[:port]` names this agent.
    fn is_own_authority(&self, authority: &str) -> bool {
        let authority = authority.to_ascii_lowercase();
        // "[::1]:9750", "localhost:9750", "localhost" (port 80).
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h.to_owned(), p.parse::<u16>().ok()),
            _ => (authority.clone(), Some(80)),
        };
        port == Some(self.port) && self.hosts.contains(&host)
    }

    /// The verdict on one request's method and headers, from `peer`.
    pub fn check(
        &self,
        peer: Option<&Peer>,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        if let Some(Peer::Local { .. }) = peer {
            return Ok(());
        }
        let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, m);
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                ApiError::bad_request("missing or non-ASCII Host header; the agent needs one")
            })?;
        if !self.is_own_authority(host) {
            return Err(forbidden(format!(
                "refused: Host {host:?} does not name this agent (accepted: {} on port {}; add \
                 names to api.allowed_hosts); foreign Host headers are how web pages reach local \
                 services",
                self.hosts.join(", "),
                self.port
            )));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let own = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|a| self.is_own_authority(a));
            if !own {
                return Err(forbidden(format!(
                    "refused: cross-origin request (Origin {origin:?}); the API serves its own \
                     origin and command-line clients only"
                )));
            }
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            if !matches!(site.as_bytes(), b"same-origin" | b"none") {
                return Err(forbidden(format!(
                    "refused: cross-site request (Sec-Fetch-Site {site:?})"
                )));
            }
        }
        if method == Method::GET || method == Method::HEAD {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|t| self.token.matches(t.trim())) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "{method} needs the agent's write token (Authorization: Bearer …, from the \
                     root-only file api.token_file) over TCP; the emars CLI writes through the \
                     local socket (api.socket) and needs none there"
                ),
            ));
        }
        Ok(())
    }
}

/// The verdict on a routed write's content type: POST, PUT and PATCH (the methods a form or a
/// script might send without a preflight in the browser's eyes) need a JSON body.
pub fn check_json_body(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return Ok(());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes take a JSON body: expected header `Content-Type: application/json` \
             (send `{}` when there is nothing to say)",
        ));
    }
    Ok(())
}

/// The axum middleware on each route (`route_layer`: after routing, so that a method the
/// route does not take is answered 405 first).
pub async fn json_body(req: Request, next: Next) -> Response {
    match check_json_body(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The axum middleware around every route and the fallbacks.
pub async fn layer(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().copied();
    match guard.check(peer.as_ref(), req.method(), req.headers()) {
        Ok(()) => {
            let local = matches!(peer, Some(Peer::Local { .. }));
            super::work::for_peer(local, next.run(req)).await
        }
        Err(e) => {
            let unauthorized = e.status == StatusCode::UNAUTHORIZED;
            tracing::debug!(method = %req.method(), path = req.uri().path(), status = %e.status, "request refused");
            let mut resp = e.into_response();
            if unauthorized {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"emars\""),
                );
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> (Guard, String) {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::load_or_create(&dir.path().join("t")).unwrap();
        let t = token.as_str().to_owned();
        (Guard::new(token, "127.0.0.1:9750".parse().unwrap(), &[]), t)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn status(r: Result<(), ApiError>) -> u16 {
        r.map_or_else(|e| e.status.as_u16(), |()| 200)
    }

    #[test]
    fn hosts() {
        let (g, _) = guard();
        let get = |host: &str| status(g.check(None, &Method::GET, &headers(&[("host", host)])));
        for ok in [
            "127.0.0.1:9750",
            "localhost:9750",
            "LOCALHOST:9750",
            "[::1]:9750",
        ] {
            assert_eq!(get(ok), 200, "{ok}");
        }
        for bad in [
            "evil.example:9750",
            "127.0.0.1:9751",
            "127.0.0.1",
            "localhost.evil.example:9750",
            "[::1]",
        ] {
            assert_eq!(get(bad), 403, "{bad}");
        }
        assert_eq!(status(g.check(None, &Method::GET, &HeaderMap::new())), 400);
    }

    #[test]
    fn cross_site_is_refused_even_with_the_token() {
        let (g, t) = guard();
        let auth = format!("Bearer {t}");
        let base = [
            ("host", "127.0.0.1:9750"),
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let with = |extra: (&'static str, &str)| {
            let mut h = headers(&base);
            h.insert(extra.0, extra.1.parse().unwrap());
            status(
                g.check(None, &Method::POST, &h)
                    .and_then(|()| check_json_body(&Method::POST, &h)),
            )
        };
        assert_eq!(status(g.check(None, &Method::POST, &headers(&base))), 200);
        assert_eq!(with(("origin", "http://evil.example")), 403);
        assert_eq!(with(("origin", "null")), 403);
        assert_eq!(with(("origin", "http://127.0.0.1:9750")), 200);
        assert_eq!(with(("sec-fetch-site", "cross-site")), 403);
        assert_eq!(with(("sec-fetch-site", "same-site")), 403);
        assert_eq!(with(("sec-fetch-site", "same-origin")), 200);
        assert_eq!(
            with(("content-type", "application/x-www-form-urlencoded")),
            415
        );
        assert_eq!(with(("content-type", "text/plain")), 415);
        // GET and DELETE carry no body to check.
        let plain = headers(&[("content-type", "text/plain")]);
        assert_eq!(status(check_json_body(&Method::GET, &plain)), 200);
        assert_eq!(status(check_json_body(&Method::DELETE, &plain)), 200);
        assert_eq!(status(check_json_body(&Method::PUT, &plain)), 415);
    }

    #[test]
    fn writes_need_the_token() {
        let (g, t) = guard();
        let post = |auth: Option<&str>| {
            let mut h = headers(&[
                ("host", "localhost:9750"),
                ("content-type", "application/json"),
            ]);
            if let Some(a) = auth {
                h.insert("authorization", a.parse().unwrap());
            }
            status(g.check(None, &Method::POST, &h))
        };
        assert_eq!(post(None), 401);
        assert_eq!(post(Some("Bearer nope")), 401);
        assert_eq!(post(Some(&format!("Basic {t}"))), 401);
        assert_eq!(post(Some(&format!("Bearer {t}"))), 200);
        for m in [Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
            let h = headers(&[("host", "localhost:9750")]);
            assert_eq!(status(g.check(None, &m, &h)), 401, "{m}");
        }
    }

    #[test]
    fn local_socket_peers_need_no_token_but_still_json() {
        let (g, _) = guard();
        let local = Peer::Local { uid: 0, gid: 0 };
        let tcp = Peer::Tcp("127.0.0.1:40000".parse().unwrap());
        // The CLI's Host over the socket names no port; no token.
        let h = headers(&[("host", "localhost"), ("content-type", "application/json")]);
        assert_eq!(status(g.check(Some(&local), &Method::POST, &h)), 200);
        assert_eq!(status(g.check(Some(&tcp), &Method::POST, &h)), 403);
        let h = headers(&[
            ("host", "localhost:9750"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(status(g.check(Some(&tcp), &Method::POST, &h)), 401);
        // The body rule is the route's, after the guard, for every peer.
        let form = headers(&[("host", "localhost"), ("content-type", "text/plain")]);
        assert_eq!(status(g.check(Some(&local), &Method::POST, &form)), 200);
        assert_eq!(status(check_json_body(&Method::POST, &form)), 415);
    }
}
