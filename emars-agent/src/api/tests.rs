use super::testing::{raw, rec, seeded, TestClient, TestError, TestServer, HOUR, T0};
use super::*;
use crate::model::{ModelFootprint, RequestSource};
use serde_json::json;

fn expect_api_err(r: Result<serde_json::Value, TestError>, status: u16, needle: &str) {
    match r {
        Err(TestError::Api { status: s, message }) => {
            assert_eq!(s, status, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected API error {status}, got {other:?}"),
    }
}

#[test]
fn healthz_and_info() {
    let s = TestServer::start();
    let c = s.client();
    assert_eq!(c.get("/healthz").unwrap(), json!({"ok": true}));
    s.info.write().unwrap().events_received = 42;
    let v = c.get("/v1/info").unwrap();
    let info: AgentInfo = serde_json::from_value(v).unwrap();
    assert_eq!(info.kernel, "6.1.0-test");
    assert_eq!(info.events_received, 42);
    // The store's id, whatever the event loop's copy says.
    assert_eq!(info.agent_id.len(), 32, "{info:?}");
    assert_eq!(info.agent_id, s.store.agent_id());
    assert_eq!(c.get_as::<AgentInfo>("/v1/info").unwrap(), info);
    assert_eq!(info.model, ModelFootprint::default());
    // The model's entries, counted as of the request.
    let s = seeded();
    let m = s.client().get_as::<AgentInfo>("/v1/info").unwrap().model;
    assert_eq!((m.functions, m.live, m.ended, m.hours), (2, 2, 2, 0));
    assert!(m.bytes > 0, "{m:?}");
}

#[test]
fn functions_list_and_detail() {
    let s = seeded();
    s.store.add_invocations("fn-a", 7, T0 + 10).unwrap();
    let c = s.client();
    let v = c.get("/v1/functions").unwrap();
    let list: FunctionsResponse = serde_json::from_value(v).unwrap();
    let names: Vec<_> = list.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["fn-a", "fn-b"]);
    let a = &list.functions[0];
    assert_eq!((a.instances, a.live_instances, a.execs), (3, 1, 6));
    assert_eq!(a.peak_bytes, 30 << 20);
    assert_eq!(a.invocations, 7);

    let v = c.get("/v1/functions/fn-a").unwrap();
    assert_eq!(v["name"], "fn-a");
    assert_eq!(v["instances"], 3);
    let detail: FunctionDetail = serde_json::from_value(v).unwrap();
    assert_eq!(&detail.summary, a);
    assert_eq!(detail.hours.len(), 1);
    assert_eq!(detail.hours[0].hour_start_ms, T0);
    assert_eq!(detail.hours[0].invocations, 7);

    expect_api_err(c.get("/v1/functions/nope"), 404, "\"nope\"");
    expect_api_err(c.get("/v1/functions/a%2Fb"), 400, "\"a/b\"");
    let long = "x".repeat(200);
    expect_api_err(c.get(&format!("/v1/functions/{long}")), 400, "200 bytes");
    expect_api_err(c.get("/v1/functions/%FF"), 400, "bad path");
}

#[test]
fn instances_filters() {
    let s = seeded();
    let c = s.client();
    let get = |q: &str| -> InstancesResponse {
        serde_json::from_value(c.get(&format!("/v1/functions/fn-a/instances{q}")).unwrap()).unwrap()
    };
    let ids = |r: &InstancesResponse| -> Vec<String> {
        r.instances
            .iter()
            .map(|i| i.record.instance.clone())
            .collect()
    };
    let all = get("");
    assert_eq!(all.function, "fn-a");
    assert_eq!(ids(&all), ["i1", "i2", "i3"]);
    assert_eq!(all.next, None);
    assert_eq!(
        all.instances[0].record,
        rec("fn-a", "i1", T0, Some(T0 + 1000), 10 << 20)
    );
    // No cgroup writer in this server: no usage, and the field is left out.
    assert_eq!(all.instances[0].usage_bytes, None);
    assert_eq!(ids(&get("?live=true")), ["i3"]);
    assert_eq!(ids(&get("?live=false")), ["i1", "i2"]);
    assert_eq!(ids(&get("?order=newest")), ["i3", "i2", "i1"]);
    assert_eq!(ids(&get("?live=false&order=newest&limit=1")), ["i2"]);
    assert_eq!(ids(&get("?limit=10000")).len(), 3);
    // A page that ends exactly at the last record says there is no next one.
    assert_eq!(get("?limit=3").next, None);
    // Pages of 2: a cursor to the rest, and none after the last.
    let first = get("?limit=2");
    assert_eq!(ids(&first), ["i1", "i2"]);
    let next = first.next.clone().expect("a next page");
    assert_eq!(next, paging::encode_cursor((T0 + 2000, (T0 + 2000) / 1000)));
    let second = get(&format!("?limit=2&cursor={next}"));
    assert_eq!((ids(&second), second.next), (vec!["i3".to_owned()], None));
    let newest = get("?limit=2&order=newest");
    assert_eq!(ids(&newest), ["i3", "i2"]);
    let older = get(&format!(
        "?limit=2&order=newest&cursor={}",
        newest.next.unwrap()
    ));
    assert_eq!((ids(&older), older.next), (vec!["i1".to_owned()], None));
    // A cursor past the end is an empty page of a known function, not a 404.
    let past = paging::encode_cursor((u64::MAX, u64::MAX));
    assert!(get(&format!("?cursor={past}")).instances.is_empty());

    expect_api_err(c.get("/v1/functions/fn-a/instances?limit=0"), 400, "\"0\"");
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?limit=10001"),
        400,
        "10001",
    );
    expect_api_err(c.get("/v1/functions/fn-a/instances?limit=x"), 400, "limit");
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?live=yes"),
        400,
        "\"yes\"",
    );
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?cursor=nope"),
        400,
        "`cursor`",
    );
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?order=up"),
        400,
        "oldest or newest",
    );
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?lve=true"),
        400,
        "\"lve\"",
    );
    expect_api_err(
        c.get("/v1/functions/fn-a/instances?live=true&live=false"),
        400,
        "twice",
    );
    expect_api_err(c.get("/v1/functions/nope/instances"), 404, "\"nope\"");

    // Known only through invocations: an empty list, not a 404.
    s.store.add_invocations("fn-c", 1, T0).unwrap();
    assert!(get_c(&c).instances.is_empty());
    fn get_c(c: &TestClient) -> InstancesResponse {
        serde_json::from_value(c.get("/v1/functions/fn-c/instances").unwrap()).unwrap()
    }
}

#[test]
fn invocations_post_then_get() {
    let s = seeded();
    let c = s.client();
    let v = c
        .post(
            "/v1/functions/fn-a/invocations",
            &json!({"count": 5, "at_ms": T0 + 5}),
        )
        .unwrap();
    assert_eq!(v, json!({"function": "fn-a", "count": 5, "at_ms": T0 + 5}));
    c.post(
        "/v1/functions/fn-a/invocations",
        &json!({"count": 3, "at_ms": T0 + HOUR}),
    )
    .unwrap();
    // Unknown but valid: accepted, and the function becomes known. No at_ms: now.
    let v = c
        .post("/v1/functions/new.fn:v1/invocations", &json!({"count": 1}))
        .unwrap();
    assert!(v["at_ms"].as_u64().unwrap() > T0);

    let detail: FunctionDetail =
        serde_json::from_value(c.get("/v1/functions/fn-a").unwrap()).unwrap();
    assert_eq!(detail.summary.invocations, 8);
    let per_hour: Vec<_> = detail
        .hours
        .iter()
        .map(|h| (h.hour_start_ms, h.invocations))
        .collect();
    assert_eq!(per_hour, [(T0, 5), (T0 + HOUR, 3)]);
    let v = c.get("/v1/functions/new.fn:v1").unwrap();
    assert_eq!(v["invocations"], 1);
}

#[test]
fn invocations_rejections() {
    let s = seeded();
    let c = s.client();
    let path = "/v1/functions/fn-a/invocations";
    expect_api_err(c.post(path, &json!({"count": 0})), 400, "got 0");
    expect_api_err(
        c.post(path, &json!({"count": 1_000_000_001u64})),
        400,
        "1000000001",
    );
    expect_api_err(c.post(path, &json!({"count": -1})), 400, "-1");
    expect_api_err(c.post(path, &json!({"count": "5"})), 400, "invalid type");
    expect_api_err(c.post(path, &json!({})), 400, "missing field `count`");
    expect_api_err(c.post(path, &json!({"count": 1, "atms": 5})), 400, "atms");
    expect_api_err(
        c.post("/v1/functions/a%2Fb/invocations", &json!({"count": 1})),
        400,
        "\"a/b\"",
    );
    let long = "y".repeat(200);
    expect_api_err(
        c.post(
            &format!("/v1/functions/{long}/invocations"),
            &json!({"count": 1}),
        ),
        400,
        "invalid function name",
    );

    let (st, v) = raw(s
        .post(path)
        .set("Content-Type", "application/json")
        .send_string("{\"count\": "));
    assert_eq!((st, v["status"].as_u64()), (400, Some(400)));
    assert!(
        v["error"].as_str().unwrap().contains("malformed JSON"),
        "{v}"
    );

    let (st, v) = raw(s
        .post(path)
        .set("Content-Type", "text/plain")
        .send_string("{\"count\": 1}"));
    assert_eq!((st, v["status"].as_u64()), (415, Some(415)));
    assert!(v["error"].as_str().unwrap().contains("Content-Type"), "{v}");

    let (st, _) = raw(s.post(path).call());
    assert_eq!(st, 415);
    // Without the token, nothing else is looked at.
    let (st, v) = raw(ureq::post(&s.url(path))
        .set("Content-Type", "application/json")
        .send_string("{\"count\": 1}"));
    assert_eq!(st, 401, "{v}");

    let big = format!("{{\"count\": 1, \"pad\": \"{}\"}}", "z".repeat(BODY_LIMIT));
    let (st, v) = raw(s
        .post(path)
        .set("Content-Type", "application/json")
        .send_string(&big));
    assert_eq!((st, v["status"].as_u64()), (413, Some(413)));

    // Nothing of the above was recorded.
    let v = c.get("/v1/functions/fn-a").unwrap();
    assert_eq!(v["invocations"], 0);
}

#[test]
fn export_content() {
    let s = seeded();
    let c = s.client();
    c.post(
        "/v1/functions/fn-b/invocations",
        &json!({"count": 40, "at_ms": T0}),
    )
    .unwrap();
    c.post(
        "/v1/functions/fn-b/invocations",
        &json!({"count": 9, "at_ms": T0 + HOUR}),
    )
    .unwrap();
    let v = c.get("/v1/export").unwrap();
    let e: ExportResponse = serde_json::from_value(v).unwrap();
    assert!(e.generated_at_ms > T0);
    assert_eq!(
        e.functions,
        [
            FunctionConfig {
                function: "fn-a".into(),
                requests_per_hour: 0,
                requests_source: RequestSource::Execs,
                max_memory_bytes: 30 << 20,
            },
            FunctionConfig {
                function: "fn-b".into(),
                requests_per_hour: 40,
                requests_source: RequestSource::Platform,
                max_memory_bytes: 5 << 20,
            },
        ]
    );
}

#[test]
fn unknown_routes_and_methods() {
    let s = TestServer::start();
    let c = s.client();
    expect_api_err(c.get("/nope"), 404, "GET /nope");
    expect_api_err(
        c.get("/v1/functions/fn-a/other"),
        404,
        "/v1/functions/fn-a/other",
    );
    expect_api_err(c.post("/v1/info", &json!({})), 405, "POST");
    expect_api_err(c.get("/v1/functions/fn-a/invocations"), 405, "GET");

    let (st, v) = raw(ureq::get(&s.url("/v2/x")).call());
    assert_eq!((st, v["status"].as_u64()), (404, Some(404)));
    let head = ureq::head(&s.url("/healthz")).call().unwrap();
    assert_eq!(head.status(), 200);

    let (st, _) = raw(ureq::delete(&s.url("/v1/functions")).call());
    assert_eq!(st, 401, "writes of any method need the token first");
    let resp = ureq::delete(&s.url("/v1/functions"))
        .set("Authorization", &format!("Bearer {}", s.token))
        .call();
    let Err(ureq::Error::Status(405, r)) = resp else {
        panic!("expected 405");
    };
    assert_eq!(r.header("allow"), Some("GET,HEAD"));
    let (st, v) = raw(Ok(r));
    assert_eq!((st, v["status"].as_u64()), (405, Some(405)));
    // With the token, a method the route does not take is a 405 whatever the body: the
    // content type is looked at only on a route that takes the method.
    for path in [
        "/v1/functions",
        "/v1/apply",
        "/v1/functions/fn-a/invocations",
    ] {
        let resp = ureq::put(&s.url(path))
            .set("Authorization", &format!("Bearer {}", s.token))
            .set("Content-Type", "text/plain")
            .send_string("x");
        let Err(ureq::Error::Status(405, r)) = resp else {
            panic!("PUT {path}: expected 405, got {resp:?}");
        };
        assert!(r.header("allow").is_some(), "PUT {path}");
    }
    let (st, _) = raw(s
        .post("/v1/apply")
        .set("Content-Type", "text/plain")
        .send_string("{}"));
    assert_eq!(st, 415, "a routed write still needs JSON");
}

#[test]
fn store_error_is_500() {
    let e = ApiError::from(StoreError::Db(sled::Error::Unsupported("boom".into())));
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(e.message.contains("boom"));
}
