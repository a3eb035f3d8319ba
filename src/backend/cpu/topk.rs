//! Exact top-k search by inner product: for each query row, the k gallery rows with the largest
//! score, best first, ties to the lower gallery id. The gallery is walked in tiles (one GEMM of a
//! block of queries against a tile into a small scratch), so the full `[queries, gallery]` score
//! matrix never exists; each query keeps a running candidate list that a bound filters and
//! `select_nth_unstable` trims. Parallel over blocks of queries on the rayon pool, and over
//! gallery ranges too when there are fewer blocks than threads.
//! The CUDA twin (`kernels/topk.cu`) orders by the same `rank_key`.

use rayon::prelude::*;

use super::dispatch;
use super::gemm::gemm;
use crate::backend::{Gemm, Precision};

/// Gallery rows per tile: a query block's scores against one tile are 1 MiB.
pub const TILE: usize = 1024;
/// Queries per GEMM (and per rayon task). Each GEMM repacks its gallery tile, so short blocks
/// spend their time packing: 1,000 × 100,000 × 256 top-10 on 2 (shared) cores ran 0.57 s at
/// 256 rows, 1.2 s at 64, 2.7 s at 32 (tile 512 to 2,048 made no difference at 256).
const QUERY_BLOCK: usize = 256;

/// Query blocks shorter than this score by dot products, not a GEMM, which would repack each
/// tile for a row or two (1 query against 100,000 × 256: 42 → 4 ms on 2 cores; 3 queries take
/// 10 ms, about where a GEMM catches up). The two round differently in the last bits, so a
/// query's scores depend that little on whether its block is short.
const FEW: usize = 4;

/// Eight independent sums, so the loop vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A u64 whose ascending order is descending score, then ascending id (−0.0 ties +0.0). The one
/// order of every top-k and ranking, on both devices. A NaN sorts by its bits: a positive one
/// before +∞, a negative one after −∞.
pub fn rank_key(score: f32, id: u32) -> u64 {
    let bits = (score + 0.0).to_bits(); // + 0.0 turns -0.0 into +0.0
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 };
    (u64::from(!ascending) << 32) | u64::from(id)
}

/// The gallery id a key carries.
pub fn key_id(key: u64) -> u32 {
    key as u32
}

/// The score a key carries (−0.0 comes back as +0.0).
pub fn key_score(key: u64) -> f32 {
    let ascending = !((key >> 32) as u32);
    f32::from_bits(if ascending >> 31 == 1 { ascending & 0x7fff_ffff } else { !ascending })
}

/// Top-k of `queries [nq, dim]` against `gallery [ng, dim]` over gallery tiles of `tile` rows:
/// `nq · k` keys, query after query, each query's best first. Shapes are the caller's to check
/// (`backend::check_top_k`): dim > 0, 1 ≤ k ≤ ng, ng < 2³².
pub fn top_k_keys(queries: &[f32], gallery: &[f32], dim: usize, k: usize, tile: usize) -> Vec<u64> {
    let (nq, ng) = (queries.len() / dim, gallery.len() / dim);
    // Fewer query blocks than threads (a handful of queries): split the gallery as well, in
    // parts of at least 4,096 rows, so that every thread has work.
    let free = rayon::current_num_threads() / nq.div_ceil(QUERY_BLOCK);
    top_k_keys_split(queries, gallery, dim, k, tile, free.min(ng / k.max(4096)))
}

/// `top_k_keys` over `parts` gallery ranges searched in parallel (at most ng / k, so each range
/// holds a full top-k), their per-query candidates merged: the same keys for any `parts`.
pub fn top_k_keys_split(queries: &[f32], gallery: &[f32], dim: usize, k: usize, tile: usize, parts: usize) -> Vec<u64> {
    let (nq, ng) = (queries.len() / dim, gallery.len() / dim);
    let parts = parts.clamp(1, (ng / k).max(1));
    if parts == 1 {
        return search(queries, gallery, dim, k, tile, 0);
    }
    let cut: Vec<usize> = (0..=parts).map(|p| p * ng / parts).collect();
    let partial: Vec<Vec<u64>> = (0..parts)
        .into_par_iter()
        .map(|p| search(queries, &gallery[cut[p] * dim..cut[p + 1] * dim], dim, k, tile, cut[p]))
        .collect();
    let mut out = Vec::with_capacity(nq * k);
    let mut cand = Vec::with_capacity(parts * k);
    for i in 0..nq {
        cand.clear();
        cand.extend(partial.iter().flat_map(|v| v[i * k..(i + 1) * k].iter().copied()));
        cand.sort_unstable();
        out.extend_from_slice(&cand[..k]);
    }
    out
}

/// The search of one gallery range whose first row has id `base`.
fn search(queries: &[f32], gallery: &[f32], dim: usize, k: usize, tile: usize, base: usize) -> Vec<u64> {
    let (nq, ng) = (queries.len() / dim, gallery.len() / dim);
    let tile = tile.clamp(1, ng.max(1));
    let mut out = vec![0u64; nq * k];
    out.par_chunks_mut(QUERY_BLOCK * k).enumerate().for_each(|(b, out)| {
        let m = out.len() / k;
        let qb = &queries[b * QUERY_BLOCK * dim..(b * QUERY_BLOCK + m) * dim];
        let mut scores = vec![0.0f32; m * tile];
        let mut run: Vec<Vec<u64>> = (0..m).map(|_| Vec::with_capacity(2 * k + 64)).collect();
        for t0 in (0..ng).step_by(tile) {
            let n = tile.min(ng - t0);
            let gt = &gallery[t0 * dim..(t0 + n) * dim];
            if m < FEW {
                for (q, sc) in qb.chunks_exact(dim).zip(scores.chunks_mut(n)) {
                    sc.iter_mut().zip(gt.chunks_exact(dim)).for_each(|(s, g)| *s = dot(q, g));
                }
            } else {
                let g = Gemm { m, n, k: dim, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
                gemm(dispatch::current(), Precision::F32, g, qb, gt, &mut scores[..m * n]);
            }
            for (i, r) in run.iter_mut().enumerate() {
                merge(r, &scores[i * n..(i + 1) * n], base + t0, k);
            }
        }
        for (r, o) in run.iter_mut().zip(out.chunks_mut(k)) {
            trim(r, k);
            r.sort_unstable();
            o.copy_from_slice(r);
        }
    });
    out
}

/// Keeps the k smallest keys of `run` (in no order).
fn trim(run: &mut Vec<u64>, k: usize) {
    if run.len() > k {
        run.select_nth_unstable(k - 1);
        run.truncate(k);
    }
}

/// Adds one tile's scores (gallery ids from `base`) to a query's candidates: only keys that
/// beat the current k-th can still make the top k; the list is trimmed back to k as it grows.
/// A plain float test skips the scores below the k-th's before any key is made: nearly all of
/// them once the list is full (10,000 × 100,000 × 256: the merge is then a compare per score).
fn merge(run: &mut Vec<u64>, scores: &[f32], base: usize, k: usize) {
    let mut bound = u64::MAX;
    // Below `floor` (the bound's score) a score cannot beat the bound; a NaN floor (a NaN in
    // the list) compares false and skips nothing, leaving it to the keys.
    let mut floor = f32::NEG_INFINITY;
    if run.len() >= k {
        trim(run, k);
        bound = *run.iter().max().unwrap();
        floor = key_score(bound);
    }
    for (c, chunk) in scores.chunks(16).enumerate() {
        // Most chunks hold no candidate once the list is full: one vectorised test for all 16
        // (no short circuit, so it compiles to compares and an or; a NaN counts as a candidate).
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // a NaN must count as a candidate
        if !chunk.iter().fold(false, |any, &s| any | !(s < floor)) {
            continue;
        }
        for (j, &s) in chunk.iter().enumerate() {
            if s < floor {
                continue;
            }
            let j = c * 16 + j;
            let key = rank_key(s, (base + j) as u32);
            if key < bound {
                run.push(key);
                if run.len() >= 2 * k + 64 {
                    trim(run, k);
                    bound = *run.iter().max().unwrap();
                    floor = key_score(bound);
                }
            }
        }
    }
}

/// Splits keys into (ids, scores).
pub fn split_keys(keys: &[u64]) -> (Vec<u32>, Vec<f32>) {
    (keys.iter().map(|&k| key_id(k)).collect(), keys.iter().map(|&k| key_score(k)).collect())
}
