//! Exact top-k search on the device (`Backend::top_k`): per gallery tile, one cuBLAS GEMM of all
//! queries against the tile into scratch, then `topk_merge_fwd_f32` (kernels/topk.cu) folds the
//! tile's scores into each query's running top-k keys on the device. The keys (the CPU twin's
//! `rank_key`) come back in one download at the end. Scores are IEEE f32 products at every
//! precision (top-k is not a layer) and match the CPU's to GEMM rounding.

use super::{Arg, Cuda, dev_err, tensor_ptr, view_ptr};
use crate::backend::cpu::topk::split_keys;
use crate::backend::{Backend, Precision};
use crate::tensor::{DType, Tensor, View};
use crate::{Error, Result};
use cudarc::driver::result;

/// Largest k the kernel keeps in shared memory (TOPK_MAX in kernels/topk.cu).
pub const MAX_K: usize = 128;
const THREADS: u32 = 256;
/// Score scratch per tile: 16 M floats (64 MiB).
const TILE_FLOATS: usize = 1 << 24;

/// Gallery rows per tile for `nq` queries: as many as the scratch allows.
pub fn default_tile(nq: usize, ng: usize) -> usize {
    (TILE_FLOATS / nq.max(1)).clamp(1, ng.max(1))
}

impl Cuda {
    /// `Backend::top_k` over gallery tiles of `tile` rows (the tests choose small tiles to
    /// cross tile edges): `top_k_keys` and one download.
    pub fn top_k_tiled(
        &mut self,
        queries: View,
        gallery: View,
        dim: usize,
        k: usize,
        tile: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let run = self.top_k_keys(queries, gallery, dim, k, tile)?;
        let words = self.download(run.view())?;
        let keys: Vec<u64> =
            words.chunks_exact(2).map(|w| u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32)).collect();
        Ok(split_keys(&keys))
    }

    /// The device part of `top_k_tiled`: each query's k best `rank_key`s, ascending, as
    /// `[nq · k · 2]` f32 words (a u64 key is two words, low first), left on the device (the
    /// GPU benchmark times this).
    pub fn top_k_keys(&mut self, queries: View, gallery: View, dim: usize, k: usize, tile: usize) -> Result<Tensor> {
        let (nq, ng) = crate::backend::check_top_k(queries.len(), gallery.len(), dim, k)?;
        if k > MAX_K {
            return Err(Error::shape("top_k", format!("k = {k} is over the CUDA kernel's {MAX_K}")));
        }
        if nq > i32::MAX as usize {
            return Err(Error::shape("top_k", format!("{nq} queries are over the grid's {}", i32::MAX)));
        }
        let tile = tile.clamp(1, ng);
        let (pq, pg) = (view_ptr(queries)?, view_ptr(gallery)?);
        let scores = self.scratch(nq * tile)?;
        // Keys are u64: two f32 slots each (pool blocks are 256-byte aligned).
        let run = self.alloc_tensor(&[2 * nq * k])?;
        let (ps, pr) = (tensor_ptr(&scores)?, tensor_ptr(&run)?);
        self.bind()?;
        // SAFETY: pr..pr + 8·nq·k is the live `run` block; all-ones is the worst key.
        unsafe { result::memset_d8_async(pr, 0xff, nq * k * 8, self.stream.cu_stream()) }
            .map_err(dev_err("memset top-k keys"))?;
        for t0 in (0..ng).step_by(tile) {
            let n = tile.min(ng - t0);
            let pt = pg + 4 * (t0 * dim) as u64;
            self.gemm_strided_batched(
                Precision::F32,
                (DType::F32, DType::F32),
                (nq, n, dim),
                (false, true),
                1.0,
                (pq, dim, 0),
                (pt, dim, 0),
                0.0,
                (ps, n, 0),
                1,
            )?;
            let args = [
                Arg::Ptr(ps),
                Arg::int("topk_merge", n)?,
                Arg::U32(t0 as u32),
                Arg::int("topk_merge", k)?,
                Arg::Ptr(pr),
            ];
            self.launch("topk_merge_fwd_f32", (nq as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
        }
        Ok(run)
    }
}
