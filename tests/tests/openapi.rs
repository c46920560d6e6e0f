//! The API contract: the OpenAPI 3.1 document a real agent serves at /v1/openapi.json (made
//! from its routes and wire types) against what that agent answers. Every documented operation
//! is called for real (a real agent in enforce mode, real instances of known memory in real
//! cgroups, a pooled cgroup bound and released), and every answer, errors included, is
//! validated against the schema the document gives for its status. Objects are checked
//! strictly: a field the document does not name fails. The paths that the CLI and the web page
//! call must all be in the document.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use emars_tests::*;
use serde_json::{json, Value};

const FUNCTION: &str = "contract";

/// The document, its operations and what the test has seen of them.
struct Contract {
    doc: Value,
    /// (METHOD, path template) of every operation.
    operations: BTreeSet<(String, String)>,
    /// Operations answered with a 2xx whose body validated.
    answered: BTreeSet<(String, String)>,
    /// Compiled validators by schema (its `$ref`, or the inline schema's text).
    validators: BTreeMap<String, jsonschema::Validator>,
    /// The components, closed (see [`Contract::strict_components`]).
    strict: Value,
}

impl Contract {
    fn new(doc: Value) -> anyhow::Result<Self> {
        let mut operations = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in ["get", "post", "put", "patch", "delete"] {
                if item.get(method).is_some() {
                    operations.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut c = Contract {
            doc,
            operations,
            answered: BTreeSet::new(),
            validators: BTreeMap::new(),
            strict: Value::Null,
        };
        c.strict = c.strict_components();
        Ok(c)
    }

    /// The document's components with every object schema closed to properties it does not
    /// name (`unevaluatedProperties: false`, JSON Schema 2020-12, which OpenAPI 3.1 uses). A
    /// schema that an `allOf` composes is referenced there as an open copy (`NAME.open`), so
    /// that the composite, closed itself, still admits the parts' properties.
    fn strict_components(&self) -> Value {
        let mut components = self.doc["components"].clone();
        let Some(schemas) = components["schemas"].as_object_mut() else {
            return components;
        };
        let mut open = BTreeMap::new();
        for s in schemas.values_mut() {
            for part in s
                .get_mut("allOf")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(r) = part["$ref"].as_str().map(str::to_owned) {
                    let name = r.rsplit('/').next().unwrap_or("").to_owned();
                    part["$ref"] = json!(format!("{r}.open"));
                    open.insert(format!("{name}.open"), name);
                }
            }
        }
        for s in schemas.values_mut() {
            if let Some(o) = s.as_object_mut() {
                let is_object = o.get("type") == Some(&json!("object")) || o.contains_key("allOf");
                if is_object && !o.contains_key("additionalProperties") {
                    o.insert("unevaluatedProperties".into(), json!(false));
                }
            }
        }
        for (copy, name) in open {
            let mut s = self.doc["components"]["schemas"][&name].clone();
            if let Some(o) = s.as_object_mut() {
                o.remove("unevaluatedProperties");
            }
            schemas.insert(copy, s);
        }
        components
    }

    /// The response object the document gives for `status` (else its `default`).
    fn response(&self, method: &str, template: &str, status: u16) -> Option<&Value> {
        let responses = &self.doc["paths"][template][method.to_lowercase()]["responses"];
        let r = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))?;
        Some(r)
    }

    /// Checks one real answer against the document; a 2xx counts the operation as answered.
    fn check(
        &mut self,
        method: &str,
        template: &str,
        status: u16,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<()> {
        let op = (method.to_owned(), template.to_owned());
        assert!(
            self.operations.contains(&op),
            "{method} {template} is not in the document"
        );
        let response = self
            .response(method, template, status)
            .unwrap_or_else(|| panic!("{method} {template}: status {status} is not documented"))
            .clone();
        let media = content_type.split(';').next().unwrap_or("").trim();
        let content = &response["content"];
        if let Some(declared) = content.as_object() {
            assert!(
                declared.contains_key(media),
                "{method} {template} → {status}: content type {media:?} not among {:?}",
                declared.keys().collect::<Vec<_>>()
            );
        }
        // Every JSON answer is validated, against a `$ref` or an inline schema alike.
        let schema = &content[media]["schema"];
        if media == "application/json" && !schema.is_null() {
            let value: Value = serde_json::from_str(body).map_err(|e| {
                anyhow::anyhow!("{method} {template} → {status}: not JSON ({e}): {body}")
            })?;
            let key = schema["$ref"]
                .as_str()
                .map_or_else(|| schema.to_string(), str::to_owned);
            if !self.validators.contains_key(&key) {
                let mut root = schema.clone();
                if let Some(o) = root.as_object_mut() {
                    o.insert(
                        "$schema".into(),
                        json!("https://json-schema.org/draft/2020-12/schema"),
                    );
                    o.insert("components".into(), self.strict.clone());
                }
                let v = jsonschema::validator_for(&root)
                    .map_err(|e| anyhow::anyhow!("schema {key} does not compile: {e}"))?;
                self.validators.insert(key.clone(), v);
            }
            let errors: Vec<String> = self.validators[&key]
                .iter_errors(&value)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {template} → {status} does not match {key}:\n{}\n{value:#}",
                errors.join("\n")
            );
        } else if media == "application/json" && template != "/v1/openapi.json" {
            // (The document itself is compared with `emars openapi`'s whole.)
            panic!("{method} {template} → {status}: a JSON answer without a schema");
        }
        if (200..300).contains(&status) {
            self.answered.insert(op);
        }
        Ok(())
    }
}

/// One request with the write token on POSTs: (status, content type, body).
fn call(
    agent: &Agent,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, String, String)> {
    let mut req = ureq::request(method, &agent.url(path));
    if method == "POST" {
        req = req
            .set("Content-Type", "application/json")
            .set("Authorization", &format!("Bearer {}", agent.token));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = match req.send_string(&body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => anyhow::bail!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let ct = resp.header("content-type").unwrap_or("").to_owned();
    Ok((status, ct, resp.into_string()?))
}

/// Calls `path` (a concrete path of the operation `template`) and checks the answer.
fn exercise(
    c: &mut Contract,
    agent: &Agent,
    method: &str,
    template: &str,
    path: &str,
    body: Option<Value>,
    expect: u16,
) -> anyhow::Result<String> {
    let (status, ct, text) = call(agent, method, path, body)?;
    assert_eq!(status, expect, "{method} {path}: {text}\n{}", agent.log());
    c.check(method, template, status, &ct, &text)?;
    Ok(text)
}

#[test]
fn every_route_is_documented_and_real_answers_match_the_document() -> anyhow::Result<()> {
    let test = "every_route_is_documented_and_real_answers_match_the_document";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\nexport_dir = \"{{dir}}/export\"\n\
             [[policy.functions]]\nname = \"{FUNCTION}\"\npin_max_bytes = 268435456\n"
        ),
    )?;
    let (status, ct, text) = call(&agent, "GET", "/v1/openapi.json", None)?;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/json"), "{ct}");
    let doc: Value = serde_json::from_str(&text)?;
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    // What `emars openapi` prints is the same document.
    let printed = std::process::Command::new(agent_bin())
        .arg("openapi")
        .output()?;
    assert!(printed.status.success());
    assert_eq!(serde_json::from_slice::<Value>(&printed.stdout)?, doc);
    // Every operation states its errors; every write, the token the guard asks for.
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            assert_eq!(
                op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
            let token = op["security"].to_string().contains("\"token\"");
            assert_eq!(
                token,
                method != "get",
                "{method} {path}: {}",
                op["security"]
            );
        }
    }
    let mut c = Contract::new(doc)?;
    println!("{} operations documented", c.operations.len());

    // Real instances: two ended (18 and 30 MiB), one live.
    for (i, mib) in [18u64, 30].iter().enumerate() {
        let dir = root.instance_dir(FUNCTION, &format!("e{i}"))?;
        assert!(run_alloc(&dir, *mib, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(FUNCTION, 2)?;
    let live_dir = root.instance_dir(FUNCTION, "live")?;
    let mut child = spawn_alloc(&live_dir, 12, 120_000, 0)?;
    agent.wait_live(FUNCTION, "live")?;
    // Wait for the once-a-second info update to have counted the events.
    wait_for(std::time::Duration::from_secs(5), || {
        let info = agent.get_ok("/v1/info").ok()?;
        (info["events_received"].as_u64()? > 0).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("no events counted:\n{}", agent.log()))?;

    let f = format!("/v1/functions/{FUNCTION}");
    for (method, template, path) in [
        ("GET", "/", "/".to_owned()),
        ("GET", "/assets/app.js", "/assets/app.js".to_owned()),
        ("GET", "/assets/app.css", "/assets/app.css".to_owned()),
        ("GET", "/healthz", "/healthz".to_owned()),
        ("GET", "/metrics", "/metrics".to_owned()),
        ("GET", "/v1/openapi.json", "/v1/openapi.json".to_owned()),
        ("GET", "/v1/info", "/v1/info".to_owned()),
        ("GET", "/v1/functions", "/v1/functions".to_owned()),
        ("GET", "/v1/functions/{name}", f.clone()),
        (
            "GET",
            "/v1/functions/{name}/instances",
            format!("{f}/instances"),
        ),
        (
            "GET",
            "/v1/functions/{name}/instances",
            format!("{f}/instances?live=true&limit=1"),
        ),
        // A page with a `next`, and the page it names.
        (
            "GET",
            "/v1/functions/{name}/instances",
            format!("{f}/instances?limit=2&order=newest"),
        ),
        ("GET", "/v1/export", "/v1/export".to_owned()),
        (
            "GET",
            "/v1/functions/{name}/recommendation",
            format!("{f}/recommendation"),
        ),
        ("GET", "/v1/functions/{name}/limits", format!("{f}/limits")),
        (
            "GET",
            "/v1/functions/{name}/keepalive",
            format!("{f}/keepalive"),
        ),
        (
            "GET",
            "/v1/recommendations",
            "/v1/recommendations".to_owned(),
        ),
    ] {
        exercise(&mut c, &agent, method, template, &path, None, 200)?;
    }
    // The live instance with what it uses now, once it holds its 12 MiB (it may still be
    // allocating: emulated VMs are slow).
    wait_for(std::time::Duration::from_secs(10), || {
        let l = agent.get_ok(&format!("{f}/instances?live=true")).ok()?;
        (l["instances"][0]["usage_bytes"].as_u64()? >= 12 * MIB).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("the live instance's usage never reached 12 MiB"))?;
    let live: Value = serde_json::from_str(&exercise(
        &mut c,
        &agent,
        "GET",
        "/v1/functions/{name}/instances",
        &format!("{f}/instances?live=true"),
        None,
        200,
    )?)?;
    let usage = live["instances"][0]["usage_bytes"].as_u64().unwrap_or(0);
    assert!((12 * MIB..20 * MIB).contains(&usage), "{live}");
    // The writes and what they make, in order: invocations, a generation (then listed), limits
    // applied and set by hand, an admission (then counted).
    for (method, template, path, body) in [
        (
            "POST",
            "/v1/functions/{name}/invocations",
            format!("{f}/invocations"),
            Some(json!({"count": 5})),
        ),
        (
            "POST",
            "/v1/recommendations/generate",
            "/v1/recommendations/generate".to_owned(),
            Some(json!({})),
        ),
        (
            "GET",
            "/v1/generations",
            format!("/v1/generations?limit=5&function={FUNCTION}"),
            None,
        ),
        ("POST", "/v1/apply", "/v1/apply".to_owned(), Some(json!({}))),
        (
            "POST",
            "/v1/functions/{name}/instances/{instance}/limits",
            format!("{f}/instances/live/limits"),
            Some(json!({"max_bytes": 200u64 * MIB})),
        ),
        (
            "POST",
            "/v1/admission",
            "/v1/admission".to_owned(),
            Some(json!({"function": FUNCTION})),
        ),
        ("GET", "/v1/admission", "/v1/admission".to_owned(), None),
    ] {
        exercise(&mut c, &agent, method, template, &path, body, 200)?;
    }
    // A pooled cgroup (one segment below the root: no path rule names it), bound and released.
    let slot = root.dir.join("cg-1");
    fs::create_dir(&slot)?;
    let cgroup = slot.display().to_string();
    exercise(
        &mut c,
        &agent,
        "POST",
        "/v1/bind",
        "/v1/bind",
        Some(json!({"cgroup": cgroup, "function": FUNCTION, "instance": "use-1"})),
        200,
    )?;
    assert!(run_alloc(&slot, 8, 0, 0)?.success());
    exercise(
        &mut c,
        &agent,
        "POST",
        "/v1/release",
        "/v1/release",
        Some(json!({"cgroup": cgroup})),
        200,
    )?;
    // The audit now holds limit writes of every kind made above.
    let audit = exercise(
        &mut c,
        &agent,
        "GET",
        "/v1/audit",
        "/v1/audit?limit=50",
        None,
        200,
    )?;
    assert!(audit.contains("\"reason\":\"api\""), "{audit}");

    // Errors are documented too, and have the documented body.
    for (method, template, path, body, expect) in [
        (
            "GET",
            "/v1/functions/{name}",
            "/v1/functions/nope".to_owned(),
            None,
            404,
        ),
        (
            "GET",
            "/v1/functions/{name}",
            "/v1/functions/bad%20name".to_owned(),
            None,
            400,
        ),
        (
            "GET",
            "/v1/functions/{name}/instances",
            format!("{f}/instances?limit=0"),
            None,
            400,
        ),
        (
            "GET",
            "/v1/functions/{name}/instances",
            format!("{f}/instances?cursor=not-a-cursor"),
            None,
            400,
        ),
        (
            "POST",
            "/v1/functions/{name}/instances/{instance}/limits",
            format!("{f}/instances/live/limits"),
            Some(json!({"max_bytes": null})),
            400,
        ),
        (
            "POST",
            "/v1/apply",
            "/v1/apply".to_owned(),
            Some(json!({"dry_run": true})),
            400,
        ),
        (
            "POST",
            "/v1/functions/{name}/invocations",
            format!("{f}/invocations"),
            Some(json!({"count": 1, "at_ms": 1})),
            422,
        ),
        (
            "POST",
            "/v1/functions/{name}/instances/{instance}/limits",
            format!("{f}/instances/live/limits"),
            Some(json!({"max_bytes": 4096})),
            422,
        ),
        (
            "POST",
            "/v1/release",
            "/v1/release".to_owned(),
            Some(json!({"cgroup": cgroup})),
            409,
        ),
        (
            "POST",
            "/v1/bind",
            "/v1/bind".to_owned(),
            Some(json!({"cgroup": cgroup, "function": FUNCTION})),
            400,
        ),
    ] {
        exercise(&mut c, &agent, method, template, &path, body, expect)?;
    }
    // A write without the token: 401, with the documented error body.
    let (s, ct, text) = {
        let resp = ureq::post(&agent.url("/v1/apply"))
            .set("Content-Type", "application/json")
            .send_string("{}");
        match resp {
            Err(ureq::Error::Status(s, r)) => (
                s,
                r.header("content-type").unwrap_or("").to_owned(),
                r.into_string()?,
            ),
            other => panic!("a write without the token was not refused: {other:?}"),
        }
    };
    assert_eq!(s, 401, "{text}");
    c.check("POST", "/v1/apply", s, &ct, &text)?;

    // A method a path does not take: 405 with `Allow` naming exactly what the document lists
    // for it (and HEAD with GET), before the body is looked at; the error body as documented.
    for (path, item) in c.doc["paths"].as_object().into_iter().flatten() {
        let mut allowed: Vec<String> = item
            .as_object()
            .into_iter()
            .flatten()
            .map(|(m, _)| m.to_uppercase())
            .collect();
        if allowed.iter().any(|m| m == "GET") {
            allowed.push("HEAD".into());
        }
        allowed.sort();
        let concrete = path
            .replace("{name}", FUNCTION)
            .replace("{instance}", "live");
        for method in ["PUT", "DELETE", "PATCH", "GET"] {
            if allowed.iter().any(|m| m == method) {
                continue;
            }
            let resp = ureq::request(method, &agent.url(&concrete))
                .set("Authorization", &format!("Bearer {}", agent.token))
                .set("Content-Type", "text/plain")
                .send_string("x");
            let Err(ureq::Error::Status(405, r)) = resp else {
                panic!("{method} {concrete}: expected 405, got {resp:?}");
            };
            let mut allow: Vec<String> = r
                .header("allow")
                .unwrap_or_default()
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect();
            allow.sort();
            assert_eq!(allow, allowed, "{method} {concrete}");
            let body: Value = r.into_json()?;
            assert_eq!(body["status"], 405, "{body}");
            assert!(
                body["error"].as_str().is_some_and(|e| e.contains(method)),
                "{body}"
            );
        }
    }

    // Every documented operation was answered for real, and its answer matched.
    let missing: Vec<_> = c.operations.difference(&c.answered).collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised by this test: {missing:?}"
    );
    // Nothing answers outside the document: what the CLI and the web page call is in it.
    let callers = [
        include_str!("../../emars-agent/src/cli/client.rs"),
        include_str!("../../emars-agent/src/cli/report.rs"),
        include_str!("../../emars-agent/src/main.rs"),
        include_str!("../../emars-agent/src/api/web/app.js"),
    ];
    let templates: Vec<&String> = c.operations.iter().map(|(_, t)| t).collect();
    let mut called = 0;
    for src in callers {
        for (at, _) in src.match_indices("/v1/") {
            let path: String = src[at..]
                .chars()
                .take_while(|ch| {
                    !matches!(ch, '"' | '\'' | '`' | '?' | ')' | ',') && !ch.is_whitespace()
                })
                .collect();
            // Prose ("GET /v1/info.") ends in punctuation.
            let path = path.trim_end_matches(['.', ':', ';']).to_owned();
            if path.ends_with('/') && path.len() > 4 {
                // A prefix the caller appends to ('/v1/functions/' + name).
                assert!(
                    templates.iter().any(|t| t.starts_with(&path)),
                    "{path}… is called but not documented"
                );
                called += 1;
                continue;
            }
            if path == "/v1/" {
                continue;
            }
            assert!(
                templates.iter().any(|t| same_shape(t, &path)),
                "{path} is called but not documented"
            );
            called += 1;
        }
    }
    assert!(called > 15, "found only {called} API paths in the callers");
    println!(
        "{} operations answered and valid; {called} paths the CLI and web page call, all documented",
        c.answered.len()
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// Whether a concrete path as the callers write it (`/v1/functions/{seg}/instances`,
/// `/v1/functions/${enc}/recommendation`, `/v1/functions/{}/invocations`) has the template's
/// shape: the same segments, a placeholder where the template has a parameter.
fn same_shape(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    // A placeholder glued to a segment is a query string (`instances{q}`).
    let p: Vec<&str> = path
        .split('/')
        .map(|seg| match seg.find('{') {
            Some(i) if i > 0 && !seg[..i].ends_with('$') => &seg[..i],
            _ => seg,
        })
        .collect();
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            t == p || (t.starts_with('{') && (p.starts_with('{') || p.starts_with("${")))
        })
}

#[test]
fn shapes_of_called_paths() {
    assert!(same_shape("/v1/functions/{name}", "/v1/functions/{seg}"));
    assert!(same_shape(
        "/v1/functions/{name}/limits",
        "/v1/functions/${enc}/limits"
    ));
    assert!(!same_shape(
        "/v1/functions/{name}",
        "/v1/functions/{}/limits"
    ));
    assert!(!same_shape("/v1/functions", "/v1/function"));
    assert!(same_shape(
        "/v1/functions/{name}/instances",
        "/v1/functions/{seg}/instances{q}"
    ));
}

/// `GET /v1/functions/{name}/instances` in pages: real instances (25 ended, then 3 live that end
/// while a listing is under way), pages of 10 in both orders. Every record comes exactly once,
/// in key order; a cursor taken before instances ended and started still continues the
/// listing exactly; a bad cursor is a 400 that says so.
#[test]
fn instance_pages_hold_every_record_once_while_instances_end() -> anyhow::Result<()> {
    let test = "instance_pages_hold_every_record_once_while_instances_end";
    if !require_root(test) {
        return Ok(());
    }
    const PAGED: &str = "paged";
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    for i in 0..25 {
        let dir = root.instance_dir(PAGED, &format!("e{i:02}"))?;
        assert!(run_alloc(&dir, 2, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(PAGED, 25)?;
    let created: Vec<String> = (0..25).map(|i| format!("e{i:02}")).collect();

    // Every page of a listing from `cursor` on.
    let list = |query: &str, cursor: Option<&str>| -> anyhow::Result<Listing> {
        let mut l = Listing::default();
        let mut cursor = cursor.map(str::to_owned);
        loop {
            let after = cursor
                .as_deref()
                .map_or_else(String::new, |c| format!("&cursor={c}"));
            let page = agent.get_ok(&format!("/v1/functions/{PAGED}/instances?{query}{after}"))?;
            l.pages += 1;
            assert!(
                l.pages <= 10,
                "a listing of 30 records in pages of 10 does not end"
            );
            let records = page["instances"].as_array().cloned().unwrap_or_default();
            assert!(records.len() <= 10, "{page}");
            for r in records {
                l.names
                    .push(r["instance"].as_str().unwrap_or_default().to_owned());
                l.keys
                    .push((u64_of(&r, "started_at_ms"), u64_of(&r, "cgroup_id")));
            }
            match page["next"].as_str() {
                Some(next) => {
                    assert_eq!(next.len(), 32, "{page}");
                    cursor = Some(next.to_owned());
                }
                None => return Ok(l),
            }
        }
    };
    // Oldest first: 3 pages (10, 10, 5), each record once, in key order, none left out.
    let oldest = list("limit=10", None)?;
    assert_eq!(oldest.pages, 3);
    assert_eq!(oldest.names, created);
    assert!(
        oldest.keys.windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        oldest.keys
    );
    // Newest first: the same records the other way round.
    let newest = list("limit=10&order=newest", None)?;
    assert_eq!(newest.pages, 3);
    assert!(
        newest.keys.windows(2).all(|w| w[0] > w[1]),
        "{:?}",
        newest.keys
    );
    let mut names = newest.names;
    names.reverse();
    assert_eq!(names, created);

    // Three live instances, and the first page of each order taken now.
    let mut live = Vec::new();
    for i in 0..3 {
        let dir = root.instance_dir(PAGED, &format!("l{i}"))?;
        live.push((spawn_alloc(&dir, 2, 120_000, 0)?, dir));
        agent.wait_live(PAGED, &format!("l{i}"))?;
    }
    let first = |query: &str| -> anyhow::Result<(Vec<String>, String)> {
        let page = agent.get_ok(&format!("/v1/functions/{PAGED}/instances?{query}"))?;
        let names = page["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["instance"].as_str().unwrap_or_default().to_owned())
            .collect();
        let next = page["next"].as_str().unwrap_or_default().to_owned();
        Ok((names, next))
    };
    let (old_first, old_cursor) = first("limit=10")?;
    let (new_first, new_cursor) = first("limit=10&order=newest")?;
    assert_eq!(new_first[..3], ["l2", "l1", "l0"]);
    // The live ones end, and two more instances start and end, before the listings go on.
    for (mut child, dir) in live {
        child.kill()?;
        child.wait()?;
        fs::remove_dir(&dir)?;
    }
    for i in 0..2 {
        let dir = root.instance_dir(PAGED, &format!("n{i}"))?;
        assert!(run_alloc(&dir, 2, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(PAGED, 30)?;
    let mut expected: Vec<String> = created.clone();
    expected.extend(["l0", "l1", "l2", "n0", "n1"].map(String::from));
    // Oldest first: the rest, including the instances that started meanwhile.
    let rest = list("limit=10", Some(&old_cursor))?.names;
    assert_eq!([old_first, rest].concat(), expected);
    // Newest first: the rest of what was there when it began, nothing twice.
    let rest = list("limit=10&order=newest", Some(&new_cursor))?.names;
    let mut seen = [new_first, rest].concat();
    seen.reverse();
    assert_eq!(seen, expected[..28]);

    // A bad cursor is a 400 that names it.
    let long = format!("{old_cursor}0");
    for bad in ["x", "0123", "0000000000000000000000000000000A", &long] {
        let (status, body) = agent.get(&format!("/v1/functions/{PAGED}/instances?cursor={bad}"))?;
        assert_eq!(status, 400, "{bad}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("`cursor`") && error.contains(bad), "{body}");
    }
    // A page larger than 10000 is refused.
    let (status, body) = agent.get(&format!("/v1/functions/{PAGED}/instances?limit=10001"))?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

/// What a listing's pages held, in order.
#[derive(Default)]
struct Listing {
    names: Vec<String>,
    keys: Vec<(u64, u64)>,
    pages: usize,
}
