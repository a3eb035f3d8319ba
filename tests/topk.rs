//! `Backend::top_k` on the CPU against a brute-force sort of every score, and the tiled search
//! (`cpu::topk::top_k_keys`) at tile sizes that split the gallery unevenly.
//!
//! Exact data: entries are multiples of 1/4 in [−1, 1] and dim ≤ 64, so every inner product is
//! exact in f32 whatever the summation order; with few distinct values, ties are everywhere, and
//! ids and scores must equal the brute force's bit for bit (ties to the lower id).

mod common;

use common::Gen;
use semshare::backend::Backend;
use semshare::backend::cpu::topk::{rank_key, split_keys, top_k_keys, top_k_keys_split};

/// Entries in {−1, −3/4, …, 1}: exact products and sums.
fn quantised(seed: u64, n: usize) -> Vec<f32> {
    let mut g = Gen::new(seed);
    (0..n).map(|_| (g.below(9) as f32 - 4.0) / 4.0).collect()
}

/// Every score in f64, sorted by (score descending, id ascending); the first k.
fn brute(q: &[f32], g: &[f32], dim: usize, k: usize) -> (Vec<u32>, Vec<f64>) {
    let (mut ids, mut scores) = (vec![], vec![]);
    for qr in q.chunks(dim) {
        let mut all: Vec<(f64, u32)> = g
            .chunks(dim)
            .enumerate()
            .map(|(j, gr)| (qr.iter().zip(gr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum(), j as u32))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        ids.extend(all[..k].iter().map(|p| p.1));
        scores.extend(all[..k].iter().map(|p| p.0));
    }
    (ids, scores)
}

/// (queries, gallery, dim, k): one query, k = 1, k = gallery, a gallery of one row, more
/// queries than one block of the search (256, with a short last block).
const CASES: [(usize, usize, usize, usize); 8] = [
    (1, 1, 1, 1),
    (1, 50, 7, 1),
    (3, 50, 7, 50),
    (5, 97, 16, 10),
    (33, 130, 64, 17),
    (70, 300, 33, 128),
    (2, 9, 3, 9),
    (600, 40, 8, 5),
];

#[test]
fn exact_data_matches_brute_force_with_ties() {
    let mut cpu = common::cpu();
    for (s, &(nq, ng, dim, k)) in CASES.iter().enumerate() {
        let q = quantised(s as u64, nq * dim);
        let mut g = quantised(100 + s as u64, ng * dim);
        // Duplicate rows: the same score at different ids.
        if ng > 3 {
            let (a, b) = g.split_at_mut(dim * (ng / 2));
            b[..dim].copy_from_slice(&a[..dim]);
        }
        let (want_ids, want_scores) = brute(&q, &g, dim, k);
        let (qt, gt) = (cpu.upload(&q, &[nq, dim]).unwrap(), cpu.upload(&g, &[ng, dim]).unwrap());
        let (ids, scores) = cpu.top_k(qt.view(), gt.view(), dim, k).unwrap();
        assert_eq!(ids, want_ids, "case {s}: ids");
        assert_eq!(scores.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), want_scores, "case {s}: scores");
        // Every tile size, including ones that leave a short last tile, gives the same keys.
        let whole = top_k_keys(&q, &g, dim, k, ng);
        for tile in [1, 2, 7, ng / 2 + 1, ng + 5] {
            assert_eq!(top_k_keys(&q, &g, dim, k, tile), whole, "case {s}: tile {tile}");
        }
        assert_eq!(split_keys(&whole), (ids, scores));
    }
}

#[test]
fn gallery_split_across_threads_gives_the_same_keys() {
    // A few queries against a large gallery: the search splits the gallery into ranges.
    let (nq, ng, dim) = (3, 9000, 8);
    let q = quantised(7, nq * dim);
    let mut g = quantised(8, ng * dim);
    let (a, b) = g.split_at_mut(dim * 4500); // a tie across the ranges' cut
    b[..dim].copy_from_slice(&a[dim * 4499..dim * 4500]);
    for k in [1, 10, 128] {
        let (want, _) = brute(&q, &g, dim, k);
        for parts in [1, 2, 3, 7] {
            let keys = top_k_keys_split(&q, &g, dim, k, 1000, parts);
            assert_eq!(split_keys(&keys).0, want, "k {k} parts {parts}");
        }
        assert_eq!(split_keys(&top_k_keys(&q, &g, dim, k, 1000)).0, want, "k {k}");
    }
}

#[test]
fn random_data_scores_match_brute_force() {
    let mut cpu = common::cpu();
    for (s, &(nq, ng, dim, k)) in CASES.iter().enumerate() {
        let q = common::randv(s as u64, nq * dim);
        let g = common::randv(50 + s as u64, ng * dim);
        let (_, want) = brute(&q, &g, dim, k);
        let (qt, gt) = (cpu.upload(&q, &[nq, dim]).unwrap(), cpu.upload(&g, &[ng, dim]).unwrap());
        let (ids, scores) = cpu.top_k(qt.view(), gt.view(), dim, k).unwrap();
        for (r, (&got, &w)) in scores.iter().zip(&want).enumerate() {
            assert!((f64::from(got) - w).abs() <= 1e-5 * (1.0 + w.abs()), "case {s} rank {r}: {got} vs {w}");
            // The id is the one whose own score is this one.
            let (qi, j) = (r / k, ids[r] as usize);
            let own: f32 = q[qi * dim..(qi + 1) * dim].iter().zip(&g[j * dim..(j + 1) * dim]).map(|(a, b)| a * b).sum();
            assert!((own - got).abs() <= 1e-5 * (1.0 + got.abs()), "case {s} rank {r}: id {j}");
        }
    }
}

#[test]
fn rank_key_orders_scores_then_ids() {
    let mut keys = [rank_key(0.5, 3), rank_key(-0.0, 1), rank_key(0.0, 0), rank_key(0.5, 2), rank_key(-1.0, 0)];
    keys.sort_unstable();
    let (ids, scores) = split_keys(&keys);
    assert_eq!(ids, [2, 3, 0, 1, 0]);
    assert_eq!(scores, [0.5, 0.5, 0.0, 0.0, -1.0]);
    assert!(scores[3].is_sign_positive(), "-0.0 ties +0.0 and comes back as +0.0");
}

#[test]
fn bad_operands_are_errors() {
    let mut cpu = common::cpu();
    let q = cpu.upload(&[1.0; 6], &[2, 3]).unwrap();
    let g = cpu.upload(&[1.0; 12], &[4, 3]).unwrap();
    let e = cpu.upload(&[], &[0, 3]).unwrap();
    let err = |r: semshare::Result<(Vec<u32>, Vec<f32>)>| r.unwrap_err().to_string();
    assert!(err(cpu.top_k(q.view(), g.view(), 3, 0)).contains("k = 0"));
    assert!(err(cpu.top_k(q.view(), g.view(), 3, 5)).contains("k = 5 for a gallery of 4 rows"));
    assert!(err(cpu.top_k(q.view(), g.view(), 4, 1)).contains("not a multiple of dimension 4"));
    assert!(err(cpu.top_k(q.view(), g.view(), 0, 1)).contains("dimension 0"));
    assert!(err(cpu.top_k(e.view(), g.view(), 3, 1)).contains("queries are empty"));
    assert!(err(cpu.top_k(q.view(), e.view(), 3, 1)).contains("gallery are empty"));
    assert_eq!(cpu.top_k(q.view(), g.view(), 3, 4).unwrap().0, [0, 1, 2, 3, 0, 1, 2, 3]);
}

#[test]
fn infinite_scores_and_ties_at_the_kth_are_kept_by_the_float_filter() {
    // dim 1 and queries of 1.0: the scores are the gallery's values, exactly. The filter skips
    // scores below the k-th's without making their keys; an equal score must still be ranked
    // by id, and ±∞ must order like any other score.
    let mut g = Gen::new(5);
    let specials = [f32::INFINITY, f32::NEG_INFINITY, 0.0, 0.5, -0.5];
    let gallery: Vec<f32> = (0..3000).map(|_| specials[g.below(specials.len())]).collect();
    for nq in [1, 6] {
        let q = vec![1.0f32; nq];
        for k in [1, 7, 100, 2999] {
            let mut all: Vec<u64> = gallery.iter().enumerate().map(|(j, &s)| rank_key(s, j as u32)).collect();
            all.sort_unstable();
            let want: Vec<u64> = (0..nq).flat_map(|_| all[..k].iter().copied()).collect();
            for tile in [1, 64, 1024] {
                assert_eq!(top_k_keys(&q, &gallery, 1, k, tile), want, "queries {nq} k {k} tile {tile}");
            }
        }
    }
}

// ---- the bf16 search (`--precision bf16`): a bf16 pass, then the f32 scores --------------

use semshare::backend::Precision;
use semshare::backend::cpu::topk::{FilterCounts, bf16_error_bound, top_k_keys_filtered};

/// Each query searched alone: with one query the search scores every row by its f32 dot
/// product, the score the bf16 search ranks its candidates by, so the keys must be equal.
fn one_by_one(q: &[f32], g: &[f32], dim: usize, k: usize) -> Vec<u64> {
    q.chunks(dim).flat_map(|qr| top_k_keys(qr, g, dim, k, 1000)).collect()
}

/// Rows of `base` plus a perturbation of relative size `eps`: scores that differ by less than
/// bf16 resolves, so the bf16 pass alone would rank them by its rounding.
fn near(base: &[f32], seed: u64, rows: usize, eps: f64) -> Vec<f32> {
    let noise = common::randv(seed, rows * base.len());
    noise
        .chunks(base.len())
        .flat_map(|n| base.iter().zip(n).map(move |(&b, &x)| b + (eps * f64::from(x)) as f32))
        .collect()
}

#[test]
fn bf16_search_of_random_rows_proves_its_candidates() {
    let (nq, ng, dim, k) = (300, 3000, 64, 10);
    let (q, g) = (common::randv(1, nq * dim), common::randv(2, ng * dim));
    let (keys, counts) = top_k_keys_filtered(&q, &g, dim, k, 1000);
    assert_eq!(keys, one_by_one(&q, &g, dim, k));
    assert_eq!(
        counts,
        FilterCounts { proven: nq, second_pass: 0, f32_only: 0 },
        "spread-out scores need no second pass"
    );
}

#[test]
fn bf16_search_among_near_ties_takes_the_second_pass_and_stays_exact() {
    // 1,500 rows within 1e-3 of one vector, 1,500 random; queries near it and random.
    let (dim, k) = (64, 10);
    let b = common::randv(3, dim);
    let mut g = near(&b, 4, 1500, 1e-3);
    g.extend(common::randv(5, 1500 * dim));
    let mut q = near(&b, 6, 200, 1e-2);
    q.extend(common::randv(7, 100 * dim));
    for k in [1, k, 300] {
        let (keys, counts) = top_k_keys_filtered(&q, &g, dim, k, 1000);
        assert_eq!(keys, one_by_one(&q, &g, dim, k), "k {k}");
        assert!(counts.second_pass >= 200 && counts.proven >= 1, "k {k}: {counts:?}");
    }
    // Gallery ranges in parallel (a few queries): the same keys.
    let (keys, _) = top_k_keys_filtered(&q[..5 * dim], &g, dim, k, 700);
    assert_eq!(keys, one_by_one(&q[..5 * dim], &g, dim, k));
}

#[test]
fn bf16_search_leaves_rows_and_queries_the_bound_cannot_cover_to_f32() {
    let (nq, ng, dim, k) = (6, 3000, 16, 5);
    let q = common::randv(8, nq * dim);
    let mut g = common::randv(9, ng * dim);
    // A query too large for the bound: searched in f32 alone, the others as usual.
    let mut big = q.clone();
    big[..dim].iter_mut().for_each(|x| *x *= 1e35);
    let (keys, counts) = top_k_keys_filtered(&big, &g, dim, k, 1000);
    assert_eq!(keys, one_by_one(&big, &g, dim, k));
    assert_eq!((counts.f32_only, counts.proven + counts.second_pass), (1, nq - 1));
    // A NaN or an infinity in the gallery: every query in f32, as the f32 search orders them.
    for bad in [f32::NAN, f32::INFINITY] {
        g[dim * 1234 + 3] = bad;
        let (keys, counts) = top_k_keys_filtered(&q, &g, dim, k, 1000);
        assert_eq!(keys, one_by_one(&q, &g, dim, k), "{bad}");
        assert_eq!(counts.f32_only, nq, "{bad}");
    }
}

#[test]
fn bf16_error_bound_holds_and_is_tight_where_every_rounding_errs_one_way() {
    use semshare::backend::Gemm;
    use semshare::backend::cpu::{dispatch, gemm::gemm};
    let kernels = dispatch::active().unwrap();
    let dim = 256;
    // Just below 1 + 2^-8, the midpoint between bf16's 1 and 1 + 2^-7: rounded down to 1 in
    // both operands, so every product loses the same ~2u of its value.
    let worst = vec![1.0 + 2f32.powi(-8) - 2f32.powi(-20); dim];
    let mut cases = vec![(worst.clone(), worst, true)];
    for s in 0..20 {
        let scale = [1e-30, 1e-3, 1.0, 1e6][s % 4];
        cases.push((common::randv_scaled(100 + s as u64, dim, scale), common::randv(200 + s as u64, dim), false));
    }
    for (i, (q, g, tight)) in cases.iter().enumerate() {
        let mut s = [0.0f32];
        gemm(
            kernels,
            Precision::Bf16,
            Gemm { m: 1, n: 1, k: dim, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 },
            q,
            g,
            &mut s,
        );
        let exact: f64 = q.iter().zip(g).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let bound = f64::from(bf16_error_bound(norm(q), norm(g), dim));
        let err = (f64::from(s[0]) - exact).abs();
        assert!(err <= bound, "case {i}: |bf16 − exact| = {err:e} > bound {bound:e}");
        if *tight {
            assert!(err >= 0.98 * bound, "case {i}: the bound {bound:e} is loose against {err:e}");
        }
    }
}

#[test]
fn bf16_backend_search_gives_the_f32_top_k() {
    // Through `Backend::top_k` at bf16: enough queries for the bf16 pass where the CPU has a
    // bf16 unit, the f32 search elsewhere; the keys are those of the f32 scores either way.
    let (nq, ng, dim, k) = (300, 2000, 64, 10);
    let b = common::randv(10, dim);
    let mut g = near(&b, 11, 1000, 1e-3);
    g.extend(common::randv(12, 1000 * dim));
    let q = near(&b, 13, nq, 1e-2);
    let mut cpu = semshare::backend::cpu::Cpu::with_precision(Precision::Bf16).unwrap();
    let (qt, gt) = (cpu.upload(&q, &[nq, dim]).unwrap(), cpu.upload(&g, &[ng, dim]).unwrap());
    let got = cpu.top_k(qt.view(), gt.view(), dim, k).unwrap();
    let want = if semshare::backend::cpu::dispatch::current().bf16_native() {
        one_by_one(&q, &g, dim, k)
    } else {
        println!("not run: the bf16 pass (no bf16 unit on this CPU path); the f32 search checked");
        top_k_keys(&q, &g, dim, k, semshare::backend::cpu::topk::TILE)
    };
    assert_eq!(got, split_keys(&want));
}
