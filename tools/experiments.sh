#!/usr/bin/env bash
# The experiments of docs/results/EXPERIMENTS.md on the 2-core CPU with the `small` preset:
# three datasets (DESIGN.md §6 synthetic `weak-image` and `balanced`, `flickr-tags` with the
# real MIRFlickr-25K labels and tags), Table 1 and the η sweep. Every suite resumes where it
# stopped (its state file is in the results folder), and asking for more seeds extends it.
#
#   tools/experiments.sh [DATA_DIR (default /tmp/semshare-exp)] [SEEDS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-/tmp/semshare-exp}
SEEDS=${2:-3}
BIN=target/release/semshare
cargo build --release --quiet
mkdir -p "$DATA"
# 4000 / 500 / 1000 pairs (train / val / test); flickr-tags: 1000 queries against the rest.
for p in weak-image balanced; do
  [[ -f "$DATA/$p/dataset.json" ]] || $BIN synth --preset $p --train 4000 --val 500 --test 1000 --out "$DATA/$p"
done
[[ -f "$DATA/flickr-tags/dataset.json" ]] ||
  $BIN synth --preset flickr-tags --labels ../shared/data/mirflickr25k --train 4000 --val 500 --test 1000 \
    --out "$DATA/flickr-tags"
suite() { # suite DATASET SUITE SEEDS [OUT_NAME EXTRA_ARGS...]
  local out=${4:-$1}
  $BIN experiment --suite "$2" --data "$DATA/$1" --seeds "$3" --out "docs/results/$out" --runs "$DATA/runs/$out" "${@:5}"
}
suite flickr-tags table1 "$SEEDS"
suite weak-image table1 1
suite balanced table1 1
suite flickr-tags eta 1
suite weak-image table1 "$SEEDS"
suite balanced table1 "$SEEDS"
suite flickr-tags eta "$SEEDS"
# Checks of the report: 3x the budget for the figure's methods (one seed), and checkpoints
# selected with the label embedding instead of pooled.
suite flickr-tags table1 1 flickr-tags-1800 --variants ours,imc,dscmr --steps 1800
suite flickr-tags table1 "$SEEDS" flickr-tags-label-select --variants ours,imc,st,wo-c,dscmr \
  --config tools/experiment-label-select.json
