#!/usr/bin/env python3
"""The data-aware defaults against the fixed defaults they replaced (issue 15, figure 3).

For each dataset and training seed: `semshare train` with no flags (the data-aware defaults,
test scores with the embedding the checkpoint records), and `semshare train --config
tools/defaults-fixed.json` (the old fixed defaults: 1,000 steps, validation every 250 on
NDCG@500 with the pooled embedding, raw features, λ = 0.01; test scores with pooled, the old
default embedding). Prints a markdown table of test mAP@all and NDCG@500 (×100, average of
I2T and T2I), mean ± sample std over seeds and the per-seed differences, and writes the raw
scores to --json.

    cargo build --release
    python3 tools/defaults_compare.py --data flickr-tags=/tmp/semshare-exp/flickr-tags \\
        --seeds 3 --work runs/defaults --json docs/results/defaults.json

Resumable: a trained run (its best.safetensors) is evaluated again, not retrained.
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cub_results import ROOT, recorded_embedding, run  # noqa: E402

FIXED = os.path.join(ROOT, "tools", "defaults-fixed.json")


def test_scores(sem, data, ckpt, log, embedding):
    cmd = [sem, "eval", "--data", data, "--checkpoint", ckpt, "--device", "cpu", "--json", "--embedding", embedding]
    report = json.loads(run(cmd, log))
    ndcg = dict((k, v) for k, v in report["avg"]["ndcg"])
    return {"map": report["avg"]["map_all"], "ndcg500": ndcg.get(500)}


def one(sem, name, data, seed, work, config):
    out = os.path.join(work, name, f"{config or 'data-aware'}-seed{seed}")
    log = os.path.join(work, name, "log.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    ckpt = os.path.join(out, "best.safetensors")
    # train's summary line, kept beside the run: "trained N steps in … at step M …".
    line_file = out + ".trained.txt"
    if not (os.path.exists(ckpt) and os.path.exists(line_file)):
        cmd = [sem, "train", "--data", data, "--out", out, "--device", "cpu", "--seed", str(seed), "--force"]
        if config:
            cmd += ["--config", FIXED]
        stdout = run(cmd, log)
        with open(line_file, "w") as f:
            f.write(stdout.strip().splitlines()[-1] + "\n")
    embedding = "pooled" if config else recorded_embedding(ckpt)
    res = test_scores(sem, data, ckpt, log, embedding)
    res["embedding"] = embedding
    with open(os.path.join(out, "resolved-config.json")) as f:
        res["steps_cap"] = json.load(f)["train"]["steps"]
    with open(line_file) as f:
        m = re.search(r"trained (\d+) steps .* at step (\d+)", f.read())
    res["steps"], res["best_step"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    return res


def ms(xs):
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default="runs/defaults")
    ap.add_argument("--json", help="write the raw scores here")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "semshare"))
    args = ap.parse_args()
    results = {}
    for spec in args.data:
        name, _, data = spec.partition("=")
        if not data:
            sys.exit(f"error: --data {spec}: expected NAME=DIR")
        for seed in range(args.seeds):
            for config in ("fixed", None):
                r = one(args.bin, name, data, seed, args.work, config)
                results.setdefault(name, {}).setdefault(config or "data-aware", {})[seed] = r
                print(f"{name} seed {seed} {config or 'data-aware'}: {r}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("| dataset | defaults | test embedding | mAP@all avg | NDCG@500 avg | steps run (best at) |")
    print("|---|---|---|---:|---:|---|")
    for name, by in results.items():
        for config in ("fixed", "data-aware"):
            rs = [by[config][s] for s in sorted(by[config])]
            steps = ", ".join(f"{r['steps']} ({r['best_step']})" for r in rs)
            emb = "/".join(sorted({r["embedding"] for r in rs}))
            print(f"| {name} | {config} | {emb} | {ms([r['map'] for r in rs])} | "
                  f"{ms([r['ndcg500'] for r in rs])} | {steps} |")
    print()
    print("Per-seed differences, data-aware − fixed (mAP@all avg; NDCG@500 avg):")
    for name, by in results.items():
        seeds = sorted(by["fixed"])
        dm = [by["data-aware"][s]["map"] - by["fixed"][s]["map"] for s in seeds]
        dn = [by["data-aware"][s]["ndcg500"] - by["fixed"][s]["ndcg500"] for s in seeds]
        print(f"- {name}: mAP {statistics.mean(dm):+.2f} ({', '.join(f'{d:+.2f}' for d in dm)}); "
              f"NDCG@500 {statistics.mean(dn):+.2f} ({', '.join(f'{d:+.2f}' for d in dn)})")


if __name__ == "__main__":
    main()
