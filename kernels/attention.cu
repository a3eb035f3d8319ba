// kernels/attention.cu — fused multi-head self-attention on packed variable-length sequences,
// forward and backward, for short sequences (len <= 64) and head dim <= 128.
// Layout: qkv [tokens, 3d] row-major = (q | k | v), head h owns columns h·dh..(h+1)·dh of each
// part; item b owns rows offsets[b]..offsets[b+1] (packing is the key-padding mask: every key of
// an item is valid, no other item's row is visible). probs: per item then head, len × len,
// packed (item b starts at heads · Σ_{b'<b} len_b'²): the CPU twin's layout.
// Launch: one block per (item, head), blockIdx.x = item · heads + head; blockDim.x and the dynamic
// shared memory come from the batch's longest item (src/backend/cuda/attention.rs).
// CPU twin: src/backend/cpu/attention.rs::{forward, backward} (and bias_bwd of dqkv for the bias
// gradient). Test: tests/gpu_attention.rs.
// Two versions: version 1 (below, `fwd`, `bwd`) computes in f32 on the FMA units, for f32
// storage; version 2 (`fwd_mma`, `bwd_mma`, after them) multiplies bf16 storage on the tensor
// cores (mma.sync m16n8k16), a warp per 16 rows.
//
// Why one block holds everything: at len 36 a head's Q, K, V are 55 KB and the score matrix
// 5 KB, so the whole problem of an (item, head) fits on chip; each input is read from device
// memory once and each output written once, with no len×len intermediate in device memory except
// the probabilities the backward pass needs anyway. No atomics: a block owns its output rows and
// columns outright, so results do not depend on scheduling.
//
// Shared memory (floats; storage type T is converted to f32 on load):
//   Lp = len rounded up to 4, DS = dh rounded up to 4, + 4 (row pad: consecutive rows fall on
//   consecutive 16-byte bank groups, so the float4 reads of eight different rows in a quarter
//   warp do not conflict), LS = Lp + 4 (score rows, float4-aligned).
//   fwd: Q, K, V [Lp][DS] + S/P [Lp][LS]                 len 36, dh 128: 62.8 KB; len 64: 118.8 KB
//   bwd: Q, K, V, dO [Lp][DS] + P, dP/dS [Lp][LS]        len 36, dh 128: 87.6 KB; len 64: 170.0 KB
//   (sm_80 allows 163 KB per block: the host refuses len > 60 at dh 128 there, with an error.)
//   Pad rows and columns are zero-filled, so the products run over whole float4 groups without
//   bounds checks and padding contributes exact zeros.
// Threads: blockDim.x = 32 · ceil((Lp/4) · (DS_compute/4) / 32), at most 512: one thread per
//   4×4 output tile of the [len, dh] products (P·V, dS·K, Pᵀ·dO, dSᵀ·Q). The [len, len] products
//   (Q·Kᵀ, dO·Vᵀ) use 4×4 tiles too, split over the inner dimension across 2–8 adjacent lanes
//   (summed with shuffles) so the block's threads stay busy at len 36 (81 tiles).
// Arithmetic: f32 FFMA throughout (tensor cores would need TF32 and miss the 1e-5 check against
//   the CPU), softmax in f32 with the row max subtracted, same operation order as the CPU twin.
//
// The backward also sums the qkv projection's bias gradient when asked (bias_grad below): each
// block re-reads the dqkv piece it just wrote (from the cache) instead of a column sum reading
// all of dqkv again after the kernel (3 passes over a [tokens, d] tensor, 56.6 MB at this size).
// Floors at (128 items, 8 heads, len 36, dh 128), f32: fwd reads qkv 56.6 MB, writes out 18.9 MB
// and probs 5.3 MB; bwd reads qkv, probs, dout (80.8 MB) and writes dqkv (56.6 MB): 218 MB in all,
// 73 µs at 2.97 TB/s. FLOPs: 2.0 G (0.68 fwd + 1.36 bwd), 40 µs at 50.5 TFLOP/s. Target ≤ 247 µs
// (half of PyTorch SDPA's 0.495 ms). Measured: owed to the first H100 run.
// Prediction (to check against that run): fwd 35–50 µs, bwd 60–90 µs, fwd+bwd 100–140 µs. The
// products are bound by shared-memory wavefronts, not FFMA: gemm_nt issues 8 LDS.128 per 64 FFMA
// per thread and its K/V reads are 2-way bank-conflicted when ks = 2 (rows 528 B apart, chunks
// interleaved by 16 B); gemm_nn is near balanced (broadcast A, one LDS.128 of B per 16 FFMA).
// Occupancy at len 36: fwd 3 blocks/SM (smem), bwd 2 (smem 87.6 KB). Leads if it misses, in
// order: (1) row pad chosen per ks (pad 8 floats for ks 2 makes gemm_nt conflict-free at
// dh 128), (2) 4×8 tiles in gemm_nt, (3) bwd under 75 KB (Q, K loaded into V, dO's slots after
// dP) for 3 blocks/SM. Verified without a GPU by tools/kernel-emu/run.sh (a CPU emulation).
//
// ptxas (nvcc 13.0.88, -O3 -Xptxas -v; no spills, 0-byte stack frame, no LDL/STL in the SASS):
//   attention_fwd_f32  sm_90: 64 registers (capped by __launch_bounds__(512, 2), so three
//                      288-thread blocks fit an SM at len 36), 128 B static smem + dynamic
//                      sm_80: 64 registers, 128 B static smem + dynamic
//   attention_bwd_f32  sm_90: 96 registers, 144 B static smem + dynamic (smem allows 2 blocks
//                      per SM at len 36 anyway); sm_80: 98 registers, same. (110 before the qkv
//                      bias gradient was added; inlined inside bwd() it took 116, which at 288
//                      threads would have left one block per SM, so it runs after bwd() returns,
//                      from the kernel's parameters, holding none of bwd()'s registers.)
//   the _bf16 entries  (session 17, rows loaded 4 values per 8-byte load and stored 4 per
//                      8-byte write): fwd 64 registers, bwd 96, on sm_80 and sm_90; the f32
//                      entries in that build: fwd 64, bwd 98 on both.
#include "common.cuh"

namespace attention {
using common::bf16_pair;
using common::bf16_round;
using common::from_f32;
using common::load4;
using common::store4;
using common::to_f32;
using common::warp_max;
using common::warp_sum;

// Limits the host enforces (src/backend/cuda/attention.rs): len <= 64, dh <= 128, so at most
// (64/4)·(128/4) = 512 tiles, one per thread.
constexpr int MAX_THREADS = 512;

__device__ __forceinline__ int round4(int x) { return (x + 3) & ~3; }

// 16-byte global -> shared copy that bypasses registers and L1 (sm_80+), so a thread can have
// all of its share of Q, K, V in flight at once.
__device__ __forceinline__ void cp_async16(float* smem, const float* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Geometry of one (item, head) problem, the same in every thread.
struct Shape {
  int len, lp;  // rows, rows rounded up to 4
  int dh, dp;   // head dim, rounded up to 4
  int ds, ls;   // row strides (floats) of the [Lp][DS] and [Lp][LS] shared arrays
};

__device__ __forceinline__ Shape make_shape(int len, int dh) {
  Shape s;
  s.len = len;
  s.lp = round4(len);
  s.dh = dh;
  s.dp = round4(dh);
  s.ds = s.dp + 4;
  s.ls = s.lp + 4;
  return s;
}

// sm[r][c] = g[r · stride + c] for r < len, c < dh; zero for the pad rows (r < Lp) and pad
// columns (c < DP). `vec` (dh % 4 == 0, so no pad columns; stride and base aligned to 4
// elements): f32 rows by 16-byte asynchronous copies, bf16 rows by 8-byte loads of 4 values
// widened in registers (exactly: a bf16 is the top half of its f32) and stored as a float4.
template <typename T>
__device__ __forceinline__ void load_rows(float* sm, const T* g, size_t stride, const Shape& s, bool vec) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (vec) {
    const int cg = s.dh >> 2;
    for (int e = tid; e < s.len * cg; e += nt) {
      const int r = e / cg, c = (e - r * cg) << 2;
      if constexpr (sizeof(T) == 4) {
        cp_async16(sm + r * s.ds + c, reinterpret_cast<const float*>(g) + r * stride + c);
      } else {
        float v[4];
        load4(g + r * stride + c, v);
        *reinterpret_cast<float4*>(sm + r * s.ds + c) = make_float4(v[0], v[1], v[2], v[3]);
      }
    }
    for (int e = tid; e < (s.lp - s.len) * s.dp; e += nt) {
      const int r = s.len + e / s.dp, c = e % s.dp;
      sm[r * s.ds + c] = 0.0f;
    }
    return;
  }
  for (int e = tid; e < s.lp * s.dp; e += nt) {
    const int r = e / s.dp, c = e - r * s.dp;
    sm[r * s.ds + c] = (r < s.len && c < s.dh) ? to_f32(g[r * stride + c]) : 0.0f;
  }
}

// Square [len, len] probabilities of this (item, head) into sm [Lp][LS], pads zero.
template <typename T> __device__ __forceinline__ void load_probs(float* sm, const T* p, const Shape& s) {
  for (int e = threadIdx.x; e < s.lp * s.lp; e += blockDim.x) {
    const int r = e / s.lp, c = e - r * s.lp;
    sm[r * s.ls + c] = (r < s.len && c < s.len) ? to_f32(p[r * s.len + c]) : 0.0f;
  }
}

// g[r · stride + c] = acc[rr][cc] for the 4×4 tile at (r0, c0), rows < len, columns < dh.
template <typename T>
__device__ __forceinline__ void store_tile(T* g, size_t stride, const Shape& s, int r0, int c0, const float (&acc)[4][4],
                                           bool vec) {
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const int r = r0 + rr;
    if (r >= s.len) break;
    T* row = g + r * stride;
    if (vec) {  // dh % 4 == 0 here, so c0 + 3 < dh: one 16-byte (f32) or 8-byte (bf16) write
      store4(row + c0, acc[rr]);
      continue;
    }
#pragma unroll
    for (int cc = 0; cc < 4; ++cc)
      if (c0 + cc < s.dh) row[c0 + cc] = from_f32<T>(acc[rr][cc]);
  }
}

// C[i][j] = alpha · Σ_k A[i][k] · B[j][k] for i, j < len (Q·Kᵀ, dO·Vᵀ). A, B: [Lp][DS] with zero
// pad columns, so k runs over whole float4 groups. Each 4×4 tile takes rows {ti + a·nt} and
// columns {tj + b·nt} (strided, so a quarter warp reads 8 consecutive rows: conflict-free) and is
// split over `ks` adjacent lanes along k; every thread runs the same trip count so the shuffle
// reduction has full warps.
__device__ __forceinline__ void gemm_nt(const float* A, const float* B, const Shape& s, float alpha, float* C) {
  const int nt = (s.len + 3) >> 2, tiles = nt * nt, nk = s.dp >> 2;
  int ks = 1;
  while (ks < 8 && tiles * ks * 2 <= (int)blockDim.x) ks <<= 1;
  const int work = tiles * ks;
  for (int base = 0; base < work; base += blockDim.x) {
    const int w = base + threadIdx.x;
    const bool active = w < work;
    const int t = active ? w / ks : 0, p = w % ks;
    const int ti = t / nt, tj = t - ti * nt;
    const float* a[4];
    const float* b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      a[u] = A + min(ti + u * nt, s.len - 1) * s.ds;
      b[u] = B + min(tj + u * nt, s.len - 1) * s.ds;
    }
    float acc[4][4] = {};
    for (int kk = p; kk < nk; kk += ks) {
      float4 x[4], y[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        x[u] = *reinterpret_cast<const float4*>(a[u] + 4 * kk);
        y[u] = *reinterpret_cast<const float4*>(b[u] + 4 * kk);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = fmaf(x[i].x, y[j].x, acc[i][j]);
          acc[i][j] = fmaf(x[i].y, y[j].y, acc[i][j]);
          acc[i][j] = fmaf(x[i].z, y[j].z, acc[i][j]);
          acc[i][j] = fmaf(x[i].w, y[j].w, acc[i][j]);
        }
    }
    for (int o = 1; o < ks; o <<= 1)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += __shfl_xor_sync(0xffffffffu, acc[i][j], o);
    if (active && p == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ti + i * nt;
        if (r >= s.len) break;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = tj + j * nt;
          if (c < s.len) C[r * s.ls + c] = alpha * acc[i][j];
        }
      }
    }
  }
}

// acc = Σ_j A(i, j) · B[j][c] for the tile rows r0..r0+3, columns c0..c0+3 (P·V, dS·K when
// !TRANS with A(i, j) = M[i][j]; Pᵀ·dO, dSᵀ·Q when TRANS with A(i, j) = M[j][i]). M: [Lp][LS],
// B: [Lp][DS]; j runs over Lp (pads are zero on both sides). Rows of a tile are contiguous so a
// float4 of M feeds four rows (TRANS) or four steps of j (!TRANS); lanes of a warp share r0 and
// read consecutive columns of B.
template <bool TRANS>
__device__ __forceinline__ void gemm_nn(const float* M, const float* B, const Shape& s, int r0, int c0,
                                        float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  if constexpr (TRANS) {
#pragma unroll 4
    for (int j = 0; j < s.lp; ++j) {
      const float4 a = *reinterpret_cast<const float4*>(M + j * s.ls + r0);
      const float4 b = *reinterpret_cast<const float4*>(B + j * s.ds + c0);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
    }
  } else {
    for (int j = 0; j < s.lp; j += 4) {
      float4 a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = *reinterpret_cast<const float4*>(M + (r0 + u) * s.ls + j);
        b[u] = *reinterpret_cast<const float4*>(B + (j + u) * s.ds + c0);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float av[4] = {a[i].x, a[i].y, a[i].z, a[i].w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          acc[i][0] = fmaf(av[u], b[u].x, acc[i][0]);
          acc[i][1] = fmaf(av[u], b[u].y, acc[i][1]);
          acc[i][2] = fmaf(av[u], b[u].z, acc[i][2]);
          acc[i][3] = fmaf(av[u], b[u].w, acc[i][3]);
        }
      }
    }
  }
}

// heads · Σ_{b' < b} len_b'²: where item b's probabilities start. Summed by the whole block
// (a few loads per thread even for thousands of items) while the cp.async copies are in flight.
__device__ __forceinline__ size_t prob_offset(const uint32_t* offsets, int b, int heads, unsigned long long* red) {
  unsigned long long acc = 0;
  for (int i = threadIdx.x; i < b; i += blockDim.x) {
    const unsigned long long l = offsets[i + 1] - offsets[i];
    acc += l * l;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  unsigned long long total = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += red[w];
  return (size_t)total * heads;
}

// An item longer than the launch was sized for (Segments whose host and device offsets
// disagree): fill its outputs with NaN so the error surfaces, never a silently wrong answer.
template <typename T> __device__ void poison_rows(T* g, size_t stride, int len, int cols) {
  for (int e = threadIdx.x; e < len * cols; e += blockDim.x)
    g[(e / cols) * stride + e % cols] = from_f32<T>(__int_as_float(0x7fc00000));
}

// Whether p is aligned to 4 elements: one float4 of f32, 8 bytes of bf16.
template <typename T> __device__ __forceinline__ bool aligned4(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0;
}

template <typename T>
__device__ void fwd(const T* __restrict__ qkv, const uint32_t* __restrict__ offsets, int heads, int dh, int max_len,
                    float scale, T* __restrict__ out, T* __restrict__ probs) {
  extern __shared__ float4 attn_fwd_smem[];
  __shared__ unsigned long long red[MAX_THREADS / 32];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const size_t d = (size_t)heads * dh;
  const int start = offsets[b], len = offsets[b + 1] - start;
  if (len <= 0) return;
  const T* x = qkv + (size_t)start * 3 * d + (size_t)h * dh;
  T* o = out + (size_t)start * d + (size_t)h * dh;
  if (len > max_len) {
    poison_rows(o, d, len, dh);
    return;
  }
  const Shape s = make_shape(len, dh);
  float* Q = reinterpret_cast<float*>(attn_fwd_smem);
  float* K = Q + s.lp * s.ds;
  float* V = K + s.lp * s.ds;
  float* S = V + s.lp * s.ds;
  const bool vec = dh % 4 == 0 && aligned4(qkv) && aligned4(out);
  load_rows(Q, x, 3 * d, s, vec);
  load_rows(K, x + d, 3 * d, s, vec);
  load_rows(V, x + 2 * d, 3 * d, s, vec);
  const size_t poff = prob_offset(offsets, b, heads, red) + (size_t)h * len * len;
  cp_async_wait_all();
  __syncthreads();

  // S = scale · Q Kᵀ
  gemm_nt(Q, K, s, scale, S);
  __syncthreads();

  // Row softmax, one warp per row (len <= 64: two entries per lane); pads set to zero.
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  T* pg = probs + poff;
  for (int i = threadIdx.x >> 5; i < s.lp; i += warps) {
    float* row = S + i * s.ls;
    if (i >= len) {
      for (int j = lane; j < s.lp; j += 32) row[j] = 0.0f;
      continue;
    }
    const float v0 = lane < len ? row[lane] : -INFINITY;
    const float v1 = lane + 32 < len ? row[lane + 32] : -INFINITY;
    const float m = warp_max(fmaxf(v0, v1));
    const float e0 = lane < len ? expf(v0 - m) : 0.0f;
    const float e1 = lane + 32 < len ? expf(v1 - m) : 0.0f;
    const float inv = 1.0f / warp_sum(e0 + e1);
    const float p0 = e0 * inv, p1 = e1 * inv;
    if (lane < s.lp) row[lane] = p0;  // p = 0 on the pad columns
    if (lane + 32 < s.lp) row[lane + 32] = p1;
    if (lane < len) pg[i * len + lane] = from_f32<T>(p0);
    if (lane + 32 < len) pg[i * len + lane + 32] = from_f32<T>(p1);
  }
  __syncthreads();

  // O = P V
  const int cg = s.dp >> 2, tiles = (s.lp >> 2) * cg;
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const int r0 = (t / cg) << 2, c0 = (t % cg) << 2;
    float acc[4][4];
    gemm_nn<false>(S, V, s, r0, c0, acc);
    store_tile(o, d, s, r0, c0, acc, vec);
  }
}

// The qkv projection's bias gradient, when asked for (partial non-null), in the same launch:
// block (b, h) sums the rows of the [len, 3·dh] piece of dqkv it has just written, in row order,
// into partial[b][part·d + h·dh + c] (read back from the cache: the block wrote those 55 KB a
// moment ago, so no pass over dqkv in device memory, where the column sum after the kernel read
// all of it again); the last of head h's blocks to finish adds the items' partials in item order
// into dbias (common::last_to_finish, as the column sums use it: one counter per head),
// so the sum is the same bits run to run. Every block takes part, an empty item with zeros.
template <typename T>
__device__ void bias_grad(const T* dqkv, const uint32_t* __restrict__ offsets, int heads, int dh,
                          float* __restrict__ partial, float* __restrict__ dbias, unsigned* counters) {
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads, items = gridDim.x / heads, cols = 3 * dh;
  const size_t d = (size_t)heads * dh;
  const int start = offsets[b], len = max(0, (int)offsets[b + 1] - start);
  const T* dx = dqkv + (size_t)start * 3 * d + (size_t)h * dh;
  __syncthreads();  // every tile of this block's dqkv is written (and visible to the block)
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    const int part = j / dh, c = j - part * dh;
    const T* col = dx + part * d + c;
    float s = 0.0f;
    for (int i = 0; i < len; ++i) s += to_f32(col[(size_t)i * 3 * d]);
    partial[(size_t)b * 3 * d + part * d + (size_t)h * dh + c] = s;
  }
  if (!common::last_to_finish(&counters[h], items)) return;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    const int part = j / dh, c = j - part * dh;
    const size_t col = part * d + (size_t)h * dh + c;
    float s = 0.0f;
    for (int k = 0; k < items; ++k) s += __ldcg(partial + (size_t)k * 3 * d + col);  // L2: other blocks wrote them
    dbias[col] += s;
  }
}

template <typename T>
__device__ void bwd(const T* __restrict__ qkv, const T* __restrict__ probs, const uint32_t* __restrict__ offsets,
                    int heads, int dh, int max_len, float scale, const T* __restrict__ dout, T* __restrict__ dqkv) {
  extern __shared__ float4 attn_bwd_smem[];
  __shared__ unsigned long long red[MAX_THREADS / 32];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const size_t d = (size_t)heads * dh;
  const int start = offsets[b], len = max(0, (int)offsets[b + 1] - start);
  const T* x = qkv + (size_t)start * 3 * d + (size_t)h * dh;
  const T* dO_g = dout + (size_t)start * d + (size_t)h * dh;
  T* dx = dqkv + (size_t)start * 3 * d + (size_t)h * dh;
  if (len == 0 || len > max_len) {
    for (int part = 0; part < 3; ++part) poison_rows(dx + part * d, 3 * d, len, dh);
    return;
  }
  const Shape s = make_shape(len, dh);
  float* Q = reinterpret_cast<float*>(attn_bwd_smem);
  float* K = Q + s.lp * s.ds;
  float* V = K + s.lp * s.ds;
  float* dO = V + s.lp * s.ds;
  float* P = dO + s.lp * s.ds;
  float* dS = P + s.lp * s.ls;
  const bool vec = dh % 4 == 0 && aligned4(qkv) && aligned4(dout) && aligned4(dqkv);
  load_rows(Q, x, 3 * d, s, vec);
  load_rows(K, x + d, 3 * d, s, vec);
  load_rows(V, x + 2 * d, 3 * d, s, vec);
  load_rows(dO, dO_g, d, s, vec);
  const size_t poff = prob_offset(offsets, b, heads, red) + (size_t)h * len * len;
  load_probs(P, probs + poff, s);
  cp_async_wait_all();
  __syncthreads();

  const int cg = s.dp >> 2, tiles = (s.lp >> 2) * cg;
  // dV = Pᵀ dO (straight to device memory), and dP = dO Vᵀ (into dS): independent, one phase.
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const int r0 = (t / cg) << 2, c0 = (t % cg) << 2;
    float acc[4][4];
    gemm_nn<true>(P, dO, s, r0, c0, acc);
    store_tile(dx + 2 * d, 3 * d, s, r0, c0, acc, vec);
  }
  gemm_nt(dO, V, s, 1.0f, dS);
  __syncthreads();

  // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, one warp per row; pads set to zero.
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int i = threadIdx.x >> 5; i < s.lp; i += warps) {
    float* g = dS + i * s.ls;
    if (i >= len) {
      for (int j = lane; j < s.lp; j += 32) g[j] = 0.0f;
      continue;
    }
    const float* p = P + i * s.ls;
    const float p0 = lane < len ? p[lane] : 0.0f, p1 = lane + 32 < len ? p[lane + 32] : 0.0f;
    const float g0 = lane < len ? g[lane] : 0.0f, g1 = lane + 32 < len ? g[lane + 32] : 0.0f;
    const float dot = warp_sum(p0 * g0 + p1 * g1);
    if (lane < s.lp) g[lane] = lane < len ? p0 * (g0 - dot) * scale : 0.0f;
    if (lane + 32 < s.lp) g[lane + 32] = lane + 32 < len ? p1 * (g1 - dot) * scale : 0.0f;
  }
  __syncthreads();

  // dQ = dS K ; dK = dSᵀ Q
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const int r0 = (t / cg) << 2, c0 = (t % cg) << 2;
    float acc[4][4];
    gemm_nn<false>(dS, K, s, r0, c0, acc);
    store_tile(dx, 3 * d, s, r0, c0, acc, vec);
    gemm_nn<true>(dS, Q, s, r0, c0, acc);
    store_tile(dx + d, 3 * d, s, r0, c0, acc, vec);
  }
}


// ---- Version 2 of the forward, on tensor cores (bf16 storage) -------------------------------
// The FMA forward above computes in f32 from the widened values; this one multiplies the bf16
// values as stored on the tensor cores (mma.sync m16n8k16: bf16 in, f32 sums), as FlashAttention
// 2 does within one tile. CPU twin: src/backend/cpu/attention.rs::forward with bf16 storage (the
// probabilities rounded to bf16 before P·V, as the saved ones are). Test: tests/gpu_dtype.rs.
// Layout: one block per (item, head) as above; warp w owns query rows 16w..16w+15, so
//   blockDim.x = 32 · ceil(max_len / 16) (at most 4 warps; src/backend/cuda/attention.rs).
// Shared memory, bf16 bits: Qs, Ks [L16][D16 + 8] and Vt [D16][L16 + 8] (V transposed, so a B
//   fragment of P·V, two consecutive keys of one column, is one 32-bit load); L16 and D16 are
//   len and dh rounded up to 16, pads zero. A row of D16 + 8 values is D16/2 + 4 words (4 mod 8),
//   so the 8 rows × 4 words of a fragment load fall in 32 different banks; likewise Vt's rows.
//   len 36, dh 128: 2 · 48 · 136 · 2 + 128 · 56 · 2 = 40.4 KB; len 64: 53.2 KB.
// Per warp, everything in registers between the two products:
//   S = Q·Kᵀ: per 16-wide step of dh one A fragment of Q (4 LDS.32), per 8-key tile one B
//     fragment of K (2 LDS.32) and one mma. S: ≤ 8 tiles × 4 floats.
//   Softmax: a row's keys are spread over the 4 lanes of a quad (2 per tile), so its max and sum
//     are 2 shuffles each; pad keys are -inf (exp gives exact zeros). Rounded to bf16, P is both
//     the saved probabilities and P·V's operand: S's accumulator tiles 2j and 2j + 1 are exactly
//     the A fragment of keys 16j..16j+15, so P never goes through shared memory.
//   O = P·V: per 8-column tile of dh one B fragment of Vt and one mma per 16 keys. O: ≤ 16
//     tiles × 4 floats, rounded to bf16 and stored 2 values per 4-byte write.
// FLOPs on the tensor cores at the bench shape: 0.68 G per forward, about 1 µs at H100's dense
// bf16 rate; what is left is the loads (qkv once, 18.9 MB in bf16 at this shape) and the
// latency of one short chain per warp. Timing on a card: owed (docs/results/gpu.md).
// Summation order: the mma's f32 sums are in the hardware's order, so S and O differ from the
// CPU's in their last bits (and P, after rounding, by at most one bf16 step); the test's
// tolerance is derived from bf16's 8-bit mantissa.
constexpr int MMA_MAX_WARPS = 4;  // len <= 64

// d += A·B on the tensor cores: A a 16×16 bf16 fragment (a0..a3), B 16×8 (b0, b1), d 16×8 f32
// (fragments as the PTX ISA assigns them: lane = 4g + t holds rows g and g + 8, columns 2t, 2t + 1).
__device__ __forceinline__ void mma_bf16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two consecutive bf16 of shared memory as one fragment register (the first in the low half).
__device__ __forceinline__ unsigned pair_at(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }


// Four bf16 of `row` from column c as two words, zero past dh (and for a row past the item:
// row == nullptr). `vec`: dh % 4 == 0 and the rows 8-byte aligned, so one 8-byte load.
__device__ __forceinline__ uint2 four_at(const unsigned short* row, int c, int dh, bool vec) {
  if (row == nullptr || c >= dh) return make_uint2(0, 0);
  if (vec) return *reinterpret_cast<const uint2*>(row + c);
  unsigned v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = c + i < dh ? row[c + i] : 0u;
  return make_uint2(v[0] | v[1] << 16, v[2] | v[3] << 16);
}

// Rows r, r + 1 (four columns from c: v0, v1) into the transposed T [D16][ts]: four words,
// each two consecutive rows of one column, each written whole by this thread (so no two
// threads share a shared-memory word).
__device__ __forceinline__ void transpose_pair(unsigned short* T, int ts, int r, int c, uint2 v0, uint2 v1) {
  unsigned* col = reinterpret_cast<unsigned*>(T + c * ts + r);
  col[0] = (v0.x & 0xffffu) | v1.x << 16;
  col[ts / 2] = v0.x >> 16 | (v1.x & 0xffff0000u);
  col[ts] = (v0.y & 0xffffu) | v1.y << 16;
  col[3 * ts / 2] = v0.y >> 16 | (v1.y & 0xffff0000u);
}

// A warp's 16 rows (r0..) of accumulator tiles acc[n] (columns 8n..8n+7) rounded to bf16 into
// g[row · stride + col], rows < len, columns < dh; 2 values per 4-byte write when `words`
// (dh even, stride even, g 4-byte aligned). Lane 4·gi + t holds rows r0 + gi (acc[n][0..1])
// and r0 + gi + 8 (acc[n][2..3]), columns 8n + 2t, + 1.
__device__ __forceinline__ void store_tiles(__nv_bfloat16* g, size_t stride, const float (&acc)[16][4], int r0,
                                            int len, int dh, bool words) {
  const int lane = threadIdx.x & 31, gi = lane >> 2, t2 = (lane & 3) << 1;
#pragma unroll
  for (int n = 0; n < 16; ++n)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + gi + (half << 3), c = n * 8 + t2;
      if (row >= len || c >= dh) continue;
      __nv_bfloat16* dst = g + (size_t)row * stride + c;
      const float v0 = acc[n][2 * half], v1 = acc[n][2 * half + 1];
      if (words) {  // dh even, so c + 1 < dh
        *reinterpret_cast<unsigned*>(dst) = bf16_pair(v0, v1);
      } else {
        dst[0] = __float2bfloat16(v0);
        if (c + 1 < dh) dst[1] = __float2bfloat16(v1);
      }
    }
}

// A fragment of Mᵀ (rows m0..m0+15 of Mᵀ, columns k0..k0+15) from M, f32 [..][ls] holding bf16
// values (so the pairs are exact): register (row i, columns 2t, 2t + 1) of Mᵀ is M[k0 + 2t][m0 + i],
// M[k0 + 2t + 1][m0 + i], two rows of M, one column.
__device__ __forceinline__ void a_of_transposed(const float* M, int ls, int m0, int k0, unsigned (&a)[4]) {
  const int lane = threadIdx.x & 31, gi = lane >> 2, t2 = (lane & 3) << 1;
  const auto pair = [&](int k, int m) { return bf16_pair(M[k * ls + m], M[(k + 1) * ls + m]); };
  a[0] = pair(k0 + t2, m0 + gi);
  a[1] = pair(k0 + t2, m0 + gi + 8);
  a[2] = pair(k0 + t2 + 8, m0 + gi);
  a[3] = pair(k0 + t2 + 8, m0 + gi + 8);
}

// s = A·Bᵀ for a warp's 16 rows r0.. of A and the first `keys` (a multiple of 16) rows of B,
// both bf16 [..][stride] with k along the row (d16 of it): s[n] is B's rows 8n..8n+7. Each 16
// of k: one A fragment (4 loads), then per 8 rows of B a B fragment (2 loads) and an mma.
__device__ __forceinline__ void rows_times_rows(const unsigned short* A, const unsigned short* B, int stride, int r0,
                                                int keys, int d16, float (&s)[8][4]) {
  const int lane = threadIdx.x & 31, gi = lane >> 2, t2 = (lane & 3) << 1;
#pragma unroll
  for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
  for (int k0 = 0; k0 < d16; k0 += 16) {
    const unsigned short* a = A + (r0 + gi) * stride + k0 + t2;
    const unsigned a0 = pair_at(a), a1 = pair_at(a + 8 * stride), a2 = pair_at(a + 8), a3 = pair_at(a + 8 * stride + 8);
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (n < (keys >> 3)) {
        const unsigned short* b = B + (n * 8 + gi) * stride + k0 + t2;
        mma_bf16(s[n], a0, a1, a2, a3, pair_at(b), pair_at(b + 8));
      }
    }
  }
}

// acc = T·B for the warp's 16 rows of T, held as accumulator tiles t[n] (columns 8n..8n+7 of
// `keys`, a multiple of 16; values rounded to bf16 here), and Bt = Bᵀ, bf16 [d16][ts]: the tiles
// 2j and 2j + 1 of T are exactly the A fragment of its columns 16j..16j+15, so T never leaves
// the registers; a B fragment is two consecutive rows of B, one 32-bit load of Bt.
__device__ __forceinline__ void tiles_times(const float (&t)[8][4], const unsigned short* Bt, int ts, int keys, int d16,
                                            float (&acc)[16][4]) {
  const int lane = threadIdx.x & 31, gi = lane >> 2, t2 = (lane & 3) << 1;
#pragma unroll
  for (int n = 0; n < 16; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j < (keys >> 4)) {
      const unsigned a0 = bf16_pair(t[2 * j][0], t[2 * j][1]), a1 = bf16_pair(t[2 * j][2], t[2 * j][3]);
      const unsigned a2 = bf16_pair(t[2 * j + 1][0], t[2 * j + 1][1]);
      const unsigned a3 = bf16_pair(t[2 * j + 1][2], t[2 * j + 1][3]);
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        if (n < (d16 >> 3)) {
          const unsigned short* b = Bt + (n * 8 + gi) * ts + j * 16 + t2;
          mma_bf16(acc[n], a0, a1, a2, a3, pair_at(b), pair_at(b + 8));
        }
      }
    }
  }
}

__device__ void fwd_mma(const __nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ offsets, int heads, int dh,
                        int max_len, float scale, __nv_bfloat16* __restrict__ out, __nv_bfloat16* __restrict__ probs) {
  extern __shared__ float4 attn_mma_smem[];
  __shared__ unsigned long long red[MMA_MAX_WARPS];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const size_t d = (size_t)heads * dh;
  const int start = offsets[b], len = offsets[b + 1] - start;
  if (len <= 0) return;
  const unsigned short* x = reinterpret_cast<const unsigned short*>(qkv) + (size_t)start * 3 * d + (size_t)h * dh;
  __nv_bfloat16* o = out + (size_t)start * d + (size_t)h * dh;
  if (len > max_len) {
    poison_rows(o, d, len, dh);
    return;
  }
  const int l16 = (len + 15) & ~15, d16 = (dh + 15) & ~15, qs = d16 + 8, vs = l16 + 8;
  unsigned short* Qs = reinterpret_cast<unsigned short*>(attn_mma_smem);
  unsigned short* Ks = Qs + l16 * qs;
  unsigned short* Vt = Ks + l16 * qs;
  const int tid = threadIdx.x, nt = blockDim.x, cg = d16 >> 2;
  const bool vec = dh % 4 == 0 && aligned4(qkv);
  // Q and K as they are, pads included: each thread writes whole words (no two threads share
  // one), consecutive threads consecutive columns of a row.
  for (int e = tid; e < l16 * cg; e += nt) {
    const int r = e / cg, c = (e - r * cg) << 2;
    const unsigned short* row = r < len ? x + (size_t)r * 3 * d : nullptr;
    *reinterpret_cast<uint2*>(Qs + r * qs + c) = four_at(row, c, dh, vec);
    *reinterpret_cast<uint2*>(Ks + r * qs + c) = four_at(row ? row + d : nullptr, c, dh, vec);
  }
  // V transposed: a thread takes two consecutive rows (keys) of four columns, so each word of
  // Vt (two keys of one column) is written whole by one thread.
  for (int e = tid; e < (l16 >> 1) * cg; e += nt) {
    const int r = (e / cg) << 1, c = (e % cg) << 2;
    const uint2 v0 = four_at(r < len ? x + (size_t)r * 3 * d + 2 * d : nullptr, c, dh, vec);
    const uint2 v1 = four_at(r + 1 < len ? x + (size_t)(r + 1) * 3 * d + 2 * d : nullptr, c, dh, vec);
    transpose_pair(Vt, vs, r, c, v0, v1);
  }
  const size_t poff = prob_offset(offsets, b, heads, red) + (size_t)h * len * len;
  __syncthreads();

  const int lane = tid & 31, g = lane >> 2, t2 = (lane & 3) << 1, r0 = (tid >> 5) << 4;
  if (r0 >= l16) return;  // a warp the batch's longest item needs and this one does not
  // S = Q·Kᵀ for rows r0..r0+15: s[n] is keys 8n..8n+7 (lane: rows r0+g, r0+g+8, keys 8n+t2, +1).
  float s[8][4];
  rows_times_rows(Qs, Ks, qs, r0, l16, d16, s);

  // Softmax of each row (index i >> 1 of the lane's two rows), pad keys -inf.
  float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[n][i] = n * 8 + t2 + (i & 1) < len ? s[n][i] * scale : -INFINITY;
      m[i >> 1] = fmaxf(m[i >> 1], s[n][i]);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 1));
    m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 2));
  }
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[n][i] = expf(s[n][i] - m[i >> 1]);
      sum[i >> 1] += s[n][i];
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    sum[r] = 1.0f / sum[r];
  }
  __nv_bfloat16* pg = probs + poff;
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[n][i] *= sum[i >> 1];
      const int row = r0 + g + ((i >> 1) << 3), key = n * 8 + t2 + (i & 1);
      if (row < len && key < len) pg[row * len + key] = __float2bfloat16(s[n][i]);
    }

  // O = P·V, P rounded as stored.
  float acc[16][4];
  tiles_times(s, Vt, vs, l16, d16, acc);
  store_tiles(o, d, acc, r0, len, dh, dh % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & 3) == 0);
}

// ---- Version 2 of the backward, on tensor cores (bf16 storage) ------------------------------
// The five products of version 1's backward on mma.sync, as the forward above. CPU twin:
// src/backend/cpu/attention.rs::backward with bf16 storage, which rounds dS to bf16 before
// dQ = dS·K and dK = dSᵀ·Q (the tensor cores multiply bf16; every other operand, P, dO, Q, K,
// V, is bf16 as stored already). Test: tests/gpu_dtype.rs.
// Shared memory (bf16 bits unless said):
//   dO, V        [L16][D16 + 8]  as stored: dP = dO·Vᵀ's A (dO's rows) and B (V's rows)
//   Kt, Qt, dOt  [D16][L16 + 8]  transposed: the B of dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO, whose
//                                k runs down the tokens (a register: two consecutive tokens)
//   P, dS (f32)  [L16][L16 + 4]  P widened from the saved probabilities; dS as phase 1 leaves
//                                it (bf16 values), for phase 2's transposed A fragments
//   len 36, dh 128: 2 · 13.1 + 3 · 14.3 + 2 · 10.0 KB = 89.1 KB; len 64: 124.9 KB.
// Phase 1, warp w owns query rows 16w..16w+15: dP = dO·Vᵀ in registers (as S in the forward);
//   dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, the row sums over a quad (2 shuffles), rounded to
//   bf16 and written to dS; dQ = dS·K with dS's tiles as the A fragments (as P in the
//   forward), stored. A barrier. Phase 2, warp w owns key rows 16w..16w+15: dV = Pᵀ·dO, stored,
//   then dK = dSᵀ·Q, stored; Pᵀ's and dSᵀ's A fragments are gathered from two rows of P, dS.
// FLOPs at the bench shape: 1.36 G, about 2 µs at H100's dense bf16 rate; the loads (qkv, dout,
// probs: 40 MB in bf16) and the stores (dqkv, 28 MB) set its floor. Timing: owed to a card.
// The backward's block: 8 warps whatever the length. A warp per 16 rows needs at most 4 (len
// ≤ 64; 3 at the bench's 36); the rest only load. Sized by the rows alone (3 warps at len 36,
// 89 KB of shared memory: 2 blocks and so 6 warps a multiprocessor), the load phase kept too
// few loads in flight: on an H200 (2026-12-04, session 27) it took 148 µs a call in the bf16
// step, more than the f32 version's 128 µs; its floor is about 17 µs. 124 registers × 256
// threads still fit 2 blocks. The time of 8 warps is owed.
constexpr int MMA_BWD_WARPS = 8;
static_assert(MMA_BWD_WARPS * 16 >= 64, "a warp per 16 rows of the longest item (MAX_LEN 64)");

__device__ void bwd_mma(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ probs,
                        const uint32_t* __restrict__ offsets, int heads, int dh, int max_len, float scale,
                        const __nv_bfloat16* __restrict__ dout, __nv_bfloat16* __restrict__ dqkv) {
  extern __shared__ float4 attn_mma_bwd_smem[];
  __shared__ unsigned long long red[MMA_BWD_WARPS];
  const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
  const size_t d = (size_t)heads * dh;
  const int start = offsets[b], len = max(0, (int)offsets[b + 1] - start);
  __nv_bfloat16* dx = dqkv + (size_t)start * 3 * d + (size_t)h * dh;
  if (len == 0 || len > max_len) {
    for (int part = 0; part < 3; ++part) poison_rows(dx + part * d, 3 * d, len, dh);
    return;
  }
  const unsigned short* x = reinterpret_cast<const unsigned short*>(qkv) + (size_t)start * 3 * d + (size_t)h * dh;
  const unsigned short* go = reinterpret_cast<const unsigned short*>(dout) + (size_t)start * d + (size_t)h * dh;
  const int l16 = (len + 15) & ~15, d16 = (dh + 15) & ~15, qs = d16 + 8, ts = l16 + 8, ps = l16 + 4;
  unsigned short* dOs = reinterpret_cast<unsigned short*>(attn_mma_bwd_smem);
  unsigned short* Vs = dOs + l16 * qs;
  unsigned short* Kt = Vs + l16 * qs;
  unsigned short* Qt = Kt + d16 * ts;
  unsigned short* dOt = Qt + d16 * ts;
  float* P = reinterpret_cast<float*>(dOt + d16 * ts);  // 16-byte aligned: every array above is
  float* dS = P + l16 * ps;                              // a multiple of 16 rows of 8 values
  const size_t poff = prob_offset(offsets, b, heads, red) + (size_t)h * len * len;
  const int tid = threadIdx.x, nt = blockDim.x, cg = d16 >> 2;
  const bool vec = dh % 4 == 0 && aligned4(qkv) && aligned4(dout);
  // Two consecutive tokens of four columns per thread: dO and V as stored, Q, K and dO
  // transposed; consecutive threads read consecutive columns.
  for (int e = tid; e < (l16 >> 1) * cg; e += nt) {
    const int r = (e / cg) << 1, c = (e % cg) << 2;
    const unsigned short* x0 = r < len ? x + (size_t)r * 3 * d : nullptr;
    const unsigned short* x1 = r + 1 < len ? x + (size_t)(r + 1) * 3 * d : nullptr;
    const unsigned short* o0 = r < len ? go + (size_t)r * d : nullptr;
    const unsigned short* o1 = r + 1 < len ? go + (size_t)(r + 1) * d : nullptr;
    const uint2 q0 = four_at(x0, c, dh, vec), q1 = four_at(x1, c, dh, vec);
    const uint2 k0 = four_at(x0 ? x0 + d : nullptr, c, dh, vec), k1 = four_at(x1 ? x1 + d : nullptr, c, dh, vec);
    const uint2 v0 = four_at(x0 ? x0 + 2 * d : nullptr, c, dh, vec);
    const uint2 v1 = four_at(x1 ? x1 + 2 * d : nullptr, c, dh, vec);
    const uint2 g0 = four_at(o0, c, dh, vec), g1 = four_at(o1, c, dh, vec);
    *reinterpret_cast<uint2*>(dOs + r * qs + c) = g0;
    *reinterpret_cast<uint2*>(dOs + (r + 1) * qs + c) = g1;
    *reinterpret_cast<uint2*>(Vs + r * qs + c) = v0;
    *reinterpret_cast<uint2*>(Vs + (r + 1) * qs + c) = v1;
    transpose_pair(Kt, ts, r, c, k0, k1);
    transpose_pair(Qt, ts, r, c, q0, q1);
    transpose_pair(dOt, ts, r, c, g0, g1);
  }
  const __nv_bfloat16* pg = probs + poff;
  for (int e = tid; e < l16 * l16; e += nt) {
    const int r = e / l16, c = e - r * l16;
    P[r * ps + c] = r < len && c < len ? __bfloat162float(pg[r * len + c]) : 0.0f;
  }
  __syncthreads();

  const int lane = tid & 31, g = lane >> 2, t2 = (lane & 3) << 1, w16 = (tid >> 5) << 4;
  const bool mine = w16 < l16;  // warps the batch's longest item needs and this one does not idle
  float acc[16][4];
  const bool words = dh % 2 == 0 && (reinterpret_cast<uintptr_t>(dqkv) & 3) == 0;
  if (mine) {
    // Phase 1, query rows w16..w16+15. dP = dO·Vᵀ: ds[n] is keys 8n..8n+7.
    float ds[8][4];
    rows_times_rows(dOs, Vs, qs, w16, l16, d16, ds);
    // dS = P ⊙ (dP − Σ_keys P ⊙ dP) · scale, rounded to bf16; pads have P = 0, so dS = 0.
    float dot[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (n < (l16 >> 3)) dot[i >> 1] += P[(w16 + g + ((i >> 1) << 3)) * ps + n * 8 + t2 + (i & 1)] * ds[n][i];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
      dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (n >= (l16 >> 3)) continue;
        const int at = (w16 + g + ((i >> 1) << 3)) * ps + n * 8 + t2 + (i & 1);
        ds[n][i] = bf16_round(P[at] * (ds[n][i] - dot[i >> 1]) * scale);
        dS[at] = ds[n][i];
      }
    // dQ = dS·K
    tiles_times(ds, Kt, ts, l16, d16, acc);
    store_tiles(dx, 3 * d, acc, w16, len, dh, words);
  }
  __syncthreads();  // every warp's rows of dS are written
  if (!mine) return;

  // Phase 2, key rows w16..w16+15: dV = Pᵀ·dO, then dK = dSᵀ·Q.
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const float* M = part == 0 ? P : dS;
    const unsigned short* B = part == 0 ? dOt : Qt;
#pragma unroll
    for (int n = 0; n < 16; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < (l16 >> 4)) {
        unsigned a[4];
        a_of_transposed(M, ps, w16, j * 16, a);
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          if (n < (d16 >> 3)) {
            const unsigned short* bb = B + (n * 8 + g) * ts + j * 16 + t2;
            mma_bf16(acc[n], a[0], a[1], a[2], a[3], pair_at(bb), pair_at(bb + 8));
          }
        }
      }
    }
    store_tiles(dx + (part == 0 ? 2 : 1) * d, 3 * d, acc, w16, len, dh, words);
  }
}

}  // namespace attention

// out [tokens, d] = softmax(scale · Q Kᵀ) V per (item, head); probs as described above.
extern "C" __global__ void __launch_bounds__(attention::MAX_THREADS, 2)
    attention_fwd_f32(const float* qkv, const uint32_t* offsets, int heads, int dh, int max_len, float scale,
                      float* out, float* probs) {
  attention::fwd<float>(qkv, offsets, heads, dh, max_len, scale, out, probs);
}
// bf16 storage: qkv, out and probs stored as bf16, the products on the tensor cores
// (version 2 above: one warp per 16 query rows, blockDim.x = 32 · ceil(max_len / 16)).
extern "C" __global__ void __launch_bounds__(32 * attention::MMA_MAX_WARPS)
    attention_fwd_bf16(const __nv_bfloat16* qkv, const uint32_t* offsets, int heads, int dh, int max_len,
                       float scale, __nv_bfloat16* out, __nv_bfloat16* probs) {
  attention::fwd_mma(qkv, offsets, heads, dh, max_len, scale, out, probs);
}

// dqkv [tokens, 3d] (written whole: every row of every item, every head's columns); with
// partial [items, 3d] non-null, also dbias [3d] += Σ_rows dqkv (counters: heads zero words).
extern "C" __global__ void __launch_bounds__(attention::MAX_THREADS)
    attention_bwd_f32(const float* qkv, const float* probs, const uint32_t* offsets, int heads, int dh, int max_len,
                      float scale, const float* dout, float* dqkv, float* partial, float* dbias, unsigned* counters) {
  attention::bwd<float>(qkv, probs, offsets, heads, dh, max_len, scale, dout, dqkv);
  if (partial != nullptr) attention::bias_grad<float>(dqkv, offsets, heads, dh, partial, dbias, counters);
}

// bf16 storage of qkv, probs, dout and dqkv, the products on the tensor cores (version 2 above:
// blockDim.x = 32 · MMA_BWD_WARPS); the bias gradient (f32) sums dqkv as stored.
extern "C" __global__ void __launch_bounds__(32 * attention::MMA_BWD_WARPS)
    attention_bwd_bf16(const __nv_bfloat16* qkv, const __nv_bfloat16* probs, const uint32_t* offsets, int heads,
                       int dh, int max_len, float scale, const __nv_bfloat16* dout, __nv_bfloat16* dqkv,
                       float* partial, float* dbias, unsigned* counters) {
  attention::bwd_mma(qkv, probs, offsets, heads, dh, max_len, scale, dout, dqkv);
  if (partial != nullptr) attention::bias_grad<__nv_bfloat16>(dqkv, offsets, heads, dh, partial, dbias, counters);
}
