#!/usr/bin/env bash
# Runs kernels/attention.cu and kernels/gru.cu on the CPU (no GPU needed) against a float64
# reference written from the equations: one std::thread per CUDA thread, std::barrier for
# __syncthreads and per-warp barriers for shuffles (shim.h), cp.async as a plain copy.
# Catches indexing, padding, bounds and barrier-placement bugs before a GPU run; it says nothing
# about speed, and the real race detector is compute-sanitizer on the GPU.
# Usage: tools/kernel-emu/run.sh   (needs g++ >= 11; ~1 min on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in attention gru; do
  # Host-compilable copies: dynamic shared memory becomes a global array, cp.async a memcpy.
  sed -e 's/extern __shared__/extern/' \
      -e 's/const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));/std::memcpy(smem, gmem, 16);/' \
      -e 's/asm volatile("cp.async.cg.shared.global.*$//' \
      -e 's/asm volatile("cp.async.wait_all;\\n" ::: "memory");//' \
      "$root/kernels/$f.cu" > "$tmp/${f}_host.cu"
done
cp "$root/kernels/common.cuh" "$here/shim.h" "$here/cuda_bf16.h" "$here/harness.cpp" "$tmp/"
g++ -std=c++20 -O2 -pthread -w -I"$tmp" -o "$tmp/harness" "$tmp/harness.cpp"
"$tmp/harness"
