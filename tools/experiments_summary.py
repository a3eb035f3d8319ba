#!/usr/bin/env python3
"""Summaries of finished experiment runs for docs/results/EXPERIMENTS.md, read from the suites'
state files (each run's full test report is recorded there):

    python3 tools/experiments_summary.py docs/results/flickr-tags/table1-state.json [...]

Prints, per state file, a markdown table of mean ± sample std over seeds of average NDCG@10,
NDCG@100, NDCG@500 and mAP@all (I2T and T2I averaged), the step of each run's best validation checkpoint (0: not trained), and each method's difference to `ours`
in average NDCG@500 with the per-seed differences (same seed, same data: paired).
"""
import json
import statistics
import sys


def ndcg(report, k):
    return dict(report["avg"]["ndcg"])[k]


def label(key):
    return key["variant"] + (f" (η={key['eta']:g})" if key.get("eta") is not None else "")


def fmt(xs):
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def main(paths):
    for path in paths:
        state = json.load(open(path))
        rows = {}
        for r in state["finished"]:
            rows.setdefault(label(r["key"]), {})[r["key"]["seed"]] = r
        print(f"### {path}\n")
        print("| method | seeds | NDCG@10 | NDCG@100 | NDCG@500 | mAP@all | best steps | Δ NDCG@500 vs ours (per seed) |")
        print("|---|---:|---:|---:|---:|---:|---|---|")
        ours = rows.get("ours", {})
        for name, runs in rows.items():
            rs = [runs[s]["report"] for s in sorted(runs)]
            cols = [fmt([ndcg(r, k) for r in rs]) for k in (10, 100, 500)]
            cols.append(fmt([r["avg"]["map_all"] for r in rs]))
            common = [s for s in sorted(runs) if s in ours]
            diffs = [ndcg(runs[s]["report"], 500) - ndcg(ours[s]["report"], 500) for s in common]
            delta = ", ".join(f"{d:+.2f}" for d in diffs) if name != "ours" and diffs else "—"
            steps = ", ".join(str(runs[s]["best_step"]) for s in sorted(runs))
            print(f"| {name} | {len(rs)} | " + " | ".join(cols) + f" | {steps} | {delta} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
