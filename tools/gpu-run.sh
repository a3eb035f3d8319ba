#!/usr/bin/env bash
# The GPU check, on the GPU machine (copied to target/gpu-bundle/run.sh by tools/gpu-check.sh).
# Runs in one go: the GPU test suite with SEMSHARE_REQUIRE_GPU=1 (a skip is a failure), the
# CLI demo on CUDA, the criterion benchmarks, and the PyTorch baseline
# (`torch_reference.py bench-gpu`, JSON lines with "measure" and "median_ms"). Logs go to
# $OUT (or ./out); ONE summary table is printed at the end and saved as $OUT/summary.txt.
# Exit status: non-zero if any test or the demo failed.
# STAGES=tests,demo,bench,torch selects stages (default all).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export SEMSHARE_REQUIRE_GPU=1
STAGES=${STAGES:-tests,demo,bench,torch}
WORK=$(mktemp -d)
has() { [[ ",$STAGES," == *",$1,"* ]]; }

{ cat "$HERE/MANIFEST"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
  >"$OUT/device.txt" 2>&1 || true
cat "$OUT/device.txt"

if has tests; then
  : >"$OUT/tests.log"
  for t in "$HERE"/tests/*; do
    echo "=== $(basename "$t")" >>"$OUT/tests.log"
    timeout 300 "$t" --test-threads=4 >>"$OUT/tests.log" 2>&1
    echo "=== exit $?" >>"$OUT/tests.log"
  done
fi
if has demo; then
  timeout 240 "$HERE/semshare" demo --device cuda --out "$WORK/demo" >"$OUT/demo.log" 2>&1
  echo "=== exit $?" >>"$OUT/demo.log"
fi
if has bench; then
  CRITERION_HOME="$WORK/criterion" timeout 300 "$HERE/benches/gpu" --bench >"$OUT/bench.log" 2>&1
  echo "=== exit $?" >>"$OUT/bench.log"
fi
if has torch; then
  (cd "$HERE" && PYTHONUNBUFFERED=1 timeout 240 python3 torch_reference.py bench-gpu) >"$OUT/torch.log" 2>&1
  echo "=== exit $?" >>"$OUT/torch.log"
fi

python3 - "$OUT" "$WORK/criterion" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, re, sys
out, crit = sys.argv[1], sys.argv[2]
rows, bad = [], False
def read(name):
    p = os.path.join(out, name)
    return open(p, errors="replace").read() if os.path.exists(p) else None
log = read("tests.log")
if log is not None:
    for block in re.split(r"^=== (?!exit)", log, flags=re.M)[1:]:
        name = block.split("\n", 1)[0]
        code = re.search(r"^=== exit (\d+)", block, re.M)
        passed = sum(int(x) for x in re.findall(r"(\d+) passed", block))
        failed = sum(int(x) for x in re.findall(r"(\d+) failed", block))
        ok = code is not None and code.group(1) == "0" and failed == 0 and passed > 0
        bad |= not ok
        rows.append(("test", name, f"{passed} passed, {failed} failed", "ok" if ok else "FAIL"))
log = read("demo.log")
if log is not None:
    ok = "=== exit 0" in log
    bad |= not ok
    last = [l for l in log.splitlines() if l.strip() and not l.startswith("===")][-1:] or [""]
    rows.append(("demo", "semshare demo --device cuda", last[0][:60], "ok" if ok else "FAIL"))
for f in sorted(glob.glob(os.path.join(crit, "**", "new", "estimates.json"), recursive=True)):
    name = os.path.relpath(os.path.dirname(os.path.dirname(f)), crit)
    med = json.load(open(f))["median"]["point_estimate"] / 1e6
    rows.append(("semshare", name, f"{med:.4f} ms", ""))
log = read("bench.log")
if log is not None and ("=== exit 0" not in log or not glob.glob(os.path.join(crit, "**", "estimates.json"), recursive=True)):
    bad = True
    rows.append(("semshare", "benches/gpu", "no results: see bench.log", "FAIL"))
log = read("torch.log")
if log is not None:
    for l in log.splitlines():
        try:
            m = json.loads(l)
        except ValueError:
            continue
        if isinstance(m, dict) and "median_ms" in m:
            tag = " ".join(str(m[k]) for k in ("mode", "dtype") if k in m)
            rows.append(("pytorch", f"{m.get('measure', '?')} {tag}".strip(), f"{m['median_ms']} ms", ""))
    if "=== exit 0" not in log:
        rows.append(("pytorch", "torch_reference.py bench-gpu", "see torch.log", "FAIL"))  # a baseline, not a verdict
w = [max([len(r[i]) for r in rows] + [4]) for i in range(4)]
print("\nGPU CHECK SUMMARY")
for r in [("what", "name", "result", "status")] + rows:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
print("\nOVERALL:", "FAIL" if bad else "ok")
sys.exit(1 if bad else 0)
PY
status=$?
rm -rf "$WORK"
exit $status
