//! Table 1 (`src/experiment/report.rs`) and Figure 1 (`src/experiment/plot.rs`): hand-computed
//! mean ± sample std, the markdown and JSON files, and an SVG that is well-formed XML, prints
//! every number and orders the points by η.

use std::path::PathBuf;

use semshare::Error;
use semshare::eval::metrics::{DirectionMetrics, Report};
use semshare::experiment::plot::{EtaCurve, EtaPoint, eta_curves, figure1_svg, write_figure1};
use semshare::experiment::report::{Tables, mean_std, summarize, write_table};
use semshare::experiment::scores::{Directions, Scores};
use semshare::experiment::suite::{RunRecord, Suite, SuiteState};
use semshare::model::Variant;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-report-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn direction(ndcg500: f64, map: f64) -> DirectionMetrics {
    DirectionMetrics {
        ndcg: vec![(10, 1.0), (500, ndcg500)],
        map_all: map,
        precision: vec![],
        pr_curve: vec![],
        recall: vec![],
    }
}

fn report(i2t: (f64, f64), t2i: (f64, f64)) -> Report {
    let (a, b) = (direction(i2t.0, i2t.1), direction(t2i.0, t2i.1));
    let avg = DirectionMetrics::mean(&a, &b);
    Report { i2t: a, t2i: b, avg }
}

fn scores(ndcg_avg: f64) -> Scores {
    let d = Directions { i2t: ndcg_avg - 1.0, t2i: ndcg_avg + 1.0, avg: ndcg_avg };
    Scores { k: 500, ndcg: d, map_all: d }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn scores_come_from_the_report() {
    let s = Scores::from_report(&report((60.0, 40.0), (70.0, 50.0)), 500).unwrap();
    assert_eq!(s.ndcg, Directions { i2t: 60.0, t2i: 70.0, avg: 65.0 });
    assert_eq!(s.map_all, Directions { i2t: 40.0, t2i: 50.0, avg: 45.0 });
    assert!(matches!(Scores::from_report(&report((60.0, 40.0), (70.0, 50.0)), 100), Err(Error::Data { .. })));
    assert!(matches!(Scores::from_report(&report((f64::NAN, 40.0), (70.0, 50.0)), 500), Err(Error::Data { .. })));
}

#[test]
fn mean_and_sample_std_hand_computed() {
    // [66, 67, 68.5]: mean 201.5/3 = 67.1667; deviations −7/6, −1/6, 4/3; squares sum
    // 49/36 + 1/36 + 64/36 = 114/36 = 3.16667; /(n − 1) = 1.58333; sqrt = 1.2583057.
    let m = mean_std(&[66.0, 67.0, 68.5]).unwrap();
    assert!(close(m.mean, 67.166_666_666_666_67) && close(m.std.unwrap(), 1.258_305_739_211_791_6), "{m:?}");
    // Two seeds: 70.25, 71.75 → mean 71, std = 0.75·√2 = 1.0606602.
    let m = mean_std(&[70.25, 71.75]).unwrap();
    assert!(close(m.mean, 71.0) && close(m.std.unwrap(), 0.75 * 2f64.sqrt()), "{m:?}");
    // One seed: the sample std is undefined, not 0.
    assert_eq!(mean_std(&[5.0]).unwrap().std, None);
    assert!(matches!(mean_std(&[]), Err(Error::Data { .. })));
    assert!(matches!(mean_std(&[1.0, f64::INFINITY]), Err(Error::Data { .. })));
}

#[test]
fn summaries_cannot_mix_cut_offs() {
    let mut other = scores(50.0);
    other.k = 100;
    assert!(matches!(summarize(Variant::Ours, None, &[scores(50.0), other]), Err(Error::Data { .. })));
    assert!(matches!(summarize(Variant::Ours, None, &[]), Err(Error::Data { .. })));
}

fn record_of(state: &SuiteState, variant: Variant, seed: u64, ndcg_avg: f64) -> RunRecord {
    let key = *state.suite.runs().iter().find(|k| k.variant == variant && k.seed == seed).unwrap();
    RunRecord {
        key,
        scores: scores(ndcg_avg),
        label: None,
        report: serde_json::Value::Null,
        seconds: 1.0,
        best_step: 10,
    }
}

#[test]
fn table1_files_hold_mean_and_std_per_variant_in_suite_order() {
    let dir = temp_dir("table1");
    let state_path = dir.join("state.json");
    let suite = Suite::table1(3, "fp").unwrap();
    let mut state = SuiteState::open(&state_path, &suite).unwrap();
    // st recorded first, but the table follows the suite's row order: ours, imc, st.
    for (v, seed, x) in [
        (Variant::St, 0, 60.0),
        (Variant::Ours, 0, 66.0),
        (Variant::Ours, 1, 67.0),
        (Variant::Ours, 2, 68.5),
        (Variant::Imc, 0, 70.25),
        (Variant::Imc, 1, 71.75),
    ] {
        let r = record_of(&state, v, seed, x);
        state.record(&state_path, r).unwrap();
    }
    // Label scores for two of ours' seeds (10 below pooled) and none for the others.
    let ours = state.records_of(Variant::Ours, None).iter().map(|r| (r.key, r.scores)).collect::<Vec<_>>();
    for (key, pooled) in &ours[..2] {
        state.record_label(&state_path, key, scores(pooled.ndcg.avg - 10.0)).unwrap();
    }
    let tables = Tables::of(&state, "pooled").unwrap();
    let order: Vec<String> = tables.pooled.iter().map(|r| r.label()).collect();
    assert_eq!(order, ["ours", "imc (η=1)", "st"]);
    assert_eq!(tables.pooled.iter().map(|r| r.seeds).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(tables.label.len(), 1);
    assert_eq!((tables.label[0].variant, tables.label[0].seeds), (Variant::Ours, 2));
    assert!(close(tables.label[0].ndcg.avg.mean, 56.5), "{:?}", tables.label[0]);
    assert!(state.record_label(&state_path, &state.suite.runs()[1], scores(1.0)).is_err(), "not recorded");

    let out = dir.join("results");
    write_table(&out, "table1", "Table 1 — balanced", &tables).unwrap();
    let md = std::fs::read_to_string(out.join("table1.md")).unwrap();
    let (md, label_md) = md.split_once("ranked with the label embedding").unwrap();
    assert!(label_md.contains("| ours | 2 | 55.50 ± 0.71 |"), "{label_md}");
    assert!(label_md.contains("best validation NDCG ranked with the pooled embedding"), "{label_md}");
    let lines: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert!(lines[0].contains("NDCG@500 I2T") && lines[0].contains("mAP@all avg"), "{md}");
    // ours: avg 67.17 ± 1.26; I2T = avg − 1 → 66.17 ± 1.26; T2I 68.17 ± 1.26.
    assert_eq!(
        lines[1],
        "| ours | 3 | 66.17 ± 1.26 | 68.17 ± 1.26 | 67.17 ± 1.26 | 66.17 ± 1.26 | 68.17 ± 1.26 | 67.17 ± 1.26 |"
    );
    assert!(lines[2].starts_with("| imc (η=1) | 2 | 70.00 ± 1.06 | 72.00 ± 1.06 | 71.00 ± 1.06 |"), "{}", lines[2]);
    assert!(lines[3].starts_with("| st | 1 | 59.00 ± — |"), "{}", lines[3]);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("table1.json")).unwrap()).unwrap();
    let ours = &json["rows"][0];
    assert_eq!(ours["variant"], "ours");
    assert!(close(ours["ndcg"]["avg"]["mean"].as_f64().unwrap(), 67.166_666_666_666_67));
    assert!(close(ours["ndcg"]["avg"]["std"].as_f64().unwrap(), 1.258_305_739_211_791_6));
    assert!(json["rows"][2]["ndcg"]["avg"]["std"].is_null());
    assert_eq!(json["rows"][1]["eta"], 1.0);
    assert_eq!(json["label_rows"].as_array().unwrap().len(), 1);
    assert_eq!(json["checkpoints_selected_with"], "pooled");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A small well-formedness check: one root element, balanced and properly nested tags, quoted
// attributes without duplicates, `<` never in text or values, `&` only as a known entity.

fn check_entities(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        let tail = &rest[i + 1..];
        let end = tail.find(';').ok_or(format!("unterminated entity in {s:?}"))?;
        if !["amp", "lt", "gt", "quot", "apos"].contains(&&tail[..end]) {
            return Err(format!("unknown entity &{};", &tail[..end]));
        }
        rest = &tail[end..];
    }
    if s.contains('<') { Err(format!("`<` in text or value {s:?}")) } else { Ok(()) }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || "_-.:".contains(x))
}

fn well_formed(doc: &str) -> Result<(), String> {
    let mut s = doc.trim_start();
    if let Some(rest) = s.strip_prefix("<?xml") {
        s = &rest[rest.find("?>").ok_or("unterminated prolog")? + 2..];
    }
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    loop {
        let lt = s.find('<');
        let text = &s[..lt.unwrap_or(s.len())];
        if stack.is_empty() && !text.trim().is_empty() {
            return Err(format!("text outside the root: {text:?}"));
        }
        check_entities(text)?;
        let Some(lt) = lt else { break };
        s = &s[lt..];
        let gt = s.find('>').ok_or("unterminated tag")?;
        let tag = &s[1..gt];
        s = &s[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or(format!("closing </{name}> without an open tag"))?;
            if open != name.trim() {
                return Err(format!("<{open}> closed by </{name}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.strip_suffix('/').unwrap_or(tag);
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = &body[..name_end];
        if !is_name(name) {
            return Err(format!("bad tag name {name:?}"));
        }
        let mut attrs = body[name_end..].trim();
        let mut seen: Vec<&str> = Vec::new();
        while !attrs.is_empty() {
            let eq = attrs.find('=').ok_or(format!("attribute without value in <{name}>"))?;
            let key = attrs[..eq].trim();
            if !is_name(key) || seen.contains(&key) {
                return Err(format!("bad or repeated attribute {key:?} in <{name}>"));
            }
            seen.push(key);
            let rest = &attrs[eq + 1..];
            let q = rest.chars().next().filter(|c| *c == '"' || *c == '\'').ok_or("unquoted attribute")?;
            let close = rest[1..].find(q).ok_or("unterminated attribute")?;
            check_entities(&rest[1..1 + close])?;
            attrs = rest[close + 2..].trim_start();
        }
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name);
        }
    }
    match (stack.last(), roots) {
        (Some(open), _) => Err(format!("<{open}> never closed")),
        (None, 1) => Ok(()),
        (None, n) => Err(format!("{n} root elements")),
    }
}

#[test]
fn the_checker_rejects_broken_xml() {
    assert!(well_formed("<a><b/></a>").is_ok());
    for bad in
        ["<a><b></a>", "<a>", "<a x=1/>", "<a x='1' x='2'/>", "<a>1 < 2</a>", "<a>&nbsp;</a>", "<a/><b/>", "x<a/>"]
    {
        assert!(well_formed(bad).is_err(), "{bad}");
    }
}

fn sweep() -> Vec<EtaCurve> {
    // Points deliberately out of η order.
    let p = |eta, mean, std| EtaPoint { eta, mean, std };
    vec![
        EtaCurve {
            method: "imc".into(),
            points: vec![
                p(1.0, 58.41, Some(0.62)),
                p(0.0, 63.08, Some(0.31)),
                p(10.0, 51.9, Some(1.07)),
                p(0.01, 62.77, Some(0.44)),
                p(0.1, 61.35, Some(0.58)),
            ],
        },
        EtaCurve {
            method: "ours+con <&>".into(),
            points: vec![
                p(0.1, 65.02, Some(0.21)),
                p(0.0, 66.3, Some(0.27)),
                p(0.01, 66.11, Some(0.33)),
                p(10.0, 57.49, None),
                p(1.0, 62.86, Some(0.4)),
            ],
        },
    ]
}

/// (data-eta, cx) of each curve's points, in document order.
fn points_by_curve(svg: &str) -> Vec<Vec<(f64, f64)>> {
    let attr = |s: &str, name: &str| -> f64 {
        let i = s.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        s[i..i + s[i..].find('"').unwrap()].parse().unwrap()
    };
    svg.split("<g class=\"curve\"")
        .skip(1)
        .map(|g| g.split("<circle").skip(1).map(|c| (attr(c, "data-eta"), attr(c, "cx"))).collect())
        .collect()
}

#[test]
fn figure1_is_well_formed_prints_every_number_and_orders_points_by_eta() {
    let curves = sweep();
    let svg = figure1_svg("Figure 1 — flickr-tags", 500, &curves).unwrap();
    well_formed(&svg).unwrap();
    for c in &curves {
        for p in &c.points {
            assert!(svg.contains(&format!(">{:.2}</text>", p.mean)), "mean {} missing", p.mean);
            if let Some(sd) = p.std {
                assert!(svg.contains(&format!("{:.2} ± {sd:.2}", p.mean)), "std {sd} missing");
            }
        }
    }
    for label in ["imc", "ours+con &lt;&amp;&gt;", "NDCG@500", "consistency weight η"] {
        assert!(svg.contains(label), "{label} missing");
    }
    for tick in [">0</text>", ">0.01</text>", ">0.1</text>", ">1</text>", ">10</text>"] {
        assert!(svg.contains(tick), "tick {tick} missing");
    }
    let per_curve = points_by_curve(&svg);
    assert_eq!(per_curve.len(), 2);
    for pts in &per_curve {
        let etas: Vec<f64> = pts.iter().map(|p| p.0).collect();
        assert_eq!(etas, [0.0, 0.01, 0.1, 1.0, 10.0], "drawn in η order");
        assert!(pts.windows(2).all(|w| w[0].1 < w[1].1), "x grows with η: {pts:?}");
        // Positive η on a log axis: equal decades, equal steps; 0 one decade left of 0.01.
        let steps: Vec<f64> = pts.windows(2).map(|w| w[1].1 - w[0].1).collect();
        assert!(steps.iter().all(|s| (s - steps[0]).abs() < 0.02), "{steps:?}");
    }
    // One bar per point with a std: the η = 10 point of the second curve (one seed) has none.
    assert_eq!(svg.matches("class=\"errorbar\"").count(), 9);
}

#[test]
fn figure1_rejects_bad_points() {
    let p = |eta, mean, std| EtaPoint { eta, mean, std };
    let one = |pts: Vec<EtaPoint>| vec![EtaCurve { method: "imc".into(), points: pts }];
    for bad in [
        vec![],
        one(vec![]),
        one(vec![p(0.1, 60.0, None), p(0.1, 61.0, None)]),
        one(vec![p(-1.0, 60.0, None)]),
        one(vec![p(f64::NAN, 60.0, None)]),
        one(vec![p(0.1, f64::NAN, None)]),
        one(vec![p(0.1, 60.0, Some(-1.0))]),
    ] {
        assert!(matches!(figure1_svg("t", 500, &bad), Err(Error::Data { .. })), "{bad:?}");
    }
    // A single point (one η, one seed) still draws.
    well_formed(&figure1_svg("t", 500, &one(vec![p(0.0, 60.0, None)])).unwrap()).unwrap();
}

#[test]
fn figure1_from_a_suite_state() {
    let dir = temp_dir("fig1");
    let path = dir.join("state.json");
    let suite = Suite::eta_sweep(2, "fp").unwrap();
    let mut state = SuiteState::open(&path, &suite).unwrap();
    for (i, key) in suite.runs().into_iter().enumerate() {
        let x = 60.0 + i as f64;
        let r = RunRecord {
            key,
            scores: scores(x),
            label: None,
            report: serde_json::Value::Null,
            seconds: 1.0,
            best_step: 1,
        };
        state.record(&path, r).unwrap();
    }
    let curves = eta_curves(&state).unwrap();
    assert_eq!(curves.iter().map(|c| c.method.as_str()).collect::<Vec<_>>(), ["imc", "ours+con"]);
    // imc at η = 0 is run 0 (seed 0, 60) and run 10 (seed 1, 70): mean 65, std 5√2.
    let p0 = curves[0].points[0];
    assert_eq!(p0.eta, 0.0);
    assert!(close(p0.mean, 65.0) && close(p0.std.unwrap(), 50f64.sqrt()), "{p0:?}");
    let file = dir.join("fig").join("figure1.svg");
    write_figure1(&file, "Figure 1", 500, &curves).unwrap();
    well_formed(&std::fs::read_to_string(&file).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
