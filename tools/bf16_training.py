#!/usr/bin/env python3
"""bf16 training against fp32 on the CPU (issue 17: "loss curve within the seeds' spread of
fp32"). Trains the same configuration with `--precision fp32` and `--precision bf16` for each
seed, a fixed number of steps (no early stopping, so the curves have the same length), reads
the training loss from train's progress lines, and prints per precision the mean ± std over
seeds of the loss at each reported step and of the test mAP@all / NDCG@500 (recorded embedding).

    cargo build --release
    python3 tools/bf16_training.py --data /tmp/semshare-exp/small-weak-image --seeds 3 --steps 600 \\
        --work /tmp/semshare-exp/runs/bf16

Resumable: a run with its log and checkpoint is read back, not retrained.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cub_results import ROOT, recorded_embedding, run  # noqa: E402

STEP = re.compile(r"step\s+(\d+)/(\d+)\s+loss\s+([0-9.eE+-]+)")


def train(sem, data, out, seed, steps, precision):
    log = out + ".log"
    ckpt = os.path.join(out, "best.safetensors")
    if not (os.path.exists(ckpt) and os.path.exists(log)):
        cmd = [sem, "train", "--data", data, "--out", out, "--device", "cpu", "--seed", str(seed), "--force",
               "--steps", str(steps), "--precision", precision, "--config", os.path.join(ROOT, "tools", "no-early-stop.json")]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        with open(log, "w") as f:
            f.write(p.stderr + p.stdout)
    losses = {}
    with open(log) as f:
        for line in f:
            m = STEP.search(line)
            if m:
                losses[int(m.group(1))] = float(m.group(3))
    emb = recorded_embedding(ckpt)
    cmd = [sem, "eval", "--data", data, "--checkpoint", ckpt, "--device", "cpu", "--json", "--embedding", emb,
           "--precision", precision]
    report = json.loads(run(cmd, out + ".eval.log"))
    ndcg = dict((k, v) for k, v in report["avg"]["ndcg"])
    return losses, report["avg"]["map_all"], ndcg.get(500) or ndcg.get(max(ndcg))


def ms(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--work", default="runs/bf16")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "semshare"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    res = {}
    for precision in ("fp32", "bf16"):
        for seed in range(args.seeds):
            out = os.path.join(args.work, f"{precision}-seed{seed}")
            res.setdefault(precision, []).append(train(args.bin, args.data, out, seed, args.steps, precision))
    steps = sorted(set.intersection(*(set(r[0]) for rs in res.values() for r in rs)))
    print("| step | fp32 loss | bf16 loss | bf16 − fp32 (mean) | fp32 seeds' std |")
    print("|---:|---:|---:|---:|---:|")
    for s in steps:
        a = [r[0][s] for r in res["fp32"]]
        b = [r[0][s] for r in res["bf16"]]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        print(f"| {s} | {ms(a)} | {ms(b)} | {statistics.mean(b) - statistics.mean(a):+.4f} | {sd:.4f} |")
    print()
    for precision, rs in res.items():
        print(f"- {precision}: test mAP@all avg {ms([r[1] for r in rs])}, NDCG avg {ms([r[2] for r in rs])}")


if __name__ == "__main__":
    main()
