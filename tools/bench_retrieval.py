#!/usr/bin/env python3
"""Exact top-k: `semshare query` against FAISS `IndexFlatIP` on the same vectors (issue 13,
Figures; method and results in docs/results/retrieval.md).

    cargo build --release
    python3 tools/bench_retrieval.py            # 100,000 x 256 gallery, 10,000 queries, top-10, 2 threads

1. Seeded random unit vectors (float32): a gallery [N, D] and queries [Q, D].
2. `semshare index --vectors` makes an index of the gallery (raw vectors: no model, no
   fingerprint, which `query --vectors` accepts); `semshare export --format npy` writes the
   index's own vectors, which FAISS gets, so both search bit-identical galleries.
3. Throughput, best of --repeat runs each: `semshare query --vectors Q.npy --k K --timing`
   (RAYON_NUM_THREADS=T; the search time it reports, and the whole process's wall time,
   index open and JSON output included) against `faiss.IndexFlatIP.search` with
   `faiss.omp_set_num_threads(T)` (after `add`, which is not timed).
4. Results: the ids of every query compared; a query whose lists differ only where two scores
   are within 1e-5 (float32 rounding in two summation orders) is a near tie, anything else a
   mismatch (exit 1).
5. Start to answer: a checkpoint (--checkpoint, or a `small` model trained for one step on a
   synthetic dataset) indexes N short captions (`index --texts`); then the wall time of
   `semshare query --checkpoint C --index I --text "..."`, process start to exit, best of
   --repeat (the index is memory-mapped, not read).

Needs numpy and faiss-cpu (faiss-cpu==1.15.1, as in .ci/run). Timings are only meaningful on
an otherwise idle machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def run(cmd, env=None, stdout=subprocess.PIPE):
    out = subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return out


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype("<f4")


def compare(sem_lines, f_ids, f_scores, ids):
    position = {id_: i for i, id_ in enumerate(ids)}
    identical = near = mismatch = 0
    for q, line in enumerate(sem_lines):
        res = json.loads(line)["results"]
        got = [position[r["id"]] for r in res]
        scores = np.array([r["score"] for r in res])
        if got == list(f_ids[q]):
            identical += 1
        elif np.abs(scores - f_scores[q]).max() < 1e-5 and all(
            r == len(got) - 1 or np.abs(np.delete(scores, r) - scores[r]).min() < 1e-5
            for r in range(len(got))
            if got[r] != f_ids[q][r]
        ):
            near += 1  # every difference is a swap of two scores within 1e-5 (or the k-th's)
        else:
            mismatch += 1
            if mismatch <= 3:
                print(f"  mismatch, query {q}: semshare {got} {scores}, faiss {list(f_ids[q])} {f_scores[q]}")
    return identical, near, mismatch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/semshare")
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", help="for the start-to-answer time (default: train a small model for one step)")
    ap.add_argument("--skip-text", action="store_true", help="throughput only")
    ap.add_argument("--dir", help="working directory (default: a new temporary one)")
    ap.add_argument("--precision", default="fp32,bf16",
                    help="semshare's precisions, comma-separated (bf16: a bf16 pass, the f32 top k)")
    a = ap.parse_args()

    import faiss

    work = a.dir or tempfile.mkdtemp(prefix="semshare-bench-retrieval-")
    os.makedirs(work, exist_ok=True)
    p = lambda name: os.path.join(work, name)  # noqa: E731
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rng = np.random.default_rng(a.seed)
    gallery, queries = unit_rows(rng, a.gallery, a.dim), unit_rows(rng, a.queries, a.dim)
    np.save(p("gallery.npy"), gallery)
    np.save(p("queries.npy"), queries)
    run([a.bin, "index", "--vectors", p("gallery.npy"), "--out", p("gallery.idx"), "--force"], env)
    run([a.bin, "export", "--index", p("gallery.idx"), "--format", "npy", "--out", p("export.npy"), "--force"], env)
    vectors = np.load(p("export.npy"))
    with open(p("export.ids.txt")) as f:
        ids = f.read().splitlines()
    print(f"gallery {a.gallery} x {a.dim}, {a.queries} queries, top-{a.k}, {a.threads} threads, seed {a.seed}")
    print(f"semshare {a.bin}; faiss {faiss.__version__}; numpy {np.__version__}; work dir {work}")

    # Each precision's runs and FAISS's alternate, so that a slow minute of a shared machine
    # falls on both sides.
    faiss.omp_set_num_threads(a.threads)
    index = faiss.IndexFlatIP(a.dim)
    index.add(vectors)
    precisions = a.precision.split(",")
    sem_search = {pr: [] for pr in precisions}
    sem_wall = {pr: [] for pr in precisions}
    lines, f_times = {}, []
    for _ in range(a.repeat):
        for pr in precisions:
            query_cmd = [a.bin, "query", "--index", p("gallery.idx"), "--vectors", p("queries.npy"),
                         "--k", str(a.k), "--json", "--timing", "--device", "cpu", "--precision", pr]
            t = time.perf_counter()
            out = run(query_cmd, env)
            sem_wall[pr].append(time.perf_counter() - t)
            timing = next(l for l in out.stderr.splitlines() if l.startswith("timing:"))
            sem_search[pr].append(float(timing.split(" items in ")[1].split(" s ")[0]))
            lines[pr] = out.stdout.splitlines()
        t = time.perf_counter()
        f_scores, f_ids = index.search(queries, a.k)
        f_times.append(time.perf_counter() - t)

    f = min(f_times)
    print(f"faiss IndexFlatIP.search: {f:.3f} s = {a.queries / f:,.0f} queries/s")
    mismatch = 0
    for pr in precisions:
        identical, near, bad = compare(lines[pr], f_ids, f_scores, ids)
        mismatch += bad
        s, w = min(sem_search[pr]), min(sem_wall[pr])
        print(f"semshare query --precision {pr}: search {s:.3f} s = {a.queries / s:,.0f} queries/s "
              f"(whole process {w:.3f} s = {a.queries / w:,.0f} queries/s)")
        print(f"  ratio semshare / faiss (queries/s): search {f / s:.2f}x, whole process {f / w:.2f}x")
        print(f"  results: {identical} identical, {near} differing only within near ties (< 1e-5), {bad} mismatches")

    if not a.skip_text:
        start_to_answer(a, p, env)
    if mismatch:
        sys.exit(1)


def start_to_answer(a, p, env):
    ckpt = a.checkpoint
    if ckpt is None:
        run([a.bin, "synth", "--out", p("data"), "--train", "64", "--val", "16", "--test", "16", "--force"], env)
        run([a.bin, "train", "--data", p("data"), "--out", p("run"), "--steps", "1", "--batch", "8",
             "--device", "cpu", "--force"], env)
        ckpt = p("run/best.safetensors")
        vocab = open(p("data/vocab.txt")).read().split()[3:]
    else:
        vocab = None
    rng = np.random.default_rng(a.seed + 1)
    words = vocab or ["sky", "clouds", "dog", "sea"]
    with open(p("captions.txt"), "w") as f:
        for _ in range(a.gallery):
            f.write(" ".join(rng.choice(words, size=3)) + "\n")
    t = time.perf_counter()
    run([a.bin, "index", "--checkpoint", ckpt, "--texts", p("captions.txt"), "--out", p("captions.idx"),
         "--device", "cpu", "--force"], env)
    print(f"index --texts: {a.gallery} captions embedded and written in {time.perf_counter() - t:.1f} s")
    walls = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        run([a.bin, "query", "--checkpoint", ckpt, "--index", p("captions.idx"), "--text", " ".join(words[:3]),
             "--k", str(a.k), "--device", "cpu"], env)
        walls.append(time.perf_counter() - t)
    print(f"query --text start to answer on {a.gallery} items: best {min(walls) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{w * 1000:.0f}' for w in walls)} ms)")


if __name__ == "__main__":
    main()
