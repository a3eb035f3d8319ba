#!/usr/bin/env python3
"""semshare's GEMM against `torch.mm`, turn about (issue 17's GEMM figures).

For each shape and precision, `--turns` turns of: `examples/cpu_minimum gemm …` (`--runs`
calls, its minimum), then `torch.mm` the same number of times in this process (its minimum),
the two seconds apart on the same threads. One JSON line per turn, then one per shape and
precision with the median of the turns' time ratios (semshare / torch: ≤ 1.0 is "≥ 1.0× its
speed", ≤ 1.25 is "≥ 0.8×"). On a VM whose speed swings 2× within seconds, a median of one
side taken a minute after the other's says which phase each met; neighbouring minima do not
(docs/results/cpu.md, sessions 31–32).

    cargo build --release --example cpu_minimum
    python3 tools/gemm_turnabout.py [--turns 6] [--runs 300] [--threads 2] [--per-call]
        [--shapes 1152x256x768,...] [--precisions fp32,bf16] [--binary PATH]

C = A·Wᵀ as the model's layers compute it. fp32: both sides fp32. bf16: `torch.mm` on bf16
operands into a bf16 C; semshare on bf16 activations into a bf16 C, both in 2 bytes, as the
model's bf16 tensors are since session 35. semshare's W is packed once, as a frozen model's weights are;
`--per-call` packs it in every call, as `torch.mm` does. `--binary` times another build of
`cpu_minimum` (two builds against the same `torch.mm`, in turn). Needs torch.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "examples", "cpu_minimum")
SHAPES = "1152x256x768,1152x256x512,1152x512x256,768x256x768,32x128x384"


def ours(binary, m, k, n, precision, runs, per_call):
    store = "bf16-2byte" if precision == "bf16" else "f32"
    cmd = [binary, "gemm", str(m), str(k), str(n), precision, store, str(runs), "per-call" if per_call else "packed"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"gemm_turnabout: {' '.join(cmd)}: {done.stderr.strip()}")
    found = re.search(r"path (\S+),.* min ([0-9.]+)", done.stdout)
    if not found:
        sys.exit(f"gemm_turnabout: unexpected output of cpu_minimum: {done.stdout.strip()}")
    return found.group(1), float(found.group(2)) / 1e3


def theirs(torch, m, k, n, precision, runs):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        torch.mm(a, w.t())
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, w.t())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--runs", type=int, default=300, help="calls per side and turn (each side's minimum)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-call", action="store_true", help="semshare packs W in every call")
    ap.add_argument("--shapes", default=SHAPES, help=f"m x k x n, comma-separated (default {SHAPES})")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--binary", default=BINARY, help="the cpu_minimum to time (default: this checkout's)")
    a = ap.parse_args()
    if a.turns < 1 or a.runs < 1 or a.threads < 1:
        sys.exit("gemm_turnabout: --turns, --runs and --threads count from 1")
    shapes = []
    for s in a.shapes.split(","):
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*x[1-9][0-9]*", s):
            sys.exit(f"gemm_turnabout: --shapes: `{s}` is not m x k x n (e.g. 1152x256x768)")
        shapes.append(tuple(int(v) for v in s.split("x")))
    precisions = a.precisions.split(",")
    if any(p not in ("fp32", "bf16") for p in precisions):
        sys.exit(f"gemm_turnabout: --precisions: `{a.precisions}` (fp32 and/or bf16)")
    if not os.path.exists(a.binary):
        sys.exit(f"gemm_turnabout: {a.binary} is missing: cargo build --release --example cpu_minimum")
    import torch
    torch.set_num_threads(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    for m, k, n in shapes:
        for precision in precisions:
            ratios = []
            for turn in range(a.turns):
                path, ms = ours(a.binary, m, k, n, precision, a.runs, a.per_call)
                torch_ms = theirs(torch, m, k, n, precision, a.runs)
                ratios.append(ms / torch_ms)
                print(json.dumps({"shape": f"{m}x{k}x{n}", "precision": precision, "turn": turn + 1, "path": path,
                                  "semshare_min_ms": round(ms, 4), "torch_min_ms": round(torch_ms, 4),
                                  "ratio": round(ratios[-1], 3)}), flush=True)
            print(json.dumps({"shape": f"{m}x{k}x{n}", "precision": precision, "turns": a.turns,
                              "b": "packed per call" if a.per_call else "packed once", "threads": a.threads,
                              "median_ratio": round(statistics.median(ratios), 3),
                              "ratios": [round(r, 3) for r in sorted(ratios)], "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
