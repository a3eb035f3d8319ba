#!/usr/bin/env python3
"""semshare's exact top-k against FAISS's (issue 13, item 5): the `.npy` that `semshare export`
writes loads into `faiss.IndexFlatIP`, and FAISS's exact inner-product top-k on it equals
`semshare query --vectors` on the same query vectors: the same ids in the same order, scores
to 1e-5.

    SEMSHARE_BIN=target/debug/semshare python3 tools/test_faiss.py

Needs numpy and faiss-cpu (pinned in .ci/run: faiss-cpu==1.15.1). tests/faiss.rs runs it
under `cargo test` (skipped with a printed line without faiss, unless SEMSHARE_REQUIRE_PYTHON=1).

Ties: the two libraries sum the 64 or 128 products of a score in different orders, so two
scores closer than float32 rounding may come out in either order. The vectors are random
(no exact ties), and a query whose top k + 1 scores (f64) have a gap under 2e-6 is left out
of the comparison, which the test counts and bounds.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

try:
    import faiss
except ImportError as e:  # the Rust runner probes first; this is for a direct run
    sys.exit(f"faiss is not importable: {e} (python3 -m pip install --user faiss-cpu==1.15.1)")

BIN = os.environ.get("SEMSHARE_BIN", "target/debug/semshare")


def semshare(*args):
    out = subprocess.run([BIN, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"semshare {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out.stdout


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("<f4")


def separated(gallery, queries, k, gap=2e-6):
    """Queries whose k + 1 best f64 scores are at least `gap` apart."""
    s = queries.astype(np.float64) @ gallery.astype(np.float64).T
    top = -np.sort(-s, axis=1)[:, : k + 1]
    return np.min(top[:, :-1] - top[:, 1:], axis=1) >= gap


class FaissAgrees(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="semshare-faiss-")

    def path(self, name):
        return os.path.join(self.dir, name)

    def exported(self, gallery):
        """Indexes `gallery` with `semshare index --vectors` and exports it: (vectors, ids)."""
        np.save(self.path("g.npy"), gallery)
        semshare("index", "--vectors", self.path("g.npy"), "--out", self.path("g.idx"))
        semshare("export", "--index", self.path("g.idx"), "--format", "npy", "--out", self.path("export.npy"))
        vectors = np.load(self.path("export.npy"))
        with open(self.path("export.ids.txt")) as f:
            ids = f.read().splitlines()
        return vectors, ids

    def compare(self, n, d, nq, k, seed):
        rng = np.random.default_rng(seed)
        gallery, queries = unit_rows(rng, n, d), unit_rows(rng, nq, d)
        vectors, ids = self.exported(gallery)
        self.assertEqual(vectors.dtype, np.float32)
        self.assertEqual(vectors.shape, (n, d))
        self.assertEqual(ids, [f"g/{i}" for i in range(n)])
        # The export is the gallery, normalised again: equal to f32 rounding.
        np.testing.assert_allclose(vectors, gallery, atol=1e-6)

        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        f_scores, f_ids = index.search(queries, k)

        np.save(self.path("q.npy"), queries)
        lines = semshare("query", "--index", self.path("g.idx"), "--vectors", self.path("q.npy"),
                         "--k", str(k), "--json").splitlines()
        self.assertEqual(len(lines), nq)
        keep = separated(vectors, queries, min(k, n - 1))
        self.assertGreaterEqual(keep.mean(), 0.9, "too many near ties to compare")
        position = {id_: i for i, id_ in enumerate(ids)}
        compared = 0
        for q, line in enumerate(lines):
            answer = json.loads(line)
            self.assertEqual(answer["query"], q)
            got_ids = [position[r["id"]] for r in answer["results"]]
            got_scores = [r["score"] for r in answer["results"]]
            np.testing.assert_allclose(got_scores, f_scores[q], atol=1e-5, err_msg=f"query {q}")
            if keep[q]:
                self.assertEqual(got_ids, list(f_ids[q]), f"query {q}")
                compared += 1
        return compared

    def test_top_10_of_3000_by_64_equals_faiss(self):
        compared = self.compare(n=3000, d=64, nq=300, k=10, seed=1)
        print(f"compared {compared} of 300 queries id for id", file=sys.stderr)

    def test_odd_sizes_and_k_above_a_tile(self):
        # 2,500 > the CPU top-k's 1,024-row tile; k = 37 spans several merges; d = 129 is odd.
        self.compare(n=2500, d=129, nq=7, k=37, seed=2)

    def test_every_item_when_k_is_the_gallery(self):
        self.compare(n=50, d=16, nq=5, k=50, seed=3)


if __name__ == "__main__":
    unittest.main()
