// kernels/losses.cu — fused losses: the loss and its gradient in one pass, the gradient
// written over the logits (no separate probability buffer, one read and one write).
// CPU twin: src/backend/cpu/losses.rs. Test: tests/gpu_ops.rs.
// Loss totals: per-block (BCE) or per-row (cross-entropy) partial sums in f32, added on the
// host in f64 — the caller needs the scalar on the host anyway, and the f64 total keeps the
// result independent of the block count.
#include "common.cuh"

namespace losses {
using common::from_f32;
using common::to_f32;

__device__ __forceinline__ float stable_sigmoid(float v) {
  if (v >= 0.0f) return 1.0f / (1.0f + expf(-v));
  const float e = expf(v);
  return e / (1.0f + e);
}

// Multi-label BCE with logits: loss = max(x,0) − x·y + log1p(e^{−|x|}) per entry; the
// gradient of the mean, times `scale`, replaces x. partial[block] = this block's loss sum.
template <typename T>
__device__ void bce(T* logits, const T* targets, float scale, size_t n, float* partial) {
  __shared__ float scratch[32];
  const float k = scale / (float)n;
  float loss = 0.0f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f32(logits[i]), y = to_f32(targets[i]);
    loss += fmaxf(v, 0.0f) - v * y + log1pf(expf(-fabsf(v)));
    logits[i] = from_f32<T>((stable_sigmoid(v) - y) * k);
  }
  loss = common::block_sum(loss, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = loss;
}

// Softmax cross-entropy, one block per row (rows are vocabulary-wide: 10,000 classes).
// row_loss[r] = log Σ e^{x−max} − (x_t − max); gradient (softmax − onehot)·scale/n in place,
// n the rows with a target. A row whose target is IGNORE (a bucket's padding) has neither loss
// nor gradient; n is counted here by every block (the targets are a few hundred words) and
// left in row_loss[rows] for the mean's finish, so no count comes from the host.
constexpr uint32_t IGNORE = 0xFFFFFFFFu;
template <typename T>
__device__ void cross_entropy(T* logits, const uint32_t* targets, int rows, int classes, float scale,
                              float* row_loss) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  if (r >= rows) return;
  T* x = logits + (size_t)r * classes;
  float counted = 0.0f;
  for (int i = threadIdx.x; i < rows; i += blockDim.x) counted += targets[i] != IGNORE ? 1.0f : 0.0f;
  const float n = common::block_sum(counted, scratch);
  if (r == 0 && threadIdx.x == 0) row_loss[rows] = n;
  if (targets[r] == IGNORE) {
    for (int j = threadIdx.x; j < classes; j += blockDim.x) x[j] = from_f32<T>(0.0f);
    if (threadIdx.x == 0) row_loss[r] = 0.0f;
    return;
  }
  const int t = (int)targets[r];
  const float xt = to_f32(x[t]);  // read before any thread overwrites the row
  float m = -INFINITY;
  for (int j = threadIdx.x; j < classes; j += blockDim.x) m = fmaxf(m, to_f32(x[j]));
  m = common::block_max(m, scratch);
  float s = 0.0f;
  for (int j = threadIdx.x; j < classes; j += blockDim.x) {
    const float e = expf(to_f32(x[j]) - m);
    x[j] = from_f32<T>(e);
    s += e;
  }
  s = common::block_sum(s, scratch);
  const float k = scale / (s * n);
  for (int j = threadIdx.x; j < classes; j += blockDim.x) {
    float g = to_f32(x[j]) * k;
    if (j == t) g -= scale / n;
    x[j] = from_f32<T>(g);
  }
  if (threadIdx.x == 0) row_loss[r] = logf(s) - (xt - m);
}
}  // namespace losses

#define LOSS_ENTRY(T, SUF)                                                                                   \
  extern "C" __global__ void bce_with_logits_fwd_##SUF(T* logits, const T* targets, float scale, size_t n,    \
                                                       float* partial) {                                     \
    losses::bce<T>(logits, targets, scale, n, partial);                                                      \
  }                                                                                                          \
  extern "C" __global__ void cross_entropy_fwd_##SUF(T* logits, const uint32_t* targets, int rows, int classes, \
                                                     float scale, float* row_loss) {                         \
    losses::cross_entropy<T>(logits, targets, rows, classes, scale, row_loss);                               \
  }

LOSS_ENTRY(float, f32)
LOSS_ENTRY(__nv_bfloat16, bf16)
