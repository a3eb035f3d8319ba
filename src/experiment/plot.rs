//! The paper's Figure 1 as a self-contained SVG: average NDCG@k against the consistency weight η,
//! one line per method, error bars of ± one sample standard deviation over seeds, the mean
//! printed beside each point (mean ± std in the point's tooltip).
//!
//! x axis: log10 η for η > 0, one decade per step, and η = 0 placed explicitly one decade left
//! of the smallest positive η, behind an axis break (log 0 does not exist).

use std::fmt::Write as _;
use std::path::Path;

use super::report::summaries;
use super::suite::SuiteState;
use crate::model::EmbeddingKind;
use crate::{Error, Result};

/// One point: η and the score over seeds (×100).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EtaPoint {
    pub eta: f64,
    pub mean: f64,
    /// Sample std over seeds; None for one seed (no error bar).
    pub std: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EtaCurve {
    pub method: String,
    pub points: Vec<EtaPoint>,
}

/// Figure 1's curves from an η-sweep state: average NDCG@k per (variant, η) with finished runs.
pub fn eta_curves(state: &SuiteState) -> Result<Vec<EtaCurve>> {
    let rows = summaries(state, EmbeddingKind::Pooled)?;
    let mut curves: Vec<EtaCurve> = Vec::new();
    for r in rows {
        let Some(eta) = r.eta else { continue };
        let point = EtaPoint { eta, mean: r.ndcg.avg.mean, std: r.ndcg.avg.std };
        match curves.iter_mut().find(|c| c.method == r.variant.name()) {
            Some(c) => c.points.push(point),
            None => curves.push(EtaCurve { method: r.variant.name().to_string(), points: vec![point] }),
        }
    }
    Ok(curves)
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0; // room for the legend
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// XML text and attribute escaping.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

fn validate(curves: &[EtaCurve]) -> Result<()> {
    if curves.is_empty() || curves.iter().any(|c| c.points.is_empty()) {
        return Err(Error::data("Figure 1 needs at least one curve, each with at least one point"));
    }
    for c in curves {
        for (i, p) in c.points.iter().enumerate() {
            if !(p.eta.is_finite() && p.eta >= 0.0) {
                return Err(Error::data(format!("Figure 1, `{}`: η = {} must be finite and ≥ 0", c.method, p.eta)));
            }
            if !p.mean.is_finite() || p.std.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
                return Err(Error::data(format!(
                    "Figure 1, `{}` at η = {}: score {} ± {:?} is not a finite mean with a finite std ≥ 0",
                    c.method, p.eta, p.mean, p.std
                )));
            }
            if c.points[..i].iter().any(|q| q.eta == p.eta) {
                return Err(Error::data(format!("Figure 1, `{}`: η = {} appears twice", c.method, p.eta)));
            }
        }
    }
    Ok(())
}

/// Maps η to an axis unit: 0 → 0, positive η → 1 + log10(η / smallest positive η).
struct EtaAxis {
    log_min: f64,
    units: f64,
}

impl EtaAxis {
    fn new(etas: &[f64]) -> Self {
        let logs: Vec<f64> = etas.iter().filter(|&&e| e > 0.0).map(|e| e.log10()).collect();
        let log_min = logs.iter().copied().fold(f64::INFINITY, f64::min);
        let log_max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let units = if logs.is_empty() { 1.0 } else { (1.0 + log_max - log_min).max(1.0) };
        EtaAxis { log_min: if logs.is_empty() { 0.0 } else { log_min }, units }
    }
    fn unit(&self, eta: f64) -> f64 {
        if eta > 0.0 { 1.0 + eta.log10() - self.log_min } else { 0.0 }
    }
    fn x(&self, eta: f64) -> f64 {
        let span = WIDTH - LEFT - RIGHT;
        LEFT + 20.0 + (span - 40.0) * self.unit(eta) / self.units
    }
}

/// The SVG text of Figure 1. `k` is the NDCG cut-off shown on the y axis.
pub fn figure1_svg(title: &str, k: usize, curves: &[EtaCurve]) -> Result<String> {
    validate(curves)?;
    let mut etas: Vec<f64> = curves.iter().flat_map(|c| c.points.iter().map(|p| p.eta)).collect();
    etas.sort_by(f64::total_cmp);
    etas.dedup();
    let xa = EtaAxis::new(&etas);

    let bounds = curves.iter().flat_map(|c| c.points.iter()).map(|p| {
        let s = p.std.unwrap_or(0.0);
        (p.mean - s, p.mean + s)
    });
    let (lo, hi) = bounds.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (l, h)| (a.min(l), b.max(h)));
    let pad = if hi > lo { 0.1 * (hi - lo) } else { 1.0 };
    let (y_lo, y_hi) = (lo - pad, hi + pad);
    let y = |v: f64| TOP + (HEIGHT - TOP - BOTTOM) * (y_hi - v) / (y_hi - y_lo);
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);

    let mut s = String::new();
    let w = &mut s;
    // fmt::Write into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        w,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(w, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        w,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        (x0 + x1) / 2.0,
        escape(title)
    );
    // Axes.
    let _ = writeln!(w, r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>"#);
    let _ = writeln!(w, r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>"#);
    for &eta in &etas {
        let x = xa.x(eta);
        let _ = writeln!(w, r#"<line x1="{x:.2}" y1="{y0}" x2="{x:.2}" y2="{}" stroke="black"/>"#, y0 + 5.0);
        let _ = writeln!(w, r#"<text x="{x:.2}" y="{}" text-anchor="middle">{eta}</text>"#, y0 + 19.0);
    }
    if etas.first() == Some(&0.0) && etas.len() > 1 {
        // Axis break between η = 0 and the first decade.
        let xb = (xa.x(0.0) + xa.x(etas[1])) / 2.0;
        let _ = writeln!(
            w,
            r#"<path d="M {:.2} {} l 6 -8 M {:.2} {} l 6 -8" stroke="black" fill="none"/>"#,
            xb - 5.0,
            y0 + 4.0,
            xb - 1.0,
            y0 + 4.0
        );
    }
    for i in 0..=4 {
        let v = y_lo + (y_hi - y_lo) * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = writeln!(w, r#"<line x1="{}" y1="{yy:.2}" x2="{x0}" y2="{yy:.2}" stroke="black"/>"#, x0 - 5.0);
        let _ = writeln!(w, r#"<text x="{}" y="{:.2}" text-anchor="end">{v:.1}</text>"#, x0 - 8.0, yy + 4.0);
    }
    let _ = writeln!(
        w,
        r#"<text x="{}" y="{}" text-anchor="middle">consistency weight η (log scale; 0 placed left of the break)</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 18.0
    );
    let _ = writeln!(
        w,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">NDCG@{k}, average of I2T and T2I (×100)</text>"#,
        (y0 + y1) / 2.0
    );

    for (ci, c) in curves.iter().enumerate() {
        let color = COLORS[ci % COLORS.len()];
        let mut pts = c.points.clone();
        pts.sort_by(|a, b| a.eta.total_cmp(&b.eta));
        let method = escape(&c.method);
        let _ = writeln!(w, r#"<g class="curve" data-method="{method}">"#);
        let path: Vec<String> = pts.iter().map(|p| format!("{:.2},{:.2}", xa.x(p.eta), y(p.mean))).collect();
        let _ = writeln!(w, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for p in &pts {
            let (px, py) = (xa.x(p.eta), y(p.mean));
            if let Some(sd) = p.std {
                let (ya, yb) = (y(p.mean - sd), y(p.mean + sd));
                let _ = writeln!(
                    w,
                    r#"<line class="errorbar" x1="{px:.2}" y1="{ya:.2}" x2="{px:.2}" y2="{yb:.2}" stroke="{color}"/>"#
                );
                for yc in [ya, yb] {
                    let _ = writeln!(
                        w,
                        r#"<line x1="{:.2}" y1="{yc:.2}" x2="{:.2}" y2="{yc:.2}" stroke="{color}"/>"#,
                        px - 4.0,
                        px + 4.0
                    );
                }
            }
            let tip = match p.std {
                Some(sd) => format!("{method} η={}: {:.2} ± {sd:.2}", p.eta, p.mean),
                None => format!("{method} η={}: {:.2} (one seed)", p.eta, p.mean),
            };
            let _ = writeln!(
                w,
                r#"<circle cx="{px:.2}" cy="{py:.2}" r="3.5" fill="{color}" data-eta="{}"><title>{tip}</title></circle>"#,
                p.eta
            );
            let _ = writeln!(
                w,
                r#"<text x="{:.2}" y="{:.2}" fill="{color}" font-size="11">{:.2}</text>"#,
                px + 6.0,
                py - 6.0,
                p.mean
            );
        }
        let ly = TOP + 10.0 + 20.0 * ci as f64;
        let lx = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            w,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#,
            lx + 25.0
        );
        let _ = writeln!(w, r#"<text x="{}" y="{}">{method}</text>"#, lx + 30.0, ly + 4.0);
        let _ = writeln!(w, "</g>");
    }
    let _ = writeln!(w, "</svg>");
    Ok(s)
}

/// Writes Figure 1 to `path` atomically.
pub fn write_figure1(path: &Path, title: &str, k: usize, curves: &[EtaCurve]) -> Result<()> {
    let svg = figure1_svg(title, k, curves)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::io::atomic_write(path, svg.as_bytes())
}
