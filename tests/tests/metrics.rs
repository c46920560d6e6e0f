//! GET /metrics against a real agent with real instances, and a real Prometheus server
//! (Debian's) scraping it: the histogram's buckets hold exactly the recorded peaks, and the
//! PromQL percentile of a function (`histogram_quantile` over `sum by (function, le)`, the
//! fleet recording rule of docs/metrics.md) agrees with the agent's own within one bucket.

use std::{fs, time::Duration};

use emars_tests::{prometheus::Prometheus, *};

const FUNCTION: &str = "promfn";

/// `name{labels} value` lines of the exposition for one metric.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name).then_some((series, value.parse().ok()?))
        })
        .collect()
}

/// The `le` bound of a bucket series (None for +Inf).
fn le(series: &str) -> Option<f64> {
    let v = series.split("le=\"").nth(1)?.split('"').next()?;
    v.parse().ok().filter(|b: &f64| b.is_finite())
}

#[test]
fn prometheus_scrapes_the_agent_and_agrees_on_percentiles() -> anyhow::Result<()> {
    let test = "prometheus_scrapes_the_agent_and_agrees_on_percentiles";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    // Twelve instances from 6 to 72 MiB: peaks across a dozen buckets.
    for i in 0..12u64 {
        let dir = root.instance_dir(FUNCTION, &format!("m{i}"))?;
        assert!(run_alloc(&dir, 6 + 6 * i, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    let ended = agent.wait_ended(FUNCTION, 12)?;
    let peaks: Vec<u64> = ended.iter().map(|r| u64_of(r, "peak_bytes")).collect();

    // The exposition: each bucket holds exactly the recorded peaks at or below its bound.
    let resp = ureq::get(&agent.url("/metrics")).call()?;
    assert!(
        resp.content_type()
            .starts_with("application/openmetrics-text"),
        "{}",
        resp.content_type()
    );
    let text = resp.into_string()?;
    let buckets = samples(&text, "emars_instance_peak_bytes_bucket");
    let ours: Vec<(&str, f64)> = buckets
        .into_iter()
        .filter(|(s, _)| s.contains(&format!("function=\"{FUNCTION}\"")))
        .collect();
    let bounds: Vec<f64> = ours.iter().filter_map(|(s, _)| le(s)).collect();
    assert_eq!(bounds.len() + 1, ours.len(), "one +Inf bucket: {text}");
    assert!(
        bounds.len() > 40 && bounds.windows(2).all(|w| w[1] > w[0]),
        "{bounds:?}"
    );
    for (b, (series, n)) in bounds.iter().zip(&ours) {
        let want = peaks.iter().filter(|p| **p as f64 <= *b).count() as f64;
        assert_eq!(*n, want, "{series}: peaks {peaks:?}");
    }
    assert_eq!(ours.last().map(|(_, n)| *n), Some(12.0));
    // Which bucket holds the agent's own p95, and how wide it is: PromQL must land in it.
    let summary = agent.get_ok(&format!("/v1/functions/{FUNCTION}"))?;
    let own = summary["peak_percentiles"]["p95"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no p95: {summary}"))? as f64;
    let upper = bounds
        .iter()
        .position(|b| *b >= own)
        .expect("p95 below 64 GiB");
    let (lo, hi) = (
        if upper == 0 { 0.0 } else { bounds[upper - 1] },
        bounds[upper],
    );
    let count = samples(&text, "emars_instance_peak_bytes_count");
    assert!(
        count.contains(&(
            &*format!("emars_instance_peak_bytes_count{{function=\"{FUNCTION}\"}}"),
            12.0
        )),
        "{count:?}"
    );
    // The agent's counters are brought up to date every second: the events that recorded the
    // twelve instances show up in the next scrapes.
    let received = wait_for(Duration::from_secs(5), || {
        let text = ureq::get(&agent.url("/metrics"))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        let n = samples(&text, "emars_events_received_total").first()?.1;
        (n > 0.0).then_some(n)
    });
    assert!(
        received.is_some(),
        "emars_events_received_total stays 0:\n{text}"
    );

    // A real Prometheus server scraping it.
    let prometheus = Prometheus::scraping("emars", &[agent.addr.clone()], &[])?;
    let promql = format!(
        "histogram_quantile(0.95, sum by (function, le) \
         (emars_instance_peak_bytes_bucket{{function=\"{FUNCTION}\"}}))"
    );
    let scraped = wait_for(Duration::from_secs(60), || {
        let v = prometheus.query(&promql).ok()?;
        let r = Prometheus::result(&v).first()?.clone();
        r["value"][1].as_str()?.parse::<f64>().ok()
    });
    let Some(from_prometheus) = scraped else {
        let up = prometheus.query("up").ok();
        panic!(
            "Prometheus never had the histogram (up: {up:?}):\n{}",
            prometheus.log()
        );
    };
    let ratio = from_prometheus / own;
    println!(
        "p95: PromQL {from_prometheus:.0}, agent {own:.0} (ratio {ratio:.3}), bucket ({lo:.0}, {hi:.0}]"
    );
    assert!(
        from_prometheus > lo && from_prometheus <= hi,
        "PromQL p95 {from_prometheus} is not in the bucket ({lo}, {hi}] of the agent's {own}"
    );
    Ok(())
}
