// kernels/elementwise.cu — fill, bias, residual, scale, GELU, dropout, label coordinates.
// Layout: flat or row-major [rows, cols]. Launch: grid-stride loops over the elements (so any
// n fits a grid capped at a few waves), except bias_bwd (column reduction, below).
// CPU twin: src/backend/cpu/elementwise.rs. Test: tests/gpu_ops.rs.
// Why no vector (float4) loads: the row-major tensors have odd column counts (e.g. 3·300), so
// a float4 path needs a scalar tail and alignment checks; what bound these ops was not the
// width of a load but how many were in flight (each_element, below).
#include "common.cuh"

namespace elementwise {
using common::from_f32;
using common::to_f32;

// Elements [0, n) over the grid, BATCH a thread per pass: i, i + stride, … (each a coalesced
// warp access). Every element of a pass is loaded (`load(i)`) before the first is finished
// (`finish(i, loaded)`, which computes and stores). Why: a store may alias the next element's
// load (in-place ops, and nvcc cannot tell two tensors apart), so a loop that loads, computes
// and stores one element at a time waits one memory latency per element; the bf16 step's
// profile had the FFN's GELU kernels at 25–35 % of copy bandwidth on an H200 (session 27, as
// the joins' forward was before it held its row). Each element's arithmetic is the loop's,
// so its bits are.
#define BATCH 4
template <typename Load, typename Finish> __device__ __forceinline__ void each_element(size_t n, Load load, Finish finish) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t base = blockIdx.x * (size_t)blockDim.x + threadIdx.x; base < n; base += BATCH * stride) {
    decltype(load(base)) v[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j)
      if (base + j * stride < n) v[j] = load(base + j * stride);
#pragma unroll
    for (int j = 0; j < BATCH; ++j)
      if (base + j * stride < n) finish(base + j * stride, v[j]);
  }
}

template <typename T> __device__ void add_bias(T* y, const float* bias, size_t n, int cols) {
  each_element(
      n, [&](size_t i) { return make_float2(to_f32(y[i]), bias[i % cols]); },
      [&](size_t i, float2 v) { y[i] = from_f32<T>(v.x + v.y); });
}

// Stage 1 of dbias = Σ_r dy[r, :]: block (32 columns x 8 row lanes) sums COLSUM_ROWS rows;
// the 8 lanes are combined in shared memory in a fixed order, so the result does not depend
// on scheduling. Stage 2 (common.cuh colsum_finish_strip) runs in the strip's last block.
// The end of stage 1 for a block whose lanes hold their column sums `s`: the 8 row lanes
// combined in order, the block's partial written, the strip finished by its last block.
__device__ __forceinline__ void colsum_block(float s, int cols, float* partial, float* dbias, unsigned* counters) {
  __shared__ float acc[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.0f;
    for (int k = 0; k < 8; ++k) t += acc[k][threadIdx.x];
    partial[(size_t)blockIdx.y * cols + c] = t;
  }
  common::colsum_finish_strip(partial, cols, dbias, nullptr, counters);
}

template <typename T>
__device__ void bias_bwd_partial(const T* dy, int rows, int cols, float* partial, float* dbias, unsigned* counters) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * COLSUM_ROWS;
  const int r1 = min(rows, r0 + COLSUM_ROWS);
  float s = 0.0f;
  if (c < cols)
    for (int r = r0 + threadIdx.y; r < r1; r += 8) s += to_f32(dy[(size_t)r * cols + c]);
  colsum_block(s, cols, partial, dbias, counters);
}

template <typename T> __device__ void add_assign(T* y, const T* x, size_t n) {
  each_element(
      n, [&](size_t i) { return make_float2(to_f32(y[i]), to_f32(x[i])); },
      [&](size_t i, float2 v) { y[i] = from_f32<T>(v.x + v.y); });
}

template <typename T> __device__ void scale(T* x, float s, size_t n) {
  each_element(n, [&](size_t i) { return to_f32(x[i]); }, [&](size_t i, float v) { x[i] = from_f32<T>(v * s); });
}

// The CPU's tanh_fast, coefficient for coefficient (clamped rational 13/6, max error < 1e-6),
// so GPU and CPU GELU differ by FMA rounding only; tanhf would differ by ~1e-7 more and cost more.
__device__ __forceinline__ float tanh_fast(float x) {
  x = fminf(fmaxf(x, -7.905311f), 7.905311f);
  const float x2 = x * x;
  float p = x2 * -2.7607685e-16f + 2.0001879e-13f;
  p = x2 * p + -8.6046715e-11f;
  p = x2 * p + 5.122297e-08f;
  p = x2 * p + 1.4857224e-05f;
  p = x2 * p + 6.3726193e-04f;
  p = (x2 * p + 4.8935246e-03f) * x;
  float q = x2 * 1.1982584e-06f + 1.1853471e-04f;
  q = x2 * q + 2.2684346e-03f;
  q = x2 * q + 4.893525e-03f;
  return p / q;
}
#define GELU_C 0.7978846f
#define GELU_A 0.044715f

// GELU and its derivative, the CPU twin's `gelu` / `gelu_grad` (cpu/elementwise.rs), written
// once for the plain and the fused kernels so that they round alike.
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.0f + tanh_fast(GELU_C * (v + GELU_A * v * v * v))); }

__device__ __forceinline__ float gelu_grad(float v) {
  const float t = tanh_fast(GELU_C * (v + GELU_A * v * v * v));
  return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * GELU_A * v * v);
}

template <typename T> __device__ void gelu_fwd(const T* x, T* y, size_t n) {
  each_element(n, [&](size_t i) { return to_f32(x[i]); }, [&](size_t i, float v) { y[i] = from_f32<T>(gelu(v)); });
}

template <typename T> __device__ void gelu_bwd(const T* x, const T* dy, T* dx, size_t n) {
  each_element(
      n, [&](size_t i) { return make_float2(to_f32(dy[i]), to_f32(x[i])); },
      [&](size_t i, float2 v) { dx[i] = from_f32<T>(v.x * gelu_grad(v.y)); });
}

// The feed-forward's activation in one pass: u += bias (bias null: none), h = dropout(GELU(u))
// with p (0: no dropout). The helpers of add_bias, gelu_fwd and dropout, so in f32 bit for bit
// those three; in bf16 u is rounded as it is stored (and GELU reads it so) and h once.
// Why: 3 launches and 6 passes over the FFN's widest activation (read u, write u; read u, write
// h; read h, write h) become 1 launch and 3 passes (read u, write u, write h).
template <typename T>
__device__ void bias_gelu_dropout_fwd(T* u, const float* bias, size_t cols, T* h, float p, float scale,
                                      uint64_t seed, size_t n) {
  each_element(
      n, [&](size_t i) { return to_f32(u[i]); },
      [&](size_t i, float v) {
        if (bias != nullptr) {
          const T stored = from_f32<T>(v + bias[i % cols]);
          u[i] = stored;
          v = to_f32(stored);
        }
        h[i] = from_f32<T>(common::dropout_value(gelu(v), p, scale, seed, i));
      });
}

// Its backward in dh's memory: dh = GELU'(u) · dropout(dh), in f32 bit for bit dropout_bwd
// then gelu_bwd (2 launches and 5 passes → 1 launch and 3: read dh, u, write dh); in bf16
// rounded once, as it is stored.
template <typename T> __device__ void gelu_dropout_bwd(const T* u, T* dh, float p, float scale, uint64_t seed, size_t n) {
  each_element(
      n, [&](size_t i) { return make_float2(to_f32(dh[i]), to_f32(u[i])); },
      [&](size_t i, float2 v) {
        const float d = common::dropout_value(v.x, p, scale, seed, i);
        dh[i] = from_f32<T>(d * gelu_grad(v.y));
      });
}

// gelu_dropout_bwd with the first linear's bias gradient taken from the values it writes:
// dbias += Σ_r dh[r, :], laid out and summed as bias_bwd_partial sums (32-column strips, 8 row
// lanes, COLSUM_ROWS rows a block), so dh and dbias are bit for bit the two kernels' in turn,
// in one launch and without reading dh a second time (4 of a layer's activation passes). The
// sum adds the values as stored (in bf16, rounded).
template <typename T>
__device__ void gelu_dropout_bias_bwd(const T* u, T* dh, float p, float scale, uint64_t seed, int rows, int cols,
                                      float* partial, float* dbias, unsigned* counters) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * COLSUM_ROWS;
  const int r1 = min(rows, r0 + COLSUM_ROWS);
  // Each lane's COLSUM_ROWS / 8 rows loaded before the first is stored (each_element's why),
  // then finished and summed in row order, as one row at a time did.
  constexpr int LANE_ROWS = COLSUM_ROWS / 8;
  float dv[LANE_ROWS], uv[LANE_ROWS];
#pragma unroll
  for (int j = 0; j < LANE_ROWS; ++j) {
    const int r = r0 + threadIdx.y + 8 * j;
    if (c < cols && r < r1) {
      const size_t i = (size_t)r * cols + c;
      dv[j] = to_f32(dh[i]);
      uv[j] = to_f32(u[i]);
    }
  }
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < LANE_ROWS; ++j) {
    const int r = r0 + threadIdx.y + 8 * j;
    if (c < cols && r < r1) {
      const size_t i = (size_t)r * cols + c;
      const T v = from_f32<T>(common::dropout_value(dv[j], p, scale, seed, i) * gelu_grad(uv[j]));
      dh[i] = v;
      s += to_f32(v);
    }
  }
  colsum_block(s, cols, partial, dbias, counters);
}

template <typename T> __device__ void dropout(T* x, float p, float scale, uint64_t seed, size_t n) {
  each_element(
      n, [&](size_t i) { return to_f32(x[i]); },
      [&](size_t i, float v) { x[i] = from_f32<T>(common::dropout_value(v, p, scale, seed, i)); });
}

// Nothing to load: a store-only loop has no latency to wait on.
template <typename T> __device__ void fill(T* x, float v, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    x[i] = from_f32<T>(v);
}

// Label coordinates √softplus(g), in place (CPU twin: `elementwise::label_coordinates`, in
// f64). softplus without overflow (g + log1p(e^{−g}) for g > 0); below −20 it is e^g to f32
// precision (log1p(x) = x(1 − x/2 …)), and e^{g/2} keeps the small coordinates exact where
// log1pf(expf(g)) would go through a subnormal e^g and lose their bits.
__device__ void label_coordinates(float* g, size_t n) {
  each_element(n, [&](size_t i) { return g[i]; }, [&](size_t i, float v) {
    float c;
    if (v > 0.0f) {
      c = sqrtf(v + log1pf(expf(-v)));
    } else if (v > -20.0f) {
      c = sqrtf(log1pf(expf(v)));
    } else {
      c = expf(0.5f * v);
    }
    g[i] = c;
  });
}
}  // namespace elementwise

#define EW_ENTRY(T, SUF)                                                                                    \
  extern "C" __global__ void add_bias_fwd_##SUF(T* y, const float* b, size_t n, int cols) {                  \
    elementwise::add_bias<T>(y, b, n, cols);                                                                 \
  }                                                                                                          \
  extern "C" __global__ void bias_bwd_##SUF(const T* dy, int rows, int cols, float* partial, float* dbias,    \
                                            unsigned* counters) {                                            \
    elementwise::bias_bwd_partial<T>(dy, rows, cols, partial, dbias, counters);                              \
  }                                                                                                          \
  extern "C" __global__ void add_assign_fwd_##SUF(T* y, const T* x, size_t n) {                              \
    elementwise::add_assign<T>(y, x, n);                                                                     \
  }                                                                                                          \
  extern "C" __global__ void scale_fwd_##SUF(T* x, float s, size_t n) { elementwise::scale<T>(x, s, n); }    \
  extern "C" __global__ void gelu_fwd_##SUF(const T* x, T* y, size_t n) { elementwise::gelu_fwd<T>(x, y, n); } \
  extern "C" __global__ void gelu_bwd_##SUF(const T* x, const T* dy, T* dx, size_t n) {                      \
    elementwise::gelu_bwd<T>(x, dy, dx, n);                                                                  \
  }                                                                                                          \
  extern "C" __global__ void bias_gelu_dropout_fwd_##SUF(T* u, const float* bias, size_t cols, T* h, float p,  \
                                                         float scale, uint64_t seed, const uint64_t* salt, \
                                                         size_t n) {                                         \
    elementwise::bias_gelu_dropout_fwd<T>(u, bias, cols, h, p, scale, seed ^ *salt, n);                              \
  }                                                                                                          \
  extern "C" __global__ void gelu_dropout_bwd_##SUF(const T* u, T* dh, float p, float scale, uint64_t seed,    \
                                                    const uint64_t* salt, size_t n) {                        \
    elementwise::gelu_dropout_bwd<T>(u, dh, p, scale, seed ^ *salt, n);                                              \
  }                                                                                                          \
  extern "C" __global__ void gelu_dropout_bias_bwd_##SUF(const T* u, T* dh, float p, float scale, uint64_t seed, \
                                                         const uint64_t* salt, int rows, int cols, float* partial, \
                                                         float* dbias, unsigned* counters) {                    \
    elementwise::gelu_dropout_bias_bwd<T>(u, dh, p, scale, seed ^ *salt, rows, cols, partial, dbias, counters);  \
  }                                                                                                          \
  extern "C" __global__ void dropout_fwd_##SUF(T* x, float p, float scale, uint64_t seed,                   \
                                               const uint64_t* salt, size_t n) {                             \
    elementwise::dropout<T>(x, p, scale, seed ^ *salt, n);                                                           \
  }                                                                                                          \
  extern "C" __global__ void dropout_bwd_##SUF(T* dy, float p, float scale, uint64_t seed,                  \
                                               const uint64_t* salt, size_t n) {                             \
    elementwise::dropout<T>(dy, p, scale, seed ^ *salt, n);                                                          \
  }                                                                                                          \
  extern "C" __global__ void fill_fwd_##SUF(T* x, float v, size_t n) { elementwise::fill<T>(x, v, n); }

EW_ENTRY(float, f32)
EW_ENTRY(__nv_bfloat16, bf16)

extern "C" __global__ void label_coordinates_f32(float* g, size_t n) { elementwise::label_coordinates(g, n); }

// Conversion between the storage types (`Backend::convert`; CPU twin: `DType::round`). Named
// for their bf16 side, so that `Cuda::launch` lets a bf16 pointer through.
// f32 -> bf16: to nearest, ties to even (cvt.rn.bf16.f32).
extern "C" __global__ void convert_from_f32_bf16(const float* x, __nv_bfloat16* y, size_t n) {
  elementwise::each_element(n, [&](size_t i) { return x[i]; }, [&](size_t i, float v) { y[i] = __float2bfloat16_rn(v); });
}
// bf16 -> f32: exact.
extern "C" __global__ void convert_to_f32_bf16(const __nv_bfloat16* x, float* y, size_t n) {
  elementwise::each_element(n, [&](size_t i) { return __bfloat162float(x[i]); }, [&](size_t i, float v) { y[i] = v; });
}
