// Kernels with a planted bug, one each, for the emulated device's own tests
// (tests/gpu_emulator.rs): the emulator must stop each with a message naming the kernel, the
// block and the thread. build.rs compiles this file to PTX; nothing else uses it.

// Each thread publishes its value and reads its neighbour's without __syncthreads() between:
// on the GPU the neighbour may not have written yet.
extern "C" __global__ void missing_barrier(const float* in, float* out) {
  __shared__ float s[256];
  int t = threadIdx.x;
  s[t] = in[t];
  // (the missing __syncthreads() goes here)
  out[t] = s[(t + 1) % blockDim.x];
}

// The same with the barrier: must pass.
extern "C" __global__ void with_barrier(const float* in, float* out) {
  __shared__ float s[256];
  int t = threadIdx.x;
  s[t] = in[t];
  __syncthreads();
  out[t] = s[(t + 1) % blockDim.x];
}

// Warp 0's lanes all read one shared word, then a lane of warp `writer_warp` writes it after
// a warp barrier: ordered inside warp 0 (must pass), a race from warp 1 (needs __syncthreads).
extern "C" __global__ void warp_readers_then_writer(float* out, int writer_warp) {
  __shared__ float s[1];
  const int t = threadIdx.x;
  if (t == 0) s[0] = 1.0f;
  __syncthreads();
  float v = 0.0f;
  if (t < 32) v = *(volatile float*)s;  // volatile: warp 1 must not load it speculatively
  __syncwarp();
  if (t == writer_warp * 32) s[0] = 2.0f;
  out[t] = v;
}

// `<=` where `<` was meant: the thread with i == n writes one element past the end.
extern "C" __global__ void one_past_the_end(float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;
}

// Shifts a block's values by one slot of a shared array sized for the block: the last thread
// writes one past the end of the array.
extern "C" __global__ void shared_one_past_the_end(const float* in, float* out) {
  __shared__ float s[32];
  int t = threadIdx.x;
  s[t + 1] = in[t];
  __syncthreads();
  out[t] = s[t];
}

// A full-warp butterfly sum: correct only when every lane of the warp exists.
extern "C" __global__ void warp_sum(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// Not broken: the bit-field instructions (bfe, bfi) the compiler emits for shifts and masks,
// written out so that the emulator's decoding of each is tested whatever the compiler picks.
extern "C" __global__ void bit_fields(const unsigned* in, unsigned* out) {
  const unsigned x = in[threadIdx.x], p = threadIdx.x % 29, n = 1 + threadIdx.x % 7;
  unsigned u, f;
  int s;
  unsigned long long w;
  asm("bfe.u32 %0, %1, %2, %3;" : "=r"(u) : "r"(x), "r"(p), "r"(n));
  asm("bfe.s32 %0, %1, %2, %3;" : "=r"(s) : "r"(x), "r"(p), "r"(n));
  asm("bfi.b32 %0, %1, %2, %3, %4;" : "=r"(f) : "r"(x), "r"(0xA5A5A5A5u), "r"(p), "r"(n));
  asm("bfi.b64 %0, %1, %2, %3, %4;" : "=l"(w) : "l"((unsigned long long)x), "l"(0ull), "r"(32u), "r"(32u));
  out[5 * threadIdx.x + 0] = u;
  out[5 * threadIdx.x + 1] = (unsigned)s;
  out[5 * threadIdx.x + 2] = f;
  out[5 * threadIdx.x + 3] = (unsigned)(w >> 32);
  out[5 * threadIdx.x + 4] = (unsigned)w;
}

// Not broken either: lop3, shf, prmt and bfind, written out for the same reason.
extern "C" __global__ void bit_ops(const unsigned* in, unsigned* out) {
  const unsigned x = in[threadIdx.x], y = in[(threadIdx.x + 1) % blockDim.x], n = threadIdx.x % 40;
  unsigned l, sl, sr, sc, pm, bf;
  asm("lop3.b32 %0, %1, %2, %3, 0xE8;" : "=r"(l) : "r"(x), "r"(y), "r"(n));  // majority(a, b, c)
  asm("shf.l.wrap.b32 %0, %1, %2, %3;" : "=r"(sl) : "r"(x), "r"(y), "r"(n));
  asm("shf.r.wrap.b32 %0, %1, %2, %3;" : "=r"(sr) : "r"(x), "r"(y), "r"(n));
  asm("shf.r.clamp.b32 %0, %1, %2, %3;" : "=r"(sc) : "r"(x), "r"(y), "r"(n));
  asm("prmt.b32 %0, %1, %2, 0x9E40;" : "=r"(pm) : "r"(x), "r"(y));
  asm("bfind.u32 %0, %1;" : "=r"(bf) : "r"(x >> n % 32));
  out[6 * threadIdx.x + 0] = l;
  out[6 * threadIdx.x + 1] = sl;
  out[6 * threadIdx.x + 2] = sr;
  out[6 * threadIdx.x + 3] = sc;
  out[6 * threadIdx.x + 4] = pm;
  out[6 * threadIdx.x + 5] = bf;
}

// Not broken: a grid-wide barrier (kernels/grid_sync.cuh) in a cooperative launch. Each block
// writes its doubled input, then reads its neighbour block's, which is only there after the
// barrier. barrier: two zero u32 words.
#include "../../kernels/grid_sync.cuh"
extern "C" __global__ void grid_rotate(const float* in, float* stage, float* out, unsigned* barrier) {
  const int b = blockIdx.x;
  if (threadIdx.x == 0) stage[b] = 2.0f * in[b];
  grid::grid_sync(barrier);
  if (threadIdx.x == 0) out[b] = __ldcg(stage + (b + 1) % gridDim.x);
}

// One warp-wide bf16 tensor-core product, D = A·B + C (A 16×16 row-major, B 16×8 row-major
// [k][n], C and D 16×8 row-major), each lane gathering the fragments the PTX ISA assigns it
// (g = lane / 4, t = lane % 4; a 32-bit register holds two bf16, the first in its low half).
// Correct with a whole warp; with fewer lanes it is illegal (mma.sync is warp-wide).
extern "C" __global__ void mma_tile(const unsigned short* a, const unsigned short* b, const float* c, float* d) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = (lane & 3) * 2;
  const auto pair = [](const unsigned short* p, int i, int j) { return (unsigned)p[i] | (unsigned)p[j] << 16; };
  const unsigned a0 = pair(a, g * 16 + t, g * 16 + t + 1), a1 = pair(a, (g + 8) * 16 + t, (g + 8) * 16 + t + 1),
                 a2 = pair(a, g * 16 + t + 8, g * 16 + t + 9), a3 = pair(a, (g + 8) * 16 + t + 8, (g + 8) * 16 + t + 9);
  const unsigned b0 = pair(b, t * 8 + g, (t + 1) * 8 + g), b1 = pair(b, (t + 8) * 8 + g, (t + 9) * 8 + g);
  float d0 = c[g * 8 + t], d1 = c[g * 8 + t + 1], d2 = c[(g + 8) * 8 + t], d3 = c[(g + 8) * 8 + t + 1];
  // Lane 0 alone shuffles first (legal: its mask is itself): the other lanes wait at the mma
  // until it arrives.
  if (lane == 0) d0 = __shfl_sync(1u, d0, 0);
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  d[g * 8 + t] = d0;
  d[g * 8 + t + 1] = d1;
  d[(g + 8) * 8 + t] = d2;
  d[(g + 8) * 8 + t + 1] = d3;
}
