#!/usr/bin/env python3
"""CUB-10 (../shared/data/cub/cub10.safetensors) as a semshare source directory, split by the
protocol of the data's README: the rows (sorted by class) are shuffled by --seed (numpy
default_rng(seed).permutation), then each class gives its first 42 shuffled items to `train`, the
next 6 to `val` and the next 12 to `test` (420 / 60 / 120). Inside a split the items keep the
shuffled order. Global features: one region per image (the whole-image box), one text segment per
item (`text.features`, doc2vec). Written by import_dataset.py's own writer, then:

    python3 tools/import_cub.py --seed 0 --out /tmp/cub-src-0
    semshare pack --from /tmp/cub-src-0 --out data/cub10-0

Needs numpy only. Bad input (a missing tensor, wrong dtype or shape, non-finite values, a class
without 60 items) exits 1 with one `error:` line naming the file and the tensor.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import import_dataset as imp  # noqa: E402

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cub",
                            "cub10.safetensors")
# Per class: train, val, test (the README's protocol).
PER_CLASS = (42, 6, 12)
ST_NUMPY = {"F32": "<f4", "F64": "<f8", "U8": "u1"}


def read_safetensors(path):
    """{name: array} of a safetensors file (F32, F64, U8 tensors)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        imp.fail(f"{path}: {e.strerror}")
    if len(raw) < 8:
        imp.fail(f"{path}: not a safetensors file (shorter than its header length)")
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        imp.fail(f"{path}: not a safetensors file ({e})")
    header.pop("__metadata__", None)
    data, out = raw[8 + n :], {}
    for name, h in header.items():
        dt = ST_NUMPY.get(h.get("dtype"))
        if dt is None:
            imp.fail(f"{path}:{name}: dtype {h.get('dtype')} (expected F32, F64 or U8)")
        a, b = h["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=dt)
        if arr.size != int(np.prod(h["shape"], dtype=np.int64)):
            imp.fail(f"{path}:{name}: {arr.size} values for shape {h['shape']}")
        out[name] = arr.reshape(h["shape"])
    return out


def load_cub(path):
    """(image [N, Di] f32, text [N, Dt] f32, labels [N] int) of the file, checked."""
    t = read_safetensors(path)
    for name in ("image", "text", "labels"):
        if name not in t:
            imp.fail(f"{path}: no tensor `{name}` (expected image, text, labels)")
    image, text, labels = t["image"], t["text"], t["labels"]
    n = labels.shape[0]
    for name, a in (("image", image), ("text", text)):
        if a.ndim != 2 or a.shape[0] != n:
            imp.fail(f"{path}:{name}: shape {list(a.shape)}, expected [{n}, D] (one row per label)")
        bad = imp.first_bad_row(~np.isfinite(a))
        if bad is not None:
            imp.fail(f"{path}:{name}: item {bad}: non-finite value")
    if labels.ndim != 1:
        imp.fail(f"{path}:labels: shape {list(labels.shape)}, expected [N] class indices")
    return image.astype(np.float32), text.astype(np.float32), labels.astype(np.int64)


def stratified_split(labels, seed, per_class=PER_CLASS, where="labels"):
    """{split: item rows}: shuffle by seed, then per class its first train / val / test items."""
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    need = sum(per_class)
    classes = np.unique(labels)
    rows = {"train": [], "val": [], "test": []}
    for c in classes:
        members = perm[labels[perm] == c]  # this class's items in shuffled order
        if members.size != need:
            imp.fail(f"{where}: class {c} has {members.size} items, the protocol takes {need} "
                     f"({'/'.join(map(str, per_class))})")
    # Walk the permutation once, so that each split keeps the shuffled order.
    taken = {int(c): 0 for c in classes}
    bounds = np.cumsum(per_class)
    for i in perm:
        c = int(labels[i])
        k = taken[c]
        taken[c] += 1
        split = "train" if k < bounds[0] else "val" if k < bounds[1] else "test"
        rows[split].append(int(i))
    return {k: np.asarray(v, np.int64) for k, v in rows.items()}


def make_split(image, text, onehot, rows):
    n = rows.size
    return imp.Split(
        image[rows][:, None, :],
        np.dtype("<f4"),
        onehot[rows],
        np.ones(n, np.uint16),
        text_features=text[rows][:, None, :],
        text_feature_dtype=np.dtype("<f4"),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_FILE, help="cub10.safetensors (default: ../shared/data/cub/)")
    ap.add_argument("--seed", type=int, required=True, help="split seed (the protocol uses 0..4)")
    ap.add_argument("--out", required=True, help="source directory to write (then `semshare pack --from`)")
    a = ap.parse_args(argv)
    try:
        image, text, labels = load_cub(a.data)
        classes = np.unique(labels)
        if not np.array_equal(classes, np.arange(classes.size)):
            imp.fail(f"{a.data}:labels: class indices {classes.tolist()} are not 0..{classes.size - 1}")
        onehot = np.zeros((labels.size, classes.size), np.uint8)
        onehot[np.arange(labels.size), labels] = 1
        rows = stratified_split(labels, a.seed, where=f"{a.data}:labels")
        splits = {k: make_split(image, text, onehot, v) for k, v in rows.items()}
        names = [f"class{c}" for c in range(classes.size)]
        imp.write_source(a.out, f"cub10-{a.seed}", splits, names)
        imp.report(a.out, f"cub10-{a.seed}", splits, 0)
    except imp.ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
