// Host emulation of the CUDA features the kernels use: one block at a time, one std::thread per
// CUDA thread, barriers for __syncthreads and per-warp barriers for shuffles.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
struct dim3e { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3e threadIdx, blockIdx;
inline dim3e blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }
inline std::barrier<>* g_block_bar = nullptr;
inline std::vector<std::barrier<>*> g_warp_bar;
inline unsigned long long g_xchg[1024];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int o) {
  int t = threadIdx.x, w = t / 32;
  static_assert(sizeof(T) <= 8);
  unsigned long long u = 0; std::memcpy(&u, &v, sizeof(T));
  g_warp_bar[w]->arrive_and_wait();
  g_xchg[t] = u;
  g_warp_bar[w]->arrive_and_wait();
  unsigned long long r = g_xchg[w * 32 + ((t % 32) ^ o)];
  g_warp_bar[w]->arrive_and_wait();
  T out; std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <typename F> void launch(unsigned grid, unsigned threads, F f) {
  gridDim.x = grid; blockDim.x = threads;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(threads);
    g_block_bar = &bar;
    std::vector<std::barrier<>*> wb;
    for (unsigned w = 0; w < threads / 32; ++w) wb.push_back(new std::barrier<>(32));
    g_warp_bar = wb;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
      ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; f(); });
    for (auto& th : ts) th.join();
    for (auto* p : wb) delete p;
  }
}
