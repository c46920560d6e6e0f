//! A fleet on one machine: three hosts, each a network namespace of the test's own with its own
//! watched cgroup root, real instances and a real agent listening on the namespace's address,
//! and one real Prometheus (Debian's) in the root namespace scraping the three over their veth
//! links.

use std::time::Duration;

use anyhow::{anyhow, Result};
use emars_tests::{hosts::Host, prometheus::Prometheus, *};
use serde_json::Value;

/// Prometheus's scrape job for the agents.
const JOB: &str = "emars";

/// The value of each series of an instant-query answer, by its `instance` label.
fn by_instance(answer: &Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = Prometheus::result(answer)
        .iter()
        .filter_map(|s| {
            let instance = s["metric"]["instance"].as_str()?.to_owned();
            let value = s["value"][1].as_str()?.parse().ok()?;
            Some((instance, value))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Three hosts scraped over their links: `up` is 1 for each agent, and the peaks each agent
/// recorded of its own real instances are the ones Prometheus holds under its target.
#[test]
fn prometheus_scrapes_three_hosts_in_their_namespaces() -> Result<()> {
    let test = "prometheus_scrapes_three_hosts_in_their_namespaces";
    if !require_root(test) {
        return Ok(());
    }
    const FUNCTION: &str = "scraped";
    let hosts = [Host::start("")?, Host::start("")?, Host::start("")?];
    // Different peaks on each host, so that a target's series cannot be another's.
    let mut peaks = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let mibs: Vec<u64> = (0..=h as u64).map(|i| 8 + 8 * h as u64 + 4 * i).collect();
        peaks.push(host.run_instances(FUNCTION, &mibs)?);
    }
    let targets: Vec<String> = hosts.iter().map(Host::target).collect();
    let prometheus = Prometheus::scraping(JOB, &targets, &[])?;

    let mut want_up: Vec<(String, f64)> = targets.iter().map(|t| (t.clone(), 1.0)).collect();
    want_up.sort_by(|a, b| a.0.cmp(&b.0));
    let up = wait_for(Duration::from_secs(20), || {
        let up = by_instance(&prometheus.query(&format!("up{{job=\"{JOB}\"}}")).ok()?);
        (up == want_up).then_some(up)
    });
    up.ok_or_else(|| {
        anyhow!(
            "not every target up: {:?}\n{}",
            prometheus.query("up").ok(),
            prometheus.log()
        )
    })?;

    // Per target: as many instances as that host ran, their peaks summed exactly.
    let mut want: Vec<(String, (f64, f64))> = targets
        .iter()
        .zip(&peaks)
        .map(|(t, p)| (t.clone(), (p.len() as f64, p.iter().sum::<u64>() as f64)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let selector = format!("{{job=\"{JOB}\", function=\"{FUNCTION}\"}}");
    let got = wait_for(Duration::from_secs(20), || {
        let count = by_instance(
            &prometheus
                .query(&format!("emars_instance_peak_bytes_count{selector}"))
                .ok()?,
        );
        let sum = by_instance(
            &prometheus
                .query(&format!("emars_instance_peak_bytes_sum{selector}"))
                .ok()?,
        );
        let got: Vec<(String, (f64, f64))> = count
            .into_iter()
            .zip(sum)
            .filter(|(c, s)| c.0 == s.0)
            .map(|(c, s)| (c.0, (c.1, s.1)))
            .collect();
        (got == want).then_some(got)
    });
    got.ok_or_else(|| {
        anyhow!(
            "Prometheus's (count, sum) per target never matched the agents' {want:?}: {:?}",
            prometheus
                .query(&format!("emars_instance_peak_bytes_count{selector}"))
                .ok()
        )
    })?;
    Ok(())
}
