//! Exact top-k search by inner product: for each query row, the k gallery rows with the largest
//! score, best first, ties to the lower gallery id. The gallery is walked in tiles (one GEMM of a
//! block of queries against a tile into a small scratch), so the full `[queries, gallery]` score
//! matrix never exists; each query keeps a running candidate list that a bound filters and
//! `select_nth_unstable` trims. Parallel over blocks of queries on the rayon pool, and over
//! gallery ranges too when there are fewer blocks than threads.
//! At bf16 (`top_k_keys_bf16`) a pass on operands rounded to bf16 picks candidates that f32
//! scores then rank, with a bound that proves the top k exact (1.8× faster at dim 256 on
//! AVX-512 BF16). The CUDA twin (`kernels/topk.cu`) orders by the same `rank_key`, in f32.

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
    search_at(Precision::F32, queries, gallery, dim, k, tile, base)
}

/// [`search`] with the blocks' GEMMs at `precision`.
fn search_at(
    precision: Precision,
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
    tile: usize,
    base: usize,
) -> Vec<u64> {
    let nq = queries.len() / dim;
    let mut out = vec![0u64; nq * k];
    out.par_chunks_mut(QUERY_BLOCK * k).enumerate().for_each(|(b, out)| {
        let qb = &queries[b * QUERY_BLOCK * dim..][..out.len() / k * dim];
        let mut run: Vec<Vec<u64>> = (0..out.len() / k).map(|_| Vec::with_capacity(2 * k + 64)).collect();
        each_tile(precision, qb, gallery, dim, tile, |t0, n, scores| {
            for (i, r) in run.iter_mut().enumerate() {
                merge(r, &scores[i * n..(i + 1) * n], base + t0, k);
            }
        });
        for (r, o) in run.iter_mut().zip(out.chunks_mut(k)) {
            trim(r, k);
            r.sort_unstable();
            o.copy_from_slice(r);
        }
    });
    out
}

/// Scores a block of queries against each gallery tile in turn, handing `visit` the tile's
/// first row, its row count n and the scores `[m, n]`: a GEMM at `precision`, or for fewer
/// than [`FEW`] queries the f32 dot products (no repacking of each tile for a row or two).
fn each_tile(
    precision: Precision,
    qb: &[f32],
    gallery: &[f32],
    dim: usize,
    tile: usize,
    mut visit: impl FnMut(usize, usize, &[f32]),
) {
    let (m, ng) = (qb.len() / dim, gallery.len() / dim);
    let tile = tile.clamp(1, ng.max(1));
    let mut scores = vec![0.0f32; m * tile];
    for t0 in (0..ng).step_by(tile) {
        let n = tile.min(ng - t0);
        let gt = &gallery[t0 * dim..(t0 + n) * dim];
        if m < FEW {
            for (q, sc) in qb.chunks_exact(dim).zip(scores.chunks_mut(n)) {
                sc.iter_mut().zip(gt.chunks_exact(dim)).for_each(|(s, g)| *s = dot(q, g));
            }
        } else {
            let g = Gemm { m, n, k: dim, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
            gemm(dispatch::current(), precision, g, qb, gt, &mut scores[..m * n]);
        }
        visit(t0, n, &scores[..m * n]);
    }
}

// ---- bf16 search, exact results --------------------------------------------------------

/// Candidates a query keeps from the bf16 pass beyond its k. Each is rescored in f32 from a
/// row read at random (a gallery larger than the caches), and a longer list is trimmed more
/// often; a shorter one sends more queries to the second pass. 2,560 queries × 100,000 × 256
/// (uniform entries), top-10, on 2 cores: 0.43–0.44 s at 32 (no second pass) and at 16 (2 %
/// of the queries took it), 0.53–0.57 s at 64, 0.73–0.83 s at 256, 0.8 s at 8 (43 %);
/// the f32 search 0.68–0.71 s.
const SLACK: usize = 32;

/// What [`top_k_keys_filtered`] did: queries whose bf16 candidates were proven to hold the
/// top k, queries that needed the second pass, and queries searched in f32 alone (a vector
/// too large, or not finite, for the bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterCounts {
    pub proven: usize,
    pub second_pass: usize,
    pub f32_only: usize,
}

/// Rows shorter than this leave a GEMM too little to save: the selection and the packing take
/// most of the time. 2,560 queries × 100,000 rows, top-10, bf16 pass against f32 search on 2
/// cores: dim 32 1.07× slower, 64 1.15× faster, 128 1.3×, 256 1.8×; the label embedding of
/// 3,000 trained-model queries × 20,000 (dim 24) 1.3× slower.
const MIN_BF16_DIM: usize = 64;

/// [`top_k_keys`] for `--precision bf16`: the same top k by f32 score, found faster where the
/// CPU has a bf16 unit (AVX-512 BF16, AMX), the queries fill a GEMM block and the rows are
/// `MIN_BF16_DIM` long; elsewhere it is [`top_k_keys`] itself (a bf16 pass without a bf16
/// unit is no faster).
pub fn top_k_keys_bf16(queries: &[f32], gallery: &[f32], dim: usize, k: usize, tile: usize) -> Vec<u64> {
    if dispatch::current().bf16_native() && queries.len() / dim >= QUERY_BLOCK && dim >= MIN_BF16_DIM {
        top_k_keys_filtered(queries, gallery, dim, k, tile).0
    } else {
        top_k_keys(queries, gallery, dim, k, tile)
    }
}

/// The top k by f32 score, each query's gallery scored first on operands rounded to bf16:
///
/// 1. A bf16 pass keeps each query's k + `SLACK` best rows by bf16 score (gallery ranges in
///    parallel when the queries are few, each range's list kept whole).
/// 2. Those candidates are scored again in f32 (`dot`); s_k is the k-th best of them, a lower
///    bound of the true k-th score. A row left out scored at most `a` in bf16 (the worst kept
///    score of its range), so at most `a + E` in f32, where `E` ([`bf16_error_bound`]) bounds
///    |bf16 score − f32 score|. If `a + E < s_k`, no left-out row can enter the top k, which
///    is then the candidates' top k.
/// 3. Otherwise a second bf16 pass rescores in f32 every row whose bf16 score reaches
///    `s_k − E`: a superset of the true top k, since each of those rows scores at least s_k.
///
/// The keys equal those of a search that scores every row by `dot`.
pub fn top_k_keys_filtered(
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
    tile: usize,
) -> (Vec<u64>, FilterCounts) {
    let (nq, ng) = (queries.len() / dim, gallery.len() / dim);
    let wide = k + SLACK;
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    // The largest row norm; a NaN anywhere makes it NaN (f64::max would drop it).
    let max = |m: f64, x: f64| if x > m || x.is_nan() { x } else { m };
    let gmax = gallery.par_chunks(dim * 1024).map(|c| c.chunks_exact(dim).map(norm).fold(0.0, max)).reduce(|| 0.0, max);
    let exact_only = || {
        let keys: Vec<u64> = (0..nq)
            .into_par_iter()
            .flat_map_iter(|i| search(&queries[i * dim..(i + 1) * dim], gallery, dim, k, tile, 0))
            .collect();
        (keys, FilterCounts { f32_only: nq, ..FilterCounts::default() })
    };
    // Below 2^120 nothing rounds to a bf16 infinity and no product overflows.
    let bounded = gmax < BOUND_LIMIT; // false for a NaN
    if ng < 2 * wide || !bounded || dim >= 1 << 20 {
        return exact_only();
    }

    // 1. The bf16 pass, over `parts` gallery ranges of at least `wide` rows each.
    let free = rayon::current_num_threads() / nq.div_ceil(QUERY_BLOCK);
    let parts = free.min(ng / wide.max(4096)).max(1);
    let cut: Vec<usize> = (0..=parts).map(|p| p * ng / parts).collect();
    let kept: Vec<Vec<u64>> = (0..parts)
        .into_par_iter()
        .map(|p| search_at(Precision::Bf16, queries, &gallery[cut[p] * dim..cut[p + 1] * dim], dim, wide, tile, cut[p]))
        .collect();

    // 2. Each query's candidates in f32, and the proof; a query it fails goes on to step 3.
    enum Next {
        Proven,
        Threshold(f32),
        F32Only,
    }
    let mut out = vec![0u64; nq * k];
    let next: Vec<Next> = out
        .par_chunks_mut(k)
        .enumerate()
        .map(|(i, o)| {
            let q = &queries[i * dim..(i + 1) * dim];
            let qn = norm(q);
            if !(qn < BOUND_LIMIT && qn * gmax < PRODUCT_LIMIT) {
                o.copy_from_slice(&search(q, gallery, dim, k, tile, 0));
                return Next::F32Only;
            }
            let mut exact: Vec<u64> = kept
                .iter()
                .flat_map(|part| &part[i * wide..(i + 1) * wide])
                .map(|&key| {
                    let j = key_id(key) as usize;
                    rank_key(dot(q, &gallery[j * dim..(j + 1) * dim]), j as u32)
                })
                .collect();
            exact.sort_unstable();
            o.copy_from_slice(&exact[..k]);
            let s_k = key_score(exact[k - 1]);
            let left_out =
                kept.iter().map(|part| key_score(part[(i + 1) * wide - 1])).fold(f32::NEG_INFINITY, f32::max);
            let e = bf16_error_bound(qn, gmax, dim);
            if left_out + e < s_k { Next::Proven } else { Next::Threshold(s_k - e) }
        })
        .collect();

    // 3. The second pass, for the queries step 2 could not prove.
    let open: Vec<(usize, f32)> = next
        .iter()
        .enumerate()
        .filter_map(|(i, n)| if let Next::Threshold(t) = n { Some((i, *t)) } else { None })
        .collect();
    let mut counts = FilterCounts { second_pass: open.len(), ..FilterCounts::default() };
    for n in &next {
        match n {
            Next::Proven => counts.proven += 1,
            Next::F32Only => counts.f32_only += 1,
            Next::Threshold(_) => {}
        }
    }
    // Blocks of queries × gallery ranges, so that a few open queries still use every thread.
    let blocks = open.len().div_ceil(QUERY_BLOCK).max(1);
    let ranges = (rayon::current_num_threads() / blocks).min(ng / 4096).max(1);
    let found: Vec<Vec<Vec<u64>>> = (0..blocks * ranges)
        .into_par_iter()
        .map(|task| {
            let block = &open[(task / ranges) * QUERY_BLOCK..open.len().min((task / ranges + 1) * QUERY_BLOCK)];
            let (lo, hi) = ((task % ranges) * ng / ranges, (task % ranges + 1) * ng / ranges);
            let qb: Vec<f32> = block.iter().flat_map(|&(i, _)| &queries[i * dim..(i + 1) * dim]).copied().collect();
            let mut run: Vec<Vec<u64>> = block.iter().map(|_| Vec::with_capacity(2 * k + 64)).collect();
            each_tile(Precision::Bf16, &qb, &gallery[lo * dim..hi * dim], dim, tile, |t0, n, scores| {
                for (b, (&(_, threshold), r)) in block.iter().zip(run.iter_mut()).enumerate() {
                    let q = &qb[b * dim..(b + 1) * dim];
                    for (j, _) in scores[b * n..(b + 1) * n].iter().enumerate().filter(|(_, s)| **s >= threshold) {
                        let id = lo + t0 + j;
                        r.push(rank_key(dot(q, &gallery[id * dim..(id + 1) * dim]), id as u32));
                        if r.len() >= 2 * k + 64 {
                            trim(r, k);
                        }
                    }
                }
            });
            run
        })
        .collect();
    for (b, block) in open.chunks(QUERY_BLOCK).enumerate() {
        for (q, &(i, _)) in block.iter().enumerate() {
            let mut keys: Vec<u64> =
                found[b * ranges..(b + 1) * ranges].iter().flat_map(|r| r[q].iter().copied()).collect();
            trim(&mut keys, k);
            keys.sort_unstable();
            out[i * k..(i + 1) * k].copy_from_slice(&keys);
        }
    }
    (out, counts)
}

/// Norms up to 2^120 round to finite bf16 values, and products of norms up to 2^100 leave
/// every partial sum finite: the bound below holds.
const BOUND_LIMIT: f64 = 1.329_227_995_784_916e36; // 2^120
const PRODUCT_LIMIT: f64 = 1.267_650_600_228_229_4e30; // 2^100

/// An upper bound of |s̃ − s| for one query row q (norm `qn`) and any gallery row g (norm at
/// most `gmax`) of `dim` values: s̃ the GEMM's score on q and g rounded to bf16 (products
/// exact in f32, sums in f32, denormals flushed: AVX-512 BF16, AMX, or f32 FMA on rounded
/// operands), s the f32 `dot`. With u = 2^-8 (bf16's unit roundoff) and γ = dim·2^-24 /
/// (1 − dim·2^-24) (a sum of dim terms in f32, any order), by Cauchy–Schwarz
/// Σ|qᵢgᵢ| ≤ ‖q‖‖g‖:
///   rounding the operands moves the exact sum by ≤ (2u + u²)·‖q‖‖g‖;
///   the bf16 sum errs by ≤ γ(1 + u)²·‖q‖‖g‖, the f32 one by ≤ γ·‖q‖‖g‖;
///   flushed denormals (inputs, products, sums) by ≤ dim·2^-124·(1 + ‖q‖ + ‖g‖) in all.
/// Rounded up by a factor 1 + 2^-10, which also covers the f32 additions that use it.
pub fn bf16_error_bound(qn: f64, gmax: f64, dim: usize) -> f32 {
    let (u, d) = (2f64.powi(-8), dim as f64);
    let gamma = d * 2f64.powi(-24) / (1.0 - d * 2f64.powi(-24));
    let relative = 2.0 * u + u * u + gamma * (1.0 + (1.0 + u) * (1.0 + u));
    let absolute = d * 2f64.powi(-124) * (1.0 + qn + gmax);
    ((relative * qn * gmax + absolute) * (1.0 + 2f64.powi(-10))) as f32
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
