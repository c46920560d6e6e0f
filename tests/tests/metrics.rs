//! GET /metrics against a real agent with real instances, and a real Prometheus server
//! (Debian's) scraping it: the histogram's buckets hold exactly the recorded peaks, and the
//! PromQL percentile of a function (`histogram_quantile` over `sum by (function, le)`, the
//! fleet recording rule of docs/metrics.md) agrees with the agent's own within one bucket.
//! With native histograms on, Prometheus scrapes the protobuf exposition: every metric of the
//! text arrives, each function's native histogram holds exactly its recorded peaks, and its
//! PromQL p50 and p95 lie within 4.5 % of the exact percentiles of those peaks.

use std::{fs, time::Duration};

use emars_tests::{
    prometheus::{Prometheus, NATIVE_HISTOGRAMS},
    *,
};
use serde_json::Value;

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
    let prometheus = Prometheus::scraping("emars", &[agent.addr.as_str()], &[])?;
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

/// The exact nearest-rank percentile of `peaks` (the definition /v1/functions uses).
fn nearest_rank(peaks: &[u64], q: f64) -> u64 {
    let mut sorted = peaks.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The series names of a text exposition's samples, a classic histogram's under its own name.
fn text_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|base| *base == "emars_instance_peak_bytes")
                .unwrap_or(n)
                .to_owned()
        })
        .collect()
}

/// A float of a Prometheus answer (they come as strings).
fn float(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn native_histograms_hold_the_peaks_and_their_percentiles() -> anyhow::Result<()> {
    let test = "native_histograms_hold_the_peaks_and_their_percentiles";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    // Two functions of known sizes: ten instances from 6 to 69 MiB, seven from 30 to 96 MiB.
    let functions: [(&str, Vec<u64>); 2] = [
        ("nat-a", (0..10).map(|i| 6 + 7 * i).collect()),
        ("nat-b", (0..7).map(|i| 30 + 11 * i).collect()),
    ];
    let mut recorded: Vec<(&str, Vec<u64>)> = Vec::new();
    for (function, sizes) in &functions {
        for (i, mib) in sizes.iter().enumerate() {
            let dir = root.instance_dir(function, &format!("m{i}"))?;
            assert!(run_alloc(&dir, *mib, 0, 0)?.success());
            fs::remove_dir(&dir)?;
        }
        let ended = agent.wait_ended(function, sizes.len())?;
        let peaks: Vec<u64> = ended.iter().map(|r| u64_of(r, "peak_bytes")).collect();
        assert!(peaks.iter().all(|p| *p > 0), "{function}: {peaks:?}");
        // The agent's own percentiles are these peaks' nearest-rank ones.
        let summary = agent.get_ok(&format!("/v1/functions/{function}"))?;
        for (key, q) in [("p50", 0.5), ("p95", 0.95)] {
            assert_eq!(
                summary["peak_percentiles"][key].as_u64(),
                Some(nearest_rank(&peaks, q)),
                "{function} {key}: {summary}"
            );
        }
        recorded.push((function, peaks));
    }
    let info = agent.get_ok("/v1/info")?;
    let agent_id = info["agent_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(agent_id.len(), 32, "{info}");
    let resp = ureq::get(&agent.url("/metrics")).call()?;
    assert_eq!(resp.header("vary"), Some("Accept"));
    let text = resp.into_string()?;

    let prometheus = Prometheus::scraping("emars", &[agent.addr.as_str()], &[NATIVE_HISTOGRAMS])?;
    let counts = "histogram_count(sum by (function) (emars_instance_peak_bytes))";
    let want = functions.len();
    let scraped = wait_for(Duration::from_secs(60), || {
        let v = prometheus.query(counts).ok()?;
        (Prometheus::result(&v).len() == want).then_some(v)
    });
    let Some(scraped) = scraped else {
        panic!(
            "Prometheus never had both native histograms (up: {:?}):\n{}",
            prometheus.query("up").ok(),
            prometheus.log()
        );
    };
    for r in Prometheus::result(&scraped) {
        let function = r["metric"]["function"].as_str().unwrap_or_default();
        let (_, peaks) = recorded
            .iter()
            .find(|(f, _)| *f == function)
            .unwrap_or_else(|| panic!("unknown function in {r}"));
        assert_eq!(float(&r["value"][1]), peaks.len() as f64, "{r}");
    }

    // What the fleet query reads: the native histogram per function, every bucket with
    // exactly the recorded peaks inside its bounds (lower exclusive, upper inclusive).
    let sums = prometheus.query("sum by (function) (emars_instance_peak_bytes)")?;
    println!("sum by (function) (emars_instance_peak_bytes) answers: {sums}");
    for r in Prometheus::result(&sums) {
        let function = r["metric"]["function"].as_str().unwrap_or_default();
        let (_, peaks) = recorded.iter().find(|(f, _)| *f == function).unwrap();
        let h = &r["histogram"][1];
        assert_eq!(float(&h["count"]), peaks.len() as f64, "{r}");
        assert_eq!(float(&h["sum"]), peaks.iter().sum::<u64>() as f64, "{r}");
        let buckets = h["buckets"].as_array().cloned().unwrap_or_default();
        let mut inside = 0;
        for b in &buckets {
            // [boundary rule, lower, upper, count]; 0: (lower, upper].
            assert_eq!(b[0], 0, "{b}");
            let (lower, upper) = (float(&b[1]), float(&b[2]));
            let held = peaks
                .iter()
                .filter(|p| lower < **p as f64 && **p as f64 <= upper)
                .count();
            assert_eq!(
                float(&b[3]),
                held as f64,
                "bucket {b} of {function}: peaks {peaks:?}"
            );
            assert!(upper / lower < 1.0444, "{b}");
            inside += held;
        }
        assert_eq!(inside, peaks.len(), "{function}: {buckets:?} and {peaks:?}");
    }

    // Percentiles from the native histogram, within one bucket (4.43 %) of the exact ones.
    for q in [0.5, 0.95] {
        let promql =
            format!("histogram_quantile({q}, sum by (function) (emars_instance_peak_bytes))");
        let answer = prometheus.query(&promql)?;
        let result = Prometheus::result(&answer);
        assert_eq!(result.len(), want, "{answer}");
        for r in result {
            let function = r["metric"]["function"].as_str().unwrap_or_default();
            let (_, peaks) = recorded.iter().find(|(f, _)| *f == function).unwrap();
            let exact = nearest_rank(peaks, q) as f64;
            let from_prometheus = float(&r["value"][1]);
            let error = (from_prometheus - exact).abs() / exact;
            println!(
                "{function} q{q}: PromQL {from_prometheus:.0}, exact {exact:.0} ({:.2} %)",
                error * 100.0
            );
            assert!(
                error <= 0.045,
                "{function} q{q}: PromQL {from_prometheus}, exact {exact}"
            );
        }
    }

    // Every metric of the text exposition came through the protobuf one, the agent's id too.
    let names = prometheus.query("group by (__name__) ({job=\"emars\"})")?;
    let scraped_names: std::collections::BTreeSet<String> = Prometheus::result(&names)
        .iter()
        .filter_map(|r| r["metric"]["__name__"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with("emars_"))
        .collect();
    let missing: Vec<String> = text_names(&text)
        .into_iter()
        .filter(|n| !scraped_names.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not in Prometheus: {scraped_names:?}"
    );
    assert!(
        !scraped_names.contains("emars_instance_peak_bytes_bucket"),
        "classic buckets scraped: {scraped_names:?}"
    );
    let own = prometheus.query(&format!("emars_agent_info{{agent_id=\"{agent_id}\"}}"))?;
    assert_eq!(Prometheus::result(&own).len(), 1, "{own}");
    Ok(())
}
