// kernels/residual_norm.cu — the post-LN sublayer join fused: s = x + dropout(a), y = LN(s)
// forward; backward dx = LN'(dy) with the sublayer's gradient da = dropout(dx) in the same pass,
// and the first stage of the column sums dgamma = Σ dy·x̂, dbeta = Σ dy and (optionally) the
// sublayer's output bias gradient Σ da taken from the values the pass already holds.
// Storage: a, x, s, y, dy, dx, da of type T (f32 or bf16): s is rounded as it is stored and
// the norm runs on the rounded values, da is the dropout of dx as stored; gamma, beta, stats and the sums f32.
// Layout: a, x, s, y, dy, dx, da [rows, d] row-major; stats [rows, 2] (mean, rstd);
// partial [outs][blocks][d], one row per block of 8 rows and column sum.
// Launch: one warp per row (kernels/layernorm.cu's row code), forward 2 rows per 64-thread
// block (about 145 registers: see src/backend/cuda/norm.rs), backward 8 per 256; the partials
// finished by residual_layernorm_params_finish, grid (d/32, outs), block 32 x 8, in block
// order (deterministic).
// CPU twin: the composition dropout → add → layernorm (→ bias_bwd of da) of src/backend/cpu
// (Backend::residual_layernorm_fwd / _bwd). Test: tests/gpu_residual_norm.rs.
// Why: unfused, the join is dropout (read+write a), add (read a, x, write a), LN (read s,
// write y) forward, and LN backward, a clone and dropout backward (read+write) after it: 4 and
// 3 launches, 7 and 6 passes over the activation. Fused: 1 launch, 4 passes (read a, x, write
// s, y) forward. Backward: 4 passes (read s, dy, write dx, da) and the partials (3/8 of a pass
// written, then read), where LN's own column sums read s and dy again and the bias gradient
// da again (3 passes and 2 launches more). Each lane re-reads only the elements it wrote
// itself in the forward, so no barrier is needed between its parts; the backward's 8 warps
// meet once per 128 columns to add their rows' contributions in warp order.
// The mask is dropout_fwd's (common::dropout_value of the flat index) and the product is
// rounded before the add (__fmul_rn: no FMA), so the fused and unfused paths give the same bits
// (dx, da). LayerNorm's own backward is this one with no dropout and no da (da null, outs 2):
// its column sums come from the row pass, not from a second read of x and dy.
#include "common.cuh"

namespace residual_norm {
using common::from_f32;
using common::to_f32;

using layernorm::Held;
using layernorm::ROW_REGS;
using layernorm::Streamed;

// Rows of up to 32 · ROW_REGS: the lane's a and x loaded into registers at once, s stored and
// kept there (rounded as stored), the norm run on it. Version 1, the loop below for wider rows,
// stored s element by element and the norm read it back: each iteration's loads waited on the
// last one's store (a and x may alias), one memory latency per 32 elements, and its bf16
// entry took 227 µs a join in an H200's bf16 step (2026-12-04; ncu), 27.6 % of the step.
// s = x + dropout(a) from the lane's held a and x (W: their elements), stored into ar (a's
// row) rounded and kept so, then the row normed from it.
template <int W, typename T>
__device__ void held_fwd(Held s, const Held& xs, T* ar, int row, int lane, int d, const float* gamma, const float* beta,
                         float eps, float p, float scale, uint64_t seed, T* y, float* stats) {
  const size_t base = (size_t)row * d;
  const int n = layernorm::lane_values<W>(d, lane);
  LANE_VALUES(ROW_REGS, n, k) {
    const int i = layernorm::element<W>(lane, k);
    s.v[k] = to_f32(from_f32<T>(common::dropout_value(s.v[k], p, scale, seed, base + i) + xs.v[k]));
  }
  layernorm::put_row<ROW_REGS, W>(ar, lane, n, [&](int k) { return s.v[k]; });
  layernorm::norm_row<ROW_REGS, W>(s, row, lane, d, gamma, beta, eps, y, stats);
}

template <typename T>
__device__ void fwd(T* a, const T* x, const float* gamma, const float* beta, float eps, float p, float scale, uint64_t seed,
                    int rows, int d, T* y, float* stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const size_t base = (size_t)row * d;
  T* ar = a + base;
  if (d > 32 * ROW_REGS) {
    for (int i = lane; i < d; i += 32) {
      const float kept = common::dropout_value(to_f32(ar[i]), p, scale, seed, base + i);
      ar[i] = from_f32<T>(kept + to_f32(x[base + i]));
    }
    layernorm::norm_row<0, 1>(Streamed<T>{ar, lane}, row, lane, d, gamma, beta, eps, y, stats);
  } else if (layernorm::grouped<T>(d, a, x, y)) {
    held_fwd<4>(layernorm::hold4(ar, lane, d), layernorm::hold4(x + base, lane, d), ar, row, lane, d, gamma, beta, eps,
                p, scale, seed, y, stats);
  } else {
    held_fwd<1>(layernorm::hold(Streamed<T>{ar, lane}, lane, d), layernorm::hold(Streamed<T>{x + base, lane}, lane, d),
                ar, row, lane, d, gamma, beta, eps, p, scale, seed, y, stats);
  }
}

// Rows as layernorm::bwd computes them (its bwd_sums and bwd_value, so the same bits); the
// columns' contributions of the block's 8 rows summed in warp order, CHUNK columns per barrier,
// into partial[k][blockIdx.x][c]: k 0 Σ dy·x̂, 1 Σ dy, 2 Σ da (outs 3). Rows past the end add
// 0 and still meet at every barrier. The lane's s and dy: held in registers (K = ROW_REGS,
// rows up to 1,024; W 4 or 1 as layernorm.cu chooses) or read where they lie (K = 0: version
// 1, three reads of each). With W = 4 a lane's values of a chunk are one group: 4 consecutive
// columns, stored with one access each for dx and da.
constexpr int CHUNK = 128;
constexpr int CHUNK_VALUES = CHUNK / 32;  // a lane's values per chunk
static_assert(ROW_REGS % CHUNK_VALUES == 0, "held rows are whole chunks");
static_assert(CHUNK_VALUES == 4, "with W = 4 a lane's values of a chunk are one group");

template <int K, int W, typename T, typename S, typename DY>
__device__ void bwd_rows(const S& sv, const DY& dyv, const float* gamma, const float* st, bool live, size_t base, int d,
                         float p, float scale, uint64_t seed, T* dx, T* da, int outs, float* partial,
                         float (&part)[3][8][CHUNK]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const layernorm::Grad<W, DY> g{dyv, gamma, lane};
  layernorm::RowGrad r{};
  if (live) r = layernorm::bwd_sums<K, W>(sv, g, st, d, lane);
  const size_t blocks = gridDim.x;
  const int chunks = (d + CHUNK - 1) / CHUNK;
#pragma unroll
  for (int c = 0; c < (K > 0 ? K / CHUNK_VALUES : chunks); ++c) {
    if (c >= chunks) break;
    const int c0 = c * CHUNK;
    // The lane's values of this chunk: k = c · CHUNK_VALUES + m, its column j in the chunk.
    float vg[CHUNK_VALUES], vb[CHUNK_VALUES], vdx[CHUNK_VALUES], vda[CHUNK_VALUES];
#pragma unroll
    for (int m = 0; m < CHUNK_VALUES; ++m) {
      const int k = c * CHUNK_VALUES + m, i = layernorm::element<W>(lane, k);
      vg[m] = vb[m] = vdx[m] = vda[m] = 0.0f;
      if (live && i < d) {
        const float dyk = dyv(k);
        const float xhat = (sv(k) - r.mean) * r.rstd;
        vdx[m] = to_f32(from_f32<T>(layernorm::bwd_value(r, g(k), xhat)));
        vda[m] = to_f32(from_f32<T>(common::dropout_value(vdx[m], p, scale, seed, base + i)));
        vg[m] = dyk * xhat;
        vb[m] = dyk;
      }
    }
    if constexpr (W == 4) {  // the lane's 4 consecutive columns of the chunk, one store each
      const int j = 4 * lane;
      if (live && c0 + j < d) {
        common::store4(dx + base + c0 + j, vdx);
        if (da != nullptr) common::store4(da + base + c0 + j, vda);
      }
      *reinterpret_cast<float4*>(&part[0][warp][j]) = make_float4(vg[0], vg[1], vg[2], vg[3]);
      *reinterpret_cast<float4*>(&part[1][warp][j]) = make_float4(vb[0], vb[1], vb[2], vb[3]);
      *reinterpret_cast<float4*>(&part[2][warp][j]) = make_float4(vda[0], vda[1], vda[2], vda[3]);
    } else {
#pragma unroll
      for (int m = 0; m < CHUNK_VALUES; ++m) {
        const int j = lane + 32 * m;
        if (live && c0 + j < d) {
          dx[base + c0 + j] = from_f32<T>(vdx[m]);
          if (da != nullptr) da[base + c0 + j] = from_f32<T>(vda[m]);
        }
        part[0][warp][j] = vg[m];
        part[1][warp][j] = vb[m];
        part[2][warp][j] = vda[m];
      }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < outs * CHUNK; t += blockDim.x) {
      const int k = t / CHUNK, j = t % CHUNK;
      if (c0 + j < d) {
        float sum = 0.0f;
        for (int w = 0; w < 8; ++w) sum += part[k][w][j];
        partial[((size_t)k * blocks + blockIdx.x) * d + c0 + j] = sum;
      }
    }
    __syncthreads();  // part is overwritten by the next chunk
  }
}

template <typename T>
__device__ void bwd(const T* s, const float* stats, const float* gamma, const T* dy, float p, float scale, uint64_t seed,
                    int rows, int d, T* dx, T* da, int outs, float* partial) {
  __shared__ __align__(16) float part[3][8][CHUNK];
  const int lane = threadIdx.x & 31, row = blockIdx.x * 8 + threadIdx.x / 32;
  const bool live = row < rows;
  const size_t base = (size_t)row * d;
  const float* st = stats + 2 * (size_t)row;
  const Streamed<T> ss{s + base, lane}, dys{dy + base, lane};
  if (d > 32 * ROW_REGS) {
    bwd_rows<0, 1>(ss, dys, gamma, st, live, base, d, p, scale, seed, dx, da, outs, partial, part);
  } else if (layernorm::grouped<T>(d, s, dy, dx, da)) {
    Held sh{}, dyh{};
    if (live) {
      sh = layernorm::hold4(s + base, lane, d);
      dyh = layernorm::hold4(dy + base, lane, d);
    }
    bwd_rows<ROW_REGS, 4>(sh, dyh, gamma, st, live, base, d, p, scale, seed, dx, da, outs, partial, part);
  } else {
    Held sh{}, dyh{};
    if (live) {
      sh = layernorm::hold(ss, lane, d);
      dyh = layernorm::hold(dys, lane, d);
    }
    bwd_rows<ROW_REGS, 1>(sh, dyh, gamma, st, live, base, d, p, scale, seed, dx, da, outs, partial, part);
  }
}
#undef LANE_VALUES

// out_k[c] += Σ_b partial[k][b][c] for k = blockIdx.y (out0 dgamma, out1 dbeta, out2 the
// sublayer's dbias): lane (x, y) sums blocks y, y + 8, …, then the 8 lanes in order.
__device__ void params_finish(const float* partial, int blocks, int d, float* out0, float* out1, float* out2) {
  __shared__ float acc[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x, k = blockIdx.y;
  float s = 0.0f;
  if (c < d)
    for (int b = threadIdx.y; b < blocks; b += 8) s += partial[((size_t)k * blocks + b) * d + c];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float t = 0.0f;
    for (int y = 0; y < 8; ++y) t += acc[y][threadIdx.x];
    float* out = k == 0 ? out0 : k == 1 ? out1 : out2;
    out[c] += t;
  }
}
}  // namespace residual_norm

#define RESIDUAL_NORM_ENTRY(T, SUF)                                                                                \
  extern "C" __global__ void residual_layernorm_fwd_##SUF(T* a, const T* x, const float* gamma, const float* beta, \
                                                          float eps, float p, float scale, uint64_t seed,            \
                                                          const uint64_t* salt, int rows, int d, T* y, float* stats) { \
    residual_norm::fwd<T>(a, x, gamma, beta, eps, p, scale, seed ^ *salt, rows, d, y, stats);                              \
  }                                                                                                                \
  extern "C" __global__ void residual_layernorm_bwd_##SUF(const T* s, const float* stats, const float* gamma,      \
                                                          const T* dy, float p, float scale, uint64_t seed,         \
                                                          const uint64_t* salt, int rows, int d, T* dx, T* da,      \
                                                          int outs, float* partial) {                               \
    residual_norm::bwd<T>(s, stats, gamma, dy, p, scale, seed ^ *salt, rows, d, dx, da, outs, partial);                    \
  }

RESIDUAL_NORM_ENTRY(float, f32)
RESIDUAL_NORM_ENTRY(__nv_bfloat16, bf16)

extern "C" __global__ void residual_layernorm_params_finish(const float* partial, int blocks, int d, float* dgamma,
                                                            float* dbeta, float* dbias) {
  residual_norm::params_finish(partial, blocks, d, dgamma, dbeta, dbias);
}
