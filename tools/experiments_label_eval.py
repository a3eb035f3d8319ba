#!/usr/bin/env python3
"""Table 1 again with the `label` retrieval embedding (DESIGN.md §1: the mean of the
L2-normalised sigmoid(g(h_t)), as the authors' code retrieves), for every trained run a suite
recorded. The suite itself ranks with the `pooled` embedding z for every variant (the space the
consistency losses of `imc`, `ours+con` and DSCMR act on); this re-evaluates the same best
checkpoints (chosen on validation with `pooled`) with `label`. CCA has no classifier: skipped.

    python3 tools/experiments_label_eval.py STATE.json DATA_DIR RUNS_DIR [--json OUT.json]

RUNS_DIR is the `--runs` folder the suite was run with. Prints a markdown table, mean ± sample
std over seeds of average NDCG@500 (I2T, T2I, avg) and mAP@all.
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fmt(xs):
    return f"{xs[0]:.2f}" if len(xs) == 1 else f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def eta_name(eta):
    # Rust's `{}` of an f64: 1.0 → "1", 0.01 → "0.01".
    return f"{eta:g}" if eta != int(eta) else str(int(eta))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state")
    ap.add_argument("data")
    ap.add_argument("runs")
    ap.add_argument("--json")
    a = ap.parse_args()
    state = json.load(open(a.state))
    suite = state["suite"]["kind"]
    rows, out = {}, []
    for r in state["finished"]:
        k = r["key"]
        if k["variant"] == "cca":
            continue
        name = f"{k['variant']}-s{k['seed']}" + (f"-eta{eta_name(k['eta'])}" if k.get("eta") is not None else "")
        ckpt = os.path.join(a.runs, suite, name, "best.safetensors")
        cmd = [os.path.join(ROOT, "target/release/semshare"), "eval", "--data", a.data, "--checkpoint", ckpt,
               "--embedding", "label", "--json"]
        rep = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        label = k["variant"] + (f" (η={k['eta']:g})" if k.get("eta") is not None else "")
        vals = {d: dict(rep[d]["ndcg"])[500] for d in ("i2t", "t2i", "avg")}
        vals["map"] = rep["avg"]["map_all"]
        vals["pooled_avg"] = r["scores"]["ndcg"]["avg"]
        rows.setdefault(label, []).append(vals)
        out.append({"key": k, "label": vals})
    print("| method | seeds | NDCG@500 I2T | NDCG@500 T2I | NDCG@500 avg | mAP@all avg | (pooled NDCG@500 avg) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, vs in rows.items():
        cols = [fmt([v[c] for v in vs]) for c in ("i2t", "t2i", "avg", "map", "pooled_avg")]
        print(f"| {label} | {len(vs)} | " + " | ".join(cols) + " |")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
