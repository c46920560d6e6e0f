//! The web page at `/` in a real browser: headless Chromium (Debian's, installed by `cargo
//! xtask setup`) loads it from a real agent with real instances; the test checks what the page
//! rendered (the DOM after its script ran, not the HTML source), and keeps screenshots under
//! target/tmp/emars-web for people to look at.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use emars_tests::http::{HttpServer, Sandbox};
use emars_tests::*;

const FUNCTION: &str = "webfn";
/// A function that serves HTTP in its instance (requests counted in the kernel).
const HTTP_FUNCTION: &str = "webhttp";

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(find_program)
}

/// Chromium's flags for a headless run as root in a test (no sandbox: root; no GPU).
fn headless(bin: &Path, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The DOM of `url` once its script ran.
fn rendered(bin: &Path, profile: &Path, url: &str) -> anyhow::Result<String> {
    let out = headless(bin, profile).arg("--dump-dom").arg(url).output()?;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dom)
}

fn screenshot(bin: &Path, profile: &Path, url: &str, file: &Path) -> anyhow::Result<()> {
    let out = headless(bin, profile)
        .arg("--window-size=1280,1100")
        .arg(format!("--screenshot={}", file.display()))
        .arg(url)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let len = fs::metadata(file)?.len();
    assert!(
        len > 10_000,
        "{} is {len} bytes: a blank page?",
        file.display()
    );
    Ok(())
}

/// The text of the first element whose opening tag contains `marker`.
fn text_after<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(&rest[start..end])
}

/// The functions list's row of `function` and what follows it in the DOM; an error when the
/// list has no row for it.
fn function_row<'a>(dom: &'a str, function: &str) -> anyhow::Result<&'a str> {
    let at = dom
        .find(&format!("data-function=\"{function}\""))
        .ok_or_else(|| anyhow::anyhow!("no row for {function}:\n{dom}"))?;
    Ok(&dom[at..])
}

/// The page of `function` (`#/f/<function>`) rendered, once its script said it is ready.
fn function_page(bin: &Path, profile: &Path, base: &str, function: &str) -> anyhow::Result<String> {
    let dom = rendered(bin, profile, &format!("{base}#/f/{function}"))?;
    anyhow::ensure!(
        dom.contains(&format!("data-ready=\"#/f/{function}\"")),
        "the page of {function} did not render:\n{dom}"
    );
    Ok(dom)
}

#[test]
fn web_page_shows_functions_and_a_function_in_a_browser() -> anyhow::Result<()> {
    let test = "web_page_shows_functions_and_a_function_in_a_browser";
    if !require_root(test) {
        return Ok(());
    }
    let Some(bin) = chromium() else {
        panic!("{test}: chromium missing (Debian package): run `cargo xtask setup`");
    };
    let root = TestRoot::new()?;
    // Enforce mode with a pin: new instances get limits, and the writes are in the audit.
    let agent = Agent::start_configured(
        &root,
        &format!(
            "\n[policy]\nmode = \"enforce\"\n[[policy.functions]]\nname = \"{FUNCTION}\"\n\
             pin_max_bytes = 134217728\npin_high_bytes = 100663296\n"
        ),
    )?;
    for (i, mib) in [12u64, 24, 36].iter().enumerate() {
        let dir = root.instance_dir(FUNCTION, &format!("w{i}"))?;
        assert!(run_alloc(&dir, *mib, 0, 0)?.success());
        fs::remove_dir(&dir)?;
    }
    agent.wait_ended(FUNCTION, 3)?;
    // One instance running while the page is looked at.
    let live_dir = root.instance_dir(FUNCTION, "running")?;
    let mut child = spawn_alloc(&live_dir, 20, 60_000, 0)?;
    agent.wait_live(FUNCTION, "running")?;

    let profile = tempfile::tempdir()?;
    let base = agent.url("/");
    // The page itself: embedded, with a CSP that allows nothing from elsewhere.
    let resp = ureq::get(&base).call()?;
    let csp = resp
        .header("content-security-policy")
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = resp.into_string()?;
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );

    let dom = rendered(&bin, profile.path(), &base)?;
    assert!(
        dom.contains("data-ready=\"#/\""),
        "the page did not render:\n{dom}"
    );
    let row_dom = function_row(&dom, FUNCTION)?;
    assert_eq!(
        text_after(row_dom, "data-col=\"instances\""),
        Some("4"),
        "{row_dom}"
    );
    assert_eq!(
        text_after(row_dom, "data-col=\"live\""),
        Some("1"),
        "{row_dom}"
    );
    assert_eq!(
        text_after(row_dom, "data-col=\"max\""),
        Some("128.0 MiB"),
        "{row_dom}"
    );

    let dom = function_page(&bin, profile.path(), &base, FUNCTION)?;
    // The peak histogram of the 3 ended instances, with memory.max and memory.high on it.
    assert!(dom.contains("id=\"peak-histogram\""), "{dom}");
    assert!(dom.contains("data-instances=\"3\""), "{dom}");
    let bars: u64 = dom
        .match_indices("data-count=\"")
        .filter_map(|(i, m)| dom[i + m.len()..].split('"').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(bars, 3, "the histogram's bars hold 3 peaks:\n{dom}");
    assert!(
        dom.contains("data-limit=\"max\"") && dom.contains("data-limit=\"high\""),
        "{dom}"
    );
    assert!(dom.contains("memory.max 128.0 MiB"), "{dom}");
    assert!(dom.contains("id=\"hours\""), "{dom}");
    // The running instance, with its limits, and the limit writes of the function.
    assert!(dom.contains("data-instance=\"running\""), "{dom}");
    // Its usage now, read from its cgroup: the 20 MiB it holds (plus the process's own).
    let running = &dom[dom.find("data-instance=\"running\"").unwrap_or(0)..];
    let usage = text_after(running, "data-col=\"usage\"")
        .and_then(|t| t.strip_suffix(" MiB"))
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no usage for the running instance:\n{running}"));
    assert!(
        (20.0..28.0).contains(&usage),
        "usage {usage} MiB:\n{running}"
    );
    let writes = dom.matches("data-reason=\"new_instance\"").count();
    assert_eq!(writes, 4, "four instances got limits at mkdir:\n{dom}");

    // A function that serves HTTP, its requests counted in the kernel: the list names the
    // source, and the function's cards show the counts the agent recorded.
    let info = agent.get_ok("/v1/info")?;
    assert!(
        program_attached(&info, "net_ingress"),
        "net_ingress not attached: {}",
        info["programs"]
    );
    let web = Sandbox::new(&root, HTTP_FUNCTION, "h1")?;
    let server = HttpServer::start(Some(&web))?;
    agent.wait_live(HTTP_FUNCTION, "h1")?;
    server.requests_on_new_connections(3)?;
    server.requests_kept_alive(4)?;
    drop(server);
    web.remove();
    agent.wait_ended(HTTP_FUNCTION, 1)?;
    let f = agent.get_ok(&format!("/v1/functions/{HTTP_FUNCTION}"))?;
    assert_eq!(
        (u64_of(&f, "requests"), u64_of(&f, "connections")),
        (7, 4),
        "{f}"
    );
    let dom = rendered(&bin, profile.path(), &base)?;
    let row_dom = function_row(&dom, HTTP_FUNCTION)?;
    assert!(
        row_dom.contains("data-source=\"kernel_requests\""),
        "{row_dom}"
    );
    assert_eq!(
        text_after(row_dom, "data-col=\"source\""),
        Some("kernel: HTTP requests"),
        "{row_dom}"
    );
    let dom = function_page(&bin, profile.path(), &base, HTTP_FUNCTION)?;
    let card = |key: &str| {
        let at = dom.find(&format!("data-card=\"{key}\""))?;
        text_after(&dom[at..], "<b")
    };
    assert_eq!(card("kernel"), Some("7 / 4"), "{dom}");
    // The busiest hour's requests (all 7, unless the test straddled an hour).
    let per_hour = u64_of(&f, "requests_per_hour").to_string();
    assert_eq!(card("requests"), Some(per_hour.as_str()), "{dom}");
    assert!(
        dom.contains("requests/h (kernel: HTTP requests)"),
        "the source is not named:\n{dom}"
    );

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emars-web");
    fs::create_dir_all(&shots)?;
    screenshot(&bin, profile.path(), &base, &shots.join("functions.png"))?;
    let page = format!("{base}#/f/{FUNCTION}");
    screenshot(&bin, profile.path(), &page, &shots.join("function.png"))?;
    println!("screenshots in {}", shots.display());
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
