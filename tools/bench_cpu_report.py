#!/usr/bin/env python3
"""CPU benchmark report: semshare (criterion) against PyTorch eager and ONNX Runtime, all
measured in this one run on this machine, printed as one markdown table with ratios.

    python3 tools/bench_cpu_report.py [--skip-onnx] [--json] [--evidence DIR] > report.md

Runs, in order: `cargo bench --bench cpu` (train step, embedding, full and mixed lengths, fp32
and bf16 (`--precision bf16`), and the GEMM versions side by side), `torch.mm` on the same GEMM
shapes in fp32 and bf16 (median of 50, 2 threads), `tools/torch_reference.py bench-cpu` (full,
mixed; fp32 and `--bf16`, CPU autocast), `tools/onnx_baseline.py` (full, mixed; fp32: ONNX
Runtime's CPU provider has no bf16, so bf16 embedding is compared with its fp32). A ratio
below 1 means semshare is faster. The load average next to each figure says how much other
work shared the cores (a ratio is only meaningful when both sides saw the same).

Evidence: the CPU's model and flags, the kernels' path semshare took (SEMSHARE_CPU or the best
one detected) and the raw output of every run are written to a new directory (default
target/bench_cpu_report/<UTC time>/; an existing one is refused, never overwritten).
`--json` prints one line per figure instead of the table:
{"measure", "inputs", "precision", "semshare_ms", "torch_ms", "ort_ms"} (null where not measured;
the GEMMs as "gemm <shape>" with inputs "-").
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model's GEMM shapes in benches/cpu.rs's `gemm` group.
GEMM_SHAPES = ("image_qkv_1152x256x768", "image_ffn_up_1152x256x512", "image_ffn_down_1152x512x256",
               "text_qkv_768x256x768", "image_qkv_dw_768x1152x256", "gru_recurrent_32x128x384")


def run(cmd, evidence, name, **kw):
    """Runs cmd, keeps its stdout and stderr under evidence/name.{stdout,stderr}, returns both."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    for ext, text in (("stdout", p.stdout), ("stderr", p.stderr)):
        with open(os.path.join(evidence, f"{name}.{ext}"), "x") as f:
            f.write(f"$ {' '.join(cmd)}\n{text}")
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {p.returncode}); its output is in {evidence}/{name}.stderr")
    return p.stdout, p.stderr


# When this run's `cargo bench` began: an estimate written before it is an earlier run's.
BENCH_STARTED = None


def criterion_median_ms(group, name):
    """The median criterion just measured, from cargo's target directory (CARGO_TARGET_DIR
    when set, as cargo does); an estimate older than this run's bench is refused."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    path = os.path.join(target, "criterion", group, name, "new", "estimates.json")
    if BENCH_STARTED is not None and os.path.getmtime(path) < BENCH_STARTED:
        sys.exit(f"{path}: written before this run's cargo bench (a stale result); is CARGO_TARGET_DIR the bench's?")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] / 1e6


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def cpu_info():
    """Model name and flags from /proc/cpuinfo (Linux), else what platform says."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON line per figure instead of the markdown table")
    ap.add_argument("--evidence", help="directory for the raw outputs (must not exist)")
    a = ap.parse_args()

    evidence = a.evidence or os.path.join(ROOT, "target", "bench_cpu_report", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    try:
        os.makedirs(evidence)
    except FileExistsError:
        sys.exit(f"{evidence}: already exists; choose a new --evidence directory")
    model, flags = cpu_info()
    simd = [f for f in flags if re.match(r"(avx|fma|amx|sse4|f16c|asimd|sve)", f)]

    load_before = os.getloadavg()[0]
    global BENCH_STARTED
    BENCH_STARTED = time.time()
    _, bench_err = run(["cargo", "bench", "--bench", "cpu", "--", "train_step|embed|gemm"], evidence, "cargo_bench")
    described = re.search(r"semshare CPU path: ([\w+]+)", bench_err)
    described = described.group(1) if described else "unknown"
    path = described.split("+")[0]
    cases = [(inputs, precision) for precision in ("fp32", "bf16") for inputs in ("full", "mixed")]
    ours = {(kind, inputs, precision): criterion_median_ms(group, inputs if precision == "fp32" else f"{inputs}_bf16")
            for kind, group in (("train", "train_step_small_b32"), ("embed", "embed_small_32img_32txt"))
            for inputs, precision in cases}
    gemm = {shape: {"fp32": criterion_median_ms("gemm", f"semshare_{path}_{shape}"),
                    "bf16": criterion_median_ms("gemm", f"semshare_{path}_bf16_{shape}"),
                    "matrixmultiply": criterion_median_ms("gemm", f"matrixmultiply_{shape}")} for shape in GEMM_SHAPES}
    load_after_rust = os.getloadavg()[0]

    out, _ = run([sys.executable, "-c", TORCH_GEMM, json.dumps(GEMM_SHAPES)], evidence, "torch_gemm")
    for rec in json_lines(out):
        gemm[rec["shape"]][f"torch_{rec['dtype']}"] = rec["median_ms"]

    torch_ms, onnx_ms = {}, {}
    for inputs, precision in cases:
        flags_ = (["--mixed"] if inputs == "mixed" else []) + (["--bf16"] if precision == "bf16" else [])
        out, _ = run([sys.executable, "tools/torch_reference.py", "bench-cpu", "--attn", "sdpa"] + flags_, evidence,
                     f"torch_{inputs}_{precision}")
        for rec in json_lines(out):
            if rec["measure"] == "train_step":
                torch_ms[("train", inputs, precision)] = rec["median_ms"]
            if rec["measure"] == "embed_pooled" and precision == "bf16":
                torch_ms[("embed", inputs, precision)] = rec["median_ms"]
        if not a.skip_onnx and precision == "fp32":
            out, _ = run([sys.executable, "tools/onnx_baseline.py"] + flags_, evidence, f"onnx_{inputs}",
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
            recs = json_lines(out)
            onnx_ms[inputs] = next(r["median_ms"] for r in recs if r["runtime"] == "onnxruntime")
            # PyTorch eager embedding, timed in the same process as ONNX Runtime (median of its runs).
            eager = sorted(r["median_ms"] for r in recs if r["runtime"] == "torch_eager")
            torch_ms[("embed", inputs, precision)] = eager[len(eager) // 2]
    load_end = os.getloadavg()[0]

    import torch
    machine = {"cpu": model, "cores": os.cpu_count(), "simd_flags": simd, "all_flags": flags,
               "semshare_cpu_path": described, "torch": torch.__version__, "load_before": load_before,
               "load_after_semshare": load_after_rust, "load_end": load_end,
               "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with open(os.path.join(evidence, "machine.json"), "x") as f:
        json.dump(machine, f, indent=1)

    figures = []
    for kind in ("train", "embed"):
        for inputs, precision in cases:
            measure = "train step, batch 32" if kind == "train" else "embed 32 images + 32 texts"
            figures.append({"measure": measure, "inputs": inputs, "precision": precision,
                            "semshare_ms": ours[(kind, inputs, precision)],
                            "torch_ms": torch_ms.get((kind, inputs, precision)),
                            "ort_ms": onnx_ms.get(inputs) if kind == "embed" else None})
    for shape, t in gemm.items():
        for precision in ("fp32", "bf16"):
            figures.append({"measure": f"gemm {shape}", "inputs": "-", "precision": precision,
                            "semshare_ms": t[precision], "torch_ms": t.get(f"torch_{precision}"), "ort_ms": None})
    with open(os.path.join(evidence, "figures.jsonl"), "x") as f:
        f.writelines(json.dumps(r) + "\n" for r in figures)
    if a.json:
        for r in figures:
            print(json.dumps(r))
        return

    print(f"Machine: {model}, {os.cpu_count()} cores, SIMD flags {' '.join(simd) or 'none'}; semshare CPU path "
          f"`{described}`; torch {torch.__version__}, 2 threads everywhere; load average 1 min: {load_before:.2f} before, "
          f"{load_after_rust:.2f} after semshare, {load_end:.2f} at the end. Raw outputs: {evidence}.\n")
    print("| measure | inputs | precision | semshare (ms) | PyTorch eager (ms) | ratio | ONNX Runtime fp32 (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in figures:
        if r["measure"].startswith("gemm"):
            continue
        o, t, x = r["semshare_ms"], r["torch_ms"], r["ort_ms"]
        cells = [f"{o:.1f}", f"{t:.1f}" if t else "—", f"{o / t:.2f}" if t else "—",
                 f"{x:.1f}" if x else "—", f"{o / x:.2f}" if x else "—"]
        print(f"| {r['measure']} | {r['inputs']} | {r['precision']} | " + " | ".join(cells) + " |")
    print(f"\n| GEMM (m x k x n) | semshare `{path}` fp32 (ms) | torch.mm fp32 (ms) | ratio | semshare bf16 (ms) "
          f"| torch.mm bf16 (ms) | ratio | matrixmultiply (ms) | semshare fp32 / bf16 GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, t in gemm.items():
        m, k, n = (int(v) for v in shape.rsplit("_", 1)[1].split("x"))
        flop = 2 * m * k * n / 1e6
        tf, tb = t.get("torch_fp32"), t.get("torch_bf16")
        print(f"| {shape} | {t['fp32']:.3f} | {tf:.3f} | {t['fp32'] / tf:.2f} | {t['bf16']:.3f} | {tb:.3f} "
              f"| {t['bf16'] / tb:.2f} | {t['matrixmultiply']:.3f} | {flop / t['fp32']:.0f} / {flop / t['bf16']:.0f} |")


# torch.mm on the GEMM shapes (name_MxKxN; "dw" shapes are Aᵀ·B, the others A·Bᵀ as the model
# calls them), fp32 and bf16, 2 threads, median of 50 after 10 warm-up calls; one JSON line each.
TORCH_GEMM = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(2)
for shape in json.loads(sys.argv[1]):
    name, dims = shape.rsplit("_", 1)
    m, k, n = (int(v) for v in dims.split("x"))
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if name.endswith("_dw"):
            a, b = torch.randn(k, m, dtype=dtype), torch.randn(k, n, dtype=dtype)
            f = lambda: torch.mm(a.t(), b)
        else:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            f = lambda: torch.mm(a, b.t())
        for _ in range(10):
            f()
        ts = []
        for _ in range(50):
            t0 = time.perf_counter(); f(); ts.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"shape": shape, "dtype": label, "median_ms": statistics.median(ts), "torch": torch.__version__}))
"""

if __name__ == "__main__":
    main()
