#!/usr/bin/env python3
"""Tests of tools/import_dataset.py: tiny inputs of every layout, made here, imported, and the
written source directory checked value by value (dtypes, shapes, text.item, vocabulary), plus bad
inputs that must fail with a message naming the file, the array and the item.

Run: python3 tools/test_importers.py   (needs numpy, scipy, h5py; `cargo test --test importers`
runs it too). SEMSHARE_KEEP_SOURCES=DIR keeps one source directory per layout in DIR (the Rust
pack/check test uses them).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import h5py
import numpy as np
import scipy.io
import scipy.sparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import import_cub  # noqa: E402
import import_dataset as imp  # noqa: E402

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "import_dataset.py")
DT = {"F32": "<f4", "F16": "<f2", "U8": "u1", "U16": "<u2", "U32": "<u4"}


def read_st(path):
    """A strict safetensors reader: {name: array}; checks alignment and contiguous offsets."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0, "data not 8-byte aligned"
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out, end = {}, 0
    for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = h["data_offsets"]
        assert a == end, f"{name}: gap or overlap at {a}"
        arr = np.frombuffer(data[a:b], dtype=DT[h["dtype"]]).reshape(h["shape"])
        out[name] = arr
        end = b
    assert end == len(data), "trailing bytes"
    return out


def read_source(out):
    with open(os.path.join(out, "source.json")) as f:
        doc = json.load(f)
    assert doc["format"] == "semshare-source" and doc["version"] == 1
    splits = {k: read_st(os.path.join(out, v[0])) for k, v in doc["splits"].items()}

    def lines(name):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return f.read().split("\n")[:-1]

    vocab = lines("vocab.txt") if os.path.exists(os.path.join(out, "vocab.txt")) else None
    return doc, splits, lines("labels.txt"), vocab


def run(*argv):
    """Runs the importer in-process; returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = imp.main([str(a) for a in argv])
    return code, err.getvalue()


def tags_as_tokens(tags, t):
    tok = np.zeros((tags.shape[0], t), np.uint32)
    for i, row in enumerate(tags):
        cols = np.flatnonzero(row)[:t]
        tok[i, : cols.size] = cols + 3
    return tok


def savemat73(path, arrays):
    """What MATLAB `save -v7.3` writes: HDF5 behind a 512-byte header, arrays transposed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            d = f.create_dataset(k, data=np.ascontiguousarray(v.T))
            d.attrs["MATLAB_class"] = np.bytes_({"float64": "double", "uint8": "uint8"}.get(str(v.dtype), "single"))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(12) + b"\x00\x02IM")


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="semshare-import-")
        self.rng = np.random.default_rng(7)

    def tearDown(self):
        keep = os.environ.get("SEMSHARE_KEEP_SOURCES")
        src = os.path.join(self.dir, "src")
        if keep and os.path.exists(os.path.join(src, "source.json")):
            dest = os.path.join(keep, self.id().rsplit(".", 1)[-1])
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest)
        shutil.rmtree(self.dir)

    def p(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, name, text):
        with open(self.p(name), "w", encoding="utf-8") as f:
            f.write(text)
        return self.p(name)

    def ok(self, *argv):
        code, err = run(*argv)
        self.assertEqual(code, 0, err)

    def fails(self, argv, *needles):
        code, err = run(*argv)
        self.assertEqual(code, 1, f"should fail: {argv}")
        self.assertTrue(err.startswith("error: "), err)
        for n in needles:
            self.assertIn(n, err)
        self.assertFalse(os.path.exists(self.p("src", "source.json")), "failed import left a source.json")
        return err

    def multihot(self, n, c):
        y = (self.rng.random((n, c)) < 0.4).astype(np.uint8)
        y[np.arange(n), self.rng.integers(0, c, n)] = 1  # every item labelled
        return y


class NumpyLayout(Base):
    def make_npz(self, name, n, k=2, r=3, d=4, v=9, t=5):
        feats = self.rng.standard_normal((n, r, d)).astype(np.float16)
        boxes = np.tile(np.array([0.1, 0.2, 0.5, 0.9, 0.4 * 0.7], np.float32), (n, r, 1))
        count = self.rng.integers(1, r + 1, n)
        classes = self.rng.integers(0, 6, (n, r))
        m = n * k
        length = self.rng.integers(1, t + 1, m)
        tokens = np.zeros((m, t), np.int64)
        for j in range(m):
            tokens[j, : length[j]] = self.rng.choice([1] + list(range(3, v)), length[j])
        item = np.repeat(np.arange(n), k)[::-1].copy()  # texts in reverse image order
        y = self.multihot(n, 3)
        arrays = dict(f=feats, b=boxes, c=count, k=classes, tok=tokens, len=length, it=item, y=y)
        np.savez(self.p(name), **arrays)
        return arrays

    def test_npz_tokens_boxes_classes_several_texts(self):
        vocab = self.write("vocab.txt", "[PAD]\n[UNK]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(6)))
        names = self.write("labels.txt", "cat\ndog\nsky\n")
        data = {s: self.make_npz(f"{s}.npz", n) for s, n in [("train", 6), ("val", 2), ("test", 3)]}
        self.ok("numpy", "--out", self.p("src"), "--name", "tiny", *sum([[f"--{s}", self.p(f"{s}.npz")] for s in data], []),
                "--features", "f", "--boxes", "b", "--count", "c", "--classes", "k", "--labels", "y",
                "--tokens", "tok", "--length", "len", "--item", "it", "--vocab", vocab, "--label-names", names)
        doc, splits, labels, v = read_source(self.p("src"))
        self.assertEqual(doc["name"], "tiny")
        self.assertEqual(doc["num_object_classes"], 6)
        self.assertEqual(sorted(doc["splits"]), ["test", "train", "val"])
        self.assertEqual(labels, ["cat", "dog", "sky"])
        self.assertEqual(v[:4], ["[PAD]", "[UNK]", "[MASK]", "w0"])
        for s, a in data.items():
            got = splits[s]
            self.assertEqual(got["image.features"].dtype, np.float16)  # f16 kept
            np.testing.assert_array_equal(got["image.features"], a["f"])
            np.testing.assert_array_equal(got["image.boxes"], a["b"])
            self.assertEqual(got["image.count"].dtype, np.uint16)
            np.testing.assert_array_equal(got["image.count"], a["c"])
            np.testing.assert_array_equal(got["image.classes"], a["k"])
            self.assertEqual(got["text.tokens"].dtype, np.uint32)
            np.testing.assert_array_equal(got["text.tokens"], a["tok"])
            np.testing.assert_array_equal(got["text.length"], a["len"])
            self.assertEqual(got["text.item"].dtype, np.uint32)
            np.testing.assert_array_equal(got["text.item"], a["it"])
            self.assertEqual(got["labels"].dtype, np.uint8)
            np.testing.assert_array_equal(got["labels"], a["y"])

    def test_npy_folder_text_features_class_indices_global_images_database(self):
        for s, n in [("train", 5), ("val", 2), ("test", 2), ("database", 4)]:
            os.makedirs(self.p(s))
            np.save(self.p(s, "img.npy"), self.rng.standard_normal((n, 8)))  # f64, global
            np.save(self.p(s, "txt.npy"), self.rng.standard_normal((n, 2, 3)).astype(np.float32))
            np.save(self.p(s, "cls.npy"), np.arange(n) % 4 + 1)  # 1-based, MATLAB style
        self.ok("numpy", "--out", self.p("src"), *sum([[f"--{s}", self.p(s)] for s in ["train", "val", "test", "database"]], []),
                "--features", "img", "--text-features", "txt", "--labels", "cls", "--label-base", "1", "--num-classes", "4")
        doc, splits, labels, vocab = read_source(self.p("src"))
        self.assertIsNone(vocab)
        self.assertNotIn("num_object_classes", doc)
        self.assertEqual(doc["name"], "src")
        self.assertEqual(labels, ["label0", "label1", "label2", "label3"])
        self.assertEqual(doc["splits"]["database"], ["database.safetensors"])
        got = splits["train"]
        img = np.load(self.p("train", "img.npy"))
        self.assertEqual(got["image.features"].dtype, np.float32)
        np.testing.assert_array_equal(got["image.features"], img.astype(np.float32)[:, None, :])
        np.testing.assert_array_equal(got["image.boxes"], np.tile([0, 0, 1, 1, 1], (5, 1, 1)).astype(np.float32))
        np.testing.assert_array_equal(got["image.count"], np.ones(5))
        self.assertNotIn("image.classes", got)
        self.assertNotIn("text.tokens", got)
        self.assertNotIn("text.item", got)  # M = N, text i is image i's
        np.testing.assert_array_equal(got["text.features"], np.load(self.p("train", "txt.npy")))
        np.testing.assert_array_equal(got["text.length"], [2] * 5)
        np.testing.assert_array_equal(got["labels"], np.eye(4, dtype=np.uint8)[np.arange(5) % 4])

    def test_single_label_mat_split_files_like_wikipedia(self):
        # Wikipedia-style: predefined splits, global image and text (LDA) features, 1-based classes
        # as a MATLAB column; v5 for train, v7.3 for test.
        made = {}
        for s, n in [("train", 6), ("val", 2), ("test", 3)]:
            arrays = {"I": self.rng.standard_normal((n, 7)), "T": self.rng.random((n, 4)),
                      "L": (np.arange(n) % 3 + 1).reshape(n, 1).astype(np.float64)}
            if s == "test":
                savemat73(self.p(s + ".mat"), arrays)
            else:
                scipy.io.savemat(self.p(s + ".mat"), arrays)
            made[s] = arrays
        self.ok("numpy", "--out", self.p("src"), *sum([[f"--{s}", self.p(s + ".mat")] for s in made], []),
                "--features", "I", "--text-features", "T", "--labels", "L", "--label-base", "1", "--num-classes", "3")
        _, splits, labels, _ = read_source(self.p("src"))
        self.assertEqual(len(labels), 3)
        for s, a in made.items():
            got = splits[s]
            np.testing.assert_array_equal(got["image.features"][:, 0], a["I"].astype(np.float32))
            np.testing.assert_array_equal(got["text.features"][:, 0], a["T"].astype(np.float32))
            np.testing.assert_array_equal(got["text.length"], np.ones(len(a["L"])))
            np.testing.assert_array_equal(got["labels"].argmax(1) + 1, a["L"][:, 0])
            np.testing.assert_array_equal(got["labels"].sum(1), np.ones(len(a["L"])))

    def test_tag_matrix_and_f16_option(self):
        tags = {s: (self.rng.random((n, 5)) < 0.5).astype(np.uint8) for s, n in [("train", 4), ("val", 0), ("test", 2)]}
        for s, tg in tags.items():
            tg[:, 0] = 1
            y = self.multihot(tg.shape[0], 2) if tg.shape[0] else np.zeros((0, 2))  # val: an empty split
            np.savez(self.p(s + ".npz"), f=self.rng.standard_normal((tg.shape[0], 2, 3)), y=y, t=tg)
        self.write("tags.txt", "a 10\nb 9\nc 9\nd 2\ne 1\n")
        self.ok("numpy", "--out", self.p("src"), *sum([[f"--{s}", self.p(s + ".npz")] for s in tags], []), "--features", "f",
                "--labels", "y", "--tags", "t", "--tag-list", self.p("tags.txt"), "--features-dtype", "f16", "--max-tokens", "3")
        _, splits, _, vocab = read_source(self.p("src"))
        self.assertEqual(vocab, ["[PAD]", "[UNK]", "[MASK]", "a", "b", "c", "d", "e"])
        t = min(3, max(int(tg.sum(1).max()) for tg in tags.values() if tg.size))  # one T for all splits
        for s, tg in tags.items():
            got = splits[s]
            self.assertEqual(got["image.features"].dtype, np.float16)
            np.testing.assert_array_equal(got["text.length"], np.minimum(tg.sum(1), t))
            np.testing.assert_array_equal(got["text.tokens"], tags_as_tokens(tg, t))

    def test_bad_inputs(self):
        n = 4
        good = dict(f=self.rng.standard_normal((n, 2, 3)), y=self.multihot(n, 2), t=np.ones((n, 3), np.uint8))

        def case(split_arrays, extra=(), *needles):
            for s in ["train", "val", "test"]:
                np.savez(self.p(s + ".npz"), **split_arrays.get(s, good))
            argv = ["numpy", "--out", self.p("src"), *sum([[f"--{s}", self.p(s + ".npz")] for s in ["train", "val", "test"]], []),
                    "--features", "f", "--labels", "y", "--tags", "t", *extra]
            return self.fails(argv, *needles)

        nan = dict(good, f=good["f"].copy())
        nan["f"][2, 1, 0] = np.nan
        case({"val": nan}, (), "val.npz:f", "item 2, region 1, dim 0", "not finite")
        two = dict(good, y=good["y"].copy())
        two["y"][3, 1] = 2
        case({"train": two}, (), "train.npz:y", "item 3, label 1: value 2")
        empty = dict(good, y=good["y"].copy())
        empty["y"][1] = 0
        case({"test": empty}, (), "test.npz:y", "item 1 has no label")
        case({"train": dict(good, f=good["f"][:3])}, (), "train.npz:f", "3 items, expected 4")
        case({"train": dict(good, t=np.zeros((n, 3)))}, (), "train.npz:t", "item 0 has no tag")
        case({"train": dict(good, f=np.zeros((n, 3, 8, 8)))}, (), "train.npz:f", "raw pixels")
        case({"test": dict(good, y=np.array([0, 1, 5, 1]))}, ("--num-classes", "2"), "test.npz:y", "item 2: class 5 outside 0..1")
        big = dict(good, f=np.full((n, 2, 3), 1e6))
        case({"val": big}, ("--features-dtype", "f16"), "val.npz:f", "does not fit f16")
        zero = dict(good, k=np.zeros((n, 2)))
        case({"train": dict(good, k=np.full((n, 2), 5)), "val": zero, "test": zero}, ("--classes", "k", "--num-object-classes", "3"),
             "train split, item 0, region 0: class 5 >= --num-object-classes 3")
        with open(self.p("file"), "w"):
            pass
        self.assertEqual(run("numpy", "--out", self.p("file"), "--train", self.p("train.npz"), "--val", self.p("val.npz"),
                             "--test", self.p("test.npz"), "--features", "f", "--labels", "y", "--tags", "t")[0], 1)
        err = case({}, ("--count", "zz"), "train.npz", "no array 'zz'")
        self.assertIn("arrays:", err)

    def test_bad_tokens_items_boxes(self):
        vocab = self.write("vocab.txt", "[PAD]\n[UNK]\n[MASK]\nw\n")
        n = 2
        base = dict(f=np.zeros((n, 1, 2)), y=np.ones((n, 1)), tok=np.array([[3, 3], [1, 0]]),
                    b=np.array([[[0, 0, 1, 1, 1]]] * 2), c=np.array([1, 1]))

        def case(arr, extra, *needles):
            for s in ["train", "val", "test"]:
                np.savez(self.p(s + ".npz"), **(arr if s == "test" else base))
            argv = ["numpy", "--out", self.p("src"), *sum([[f"--{s}", self.p(s + ".npz")] for s in ["train", "val", "test"]], []),
                    "--features", "f", "--labels", "y", "--tokens", "tok", "--vocab", vocab, *extra]
            self.fails(argv, *needles)

        case(dict(base, tok=np.array([[3, 4], [1, 0]])), (), "test.npz:tok", "text 0, position 1: token 4")
        case(dict(base, tok=np.array([[3, 3], [0, 0]])), (), "test.npz:tok", "text 1: length 0")
        case(dict(base, tok=np.array([[3, 3], [1, 0], [3, 0]]), it=np.array([0, 0, 0])), ("--item", "it"),
             "test.npz:it", "image 1 has no text")
        case(dict(base, tok=np.array([[3, 3], [1, 0], [3, 0]])), (), "test.npz", "3 texts for 2 images", "--item")
        case(dict(base, b=np.array([[[0.5, 0, 0.2, 1, 0.1]]] * 2)), ("--boxes", "b"), "test.npz:b",
             "item 0, region 0", "x1 > x2")
        case(dict(base, b=np.array([[[0, 0, 1, 1.5, 1]]] * 2)), ("--boxes", "b"), "test.npz:b", "outside [0, 1]")
        case(dict(base, c=np.array([1, 2])), ("--count", "c"), "test.npz:c", "item 1: region count 2 outside 1..=1")


class MatLayout(Base):
    N, C, K = 30, 4, 6

    def data(self):
        y = self.multihot(self.N, self.C)
        tags = (self.rng.random((self.N, self.K)) < 0.5).astype(np.uint8)
        tags[np.arange(self.N), self.rng.integers(0, self.K, self.N)] = 1
        feats = self.rng.standard_normal((self.N, 3, 5)).astype(np.float32)
        feats[:, :, 0] = np.arange(self.N)[:, None]  # row id, to follow items through the split
        self.write("tags.txt", "".join(f"t{j} {100 - j}\n" for j in range(self.K)))
        self.write("labels.txt", "".join(f"c{j}\n" for j in range(self.C)))
        return y, tags, feats

    def check(self, y, tags, feats, query, train, val, t):
        doc, splits, labels, vocab = read_source(self.p("src"))
        self.assertEqual(labels, [f"c{j}" for j in range(self.C)])
        self.assertEqual(vocab, ["[PAD]", "[UNK]", "[MASK]"] + [f"t{j}" for j in range(self.K)])
        sizes = {s: splits[s]["labels"].shape[0] for s in splits}
        self.assertEqual(sizes, {"test": query, "database": self.N - query, "train": train, "val": val})
        rows = {s: splits[s]["image.features"][:, 0, 0].astype(int) for s in splits}
        self.assertEqual(sorted(np.concatenate([rows["test"], rows["database"]])), list(range(self.N)))
        np.testing.assert_array_equal(rows["train"], rows["database"][:train])
        np.testing.assert_array_equal(rows["val"], rows["database"][train : train + val])
        for s, got in splits.items():
            r = rows[s]
            np.testing.assert_array_equal(got["image.features"], feats[r])
            np.testing.assert_array_equal(got["labels"], y[r])
            np.testing.assert_array_equal(got["text.tokens"], tags_as_tokens(tags[r], t))
            np.testing.assert_array_equal(got["text.length"], np.minimum(tags[r].sum(1), t))
            np.testing.assert_array_equal(got["image.boxes"], np.tile([0, 0, 1, 1, 1], (len(r), 3, 1)))
            self.assertNotIn("text.item", got)
        return rows

    def test_v5_split_files(self):
        y, tags, feats = self.data()
        scipy.io.savemat(self.p("lall.mat"), {"LAll": y})
        scipy.io.savemat(self.p("yall.mat"), {"YAll": tags.astype(np.float64)})
        scipy.io.savemat(self.p("feat.mat"), {"XAll": feats, "other": np.zeros(3)})
        args = ["mat", "--out", self.p("src"), "--labels", self.p("lall.mat"), "--tags", self.p("yall.mat"),
                "--features", self.p("feat.mat") + ":XAll", "--tag-list", self.p("tags.txt"),
                "--label-names", self.p("labels.txt"), "--query", 6, "--train", 15, "--val", 4, "--seed", 3]
        self.ok(*args)
        rows = self.check(y, tags, feats, 6, 15, 4, int(tags.sum(1).max()))
        np.testing.assert_array_equal(rows["test"], np.random.default_rng(3).permutation(self.N)[:6])
        self.ok(*args[:-2], "--no-shuffle", "--max-tokens", 2)  # DCMH TensorFlow split, truncated tags
        rows = self.check(y, tags, feats, 6, 15, 4, 2)
        np.testing.assert_array_equal(rows["test"], np.arange(6))

    def test_v73_hdf5_one_file_equals_v5(self):
        y, tags, feats = self.data()
        savemat73(self.p("all.mat"), {"LAll": y, "YAll": tags, "IAll": feats.astype(np.float64)})
        self.assertTrue(imp.is_hdf5(self.p("all.mat")))
        f = self.p("all.mat")
        self.ok("mat", "--out", self.p("src"), "--labels", f, "--tags", f, "--features", f, "--tag-list", self.p("tags.txt"),
                "--label-names", self.p("labels.txt"), "--query", 5, "--train", 20, "--val", 5)
        self.check(y, tags, feats, 5, 20, 5, int(tags.sum(1).max()))

    def test_authors_label_tag_mat_and_global_features(self):
        y, tags, feats = self.data()
        scipy.io.savemat(self.p("all_label.mat"), {"feat": y})
        scipy.io.savemat(self.p("all_tag.mat"), {"feat": tags})
        np.save(self.p("img.npy"), feats[:, 0, :])
        self.ok("mat", "--out", self.p("src"), "--labels", self.p("all_label.mat"), "--tags", self.p("all_tag.mat"),
                "--features", self.p("img.npy"), "--query", 5, "--train", 10, "--val", 0)
        _, splits, labels, vocab = read_source(self.p("src"))
        self.assertEqual(labels, [f"label{j}" for j in range(self.C)])
        self.assertEqual(vocab[3:], [f"tag{j}" for j in range(self.K)])
        self.assertEqual(splits["train"]["image.features"].shape, (10, 1, 5))
        self.assertEqual(splits["val"]["labels"].shape, (0, self.C))

    def test_bad_mat_inputs(self):
        y, tags, feats = self.data()
        scipy.io.savemat(self.p("l.mat"), {"LAll": y})
        scipy.io.savemat(self.p("t.mat"), {"YAll": tags})
        savemat73(self.p("pix.mat"), {"IAll": np.zeros((self.N, 3, 4, 4), np.uint8)})
        base = ["mat", "--out", self.p("src"), "--labels", self.p("l.mat"), "--tags", self.p("t.mat"), "--query", 5, "--train", 10]
        self.fails(base + ["--features", self.p("pix.mat")], "pix.mat:IAll", "raw pixels", "[30, 3, 4, 4]")
        np.save(self.p("f.npy"), feats[:-1])
        self.fails(base + ["--features", self.p("f.npy")], "f.npy", "29 items, expected 30")
        np.save(self.p("f.npy"), feats)
        self.fails(base + ["--features", self.p("f.npy"), "--train", 100], "do not fit 30 items")
        scipy.io.savemat(self.p("two.mat"), {"A": y, "B": y})
        self.fails(["mat", "--out", self.p("src"), "--labels", self.p("two.mat"), "--tags", self.p("t.mat"),
                    "--features", self.p("f.npy")], "two.mat", "no variable 'LAll'", "A, B")
        with open(self.p("junk.mat"), "wb") as f:
            f.write(b"not a mat file at all" * 10)
        self.fails(base + ["--features", self.p("f.npy"), "--labels", self.p("junk.mat")], "junk.mat")
        with open(self.p("f.npy"), "r+b") as f:
            f.truncate(200)  # header intact, data cut short
        self.fails(base + ["--features", self.p("f.npy")], "f.npy", "cannot read")
        np.save(self.p("f.npy"), feats)
        with open(self.p("bad.npz"), "wb") as f:
            f.write(b"PK\x03\x04 not really a zip")
        self.fails(base + ["--features", self.p("bad.npz")], "bad.npz", "cannot read")
        with h5py.File(self.p("cell.mat"), "w", userblock_size=512) as f:
            f.create_group("IAll")
        self.fails(base + ["--features", self.p("cell.mat")], "cell.mat:IAll", "struct, cell or sparse")
        sparse = scipy.sparse.csc_matrix(tags.astype(np.float64))
        scipy.io.savemat(self.p("t.mat"), {"YAll": sparse})
        self.ok(*base, "--val", 3, "--features", self.p("f.npy"))  # MATLAB sparse tag matrix: read densely
        _, splits, _, _ = read_source(self.p("src"))
        self.assertEqual(splits["train"]["text.tokens"].shape[0], 10)
        os.remove(self.p("src", "source.json"))
        self.write("short.txt", "a\nb\n")
        self.fails(base + ["--features", self.p("f.npy"), "--tag-list", self.p("short.txt")], "short.txt", "2 tags", "6 columns")


class ScanLayout(Base):
    def test_captions_vocab_unk_and_items(self):
        caps = {
            "train": ["A dog runs.", "The dog, running!", "a cat sits", "The cat sits."],
            "dev": ["A dog sits", "Zebra!"],
            "test": ["cat cat cat cat cat", "dog"],
        }
        ims = {}
        for s, lines in caps.items():
            n = len(lines) // 2 if s == "train" else len(lines) // (2 if s == "dev" else 1)
            ims[s] = self.rng.standard_normal((n, 36, 4)).astype(np.float32)
            np.save(self.p(f"{s}_ims.npy"), ims[s])
            self.write(f"{s}_caps.txt", "\n".join(lines) + "\n")
            np.save(self.p(f"{s}_label.npy"), self.multihot(n, 3))
        scores = self.rng.random((2, 36, 5))
        np.save(self.p("train_cls.npy"), scores)  # the authors' COCO files: train only
        self.ok("scan", "--dir", self.dir, "--out", self.p("src"), "--min-count", 2, "--max-tokens", 4, "--labels", "label",
                "--classes", "cls")
        doc, splits, labels, vocab = read_source(self.p("src"))
        # Train counts: the 2, dog 2, cat 2, sits 2, a 2, . 2; others once. Count desc, then name.
        self.assertEqual(vocab, ["[PAD]", "[UNK]", "[MASK]", ".", "a", "cat", "dog", "sits", "the"])
        ids = {w: i for i, w in enumerate(vocab)}
        tr = splits["train"]
        np.testing.assert_array_equal(tr["text.tokens"][0], [ids["a"], ids["dog"], 1, ids["."]])
        np.testing.assert_array_equal(tr["text.tokens"][1], [ids["the"], ids["dog"], 1, 1])  # truncated at 4
        np.testing.assert_array_equal(tr["text.length"], [4, 4, 3, 4])
        np.testing.assert_array_equal(tr["text.item"], [0, 0, 1, 1])
        np.testing.assert_array_equal(tr["image.features"], ims["train"])
        self.assertEqual(tr["image.boxes"].shape, (2, 36, 5))
        np.testing.assert_array_equal(tr["image.boxes"][1, 35], [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(tr["image.count"], [36, 36])
        np.testing.assert_array_equal(tr["labels"], np.load(self.p("train_label.npy")))
        np.testing.assert_array_equal(splits["val"]["text.tokens"][1], [1, 1, 0, 0])  # zebra ! -> [UNK] [UNK]
        np.testing.assert_array_equal(splits["val"]["text.item"], [0, 0])
        self.assertNotIn("text.item", splits["test"])  # one caption per image
        np.testing.assert_array_equal(tr["image.classes"], scores.argmax(-1))
        self.assertEqual(doc["num_object_classes"], 5)
        self.assertNotIn("image.classes", splits["val"])
        self.assertEqual(splits["test"]["text.tokens"].shape, (2, 4))

    def test_bad_scan_inputs(self):
        np.save(self.p("train_ims.npy"), np.zeros((2, 36, 4), np.float32))
        self.write("train_caps.txt", "a\nb\nc\n")
        for s in ["dev", "test"]:
            np.save(self.p(f"{s}_ims.npy"), np.zeros((1, 36, 4), np.float32))
            self.write(f"{s}_caps.txt", "a\n")
        self.fails(["scan", "--dir", self.dir, "--out", self.p("src")], "train_caps.txt", "3 captions for 2 images")
        self.write("train_caps.txt", "a\n\nb\nc\n")
        self.fails(["scan", "--dir", self.dir, "--out", self.p("src")], "train_caps.txt", "line 2 has no words")
        self.write("train_caps.txt", "a\nb\n")
        self.fails(["scan", "--dir", self.dir, "--out", self.p("src"), "--splits", "train=train,val=nope,test=test"],
                   "nope_caps.txt", "not found")


class FlickrLayout(Base):
    def make(self, s, n, hw_order="hw", cls=True):
        r, d = 4, 6
        h = self.rng.integers(50, 100, n).astype(np.float64)
        w = h + 40  # landscape: a wrong order puts boxes outside the image
        x1 = self.rng.random((n, r)) * w[:, None] / 2
        y1 = self.rng.random((n, r)) * h[:, None] / 2
        x2 = x1 + self.rng.random((n, r)) * w[:, None] / 2
        y2 = y1 + self.rng.random((n, r)) * h[:, None] / 2
        box = np.stack([x1, y1, x2, y2], -1).astype(np.float32)
        box[0, 0] = [0, 0, w[0], h[0]]  # the whole image, exactly at the border
        np.save(self.p(f"{s}_preim.npy"), self.rng.standard_normal((n, r, d)).astype(np.float32))
        np.save(self.p(f"{s}_box.npy"), box)
        np.save(self.p(f"{s}_hw.npy"), np.stack([h, w] if hw_order == "hw" else [w, h], -1))
        y = self.multihot(n, 3)
        tags = (self.rng.random((n, 5)) < 0.4).astype(np.uint8)
        tags[:, 2] = 1
        scipy.io.savemat(self.p(f"{s}_label.mat"), {"feat": y})
        scipy.io.savemat(self.p(f"{s}_tag.mat"), {"feat": tags.astype(np.float64)})
        scores = self.rng.random((n, r, 7)).astype(np.float32)
        if cls:
            np.save(self.p(f"{s}_cls.npy"), scores)
        want = np.stack([x1 / w[:, None], y1 / h[:, None], x2 / w[:, None], y2 / h[:, None],
                         (x2 - x1) * (y2 - y1) / (w * h)[:, None]], -1)
        want[0, 0] = [0, 0, 1, 1, 1]
        return dict(box=want, y=y, tags=tags, scores=scores)

    def test_authors_layout(self):
        self.write("common_tags.txt", "sky 9\nsea 8\nsun 8\nred 3\nart 2\n")
        made = {"train": self.make("train", 5), "val": self.make("dev", 3, cls=False), "test": self.make("test", 4, cls=False)}
        self.ok("flickr", "--dir", self.dir, "--out", self.p("src"), "--tag-list", self.p("common_tags.txt"))
        doc, splits, labels, vocab = read_source(self.p("src"))
        self.assertEqual(vocab, ["[PAD]", "[UNK]", "[MASK]", "sky", "sea", "sun", "red", "art"])
        self.assertEqual(doc["num_object_classes"], 7)
        t = max(int(m["tags"].sum(1).max()) for m in made.values())
        for s, m in made.items():
            got = splits[s]
            theirs = {"val": "dev"}.get(s, s)
            np.testing.assert_array_equal(got["image.features"], np.load(self.p(f"{theirs}_preim.npy")))
            np.testing.assert_allclose(got["image.boxes"], m["box"], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(got["labels"], m["y"])
            np.testing.assert_array_equal(got["text.tokens"], tags_as_tokens(m["tags"], t))
            np.testing.assert_array_equal(got["image.count"], [4] * len(m["y"]))
        np.testing.assert_array_equal(splits["train"]["image.classes"], made["train"]["scores"].argmax(-1))
        self.assertNotIn("image.classes", splits["test"])

    def test_hw_order(self):
        self.write("tags.txt", "a\nb\nc\nd\ne\n")
        for s, n in [("train", 3), ("dev", 2), ("test", 2)]:
            self.make(s, n, hw_order="wh")
        argv = ["flickr", "--dir", self.dir, "--out", self.p("src"), "--tag-list", self.p("tags.txt")]
        self.fails(argv, "_box.npy", "lies outside the image", "wrong --hw-order?")
        self.ok(*argv, "--hw-order", "wh")

    def test_bad_flickr_inputs(self):
        self.write("tags.txt", "a\nb\nc\nd\ne\n")
        for s, n in [("train", 3), ("dev", 2), ("test", 2)]:
            self.make(s, n)
        argv = ["flickr", "--dir", self.dir, "--out", self.p("src"), "--tag-list", self.p("tags.txt")]
        np.save(self.p("dev_hw.npy"), np.array([[10, 10], [0, 5]]))
        self.fails(argv, "dev_hw.npy", "item 1: image size [0.0, 5.0] is not positive")
        self.make("dev", 2)
        np.save(self.p("test_box.npy"), np.zeros((2, 3, 4)))
        self.fails(argv, "test_box.npy", "[2, 3, 4]", "expected [2, 4, 4]")
        self.make("test", 2)
        scipy.io.savemat(self.p("test_label.mat"), {"feat": np.array([[1, 0, 0], [0, 0, 0]])})
        self.fails(argv, "test_label.mat:feat", "item 1 has no label")
        self.write("tags.txt", "a\nb\nb\nd\ne\n")
        self.fails(argv, "tags.txt", "line 3 ('b') repeats line 2")


class Writer(Base):
    def test_failed_import_keeps_the_previous_source_and_leaves_no_temp_files(self):
        np.savez(self.p("ok.npz"), f=np.zeros((2, 1, 2)), y=np.ones((2, 1)), t=np.ones((2, 2)))
        rest = ["--val", self.p("ok.npz"), "--test", self.p("ok.npz"), "--features", "f", "--labels", "y", "--tags", "t"]
        argv = ["numpy", "--out", self.p("src"), "--train", self.p("ok.npz"), *rest]
        self.ok(*argv)
        before = read_source(self.p("src"))
        np.savez(self.p("bad.npz"), f=np.full((2, 1, 2), np.inf), y=np.ones((2, 1)), t=np.ones((2, 2)))
        code, err = run("numpy", "--out", self.p("src"), "--train", self.p("bad.npz"), *rest)
        self.assertEqual(code, 1)
        self.assertIn("bad.npz:f", err)
        after = read_source(self.p("src"))  # validation fails before anything is written
        self.assertEqual(before[0], after[0])
        self.assertEqual(sorted(os.listdir(self.p("src"))),
                         ["labels.txt", "source.json", "test.safetensors", "train.safetensors", "val.safetensors", "vocab.txt"])

    def test_command_line(self):
        np.savez(self.p("ok.npz"), f=np.zeros((2, 1, 2)), y=np.ones((2, 1)), t=np.ones((2, 2)))
        argv = [sys.executable, TOOL, "numpy", "--out", self.p("src"), "--train", self.p("ok.npz"), "--val",
                self.p("ok.npz"), "--test", self.p("ok.npz"), "--features", "f", "--labels", "y", "--tags", "t"]
        done = subprocess.run(argv, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("train 2 images / 2 texts", done.stdout)
        done = subprocess.run(argv[:-1] + ["nope"], capture_output=True, text=True)
        self.assertEqual(done.returncode, 1)
        self.assertIn("no array 'nope'", done.stderr)
        self.assertNotIn("Traceback", done.stderr)


class CubRecipe(Base):
    """tools/import_cub.py: the README's protocol on a made-up file of CUB-10's layout."""

    def make(self, name="cub.safetensors", per_class=60, classes=10, di=5, dt=3):
        n = per_class * classes
        # Rows sorted by class as in the real file; row i's features encode i, to trace rows.
        image = self.rng.random((n, di)).astype(np.float32)
        image[:, 0] = np.arange(n)
        text = self.rng.standard_normal((n, dt)).astype(np.float32)
        text[:, 0] = np.arange(n) + 0.5
        labels = np.repeat(np.arange(classes), per_class).astype(np.uint8)
        tensors = [("image", image, np.dtype("<f4")), ("labels", labels, np.dtype("|u1")), ("text", text, np.dtype("<f4"))]
        imp.write_safetensors(self.p(name), tensors, {})
        return self.p(name), image, text, labels

    def cub(self, *argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = import_cub.main([str(a) for a in argv])
        return code, err.getvalue()

    def test_protocol_split_is_stratified_disjoint_and_keeps_the_pairs(self):
        path, image, text, labels = self.make()
        code, err = self.cub("--data", path, "--seed", 3, "--out", self.p("src"))
        self.assertEqual(code, 0, err)
        doc, splits, names, vocab = read_source(self.p("src"))
        self.assertEqual(doc["name"], "cub10-3")
        self.assertIsNone(vocab)
        self.assertEqual(names, [f"class{c}" for c in range(10)])
        seen = []
        for split, per in (("train", 42), ("val", 6), ("test", 12)):
            s = splits[split]
            self.assertEqual(s["image.features"].shape, (10 * per, 1, 5))
            self.assertEqual(s["text.features"].shape, (10 * per, 1, 3))
            self.assertTrue((s["text.length"] == 1).all() and (s["image.count"] == 1).all())
            self.assertNotIn("text.item", s)
            rows = s["image.features"][:, 0, 0].astype(np.int64)
            # Image row i is paired with text row i, values copied exactly, one-hot labels.
            np.testing.assert_array_equal(s["image.features"][:, 0, :], image[rows])
            np.testing.assert_array_equal(s["text.features"][:, 0, :], text[rows])
            np.testing.assert_array_equal(s["labels"].argmax(1), labels[rows])
            self.assertTrue((s["labels"].sum(1) == 1).all())
            self.assertEqual(np.bincount(labels[rows], minlength=10).tolist(), [per] * 10)
            seen.extend(rows.tolist())
        self.assertEqual(sorted(seen), list(range(600)))
        # The protocol itself: shuffled by seed, then each class's first 42 / next 6 / next 12.
        perm = np.random.default_rng(3).permutation(600)
        for c in range(10):
            members = perm[labels[perm] == c]
            train_rows = splits["train"]["image.features"][:, 0, 0].astype(np.int64)
            self.assertEqual(sorted(members[:42].tolist()), sorted(r for r in train_rows if labels[r] == c))
        # Split order is the shuffled order, not class order.
        train_rows = splits["train"]["image.features"][:, 0, 0].astype(np.int64)
        self.assertEqual(train_rows.tolist(), [r for r in perm if r in set(train_rows.tolist())])

    def test_same_seed_same_split_other_seed_other_split(self):
        path, *_ = self.make()
        rows = {}
        for run_name, seed in (("a", 1), ("b", 1), ("c", 2)):
            code, err = self.cub("--data", path, "--seed", seed, "--out", self.p(run_name))
            self.assertEqual(code, 0, err)
            rows[run_name] = read_source(self.p(run_name))[1]["test"]["image.features"][:, 0, 0].tolist()
        self.assertEqual(rows["a"], rows["b"])
        self.assertNotEqual(sorted(rows["a"]), sorted(rows["c"]))

    def test_bad_inputs_name_the_file_and_tensor(self):
        path, *_ = self.make("short.safetensors", per_class=59)
        code, err = self.cub("--data", path, "--seed", 0, "--out", self.p("src"))
        self.assertEqual(code, 1)
        self.assertIn("short.safetensors:labels: class 0 has 59 items", err)
        imp.write_safetensors(self.p("nolabels.safetensors"), [("image", np.zeros((2, 2), np.float32), np.dtype("<f4"))], {})
        code, err = self.cub("--data", self.p("nolabels.safetensors"), "--seed", 0, "--out", self.p("src"))
        self.assertEqual(code, 1)
        self.assertIn("nolabels.safetensors: no tensor `text`", err)
        path, image, text, labels = self.make("inf.safetensors")
        image[7, 2] = np.inf
        imp.write_safetensors(path, [("image", image, np.dtype("<f4")), ("labels", labels, np.dtype("|u1")),
                                     ("text", text, np.dtype("<f4"))], {})
        code, err = self.cub("--data", path, "--seed", 0, "--out", self.p("src"))
        self.assertEqual(code, 1)
        self.assertIn("inf.safetensors:image: item 7: non-finite", err)
        self.assertFalse(os.path.exists(self.p("src", "source.json")))


if __name__ == "__main__":
    unittest.main(verbosity=1)
