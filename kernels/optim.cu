// kernels/optim.cu — AdamW over the flat parameter buffer, Σx² for gradient-norm clipping, and
// the step's guard (loss total, norm, clip factor, non-finite status) so no value leaves the device.
// CPU twins: src/backend/cpu/optim.rs, src/backend/step.rs::guard. Tests: tests/gpu_ops.rs,
// tests/gpu_step.rs.
// Why one launch over the whole flat buffer: 71 M parameters, four streams (p, g, m, v),
// purely bandwidth-bound; per-tensor launches would add ~200 launches per step for nothing.
// The bias corrections and decay factor are computed on the host (in f64, as the CPU does)
// and passed in (the masked update reads them from the step's record, where the host writes
// them with the batch, so a replayed graph uses its own step's), so the per-element
// arithmetic is the CPU's expression for expression.
// Parameters, moments and gradients stay f32 whatever the activation storage type.
#include "common.cuh"

namespace optim {
using common::to_f32;

// Slots of a step's record (src/backend/step.rs::record).
constexpr int REC_IMAGE_LABEL = 0, REC_IMAGE_CONTEXT = 1, REC_TEXT_LABEL = 2, REC_TEXT_CONTEXT = 3;
constexpr int REC_CONSISTENCY = 4, REC_SUM_SQUARES = 5, REC_LOSS = 6, REC_GRAD_NORM = 7, REC_CLIP = 8;
constexpr int REC_STATUS = 9, REC_STEP_SIZE = 10, REC_INV_SQRT_BC2 = 11, REC_DECAY = 12, REC_LEN = 13;
constexpr int STATE_HALTED = 0, STATE_ROWS = 1;
constexpr unsigned NORM_BIT = 1u << 5, HALTED_BIT = 1u << 6;

__device__ __forceinline__ void adamw_element(float* p, const float* g, float* m, float* v, size_t i, float beta1,
                                              float beta2, float eps, float step_size, float inv_sqrt_bc2,
                                              float decay, float grad_scale) {
  const float gi = g[i] * grad_scale;
  const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
  const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
}

__device__ void adamw(float* p, const float* g, float* m, float* v, size_t n, float beta1, float beta2, float eps,
                      float step_size, float inv_sqrt_bc2, float decay, float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    adamw_element(p, g, m, v, i, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
}

// The run holding element i: the largest r with starts[r] <= i (starts[0] = 0, ascending).
__device__ __forceinline__ int run_of(const uint32_t* starts, int runs, size_t i) {
  int lo = 0, hi = runs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= i) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// One launch for every parameter: mask = [start_0 .. start_{runs-1}, end, decayed_0 .. decayed_{runs-1}];
// the clip factor and the go/skip status come from the step's record, written by step_guard
// earlier on the stream, so the host never reads the gradient norm. Why a run table and not a
// byte per parameter: ~70 runs stay in L1, a byte mask would add 71 MB of reads per step.
__device__ void adamw_masked(float* p, const float* g, float* m, float* v, size_t n, const uint32_t* mask, int runs,
                             float beta1, float beta2, float eps, const float* rec) {
  if (rec[REC_STATUS] != 0.0f) return;
  const float clip = rec[REC_CLIP];
  // The step's scalars come from the record too (the host writes them with the batch), so a
  // replayed graph updates with its own step's learning rate and bias correction.
  const float step_size = rec[REC_STEP_SIZE], inv_sqrt_bc2 = rec[REC_INV_SQRT_BC2], decay = rec[REC_DECAY];
  const uint32_t* decayed = mask + runs + 1;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  // The first element's run by binary search; a thread's later elements lie one grid stride
  // further each, so its run only moves forward, mostly not at all: one comparison per
  // element, not a search (7 dependent loads at ~70 runs).
  int r = run_of(mask, runs, i);
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    while (r + 1 < runs && mask[r + 1] <= i) ++r;
    const float d = decayed[r] ? decay : 1.0f;
    adamw_element(p, g, m, v, i, beta1, beta2, eps, step_size, inv_sqrt_bc2, d, clip);
  }
}

// out[0] = Σ partial / divisor, summed in f64 by one warp (lane-strided, then a shuffle tree):
// the device's finish of what the host used to add up after a download.
// The divisor is `divisor`, or the count a kernel left on the device at `divisor_at` (the
// cross-entropy's rows that have a target), at least 1.
__device__ void sum_finish(const float* partial, int n, size_t divisor, const float* divisor_at, float* out) {
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += 32) s += (double)partial[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  const double d = divisor_at ? fmax((double)*divisor_at, 1.0) : (double)divisor;
  if (threadIdx.x == 0) out[0] = (float)(s / d);
}

// The CPU's step::guard, operation for operation (explicit _rn: no contraction into FMA); then
// the record is appended to the ring of records the host has not read (state[STATE_ROWS] rows).
__device__ void step_guard(float* rec, float* state, float* ring, int ring_rows, float label_weight,
                           float context_weight, float clip_norm) {
  float* halted = state + STATE_HALTED;
  const float labels = __fmul_rn(label_weight, __fadd_rn(rec[REC_IMAGE_LABEL], rec[REC_TEXT_LABEL]));
  const float contexts = __fmul_rn(context_weight, __fadd_rn(rec[REC_IMAGE_CONTEXT], rec[REC_TEXT_CONTEXT]));
  const float loss = __fadd_rn(__fadd_rn(labels, contexts), rec[REC_CONSISTENCY]);
  const float norm = (float)sqrt((double)rec[REC_SUM_SQUARES]);
  unsigned status = 0;
  for (int i = 0; i < 5; ++i)
    if (!isfinite(rec[i])) status |= 1u << i;
  if (!isfinite(norm)) status |= NORM_BIT;
  if (*halted != 0.0f) status |= HALTED_BIT;
  else if (status != 0) *halted = 1.0f;
  float clip = 1.0f;
  if (status != 0) clip = 0.0f;
  else if (clip_norm > 0.0f && norm > clip_norm) clip = __fdiv_rn(clip_norm, norm);
  rec[REC_LOSS] = loss;
  rec[REC_GRAD_NORM] = norm;
  rec[REC_CLIP] = clip;
  rec[REC_STATUS] = (float)status;
  const int row = (int)state[STATE_ROWS];
  if (row < ring_rows) {
    for (int i = 0; i < REC_LEN; ++i) ring[row * REC_LEN + i] = rec[i];
    state[STATE_ROWS] = (float)(row + 1);
  }
}

// partial[block] = Σ x² over this block's grid-stride share (f32); the host adds in f64.
template <typename T> __device__ void sum_squares(const T* x, size_t n, float* partial) {
  __shared__ float scratch[32];
  float s = 0.0f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f32(x[i]);
    s += v * v;
  }
  s = common::block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
}  // namespace optim

extern "C" __global__ void adamw_fwd_f32(float* p, const float* g, float* m, float* v, size_t n, float beta1,
                                         float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay,
                                         float grad_scale) {
  optim::adamw(p, g, m, v, n, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
}
extern "C" __global__ void adamw_masked_fwd_f32(float* p, const float* g, float* m, float* v, size_t n,
                                                const uint32_t* mask, int runs, float beta1, float beta2, float eps,
                                                const float* rec) {
  optim::adamw_masked(p, g, m, v, n, mask, runs, beta1, beta2, eps, rec);
}
// Launch: one warp.
extern "C" __global__ void sum_finish_f32(const float* partial, int n, size_t divisor, const float* divisor_at,
                                          float* out) {
  optim::sum_finish(partial, n, divisor, divisor_at, out);
}
// Launch: one thread.
extern "C" __global__ void step_guard_f32(float* rec, float* state, float* ring, int ring_rows, float label_weight,
                                          float context_weight, float clip_norm) {
  optim::step_guard(rec, state, ring, ring_rows, label_weight, context_weight, clip_norm);
}
extern "C" __global__ void sum_squares_fwd_f32(const float* x, size_t n, float* partial) {
  optim::sum_squares<float>(x, n, partial);
}
extern "C" __global__ void sum_squares_fwd_bf16(const __nv_bfloat16* x, size_t n, float* partial) {
  optim::sum_squares<__nv_bfloat16>(x, n, partial);
}
