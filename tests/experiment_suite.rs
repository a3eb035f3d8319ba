//! Suite definition and resume bookkeeping (`src/experiment/suite.rs`): a suite killed after k
//! runs resumes with exactly the remaining runs, in order; a state file of another suite, a
//! corrupt one, or a duplicate record is an error.

use std::path::PathBuf;

use proptest::prelude::*;
use semshare::Error;
use semshare::experiment::scores::{Directions, Scores};
use semshare::experiment::suite::{ETA_GRID, RunKey, RunRecord, Suite, SuiteState, TABLE1_ETA};
use semshare::model::Variant;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-suite-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A record whose scores encode its position, so a mixed-up record would show.
fn record(key: RunKey, i: usize) -> RunRecord {
    let x = i as f64;
    let d = Directions { i2t: x, t2i: x + 0.5, avg: x + 0.25 };
    RunRecord {
        key,
        scores: Scores { k: 500, ndcg: d, map_all: d },
        label: (i % 2 == 1).then_some(Scores { k: 500, ndcg: d, map_all: d }),
        report: serde_json::json!({ "run": i }),
        seconds: x,
        best_step: i as u64,
    }
}

#[test]
fn table1_lists_every_variant_per_seed_seed_major() {
    let s = Suite::table1(3, "data=balanced preset=small").unwrap();
    let runs = s.runs();
    let n = Variant::ALL.len();
    assert_eq!(runs.len(), 3 * n);
    for (seed, chunk) in runs.chunks(n).enumerate() {
        let variants: Vec<Variant> = chunk.iter().map(|k| k.variant).collect();
        assert_eq!(variants, Variant::ALL);
        for k in chunk {
            assert_eq!(k.seed, seed as u64);
            let want = if matches!(k.variant, Variant::OursCon | Variant::Imc) { Some(TABLE1_ETA) } else { None };
            assert_eq!(k.eta, want, "{k}");
        }
    }
}

#[test]
fn eta_sweep_is_imc_and_ours_con_over_the_grid() {
    let s = Suite::eta_sweep(2, "x").unwrap();
    let runs = s.runs();
    assert_eq!(runs.len(), 2 * 2 * 5);
    let first: Vec<(Variant, Option<f64>)> = runs[..10].iter().map(|k| (k.variant, k.eta)).collect();
    let want: Vec<(Variant, Option<f64>)> =
        [Variant::Imc, Variant::OursCon].iter().flat_map(|&v| ETA_GRID.iter().map(move |&e| (v, Some(e)))).collect();
    assert_eq!(first, want);
    assert!(runs[10..].iter().all(|k| k.seed == 1));
}

#[test]
fn bad_suites_are_rejected() {
    let mut s = Suite::eta_sweep(1, "x").unwrap();
    s.variants.push(Variant::Ours);
    assert!(matches!(s.validate(), Err(Error::Config { .. })), "ours has no η");
    let mut s = Suite::eta_sweep(1, "x").unwrap();
    s.etas.push(0.1);
    assert!(matches!(s.validate(), Err(Error::Config { .. })), "duplicate η");
    let mut s = Suite::eta_sweep(1, "x").unwrap();
    s.etas[0] = f64::NAN;
    assert!(matches!(s.validate(), Err(Error::Config { .. })), "NaN η");
    assert!(matches!(Suite::table1(0, "x"), Err(Error::Config { .. })), "no seed");
    assert!("table2".parse::<semshare::experiment::suite::SuiteKind>().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Kill after k runs (drop the in-memory state), reopen from disk: the remaining runs are
    /// exactly runs[k..], in order, and the k records come back as written.
    #[test]
    fn resume_after_k_runs_does_exactly_the_rest(eta_suite: bool, seeds in 1u64..4, k_frac in 0.0f64..=1.0) {
        let suite = if eta_suite { Suite::eta_sweep(seeds, "fp") } else { Suite::table1(seeds, "fp") }.unwrap();
        let runs = suite.runs();
        let k = ((runs.len() as f64) * k_frac).floor() as usize;
        let dir = temp_dir(&format!("resume-{eta_suite}-{seeds}-{k}"));
        let path = dir.join("state.json");
        {
            let mut state = SuiteState::open(&path, &suite).unwrap();
            prop_assert_eq!(state.remaining(), runs.clone());
            for (i, &want) in runs.iter().take(k).enumerate() {
                let next = state.remaining()[0];
                prop_assert_eq!(next, want);
                state.record(&path, record(next, i)).unwrap();
            }
        } // killed here
        let state = SuiteState::open(&path, &suite).unwrap();
        if k == 0 {
            prop_assert!(!path.exists(), "nothing recorded, nothing written");
        }
        prop_assert_eq!(state.remaining(), runs[k..].to_vec());
        prop_assert_eq!(state.progress(), (k, runs.len()));
        for (i, r) in state.finished.iter().enumerate() {
            prop_assert_eq!(r, &record(runs[i], i));
        }
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert!(leftovers.len() <= 1, "temp files left behind: {:?}", leftovers);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn out_of_order_records_leave_the_rest_in_suite_order() {
    let suite = Suite::table1(2, "fp").unwrap();
    let runs = suite.runs();
    let dir = temp_dir("order");
    let path = dir.join("state.json");
    let mut state = SuiteState::open(&path, &suite).unwrap();
    for &i in &[7usize, 2, 15] {
        state.record(&path, record(runs[i], i)).unwrap();
    }
    let state = SuiteState::open(&path, &suite).unwrap();
    let want: Vec<RunKey> = runs.iter().enumerate().filter(|(i, _)| ![7, 2, 15].contains(i)).map(|(_, k)| *k).collect();
    assert_eq!(state.remaining(), want);
    // records_of: one variant's runs in seed order, whatever the recording order.
    let mut state = state;
    let n = Variant::ALL.len();
    state.record(&path, record(runs[n + 2], n + 2)).unwrap(); // imc, seed 1
    let imc: Vec<u64> = state.records_of(Variant::Imc, Some(TABLE1_ETA)).iter().map(|r| r.key.seed).collect();
    assert_eq!(imc, [0, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_file_of_another_suite_or_a_corrupt_one_is_an_error() {
    let dir = temp_dir("mismatch");
    let path = dir.join("state.json");
    let suite = Suite::table1(1, "data=balanced").unwrap();
    let mut state = SuiteState::open(&path, &suite).unwrap();
    state.record(&path, record(suite.runs()[0], 0)).unwrap();

    let other = Suite::table1(1, "data=weak-image").unwrap();
    assert!(matches!(SuiteState::open(&path, &other), Err(Error::Config { .. })), "other fingerprint");
    // More seeds extend the suite and keep its finished runs; fewer than recorded do not fit.
    let more_seeds = Suite::table1(2, "data=balanced").unwrap();
    let mut extended = SuiteState::open(&path, &more_seeds).unwrap();
    let n = Variant::ALL.len();
    assert_eq!((extended.finished.len(), extended.remaining().len()), (1, 2 * n - 1));
    extended.record(&path, record(more_seeds.runs()[n], 1)).unwrap(); // seed 1
    assert!(matches!(SuiteState::open(&path, &suite), Err(Error::Config { .. })), "seed 1 is not in a 1-seed suite");

    std::fs::write(&path, b"{\"suite\": ").unwrap();
    assert!(matches!(SuiteState::open(&path, &suite), Err(Error::Format { .. })), "truncated file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn duplicate_or_foreign_records_are_rejected_and_not_written() {
    let dir = temp_dir("dup");
    let path = dir.join("state.json");
    let suite = Suite::table1(1, "fp").unwrap();
    let mut state = SuiteState::open(&path, &suite).unwrap();
    let first = suite.runs()[0];
    state.record(&path, record(first, 0)).unwrap();
    assert!(matches!(state.record(&path, record(first, 1)), Err(Error::Config { .. })));
    let foreign = RunKey { variant: Variant::Ours, seed: 9, eta: None };
    assert!(matches!(state.record(&path, record(foreign, 2)), Err(Error::Config { .. })));
    let wrong_eta = RunKey { variant: Variant::Imc, seed: 0, eta: Some(0.5) };
    assert!(matches!(state.record(&path, record(wrong_eta, 3)), Err(Error::Config { .. })));
    assert_eq!(SuiteState::open(&path, &suite).unwrap().finished.len(), 1);

    // A hand-edited file with a duplicate is refused on load.
    let mut doubled = state.clone();
    doubled.finished.push(record(first, 0));
    std::fs::write(&path, serde_json::to_vec(&doubled).unwrap()).unwrap();
    assert!(matches!(SuiteState::open(&path, &suite), Err(Error::Format { .. })));

    // A failed write leaves memory as the disk says: the directory is gone.
    let gone = dir.join("missing").join("state.json");
    let mut fresh = SuiteState::open(&gone, &suite).unwrap();
    assert!(fresh.record(&gone, record(first, 0)).is_err());
    assert!(fresh.finished.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
