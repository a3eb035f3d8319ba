#!/usr/bin/env bash
# Builds the GPU check bundle here (no GPU needed) and leaves it in target/gpu-bundle/:
# release GPU test binaries (tests/gpu_*.rs), the GPU and CPU benchmarks, the CLI (demo), the
# PyTorch, ONNX Runtime and CPU report scripts (tools/) and run.sh (the binaries gzipped in bins.tar.gz, which run.sh unpacks). The GPU
# machine has no Rust toolchain: build here, run there in two
# device calls of at most 540 s each (device tool: carry ["target/gpu-bundle"]):
#     STAGES=tests,demo  bash target/gpu-bundle/run.sh
#     STAGES=bench,torch bash target/gpu-bundle/run.sh
# The kernels are inside the binaries (embedded fatbin); libcuda and cuBLAS are found there by
# run.sh. Binaries are stripped so the bundle stays under 64 MiB.
# BASE=<commit>: also that commit's GPU benchmarks (benches/gpu_base, built in a worktree under
# target/, its own target folder kept for the next time), which run.sh's bench stage runs
# after this commit's: an A/B of two kernel versions in one device call.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE=target/gpu-bundle

tools/setup-cuda-toolchain.sh >/dev/null

# Release test binaries of the GPU suite and the GPU bench; the executables' paths come from
# cargo's JSON messages (their names carry a hash).
build() {
  cargo "$@" --features cuda --no-run --message-format=json-render-diagnostics |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])'
}
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/tests" "$BUNDLE/benches"
# model_api: the library's Model on the GPU against the CPU (its CPU tests take a second).
build test --release --test 'gpu_*' --test model_api | while read -r name exe; do cp "$exe" "$BUNDLE/tests/$name"; done
# The CPU bench too: the GPU machine's host is a Xeon with AMX (issue 17's figures; run.sh's
# cpu stage runs tools/bench_cpu_report.py with it, PyTorch and ONNX Runtime being there).
build bench --bench gpu --bench cpu | while read -r name exe; do cp "$exe" "$BUNDLE/benches/$name"; done
if [[ -n ${BASE:-} ]]; then
  base=$(git rev-parse --short "$BASE^{commit}") || { echo "error: BASE=$BASE is not a commit" >&2; exit 1; }
  src=target/gpu-base-src
  git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
  git worktree add --detach "$src" "$base" >/dev/null
  # The base builds with this checkout's pinned nvcc; its own target folder, so the two builds
  # do not undo each other's incremental state.
  (cd "$src" && export NVCC=$ROOT/.cuda-toolchain/cuda/bin/nvcc CARGO_TARGET_DIR=$ROOT/target/gpu-base-target &&
    build bench --bench gpu) | while read -r name exe; do cp "$exe" "$ROOT/$BUNDLE/benches/${name}_base"; done
  git worktree remove --force "$src"
  [[ -x $BUNDLE/benches/gpu_base ]] || { echo "error: the base commit's benches/gpu was not built" >&2; exit 1; }
fi
cargo build --release --features cuda --bin semshare --example cpu_profile
cp target/release/semshare "$BUNDLE/semshare"
# Time by op on the host's CPU (run.sh's cpu stage, before issue 17's report).
cp target/release/examples/cpu_profile "$BUNDLE/cpu_profile"
strip "$BUNDLE"/tests/* "$BUNDLE"/benches/* "$BUNDLE/semshare" "$BUNDLE/cpu_profile"
mkdir -p "$BUNDLE/tools"
cp tools/torch_reference.py tools/onnx_baseline.py tools/bench_cpu_report.py "$BUNDLE/tools/"
cp tools/gpu-run.sh "$BUNDLE/run.sh"
chmod +x "$BUNDLE/run.sh"
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
  if [[ -n ${BASE:-} ]]; then echo "base $base"; fi
  echo "built $(date -u +%FT%TZ) on $(uname -m)"
  .cuda-toolchain/cuda/bin/nvcc --version | tail -1
} >"$BUNDLE/MANIFEST"

ls "$BUNDLE/tests" | grep -q . || { echo "error: no GPU test binaries were built" >&2; exit 1; }
names=$(ls "$BUNDLE/tests" | tr '\n' ' ')
# Gzipped: each binary embeds the kernels and the library (about 5.5 MiB each stripped, 63 MiB
# in all at 10 of them, against the 64 MiB a carry holds); run.sh unpacks them first.
tar -C "$BUNDLE" -czf "$BUNDLE/bins.tar.gz" tests benches semshare cpu_profile
rm -rf "$BUNDLE/tests" "$BUNDLE/benches" "$BUNDLE/semshare" "$BUNDLE/cpu_profile"
size=$(du -sb "$BUNDLE" | cut -f1)
if (( size > 64 * 1024 * 1024 )); then
  echo "error: $BUNDLE is $((size >> 20)) MiB, over the 64 MiB the device tool carries" >&2
  exit 1
fi
echo "bundle: $ROOT/$BUNDLE ($((size >> 20)) MiB, binaries gzipped): $names"
echo "run on the GPU machine: bash $BUNDLE/run.sh"
