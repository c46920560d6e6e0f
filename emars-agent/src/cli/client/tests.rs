//! The client against a real API server ([`crate::api::testing`]), and its errors.

use super::*;
use crate::api::testing::{rec, seeded, TestServer, T0};
use crate::api::wire::FunctionsResponse;
use serde_json::json;

#[test]
fn new_accepts_host_port_and_url() {
    assert_eq!(
        Client::new("127.0.0.1:9750").base(),
        "http://127.0.0.1:9750"
    );
    assert_eq!(
        Client::new("http://localhost:1/").base(),
        "http://localhost:1"
    );
}

#[test]
fn segment_encoding() {
    assert_eq!(encode_segment("fn-a.b_c:1"), "fn-a.b_c:1");
    assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
}

#[test]
fn connect_error_says_how_to_start() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Client::new(&format!("127.0.0.1:{port}"))
        .get("/healthz")
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("is the agent running"), "{err}");
}

/// The CLI's client of a test server, with its token.
fn cli_client(s: &TestServer) -> Client {
    Client::new(&s.addr.to_string()).with_token(&s.token)
}

#[test]
fn info_and_a_function_with_its_instances() {
    let s = seeded();
    let c = cli_client(&s);
    let info: AgentInfo = s.client().get_as("/v1/info").unwrap();
    assert_eq!(c.info().unwrap(), info);
    let detail: FunctionDetail = s.client().get_as("/v1/functions/fn-a").unwrap();
    let (d, instances) = c.function("fn-a", None).unwrap();
    assert_eq!(d, detail);
    assert_eq!(instances.len(), 3);
    let (_, newest) = c.function("fn-a", Some(1)).unwrap();
    assert_eq!(newest.len(), 1);
}

#[test]
fn the_cli_pages_through_the_newest_instances() {
    let s = TestServer::start();
    for i in 0..25u64 {
        let end = (i % 3 != 0).then_some(T0 + i * 1000 + 500);
        s.store
            .put_instance(&rec(
                "fn-p",
                &format!("i{i:02}"),
                T0 + i * 1000,
                end,
                1 << 20,
            ))
            .unwrap();
    }
    let c = cli_client(&s);
    let names =
        |v: &[InstanceRecord]| -> Vec<String> { v.iter().map(|r| r.instance.clone()).collect() };
    // All of them, oldest first, whatever the page size.
    let (_, all) = c.function("fn-p", None).unwrap();
    let expected: Vec<String> = (0..25).map(|i| format!("i{i:02}")).collect();
    assert_eq!(names(&all), expected);
    let (_, newest) = c.function("fn-p", Some(7)).unwrap();
    assert_eq!(names(&newest), expected[18..]);
    let (_, more) = c.function("fn-p", Some(100)).unwrap();
    assert_eq!(names(&more), expected);
    // In pages of 4: 7 requests, each record once, newest first.
    let paged = c.newest_instances("fn-p", usize::MAX, 4).unwrap();
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(names(&paged), reversed);
    assert_eq!(
        names(&c.newest_instances("fn-p", 9, 4).unwrap()),
        reversed[..9]
    );
}

#[test]
fn the_local_socket_needs_no_token_and_tcp_sends_none_unless_told() {
    let s = seeded();
    let body = json!({"count": 2, "at_ms": T0 + 5});
    let path = "/v1/functions/fn-a/invocations";
    let local = Client::local(&s.socket);
    assert_eq!(local.post(path, &body).unwrap()["count"], 2);
    assert!(local.base().starts_with("unix:"));
    let list: FunctionsResponse = local.get_as("/v1/functions").unwrap();
    assert_eq!(list.functions.len(), 2);

    let e = Client::new(&s.addr.to_string())
        .post(path, &body)
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("401") && text.contains("--token-file"),
        "{text}"
    );
    let missing = s._dir.path().join("no-such-token");
    let e = Client::new(&s.addr.to_string())
        .with_token_file(&missing)
        .post(path, &body)
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("does not exist"), "{e}");
    // Only the 2 reported through the socket were counted.
    let detail: FunctionDetail = s.client().get_as("/v1/functions/fn-a").unwrap();
    assert_eq!(detail.summary.invocations, 2);

    // No agent at a socket: the error says what to check.
    let e = Client::local(&s._dir.path().join("none.sock"))
        .get("/healthz")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is the agent running"), "{e}");
}
