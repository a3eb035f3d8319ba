#!/usr/bin/env bash
# The GPU check, on the GPU machine (tools/gpu-check.sh copies it to target/gpu-bundle/run.sh).
#   STAGES      tests,demo,bench,torch,profile,cpu (default the first four). Two device calls
#               of 540 s cover those: STAGES=tests,demo and STAGES=bench,torch (docs/results/gpu.md).
#               At most 8 files come back from a call (FILES below): a set that would leave
#               more is refused before anything runs.
#               profile: Nsight Compute's time of every kernel of one paper-preset step
#               (semshare bench-step, eager, after one warm-up step), summed by kernel name;
#               PROFILE_ARGS: bench-step's flags for it (default --precision tf32).
#               cpu: issue 17's CPU figures on this machine's own processor (the H200's host is
#               a Xeon with AMX): the bundled cpu_profile (time by op, fp32 and bf16), then
#               tools/bench_cpu_report.py with the bundled benches/cpu, on 2 CPUs (taskset),
#               CPU_ROUNDS rounds (default 1), CPU_INPUTS lengths (default full,mixed);
#               on an AMX CPU then the avx512 path's bf16 GEMMs too (about a minute);
#               cpu.md and the evidence back.
#   DEADLINE_S  one deadline for the whole run (default 540 s, under the device tool's 600);
#               each stage is capped by the time left and by its own cap (TESTS_S, DEMO_S,
#               BENCH_S, TORCH_S, PROFILE_S, CPU_S).
#   BENCH_FILTER  a criterion filter (a regex of group/bench names): only those benchmarks.
#               A bundle built with BASE=<commit> (tools/gpu-check.sh) also holds that commit's
#               benches/gpu: the bench stage runs it after this one's, same filter, and the
#               summary's "A/B" section gives each benchmark's ratio (one call, one card).
#   OUT         logs and results (default: out/ beside this script).
#   SEMSHARE_GPU=emulated  a dry run on the emulated device (no driver needed): tests every
#               stage's plumbing and the summary before GPU time is spent (DEMO_ARGS shrinks the
#               demo; default 3 steps on 64/16/32 items). No figure of it is a GPU figure.
# tests: tests/gpu_* with SEMSHARE_REQUIRE_GPU=1 (a skip fails). demo: semshare demo --device
# cuda. bench: criterion (benches/gpu) with CRITERION_HOME=$OUT/criterion, packed into
# $OUT/criterion.tar.gz at the end (the device tool returns 8 files, 2 folders deep). torch: the
# PyTorch baseline (torch_reference.py bench-gpu --compile: fp32, TF32, bf16 eager, then bf16 +
# torch.compile, the bf16 target's baseline, last so a slow compile costs no other mode) on the same machine in the same call, so every
# ratio and "% of copy bandwidth" in the summary is from one machine.
# $OUT gets device.txt, <stage>.log (profile.txt, cpu-evidence.tar.gz), criterion.tar.gz and summary.txt; the summary is written
# on every exit (a trap), by bash and awk alone. Exit 0 only if every selected stage passed.
set -euo pipefail
shopt -s nullglob

HERE=$(cd "$(dirname "$0")" && pwd)
# The base commit whose benches/gpu_base the bundle holds (tools/gpu-check.sh BASE=), if any.
BASE_COMMIT=$(awk '/^base / { print $2 }' "$HERE/MANIFEST" 2>/dev/null || true)
OUT=${OUT:-$HERE/out}
STAGES=${STAGES:-tests,demo,bench,torch}
DEADLINE_S=${DEADLINE_S:-540}
RESERVE_S=15 # kept back for packing and the summary
T0=$SECONDS
ALL_STAGES=(tests demo bench torch profile cpu)
declare -A CAP=([tests]=${TESTS_S:-300} [demo]=${DEMO_S:-200} [bench]=${BENCH_S:-330} [torch]=${TORCH_S:-180} [profile]=${PROFILE_S:-180} [cpu]=${CPU_S:-540})
declare -A STATUS=() WHY=()
BLOCK=""      # why no GPU stage can run (no driver, no cuBLAS)
CUBLAS=""     # the cuBLAS every stage loads
CHILD=""      # the running stage command
mkdir -p "$OUT"
WORK=$(mktemp -d)
# The binaries come gzipped (tools/gpu-check.sh: a third of their size, so that the bundle
# stays well under the 64 MiB the device tool carries); unpacked into the work folder first.
BIN=$HERE
if [[ -f $HERE/bins.tar.gz ]]; then
  BIN=$WORK/bin
  mkdir -p "$BIN"
  tar -C "$BIN" -xzf "$HERE/bins.tar.gz" || { echo "run.sh: error: cannot unpack $HERE/bins.tar.gz" >&2; exit 1; }
fi
ROWS=$WORK/rows.tsv # kind, name, result, status: the summary's detail lines
: >"$ROWS"

has() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $((DEADLINE_S - RESERVE_S - (SECONDS - T0))); }
row() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$ROWS"; }
fail() { STATUS[$1]=FAIL; WHY[$1]=$2; }

for s in ${STAGES//,/ }; do
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "run.sh: error: unknown stage '$s' (${ALL_STAGES[*]})" >&2; exit 2; }
done
# The device tool returns at most 8 files from $OUT: what each stage leaves there, with
# device.txt and summary.txt.
declare -A FILES=([tests]=1 [demo]=1 [bench]=2 [torch]=1 [profile]=1 [cpu]=1)
nfiles=2
for s in ${STAGES//,/ }; do nfiles=$((nfiles + FILES[$s])); done
if ((nfiles > 8)); then
  echo "run.sh: error: STAGES=$STAGES leave $nfiles files in \$OUT and the device tool returns 8: split them over two calls" >&2
  exit 2
fi

# What went wrong, from a log: the first panic's message, else the last error-like line, else
# the last line.
why_of() {
  awk '/^=== / { next }
       p { if (msg == "") msg = $0; p = 0 }
       /panicked at/ { p = 1 }
       /[Ee]rror|FAILED|[Ff]ailed|SKIP|[Nn]ot found|No such|[Nn]o CUDA|out of memory/ { e = $0 }
       NF { l = $0 }
       END { s = (msg != "" ? msg : e != "" ? e : l); gsub(/[ \t]+/, " ", s); print substr(s, 1, 150) }' "$1" 2>/dev/null || true
}

# One timed command of a stage: capped by the stage's end and the deadline; "=== exit RC" after.
capped() { # end log cmd...
  local end=$1 log=$2 t rc=0
  shift 2
  t=$((end - SECONDS))
  if ((t > $(left))); then t=$(left); fi
  if ((t < 5)); then
    echo "=== not run: deadline" >>"$log"
    return 124
  fi
  # In the background with a wait, so that a signal to this script runs the trap at once.
  timeout -k 5 "$t" "$@" >>"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  echo "=== exit $rc" >>"$log"
  return "$rc"
}

# Whether a stage can start: false (and the stage failed) when the deadline is too close.
can_start() {
  (($(left) >= 10)) && return 0
  fail "$1" "not run: the ${DEADLINE_S} s deadline was reached before it ($((SECONDS - T0)) s used)"
  return 1
}

# Why a capped command failed, from its exit status and its log.
reason() { # rc log
  if [[ $(tail -1 "$2") == "=== not run: deadline" ]]; then
    echo "not run: the ${DEADLINE_S} s deadline was reached"
    return
  fi
  case $1 in
    124 | 137) echo "timed out (stage cap or the ${DEADLINE_S} s deadline): $(why_of "$2")" ;;
    127) echo "not found: $(why_of "$2")" ;;
    *) echo "exit $1: $(why_of "$2")" ;;
  esac
}

# Criterion medians (ms) under $OUT/criterion: group/bench<TAB>ms lines.
criterion_rows() {
  local f name dir=${1:-criterion}
  for f in "$OUT/$dir"/*/*/new/estimates.json "$OUT/$dir"/*/new/estimates.json; do
    name=${f#"$OUT/$dir/"}
    name=${name%/new/estimates.json}
    sed -E 's/.*"median":\{"confidence_interval":\{[^}]*\},"point_estimate":([-0-9.eE+]+).*/\1/' "$f" |
      awk -v n="$name" '$1 ~ /^[-0-9.eE+]+$/ { printf "%s\t%.4f\n", n, $1 / 1e6 }'
  done
}

# The PyTorch baseline's JSON lines (torch.log): measure mode<TAB>ms<TAB>GB/s or error.
torch_rows() {
  awk 'function get(k,   r) {
         if (!match($0, "\"" k "\": (\"[^\"]*\"|[^,}]*)")) return ""
         r = substr($0, RSTART + length(k) + 4, RLENGTH - length(k) - 4); gsub(/"/, "", r); return r }
       /^\{/ { m = get("measure"); if (m == "") next
               name = m (get("mode") != "" ? " " get("mode") : "")
               if (get("median_ms") != "") printf "%s\t%s\t%s\n", name, get("median_ms"), get("gb_per_s_median")
               else if (get("error") != "") printf "%s\terror\t%s\n", name, get("error") }' "$OUT/torch.log" 2>/dev/null || true
}

# Ratios and bandwidths, all from this call: semshare's criterion medians against the
# PyTorch baseline and the copy bandwidth (semshare's 1 GiB device copy, else PyTorch's).
comparisons() {
  awk -F'\t' '
    FILENAME == ARGV[1] { s[$1] = $2; ns++; next }
    $2 == "error" { err[$1] = 1; nt++; next }
    { t[$1] = $2; g[$1] = $3; nt++ }
    function gbs(bytes, ms) { return bytes / ms / 1e6 }
    function missing(a, b) { # the names of what this call did not measure
      return "missing: " (a in s ? "" : "semshare " a " ") (b == "" || b in t ? "" : "pytorch " b (b in err ? " (error)" : ""))
    }
    function ratio(label, a, b) {
      if (a in s && b in t) printf "%-28s semshare %9.4f ms  pytorch %9.4f ms  ratio %.2f (semshare/pytorch)\n", label, s[a], t[b], s[a] / t[b]
      else printf "%-28s %s\n", label, missing(a, b)
    }
    function bw(label, bytes, a, b,   x, line) {
      line = sprintf("%-28s", label)
      if (a in s) { x = gbs(bytes, s[a]); line = line sprintf(" semshare %8.1f GB/s", x); if (copy > 0) line = line sprintf(" = %5.1f%% of copy", 100 * x / copy) }
      if (b in t) { x = gbs(bytes, t[b]); line = line sprintf("  pytorch %8.1f GB/s", x); if (copy > 0) line = line sprintf(" = %5.1f%%", 100 * x / copy) }
      if (!(a in s) || (b != "" && !(b in t))) line = line "  " missing(a, b)
      print line
    }
    END {
      N = 4608 * 1024 * 4 # one [4608, 1024] f32 tensor, bytes
      if ("copy/dtod_1GiB" in s) copy = gbs(2 * 2^30, s["copy/dtod_1GiB"])
      tcopy = ("copy_bandwidth" in g) ? g["copy_bandwidth"] + 0 : 0
      if (copy == 0) copy = tcopy
      if (ns + nt == 0) exit
      print "\nCOMPARISONS (this call, this card; bytes are the fewest an op must move)"
      printf "%-28s semshare %s  pytorch %s (read + written)\n", "copy bandwidth", ("copy/dtod_1GiB" in s ? sprintf("%.1f GB/s", gbs(2 * 2^30, s["copy/dtod_1GiB"])) : "-"), (tcopy > 0 ? sprintf("%.1f GB/s", tcopy) : "-")
      bw("layernorm fwd (2 x 18.9 MB)", 2 * N, "layernorm_4608x1024/fwd", "layernorm_fwd fp32")
      bw("layernorm fwd+bwd (5 x)", 5 * N, "layernorm_4608x1024/fwd_bwd", "layernorm_fwd_bwd fp32")
      bw("join bwd + sums (4 x)", 4 * N, "layernorm_4608x1024/join_bwd", "")
      bw("join fwd (4 x)", 4 * N, "layernorm_4608x1024/join_fwd", "")
      bw("join fwd bf16 (4 x 9.4 MB)", 2 * N, "layernorm_4608x1024/join_fwd_bf16", "")
      bw("join bwd bf16 (4 x 9.4 MB)", 2 * N, "layernorm_4608x1024/join_bwd_bf16", "")
      ratio("attention fwd vs SDPA", "attention_128x8x36x128/fwd", "sdpa_fwd fp32")
      ratio("attention fwd+bwd vs SDPA", "attention_128x8x36x128/fwd_bwd", "sdpa_fwd_bwd fp32")
      ratio("attention bf16 fwd (tensor cores) vs SDPA bf16", "attention_128x8x36x128/fwd_bf16", "sdpa_fwd bf16")
      ratio("attention bf16 fwd+bwd vs SDPA bf16", "attention_128x8x36x128/fwd_bwd_bf16", "sdpa_fwd_bwd bf16")
      a = "attention_128x8x36x128/fwd_bf16"; b = "attention_128x8x36x128/fwd"
      if (a in s && b in s) printf "%-28s tensor cores %9.4f ms  fp32 FMA %9.4f ms  ratio %.2f\n", "attention fwd: bf16 mma vs fp32 FMA", s[a], s[b], s[a] / s[b]
      else printf "%-28s missing: %s %s\n", "attention fwd: bf16 mma vs fp32 FMA", (a in s ? "" : a), (b in s ? "" : b)
      a = "attention_128x8x36x128/fwd_bwd_bias"; b = "attention_128x8x36x128/fwd_bwd_then_bias_bwd"
      if (a in s && b in s) printf "%-28s fused %9.4f ms  unfused %9.4f ms  ratio %.2f (fused/unfused)\n", "attention + qkv bias grad", s[a], s[b], s[a] / s[b]
      else printf "%-28s missing: %s %s\n", "attention + qkv bias grad", (a in s ? "" : a), (b in s ? "" : b)
      ratio("Bi-GRU fwd vs cuDNN", "bigru_b128_t32_300x512_ieee/fwd", "bigru_fwd fp32")
      ratio("Bi-GRU fwd+bwd vs cuDNN", "bigru_b128_t32_300x512_ieee/fwd_bwd", "bigru_fwd_bwd fp32")
      ratio("BCE fwd+bwd 128x24", "losses/bce_fwd_bwd_128x24", "bce_fwd_bwd fp32")
      ratio("CE fwd+bwd 614x10000", "losses/ce_fwd_bwd_614x10000", "ce_fwd_bwd fp32")
      ratio("train step TF32", "paper_b128_t32/train_step_tf32", "train_step tf32")
      ratio("train step TF32, CUDA graph", "paper_b128_t32/train_step_graph_tf32", "train_step tf32")
      ratio("train step IEEE (fp32)", "paper_b128_t32/train_step_ieee", "train_step fp32")
      ratio("train step bf16", "paper_b128_t32/train_step_bf16", "train_step bf16")
      ratio("train step bf16, CUDA graph", "paper_b128_t32/train_step_graph_bf16", "train_step bf16")
      ratio("train step bf16 vs compile", "paper_b128_t32/train_step_graph_bf16", "train_step bf16-compile")
      ratio("embed 128+128 (TF32)", "paper_b128_t32/embed_128img_128txt", "embed_128+128 tf32")
      ratio("embed 128+128 (bf16)", "paper_b128_t32/embed_128img_128txt_bf16", "embed_128+128 bf16")
    }' "$WORK/bench.tsv" "$WORK/torch.tsv"
}

# Runs on every exit: marks what did not finish, packs criterion's results, writes the summary.
finish() {
  local rc=$? s bad=0
  trap - EXIT
  set +eu
  if [[ -n $CHILD ]]; then # interrupted mid-stage: stop it (timeout passes TERM on)
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  for s in "${ALL_STAGES[@]}"; do
    has "$s" || continue
    [[ -n ${STATUS[$s]:-} ]] && continue
    if [[ -n $BLOCK ]]; then
      fail "$s" "not run: $BLOCK"
    else
      fail "$s" "not finished: run.sh was stopped (exit $rc) first"
    fi
  done
  criterion_rows >"$WORK/bench.tsv"
  criterion_rows criterion-base >"$WORK/base.tsv"
  torch_rows >"$WORK/torch.tsv"
  rmdir "$OUT/criterion" "$OUT/criterion-base" 2>/dev/null # nothing in them
  packed=()
  for d in criterion criterion-base; do
    if [[ -d $OUT/$d ]]; then packed+=("$d"); fi
  done
  if ((${#packed[@]})); then
    tar -C "$OUT" -czf "$OUT/criterion.tar.gz" "${packed[@]}" && (cd "$OUT" && rm -rf "${packed[@]}")
  fi
  {
    echo "GPU CHECK SUMMARY  $(date -u +%FT%TZ)  stages $STAGES  $((SECONDS - T0)) s of the ${DEADLINE_S} s deadline"
    echo "card:   $(awk -F': ' '/^card: /{print $2; f=1} END{if(!f) print "unknown"}' "$OUT/device.txt" 2>/dev/null)"
    echo "cuBLAS: ${CUBLAS:-none}"
  echo "cuBLASLt: ${CUBLASLT:-none}"
    if [[ ${SEMSHARE_GPU:-} == emulated ]]; then echo "device: EMULATED (SEMSHARE_GPU=emulated): a dry run, no GPU figure"; fi
    echo "bundle: $(head -1 "$HERE/MANIFEST" 2>/dev/null || echo 'no MANIFEST')"
    echo
    printf '%-6s  %-6s  %s\n' stage status "result / why"
    for s in "${ALL_STAGES[@]}"; do
      has "$s" || continue
      [[ ${STATUS[$s]} == ok ]] || bad=1
      printf '%-6s  %-6s  %s\n' "$s" "${STATUS[$s]}" "${WHY[$s]}"
    done
    if [[ -s $ROWS || -s $WORK/bench.tsv || -s $WORK/torch.tsv ]]; then
      echo
      { cat "$ROWS"
        awk -F'\t' '{ printf "semshare\t%s\t%s ms\t\n", $1, $2 }' "$WORK/bench.tsv"
        awk -F'\t' '{ printf "base\t%s\t%s ms\t\n", $1, $2 }' "$WORK/base.tsv"
        awk -F'\t' '{ printf "pytorch\t%s\t%s\t\n", $1, ($2 == "error" ? "error: " substr($3, 1, 60) : $2 " ms" ($3 != "" ? " (" $3 " GB/s)" : "")) }' "$WORK/torch.tsv"
      } | awk -F'\t' '{ printf "%-9s %-44s %-5s %s\n", $1, $2, $4, $3 }'
    fi
    comparisons
    if [[ -s $WORK/base.tsv ]]; then
      echo
      echo "A/B: this bundle's commit against base $BASE_COMMIT (ratio below 1: this one faster)"
      awk -F'\t' 'NR == FNR { base[$1] = $2; next }
        ($1 in base) && base[$1] > 0 { printf "%-50s %9.4f ms  base %9.4f ms  ratio %.2f\n", $1, $2, base[$1], $2 / base[$1] }' \
        "$WORK/base.tsv" "$WORK/bench.tsv"
    fi
    echo
    echo "OVERALL: $([[ $bad == 0 ]] && echo ok || echo FAIL)   (logs and device.txt in $OUT)"
  } >"$OUT/summary.txt" 2>&1
  cat "$OUT/summary.txt"
  rm -rf "$WORK"
  ((bad == 0 && rc == 0)) && exit 0
  exit 1
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the machine: driver, cuBLAS, card -------------------------------------------------

# Every path of library NAME the loader could use (its cache, LD_LIBRARY_PATH) or that sits in
# one of DIRS; never a CUDA "stubs" or "compat" copy (they cannot drive this machine's GPU).
find_lib() { # name dirs...
  local name=$1 d
  shift
  {
    ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n { print $NF }' || true
    IFS=: read -ra lp <<<"${LD_LIBRARY_PATH:-}"
    for d in "${lp[@]}" "$@"; do
      if [[ -n $d && -e $d/$name ]]; then echo "$d/$name"; fi
    done
    true
  } | awk '!/\/(stubs|compat)\// && !seen[$0]++'
}

# Python's site-packages (PyTorch's wheels put cuBLAS in nvidia/*/lib there), from python3 if it
# runs, else the usual places.
site_dirs() {
  if command -v python3 >/dev/null; then
    timeout 30 python3 -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null || true
  fi
  local d
  for d in /usr/lib/python3*/site-packages /usr/lib/python3/dist-packages /usr/local/lib/python3*/*-packages \
    /opt/*/.venv/lib/python3*/site-packages /opt/conda/lib/python3*/site-packages; do
    echo "$d"
  done
}

# cuBLAS 13 (the build's cudarc speaks CUDA 13's API): the toolkit first, then the loader's
# cache, then the wheels; CUBLAS_DIR puts a folder first.
cublas_candidates() {
  local d f
  for d in ${CUBLAS_DIR:-} /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda*/targets/*/lib; do
    for f in "$d"/libcublas.so.13*; do echo "$f"; done
  done
  ldconfig -p 2>/dev/null | awk '$1 ~ /^libcublas\.so\.13/ { print $NF }' || true
  while read -r d; do
    [[ -d $d ]] || continue
    for f in "$d"/nvidia/*/lib/libcublas.so.13* "$d"/torch/lib/libcublas.so.13*; do echo "$f"; done
  done < <(site_dirs)
}

{
  cat "$HERE/MANIFEST" 2>/dev/null || echo "no MANIFEST"
  echo "run $(date -u +%FT%TZ) on $(hostname 2>/dev/null || echo '?') ($(uname -srm)), stages $STAGES, deadline ${DEADLINE_S} s"
  # The host's processor (the cpu stage's figures name it; its report prints it only at its end).
  echo "host cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null), $(nproc) CPUs," \
    "load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null), flags: $(grep -m1 -o -w -E 'avx512(f|_bf16|_fp16)|amx_(bf16|tile|int8)' /proc/cpuinfo 2>/dev/null | tr '\n' ' ')"
} >"$OUT/device.txt"

if [[ ${SEMSHARE_GPU:-} == emulated ]]; then
  # A dry run on the emulated device (emu/, built into the binaries): every stage's plumbing and
  # the summary's parsing before GPU time is spent. Its timings are no GPU figure.
  LIBCUDA="" CUBLAS="" CUBLASLT="" FOUND=()
  DEMO_ARGS=${DEMO_ARGS:---steps 1 --train 32 --val 8 --test 16}
else
  LIBCUDA=$(find_lib libcuda.so.1 /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib | awk 'NR == 1')
  mapfile -t FOUND < <(cublas_candidates | while read -r f; do [[ -e $f ]] && readlink -f "$f"; done | awk '!seen[$0]++')
  CUBLAS=${FOUND[0]:-}
  # cuBLASLt (the bias epilogue's GEMMs) ships beside cuBLAS: the one of the same folder.
  CUBLASLT=""
  if [[ -n $CUBLAS ]]; then
    CUBLASLT=$(for f in "$(dirname "$CUBLAS")"/libcublasLt.so.13*; do if [[ -e $f ]]; then readlink -f "$f"; fi; done | awk 'NR == 1')
    if [[ -z $CUBLASLT ]]; then BLOCK="no libcublasLt.so.13 beside $CUBLAS"; fi
  fi
  if [[ -z $LIBCUDA ]]; then
    BLOCK="no NVIDIA driver (libcuda.so.1 not found)"
  fi
  if [[ -z $CUBLAS ]]; then
    others=$(timeout 20 find /usr /opt -name 'libcublas.so.*' 2>/dev/null | awk 'NR <= 3' | tr '\n' ' ' || true)
    BLOCK="${BLOCK:+$BLOCK; }no cuBLAS 13 found (libcublas.so.13 in /usr/local/cuda*/lib64, ldconfig -p, site-packages nvidia/*/lib)${others:+; other versions: $others}"
  fi
fi

# cudarc dlopens "libcuda.so", "libcublas.so" and "libcublasLt.so" first: links in a private
# folder, first on LD_LIBRARY_PATH, make those names resolve to the libraries chosen here and
# nothing else.
# PyTorch keeps the caller's LD_LIBRARY_PATH (ORIG_LDP): its wheels carry their own cuBLAS.
mkdir -p "$WORK/lib"
if [[ -n $LIBCUDA ]]; then ln -sf "$(readlink -f "$LIBCUDA")" "$WORK/lib/libcuda.so"; fi
if [[ -n $CUBLAS ]]; then ln -sf "$CUBLAS" "$WORK/lib/libcublas.so"; fi
if [[ -n $CUBLASLT ]]; then ln -sf "$CUBLASLT" "$WORK/lib/libcublasLt.so"; fi
ORIG_LDP=${LD_LIBRARY_PATH:-}
# PyTorch's stages (torch, cpu) run under the caller's LD_LIBRARY_PATH: its wheels carry their
# own cuBLAS.
TORCH_LDP=(-u LD_LIBRARY_PATH)
if [[ -n $ORIG_LDP ]]; then TORCH_LDP=(LD_LIBRARY_PATH="$ORIG_LDP"); fi
export LD_LIBRARY_PATH=$WORK/lib${CUBLAS:+:$(dirname "$CUBLAS")}${LIBCUDA:+:$(dirname "$LIBCUDA")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export SEMSHARE_REQUIRE_GPU=1

{
  echo "driver: ${LIBCUDA:-none} ${LIBCUDA:+-> $(readlink -f "$LIBCUDA")}"
  echo "cuBLAS: ${CUBLAS:-none}"
  echo "cuBLASLt: ${CUBLASLT:-none}"
  if ((${#FOUND[@]} > 1)); then echo "cuBLAS also found: ${FOUND[*]:1}"; fi
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  if command -v nvidia-smi >/dev/null; then
    echo "card: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 | head -1)"
    timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi failed (exit $?)"
  else
    echo "card: nvidia-smi not found"
  fi
  if [[ -n $BLOCK ]]; then echo "blocked: $BLOCK"; fi
  if [[ ${SEMSHARE_GPU:-} == emulated ]]; then echo "device: EMULATED (SEMSHARE_GPU=emulated): a dry run, no figure here is a GPU figure"; fi
} >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [[ -n $BLOCK ]]; then
  echo "run.sh: error: $BLOCK" >&2
  exit 1
fi

# ---- stages ------------------------------------------------------------------------------

if has tests && can_start tests; then
  log=$OUT/tests.log
  : >"$log"
  end=$((SECONDS + CAP[tests]))
  first="" # the first failure: the stage's reason
  n=0
  for t in "$BIN"/tests/*; do
    name=$(basename "$t")
    n=$((n + 1))
    echo "=== $name" >>"$log"
    start=$(wc -l <"$log")
    rc=0
    # --nocapture and SEMSHARE_PRINT_ERRORS: the measured errors (ERR lines, gpu_train's
    # worst gradient and 20-step drift) are figures to record, not only pass/fail.
    # SEMSHARE_BIN: the tests that run the CLI (gpu_train's demo) would look for it where cargo
    # built it, on the machine that built the bundle.
    capped "$end" "$log" env SEMSHARE_PRINT_ERRORS=1 SEMSHARE_BIN="$BIN/semshare" "$t" --test-threads=4 --nocapture || rc=$?
    part=$WORK/part.log
    tail -n +"$start" "$log" >"$part"
    passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^passed/) p += $i } END { print p + 0 }' "$part")
    failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) f += $i } END { print f + 0 }' "$part")
    maxerr=$(awk '/^ERR / && $2 + 0 >= m { m = $2 + 0; w = $3 } END { if (w != "") printf "max error %.2e (%s)", m, w }' "$part")
    awk '/^worst parameter gradient:|^20 steps:|^bf16: /' "$part" | while read -r l; do row test "$name" "$l" ""; done
    if ((rc == 0 && failed == 0 && passed > 0)); then
      row test "$name" "$passed passed${maxerr:+, $maxerr}" ok
    else
      why=$(reason "$rc" "$part")
      if ((rc == 0 && passed == 0)); then why="no test ran: $(why_of "$part")"; fi
      row test "$name" "$passed passed, $failed failed: $why" FAIL
      if [[ -z $first ]]; then first="$name: $why"; fi
    fi
  done
  if ((n == 0)); then
    fail tests "no test binaries in $BIN/tests"
  elif [[ -n $first ]]; then
    fail tests "$first"
  else
    STATUS[tests]=ok
    WHY[tests]="$n test binaries passed"
  fi
fi

if has demo && can_start demo; then
  log=$OUT/demo.log
  : >"$log"
  rc=0
  # shellcheck disable=SC2086 # DEMO_ARGS is a list of flags (the emulated dry run's are smaller)
  capped $((SECONDS + CAP[demo])) "$log" "$BIN/semshare" demo --device cuda --out "$WORK/demo" ${DEMO_ARGS:-} || rc=$?
  if ((rc == 0)); then
    STATUS[demo]=ok
    WHY[demo]=$(awk '/^semshare demo:/ { sub(/^semshare demo: /, ""); print }' "$log")
    awk '$1 ~ /^(metric|NDCG@|mAP@|R@)/' "$log" | while read -r l; do row demo "$l" "" ""; done
  else
    fail demo "$(reason "$rc" "$log")"
  fi
fi

if has bench && can_start bench; then
  log=$OUT/bench.log
  : >"$log"
  rc=0
  mkdir -p "$OUT/criterion"
  cd "$WORK" # criterion writes nothing else, but keep the bundle clean
  end=$((SECONDS + CAP[bench]))
  capped "$end" "$log" env CRITERION_HOME="$OUT/criterion" "$BIN/benches/gpu" --bench ${BENCH_FILTER:+"$BENCH_FILTER"} || rc=$?
  # The base commit's benchmarks (tools/gpu-check.sh BASE=<commit>), the same filter, right
  # after: an A/B of two versions in one call, on one card.
  if ((rc == 0)) && [[ -x $BIN/benches/gpu_base ]]; then
    echo "=== benches/gpu_base ($BASE_COMMIT)" >>"$log"
    mkdir -p "$OUT/criterion-base"
    capped "$end" "$log" env CRITERION_HOME="$OUT/criterion-base" "$BIN/benches/gpu_base" --bench ${BENCH_FILTER:+"$BENCH_FILTER"} || rc=$?
  fi
  results=$(criterion_rows | wc -l)
  loaded=$(awk '/benches\/gpu: loaded .*libcublas/ { print $NF; exit }' "$log")
  if ((rc == 0 && results > 0)); then
    STATUS[bench]=ok
    WHY[bench]="$results criterion results${loaded:+; cuBLAS loaded: $loaded}"
  elif ((rc == 0)); then
    fail bench "no results: $(why_of "$log")"
  else
    fail bench "$(reason "$rc" "$log") ($results results before it stopped)"
  fi
fi

if has torch && can_start torch; then
  log=$OUT/torch.log
  : >"$log"
  if ! command -v python3 >/dev/null; then
    echo "python3 not found" >"$log"
    fail torch "not run: python3 not found"
  else
    rc=0
    capped $((SECONDS + CAP[torch])) "$log" env "${TORCH_LDP[@]}" PYTHONUNBUFFERED=1 python3 "$HERE/tools/torch_reference.py" bench-gpu --compile || rc=$?
    if ((rc == 0)); then
      STATUS[torch]=ok
      WHY[torch]="$(torch_rows | awk -F'\t' '$2 != "error"' | wc -l) measures; $(awk '/^\{/ && match($0, /"torch": "[^"]*"/) { print "torch " substr($0, RSTART + 10, RLENGTH - 11); exit }' "$log")"
    else
      fail torch "$(reason "$rc" "$log")"
    fi
  fi
fi

if has profile && can_start profile; then
  # Its log joins profile.txt at the end (the device tool returns 8 files: see FILES above).
  log=$WORK/profile.log
  : >"$log"
  ncu=$(command -v ncu || true)
  if [[ -z $ncu ]]; then
    for f in /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu; do [[ -x $f ]] && { ncu=$f; break; }; done
  fi
  if [[ -z $ncu || ${SEMSHARE_GPU:-} == emulated ]]; then
    echo "ncu not found (or the emulated device)" >"$log"
    if [[ -z $ncu ]]; then fail profile "not run: ncu not found"; else fail profile "not run: the emulated device has no counters"; fi
  else
    rc=0
    # One pass of one metric: application replay runs the program once, nothing saved and
    # restored per kernel. The clocks stay as the card has them (METHOD.md). Two steps run
    # (warm-up and measured); launches of the first are skipped by name count below.
    capped $((SECONDS + CAP[profile])) "$log" "$ncu" --clock-control none --replay-mode application \
      --metrics gpu__time_duration.sum --csv --page raw --print-units base --print-kernel-base function \
      --log-file "$WORK/profile.csv" "$BIN/semshare" bench-step --model paper --device cuda \
      ${PROFILE_ARGS:---precision tf32} --warmup 1 --steps 1 || rc=$?
    # The raw CSV stays behind (the device tool returns 8 files); its sums by kernel come back.
    if ((rc == 0)) && python3 - "$WORK/profile.csv" "${PROFILE_ARGS:---precision tf32}" >"$OUT/profile.txt" 2>>"$log" <<'PY'
import collections, csv, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
tot, n = collections.defaultdict(float), collections.Counter()
for row in csv.DictReader(lines[start:]):
    try:
        v = float(row["gpu__time_duration.sum"].replace(",", ""))  # ncu groups thousands
    except (KeyError, ValueError):
        continue  # the units row
    tot[row["Kernel Name"]] += v
    n[row["Kernel Name"]] += 1
T = sum(tot.values())
if not n or T <= 0:
    sys.exit("profile: no kernel durations in ncu's CSV")
# Two steps ran (one warm-up): per step is half of each total; setup kernels are few.
embed = "--embed" in sys.argv[2].split()
what, whats, unit = ("embedding pass", "embedding passes", "pass") if embed else ("step", "steps", "step")
print(f"profile: 2 paper {whats} ({sys.argv[2]}), {sum(n.values())} kernel launches, {T / 2e6:.3f} ms of kernel time per {what} (serialised by ncu)")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:40]:
    print(f"{v / 2e6:9.3f} ms/{unit} {100 * v / T:5.1f}%  {n[k] / 2:7.1f}x/{unit}  {k[:100]}")
PY
    then
      STATUS[profile]=ok
      WHY[profile]=$(head -1 "$OUT/profile.txt")
      sed -n '2,16p' "$OUT/profile.txt" | while read -r l; do row profile "$l" "" ""; done
    else
      fail profile "$(reason "${rc/#0/1}" "$log")"
    fi
  fi
  { echo "--- log"; cat "$log"; } >>"$OUT/profile.txt"
fi

if has cpu && can_start cpu; then
  # Its log travels in the evidence tarball (one file back); its table rows in the summary.
  mkdir -p "$WORK/cpu-evidence-log"
  log=$WORK/cpu-evidence-log/cpu.log
  : >"$log"
  rc=0
  # Two CPUs, as issue 17's figures are defined (2 threads each side).
  skip_onnx=()
  if ! env "${TORCH_LDP[@]}" python3 -c 'import onnxruntime' 2>/dev/null; then
    skip_onnx=(--skip-onnx)
    echo "onnxruntime not importable: the report runs with --skip-onnx" >>"$log"
  fi
  n=$(nproc)
  pair=$((n > 1 ? n - 2 : 0)),$((n - 1)) # the last two: away from CPU 0's interrupts
  end=$((SECONDS + CAP[cpu]))
  # First where the time goes by op (examples/cpu_profile: the full-length step and embedding,
  # fp32 and bf16; about 10 s in all), on the same two CPUs: the report says how fast, this why.
  for precision in fp32 bf16; do
    echo "=== cpu_profile 10 $precision" >>"$log"
    capped $((SECONDS + 60 < end ? SECONDS + 60 : end)) "$log" taskset -c "$pair" "$BIN/cpu_profile" 10 "$precision" ||
      echo "run.sh: cpu_profile $precision failed; the report goes on" >>"$log"
  done
  capped "$end" "$log" env "${TORCH_LDP[@]}" PYTHONUNBUFFERED=1 taskset -c "$pair" python3 \
    "$HERE/tools/bench_cpu_report.py" --bench-binary "$BIN/benches/cpu" --rounds "${CPU_ROUNDS:-1}" \
    --inputs "${CPU_INPUTS:-full,mixed}" --evidence "$WORK/cpu-evidence" "${skip_onnx[@]}" || rc=$?
  # On an AMX CPU, the avx512 path's bf16 kernel (vdpbf16ps) on the same shapes, after the
  # report: the two bf16 kernels of one CPU under the same blocking and bytes, which tells
  # the tile kernel's cost from the rest (issue 17: AMX at 2-5x oneDNN's time, session 27).
  if ((rc == 0)) && grep -qw amx_tile /proc/cpuinfo && ((SECONDS + 90 < end)); then
    home=$WORK/cpu-evidence/criterion-avx512-bf16
    mkdir -p "$home"
    echo "=== the avx512 path's bf16 GEMMs (SEMSHARE_CPU=avx512)" >>"$log"
    if capped "$end" "$log" env SEMSHARE_CPU=avx512 CRITERION_HOME="$home" taskset -c "$pair" \
      "$BIN/benches/cpu" --bench '^gemm/semshare_avx512_bf16(_packed)?/'; then
      python3 - "$home" >>"$log" <<'PY' || echo "run.sh: could not read the avx512 bf16 medians" >>"$log"
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("gemm/*/new/estimates.json")):
    ms = json.load(open(p))["median"]["point_estimate"] / 1e6
    print(f"| {p.parts[-3]}: the avx512 path's bf16 kernel on this AMX CPU | {ms:.3f} ms |")
PY
    fi
  fi
  # The report's table is in the log; the raw runs (every measure finished, should the cap stop
  # it: the report prints its table only at the end) come back packed with it.
  packed=(cpu-evidence-log)
  if [[ -d $WORK/cpu-evidence ]]; then packed+=(cpu-evidence); fi
  tar -C "$WORK" -czf "$OUT/cpu-evidence.tar.gz" "${packed[@]}" || echo "run.sh: could not pack the cpu evidence" >&2
  if ((rc == 0)); then
    STATUS[cpu]=ok
    WHY[cpu]=$(awk '/^Machine:/ { print substr($0, 1, 150); exit }' "$log")
    # The report's rows (cpu_profile's tables, before them in the log, stay in the evidence).
    awk '/^Machine:/ { r = 1 } r && /^\| [a-z0-9]/ && !/^\| (measure|GEMM|copy)/' "$log" | while read -r l; do row cpu "$l" "" ""; done
  else
    fail cpu "$(reason "$rc" "$log")"
  fi
fi
