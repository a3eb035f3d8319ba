#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, headers) from NVIDIA's PyPI wheels
# into .cuda-toolchain/ (git-ignored). No GPU and no system CUDA needed; idempotent.
#
# Why 13.0 and never newer: the target machines run driver 580 (CUDA 13.0), which cannot JIT
# PTX produced by a newer compiler (DESIGN.md §5).
# Why these five wheels: nvcc (driver, ptxas, fatbinary), crt (host/device headers nvcc injects),
# nvvm (cicc, libdevice), cccl (cuda/std, cub), runtime (cuda_runtime.h, cuda_bf16.h).
# They all unpack into one tree, site/nvidia/cu13/, laid out like a CUDA home: nvcc.profile
# there points cicc, libdevice and the include paths at it, so no -I or --nvvm-path is needed.
# `.cuda-toolchain/cuda` links to it; build.rs looks there after $NVCC, $CUDA_HOME and PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cuda-toolchain
VERSION=13.0.88
PKGS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-runtime==13.0.96"
)
PY=${PYTHON:-python3}
STAMP="$DEST/installed-${VERSION}"

if [[ -f "$STAMP" && -x "$DEST/cuda/bin/nvcc" ]]; then
  echo "CUDA toolchain ${VERSION} already in $DEST"
else
  rm -rf "$DEST/site" "$DEST/cuda" "$DEST"/installed-*
  mkdir -p "$DEST"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DEST/site" "${PKGS[@]}"
  ln -sfn site/nvidia/cu13 "$DEST/cuda"
  touch "$STAMP"
fi

NVCC="$DEST/cuda/bin/nvcc"
if ! "$NVCC" --version | grep -q "V${VERSION}"; then
  echo "error: $NVCC is not release ${VERSION}" >&2
  exit 1
fi

# Prove the tree is complete: compile a bf16 kernel for every target build.rs uses.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/probe.cu" <<'CU'
#include <cuda_bf16.h>
#include <cuda/std/cstdint>
extern "C" __global__ void probe(__nv_bfloat16* x, cuda::std::uint32_t n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.0f);
}
CU
"$NVCC" -fatbin -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_90,code=compute_90 -o "$tmp/probe.fatbin" "$tmp/probe.cu"
echo "nvcc ${VERSION} ready: $(cd "$DEST/cuda/bin" && pwd)/nvcc"
