#!/usr/bin/env bash
# Issue 15 item 5: why `wo-c` (no context loss L2) scores at least as well as `ours` in every
# table of docs/results/EXPERIMENTS.md. Each study changes one thing against the Table 1 budget
# (small preset, batch 32, 600 steps, 3 seeds) and runs `ours` (and `wo-c` where the change
# applies to it too); results land in docs/results/context/<study>/, runs in DATA/runs/context.
#
#   tools/context-study.sh [DATA_DIR (default /tmp/semshare-exp)] [SEEDS (default 3)] [STUDY ...]
#
# Data: tools/experiments.sh makes DATA/weak-image and DATA/flickr-tags (or `semshare synth`).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-/tmp/semshare-exp}
SEEDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
BIN=${SEMSHARE_BIN:-target/release/semshare}
[[ -n ${SEMSHARE_BIN:-} ]] || cargo build --release --quiet
CONFIGS=$(mktemp -d)
trap 'rm -rf "$CONFIGS"' EXIT

# study NAME DATASET VARIANTS CONFIG_JSON [EXTRA_ARGS...]
study() {
  local name=$1 data=$2 variants=$3 config=$4
  shift 4
  echo "$config" > "$CONFIGS/$name.json"
  $BIN experiment --suite table1 --data "$DATA/$data" --seeds "$SEEDS" --variants "$variants" \
    --config "$CONFIGS/$name.json" --out "docs/results/context/$name" --runs "$DATA/runs/context/$name" "$@"
}

run() {
  case $1 in
    # The reference pair under today's code.
    weak-base) study weak-base weak-image ours,wo-c '{}' ;;
    # Masking without L2: λ so small that L2's gradient is nothing, but 15 % of the segments
    # are still replaced by [MASK] in the pass that L1 also trains on.
    weak-mask-only) study weak-mask-only weak-image ours '{"model": {"lambda": 1e-9}}' ;;
    # L2's weight.
    weak-lambda-0.1) study weak-lambda-0.1 weak-image ours '{"model": {"lambda": 0.1}}' ;;
    weak-lambda-1) study weak-lambda-1 weak-image ours '{"model": {"lambda": 1.0}}' ;;
    # The masking rate.
    weak-mask-0.05) study weak-mask-0.05 weak-image ours '{"model": {"mask_prob": 0.05}}' ;;
    # The budget: 3x the steps (patience and validation interval as before).
    weak-1800) study weak-1800 weak-image ours,wo-c '{}' --steps 1800 ;;
    # flickr-tags: real tag lists (their co-occurrence is real context), synthetic regions.
    flickr-base) study flickr-base flickr-tags ours,wo-c '{}' ;;
    flickr-mask-only) study flickr-mask-only flickr-tags ours '{"model": {"lambda": 1e-9}}' ;;
    # L1 on the unmasked batch, L2 on a second, masked pass (twice the step's work).
    weak-separate) study weak-separate weak-image ours '{"train": {"context_pass": "separate"}}' ;;
    flickr-separate) study flickr-separate flickr-tags ours '{"train": {"context_pass": "separate"}}' ;;
    *) echo "unknown study $1" >&2; exit 2 ;;
  esac
}

if (( $# == 0 )); then
  set -- weak-base weak-mask-only weak-lambda-0.1 weak-1800 weak-lambda-1 weak-mask-0.05 flickr-base flickr-mask-only
fi
for s in "$@"; do run "$s"; done
