#!/usr/bin/env python3
"""Summaries of finished experiment suites for docs/results/EXPERIMENTS.md, read from their
state files (each run's scores with both retrieval embeddings and its full pooled test report
are recorded there):

    python3 tools/experiments_summary.py docs/results/flickr-tags/table1-state.json [...]

Per Table 1 state file: a table of mean ± sample std over seeds of average NDCG@10, NDCG@100,
NDCG@500 and mAP@all (pooled), the best-checkpoint steps (0: not trained), then the paper's
claims checked with paired per-seed differences (same seed, same data) of average NDCG@500,
once per retrieval embedding. Per η-sweep state file: whether NDCG@500 falls as η grows.

A claim is "yes" when every comparison it makes has a positive mean difference, "no" when
none has, "partly" otherwise; a mean difference smaller than its seeds' spread is flagged
"(within noise)".
"""
import json
import statistics
import sys

ABLATIONS = ["wo-r", "wo-t", "wo-c", "wo-l"]
BASELINES = ["imc", "st", "dscmr", "cca", "ridge", "linear"]


def ndcg(report, k):
    return dict(report["avg"]["ndcg"])[k]


def fmt(xs):
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def by_variant(state, eta=False):
    """{variant or (variant, η): {seed: record}}."""
    out = {}
    for r in state["finished"]:
        k = r["key"]
        name = (k["variant"], k["eta"]) if eta else k["variant"]
        out.setdefault(name, {})[k["seed"]] = r
    return out


def score(record, embedding):
    s = record["scores"] if embedding == "pooled" else record.get("label")
    return None if s is None else s["ndcg"]["avg"]


def paired(runs, ours, other, embedding):
    """Per-seed ours − other (seeds both have), or None when there are none."""
    diffs = []
    for seed in sorted(runs.get(ours, {})):
        a, b = runs[ours][seed], runs.get(other, {}).get(seed)
        if b is None or score(a, embedding) is None or score(b, embedding) is None:
            continue
        diffs.append(score(a, embedding) - score(b, embedding))
    return diffs or None


def describe(other, diffs):
    mean = statistics.mean(diffs)
    noise = len(diffs) > 1 and abs(mean) < statistics.stdev(diffs)
    seeds = ", ".join(f"{d:+.2f}" for d in diffs)
    return f"{other} {mean:+.2f} ({seeds}){' (within noise)' if noise else ''}", mean


def claim(runs, others, embedding):
    parts, means = [], []
    for other in others:
        diffs = paired(runs, "ours", other, embedding)
        if diffs:
            text, mean = describe(other, diffs)
            parts.append(text)
            means.append(mean)
    if not means:
        return "—"
    verdict = "yes" if all(m > 0 for m in means) else "no" if all(m <= 0 for m in means) else "partly"
    return f"**{verdict}**: " + "; ".join(parts)


def table1(path, state):
    runs = by_variant(state)
    print(f"### {path}\n")
    print("| method | seeds | NDCG@10 | NDCG@100 | NDCG@500 | mAP@all | best steps |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, seeds in runs.items():
        rs = [seeds[s]["report"] for s in sorted(seeds)]
        cols = [fmt([ndcg(r, k) for r in rs]) for k in (10, 100, 500)]
        cols.append(fmt([r["avg"]["map_all"] for r in rs]))
        steps = ", ".join(str(seeds[s]["best_step"]) for s in sorted(seeds))
        print(f"| {name} | {len(rs)} | " + " | ".join(cols) + f" | {steps} |")
    print()
    print("Claims: `ours` − other, average NDCG@500, per seed in brackets.\n")
    print("| claim | pooled | label |")
    print("|---|---|---|")
    for what, others in [
        ("`ours` above every ablation", ABLATIONS),
        ("`ours` above `imc`, `st`, DSCMR-style (and CCA)", BASELINES),
        ("`ours` ≥ `ours+con`", ["ours+con"]),
        ("the context loss helps (`ours` > `wo-c`)", ["wo-c"]),
    ]:
        print(f"| {what} | {claim(runs, others, 'pooled')} | {claim(runs, others, 'label')} |")
    print()


def eta_sweep(path, state):
    runs = by_variant(state, eta=True)
    print(f"### {path}\n")
    print("| method | embedding | NDCG@500 avg at η = " + ", ".join(f"{e:g}" for e in state["suite"]["etas"]) +
          " | falls as η grows |")
    print("|---|---|---|---|")
    for variant in dict.fromkeys(v for v, _ in runs):
        for embedding in ("pooled", "label"):
            means = []
            for eta in state["suite"]["etas"]:
                xs = [score(r, embedding) for r in runs.get((variant, eta), {}).values()]
                xs = [x for x in xs if x is not None]
                means.append(statistics.mean(xs) if xs else None)
            if None in means:
                continue
            falls = all(b <= a for a, b in zip(means, means[1:]))
            seeds = len(runs[(variant, state["suite"]["etas"][0])])
            print(f"| {variant} ({seeds} seeds) | {embedding} | " + ", ".join(f"{m:.2f}" for m in means) +
                  f" | {'**yes**' if falls else '**no**'} |")
    print()


def main(paths):
    for path in paths:
        state = json.load(open(path))
        (eta_sweep if state["suite"]["kind"] == "eta" else table1)(path, state)


if __name__ == "__main__":
    main(sys.argv[1:])
