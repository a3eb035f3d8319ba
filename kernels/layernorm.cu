// kernels/layernorm.cu — LayerNorm over the last dimension, forward and backward.
// Layout: x [rows, d] row-major; stats [rows, 2] = (mean, rstd) saved for backward.
// Storage: x, y, dy, dx of type T (f32 or bf16, each value rounded once, as it is stored);
// gamma, beta, stats and the parameter gradients f32 (parameters stay f32).
// Launch: one warp per row, 8 rows per 256-thread block; dgamma/dbeta by a deterministic
// column reduction in one launch (layernorm_params_bwd; its strips' last blocks finish it,
// common.cuh colsum_finish_strip).
// CPU twin: src/backend/cpu/layernorm.rs. Test: tests/gpu_ops.rs.
// Why a warp per row: d ≤ 2048 here, so a row is 64 values per lane at most; the reductions
// are register shuffles with no shared memory or block barrier. The row is read once from
// DRAM; the later passes over it hit L1 (a 4 KB row per warp, 32 KB per block).
// Why two-pass variance (mean first, then Σ(x−mean)²): the CPU twin's formula, and it does not
// cancel catastrophically the way E[x²]−mean² does for rows with a large mean.
// Why dgamma/dbeta in a separate pass rather than atomics: run-to-run identical gradients.
#include "common.cuh"

namespace layernorm {
using common::from_f32;
using common::to_f32;
using common::warp_sum;

// A row of up to 32 · ROW_REGS values (the paper's d 1024) is read once into registers: every
// load of the row issued before the first sum needs it (64 values a lane took 167 registers,
// one block per multiprocessor; 32 leave room for two). Version 1 read the row
// three times in a loop (the sum, the variance, the output; the later passes from L1), and on
// an H200 (2026-12-04) moved 55 % of the copy bandwidth forward; the loads in flight per SM
// were too few for the latency. Each lane still holds and sums the elements lane, lane + 32, …
// in that order: version 1's arithmetic, in the fused join too (it runs this code). Its time
// on a card is owed.
constexpr int ROW_REGS = 32;

template <typename T>
__device__ void fwd(const T* x, const float* gamma, const float* beta, float eps, int rows, int d, T* y, float* stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * d;
  T* yr = y + (size_t)row * d;
  float mean, rstd;
  if (d <= 32 * ROW_REGS) {
    float v[ROW_REGS];
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k) v[k] = lane + 32 * k < d ? to_f32(xr[lane + 32 * k]) : 0.0f;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k)
      if (lane + 32 * k < d) s += v[k];
    mean = warp_sum(s) / (float)d;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k)
      if (lane + 32 * k < d) {
        const float t = v[k] - mean;
        q += t * t;
      }
    rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k) {
      const int i = lane + 32 * k;
      if (i < d) yr[i] = from_f32<T>((v[k] - mean) * rstd * gamma[i] + beta[i]);
    }
  } else {  // wider rows: version 1, streamed
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += to_f32(xr[i]);
    mean = warp_sum(s) / (float)d;
    float q = 0.0f;
    for (int i = lane; i < d; i += 32) {
      const float t = to_f32(xr[i]) - mean;
      q += t * t;
    }
    rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
    for (int i = lane; i < d; i += 32)
      yr[i] = from_f32<T>((to_f32(xr[i]) - mean) * rstd * gamma[i] + beta[i]);
  }
  if (lane == 0) {
    stats[2 * (size_t)row] = mean;
    stats[2 * (size_t)row + 1] = rstd;
  }
}

// dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = dy ⊙ γ. A row's two means, by its warp
// (also the fused join's backward, kernels/residual_norm.cu: one definition, the same bits).
// g is rounded as the CPU rounds it (__fmul_rn: never fused): contracted into g − mean(g) as
// an FMA, the product's rounding error survived the subtraction, and a row whose dx is 0 on
// the CPU (d = 1) came out ±5e-7 on an H200 (2026-12-04). The emulator missed it: it runs the
// PTX's mul.f32 and sub.f32 apart, where ptxas may fuse a mul without .rn into an FFMA.
__device__ __forceinline__ float grad_in(float dy, float gamma) { return __fmul_rn(dy, gamma); }

struct RowGrad {
  float mean, rstd, mg, mgx;
};

template <typename T>
__device__ RowGrad bwd_row(const T* xr, const T* gr, const float* gamma, const float* st, int d, int lane) {
  const float mean = st[0], rstd = st[1];
  float sg = 0.0f, sgx = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float g = grad_in(to_f32(gr[i]), gamma[i]);
    sg += g;
    sgx += g * (to_f32(xr[i]) - mean);
  }
  return {mean, rstd, warp_sum(sg) / (float)d, warp_sum(sgx) * rstd / (float)d};
}

// Element i's dx from its row's means (g = dy·γ, x̂ = (x − mean)·rstd).
__device__ __forceinline__ float bwd_value(const RowGrad& r, float g, float xhat) {
  return r.rstd * (g - r.mg - xhat * r.mgx);
}

template <typename T>
__device__ void bwd(const T* x, const float* stats, const float* gamma, const T* dy, int rows, int d, T* dx) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * d;
  const T* gr = dy + (size_t)row * d;
  T* out = dx + (size_t)row * d;
  if (d <= 32 * ROW_REGS) {
    // The row's x and g in registers, as the forward holds x: bwd_row's sums in its order
    // (gpu_residual_norm holds the fused join, which runs bwd_row, to these bits).
    const float mean = stats[2 * (size_t)row], rstd = stats[2 * (size_t)row + 1];
    float xv[ROW_REGS], gv[ROW_REGS];
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k) {
      const int i = lane + 32 * k;
      xv[k] = i < d ? to_f32(xr[i]) : 0.0f;
      gv[k] = i < d ? grad_in(to_f32(gr[i]), gamma[i]) : 0.0f;
    }
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k)
      if (lane + 32 * k < d) {
        sg += gv[k];
        sgx += gv[k] * (xv[k] - mean);
      }
    const RowGrad r{mean, rstd, warp_sum(sg) / (float)d, warp_sum(sgx) * rstd / (float)d};
#pragma unroll
    for (int k = 0; k < ROW_REGS; ++k) {
      const int i = lane + 32 * k;
      if (i < d) out[i] = from_f32<T>(bwd_value(r, gv[k], (xv[k] - r.mean) * r.rstd));
    }
    return;
  }
  const RowGrad r = bwd_row(xr, gr, gamma, stats + 2 * (size_t)row, d, lane);
  for (int i = lane; i < d; i += 32) {
    const float g = grad_in(to_f32(gr[i]), gamma[i]);
    const float xhat = (to_f32(xr[i]) - r.mean) * r.rstd;
    out[i] = from_f32<T>(bwd_value(r, g, xhat));
  }
}

// Stage 1 of dgamma = Σ_r dy·x̂ and dbeta = Σ_r dy: block (32 columns x 8 row lanes) over
// COLSUM_ROWS rows; partial = [2][parts][d] (dgamma parts, then dbeta parts); stage 2 (into
// dgamma, dbeta) in each strip's last block.
template <typename T>
__device__ void params_partial(const T* x, const float* stats, const T* dy, int rows, int d, float* partial,
                               float* dgamma, float* dbeta, unsigned* counters) {
  __shared__ float acc_g[8][33], acc_b[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * COLSUM_ROWS, r1 = min(rows, r0 + COLSUM_ROWS);
  float sg = 0.0f, sb = 0.0f;
  if (c < d)
    for (int r = r0 + threadIdx.y; r < r1; r += 8) {
      const float g = to_f32(dy[(size_t)r * d + c]);
      const float xhat = (to_f32(x[(size_t)r * d + c]) - stats[2 * (size_t)r]) * stats[2 * (size_t)r + 1];
      sg += g * xhat;
      sb += g;
    }
  acc_g[threadIdx.y][threadIdx.x] = sg;
  acc_b[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float tg = 0.0f, tb = 0.0f;
    for (int k = 0; k < 8; ++k) {
      tg += acc_g[k][threadIdx.x];
      tb += acc_b[k][threadIdx.x];
    }
    const size_t parts = gridDim.y;
    partial[(size_t)blockIdx.y * d + c] = tg;
    partial[parts * d + (size_t)blockIdx.y * d + c] = tb;
  }
  common::colsum_finish_strip(partial, d, dgamma, dbeta, counters);
}
}  // namespace layernorm

#define LN_ENTRY(T, SUF)                                                                                      \
  extern "C" __global__ void layernorm_fwd_##SUF(const T* x, const float* gamma, const float* beta, float eps,    \
                                                 int rows,                                                    \
                                                 int d, T* y, float* stats) {                                 \
    layernorm::fwd<T>(x, gamma, beta, eps, rows, d, y, stats);                                                \
  }                                                                                                           \
  extern "C" __global__ void layernorm_bwd_##SUF(const T* x, const float* stats, const float* gamma, const T* dy, \
                                                 int rows, int d, T* dx) {                                    \
    layernorm::bwd<T>(x, stats, gamma, dy, rows, d, dx);                                                      \
  }                                                                                                           \
  extern "C" __global__ void layernorm_params_bwd_##SUF(const T* x, const float* stats, const T* dy, int rows,  \
                                                        int d, float* partial, float* dgamma, float* dbeta,   \
                                                        unsigned* counters) {                                 \
    layernorm::params_partial<T>(x, stats, dy, rows, d, partial, dgamma, dbeta, counters);                    \
  }

LN_ENTRY(float, f32)
LN_ENTRY(__nv_bfloat16, bf16)
