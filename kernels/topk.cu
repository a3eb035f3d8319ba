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
  return ((unsigned long long)~asc << 32) | id;
}

// s[0, TOPK_SORT) ascending, with TOPK_THREADS threads; ends with a barrier.
__device__ void bitonic_sort(unsigned long long* s) {
  const int t = threadIdx.x;
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

// Pads the candidate buffer after its `cnt` keys with the worst key and sorts it into the
// running top-k (s[0, k) is then the best k of both).
__device__ void flush(unsigned long long* s, int cnt) {
  for (int i = TOPK_MAX + cnt + threadIdx.x; i < TOPK_SORT; i += TOPK_THREADS) s[i] = ~0ull;
  __syncthreads();
  bitonic_sort(s);
}

// One block per query. Keys below the current k-th (`bound`) are appended to a shared buffer
// (warp ballots give each its slot, in thread order); when the next chunk would overflow it, the
// running list and the buffer are bitonic-sorted together and the first k kept. Once the top-k
// is good few keys pass, so most chunks cost one compare and one barrier.
__device__ void merge(const float* scores, int n, uint32_t base, int k, unsigned long long* run) {
  __shared__ unsigned long long s[TOPK_SORT];
  __shared__ int counts[2][TOPK_THREADS / 32];  // per warp; two copies so a chunk's reads and the next chunk's writes need no extra barrier
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const size_t q = blockIdx.x;
  const float* row = scores + q * n;
  unsigned long long* out = run + q * k;
  for (int i = t; i < TOPK_MAX; i += TOPK_THREADS) s[i] = i < k ? out[i] : ~0ull;
  __syncthreads();
  unsigned long long bound = s[k - 1];
  int cnt = 0, parity = 0;
  for (int c0 = 0; c0 < n; c0 += TOPK_THREADS, parity ^= 1) {
    const int j = c0 + t;
    const unsigned long long key = j < n ? rank_key(row[j], base + (uint32_t)j) : ~0ull;
    const bool better = key < bound;
    const unsigned ballot = __ballot_sync(0xffffffffu, better);
    if (lane == 0) counts[parity][warp] = __popc(ballot);
    __syncthreads();
    int total = 0, before = 0;
    for (int w = 0; w < TOPK_THREADS / 32; ++w) {
      const int c = counts[parity][w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (total == 0) continue;
    if (cnt + total > TOPK_SORT - TOPK_MAX) {  // uniform: every thread has the same counts
      flush(s, cnt);
      cnt = 0;
      bound = s[k - 1];
    }
    if (better) s[TOPK_MAX + cnt + before + __popc(ballot & ((1u << lane) - 1u))] = key;
    cnt += total;
  }
  if (cnt > 0) flush(s, cnt);
  for (int i = t; i < k; i += TOPK_THREADS) out[i] = s[i];
}
}  // namespace topk

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_merge_fwd_f32(const float* scores, int n, uint32_t base, int k, unsigned long long* run) {
  topk::merge(scores, n, base, k, run);
}
