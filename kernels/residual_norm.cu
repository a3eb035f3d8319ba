// kernels/residual_norm.cu — the post-LN sublayer join fused: s = x + dropout(a), y = LN(s)
// forward; backward dx = LN'(dy) with the sublayer's gradient da = dropout(dx) in the same pass,
// and the first stage of the column sums dgamma = Σ dy·x̂, dbeta = Σ dy and (optionally) the
// sublayer's output bias gradient Σ da taken from the values the pass already holds.
// Storage: a, x, s, y, dy, dx, da of type T (f32 or bf16): s is rounded as it is stored and
// the norm reads it back, da is the dropout of dx as stored; gamma, beta, stats and the sums f32.
// Layout: a, x, s, y, dy, dx, da [rows, d] row-major; stats [rows, 2] (mean, rstd);
// partial [outs][blocks][d], one row per block of 8 rows and column sum.
// Launch: one warp per row, 8 rows per 256-thread block (as kernels/layernorm.cu, whose row
// code it runs); the partials finished by residual_layernorm_params_finish, grid (d/32, outs),
// block 32 x 8, in block order (deterministic).
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
// (dx, da; the column sums are added in another order than layernorm_params_bwd's).
#include "common.cuh"

namespace residual_norm {
using common::from_f32;
using common::to_f32;

template <typename T>
__device__ void fwd(T* a, const T* x, const float* gamma, const float* beta, float eps, float p, float scale, uint64_t seed,
                    int rows, int d, T* y, float* stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const size_t base = (size_t)row * d;
  for (int i = lane; i < d; i += 32) {
    const float kept = common::dropout_value(to_f32(a[base + i]), p, scale, seed, base + i);
    a[base + i] = from_f32<T>(kept + to_f32(x[base + i]));
  }
  layernorm::fwd<T>(a, gamma, beta, eps, rows, d, y, stats);
}

// Rows as layernorm::bwd computes them (its bwd_row and bwd_value, so the same bits); the columns'
// contributions of the block's 8 rows summed in warp order, CHUNK columns per barrier, into
// partial[k][blockIdx.x][c]: k 0 Σ dy·x̂, 1 Σ dy, 2 Σ da (outs 3). Rows past the end add 0
// and still meet at every barrier.
constexpr int CHUNK = 128;

template <typename T>
__device__ void bwd(const T* s, const float* stats, const float* gamma, const T* dy, float p, float scale, uint64_t seed,
                    int rows, int d, T* dx, T* da, int outs, float* partial) {
  __shared__ float part[3][8][CHUNK];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int row = blockIdx.x * 8 + warp;
  const bool live = row < rows;
  const size_t base = (size_t)row * d;
  layernorm::RowGrad r{};
  if (live) r = layernorm::bwd_row(s + base, dy + base, gamma, stats + 2 * (size_t)row, d, lane);
  const size_t blocks = gridDim.x;
  for (int c0 = 0; c0 < d; c0 += CHUNK) {
    for (int j = lane; j < CHUNK; j += 32) {
      const int i = c0 + j;
      float vg = 0.0f, vb = 0.0f, va = 0.0f;
      if (live && i < d) {
        const float dyv = to_f32(dy[base + i]);
        const float g = layernorm::grad_in(dyv, gamma[i]);
        const float xhat = (to_f32(s[base + i]) - r.mean) * r.rstd;
        const T dxv = from_f32<T>(layernorm::bwd_value(r, g, xhat));
        const T dav = from_f32<T>(common::dropout_value(to_f32(dxv), p, scale, seed, base + i));
        dx[base + i] = dxv;
        da[base + i] = dav;
        vg = dyv * xhat;
        vb = dyv;
        va = to_f32(dav);
      }
      part[0][warp][j] = vg;
      part[1][warp][j] = vb;
      part[2][warp][j] = va;
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
