#!/usr/bin/env python3
"""Summarises tools/context-study.sh (issue 15 item 5): for each study, the test NDCG@500 and
mAP@all (average of I2T and T2I, ×100) of each variant with both embeddings, mean ± sample std
over seeds, and the paired difference against `wo-c` of the same seeds: the study's own when it
ran one (a changed budget), else the dataset's base study's.

    python3 tools/context_summary.py docs/results/context
"""

import json
import os
import statistics
import sys

# The reference `wo-c` runs of each dataset's studies.
BASE = {"weak": "weak-base", "flickr": "flickr-base"}


def runs(path):
    with open(path) as f:
        state = json.load(f)
    out = {}
    for r in state["finished"]:
        k = r["key"]
        out.setdefault(k["variant"], {})[k["seed"]] = {
            "pooled": (r["scores"]["ndcg"]["avg"], r["scores"]["map_all"]["avg"]),
            "label": (r["label"]["ndcg"]["avg"], r["label"]["map_all"]["avg"]),
            "best_step": r["best_step"],
        }
    return out


def ms(xs):
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "docs/results/context"
    studies = sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "table1-state.json")))
    data = {s: runs(os.path.join(root, s, "table1-state.json")) for s in studies}
    print("| study | variant | seeds | NDCG@500 pooled | NDCG@500 label | mAP pooled | mAP label "
          "| − wo-c, NDCG@500 pooled (per seed) | − wo-c, NDCG@500 label (per seed) | best steps |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for s in studies:
        # The study's own `wo-c` when it ran one (a changed budget), else its dataset's base.
        base = data[s].get("wo-c") or data.get(BASE.get(s.split("-")[0], ""), {}).get("wo-c", {})
        for variant, by_seed in data[s].items():
            seeds = sorted(by_seed)
            col = lambda emb, i: [by_seed[k][emb][i] for k in seeds]  # noqa: E731
            diffs = []
            for emb in ("pooled", "label"):
                paired = [by_seed[k][emb][0] - base[k][emb][0] for k in seeds if k in base]
                diffs.append("—" if variant == "wo-c" or not paired else
                             f"{statistics.mean(paired):+.2f} ({', '.join(f'{d:+.2f}' for d in paired)})")
            steps = ", ".join(str(by_seed[k]["best_step"]) for k in seeds)
            print(f"| {s} | {variant} | {len(seeds)} | {ms(col('pooled', 0))} | {ms(col('label', 0))} | "
                  f"{ms(col('pooled', 1))} | {ms(col('label', 1))} | {diffs[0]} | {diffs[1]} | {steps} |")


if __name__ == "__main__":
    main()
