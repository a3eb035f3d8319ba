//! Exact top-k on the GPU (a cuBLAS GEMM per gallery tile + kernels/topk.cu) against its CPU
//! twin (`Cpu::top_k`): one query, k = 1, k = gallery size, k = the kernel's 128, galleries that
//! are not a multiple of the tile, a gallery of one row.
//! - Exact data (entries multiples of 1/4, dim ≤ 64: every inner product exact in f32 in any
//!   summation order) with duplicate gallery rows: ids and scores equal bit for bit, so the tie
//!   order (score descending, then the lower id) is the CPU's.
//! - Random data: same ids, scores within 1e-5 (GEMM summation order differs).
//!
//! Small tiles make several tiles per search, large ones several candidate-buffer merges per tile (the default tile holds 16 M scores). Without a
//! GPU each test prints one skip line; with SEMSHARE_REQUIRE_GPU=1 it fails.

#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]

mod common;

use common::{Gen, cpu, randv};
use semshare::backend::Backend;

/// (queries, gallery, dim, k, tile).
const CASES: [(usize, usize, usize, usize, usize); 9] = [
    (1, 1, 1, 1, 1),
    (1, 50, 7, 1, 16),
    (3, 50, 7, 50, 16),
    (5, 97, 16, 10, 32),
    (9, 130, 64, 17, 64),
    (3, 300, 33, 128, 300),
    (2, 9, 3, 9, 4),
    // Tiles of several 256-key chunks: the candidate buffer fills and is merged mid-tile.
    (2, 1000, 8, 5, 1000),
    (1, 2000, 4, 128, 700),
];

fn quantised(seed: u64, n: usize) -> Vec<f32> {
    let mut g = Gen::new(seed);
    (0..n).map(|_| (g.below(9) as f32 - 4.0) / 4.0).collect()
}

#[cfg(feature = "cuda")]
fn run(exact: bool) {
    let test = if exact { "top_k exact" } else { "top_k random" };
    let Some(mut gpu) = common::gpu::cuda_or_skip(test) else { return };
    let mut c = cpu();
    for (s, &(nq, ng, dim, k, tile)) in CASES.iter().enumerate() {
        let (q, mut g) = if exact {
            (quantised(s as u64, nq * dim), quantised(100 + s as u64, ng * dim))
        } else {
            (randv(s as u64, nq * dim), randv(50 + s as u64, ng * dim))
        };
        if exact && ng > 3 {
            // Duplicate rows across tiles and inside one: equal scores at different ids.
            let (a, b) = g.split_at_mut(dim * (ng / 2));
            b[..dim].copy_from_slice(&a[..dim]);
            b[dim..2 * dim].copy_from_slice(&a[..dim]);
        }
        let (cq, cg) = (c.upload(&q, &[nq, dim]).unwrap(), c.upload(&g, &[ng, dim]).unwrap());
        let (want_ids, want_scores) = c.top_k(cq.view(), cg.view(), dim, k).unwrap();
        let (gq, gg) = (gpu.upload(&q, &[nq, dim]).unwrap(), gpu.upload(&g, &[ng, dim]).unwrap());
        let (ids, scores) = gpu.top_k_tiled(gq.view(), gg.view(), dim, k, tile).unwrap();
        assert_eq!(ids, want_ids, "{test} case {s}: ids");
        for (r, (&got, &w)) in scores.iter().zip(&want_scores).enumerate() {
            let ok = if exact { got.to_bits() == w.to_bits() } else { (got - w).abs() <= 1e-5 * (1.0 + w.abs()) };
            assert!(ok, "{test} case {s} rank {r}: {got} vs {w}");
        }
        if s == 3 {
            // The trait's entry (one tile here) agrees with the tiled one.
            assert_eq!(gpu.top_k(gq.view(), gg.view(), dim, k).unwrap(), (ids, scores), "{test}: default tile");
        }
    }
}

#[test]
fn top_k_exact_data_with_ties_equals_cpu() {
    #[cfg(feature = "cuda")]
    run(true);
    #[cfg(not(feature = "cuda"))]
    common::gpu::gpu_or_skip("top_k exact");
}

#[test]
fn top_k_random_data_matches_cpu() {
    #[cfg(feature = "cuda")]
    run(false);
    #[cfg(not(feature = "cuda"))]
    common::gpu::gpu_or_skip("top_k random");
}

#[test]
fn top_k_bad_operands_are_errors() {
    let Some(mut gpu) = common::gpu::gpu_or_skip("top_k errors") else { return };
    let q = gpu.upload(&[1.0; 6], &[2, 3]).unwrap();
    let g = gpu.upload(&vec![1.0; 3 * 200], &[200, 3]).unwrap();
    let err = |r: semshare::Result<(Vec<u32>, Vec<f32>)>| r.unwrap_err().to_string();
    assert!(err(gpu.top_k(q.view(), g.view(), 3, 0)).contains("k = 0"));
    assert!(err(gpu.top_k(q.view(), g.view(), 3, 201)).contains("k = 201 for a gallery of 200 rows"));
    assert!(err(gpu.top_k(q.view(), g.view(), 4, 1)).contains("not a multiple of dimension 4"));
    assert!(err(gpu.top_k(q.view(), g.view(), 3, 129)).contains("over the CUDA kernel's 128"));
}

/// Rows of four entries ±1/2 at distinct positions (norm exactly 1, as an index stores rows):
/// every inner product is exact in any summation order, and ties are frequent.
fn four_halves(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    let mut g = Gen::new(seed);
    let mut v = vec![0.0f32; n * dim];
    for row in v.chunks_exact_mut(dim) {
        let mut placed = 0;
        while placed < 4 {
            let at = g.below(dim);
            if row[at] == 0.0 {
                row[at] = if g.below(2) == 0 { 0.5 } else { -0.5 };
                placed += 1;
            }
        }
    }
    v
}

#[test]
fn index_search_on_the_gpu_equals_the_cpu() {
    // `semshare query` on a CUDA device: the mapped gallery is uploaded and searched by the
    // same `Backend::top_k`; ids and scores as on the CPU.
    let Some(mut gpu) = common::gpu::gpu_or_skip("index search") else { return };
    let (n, dim, nq) = (2500, 24, 7);
    let vectors = four_halves(21, n, dim);
    let gallery = semshare::index::Gallery {
        origin: semshare::index::Origin::Vectors,
        dim,
        vectors,
        ids: (0..n).map(|i| format!("g{i}")).collect(),
        labels: None,
    };
    let path = std::env::temp_dir().join(format!("semshare-gpu-index-{}.idx", std::process::id()));
    gallery.save(&path).unwrap();
    let index = semshare::index::Index::open(&path).unwrap();
    let queries = semshare::inference::Embeddings { values: four_halves(22, nq, dim), dim };
    for k in [1, 10, 128] {
        let want = semshare::index::search(&mut cpu(), &index, &queries, k).unwrap();
        let got = semshare::index::search(gpu.as_mut(), &index, &queries, k).unwrap();
        let ids = |r: &Vec<Vec<semshare::index::Hit>>| {
            r.iter().map(|q| q.iter().map(|h| h.item).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&got), ids(&want), "k {k}");
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(g.score.to_bits(), w.score.to_bits(), "k {k}");
        }
    }
    std::fs::remove_file(&path).unwrap();
}
