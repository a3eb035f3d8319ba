// kernels/topk.cu — exact top-k search: the running top-k of each query over one tile of
// gallery scores (the host runs a cuBLAS GEMM per tile into scratch, then this kernel).
// Layout: scores [nq, n] f32 row-major (tile-local column j is gallery row base + j);
// run [nq, k] u64 keys, each query's ascending (best first), all-ones before the first tile.
// Key: rank_key of src/backend/cpu/topk.rs (descending score, then ascending id).
// CPU twin: src/backend/cpu/topk.rs. Test: tests/gpu_topk.rs.
#include "common.cuh"

// Largest k; keep in step with MAX_K in src/backend/cuda/topk.rs.
#define TOPK_MAX 128
#define TOPK_THREADS 256
// The running top-k (TOPK_MAX, padded) followed by one chunk of candidates: a power of two.
#define TOPK_SORT (2 * TOPK_THREADS)

namespace topk {

__device__ __forceinline__ unsigned long long rank_key(float s, uint32_t id) {
  uint32_t bits = __float_as_uint(s);
  if (bits == 0x80000000u) bits = 0;  // -0.0 ties +0.0
  const uint32_t asc = (bits >> 31) ? ~bits : (bits | 0x80000000u);
  // mov.b64 {lo, hi}: the pack the emulator decodes (the compiler's `bfi.b64` for shift-or is not).
  unsigned long long key;
  asm("mov.b64 %0, {%1, %2};" : "=l"(key) : "r"(id), "r"(~asc));
  return key;
}

// One block per query. Chunks of TOPK_THREADS candidates: a chunk with no key below the
// current k-th is skipped (most chunks, once the top-k is good); otherwise the running list
// and the chunk are bitonic-sorted together in shared memory and the first k kept. Simple
// and exact; a warp-level merge would be faster for large tiles.
__device__ void merge(const float* scores, int n, uint32_t base, int k, unsigned long long* run) {
  __shared__ unsigned long long s[TOPK_SORT];
  __shared__ int any[2][TOPK_THREADS / 32];  // per warp; two copies so reads and the next writes need no extra barrier
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const size_t q = blockIdx.x;
  const float* row = scores + q * n;
  unsigned long long* out = run + q * k;
  for (int i = t; i < TOPK_MAX; i += TOPK_THREADS) s[i] = i < k ? out[i] : ~0ull;
  __syncthreads();
  int parity = 0;
  for (int c0 = 0; c0 < n; c0 += TOPK_THREADS, parity ^= 1) {
    const int j = c0 + t;
    const unsigned long long key = j < n ? rank_key(row[j], base + (uint32_t)j) : ~0ull;
    const bool better = key < s[k - 1];
    const unsigned vote = __any_sync(0xffffffffu, better);
    if (lane == 0) any[parity][warp] = vote;
    __syncthreads();
    int some = 0;
    for (int w = 0; w < TOPK_THREADS / 32; ++w) some |= any[parity][w];
    if (!some) continue;
    s[TOPK_MAX + t] = better ? key : ~0ull;
    if (t < TOPK_SORT - TOPK_MAX - TOPK_THREADS) s[TOPK_MAX + TOPK_THREADS + t] = ~0ull;
    __syncthreads();
    for (int size = 2; size <= TOPK_SORT; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        const int a = 2 * t - (t & (stride - 1)), b = a + stride;
        const unsigned long long x = s[a], y = s[b];
        if ((x > y) == ((a & size) == 0)) {
          s[a] = y;
          s[b] = x;
        }
        __syncthreads();
      }
    }
  }
  for (int i = t; i < k; i += TOPK_THREADS) out[i] = s[i];
}
}  // namespace topk

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_merge_fwd_f32(const float* scores, int n, uint32_t base, int k, unsigned long long* run) {
  topk::merge(scores, n, base, k, run);
}
