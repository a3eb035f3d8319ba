#!/usr/bin/env python3
"""CPU benchmark report: semshare (criterion) against PyTorch eager and ONNX Runtime, all
measured in this one run on this machine, printed as one markdown table with ratios.

    python3 tools/bench_cpu_report.py [--rounds N] [--skip-onnx] [--json] [--evidence DIR]
        [--bench-binary PATH] > report.md

Each measure's two sides run back to back, so that a ratio compares the same minutes of this
machine (a VM's speed moves by 25 % and more over the minutes a whole suite takes; measured
suite after suite, the two sides of a ratio did not always see the same machine). For each
case (full or mixed lengths; fp32, then bf16 via `--precision bf16`): `cargo bench --bench cpu`
on that case's train step and embedding, then `tools/torch_reference.py bench-cpu` (bf16: CPU
autocast), then `tools/onnx_baseline.py` (fp32 only: ONNX Runtime's CPU provider has no bf16,
so the bf16 embedding is compared with its fp32, measured again beside it). Before them each
GEMM shape: ours in fp32 and bf16 and `matrixmultiply`, then `torch.mm` on it in fp32 and bf16
(median of 50, 2 threads), and this machine's copy bandwidth (`memory/copy_*`, 2 threads): the
GEMM table gives each side's bytes in and out (each operand and the result once, at the
precision it is stored in: semshare's f32, `torch.mm`'s bf16 tensors) and the rate they imply,
so a product bound by memory, not by its arithmetic, shows as a rate near the copy's. `--inputs full` leaves the mixed lengths out. The whole sequence runs `--rounds` times (default 2: every figure
twice); each cell of the table lists the rounds' values. A ratio below 1 means semshare is
faster.

Evidence: the CPU's model and flags, the kernels' path semshare took (SEMSHARE_CPU or the best
one detected), the load average around each round and the raw output of every run (under
round1/, round2/, …) are written to a new directory (default
target/bench_cpu_report/<UTC time>/; an existing one is refused, never overwritten).
`--json` prints one line per figure and round instead of the table:
{"measure", "inputs", "precision", "semshare_ms", "torch_ms", "ort_ms", "round"} (null where not
measured; the GEMMs as "gemm <shape>" with inputs "-" and also "matrixmultiply_ms"; the copies as
"memory copy <size>" with semshare_ms the copy's time).
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

# The copies of benches/cpu.rs's `memory` group (MiB copied).
COPY_MIB = (8, 256)

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


# A prebuilt `benches/cpu` executable run in place of `cargo bench` (--bench-binary: a machine
# with no Rust toolchain, the lent GPU machine's Xeon), and where its criterion writes.
BENCH_BINARY = None
CRITERION_HOME = None


def criterion_median_ms(group, name):
    """The median criterion just measured, from cargo's target directory (CARGO_TARGET_DIR
    when set, as cargo does) or the prebuilt bench's CRITERION_HOME; an estimate older than
    this run's bench is refused."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    home = CRITERION_HOME or os.path.join(target, "criterion")
    path = os.path.join(home, group, name, "new", "estimates.json")
    if BENCH_STARTED is not None and os.path.getmtime(path) < BENCH_STARTED:
        sys.exit(f"{path}: written before this run's bench (a stale result); is CARGO_TARGET_DIR the bench's?")
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


def measure_round(a, evidence, path_line):
    """One round: each measure's semshare side and its baselines back to back, so that the two
    sides of a ratio see the same minute of this machine (a VM's speed moves by 25 % and more
    over the minutes a whole suite takes). Returns (figures, the bench's path description)."""
    figures, path_line = gemm_figures(evidence, path_line)
    cases = [(inputs, precision) for precision in ("fp32", "bf16") for inputs in a.inputs]
    for inputs, precision in cases:
        name = inputs if precision == "fp32" else f"{inputs}_bf16"
        tag = f"{inputs}_{precision}"
        groups = {"train": "train_step_small_b32", "embed": "embed_small_32img_32txt"}
        ours = criterion([f"{group}/{name}" for group in groups.values()], evidence, f"cargo_bench_{tag}")
        flags_ = (["--mixed"] if inputs == "mixed" else []) + (["--bf16"] if precision == "bf16" else [])
        out, _ = run([sys.executable, "tools/torch_reference.py", "bench-cpu", "--attn", "sdpa"] + flags_, evidence,
                     f"torch_{tag}")
        torch_ms = {}
        for rec in json_lines(out):
            if rec["measure"] == "train_step":
                torch_ms["train"] = rec["median_ms"]
            if rec["measure"] == "embed_pooled" and precision == "bf16":
                torch_ms["embed"] = rec["median_ms"]
        ort = None
        if not a.skip_onnx:
            # ONNX Runtime's CPU provider has no bf16: the bf16 embedding is compared with its fp32,
            # measured again next to it.
            fl = ["--mixed"] if inputs == "mixed" else []
            out, _ = run([sys.executable, "tools/onnx_baseline.py"] + fl, evidence, f"onnx_{tag}",
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
            recs = json_lines(out)
            ort = next(r["median_ms"] for r in recs if r["runtime"] == "onnxruntime")
            if precision == "fp32":
                # PyTorch eager embedding, timed in the same process as ONNX Runtime (median of its runs).
                eager = sorted(r["median_ms"] for r in recs if r["runtime"] == "torch_eager")
                torch_ms["embed"] = eager[len(eager) // 2]
        for kind, group in groups.items():
            measure = "train step, batch 32" if kind == "train" else "embed 32 images + 32 texts"
            figures.append({"measure": measure, "inputs": inputs, "precision": precision,
                            "semshare_ms": ours[f"{group}/{name}"], "torch_ms": torch_ms.get(kind),
                            "ort_ms": ort if kind == "embed" else None})
    return figures, path_line


def gemm_figures(evidence, path_line):
    """This machine's copies (`memory` group), then each GEMM shape: ours in fp32 and bf16, each
    also with B packed once (a frozen model's weights, the GRU's W_hh over a recurrence: the
    product alone, as `torch.mm` measures it; bf16 also into a C stored as bf16, as the trunk's
    GEMMs are and as `torch.mm`'s bf16 result is) and `matrixmultiply`, then `torch.mm` in fp32
    and bf16. First in a round: they are the quickest figures, so a capped run still has
    them. Returns (figures, the bench's path description: `path_line`, or the first run's)."""
    copies = criterion([f"memory/copy_{mib}MiB" for mib in COPY_MIB], evidence, "cargo_bench_memory")
    path_line = path_line or copies["path"]
    figures = [{"measure": f"memory copy {mib}MiB", "inputs": "-", "precision": "-",
                "semshare_ms": copies[f"memory/copy_{mib}MiB"], "torch_ms": None, "ort_ms": None} for mib in COPY_MIB]
    for shape in GEMM_SHAPES:
        names = {"fp32": f"gemm/semshare_{{path}}/{shape}", "fp32 packed B": f"gemm/semshare_{{path}}_packed/{shape}",
                 "bf16": f"gemm/semshare_{{path}}_bf16/{shape}",
                 "bf16 packed B": f"gemm/semshare_{{path}}_bf16_packed/{shape}",
                 "bf16 packed B, C bf16": f"gemm/semshare_{{path}}_bf16_packed_to_bf16/{shape}",
                 "matrixmultiply": f"gemm/matrixmultiply/{shape}"}
        ours = criterion(list(names.values()), evidence, f"cargo_bench_gemm_{shape}")
        path_line = path_line or ours["path"]
        names = {k: v.replace("{path}", ours["path"].split("+")[0]) for k, v in names.items()}
        out, _ = run([sys.executable, "-c", TORCH_GEMM, json.dumps([shape])], evidence, f"torch_gemm_{shape}")
        theirs = {rec["dtype"]: rec["median_ms"] for rec in json_lines(out)}
        for precision in ("fp32", "fp32 packed B", "bf16", "bf16 packed B", "bf16 packed B, C bf16"):
            figures.append({"measure": f"gemm {shape}", "inputs": "-", "precision": precision,
                            "semshare_ms": ours[names[precision]], "torch_ms": theirs.get(precision.split()[0]),
                            "ort_ms": None,
                            "matrixmultiply_ms": ours[names["matrixmultiply"]]})
    return figures, path_line


def criterion(ids, evidence, label):
    """Runs `cargo bench --bench cpu` on exactly the benches `ids` ("group/function") and returns
    their medians (ms) by id, with the path line the bench prints as "path". "{path}" in an id
    stands for the kernels' path, which names the GEMM benches; the result is keyed by the
    id with it filled in."""
    pattern = "^(" + "|".join(re.escape(i).replace(re.escape("{path}"), "[a-z0-9]+") for i in ids) + ")$"
    global BENCH_STARTED
    BENCH_STARTED = time.time()
    if BENCH_BINARY:
        _, err = run([BENCH_BINARY, "--bench", pattern], evidence, label,
                     env=dict(os.environ, CRITERION_HOME=CRITERION_HOME))
    else:
        _, err = run(["cargo", "bench", "--bench", "cpu", "--", pattern], evidence, label)
    described = re.search(r"semshare CPU path: ([\w+]+)", err)
    got = {"path": described.group(1) if described else "unknown"}
    for i in (i.replace("{path}", got["path"].split("+")[0]) for i in ids):
        group, bench = i.split("/", 1)
        got[i] = criterion_median_ms(group, bench.replace("/", "_"))
    return got


def cells(values, fmt):
    return " / ".join(fmt.format(v) if v else "—" for v in values)


def gemm_bytes(m, k, n, precision):
    """Bytes a product must move at least, each operand and the result once, as each side stores
    them: (semshare: f32 A, B and C, B as bf16 slivers once packed; torch.mm: its tensors' type)."""
    elems = m * k + k * n + m * n
    if precision.startswith("fp32"):
        return 4 * elems, 4 * elems
    ours = 4 * m * k + 2 * k * n + 4 * m * n if precision.startswith("bf16 packed B") else 4 * elems
    return ours, 2 * elems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON line per figure instead of the markdown table")
    ap.add_argument("--evidence", help="directory for the raw outputs (must not exist)")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole sequence runs (default 2)")
    ap.add_argument("--inputs", default="full,mixed", type=lambda v: v.split(","),
                    help="the lengths measured, full and/or mixed (default full,mixed; issue 17's figures are full)")
    ap.add_argument("--bench-binary", help="a prebuilt benches/cpu executable to run instead of cargo bench "
                    "(tools/gpu-check.sh bundles one: the GPU machine has no Rust toolchain)")
    a = ap.parse_args()
    if not 1 <= a.rounds <= 20:
        sys.exit(f"--rounds {a.rounds}: give 1 to 20")
    if not a.inputs or not set(a.inputs) <= {"full", "mixed"} or len(set(a.inputs)) != len(a.inputs):
        sys.exit(f"--inputs {','.join(a.inputs)}: give full, mixed or full,mixed")

    evidence = os.path.abspath(a.evidence or os.path.join(ROOT, "target", "bench_cpu_report",
                                                          time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())))
    try:
        os.makedirs(evidence)
    except FileExistsError:
        sys.exit(f"{evidence}: already exists; choose a new --evidence directory")
    model, flags = cpu_info()
    simd = [f for f in flags if re.match(r"(avx|fma|amx|sse4|f16c|asimd|sve)", f)]

    if a.bench_binary:
        global BENCH_BINARY, CRITERION_HOME
        if not os.access(a.bench_binary, os.X_OK):
            sys.exit(f"--bench-binary {a.bench_binary}: not an executable file")
        BENCH_BINARY, CRITERION_HOME = os.path.abspath(a.bench_binary), os.path.join(evidence, "criterion")
    else:
        # Built once before any timing, so that no round's first measure waits on the compiler.
        run(["cargo", "bench", "--bench", "cpu", "--no-run"], evidence, "cargo_build")
    loads, rounds, described = [os.getloadavg()[0]], [], None
    for r in range(a.rounds):
        where = os.path.join(evidence, f"round{r + 1}")
        os.makedirs(where)
        figures, described = measure_round(a, where, described)
        rounds.append(figures)
        loads.append(os.getloadavg()[0])

    import torch
    machine = {"cpu": model, "cores": os.cpu_count(), "simd_flags": simd, "all_flags": flags,
               "semshare_cpu_path": described, "torch": torch.__version__, "rounds": a.rounds,
               "load_before_and_after_each_round": loads, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with open(os.path.join(evidence, "machine.json"), "x") as f:
        json.dump(machine, f, indent=1)
    with open(os.path.join(evidence, "figures.jsonl"), "x") as f:
        f.writelines(json.dumps(dict(fig, round=r + 1)) + "\n" for r, figs in enumerate(rounds) for fig in figs)
    if a.json:
        for r, figs in enumerate(rounds):
            for fig in figs:
                print(json.dumps(dict(fig, round=r + 1)))
        return

    path = described.split("+")[0]
    print(f"Machine: {model}, {os.cpu_count()} cores, SIMD flags {' '.join(simd) or 'none'}; semshare CPU path "
          f"`{described}`; torch {torch.__version__}, 2 threads everywhere; {a.rounds} rounds, each measure's sides "
          f"back to back; load average 1 min before and after each round: {', '.join(f'{l:.2f}' for l in loads)}. "
          f"Raw outputs: {evidence}. Each cell: round 1 / round 2 / …\n")
    print("| measure | inputs | precision | semshare (ms) | PyTorch eager (ms) | ratio | ONNX Runtime fp32 (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for i, fig in enumerate(rounds[0]):
        if fig["measure"].startswith(("gemm", "memory")):
            continue
        per = [figs[i] for figs in rounds]
        o = [f["semshare_ms"] for f in per]
        t = [f["torch_ms"] for f in per]
        x = [f["ort_ms"] for f in per]
        print(f"| {fig['measure']} | {fig['inputs']} | {fig['precision']} | {cells(o, '{:.1f}')} | {cells(t, '{:.1f}')} "
              f"| {cells([a_ / b if b else None for a_, b in zip(o, t)], '{:.2f}')} | {cells(x, '{:.1f}')} "
              f"| {cells([a_ / b if b else None for a_, b in zip(o, x)], '{:.2f}')} |")
    print("\n| copy, 2 threads | ms | GB/s (read + written) |\n|---|---|---|")
    for i, fig in enumerate(rounds[0]):
        if fig["measure"].startswith("memory"):
            mib = int(fig["measure"].rsplit(" ", 1)[1].removesuffix("MiB"))
            ms = [figs[i]["semshare_ms"] for figs in rounds]
            print(f"| {mib} MiB | {cells(ms, '{:.3f}')} | {cells([2 * mib * 2**20 / 1e6 / v for v in ms], '{:.1f}')} |")
    print(f"\n| GEMM (m x k x n) | precision | semshare `{path}` (ms) | torch.mm (ms) | ratio | matrixmultiply fp32 (ms) "
          f"| semshare GFLOP/s | MB in + out: semshare, torch | GB/s: semshare | GB/s: torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, fig in enumerate(rounds[0]):
        if not fig["measure"].startswith("gemm"):
            continue
        shape = fig["measure"].split(" ", 1)[1]
        m, k, n = (int(v) for v in shape.rsplit("_", 1)[1].split("x"))
        flop = 2 * m * k * n / 1e6
        per = [figs[i] for figs in rounds]
        o = [f["semshare_ms"] for f in per]
        t = [f["torch_ms"] for f in per]
        mm = [f["matrixmultiply_ms"] for f in per] if fig["precision"] == "fp32" else [None] * len(per)
        ours_b, torch_b = gemm_bytes(m, k, n, fig["precision"])
        print(f"| {shape} | {fig['precision']} | {cells(o, '{:.3f}')} | {cells(t, '{:.3f}')} "
              f"| {cells([a_ / b if b else None for a_, b in zip(o, t)], '{:.2f}')} | {cells(mm, '{:.3f}')} "
              f"| {cells([flop / v for v in o], '{:.0f}')} | {ours_b / 1e6:.1f}, {torch_b / 1e6:.1f} "
              f"| {cells([ours_b / 1e6 / v for v in o], '{:.1f}')} "
              f"| {cells([torch_b / 1e6 / v if v else None for v in t], '{:.1f}')} |")


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
