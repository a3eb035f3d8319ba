// kernels/common.cuh — helpers shared by every kernel file (included once: build.rs compiles
// all kernels/*.cu as one translation unit, so file-local helpers live in a namespace per file).
// Storage types: float and __nv_bfloat16; arithmetic is always f32 (load -> f32 -> store).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace common {
// Bit-identical to the CPU's dropout_uniform(seed, i): integer-only hash (murmur3 finaliser),
// one 64-bit hash per four elements, 16 bits each. The mask is recomputed in backward.
__device__ __forceinline__ float dropout_uniform(uint64_t seed, uint64_t i) {
  uint64_t h = seed ^ ((i / 4) * 0x9E3779B97F4A7C15ull);
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 33;
  return (float)((h >> (16 * (i % 4))) & 0xFFFF) * (1.0f / 65536.0f);
}

// Element i of inverted dropout: dropped (p > 0 and its draw below p) or scaled by `scale` =
// 1/(1-p), which the host computes in f32 exactly as the CPU does. __fmul_rn: never fused
// into a neighbouring add, so every kernel that drops (dropout, the fused FFN activation, the
// fused post-LN join) rounds alike.
__device__ __forceinline__ float dropout_value(float x, float p, float scale, uint64_t seed, uint64_t i) {
  return p > 0.0f && dropout_uniform(seed, i) < p ? 0.0f : __fmul_rn(x, scale);
}



// x rounded to bf16 (to nearest, ties to even) and widened back: a `--precision bf16` operand,
// as cuBLAS's FAST_16BF GEMMs and the CPU's bf16 kernels round it. Products of two such values
// are exact in f32.
__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// Two f32 rounded to bf16 (to nearest even) in one word, the first in the low half.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
  return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) |
         (unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16;
}

// Four consecutive values from one vector load at p (16-byte aligned for f32, 8 for bf16;
// a bf16 widens exactly: it is the top half of its f32), and four stored with one (bf16:
// each rounded to nearest even).
__device__ __forceinline__ void load4(const float* p, float* v) {
  const float4 w = *reinterpret_cast<const float4*>(p);
  v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float* v) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  v[0] = __uint_as_float(w.x << 16), v[1] = __uint_as_float(w.x & 0xffff0000u);
  v[2] = __uint_as_float(w.y << 16), v[3] = __uint_as_float(w.y & 0xffff0000u);
}
__device__ __forceinline__ void store4(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, const float* v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bf16_pair(v[0], v[1]), bf16_pair(v[2], v[3]));
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Butterfly sums: every lane ends with the total, in the same order on every run.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `scratch` holds 32 floats.
// Every thread gets the total. Fixed tree order: deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Whether this block is the last of `blocks` sharing *counter to finish writing its partials
// (the whole block calls it; the answer is the same in every thread). The last resets the
// counter, so the next reduction on the stream finds it zero, and its later reads of the other
// blocks' partials see them (the fence on each side of the count).
__device__ __forceinline__ bool last_to_finish(unsigned* counter, unsigned blocks) {
  __shared__ int last;
  __threadfence();  // this block's partials are visible before it counts itself finished
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(counter, 1u) == blocks - 1;
    if (last) atomicExch(counter, 0u);
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Stage 2 of every deterministic column reduction (bias grad, LayerNorm dgamma/dbeta), run by
// the last block of each column strip (blockIdx.x: 32 columns, 32 × 8 threads) to finish its
// stage 1, so the reduction is one launch: out_y[c] += Σ_{k < parts} partial[y][k][c], summed
// in k order by lane (threadIdx.x, y) whatever order the blocks ran in, so the sum is the same
// bits run to run. out1 may be null (one output). counters[blockIdx.x] counts the strip's
// finished blocks; the last resets it, so the next reduction on the stream finds it zero.
// Why not a second launch: a launch costs about what this sum does (parts ≤ 72 at 4608 rows).
__device__ __forceinline__ void colsum_finish_strip(const float* partial, int cols, float* out0, float* out1,
                                                    unsigned* counters) {
  if (!last_to_finish(&counters[blockIdx.x], gridDim.y)) return;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float* out = threadIdx.y == 0 ? out0 : out1;
  if (threadIdx.y > 1 || out == nullptr || c >= cols) return;
  const int parts = gridDim.y;
  const float* p = partial + (size_t)threadIdx.y * parts * cols;
  float s = 0.0f;
  // 16 loads in flight, summed in k order as they arrive: nvcc's own unroll (4) left a strip's
  // last block 18 memory latencies at 72 parts (4,608 rows), the tail of every column sum.
#pragma unroll 16
  for (int k = 0; k < parts; ++k) s += __ldcg(p + (size_t)k * cols + c);  // L2: other blocks wrote them
  out[c] += s;
}

}  // namespace common

// Rows each block of a column-reduction's stage 1 covers; the host sizes the partials as
// ceil(rows / COLSUM_ROWS) x cols. Keep in step with COLSUM_ROWS in src/backend/cuda/mod.rs.
#define COLSUM_ROWS 64

