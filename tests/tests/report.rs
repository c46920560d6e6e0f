//! `emars report` against a real agent with real instances of known memory: one SVG per
//! function, one mark per instance placed by its peak, and the limit lines where the API puts
//! them. The plots are kept under target/tmp/emars-report for people to look at.

use std::{fs, path::Path, process::Command, time::Duration};

use emars_tests::*;
use serde_json::Value;

/// Pinned limits: the API answers them for PINNED, so the lines' values are known.
const PINNED: &str = "repa";
const MAX: u64 = 128 * MIB;
const HIGH: u64 = 96 * MIB;
/// A name with ':' (allowed in function names, not wanted in file names).
const OTHER: &str = "rep:b";
/// Known through reported invocations only: no peak, so no limits (the API answers 404).
const NO_LIMITS: &str = "rep.inv";

fn emars(agent: Option<&Agent>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(agent_bin());
    c.args(args);
    if let Some(a) = agent {
        c.args(["--addr", &a.addr]);
    }
    let out = c.output().expect("run emars");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The numbers of attribute `attr` of every `<tag` element whose text contains all of `with`.
fn attrs(svg: &str, tag: &str, attr: &str, with: &[&str]) -> Vec<String> {
    svg.split('<')
        .filter(|e| e.starts_with(tag) && with.iter().all(|w| e.contains(w)))
        .filter_map(|e| {
            let at = e.find(&format!(" {attr}=\""))? + attr.len() + 3;
            Some(e[at..].split('"').next()?.to_owned())
        })
        .collect()
}

/// The y pixel of the horizontal line drawn in `colour` with width 2 (the limit lines).
fn line_y(svg: &str, colour: &str) -> Option<f64> {
    let pts = attrs(
        svg,
        "polyline",
        "points",
        &[&format!("stroke=\"{colour}\""), "stroke-width=\"2\""],
    );
    let p = pts.first()?;
    let ys: Vec<f64> = p
        .split_whitespace()
        .filter_map(|xy| xy.split(',').nth(1)?.parse().ok())
        .collect();
    (ys.len() == 2 && ys[0] == ys[1]).then_some(ys[0])
}

/// (a, b) of pixel y = a + b * bytes, from the y axis' tick labels (`<text ... dy="0.5ex"
/// text-anchor="end">` with a MiB value): its lowest and highest.
fn y_axis(svg: &str) -> Option<(f64, f64)> {
    let mut ticks: Vec<(f64, f64)> = svg
        .split("<text ")
        .filter(|e| e.contains("dy=\"0.5ex\" text-anchor=\"end\""))
        .filter_map(|e| {
            let y = e.split("y=\"").nth(1)?.split('"').next()?.parse().ok()?;
            let v: f64 = e
                .split('>')
                .nth(1)?
                .split('<')
                .next()?
                .trim()
                .parse()
                .ok()?;
            Some((v * MIB as f64, y))
        })
        .collect();
    ticks.sort_by(|p, q| p.0.total_cmp(&q.0));
    let ((v0, y0), (v1, y1)) = (*ticks.first()?, *ticks.last()?);
    if v1 <= v0 {
        return None;
    }
    let b = (y1 - y0) / (v1 - v0);
    Some((y0 - b * v0, b))
}

/// Checks the plot of `function` against what the API says of it.
fn check_plot(agent: &Agent, svg: &str, function: &str) -> anyhow::Result<()> {
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains(&format!("{function}: instance peaks against limits")),
        "{svg}"
    );
    let instances = agent.instances(function)?;
    // One circle per instance, and nothing else is a circle.
    let cys: Vec<f64> = attrs(svg, "circle", "cy", &[])
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(cys.len(), instances.len(), "{function}: {svg}");
    assert!(svg.contains(&format!("instance peak ({})", instances.len())));
    // Where they are: pixel y = a + b * bytes, fitted on the y axis' lowest and highest tick
    // labels (MiB), so that every mark and line is checked against the axis people read.
    let (a, b) = y_axis(svg).unwrap_or_else(|| panic!("no y axis ticks: {svg}"));
    let mut peaks: Vec<u64> = instances.iter().map(|i| u64_of(i, "peak_bytes")).collect();
    peaks.sort_unstable();
    let mut ys = cys.clone();
    // Higher peaks are drawn higher up: smaller y.
    ys.sort_by(|a, b| b.total_cmp(a));
    for (p, y) in peaks.iter().zip(&ys) {
        let want = a + b * *p as f64;
        assert!(
            (want - y).abs() <= 1.5,
            "{function}: peak {p} at y={y}, expected {want}"
        );
    }
    let (status, limits) = agent.get(&format!("/v1/functions/{function}/limits"))?;
    for (name, colour, key) in [
        ("memory.max", "#D62728", "max_bytes"),
        ("memory.high", "#9467BD", "high_bytes"),
    ] {
        if status == 200 {
            let v = u64_of(&limits, key);
            assert!(svg.contains(&format!("{name} ")), "{svg}");
            assert!(svg.contains(&format!("({v} B)")), "{name} {v}: {svg}");
            let y = line_y(svg, colour).unwrap_or_else(|| panic!("no {name} line: {svg}"));
            let want = a + b * v as f64;
            assert!(
                (y - want).abs() <= 1.5,
                "{function}: {name} {v} at y={y}, expected {want}"
            );
        } else {
            assert_eq!(status, 404, "{limits}");
            assert!(!svg.contains(name), "{function} has no limits: {svg}");
            assert!(line_y(svg, colour).is_none(), "{svg}");
        }
    }
    Ok(())
}

#[test]
fn report_plots_every_function_against_its_limits() -> anyhow::Result<()> {
    let test = "report_plots_every_function_against_its_limits";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\n[[policy.functions]]\nname = \"{PINNED}\"\n\
             pin_max_bytes = {MAX}\npin_high_bytes = {HIGH}\n"
        ),
    )?;
    for (function, sizes) in [(PINNED, &[12u64, 24, 36][..]), (OTHER, &[20, 30][..])] {
        for (i, mib) in sizes.iter().enumerate() {
            let dir = root.instance_dir(function, &format!("r{i}"))?;
            assert!(run_alloc(&dir, *mib, 0, 0)?.success());
            fs::remove_dir(&dir)?;
        }
        agent.wait_ended(function, sizes.len())?;
    }

    let (s, body) = agent.post_raw(
        &format!("/v1/functions/{NO_LIMITS}/invocations"),
        "application/json",
        br#"{"count": 3}"#,
    )?;
    assert_eq!(s, 200, "{body}");
    let (status, _) = agent.get(&format!("/v1/functions/{NO_LIMITS}/limits"))?;
    assert_eq!(status, 404, "{NO_LIMITS} has no limits to draw");
    // The unpinned function's limits come from its history at the agent's next recompute (a
    // tick): the report is made once they are there, so that it and this test see the same.
    wait_for(Duration::from_secs(10), || {
        let (s, _) = agent.get(&format!("/v1/functions/{OTHER}/limits")).ok()?;
        (s == 200).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("{OTHER} got no limits from its history"))?;

    let out = tempfile::tempdir()?;
    let dir = out.path().join("report");
    let d = dir.display().to_string();
    let (ok, stdout, stderr) = emars(Some(&agent), &["report", "--out", &d]);
    assert!(ok, "emars report failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    let pinned = dir.join(format!("{PINNED}.svg"));
    let other = dir.join("rep_b.svg");
    let no_limits = dir.join(format!("{NO_LIMITS}.svg"));
    for (function, file) in [(PINNED, &pinned), (OTHER, &other), (NO_LIMITS, &no_limits)] {
        assert!(
            stdout.contains(&format!("wrote {}", file.display())),
            "{stdout}"
        );
        check_plot(&agent, &fs::read_to_string(file)?, function)?;
    }
    let (status, _) = agent.get(&format!("/v1/functions/{PINNED}/limits"))?;
    assert_eq!(status, 200, "{PINNED} has pinned limits");
    let svg = fs::read_to_string(&pinned)?;
    assert!(
        svg.contains(&format!("memory.max 128.0 MiB ({MAX} B)")),
        "{svg}"
    );
    assert!(
        svg.contains(&format!("memory.high 96.0 MiB ({HIGH} B)")),
        "{svg}"
    );

    let index = fs::read_to_string(dir.join("index.html"))?;
    for f in ["repa.svg", "rep_b.svg", "rep.inv.svg"] {
        assert!(index.contains(&format!("<img src=\"{f}\"")), "{index}");
    }
    assert!(!index.contains("<script"), "{index}");
    let names: Vec<_> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(names.len(), 4, "three plots and the index: {names:?}");

    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emars-report");
    fs::create_dir_all(&keep)?;
    for n in &names {
        fs::copy(dir.join(n), keep.join(n))?;
    }
    println!("report in {}", keep.display());

    // --json lists what was written.
    let (ok, stdout, stderr) = emars(Some(&agent), &["report", "--out", &d, "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout)?;
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{v}");
    Ok(())
}

#[test]
fn report_fails_clearly_on_bad_input() -> anyhow::Result<()> {
    let test = "report_fails_clearly_on_bad_input";
    if !require_root(test) {
        return Ok(());
    }
    let root = TestRoot::new()?;
    let agent = Agent::start(&root)?;
    let dir = root.instance_dir("repc", "r0")?;
    assert!(run_alloc(&dir, 8, 0, 0)?.success());
    fs::remove_dir(&dir)?;
    agent.wait_ended("repc", 1)?;
    // A directory that cannot be created: below a file.
    let (ok, _, stderr) = emars(Some(&agent), &["report", "--out", "/dev/null/report"]);
    assert!(!ok, "an unwritable DIR is an error");
    assert!(stderr.contains("creating /dev/null/report"), "{stderr}");
    // Nothing listens on port 1.
    let out = tempfile::tempdir()?;
    let d = out.path().join("r");
    let (ok, _, stderr) = emars(
        None,
        &[
            "report",
            "--out",
            &d.display().to_string(),
            "--addr",
            "127.0.0.1:1",
        ],
    );
    assert!(!ok, "an unreachable agent is an error");
    assert!(stderr.contains("cannot reach the EMARS agent"), "{stderr}");
    assert!(!d.exists(), "nothing written without an agent");
    Ok(())
}
