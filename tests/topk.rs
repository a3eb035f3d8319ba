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
