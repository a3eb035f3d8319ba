// kernels/inputs.cu — input features that arrive as 16-bit floats, widened where they are read.
//
// A step uploads fp16 or bf16 region/text features as the shard stores them (the bulk of a
// batch's bytes, halved) and this kernel widens them to f32 and applies the input
// normalisation, which the host did before the upload when features came as f32.
// CPU twin: src/backend/cpu/inputs.rs. Bit for bit: both widenings are exact, and
// (x − mean) · inv_std is rounded twice here (__fsub_rn, __fmul_rn: never fused into an FMA)
// as the host rounds it.
#include "common.cuh"
#include <cuda_fp16.h>

namespace inputs {
__device__ __forceinline__ float widen(unsigned bits, int bf16) {
  return bf16 ? __uint_as_float(bits << 16) : __half2float(__ushort_as_half((unsigned short)bits));
}
}  // namespace inputs

// out[i] (i < n = rows · dim) = half i of `words` (two per word, the first in the low half),
// standardised with norm = [mean; inv_std] (2 × dim) unless norm is null. One word per thread
// and step of a grid-stride loop: one 4-byte load, two 4-byte stores.
extern "C" __global__ void widen_features_f32(const unsigned* __restrict__ words, int bf16, int n, int dim,
                                              const float* __restrict__ norm, float* __restrict__ out) {
  const int nwords = (n + 1) / 2;
  for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < nwords; w += gridDim.x * blockDim.x) {
    const unsigned bits = words[w];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * w + h;
      if (i >= n) break;
      float x = inputs::widen(h ? bits >> 16 : bits & 0xFFFFu, bf16);
      if (norm != nullptr) {
        const int c = i % dim;
        x = __fmul_rn(__fsub_rn(x, norm[c]), norm[dim + c]);
      }
      out[i] = x;
    }
  }
}
