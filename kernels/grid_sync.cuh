// kernels/grid_sync.cuh — a grid-wide barrier for kernels launched cooperatively (every block
// resident at once, which cuLaunchCooperativeKernel makes the driver check; without it blocks
// waiting here could keep the rest from ever being scheduled). Used by gru_persistent.cu;
// tested on its own by tests/gpu_emulator.rs (tests/kernels/broken.cu: grid_rotate).
// `barrier` is two u32 words, zero before the first use: the arrival count, which the last
// block to arrive resets to zero, and the generation, which it then moves on, releasing the
// rest. So the words are ready for the next barrier, and the next kernel, with no memset.
#pragma once

namespace grid {

// Every block of the grid waits here until all have arrived; writes before it are visible to
// every block after it. Thread 0 arrives for its block; waiters poll the generation with
// atomics, which go to L2, never a stale L1 line.
__device__ __forceinline__ void grid_sync(unsigned* barrier) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;
    const unsigned gen = atomicAdd(&barrier[1], 0u);
    __threadfence();
    if (atomicAdd(&barrier[0], 1u) == blocks - 1) {
      atomicExch(&barrier[0], 0u);
      __threadfence();
      atomicAdd(&barrier[1], 1u);
    } else {
      while (atomicAdd(&barrier[1], 0u) == gen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

}  // namespace grid
