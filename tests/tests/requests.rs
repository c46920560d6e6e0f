//! Requests counted in the kernel (the `net_ingress` cgroup_skb program): a real HTTP server in
//! an instance cgroup, real clients on loopback, the agent's counts compared with what was
//! sent. Root and the real kernel; on a hybrid host the instances are made as runc makes them
//! (memory cgroup on v1 and the same path in the unified hierarchy).

use anyhow::{bail, Result};
use emars_tests::{
    http::{HttpServer, Sandbox},
    program_attached, require_root, u64_of, Agent, TestRoot,
};
use serde_json::Value;

/// The agent's record of `function/instance` once ended (its counts read at rmdir).
fn ended(agent: &Agent, function: &str, instance: &str) -> Result<Value> {
    let all = agent.wait_ended(function, 1)?;
    match all.into_iter().find(|i| i["instance"] == instance) {
        Some(rec) => Ok(rec),
        None => bail!("{function}/{instance} not ended"),
    }
}

/// Whether the socket program is on; says why not (the test then fails: CI has it).
fn counting_on(agent: &Agent) -> Result<()> {
    let info = agent.get_ok("/v1/info")?;
    if !program_attached(&info, "net_ingress") {
        bail!(
            "net_ingress not attached: {}",
            serde_json::to_string_pretty(&info["programs"])?
        );
    }
    Ok(())
}

#[test]
fn new_connections_and_kept_alive_requests_are_counted_exactly() -> Result<()> {
    if !require_root("new_connections_and_kept_alive_requests_are_counted_exactly") {
        return Ok(());
    }
    const N: u64 = 7;
    const M: u64 = 23;
    const HOST: u64 = 11;
    const OTHER: u64 = 5;
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    counting_on(&agent)?;

    let web = Sandbox::new(&root, "web", "i1")?;
    let other = Sandbox::new(&root, "other", "i1")?;
    let server = HttpServer::start(Some(&web))?;
    let other_server = HttpServer::start(Some(&other))?;
    // A server of the host itself, outside any watched cgroup: its traffic is nobody's.
    let host_server = HttpServer::start(None)?;
    agent.wait_live("web", "i1")?;
    agent.wait_live("other", "i1")?;

    host_server.requests_on_new_connections(HOST)?;
    server.requests_on_new_connections(N)?;
    host_server.requests_kept_alive(HOST)?;
    server.requests_kept_alive(M)?;
    other_server.requests_on_new_connections(OTHER)?;

    drop(server);
    drop(other_server);
    web.remove();
    other.remove();
    let web_rec = ended(&agent, "web", "i1")?;
    let other_rec = ended(&agent, "other", "i1")?;
    assert_eq!(
        (
            u64_of(&web_rec, "requests"),
            u64_of(&web_rec, "connections")
        ),
        (N + M, N + 1),
        "web/i1: {web_rec}"
    );
    assert_eq!(
        (
            u64_of(&other_rec, "requests"),
            u64_of(&other_rec, "connections")
        ),
        (OTHER, OTHER),
        "other/i1: {other_rec}"
    );

    // Per hour (summed: the test may straddle an hour), the source said, the export and
    // /metrics agree with the instance.
    for (function, requests, connections) in [("web", N + M, N + 1), ("other", OTHER, OTHER)] {
        let f = agent.get_ok(&format!("/v1/functions/{function}"))?;
        let hours = f["hours"].as_array().cloned().unwrap_or_default();
        let sum = |key: &str| hours.iter().map(|h| u64_of(h, key)).sum::<u64>();
        assert_eq!(
            (sum("requests"), sum("connections")),
            (requests, connections),
            "{f}"
        );
        assert_eq!(f["requests_source"], "kernel_requests", "{f}");
        let busiest = hours
            .iter()
            .map(|h| u64_of(h, "requests"))
            .max()
            .unwrap_or(0);
        assert_eq!(u64_of(&f, "requests_per_hour"), busiest, "{f}");
        let export = agent.get_ok("/v1/export")?;
        let row = export["functions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["function"] == function)
            .cloned()
            .unwrap_or_default();
        assert_eq!(row["requests_source"], "kernel_requests", "{export}");
        assert_eq!(u64_of(&row, "requests_per_hour"), busiest, "{export}");
    }
    let metrics = ureq::get(&agent.url("/metrics")).call()?.into_string()?;
    for line in [
        format!("emars_kernel_requests{{function=\"web\"}} {}", N + M),
        format!("emars_kernel_connections{{function=\"web\"}} {}", N + 1),
        format!("emars_kernel_requests{{function=\"other\"}} {OTHER}"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    Ok(())
}

#[test]
fn without_the_program_requests_fall_back_to_execs_and_info_says_so() -> Result<()> {
    if !require_root("without_the_program_requests_fall_back_to_execs_and_info_says_so") {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(&root, "[probes]\ndisable = [\"net_ingress\"]\n")?;
    let info = agent.get_ok("/v1/info")?;
    assert!(!program_attached(&info, "net_ingress"), "{info}");
    let fallbacks = info["fallbacks"].to_string();
    assert!(
        fallbacks.contains("kernel request counting is off (disabled by config"),
        "{fallbacks}"
    );
    assert_eq!(info["features"]["kernel_request_counting"], false, "{info}");

    let web = Sandbox::new(&root, "web", "i1")?;
    let server = HttpServer::start(Some(&web))?;
    agent.wait_live("web", "i1")?;
    server.requests_on_new_connections(4)?;
    drop(server);
    web.remove();
    let rec = ended(&agent, "web", "i1")?;
    assert_eq!(
        (u64_of(&rec, "requests"), u64_of(&rec, "connections")),
        (0, 0),
        "{rec}"
    );
    // The server's one exec (python3) is the instance's one request.
    assert_eq!(u64_of(&rec, "execs"), 1, "{rec}");
    let f = agent.get_ok("/v1/functions/web")?;
    assert_eq!(f["requests_source"], "execs", "{f}");
    assert_eq!(u64_of(&f, "requests_per_hour"), 1, "{f}");
    Ok(())
}
