#!/usr/bin/env python3
"""CPU benchmark report: semshare (criterion) against PyTorch eager and ONNX Runtime, all
measured in this one run on this machine, printed as one markdown table with ratios.

    python3 tools/bench_cpu_report.py [--skip-onnx] > report.md

Runs, in order: `cargo bench --bench cpu` (train step and embedding, full and mixed lengths),
`tools/torch_reference.py bench-cpu` (full, mixed), `tools/onnx_baseline.py` (full, mixed).
A ratio below 1 means semshare is faster. The load average next to each figure says how much
other work shared the two cores (a ratio is only meaningful when both sides saw the same).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, **kw).stdout


def criterion_median_ms(group, name):
    path = os.path.join(ROOT, "target", "criterion", group, name, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] / 1e6


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-onnx", action="store_true")
    a = ap.parse_args()

    load_before = os.getloadavg()[0]
    run(["cargo", "bench", "--bench", "cpu", "--", "train_step|embed"])
    ours = {(kind, inputs): criterion_median_ms(group, inputs)
            for kind, group in (("train", "train_step_small_b32"), ("embed", "embed_small_32img_32txt"))
            for inputs in ("full", "mixed")}
    load_after_rust = os.getloadavg()[0]

    torch_ms, onnx_ms = {}, {}
    for inputs in ("full", "mixed"):
        flags = ["--mixed"] if inputs == "mixed" else []
        for rec in json_lines(run([sys.executable, "tools/torch_reference.py", "bench-cpu", "--attn", "sdpa"] + flags)):
            if rec["measure"] == "train_step":
                torch_ms[("train", inputs)] = rec["median_ms"]
        if not a.skip_onnx:
            recs = json_lines(run([sys.executable, "tools/onnx_baseline.py"] + flags, env=dict(os.environ, PYTHONWARNINGS="ignore")))
            onnx_ms[("embed", inputs)] = next(r["median_ms"] for r in recs if r["runtime"] == "onnxruntime")
            # PyTorch eager embedding, timed in the same process as ONNX Runtime (median of its runs).
            eager = [r["median_ms"] for r in recs if r["runtime"] == "torch_eager"]
            torch_ms[("embed", inputs)] = sorted(eager)[len(eager) // 2]
    load_end = os.getloadavg()[0]

    import torch
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"2 threads everywhere; load average 1 min: {load_before:.2f} before, {load_after_rust:.2f} after "
          f"semshare, {load_end:.2f} at the end.\n")
    print("| measure | inputs | semshare (ms) | PyTorch eager (ms) | ratio | ONNX Runtime (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("train", "embed"):
        for inputs in ("full", "mixed"):
            o, t = ours[(kind, inputs)], torch_ms.get((kind, inputs))
            x = onnx_ms.get((kind, inputs))
            cells = [f"{o:.1f}", f"{t:.1f}" if t else "—", f"{o / t:.2f}" if t else "—",
                     f"{x:.1f}" if x else "—", f"{o / x:.2f}" if x else "—"]
            name = "train step, batch 32" if kind == "train" else "embed 32 images + 32 texts"
            print(f"| {name} | {inputs} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
