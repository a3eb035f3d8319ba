// kernels/layernorm.cu — LayerNorm over the last dimension: the forward, and the row code
// (forward and backward) that it and the fused post-LN join share. The backward's kernel is the
// join's (kernels/residual_norm.cu, with no dropout and no da): dx and the first stage of
// dgamma, dbeta from one pass over x and dy (a separate column pass read them again: 7
// passes over the activation forward and backward, now 5).
// Layout: x [rows, d] row-major; stats [rows, 2] = (mean, rstd) saved for backward.
// Storage: x, y, dy, dx of type T (f32 or bf16, each value rounded once, as it is stored);
// gamma, beta, stats and the parameter gradients f32 (parameters stay f32).
// Launch: one warp per row, 8 rows per 256-thread block.
// CPU twin: src/backend/cpu/layernorm.rs. Test: tests/gpu_ops.rs.
// Why a warp per row: a row is d / 32 values per lane; the reductions are register shuffles
// with no shared memory or block barrier. Rows up to 1,024 wide are held in registers; wider
// ones are read again for each pass, the later passes from L1 (Held and Streamed below).
// Why two-pass variance (mean first, then Σ(x−mean)²): the CPU twin's formula, and it does not
// cancel catastrophically the way E[x²]−mean² does for rows with a large mean.
// Why dgamma/dbeta from per-block partials finished in block order rather than atomics:
// run-to-run identical gradients.
#include "common.cuh"

namespace layernorm {
using common::from_f32;
using common::load4;
using common::store4;
using common::to_f32;
using common::warp_sum;

// A lane's values of a row: its k-th value is the row's element `element<W>(lane, k)`, in
// groups of W consecutive elements, group q at W·lane + 32·W·q, for k < lane_values<W>(d, lane).
// W = 1 (lane + 32 k) for any row; W = 4 where a row is whole groups of 4 (d % 4 == 0) and
// its tensors start 4-element aligned, so that a group is one 16-byte (f32) or 8-byte (bf16)
// load or store. The values are either read where they lie each time they are used (Streamed:
// W = 1, any d; version 1) or loaded once into registers (Held: d ≤ 32 · ROW_REGS, the
// paper's 1024). The row code below is written once over them, so every choice gives the same
// arithmetic in k order for its W, in the fused join too (kernels/residual_norm.cu runs it:
// the fused and the plain kernels choose W alike, so they give the same bits).
// Why Held: version 1 read the row three times in a loop (the sum, the variance, the output;
// the later passes from L1), and on an H200 (2026-12-04) its forward moved 55 % of the copy
// bandwidth: too few loads in flight per multiprocessor for the latency. Held issues every
// load of the row before the first sum needs it. 32 values a lane (forward 56 registers in
// groups of 4, the join's backward 102) leave room for two or more blocks per multiprocessor;
// 64 took 167, one block. On an H200 (2026-12-04, session 27) it first moved 49 % of copy forward and 34.5 %
// forward + backward (version 1: 55 %, 31 %): the y stores waited each on its γ and β loads
// (γ might alias y). Read through __ldg, they go out together: 60 % and 39 %.
// Why W = 4 (version 3, session 27; its time is owed): with one value per load the bf16 fused
// join took as long as the f32 one (31.6 against 33.8 µs forward on the H200) though it moves
// half the bytes: bound by load instructions, not bytes. Groups of 4 take a quarter of them.
constexpr int ROW_REGS = 32;

template <int W> __device__ __forceinline__ int element(int lane, int k) {
  return W * lane + 32 * W * (k / W) + k % W;
}

template <int W> __device__ __forceinline__ int lane_values(int d, int lane) {
  return W * lane < d ? ((d - 1 - W * lane) / (32 * W) + 1) * W : 0;
}

// Whether rows of d elements of these tensors are whole 4-element groups, each aligned for
// one vector access (4 f32: 16 bytes; 4 bf16: 8).
template <typename T> __device__ __forceinline__ bool grouped(int d, const void* p) {
  return d % 4 == 0 && (reinterpret_cast<uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0;
}
template <typename T, typename... P> __device__ __forceinline__ bool grouped(int d, const void* p, P... rest) {
  return grouped<T>(d, p) && grouped<T>(d, rest...);
}

// dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = dy ⊙ γ.
// g is rounded as the CPU rounds it (__fmul_rn: never fused): contracted into g − mean(g) as
// an FMA, the product's rounding error survived the subtraction, and a row whose dx is 0 on
// the CPU (d = 1) came out ±5e-7 on an H200 (2026-12-04). The emulator missed it: it runs the
// PTX's mul.f32 and sub.f32 apart, where ptxas may fuse a mul without .rn into an FFMA.
__device__ __forceinline__ float grad_in(float dy, float gamma) { return __fmul_rn(dy, gamma); }

template <typename T>
struct Streamed {
  const T* row;
  int lane;
  __device__ float operator()(int k) const { return to_f32(row[lane + 32 * k]); }
};

struct Held {
  float v[ROW_REGS];
  __device__ float operator()(int k) const { return v[k]; }
};

// g = dy·γ of the lane's elements, from dy's values (held or streamed).
template <int W, typename Values>
struct Grad {
  Values dy;
  const float* gamma;
  int lane;
  __device__ float operator()(int k) const { return grad_in(dy(k), __ldg(gamma + element<W>(lane, k))); }
};

// The lane's values of `src` in registers (W = 1, d ≤ 32 · ROW_REGS).
template <typename Values>
__device__ Held hold(const Values& src, int lane, int d) {
  Held h;
#pragma unroll
  for (int k = 0; k < ROW_REGS; ++k) h.v[k] = lane + 32 * k < d ? src(k) : 0.0f;
  return h;
}

// The lane's values of `row` in registers in groups of 4 (W = 4, d ≤ 32 · ROW_REGS; each
// group one access: `grouped`).
template <typename T>
__device__ Held hold4(const T* row, int lane, int d) {
  Held h;
#pragma unroll
  for (int q = 0; q < ROW_REGS / 4; ++q) {
    const int i = 4 * lane + 128 * q;
    if (i < d) {
      load4(row + i, h.v + 4 * q);
    } else {
      h.v[4 * q] = h.v[4 * q + 1] = h.v[4 * q + 2] = h.v[4 * q + 3] = 0.0f;
    }
  }
  return h;
}

// Loops over a lane's k < n values: K > 0 (held) unrolled over K with a guard, K = 0 as many
// as there are. (Used by kernels/residual_norm.cu too.)
#define LANE_VALUES(K, n, k) _Pragma("unroll") for (int k = 0; k < ((K) > 0 ? (K) : (n)); ++k) if (k < (n))

// out's elements of the lane's values k < n: value(k), rounded as stored, a group of W per
// store.
template <int K, int W, typename T, typename F>
__device__ __forceinline__ void put_row(T* out, int lane, int n, F value) {
  if constexpr (W == 4) {
#pragma unroll
    for (int q = 0; q < K / 4; ++q) {
      if (4 * q >= n) break;
      float v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = value(4 * q + c);
      store4(out + element<4>(lane, 4 * q), v);
    }
  } else {
    LANE_VALUES(K, n, k) out[element<1>(lane, k)] = from_f32<T>(value(k));
  }
}

// The row's mean and rstd, and y, from the lane's values x (two-pass variance, in k order).
template <int K, int W, typename T, typename Values>
__device__ void fwd_row(const Values& x, int lane, int d, const float* gamma, const float* beta, float eps, T* yr,
                        float& mean, float& rstd) {
  const int n = lane_values<W>(d, lane);
  float s = 0.0f;
  LANE_VALUES(K, n, k) s += x(k);
  mean = warp_sum(s) / (float)d;
  float q = 0.0f;
  LANE_VALUES(K, n, k) {
    const float t = x(k) - mean;
    q += t * t;
  }
  rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
  const float m = mean, r = rstd;
  put_row<K, W>(yr, lane, n, [&](int k) {
    const int i = element<W>(lane, k);
    return (x(k) - m) * r * __ldg(gamma + i) + __ldg(beta + i);
  });
}

// Row `row` of y and its (mean, rstd) in stats, from the lane's values x.
template <int K, int W, typename T, typename Values>
__device__ void norm_row(const Values& x, int row, int lane, int d, const float* gamma, const float* beta, float eps,
                         T* y, float* stats) {
  float mean, rstd;
  fwd_row<K, W>(x, lane, d, gamma, beta, eps, y + (size_t)row * d, mean, rstd);
  if (lane == 0) {
    stats[2 * (size_t)row] = mean;
    stats[2 * (size_t)row + 1] = rstd;
  }
}

template <typename T>
__device__ void fwd(const T* x, const float* gamma, const float* beta, float eps, int rows, int d, T* y, float* stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * d;
  const Streamed<T> streamed{xr, lane};
  if (d > 32 * ROW_REGS)
    norm_row<0, 1>(streamed, row, lane, d, gamma, beta, eps, y, stats);
  else if (grouped<T>(d, x, y))
    norm_row<ROW_REGS, 4>(hold4(xr, lane, d), row, lane, d, gamma, beta, eps, y, stats);
  else
    norm_row<ROW_REGS, 1>(hold(streamed, lane, d), row, lane, d, gamma, beta, eps, y, stats);
}

// A row's two means, by its warp, from the lane's values of x and g = dy·γ.
struct RowGrad {
  float mean, rstd, mg, mgx;
};

template <int K, int W, typename X, typename G>
__device__ RowGrad bwd_sums(const X& x, const G& g, const float* st, int d, int lane) {
  const float mean = st[0], rstd = st[1];
  const int n = lane_values<W>(d, lane);
  float sg = 0.0f, sgx = 0.0f;
  LANE_VALUES(K, n, k) {
    sg += g(k);
    sgx += g(k) * (x(k) - mean);
  }
  return {mean, rstd, warp_sum(sg) / (float)d, warp_sum(sgx) * rstd / (float)d};
}

// Element i's dx from its row's means (g = dy·γ, x̂ = (x − mean)·rstd).
__device__ __forceinline__ float bwd_value(const RowGrad& r, float g, float xhat) {
  return r.rstd * (g - r.mg - xhat * r.mgx);
}

}  // namespace layernorm

#define LN_ENTRY(T, SUF)                                                                                   \
  extern "C" __global__ void layernorm_fwd_##SUF(const T* x, const float* gamma, const float* beta, float eps, \
                                                 int rows, int d, T* y, float* stats) {                       \
    layernorm::fwd<T>(x, gamma, beta, eps, rows, d, y, stats);                                             \
  }

LN_ENTRY(float, f32)
LN_ENTRY(__nv_bfloat16, bf16)
