// kernels/gru_persistent.cu — a Bi-GRU's whole recurrence, both directions, in one cooperative
// launch per pass (forward, backward), in place of 2 launches per step and direction (a cuBLAS
// GEMM for W_hh·h and gru.cu's gate kernel): 4·T launches → 1 each way.
//
// Why: per step the work is small (B 128, H 512: [128 × 512]·[512 × 1536], 0.2 GFLOP) and the
// step-by-step path pays a launch and a re-read of W_hh (3 MB) per step and direction. Here
// the grid stays resident: blockIdx.y is the direction, blockIdx.x owns `units` hidden units
// of it and keeps their slice of W_hh in shared memory for every step (read from device memory
// once), and the blocks meet at a grid-wide barrier once per step, because step s + 1 needs
// every unit of h_{s+1}.
//
// Forward, per step s: h_s (all items, from L2, `chunk` items at a time) into shared memory;
// thread (item, unit) forms its unit's three rows of hproj = W_hh·h_s as dot products against
// the shared W_hh rows, applies gru.cuh's gate equations (b_hh added there), writes h_{s+1},
// its output column and its saved gates; then the barrier.
// Backward, per step s from the last: phase 1, thread (item, unit) turns d = dh + dout into
// the pre-activation gradients (dxproj, this step's dhproj) and leaves d·z in dh; barrier;
// phase 2, dh[item, unit] += Σ_j dhproj_s[item, j]·W_hh[j, unit] over all 3H rows j, from
// this block's column slice of W_hh in shared memory. Phase 1 of step s − 1 writes other rows
// of dhproj and reads only this block's units of dh, so one barrier per step suffices.
// The buffers are the step-by-step path's (gru.cu's header): the same hs, gates, dhproj rows,
// so the W_hh weight gradient stays one GEMM over all steps afterwards.
//
// Numerics: each dot product is summed in k order in f32 (cuBLAS sums in its own order), so
// the result matches the step-by-step path and the CPU twin to rounding, not bit for bit.
// With `bf16` set (`--precision bf16` and at least Precision::MIN_ROWS items, the rule of the
// GEMMs it replaces) both operands are rounded to bf16 as they are staged in shared memory, as
// cuBLAS's FAST_16BF GEMM and the CPU's bf16 kernel round them; sums stay f32.
// CPU twin: src/backend/cpu/gru.rs (recurrence_fwd / recurrence_bwd); test: tests/gpu_gru.rs.
// Shared memory, in rows of `ld` floats (the row rounded up to float4s, then to an odd count of
// them, `row_stride4`: the 8 lanes of a quarter warp that read 8 rows at once hit 8 different
// bank groups): forward 3·units rows of W_hh + chunk rows of h_s; backward units rows of W_hhᵀ
// (the block's columns of W_hh) + chunk rows of dhproj_s. The dot products read float4s.
// Launch (src/backend/cuda/gru.rs): grid (ceil(H / units), 2) ≤ the multiprocessor count, one
// block per multiprocessor, block = units·chunk threads ≤ 512, as a cooperative launch (the
// driver refuses a grid that cannot be resident at once, so the barrier cannot deadlock).
// `barrier` is grid_sync.cuh's two words (`Cuda::grid_barrier`).
#include "common.cuh"
#include "grid_sync.cuh"
#include "gru.cuh"

namespace gru_persistent {
using grid::grid_sync;
using gru::step_row;

// Row stride in float4s for rows of `cols` floats: rounded up to whole float4s (the tail
// zero), then to an odd count, so that the 8 lanes of a quarter warp reading 8 different rows
// at once hit 8 different 16-byte bank groups.
__device__ __forceinline__ int row_stride4(int cols) { return ((cols + 3) / 4) | 1; }

// Rows [c0, c0 + n) of a row-major [*, cols] global matrix into shared rows of `ld` floats,
// through L2 only (another block wrote them since this kernel began: L1 may hold stale lines).
// Rounded to bf16 when `bf16` is set (the GEMM operands' precision, above).
__device__ __forceinline__ void stage_rows(float* dst, int ld, const float* src, int c0, int n, int cols, int bf16) {
  for (int e = threadIdx.x; e < n * cols; e += blockDim.x) {
    const int r = e / cols, k = e - r * cols;
    const float v = __ldcg(src + (size_t)(c0 + r) * cols + k);
    dst[r * ld + k] = bf16 ? common::bf16_round(v) : v;
  }
}

// Zeroes columns cols .. 4·ceil(cols / 4) of `rows` shared rows: the float4 loops read them.
__device__ __forceinline__ void zero_tails(float* dst, int ld, int rows, int cols) {
  const int pad = (4 - cols % 4) % 4;
  for (int e = threadIdx.x; e < rows * pad; e += blockDim.x) dst[(e / pad) * ld + cols + e % pad] = 0.0f;
}

}  // namespace gru_persistent

// Both directions' forward recurrences: direction d reads xproj_d [tokens, 3H], w_d [3H, H],
// b_d [3H], writes hs_d [(steps + 1)·items, H] (h_0 set by the caller), gates_d
// [steps·items, 4H] and columns d·H.. of out [tokens, out_cols].
extern "C" __global__ void __launch_bounds__(512, 1)  // one block per multiprocessor: the grid is resident
    gru_fwd_persistent_f32(const float* xproj0, const float* xproj1, const float* w0, const float* w1,
                           const float* b0, const float* b1, float* hs0, float* hs1, float* gates0, float* gates1,
                           float* out, const uint32_t* offsets, unsigned* barrier, int items, int H, int steps,
                           int out_cols, int units, int chunk, int bf16) {
  using namespace gru_persistent;
  const int dir = blockIdx.y;
  const float* xproj = dir ? xproj1 : xproj0;
  const float* w = dir ? w1 : w0;
  const float* bias = dir ? b1 : b0;
  float* hs = dir ? hs1 : hs0;
  float* gates = dir ? gates1 : gates0;
  const int ld4 = row_stride4(H), ld = 4 * ld4, k4s = (H + 3) / 4;
  extern __shared__ float4 gru_smem[];
  float* ws = (float*)gru_smem;  // [3][units][ld]: W_hh rows g·H + u0 + ul
  float* hsm = ws + 3 * units * ld;   // [chunk][ld]: h_s of `chunk` items
  const int u0 = blockIdx.x * units, own = min(units, H - u0);
  for (int e = threadIdx.x; e < 3 * own * H; e += blockDim.x) {
    const int r = e / H, k = e - r * H, g = r / own, ul = r - g * own;
    const float v = w[((size_t)g * H + u0 + ul) * H + k];
    ws[(g * units + ul) * ld + k] = bf16 ? common::bf16_round(v) : v;
  }
  zero_tails(ws, ld, 3 * units, H);
  zero_tails(hsm, ld, chunk, H);
  const int ul = threadIdx.x % units, bl = threadIdx.x / units, u = u0 + ul;
  const bool mine = ul < own && bl < chunk;
  float b_r = 0.0f, b_z = 0.0f, b_n = 0.0f;
  if (mine) b_r = bias[u], b_z = bias[H + u], b_n = bias[2 * H + u];
  const float4* wr = (const float4*)(ws + ul * ld);
  const float4* wz = (const float4*)(ws + (units + ul) * ld);
  const float4* wn = (const float4*)(ws + (2 * units + ul) * ld);
  const size_t n = (size_t)items * H;
  for (int s = 0; s < steps; ++s) {
    const float* h = hs + (size_t)s * n;
    float* h_next = hs + (size_t)(s + 1) * n;
    float* gs = gates + (size_t)s * items * 4 * H;
    for (int c0 = 0; c0 < items; c0 += chunk) {
      const int rows = min(chunk, items - c0);
      __syncthreads();  // the previous chunk's reads of hsm (and, at first, the W_hh slice) are done
      stage_rows(hsm, ld, h, c0, rows, H, bf16);
      __syncthreads();
      if (!mine || bl >= rows) continue;
      const int b = c0 + bl;
      const float* hv = hsm + bl * ld;
      float* g = gs + (size_t)b * 4 * H;
      const long long row = step_row(offsets, b, s, dir);
      // The state itself, not its bf16-rounded copy: only the product W_hh·h is a GEMM's.
      if (row < 0) {
        g[u] = g[H + u] = g[2 * H + u] = g[3 * H + u] = 0.0f;
        h_next[(size_t)b * H + u] = bf16 ? __ldcg(h + (size_t)b * H + u) : hv[u];
        continue;
      }
      float a_r = 0.0f, a_z = 0.0f, a_n = 0.0f;
      const float4* hv4 = (const float4*)hv;
      for (int k4 = 0; k4 < k4s; ++k4) {  // k in order, 4 at a time (the tail reads zeros)
        const float4 x = hv4[k4], r = wr[k4], z = wz[k4], n = wn[k4];
        a_r = fmaf(r.w, x.w, fmaf(r.z, x.z, fmaf(r.y, x.y, fmaf(r.x, x.x, a_r))));
        a_z = fmaf(z.w, x.w, fmaf(z.z, x.z, fmaf(z.y, x.y, fmaf(z.x, x.x, a_z))));
        a_n = fmaf(n.w, x.w, fmaf(n.z, x.z, fmaf(n.y, x.y, fmaf(n.x, x.x, a_n))));
      }
      const float* x = xproj + (size_t)row * 3 * H;
      const gru::Gates o = gru::gates_fwd(x[u], x[H + u], x[2 * H + u], a_r, a_z, a_n, b_r, b_z, b_n, bf16 ? __ldcg(h + (size_t)b * H + u) : hv[u]);
      h_next[(size_t)b * H + u] = o.h_next;
      out[(size_t)row * out_cols + (size_t)dir * H + u] = o.h_next;
      g[u] = o.r;
      g[H + u] = o.z;
      g[2 * H + u] = o.n;
      g[3 * H + u] = o.h_n;
    }
    if (s + 1 < steps) grid_sync(barrier);
  }
}

// Both directions' backward recurrences over dout [tokens, out_cols] (direction d's columns
// d·H..): reads the forward's gates_d and hs_d and w_d; dh_d [items, H] holds dL/dh_T on entry
// (zero) and dL/dh_0 on return; writes dxproj_d [tokens, 3H] rows of active items and every
// row of dhproj_d [steps·items, 3H].
extern "C" __global__ void __launch_bounds__(512, 1)  // one block per multiprocessor: the grid is resident
    gru_bwd_persistent_f32(const float* gates0, const float* gates1, const float* hs0, const float* hs1,
                           const float* dout, float* dh0, float* dh1, float* dxproj0, float* dxproj1, float* dhproj0,
                           float* dhproj1, const float* w0, const float* w1, const uint32_t* offsets,
                           unsigned* barrier, int items, int H, int steps, int out_cols, int units, int chunk,
                           int bf16) {
  using namespace gru_persistent;
  const int dir = blockIdx.y;
  const float* gates = dir ? gates1 : gates0;
  const float* hs = dir ? hs1 : hs0;
  const float* w = dir ? w1 : w0;
  float* dh = dir ? dh1 : dh0;
  float* dxproj = dir ? dxproj1 : dxproj0;
  float* dhproj = dir ? dhproj1 : dhproj0;
  const int ld4 = row_stride4(3 * H), ld = 4 * ld4, j4s = (3 * H + 3) / 4;
  extern __shared__ float4 gru_smem[];
  float* wc = (float*)gru_smem;  // [units][ld]: W_hh column u0 + ul as a row
  float* dsm = wc + units * ld;       // [chunk][ld]: dhproj_s of `chunk` items
  const int u0 = blockIdx.x * units, own = min(units, H - u0);
  for (int e = threadIdx.x; e < 3 * H * own; e += blockDim.x) {
    const int j = e / own, ul = e - j * own;
    const float v = w[(size_t)j * H + u0 + ul];
    wc[ul * ld + j] = bf16 ? common::bf16_round(v) : v;
  }
  zero_tails(wc, ld, units, 3 * H);
  zero_tails(dsm, ld, chunk, 3 * H);
  const int ul = threadIdx.x % units, bl = threadIdx.x / units, u = u0 + ul;
  const bool mine = ul < own && bl < chunk;
  const size_t n = (size_t)items * H;
  for (int s = steps - 1; s >= 0; --s) {
    const float* h_prev = hs + (size_t)s * n;
    const float* gs = gates + (size_t)s * items * 4 * H;
    float* dps = dhproj + (size_t)s * items * 3 * H;
    // Phase 1: this block's units of every item.
    for (int b = bl; mine && b < items; b += chunk) {
      float* dhp = dps + (size_t)b * 3 * H;
      const long long row = step_row(offsets, b, s, dir);
      if (row < 0) {
        dhp[u] = dhp[H + u] = dhp[2 * H + u] = 0.0f;
        continue;
      }
      const float* g = gs + (size_t)b * 4 * H;
      const float d = dh[(size_t)b * H + u] + dout[(size_t)row * out_cols + (size_t)dir * H + u];
      const gru::GateGrads o = gru::gates_bwd(d, g[u], g[H + u], g[2 * H + u], g[3 * H + u], h_prev[(size_t)b * H + u]);
      float* dx = dxproj + (size_t)row * 3 * H;
      dx[u] = o.da_r;
      dx[H + u] = o.da_z;
      dx[2 * H + u] = o.da_n;
      dhp[u] = o.da_r;
      dhp[H + u] = o.da_z;
      dhp[2 * H + u] = o.dh_n;
      dh[(size_t)b * H + u] = o.dh_bypass;
    }
    grid_sync(barrier);
    // Phase 2: dh += dhproj_s · W_hh for this block's units (the same (item, unit) per thread
    // as phase 1, so each dh word stays with one thread).
    for (int c0 = 0; c0 < items; c0 += chunk) {
      const int rows = min(chunk, items - c0);
      __syncthreads();
      stage_rows(dsm, ld, dps, c0, rows, 3 * H, bf16);
      __syncthreads();
      if (!mine || bl >= rows) continue;
      const float4* dv = (const float4*)(dsm + bl * ld);
      const float4* wv = (const float4*)(wc + ul * ld);
      float acc = 0.0f;
      for (int j4 = 0; j4 < j4s; ++j4) {  // j in order, 4 at a time (the tail reads zeros)
        const float4 d = dv[j4], c = wv[j4];
        acc = fmaf(d.w, c.w, fmaf(d.z, c.z, fmaf(d.y, c.y, fmaf(d.x, c.x, acc))));
      }
      dh[(size_t)(c0 + bl) * H + u] += acc;
    }
  }
}
