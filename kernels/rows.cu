// kernels/rows.cu — row ops: embedding gather / scatter-add, [MASK] row set and its backward,
// segment mean pooling, L2 row normalisation, table rows per segment (position encodings).
// Layout: row-major [rows, cols]; index data u32; segments as u32 offsets [items + 1].
// CPU twins: src/backend/cpu/elementwise.rs, src/backend/cpu/positions.rs.
// Tests: tests/gpu_ops.rs, tests/gpu_step.rs (positions).
#include "common.cuh"

namespace rows {
using common::from_f32;
using common::to_f32;

// out[i, :] = table[ids[i], :]; one thread per output element, consecutive threads on
// consecutive columns so each row read is coalesced.
template <typename T>
__device__ void gather(const T* table, const uint32_t* ids, int n, int cols, T* out) {
  const size_t total = (size_t)n * cols;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    const size_t i = e / cols, c = e % cols;
    out[e] = table[(size_t)ids[i] * cols + c];
  }
}

// dtable[ids[i], :] += dy[i, :], rows added in order for each id, so repeated ids (the [MASK]
// token, an object class) add up in the same order on every run and on the CPU: bit for bit
// its twin. Float atomics made the order the scheduler's, and a replayed step then differed
// from its eager run in the last bits.
// Version 1, one thread per column walking all n rows, took 0.81 ms for 4096 x 300 on an
// H200 (2026-12-04; 2.4 ms of a 22 ms paper step, three calls): 300 threads in flight, each a
// chain of n dependent load-add-stores. Version 2: blockIdx.y owns the ids of one residue mod
// gridDim.y (a power of two), so the blocks of one column stripe touch disjoint dtable rows
// and need no order between them; each thread walked every id and added its own ids' rows one
// at a time, a memory latency each (184 µs a call in the bf16 paper step, 3.7 % of it: the
// [MASK] token's hundreds of rows fall in one residue).
// Version 3 (this): the residues as in version 2; the block stages the ids in shared memory
// a tile at a time, and each warp (32 columns) finds its residue's rows 32 ids at a time with
// one ballot, queues them in shared memory, and adds them SCATTER_BATCH at a time: the batch's
// dy and dtable values loaded at once, then summed in row order (a row whose id came earlier
// in the batch adds to that one's sum, held in a register), then stored. The same sums in the
// same order: the same bits.
#define SCATTER_TILE 1024
#define SCATTER_BATCH 16
#define SCATTER_WARPS 8

// dtable[q_id[b], :] += dy[q_row[b], :] for the queued rows b < m, in queue order, column c.
template <typename T>
__device__ __forceinline__ void scatter_batch(const T* dy, int cols, float* dtable, int c, const uint32_t* q_row,
                                              const uint32_t* q_id, int m) {
  if (c >= cols) return;
  uint32_t id[SCATTER_BATCH];
  float v[SCATTER_BATCH], sum[SCATTER_BATCH];
#pragma unroll
  for (int b = 0; b < SCATTER_BATCH; ++b)
    if (b < m) {
      id[b] = q_id[b];
      v[b] = to_f32(dy[(size_t)q_row[b] * cols + c]);
      sum[b] = dtable[(size_t)id[b] * cols + c];
    }
#pragma unroll
  for (int b = 0; b < SCATTER_BATCH; ++b)
    if (b < m) {
      float base = sum[b];
#pragma unroll
      for (int e = 0; e < b; ++e)
        if (id[e] == id[b]) base = sum[e];  // the latest earlier row of this id
      sum[b] = base + v[b];
    }
#pragma unroll
  for (int b = 0; b < SCATTER_BATCH; ++b)
    if (b < m) dtable[(size_t)id[b] * cols + c] = sum[b];  // a repeated id: the last store wins
}

template <typename T>
__device__ void scatter_add(const T* dy, const uint32_t* ids, int n, int cols, float* dtable) {
  __shared__ uint32_t tile[SCATTER_TILE];
  __shared__ uint32_t q_row[SCATTER_WARPS][SCATTER_BATCH], q_id[SCATTER_WARPS][SCATTER_BATCH];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int first = (blockIdx.x * SCATTER_WARPS + warp) * 32, c = first + lane;
  const uint32_t mask = gridDim.y - 1, part = blockIdx.y;
  int queued = 0;  // the same in every lane of the warp
  for (int t0 = 0; t0 < n; t0 += SCATTER_TILE) {
    const int len = min(SCATTER_TILE, n - t0);
    __syncthreads();  // the last tile was read
    for (int k = warp * 32 + lane; k < len; k += 32 * SCATTER_WARPS) tile[k] = ids[t0 + k];
    __syncthreads();
    if (first >= cols) continue;  // a warp past the columns only helps stage the ids
    for (int k0 = 0; k0 < len; k0 += 32) {
      const bool valid = k0 + lane < len;
      const uint32_t id = valid ? tile[k0 + lane] : 0u;
      unsigned bits = __ballot_sync(0xffffffffu, valid && (id & mask) == part);
      while (bits != 0u) {
        const int take = min(__popc(bits), SCATTER_BATCH - queued);
        const int rank = __popc(bits & ((1u << lane) - 1u));
        if ((bits >> lane & 1u) && rank < take) {
          q_row[warp][queued + rank] = t0 + k0 + lane;
          q_id[warp][queued + rank] = id;
        }
        __syncwarp();
        for (int t = 0; t < take; ++t) bits &= bits - 1u;
        queued += take;
        if (queued == SCATTER_BATCH) {
          scatter_batch(dy, cols, dtable, c, q_row[warp], q_id[warp], queued);
          __syncwarp();  // the queue is read before it is refilled
          queued = 0;
        }
      }
    }
  }
  if (first < cols && queued > 0) scatter_batch(dy, cols, dtable, c, q_row[warp], q_id[warp], queued);
}

template <typename T>
__device__ void set_rows(T* x, const uint32_t* rows, int n, int cols, const T* value) {
  const size_t total = (size_t)n * cols;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    const size_t i = e / cols, c = e % cols;
    x[(size_t)rows[i] * cols + c] = value[c];
  }
}

// dvalue += Σ_i dx[rows[i], :], then those rows are zeroed. One thread per column walks the
// row list in order: deterministic, and a repeated row contributes once (its second visit
// reads the zero the first wrote), exactly as the CPU loop.
// The rows SET_ROWS_BATCH at a time: a batch's values loaded before its zeros are stored (a
// repeat inside the batch takes the zero its first visit will write). Loading and zeroing one
// row at a time waited a memory latency a row, each load behind the store before it: 190 µs
// for one call in an H200's bf16 paper step (2026-12-04, ncu), with a few hundred masked rows
// and one thread per column. The same sum in the same order.
#define SET_ROWS_BATCH 8
template <typename T>
__device__ void set_rows_bwd(T* dx, const uint32_t* rows, int n, int cols, float* dvalue) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f;
  for (int i0 = 0; i0 < n; i0 += SET_ROWS_BATCH) {
    uint32_t r[SET_ROWS_BATCH];
    float v[SET_ROWS_BATCH];
#pragma unroll
    for (int j = 0; j < SET_ROWS_BATCH; ++j)
      if (i0 + j < n) {
        r[j] = rows[i0 + j];
        v[j] = to_f32(dx[(size_t)r[j] * cols + c]);
#pragma unroll
        for (int k = 0; k < j; ++k)
          if (r[k] == r[j]) v[j] = 0.0f;
      }
#pragma unroll
    for (int j = 0; j < SET_ROWS_BATCH; ++j)
      if (i0 + j < n) {
        s += v[j];
        dx[(size_t)r[j] * cols + c] = from_f32<T>(0.0f);
      }
  }
  dvalue[c] += s;
}

// y[b, c] = mean over item b's rows of x[r, c]; grid (column blocks, items). Sum then scale by
// 1/len, in row order, as the CPU does.
// Grid-stride over items (grid y) and columns (grid x): the host caps grid y at the hardware's
// 65,535 and grid x at blocks(), so any number of items and any width is covered.
template <typename T>
__device__ void segment_mean_fwd(const T* x, const uint32_t* offsets, int items, int cols, T* y) {
  for (int b = blockIdx.y; b < items; b += gridDim.y) {
    const uint32_t s = offsets[b], e = offsets[b + 1];
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      float acc = 0.0f;
      for (uint32_t r = s; r < e; ++r) acc += to_f32(x[(size_t)r * cols + c]);
      y[(size_t)b * cols + c] = from_f32<T>(acc * (1.0f / (float)(e - s)));
    }
  }
}

template <typename T>
__device__ void segment_mean_bwd(const T* dy, const uint32_t* offsets, int items, int cols, T* dx) {
  for (int b = blockIdx.y; b < items; b += gridDim.y) {
    const uint32_t s = offsets[b], e = offsets[b + 1];
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      const float g = to_f32(dy[(size_t)b * cols + c]) * (1.0f / (float)(e - s));
      for (uint32_t r = s; r < e; ++r) dx[(size_t)r * cols + c] = from_f32<T>(g);
    }
  }
}

// out[offsets[b] + t, :] = table[t, :] for every row t of item b (a value per position: ψ2 of the
// position encodings).
template <typename T>
__device__ void segment_rows(const float* table, const uint32_t* offsets, int items, int cols, T* out) {
  for (int b = blockIdx.y; b < items; b += gridDim.y) {
    const uint32_t s = offsets[b], e = offsets[b + 1];
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
      for (uint32_t r = s; r < e; ++r) out[(size_t)r * cols + c] = from_f32<T>(table[(size_t)(r - s) * cols + c]);
  }
}

// Its backward: dtable[t, c] = the sum of dy[offsets[b] + t, c] over the items b that have a row t,
// items in order (the CPU twin's order: the same bits), 0 where none has. One thread per (t, c).
__device__ void segment_rows_bwd(const float* dy, const uint32_t* offsets, int items, int rows, int cols,
                                 float* dtable) {
  for (int t = blockIdx.y; t < rows; t += gridDim.y)
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      float acc = 0.0f;
      for (int b = 0; b < items; ++b) {
        const uint32_t s = offsets[b];
        if ((uint32_t)t < offsets[b + 1] - s) acc += dy[(size_t)(s + t) * cols + c];
      }
      dtable[(size_t)t * cols + c] = acc;
    }
}

// One warp per row: the squared norm is a warp butterfly sum; a zero row stays zero.
// Division (not a reciprocal multiply) as in the CPU twin.
template <typename T> __device__ void l2norm(T* x, int rows, int cols) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  T* p = x + (size_t)row * cols;
  float s = 0.0f;
  for (int c = lane; c < cols; c += 32) {
    const float v = to_f32(p[c]);
    s += v * v;
  }
  const float n = sqrtf(common::warp_sum(s));
  if (n > 0.0f)
    for (int c = lane; c < cols; c += 32) p[c] = from_f32<T>(to_f32(p[c]) / n);
}
}  // namespace rows

#define ROWS_ENTRY(T, SUF)                                                                                     \
  extern "C" __global__ void gather_rows_fwd_##SUF(const T* table, const uint32_t* ids, int n, int cols, T* out) { \
    rows::gather<T>(table, ids, n, cols, out);                                                                 \
  }                                                                                                            \
  extern "C" __global__ void scatter_add_rows_bwd_##SUF(const T* dy, const uint32_t* ids, int n, int cols,      \
                                                        float* dtable) {                                       \
    rows::scatter_add<T>(dy, ids, n, cols, dtable);                                                            \
  }                                                                                                            \
  extern "C" __global__ void set_rows_fwd_##SUF(T* x, const uint32_t* r, int n, int cols, const T* value) {    \
    rows::set_rows<T>(x, r, n, cols, value);                                                                   \
  }                                                                                                            \
  extern "C" __global__ void set_rows_bwd_##SUF(T* dx, const uint32_t* r, int n, int cols, float* dvalue) {    \
    rows::set_rows_bwd<T>(dx, r, n, cols, dvalue);                                                             \
  }                                                                                                            \
  extern "C" __global__ void segment_mean_fwd_##SUF(const T* x, const uint32_t* off, int items, int cols, T* y) { \
    rows::segment_mean_fwd<T>(x, off, items, cols, y);                                                         \
  }                                                                                                            \
  extern "C" __global__ void segment_mean_bwd_##SUF(const T* dy, const uint32_t* off, int items, int cols,      \
                                                    T* dx) {                                                   \
    rows::segment_mean_bwd<T>(dy, off, items, cols, dx);                                                       \
  }                                                                                                            \
  extern "C" __global__ void segment_rows_fwd_##SUF(const float* table, const uint32_t* off, int items, int cols, \
                                                    T* out) {                                                  \
    rows::segment_rows<T>(table, off, items, cols, out);                                                       \
  }                                                                                                            \
  extern "C" __global__ void l2norm_fwd_##SUF(T* x, int rows, int cols) { rows::l2norm<T>(x, rows, cols); }

ROWS_ENTRY(float, f32)
ROWS_ENTRY(__nv_bfloat16, bf16)

extern "C" __global__ void segment_rows_bwd_f32(const float* dy, const uint32_t* off, int items, int rows, int cols,
                                                float* dtable) {
  rows::segment_rows_bwd(dy, off, items, rows, cols, dtable);
}
