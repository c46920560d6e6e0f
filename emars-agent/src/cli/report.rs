//! `emars report --out DIR`: one SVG per function (its instance peaks over time and the peak of
//! each hour, against the limits a new instance gets) and an index.html linking them, from the
//! agent's API.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::api::wire::{FunctionLimits, FunctionsResponse};
use crate::cli::client::{self, Client, ClientError};
use crate::view::plot::{self, PeaksPlot};
use crate::view::text::count;

/// The most instances one plot draws (read page after page, newest first); a function with
/// more retained is drawn with its newest this many, and the summary says so.
const MAX_INSTANCES: usize = 50_000;

/// What one function's plot holds, for the summary printed after writing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub function: String,
    pub file: PathBuf,
    pub instances: usize,
    /// The function's retained instances: more than `instances` when only the newest
    /// [`MAX_INSTANCES`] were drawn.
    pub retained: u64,
    pub hours: usize,
    pub max_bytes: Option<u64>,
    pub high_bytes: Option<u64>,
}

impl Written {
    /// "12 instances", or "50000 of 60000 instances (the newest)" when not all were drawn.
    fn instances_text(&self) -> String {
        if (self.instances as u64) < self.retained {
            format!(
                "{} of {} instances (the newest)",
                self.instances, self.retained
            )
        } else {
            count(self.instances as u64, "instance", "instances")
        }
    }
}

/// Fetches every function and writes its plot and the index into `out` (created when missing).
pub fn run(api: &Client, out: &Path) -> anyhow::Result<(Vec<Written>, PathBuf)> {
    // Ask the agent first: an unreachable agent should not leave an empty DIR behind.
    let list: FunctionsResponse = api.get_as("/v1/functions")?;
    crate::files::output_dir(out)?;
    let mut used = HashSet::new();
    let mut written = Vec::new();
    for f in &list.functions {
        let p = fetch(api, &f.name)?;
        let svg = plot::peaks_svg(&p)?;
        let file = out.join(unique_file(&f.name, &mut used));
        crate::files::write_output(&file, svg.as_bytes())?;
        written.push(Written {
            function: f.name.clone(),
            file,
            instances: p.instances.len(),
            retained: f.instances,
            hours: p.hours.len(),
            max_bytes: p.max_bytes,
            high_bytes: p.high_bytes,
        });
    }
    let index = out.join("index.html");
    crate::files::write_output(&index, index_html(&written).as_bytes())?;
    Ok((written, index))
}

/// `name.svg` with its name made safe; a second name that maps to the same file (`a:b` and
/// `a_b`) gets `-2`, `-3`, ...
fn unique_file(name: &str, used: &mut HashSet<String>) -> String {
    let stem = plot::safe_stem(name);
    let mut file = format!("{stem}.svg");
    let mut n = 2;
    while !used.insert(file.clone()) {
        file = format!("{stem}-{n}.svg");
        n += 1;
    }
    file
}

fn fetch(api: &Client, name: &str) -> anyhow::Result<PeaksPlot> {
    let (detail, instances) = api
        .function(name, Some(MAX_INSTANCES))
        .with_context(|| format!("reading function {name} and its instances"))?;
    let seg = client::encode_segment(name);
    // 404: no limits for this function yet; 503: the agent runs no policy. Neither is an
    // error for a report: the lines are just not drawn.
    let limits: Option<FunctionLimits> = match api.get_as(&format!("/v1/functions/{seg}/limits")) {
        Ok(l) => Some(l),
        Err(ClientError::Api {
            status: 404 | 503, ..
        }) => None,
        Err(e) => return Err(e).with_context(|| format!("reading the limits of {name}")),
    };
    Ok(PeaksPlot {
        function: name.to_owned(),
        instances: instances
            .iter()
            .map(|i| (i.started_at_ms, i.ended_at_ms, i.peak_bytes))
            .collect(),
        hours: detail
            .hours
            .iter()
            .map(|h| (h.hour_start_ms, h.peak_bytes))
            .collect(),
        max_bytes: limits.as_ref().map(|l| l.max_bytes),
        high_bytes: limits.as_ref().map(|l| l.high_bytes),
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plain page: a heading and an image per function, each linking to its SVG.
fn index_html(written: &[Written]) -> String {
    let mut h = String::from(
        "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
         <title>EMARS report</title></head>\n<body>\n<h1>EMARS report</h1>\n",
    );
    if written.is_empty() {
        h.push_str("<p>The agent knows no function yet.</p>\n");
    }
    for w in written {
        let file = w
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (f, n) = (escape(&w.function), escape(&file));
        let _ = writeln!(
            h,
            "<h2 id=\"{n}\">{f}</h2>\n<p>{}, {}.</p>\n\
             <p><a href=\"{n}\"><img src=\"{n}\" alt=\"instance peaks of {f}\" width=\"900\"></a></p>",
            w.instances_text(),
            count(w.hours as u64, "hour", "hours")
        );
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// What `emars report` prints: one line per file.
pub fn render(written: &[Written], index: &Path) -> String {
    let mut s = String::new();
    for w in written {
        let limit =
            |v: Option<u64>| v.map_or_else(|| "-".to_owned(), crate::view::text::human_bytes);
        let _ = writeln!(
            s,
            "wrote {}  ({}: {}, {}, memory.max {}, memory.high {})",
            w.file.display(),
            w.function,
            w.instances_text(),
            count(w.hours as u64, "hour", "hours"),
            limit(w.max_bytes),
            limit(w.high_bytes)
        );
    }
    let _ = writeln!(s, "wrote {}", index.display());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_names_get_their_own_files() {
        let mut used = HashSet::new();
        assert_eq!(unique_file("a:b", &mut used), "a_b.svg");
        assert_eq!(unique_file("a_b", &mut used), "a_b-2.svg");
        assert_eq!(unique_file("a:b:", &mut used), "a_b_.svg");
        assert_eq!(unique_file("..", &mut used), "_..svg");
    }

    #[test]
    fn index_links_every_plot() {
        let w = Written {
            function: "f<1>".into(),
            file: "/tmp/x/f_1_.svg".into(),
            instances: 3,
            retained: 5,
            hours: 1,
            max_bytes: None,
            high_bytes: None,
        };
        let h = index_html(&[w]);
        assert!(h.contains("3 of 5 instances (the newest), 1 hour."), "{h}");
        assert!(
            h.contains("<a href=\"f_1_.svg\"><img src=\"f_1_.svg\""),
            "{h}"
        );
        assert!(h.contains("f&lt;1&gt;") && !h.contains("<script"), "{h}");
    }
}
