//! SVG plots drawn with plotters' SVG backend: pure functions from data to an SVG string, so
//! that `emars report`, `emars tune` and the benchmark binaries draw the same way and the
//! drawings can be checked without a browser.
//!
//! plotters is built without its ttf feature: text is laid out with its naive font metrics
//! (no system fonts needed), and the SVG backend writes every label as a `<text>` element that
//! the viewer renders with its own fonts. Instance peaks are the only `<circle>` marks of a
//! peaks plot (legends use squares), so a reader — or a test — can count them.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::view::text::{format_time_ms, human_bytes};

const MIB: f64 = (1u64 << 20) as f64;
const SIZE: (u32, u32) = (900, 500);
const INSTANCE: RGBColor = RGBColor(31, 119, 180);
const HOUR: RGBColor = RGBColor(255, 127, 14);
const MAX_LINE: RGBColor = RGBColor(214, 39, 40);
const HIGH_LINE: RGBColor = RGBColor(148, 103, 189);
const KNEE: RGBColor = RGBColor(44, 160, 44);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {what}: {message}")]
    Draw { what: String, message: String },
}

/// plotters' errors carry the backend's error type; only the message matters here.
fn draw_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        what: what.to_owned(),
        message: e.to_string(),
    }
}

/// A file stem for `name` that stays inside the directory it is joined to: only
/// `[A-Za-z0-9._-]` are kept (others, such as ':', become '_'), a leading '.' becomes '_' (no
/// hidden file, no "." or ".."), at most 128 characters, and never empty.
pub fn safe_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with('.') {
        s.replace_range(..1, "_");
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

/// One function's instance peaks over time against its limits.
#[derive(Debug, Clone, Default)]
pub struct PeaksPlot {
    pub function: String,
    /// One per instance: (start, end or None while live, peak bytes); times in unix ms.
    pub instances: Vec<(u64, Option<u64>, u64)>,
    /// The per-hour peak: (hour start unix ms, bytes).
    pub hours: Vec<(u64, u64)>,
    /// memory.max and memory.high a new instance gets; None is not drawn.
    pub max_bytes: Option<u64>,
    pub high_bytes: Option<u64>,
}

const HOUR_MS: u64 = 3_600_000;

/// Tick labels for a time axis: the time of day when the span is under a day (with tenths of
/// a second under a minute, where ticks are less than a second apart), else the date and the
/// minute.
fn time_label(ms: f64, span_ms: f64) -> String {
    let ms = ms.max(1.0) as u64;
    let t = format_time_ms(ms);
    if span_ms < 60_000.0 {
        format!("{}.{}", t.get(11..).unwrap_or(&t), ms % 1000 / 100)
    } else if span_ms < 86_400_000.0 {
        t.get(11..).unwrap_or(&t).to_owned()
    } else {
        t.get(5..16).unwrap_or(&t).to_owned()
    }
}

/// The peaks plot: each instance's peak as a circle at its end (at its start while live) with
/// a thin line over its lifetime, the per-hour peak as a step line over each hour, memory.max
/// and memory.high as labelled horizontal lines. The time axis spans the instances (the hours
/// when there are none): hour steps are clipped to it, so that seconds of instances are not
/// squeezed into the corner of an hour.
pub fn peaks_svg(p: &PeaksPlot) -> Result<String, PlotError> {
    let what = format!("the peaks plot of {}", p.function);
    let err = draw_err(&what);
    let (x, y1) = peaks_ranges(p);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        draw_peaks(&root, p, x, y1).map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// The peaks plot's time axis (unix ms, padded) and the top of its MiB axis.
fn peaks_ranges(p: &PeaksPlot) -> ((f64, f64), f64) {
    let mut times: Vec<u64> = p
        .instances
        .iter()
        .flat_map(|(s, e, _)| [*s, e.unwrap_or(*s)])
        .collect();
    if times.is_empty() {
        times = p
            .hours
            .iter()
            .flat_map(|(h, _)| [*h, h.saturating_add(HOUR_MS)])
            .collect();
    }
    let (t0, t1) = match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => (*a as f64, *b as f64),
        _ => (0.0, 1.0),
    };
    // A little room either side; at least a second, so one instance still has an axis.
    let pad = ((t1 - t0) * 0.05).max(1000.0);
    let top = p
        .instances
        .iter()
        .map(|i| i.2)
        .chain(p.hours.iter().map(|h| h.1))
        .chain(p.max_bytes)
        .chain(p.high_bytes)
        .max()
        .unwrap_or(0) as f64
        / MIB;
    ((t0 - pad, t1 + pad), (top * 1.15).max(1.0))
}

/// The peaks plot on `root`: its axes, the hour steps, the instances over them, the limits,
/// the legend.
fn draw_peaks(root: &Area, p: &PeaksPlot, (x0, x1): (f64, f64), y1: f64) -> DrawResult {
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("{}: instance peaks against limits", p.function),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, 0f64..y1)?;
    let span = x1 - x0;
    chart
        .configure_mesh()
        .x_desc("time (UTC)")
        .y_desc("peak (MiB)")
        .x_labels(6)
        .x_label_formatter(&|x| time_label(*x, span))
        .draw()?;
    // Hour steps first, so that the instances are drawn over them.
    draw_hour_steps(&mut chart, p, (x0, x1))?;
    draw_instance_peaks(&mut chart, p)?;
    draw_limit_lines(&mut chart, p, (x0, x1))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
}

/// The per-hour peak as a step over each hour, clipped to the time axis `(x0, x1)`.
fn draw_hour_steps(chart: &mut Panel, p: &PeaksPlot, (x0, x1): (f64, f64)) -> DrawResult {
    let hours: Vec<_> = p
        .hours
        .iter()
        .filter_map(|(h, b)| {
            let a = (*h as f64).max(x0);
            let z = (h.saturating_add(HOUR_MS) as f64).min(x1);
            (a < z).then_some((a, z, *b as f64 / MIB))
        })
        .collect();
    if !hours.is_empty() {
        chart
            .draw_series(
                hours.iter().map(|(a, z, y)| {
                    PathElement::new(vec![(*a, *y), (*z, *y)], HOUR.stroke_width(3))
                }),
            )?
            .label("peak of the hour")
            .legend(|(x, y)| Rectangle::new([(x, y - 2), (x + 16, y + 2)], HOUR.filled()));
    }
    Ok(())
}

/// Each instance's peak: a thin line over its lifetime, a circle at its end (at its start
/// while live).
fn draw_instance_peaks(chart: &mut Panel, p: &PeaksPlot) -> DrawResult {
    chart.draw_series(p.instances.iter().filter_map(|(s, e, b)| {
        let e = (*e)?;
        let y = *b as f64 / MIB;
        Some(PathElement::new(
            vec![(*s as f64, y), (e as f64, y)],
            INSTANCE.mix(0.4),
        ))
    }))?;
    chart
        .draw_series(p.instances.iter().map(|(s, e, b)| {
            Circle::new(
                (e.unwrap_or(*s) as f64, *b as f64 / MIB),
                4,
                INSTANCE.filled(),
            )
        }))?
        .label(format!("instance peak ({})", p.instances.len()))
        .legend(|(x, y)| Rectangle::new([(x + 4, y - 4), (x + 12, y + 4)], INSTANCE.filled()));
    Ok(())
}

/// memory.max and memory.high, where set, as labelled lines across `(x0, x1)`.
fn draw_limit_lines(chart: &mut Panel, p: &PeaksPlot, (x0, x1): (f64, f64)) -> DrawResult {
    for (name, value, colour) in [
        ("memory.max", p.max_bytes, MAX_LINE),
        ("memory.high", p.high_bytes, HIGH_LINE),
    ] {
        let Some(v) = value else { continue };
        let y = v as f64 / MIB;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x0, y), (x1, y)],
                colour.stroke_width(2),
            )))?
            .label(format!("{name} {} ({v} B)", human_bytes(v)))
            .legend(move |(x, y)| Rectangle::new([(x, y - 1), (x + 16, y + 1)], colour.filled()));
    }
    Ok(())
}

/// A bar chart of one column of a table: one bar per row, its value written above it.
#[derive(Debug, Clone, Default)]
pub struct BarChart {
    pub title: String,
    pub y_desc: String,
    pub bars: Vec<(String, f64)>,
}

pub fn bar_chart_svg(c: &BarChart) -> Result<String, PlotError> {
    let what = format!("the bar chart {:?}", c.title);
    let err = draw_err(&what);
    let n = c.bars.len() as u32;
    let top = c.bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let y1 = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&c.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            // An integer range's segments include its end: 0..n-1 has n of them.
            .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0f64..y1)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(c.y_desc.as_str())
            .x_labels(c.bars.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => c
                    .bars
                    .get(*i as usize)
                    .map(|b| b.0.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(c.bars.iter().enumerate().map(|(i, (_, v))| {
                let i = i as u32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    INSTANCE.filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(&err)?;
        chart
            .draw_series(c.bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format_value(*v),
                    (SegmentValue::CenterOf(i as u32), *v),
                    TextStyle::from(("sans-serif", 15).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// Integers without decimals, other values with two significant decimals.
fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One memory limit of `emars tune`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TunePoint {
    pub limit_bytes: u64,
    pub median_ms: f64,
    pub max_ms: f64,
    pub oom_kills: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TunePlot {
    pub title: String,
    /// Median latency of the runs without a limit.
    pub baseline_ms: f64,
    pub points: Vec<TunePoint>,
    pub knee_bytes: Option<u64>,
}

/// Latency against the limit above (median and max, the baseline as a line), OOM kills and
/// failures against the limit below, the knee as a vertical line through both.
pub fn tune_svg(t: &TunePlot) -> Result<String, PlotError> {
    let err = draw_err("the tune plot");
    let limits = || t.points.iter().map(|p| p.limit_bytes as f64 / MIB);
    let lo = limits().fold(f64::INFINITY, f64::min);
    let hi = limits().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.06).max(1.0);
    let (x0, x1) = ((lo - pad).max(0.0), hi + pad);
    let lat_top = t
        .points
        .iter()
        .map(|p| p.max_ms)
        .fold(t.baseline_ms, f64::max)
        .max(1.0)
        * 1.15;
    let oom_top = t
        .points
        .iter()
        .map(|p| p.oom_kills.max(p.failures))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.2;
    let knee = t.knee_bytes.map(|k| k as f64 / MIB);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let root = root.titled(&t.title, ("sans-serif", 20)).map_err(&err)?;
        let (upper, lower) = root.split_vertically(360);
        draw_latency(&upper, t, (x0, x1), lat_top, knee).map_err(&err)?;
        draw_ooms(&lower, t, (x0, x1), oom_top, knee).map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;
/// A panel with two linear axes (a tune panel: limits in MiB across; the peaks plot: time
/// across, MiB up).
type Panel<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn draw_latency(
    area: &Area,
    t: &TunePlot,
    x: (f64, f64),
    top: f64,
    knee: Option<f64>,
) -> DrawResult {
    let mut chart = tune_panel(area, x, top, "wall-clock latency (ms)")?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(x.0, t.baseline_ms), (x.1, t.baseline_ms)],
            BLACK.mix(0.5).stroke_width(1),
        )))?
        .label(format!("no limit: median {:.1} ms", t.baseline_ms))
        .legend(|(x, y)| Rectangle::new([(x, y), (x + 16, y + 1)], BLACK.mix(0.5).filled()));
    let median: Vec<(f64, f64)> = t
        .points
        .iter()
        .map(|p| (p.limit_bytes as f64 / MIB, p.median_ms))
        .collect();
    chart
        .draw_series(LineSeries::new(
            median.iter().copied(),
            INSTANCE.stroke_width(2),
        ))?
        .label("median")
        .legend(|(x, y)| Rectangle::new([(x, y - 1), (x + 16, y + 1)], INSTANCE.filled()));
    chart.draw_series(median.iter().map(|p| Circle::new(*p, 4, INSTANCE.filled())))?;
    chart
        .draw_series(t.points.iter().map(|p| {
            Cross::new(
                (p.limit_bytes as f64 / MIB, p.max_ms),
                5,
                HOUR.stroke_width(2),
            )
        }))?
        .label("max")
        .legend(|(x, y)| Rectangle::new([(x + 4, y - 4), (x + 12, y + 4)], HOUR.filled()));
    finish_panel(&mut chart, knee, top, SeriesLabelPosition::LowerRight)
}

fn draw_ooms(area: &Area, t: &TunePlot, x: (f64, f64), top: f64, knee: Option<f64>) -> DrawResult {
    let mut chart = tune_panel(area, x, top, "OOM kills / failures")?;
    let series = |f: fn(&TunePoint) -> u64| -> Vec<(f64, f64)> {
        t.points
            .iter()
            .map(|p| (p.limit_bytes as f64 / MIB, f(p) as f64))
            .collect()
    };
    let ooms = series(|p| p.oom_kills);
    chart
        .draw_series(LineSeries::new(
            ooms.iter().copied(),
            MAX_LINE.stroke_width(2),
        ))?
        .label("OOM kills")
        .legend(|(x, y)| Rectangle::new([(x, y - 1), (x + 16, y + 1)], MAX_LINE.filled()));
    chart.draw_series(
        ooms.iter()
            .map(|p| TriangleMarker::new(*p, 5, MAX_LINE.filled())),
    )?;
    chart
        .draw_series(
            series(|p| p.failures)
                .into_iter()
                .map(|p| Cross::new(p, 5, HIGH_LINE.stroke_width(2))),
        )?
        .label("failed runs")
        .legend(|(x, y)| Rectangle::new([(x + 4, y - 4), (x + 12, y + 4)], HIGH_LINE.filled()));
    finish_panel(&mut chart, knee, top, SeriesLabelPosition::UpperRight)
}

/// A panel of the tune plot: the limits (MiB) across, `y_desc` from 0 to `top` up.
fn tune_panel<'a, 'b>(
    area: &'a Area<'b>,
    x: (f64, f64),
    top: f64,
    y_desc: &str,
) -> Result<Panel<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x.0..x.1, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("memory limit (MiB)")
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// A tune panel's end: the knee's line (when there is one) and the legend at `legend`.
fn finish_panel<'a, 'b: 'a>(
    chart: &mut Panel<'a, 'b>,
    knee: Option<f64>,
    top: f64,
    legend: SeriesLabelPosition,
) -> DrawResult {
    if let Some(k) = knee {
        knee_line(chart, k, top)?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn knee_line<'a, 'b: 'a>(chart: &mut Panel<'a, 'b>, k: f64, top: f64) -> DrawResult {
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(k, 0.0), (k, top)],
        KNEE.stroke_width(2),
    )))?;
    chart.draw_series(std::iter::once(Text::new(
        format!("knee {k:.0} MiB"),
        (k, top * 0.95),
        ("sans-serif", 14).into_font().color(&KNEE),
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SVG is one <svg> element whose tags all close: a small well-formedness check that
    /// needs no XML parser (elements are either self-closed or closed by name).
    fn assert_well_formed(svg: &str) {
        assert!(svg.trim_start().starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            rest = &rest[i + 1..];
            let end = rest.find('>').expect("an unterminated tag");
            let tag = &rest[..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "{svg}");
            } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
                let name = tag.split_whitespace().next().unwrap_or_default();
                stack.push(name.to_owned());
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    fn sample() -> PeaksPlot {
        let t = 1_780_000_000_000;
        PeaksPlot {
            function: "fn:a".into(),
            instances: vec![
                (t, Some(t + 500), 12 << 20),
                (t + 1000, Some(t + 1800), 24 << 20),
                (t + 2000, None, 36 << 20),
            ],
            hours: vec![(t - t % HOUR_MS, 36 << 20)],
            max_bytes: Some(128 << 20),
            high_bytes: Some(96 << 20),
        }
    }

    #[test]
    fn peaks_plot_has_labels_one_mark_per_instance_and_the_limit_lines() {
        let svg = peaks_svg(&sample()).expect("drawn");
        assert_well_formed(&svg);
        for label in [
            "fn:a: instance peaks",
            "time (UTC)",
            "peak (MiB)",
            "peak of the hour",
        ] {
            assert!(svg.contains(label), "{label} missing:\n{svg}");
        }
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        assert!(svg.contains("memory.max 128.0 MiB (134217728 B)"), "{svg}");
        assert!(svg.contains("memory.high 96.0 MiB (100663296 B)"), "{svg}");
    }

    #[test]
    fn absent_limits_are_not_drawn_and_no_instances_still_draw() {
        let mut p = sample();
        p.max_bytes = None;
        p.high_bytes = None;
        let svg = peaks_svg(&p).expect("drawn");
        assert_well_formed(&svg);
        assert!(
            !svg.contains("memory.max") && !svg.contains("memory.high"),
            "{svg}"
        );
        p.instances.clear();
        let svg = peaks_svg(&p).expect("drawn");
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<circle").count(), 0, "{svg}");
        let svg = peaks_svg(&PeaksPlot::default()).expect("an empty plot is still a plot");
        assert_well_formed(&svg);
    }

    #[test]
    fn bar_chart_has_a_bar_and_a_value_per_row() {
        let c = BarChart {
            title: "memory held".into(),
            y_desc: "GiB·h".into(),
            bars: vec![("static".into(), 12.5), ("emars".into(), 4.0)],
        };
        let svg = bar_chart_svg(&c).expect("drawn");
        assert_well_formed(&svg);
        for label in [
            "memory held",
            "GiB·h",
            "static",
            "emars",
            "\n12.50\n",
            "\n4\n",
        ] {
            assert!(svg.contains(label), "{label} missing:\n{svg}");
        }
        // One bar per row: the only filled rectangles besides the white background.
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
    }

    #[test]
    fn tune_plot_marks_the_knee() {
        let point = |mib: u64, ms: f64, ooms: u64| TunePoint {
            limit_bytes: mib << 20,
            median_ms: ms,
            max_ms: ms * 1.2,
            oom_kills: ooms,
            failures: ooms,
        };
        let mut t = TunePlot {
            title: "emars tune".into(),
            baseline_ms: 100.0,
            points: vec![
                point(16, 20.0, 2),
                point(64, 104.0, 0),
                point(128, 101.0, 0),
            ],
            knee_bytes: Some(64 << 20),
        };
        let svg = tune_svg(&t).expect("drawn");
        assert_well_formed(&svg);
        for label in [
            "knee 64 MiB",
            "memory limit (MiB)",
            "wall-clock latency (ms)",
            "OOM kills",
        ] {
            assert!(svg.contains(label), "{label} missing:\n{svg}");
        }
        t.knee_bytes = None;
        assert!(!tune_svg(&t).expect("drawn").contains("knee"));
    }

    #[test]
    fn time_labels_fit_the_span() {
        let t = 1_780_000_000_500.0; // 2026-05-28 20:26:40.5 UTC
        assert_eq!(time_label(t, 10_000.0), "20:26:40.5");
        assert_eq!(time_label(t, 3_600_000.0), "20:26:40");
        assert_eq!(time_label(t, 3.0 * 86_400_000.0), "05-28 20:26");
    }

    #[test]
    fn safe_stems_stay_in_their_directory() {
        assert_eq!(safe_stem("fn:a"), "fn_a");
        assert_eq!(safe_stem(".."), "_.");
        assert_eq!(safe_stem("."), "_");
        assert_eq!(safe_stem("a/../../etc"), "a_.._.._etc");
        assert_eq!(safe_stem(""), "_");
        assert_eq!(safe_stem(&"x".repeat(300)).len(), 128);
    }
}
