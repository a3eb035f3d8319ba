#!/usr/bin/env python3
"""Import what users bring into a semshare *source directory* (then `semshare pack --from SRC`).

A source directory holds `source.json`, one safetensors file per split, `labels.txt` and, for token
texts, `vocab.txt`:

    source.json = {"format": "semshare-source", "version": 1, "name": ..., "num_object_classes": K
                   (only with image.classes), "splits": {"train": [FILE], "val": [FILE],
                   "test": [FILE], "database": [FILE] (only where the layout has a retrieval set)}}

Tensors per file (names, dtypes, shapes as the table in src/data/dataset.rs):
    image.features [N,R,Dr] f32|f16   image.boxes [N,R,5] f32 (x1/W, y1/H, x2/W, y2/H, area/(W*H))
    image.count [N] u16 (1..=R)       image.classes [N,R] u16 (optional)
    text.tokens [M,T] u32 0-padded  or  text.features [M,T,Dt] f32|f16
    text.length [M] u16 (1..=T)       text.item [M] u32 (written when M != N)
    labels [N,C] u8 0/1, >= 1 label per item
Vocabulary ids 0, 1, 2 are [PAD], [UNK], [MASK]; real tokens start at 3.

Layouts (run `import_dataset.py LAYOUT --help` for every option):

numpy   --train/--val/--test [--database] PATH, each an .npz file, a folder of KEY.npy files or
        a .mat file (v5 or v7.3, KEY = variable; e.g. Wikipedia's per-split files); the user
        names the arrays (--features, --labels, and --tokens + --vocab, --tags, or
        --text-features; optional --boxes, --count, --classes, --length, --item).
mat     DCMH-style MATLAB files, v5 (scipy.io) or v7.3 (HDF5, h5py; MATLAB stores arrays
        column-major, so every HDF5 array is transposed back): --labels FILE[:VAR] (LAll),
        --tags FILE[:VAR] (YAll, bag of tags), --features FILE[:VAR] (image features: [N,D]
        global = one region per image, or [N,R,D] regions; .npy/.npz accepted too). DCMH's IAll
        holds raw pixels [N,3,224,224]: an importer cannot turn pixels into region features, so a
        4-d array is refused with a message saying to extract features first. All items in one
        set; the DCMH split is made here: a permutation (numpy default_rng(--seed), or file
        order with --no-shuffle as DCMH's TensorFlow code), test = its first --query (2000)
        items, database = the rest, train = the first --train (10000) of the database, val =
        the next --val (1000) of the database.
scan    SCAN / bottom-up-attention precomputed: --dir DIR with {split}_ims.npy [N,36,2048] and
        {split}_caps.txt (k captions per image, k = lines / N, consecutive); captions tokenised
        (lower case, words and single punctuation marks), vocabulary from the training captions
        (count >= --min-count), unknown words -> [UNK]. SCAN has no boxes: every region gets the
        whole-image box (0, 0, 1, 1, 1). Optional {split}_LABELS.npy (--labels) and region
        classes {split}_CLASSES.npy (--classes), as in the authors' COCO files; without labels
        every item gets one shared label (instance retrieval only). Files whose images are
        repeated once per caption (M = N) are imported row by row as they are.
flickr  The IJCAI'21 authors' layout: --dir DIR with {split}_preim.npy [N,R,D],
        {split}_box.npy [N,R,4] (pixel x1, y1, x2, y2), {split}_hw.npy [N,2] image sizes
        (height, width unless --hw-order wh), {split}_label.mat and {split}_tag.mat (variable
        `feat`), optional {split}_cls.npy (class scores [N,R,K] -> argmax, or ids [N,R]), and a
        tag list (--tag-list, e.g. common_tags.txt: first field of each line).

Tag matrices ([N, K] 0/1) become token sequences: the tags of an item in column order, token id
= 3 + column; T = the most tags of an item, at most --max-tokens (longer texts are truncated and
counted). Labels are a multi-hot [N,C] matrix or class indices [N] / [N,1] (single-label sets,
--label-base 1 for MATLAB-style numbering).

Every input is validated; an error names the file, the array and the item, and exits 1.
"""

import argparse
import json
import os
import re
import sys
import zipfile
from collections import Counter

import numpy as np

RESERVED = ["[PAD]", "[UNK]", "[MASK]"]
UNK = 1
SPLITS = ["train", "val", "test", "database"]
# Rows converted at a time when streaming features (bounded memory for large memory-mapped inputs).
CHUNK_ROWS = 1024


class ImportError_(Exception):
    """A bad input: the message names the file, the array and the item."""


def fail(msg):
    raise ImportError_(msg)


# ------------------------------------------------------------------------------------------------
# Reading arrays


def is_hdf5(path):
    with open(path, "rb") as f:
        head = f.read(520)
    # MATLAB v7.3 files have a 512-byte text header before the HDF5 signature.
    return head[:8] == b"\x89HDF\r\n\x1a\n" or head[512:520] == b"\x89HDF\r\n\x1a\n"


def mat_variables(path):
    """{name: loader} of the variables of a .mat file (v5 or v7.3)."""
    if is_hdf5(path):
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            fail(f"{path}: not a readable MATLAB v7.3 (HDF5) file ({e})")
        names = [k for k in f.keys() if not k.startswith("#")]

        def read(k):
            if not isinstance(f[k], h5py.Dataset):
                fail(f"{path}:{k}: a MATLAB struct, cell or sparse matrix; save it as a full numeric array")
            # HDF5 holds MATLAB's column-major arrays with reversed dimensions: transpose back.
            return np.asarray(f[k][()]).T

        return {k: (lambda k=k: read(k)) for k in names}
    import scipy.io
    import scipy.sparse

    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        fail(f"{path}: not a readable MATLAB file ({e})")
    # MATLAB sparse matrices (e.g. some NUS-WIDE tag matrices) arrive as scipy.sparse.
    dense = lambda x: x.toarray() if scipy.sparse.issparse(x) else x  # noqa: E731
    return {k: (lambda k=k: dense(data[k])) for k in data if not k.startswith("__")}


def parse_spec(spec):
    """`FILE[:VAR]` -> (file, var or None)."""
    if os.path.exists(spec):
        return spec, None
    head, sep, var = spec.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", var):
        return head, var
    return spec, None


def load_array(spec, default_var=None):
    """Reads FILE[:VAR] from .npy, .npz or .mat; returns (array, description for errors)."""
    path, var = parse_spec(spec)
    if not os.path.isfile(path):
        fail(f"{path}: file not found")
    try:
        if path.endswith(".npy"):
            return np.load(path, mmap_mode="r", allow_pickle=False), path
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                names = list(z.keys())
                var = var or (names[0] if len(names) == 1 else default_var)
                if var not in names:
                    fail(f"{path}: no array {var!r} (arrays: {', '.join(names)})")
                return z[var], f"{path}:{var}"
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        fail(f"{path}: cannot read ({e})")
    variables = mat_variables(path)
    names = sorted(variables)
    var = var or (names[0] if len(names) == 1 else default_var)
    if var not in variables:
        fail(f"{path}: no variable {var!r} (variables: {', '.join(names)})")
    return variables[var](), f"{path}:{var}"


def array_names(path):
    """The array names of an .npz or .mat file."""
    if not os.path.isfile(path):
        fail(f"{path}: file not found")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return list(z.files)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            fail(f"{path}: cannot read ({e})")
    return list(mat_variables(path))


def read_lines(path, what):
    if not os.path.isfile(path):
        fail(f"{path}: {what} file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 (byte {e.start})")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def check_names(names, path, what):
    seen = {}
    for i, s in enumerate(names):
        if not s or s != s.strip():
            fail(f"{path}: {what} line {i + 1} ({s!r}) is empty or has surrounding spaces")
        if s in seen:
            fail(f"{path}: {what} line {i + 1} ({s!r}) repeats line {seen[s] + 1}")
        seen[s] = i
    return names


# ------------------------------------------------------------------------------------------------
# Validation and conversion of each kind of array


def as_int(a, where):
    a = np.asarray(a)
    if a.dtype.kind == "b":
        return a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[0]
            fail(f"{where}: non-finite value at index {tuple(int(x) for x in bad)}")
        if np.any(a != np.round(a)):
            bad = np.argwhere(a != np.round(a))[0]
            fail(f"{where}: non-integer value {a[tuple(bad)]} at index {tuple(int(x) for x in bad)}")
        return a.astype(np.int64)
    fail(f"{where}: dtype {a.dtype} is not numeric")


def first_bad_row(mask):
    if mask.shape[0] == 0:
        return None
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return int(rows[0]) if rows.size else None


def image_features(a, where, n=None, dtype="keep"):
    """[N,D] (global: one region) or [N,R,D] -> ([N,R,D] float array, maybe memory-mapped, and
    the stored dtype); every value is checked finite (and representable in f16 when stored so)."""
    shape = tuple(a.shape)
    if len(shape) == 4:
        fail(
            f"{where}: a 4-d array {list(shape)} looks like raw pixels (DCMH's IAll is [N,3,224,224]);"
            " an importer cannot turn pixels into region features: extract region features with a"
            " detector (e.g. bottom-up-attention, [N,36,D]) or a global CNN feature [N,D] and pass"
            " those with --features"
        )
    if len(shape) == 2:
        a = np.asarray(a)[:, None, :]
    elif len(shape) != 3:
        fail(f"{where}: shape {list(shape)}, expected [N,D] (global) or [N,R,D] (regions)")
    if n is not None and a.shape[0] != n:
        fail(f"{where}: {a.shape[0]} items, expected {n} (as the labels)")
    if a.shape[1] == 0 or a.shape[2] == 0 or a.shape[1] > 65535:
        fail(f"{where}: shape {list(a.shape)}: need 1..=65535 regions and >= 1 feature")
    if a.dtype.kind != "f":
        fail(f"{where}: dtype {a.dtype}, expected a float type")
    if dtype == "f16" or (dtype == "keep" and a.dtype == np.float16):
        target = np.dtype("<f2")
    else:
        target = np.dtype("<f4")
    for s in range(0, a.shape[0], CHUNK_ROWS):
        chunk = np.asarray(a[s : s + CHUNK_ROWS])
        with np.errstate(over="ignore", invalid="ignore"):
            conv = chunk.astype(target)
        bad = ~np.isfinite(conv)
        i = first_bad_row(bad)
        if i is not None:
            r, d = (int(x) for x in np.argwhere(bad[i])[0])
            what = "does not fit f16" if np.isfinite(chunk[i, r, d]) else "is not finite"
            fail(f"{where}: item {s + i}, region {r}, dim {d}: value {chunk[i, r, d]} {what}")
    return a, target


def labels_matrix(a, where, kind="auto", base=0, num_classes=None):
    """Multi-hot [N,C] or class indices [N] / [N,1] -> u8 [N,C]."""
    a = np.asarray(a)
    if kind == "auto":
        kind = "index" if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1) else "multihot"
    if kind == "index":
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1:
            fail(f"{where}: shape {list(a.shape)}, class indices need [N] or [N,1]")
        idx = as_int(a, where) - base
        c = num_classes if num_classes is not None else int(idx.max()) + 1 if idx.size else 0
        bad = np.flatnonzero((idx < 0) | (idx >= c))
        if bad.size:
            i = int(bad[0])
            fail(f"{where}: item {i}: class {int(idx[i]) + base} outside {base}..{base + c - 1}")
        y = np.zeros((idx.shape[0], c), np.uint8)
        y[np.arange(idx.shape[0]), idx] = 1
        return y
    if a.ndim != 2 or a.shape[1] == 0:
        fail(f"{where}: shape {list(a.shape)}, a multi-hot label matrix needs [N,C]")
    if num_classes is not None and a.shape[1] != num_classes:
        fail(f"{where}: {a.shape[1]} label columns, expected {num_classes}")
    v = as_int(a, where)
    bad = (v != 0) & (v != 1)
    i = first_bad_row(bad)
    if i is not None:
        j = int(np.flatnonzero(bad[i])[0])
        fail(f"{where}: item {i}, label {j}: value {v[i, j]}, expected 0 or 1")
    empty = np.flatnonzero(v.sum(axis=1) == 0)
    if empty.size:
        fail(f"{where}: item {int(empty[0])} has no label ({empty.size} such items)")
    return v.astype(np.uint8)


def tags_to_tokens(a, where, max_tokens):
    """Bag of tags [N,K] 0/1 -> (tokens [N,T] u32, length [N] u16, truncated texts)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] == 0:
        fail(f"{where}: shape {list(a.shape)}, a tag matrix needs [N,K]")
    v = as_int(a, where)
    bad = (v != 0) & (v != 1)
    i = first_bad_row(bad)
    if i is not None:
        j = int(np.flatnonzero(bad[i])[0])
        fail(f"{where}: item {i}, tag {j}: value {v[i, j]}, expected 0 or 1")
    counts = v.sum(axis=1)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        fail(f"{where}: item {int(empty[0])} has no tag, so no text ({empty.size} such items)")
    t = int(min(counts.max(), max_tokens)) if counts.size else 1
    tokens = np.zeros((v.shape[0], t), np.uint32)
    for i in range(v.shape[0]):
        cols = np.flatnonzero(v[i])[:t]
        tokens[i, : cols.size] = cols + len(RESERVED)
    return tokens, np.minimum(counts, t).astype(np.uint16), int((counts > t).sum())


def token_matrix(a, where, vocab_size, length=None):
    """Token ids [M,T] (0-padded) and optional (lengths, description) -> (u32 tokens, u16 lengths)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] == 0 or a.shape[1] > 65535:
        fail(f"{where}: shape {list(a.shape)}, token ids need [M,T] with 1 <= T <= 65535")
    v = as_int(a, where)
    m, t = v.shape
    if length is None:
        # Length = position after the last non-pad token.
        nz = v != 0
        length = np.where(nz.any(axis=1), t - np.argmax(nz[:, ::-1], axis=1), 0)
    else:
        length = lengths(length[0], length[1], m, t)
    for j in range(m):
        n = int(length[j])
        if not 1 <= n <= t:
            fail(f"{where}: text {j}: length {n} outside 1..={t} (an empty text?)")
        row = v[j]
        bad = np.flatnonzero((row[:n] < 0) | (row[:n] >= vocab_size) | (row[:n] == 0) | (row[:n] == 2))
        if bad.size:
            p = int(bad[0])
            fail(f"{where}: text {j}, position {p}: token {row[p]} is not [UNK] (1) or in 3..{vocab_size - 1}")
        pad = np.flatnonzero(row[n:] != 0)
        if pad.size:
            p = n + int(pad[0])
            fail(f"{where}: text {j}, position {p}: token {row[p]} after length {n}, expected 0")
    return v.astype(np.uint32), np.asarray(length).astype(np.uint16)


def lengths(a, where, m, t):
    v = as_int(a, where).reshape(-1)
    if v.shape[0] != m:
        fail(f"{where}: {v.shape[0]} lengths for {m} texts")
    bad = np.flatnonzero((v < 1) | (v > t))
    if bad.size:
        fail(f"{where}: text {int(bad[0])}: length {v[bad[0]]} outside 1..={t}")
    return v


def check_items(item, where, m, n):
    v = as_int(item, where).reshape(-1)
    if v.shape[0] != m:
        fail(f"{where}: {v.shape[0]} entries for {m} texts")
    bad = np.flatnonzero((v < 0) | (v >= n))
    if bad.size:
        fail(f"{where}: text {int(bad[0])}: image index {v[bad[0]]} outside 0..{n - 1}")
    missing = np.setdiff1d(np.arange(n), v)
    if missing.size:
        fail(f"{where}: image {int(missing[0])} has no text ({missing.size} such images)")
    return v.astype(np.uint32)


def regions_count(a, where, n, r):
    v = as_int(a, where).reshape(-1)
    if v.shape[0] != n:
        fail(f"{where}: {v.shape[0]} counts for {n} images")
    bad = np.flatnonzero((v < 1) | (v > r))
    if bad.size:
        fail(f"{where}: item {int(bad[0])}: region count {v[bad[0]]} outside 1..={r}")
    return v.astype(np.uint16)


def check_boxes(b, where, n, r):
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (n, r, 5):
        fail(f"{where}: shape {list(b.shape)}, expected {[n, r, 5]}")
    bad = ~np.isfinite(b) | (b < 0) | (b > 1)
    i = first_bad_row(bad)
    if i is not None:
        k = int(np.argwhere(bad[i])[0][0])
        fail(f"{where}: item {i}, region {k}: box {b[i, k].tolist()} has a value outside [0, 1]")
    bad = (b[..., 0] > b[..., 2]) | (b[..., 1] > b[..., 3])
    i = first_bad_row(bad)
    if i is not None:
        k = int(np.flatnonzero(bad[i])[0])
        fail(f"{where}: item {i}, region {k}: box {b[i, k].tolist()} has x1 > x2 or y1 > y2")
    return b.astype(np.float32)


def pixel_boxes(box, hw, where_box, where_hw, order, n, r):
    """Pixel (x1, y1, x2, y2) [N,R,4] and image sizes [N,2] -> normalised [N,R,5]."""
    box = np.asarray(box, dtype=np.float64)
    hw = np.asarray(hw, dtype=np.float64)
    if box.shape != (n, r, 4):
        fail(f"{where_box}: shape {list(box.shape)}, expected {[n, r, 4]} (pixel x1, y1, x2, y2)")
    if hw.shape != (n, 2):
        fail(f"{where_hw}: shape {list(hw.shape)}, expected {[n, 2]} (image height, width)")
    bad = np.flatnonzero(~np.all(np.isfinite(hw) & (hw > 0), axis=1))
    if bad.size:
        fail(f"{where_hw}: item {int(bad[0])}: image size {hw[bad[0]].tolist()} is not positive")
    h, w = (hw[:, 0], hw[:, 1]) if order == "hw" else (hw[:, 1], hw[:, 0])
    h, w = h[:, None], w[:, None]
    x1, y1, x2, y2 = (box[..., k] for k in range(4))
    out = np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) * (y2 - y1) / (w * h)], axis=-1)
    # Detectors round box corners; half a pixel beyond the border is clipped, more is an error.
    slack = 0.5 / np.minimum(h, w)[..., None]
    bad = ~np.isfinite(out) | (out < -slack) | (out > 1 + slack)
    i = first_bad_row(bad)
    if i is not None:
        k = int(np.argwhere(bad[i])[0][0])
        fail(
            f"{where_box}: item {i}, region {k}: box {box[i, k].tolist()} lies outside the image "
            f"({'height, width' if order == 'hw' else 'width, height'} {hw[i].tolist()} in {where_hw};"
            f" wrong --hw-order?)"
        )
    return check_boxes(np.clip(out, 0, 1), where_box, n, r)


def region_classes(a, where, n, r):
    """Class scores [N,R,K] (argmax) or class ids [N,R] -> (u16 [N,R], K or None)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[:2] == (n, r):
        if a.shape[2] == 0 or a.shape[2] > 65536:
            fail(f"{where}: {a.shape[2]} classes outside 1..=65536")
        return np.argmax(a, axis=2).astype(np.uint16), int(a.shape[2])
    if a.shape != (n, r):
        fail(f"{where}: shape {list(a.shape)}, expected {[n, r]} (class ids) or {[n, r]}+[K] (scores)")
    v = as_int(a, where)
    bad = np.flatnonzero(((v < 0) | (v > 65535)).any(axis=1))
    if bad.size:
        fail(f"{where}: item {int(bad[0])}: class id outside 0..65535")
    return v.astype(np.uint16), None


# ------------------------------------------------------------------------------------------------
# One split's tensors, and the writer


class Split:
    """The tensors of one split. `features` may be a memory-mapped array: it is streamed."""

    def __init__(self, features, feature_dtype, labels, length, boxes=None, count=None, classes=None,
                 tokens=None, text_features=None, text_feature_dtype=None, item=None):
        n, r, _ = features.shape
        m = length.shape[0]
        self.features, self.feature_dtype = features, feature_dtype
        self.boxes = boxes if boxes is not None else whole_image_boxes(n, r)
        self.count = count if count is not None else np.full(n, r, np.uint16)
        self.classes, self.labels = classes, labels
        self.tokens, self.text_features, self.text_feature_dtype = tokens, text_features, text_feature_dtype
        self.length = length
        self.item = item if item is not None else np.arange(m, dtype=np.uint32)
        if item is None and m != n:
            raise AssertionError("text.item needed when texts != images")

    @property
    def n(self):
        return self.features.shape[0]

    def take(self, rows):
        """The images `rows` (in that order) with their texts, grouped by new image."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(self.item, kind="stable")
        starts = np.searchsorted(self.item[order], np.arange(self.n + 1))
        texts = np.concatenate([order[starts[i] : starts[i + 1]] for i in rows]) if rows.size else np.zeros(0, np.int64)
        new_item = np.concatenate(
            [np.full(starts[i + 1] - starts[i], k, np.uint32) for k, i in enumerate(rows)]
        ) if rows.size else np.zeros(0, np.uint32)
        return Split(
            np.asarray(self.features[rows]),
            self.feature_dtype,
            self.labels[rows],
            self.length[texts],
            boxes=self.boxes[rows],
            count=self.count[rows],
            classes=None if self.classes is None else self.classes[rows],
            tokens=None if self.tokens is None else self.tokens[texts],
            text_features=None if self.text_features is None else np.asarray(self.text_features[texts]),
            text_feature_dtype=self.text_feature_dtype,
            item=new_item,
        )


def whole_image_boxes(n, r):
    b = np.zeros((n, r, 5), np.float32)
    b[..., 2:] = 1.0
    return b


ST_DTYPES = {"<f4": "F32", "<f2": "F16", "|u1": "U8", "<u2": "U16", "<u4": "U32"}


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, array, little-endian dtype); arrays are streamed in row chunks."""
    header, offset = {"__metadata__": metadata}, 0
    for name, arr, dt in tensors:
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": ST_DTYPES[dt.str], "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # 8-byte aligned data, as safetensors writers do
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(h).to_bytes(8, "little"))
            f.write(h)
            for _, arr, dt in tensors:
                for s in range(0, arr.shape[0], CHUNK_ROWS):
                    f.write(np.ascontiguousarray(arr[s : s + CHUNK_ROWS], dtype=dt).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, lines):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(s + "\n" for s in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_source(out, name, splits, label_names, vocab=None, num_object_classes=None):
    """Writes the source directory: split files first, source.json last (temp + rename)."""
    os.makedirs(out, exist_ok=True)
    manifest = os.path.join(out, "source.json")
    if os.path.exists(manifest):
        os.remove(manifest)  # never leave an old manifest beside half-replaced files
    c = len(label_names)
    if all(s.tokens is not None for s in splits.values()):
        # Tag texts of different splits may have different T: pad to the longest.
        t = max(s.tokens.shape[1] for s in splits.values())
        for s in splits.values():
            s.tokens = np.pad(s.tokens, ((0, 0), (0, t - s.tokens.shape[1])))
    shapes = {}
    for split_name, s in splits.items():
        text = s.tokens.shape[1:] if s.tokens is not None else s.text_features.shape[1:]
        shape = (s.features.shape[1:], s.tokens is not None, text)
        first = next(iter(shapes.items()), None)
        if first and first[1] != shape:
            fail(f"split {split_name}: regions/features {list(shape[0])}, text {list(text)} differ from split"
                 f" {first[0]}: {list(first[1][0])}, {list(first[1][2])}")
        shapes[split_name] = shape
    files = {}
    for split_name in SPLITS:
        s = splits.get(split_name)
        if s is None:
            continue
        if s.labels.shape[1] != c:
            raise AssertionError(f"{split_name}: {s.labels.shape[1]} label columns, {c} names")
        if s.classes is not None and num_object_classes is not None and s.n:
            bad = np.argwhere(s.classes >= num_object_classes)
            if bad.size:
                i, r = (int(x) for x in bad[0])
                fail(f"{split_name} split, item {i}, region {r}: class {s.classes[i, r]} >= --num-object-classes"
                     f" {num_object_classes}")
        tensors = [
            ("image.features", s.features, s.feature_dtype),
            ("image.boxes", s.boxes, np.dtype("<f4")),
            ("image.count", s.count, np.dtype("<u2")),
        ]
        if s.classes is not None:
            tensors.append(("image.classes", s.classes, np.dtype("<u2")))
        if s.tokens is not None:
            tensors.append(("text.tokens", s.tokens, np.dtype("<u4")))
        else:
            tensors.append(("text.features", s.text_features, s.text_feature_dtype))
        tensors.append(("text.length", s.length, np.dtype("<u2")))
        if s.length.shape[0] != s.n or not np.array_equal(s.item, np.arange(s.n)):
            tensors.append(("text.item", s.item, np.dtype("<u4")))
        tensors.append(("labels", s.labels, np.dtype("|u1")))
        fname = f"{split_name}.safetensors"
        write_safetensors(os.path.join(out, fname), tensors, {"format": "semshare-source", "split": split_name})
        files[split_name] = [fname]
    write_text(os.path.join(out, "labels.txt"), label_names)
    if vocab is not None:
        write_text(os.path.join(out, "vocab.txt"), vocab)
    doc = {"format": "semshare-source", "version": 1, "name": name}
    if num_object_classes is not None:
        doc["num_object_classes"] = int(num_object_classes)
    doc["splits"] = files
    tmp = f"{manifest}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest)


# ------------------------------------------------------------------------------------------------
# Shared options


def label_names_for(path, c):
    if path is None:
        return [f"label{j}" for j in range(c)]
    names = check_names(read_lines(path, "label names"), path, "label name")
    if len(names) != c:
        fail(f"{path}: {len(names)} label names for {c} label columns")
    return names


def tag_vocab(path, k):
    """Vocabulary for a tag matrix of K columns: reserved ids, then one token per tag column."""
    if path is None:
        return RESERVED + [f"tag{j}" for j in range(k)]
    # common_tags.txt style: `tag count` per line; the first field is the tag.
    tags = [line.split()[0] if line.split() else "" for line in read_lines(path, "tag list")]
    check_names(tags, path, "tag")
    if len(tags) != k:
        fail(f"{path}: {len(tags)} tags for a tag matrix of {k} columns")
    clash = set(tags) & set(RESERVED)
    if clash:
        fail(f"{path}: tag {sorted(clash)[0]!r} collides with a reserved token")
    return RESERVED + tags


def dcmh_split(n, query, train, val, seed, shuffle):
    """DCMH convention: query = first `query` of a permutation, database = the rest, train = the
    first `train` of the database, val = the next `val` of the database (disjoint from train)."""
    if query < 1 or train < 1 or val < 0 or query + train + val > n:
        fail(f"split sizes query {query} + train {train} + val {val} do not fit {n} items")
    perm = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    database = perm[query:]
    return {"test": perm[:query], "database": database, "train": database[:train], "val": database[train : train + val]}


def report(out, name, splits, truncated):
    sizes = ", ".join(f"{k} {splits[k].n} images / {splits[k].length.shape[0]} texts" for k in SPLITS if k in splits)
    print(f"wrote source directory {out} ({name}): {sizes}")
    if truncated:
        print(f"note: {truncated} texts were longer than --max-tokens and were truncated")


# ------------------------------------------------------------------------------------------------
# Layouts


def cmd_numpy(a):
    vocab = None
    if sum(x is not None for x in (a.tokens, a.tags, a.text_features)) != 1:
        fail("give exactly one of --tokens (with --vocab), --tags, --text-features")
    if a.tokens is not None:
        if a.vocab is None:
            fail("--tokens needs --vocab")
        vocab = check_names(read_lines(a.vocab, "vocabulary"), a.vocab, "vocabulary entry")
        if vocab[:3] != RESERVED:
            fail(f"{a.vocab}: the first three tokens must be {RESERVED}, found {vocab[:3]}")
    splits, truncated, names, k_obj = {}, 0, None, a.num_object_classes
    for split_name in SPLITS:
        path = getattr(a, split_name)
        if path is None:
            continue

        def get(key, required=True):
            if key is None:
                return None, None
            if os.path.isdir(path):
                f = os.path.join(path, key + ".npy")
                if not os.path.isfile(f):
                    if required:
                        fail(f"{path}: no {key}.npy")
                    return None, None
                return load_array(f)
            if not required and key not in array_names(path):
                return None, None
            return load_array(f"{path}:{key}")

        feats, where = get(a.features)
        y, ywhere = get(a.labels)
        y = labels_matrix(y, ywhere, a.label_kind, a.label_base, a.num_classes or (len(names) if names else None))
        if names is None:
            names = label_names_for(a.label_names, y.shape[1])
        n = y.shape[0]
        feats, fdt = image_features(feats, where, n, a.features_dtype)
        r = feats.shape[1]
        boxes = check_boxes(*get(a.boxes), n, r) if a.boxes else None
        count = regions_count(*get(a.count), n, r) if a.count else None
        classes = None
        if a.classes:
            classes, k = region_classes(*get(a.classes), n, r)
            k_obj = k_obj or k
        tokens = tf = tdt = None
        if a.tokens is not None:
            arr, w = get(a.tokens)
            tokens, length = token_matrix(arr, w, len(vocab), get(a.length) if a.length else None)
        elif a.tags is not None:
            arr, w = get(a.tags)
            if vocab is None:
                vocab = tag_vocab(a.tag_list, np.asarray(arr).shape[1] if np.ndim(arr) == 2 else 0)
            elif len(vocab) != 3 + np.asarray(arr).shape[1]:
                fail(f"{w}: {np.asarray(arr).shape[1]} tag columns, other splits have {len(vocab) - 3}")
            tokens, length, cut = tags_to_tokens(arr, w, a.max_tokens)
            truncated += cut
        else:
            arr, w = get(a.text_features)
            if np.ndim(arr) == 2:
                arr = np.asarray(arr)[:, None, :]  # global text: one segment
            tf, tdt = image_features(arr, w, None, a.features_dtype)
            m, t = tf.shape[:2]
            length = lengths(*get(a.length), m, t).astype(np.uint16) if a.length else np.full(m, t, np.uint16)
        m = length.shape[0]
        item = None
        arr, w = get(a.item, required=False)
        if arr is not None:
            item = check_items(arr, w, m, n)
        elif m != n:
            fail(f"{path}: {m} texts for {n} images: name the text -> image array with --item")
        splits[split_name] = Split(feats, fdt, y, length, boxes, count, classes, tokens, tf, tdt, item)
    for need in ("train", "val", "test"):
        if need not in splits:
            fail(f"--{need} is required")
    if k_obj is None and any(s.classes is not None for s in splits.values()):
        k_obj = 1 + max(int(s.classes.max()) for s in splits.values() if s.classes is not None and s.n)
    write_source(a.out, a.name, splits, names, vocab, k_obj)
    report(a.out, a.name, splits, truncated)


def cmd_mat(a):
    y, ywhere = load_array(a.labels, "LAll")
    y = labels_matrix(y, ywhere, a.label_kind, a.label_base, a.num_classes)
    n = y.shape[0]
    names = label_names_for(a.label_names, y.shape[1])
    tags, twhere = load_array(a.tags, "YAll")
    if np.ndim(tags) != 2 or np.shape(tags)[0] != n:
        fail(f"{twhere}: shape {list(np.shape(tags))}, expected [{n}, K] (one bag of tags per labelled item)")
    vocab = tag_vocab(a.tag_list, np.shape(tags)[1])
    tokens, length, truncated = tags_to_tokens(tags, twhere, a.max_tokens)
    feats, fwhere = load_array(a.features, "IAll")
    feats, fdt = image_features(feats, fwhere, n, a.features_dtype)
    whole = Split(feats, fdt, y, length, tokens=tokens)
    rows = dcmh_split(n, a.query, a.train, a.val, a.seed, not a.no_shuffle)
    splits = {k: whole.take(v) for k, v in rows.items()}
    write_source(a.out, a.name, splits, names, vocab)
    report(a.out, a.name, splits, truncated)


TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(line):
    return TOKEN_RE.findall(line.lower())


def cmd_scan(a):
    mapping = parse_split_map(a.splits)
    caps, ims = {}, {}
    for ours, theirs in mapping.items():
        cap_path = os.path.join(a.dir, f"{theirs}_caps.txt")
        lines = read_lines(cap_path, "caption")
        caps[ours] = [tokenize(line) for line in lines]
        for i, toks in enumerate(caps[ours]):
            if not toks:
                fail(f"{cap_path}: line {i + 1} has no words")
        ims[ours] = load_array(os.path.join(a.dir, f"{theirs}_ims.npy"))
    counts = Counter(t for toks in caps["train"] for t in toks)
    words = sorted((w for w, k in counts.items() if k >= a.min_count), key=lambda w: (-counts[w], w))
    vocab = RESERVED + [w for w in words if w not in RESERVED]
    ids = {w: i for i, w in enumerate(vocab)}
    t = min(a.max_tokens, max(len(toks) for c in caps.values() for toks in c))
    y_all = None
    if a.labels:
        y_all = {}
        for ours, theirs in mapping.items():
            arr, w = load_array(os.path.join(a.dir, f"{theirs}_{a.labels}.npy"))
            y_all[ours] = labels_matrix(arr, w, a.label_kind, a.label_base, a.num_classes)
    splits, truncated, names, k_obj = {}, 0, None, a.num_object_classes
    for ours in mapping:
        feats, where = ims[ours]
        n = feats.shape[0]
        m = len(caps[ours])
        if n == 0 or m % n:
            fail(f"{mapping[ours]}_caps.txt: {m} captions for {n} images in {where} (need k per image)")
        feats, fdt = image_features(feats, where, n, a.features_dtype)
        tokens = np.zeros((m, t), np.uint32)
        length = np.zeros(m, np.uint16)
        for j, toks in enumerate(caps[ours]):
            truncated += len(toks) > t
            toks = toks[:t]
            tokens[j, : len(toks)] = [ids.get(w, UNK) for w in toks]
            length[j] = len(toks)
        if y_all is not None:
            y = y_all[ours]
            if y.shape[0] != n:
                fail(f"{mapping[ours]}_{a.labels}.npy: {y.shape[0]} label rows for {n} images")
        else:
            # No labels: one label shared by all items (instance retrieval, R@K, only).
            y = np.ones((n, 1), np.uint8)
            if ours == "train":
                print("warning: no --labels: every item gets the single label `label0`", file=sys.stderr)
        names = names or label_names_for(a.label_names, y.shape[1])
        k = m // n
        item = np.repeat(np.arange(n, dtype=np.uint32), k)  # SCAN: captions k*i .. k*i+k-1 are image i's
        classes = None
        cls_path = os.path.join(a.dir, f"{mapping[ours]}_{a.classes}.npy") if a.classes else None
        if cls_path and os.path.exists(cls_path):
            classes, kc = region_classes(*load_array(cls_path), n, feats.shape[1])
            k_obj = k_obj or kc
        splits[ours] = Split(feats, fdt, y, length, classes=classes, tokens=tokens, item=item)
    if k_obj is None and any(s.classes is not None for s in splits.values()):
        k_obj = 1 + max(int(s.classes.max()) for s in splits.values() if s.classes is not None and s.n)
    write_source(a.out, a.name, splits, names, vocab, k_obj)
    report(a.out, a.name, splits, truncated)


def parse_split_map(spec):
    out = {}
    for part in spec.split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or ours not in SPLITS or not theirs:
            fail(f"--splits: {part!r} is not OURS=THEIRS with OURS in {SPLITS}")
        out[ours] = theirs
    for need in ("train", "val", "test"):
        if need not in out:
            fail(f"--splits: no {need} split")
    return out


def cmd_flickr(a):
    mapping = parse_split_map(a.splits)
    tags_k, splits, truncated, names, vocab, k_obj = None, {}, 0, None, None, a.num_object_classes
    for ours, theirs in mapping.items():
        f = lambda suffix: os.path.join(a.dir, f"{theirs}_{suffix}")  # noqa: E731
        y, ywhere = load_array(f("label.mat"), "feat")
        y = labels_matrix(y, ywhere, a.label_kind, a.label_base, a.num_classes)
        n = y.shape[0]
        names = names or label_names_for(a.label_names, y.shape[1])
        if y.shape[1] != len(names):
            fail(f"{ywhere}: {y.shape[1]} label columns, other splits have {len(names)}")
        feats, fwhere = load_array(f("preim.npy"))
        feats, fdt = image_features(feats, fwhere, n, a.features_dtype)
        r = feats.shape[1]
        box, bwhere = load_array(f("box.npy"))
        hw, hwhere = load_array(f("hw.npy"))
        boxes = pixel_boxes(box, hw, bwhere, hwhere, a.hw_order, n, r)
        classes = None
        if os.path.exists(f("cls.npy")):
            classes, k = region_classes(*load_array(f("cls.npy")), n, r)
            if k is not None and k_obj is not None and k != k_obj:
                fail(f"{f('cls.npy')}: {k} class scores, expected {k_obj}")
            k_obj = k_obj or k
        tags, twhere = load_array(f("tag.mat"), "feat")
        if np.ndim(tags) != 2 or np.shape(tags)[0] != n:
            fail(f"{twhere}: shape {list(np.shape(tags))}, expected [{n}, K] (one bag of tags per item)")
        if tags_k is None:
            tags_k = np.shape(tags)[1]
            vocab = tag_vocab(a.tag_list, tags_k)
        elif np.shape(tags)[1] != tags_k:
            fail(f"{twhere}: {np.shape(tags)[1]} tag columns, other splits have {tags_k}")
        tokens, length, cut = tags_to_tokens(tags, twhere, a.max_tokens)
        truncated += cut
        splits[ours] = Split(feats, fdt, y, length, boxes=boxes, classes=classes, tokens=tokens)
    if k_obj is None and any(s.classes is not None for s in splits.values()):
        k_obj = 1 + max(int(s.classes.max()) for s in splits.values() if s.classes is not None and s.n)
    write_source(a.out, a.name, splits, names, vocab, k_obj)
    report(a.out, a.name, splits, truncated)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the mappings.")
    sub = p.add_subparsers(dest="layout", required=True)

    def common(q, labels=True):
        q.add_argument("--out", required=True, help="source directory to write")
        q.add_argument("--name", default=None, help="dataset name (default: the --out folder name)")
        q.add_argument("--features-dtype", choices=["keep", "f32", "f16"], default="keep",
                       help="stored feature dtype (keep: f16 stays f16, everything else becomes f32)")
        q.add_argument("--max-tokens", type=int, default=64, help="T at most; longer texts are truncated and counted")
        if labels:
            q.add_argument("--label-names", help="file with one label name per line (default label0, label1, ...)")
            q.add_argument("--label-kind", choices=["auto", "multihot", "index"], default="auto",
                           help="auto: [N] or [N,1] = class indices, [N,C] = multi-hot")
            q.add_argument("--label-base", type=int, default=0, help="first class index (1 for MATLAB numbering)")
            q.add_argument("--num-classes", type=int, help="C for class indices (default max index + 1)")
        q.add_argument("--num-object-classes", type=int, help="K_obj (default: from the class scores or max id + 1)")

    q = sub.add_parser("numpy", help="generic .npy/.npz arrays named by the user")
    common(q)
    for s in SPLITS:
        q.add_argument(f"--{s}", help=f"{s} split: an .npz file, a folder of KEY.npy files, or a .mat file")
    q.add_argument("--features", required=True, help="image features [N,R,Dr] or global [N,D]")
    q.add_argument("--labels", required=True, help="labels: multi-hot [N,C] or class indices [N]")
    q.add_argument("--boxes", help="normalised boxes [N,R,5] (default: the whole image for every region)")
    q.add_argument("--count", help="valid regions per image [N] (default: all R)")
    q.add_argument("--classes", help="region object classes [N,R] or class scores [N,R,K]")
    q.add_argument("--tokens", help="token ids [M,T], 0-padded, ids of --vocab")
    q.add_argument("--vocab", help="vocabulary for --tokens, one token per line, [PAD] [UNK] [MASK] first")
    q.add_argument("--tags", help="bag-of-tags matrix [N,K] 0/1")
    q.add_argument("--tag-list", help="names of the --tags columns (default tag0, tag1, ...)")
    q.add_argument("--text-features", help="text segment features [M,T,Dt] or global [M,Dt]")
    q.add_argument("--length", help="text lengths [M] (default: up to the last non-zero token, or T)")
    q.add_argument("--item", help="image index of each text [M] (needed when M != N)")

    q = sub.add_parser("mat", help="DCMH-style MATLAB files (LAll, YAll, image features)")
    common(q)
    q.add_argument("--labels", required=True, help="FILE[:VAR] with the label matrix (default VAR LAll)")
    q.add_argument("--tags", required=True, help="FILE[:VAR] with the bag-of-tags matrix (default VAR YAll)")
    q.add_argument("--features", required=True, help="FILE[:VAR] image features [N,D] or [N,R,D] (default VAR IAll)")
    q.add_argument("--tag-list", help="tag names, one per line (first field), in column order")
    q.add_argument("--query", type=int, default=2000, help="test queries (DCMH: 2000)")
    q.add_argument("--train", type=int, default=10000, help="training items, the first of the database (DCMH: 10000)")
    q.add_argument("--val", type=int, default=1000, help="validation items, from the database after train")
    q.add_argument("--seed", type=int, default=0, help="permutation seed (numpy default_rng)")
    q.add_argument("--no-shuffle", action="store_true", help="rows in file order (DCMH TensorFlow split)")

    q = sub.add_parser("scan", help="SCAN precomputed {split}_ims.npy + {split}_caps.txt")
    common(q)
    q.add_argument("--dir", required=True)
    q.add_argument("--splits", default="train=train,val=dev,test=test", help="OURS=THEIRS,... file prefixes")
    q.add_argument("--min-count", type=int, default=4, help="vocabulary: training words seen this often (SCAN: 4)")
    q.add_argument("--labels", help="optional labels in {split}_LABELS.npy (e.g. `label`); default one label")
    q.add_argument("--classes", help="optional region classes in {split}_CLASSES.npy where present (e.g. `cls`):"
                   " scores [N,R,K] (argmax) or ids [N,R]")

    q = sub.add_parser("flickr", help="the IJCAI'21 authors' FLICKR layout")
    common(q)
    q.add_argument("--dir", required=True)
    q.add_argument("--tag-list", required=True, help="tag list in tag.mat column order (e.g. common_tags.txt)")
    q.add_argument("--splits", default="train=train,val=dev,test=test", help="OURS=THEIRS,... file prefixes")
    q.add_argument("--hw-order", choices=["hw", "wh"], default="hw", help="column order of {split}_hw.npy")

    a = p.parse_args(argv)
    if a.name is None:
        a.name = os.path.basename(os.path.normpath(a.out))
    if a.max_tokens < 1 or a.max_tokens > 65535:
        p.error("--max-tokens must be in 1..=65535")
    try:
        {"numpy": cmd_numpy, "mat": cmd_mat, "scan": cmd_scan, "flickr": cmd_flickr}[a.layout](a)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output side: --out not writable, disk full, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
