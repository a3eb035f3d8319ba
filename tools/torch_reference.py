#!/usr/bin/env python3
"""Independent PyTorch reference of the semshare model (DESIGN.md §1).

Written from the equations, the PyTorch way (padded batches, key-padding masks,
torch.nn.GRU with pack_padded_sequence, autograd), sharing no code with the Rust crate.
Parameter names are exactly the Rust names, so a semshare checkpoint loads with

    model = SemShare(ModelConfig.from_checkpoint(path))
    load_checkpoint(model, path)       # = load_state_dict(load_file(path)) minus optimizer.*

Subcommands
-----------
fixture --out FILE --seed S [--tiny-json JSON]
    Tiny model, random parameters and inputs, forward + backward in float64 (from f32-rounded
    parameters and inputs), written as ONE safetensors file (format below) that
    tests/torch_parity.rs replays through the Rust model.
check --file FILE
    Reload a fixture, load its parameters into this reference and recompute every expected
    value (self-consistency of the file and of `load_state_dict` by Rust names).
bench-cpu [--mixed] [--bf16] [--attn explicit|sdpa] [--runs N] [--threads N]
    The CPU anchor of ANCHORS.md: `small` preset, 32 images + 32 texts, V 2000, C 24,
    K_obj 100, mask prob 0.15, fp32 eager, AdamW step included. Prints one JSON line per
    measurement (median ms over --runs after warm-up).
bench-gpu [--device cuda|cpu] [--tiny] [--modes fp32,tf32,bf16] [--compile] [--attn sdpa|explicit]
          [--runs N] [--warmup N] [--no-model] [--no-ops]
    The GPU anchors of ANCHORS.md: `paper` preset, 128 images (36 regions) + 128 texts (T 32),
    V 10000, C 24, K_obj 1600, mask prob 0.15. Per mode: a training step (both modalities,
    forward + backward + fused AdamW) and embedding 128 + 128 items; then the single ops at the
    same shapes (SDPA (128, 8, 36, 128), LayerNorm 4608x1024, cuDNN Bi-GRU B 128 T 32 300->512,
    BCE 128x24, masked-token CE 614x10000, cosine ranking 5000x5000 + top-100) in fp32 and bf16,
    and the device copy bandwidth. Median (and min) of --runs timed with CUDA events after
    --warmup; inputs of single ops rotate over several copies so repeats do not just hit L2.
    One JSON line per measurement ("measure", "mode", "median_ms", ...; tools/gpu-run.sh
    tabulates them). `--device cpu --tiny` is a smoke run of the same code.

Fixture format (safetensors, little-endian)
-------------------------------------------
metadata:  "format" = "semshare-torch-parity-v1", "model" = ModelConfig JSON (Rust field names),
           "seed", "torch" (version).
integers:  ALL integer tensors are I32 (torch.int32).
parameters: every Rust parameter under its own name, F32, Rust shape.
inputs:
  input.image.features   [regions, Dr] F32   packed (item b owns rows offsets[b]..offsets[b+1])
  input.image.boxes      [regions, 5]  F32
  input.image.lengths    [items]       I32
  input.image.classes    [regions]     I32   detector class per region (image context target)
  input.image.mask_rows  [m]           I32   packed row indices, ascending
  input.image.labels     [items, C]    F32   0/1
  input.text.tokens      [tokens]      I32   original (unmasked) ids in [3, V)
  input.text.lengths     [items]       I32
  input.text.mask_rows   [m]           I32   packed row indices, ascending
  input.text.labels      [items, C]    F32
  (the MaskPlan targets are classes[mask_rows] / tokens[mask_rows])
expected (computed in float64, stored F32):
  expect.image.label_loss, expect.image.context_loss, expect.text.label_loss,
  expect.text.context_loss                      [1]
  expect.image.pooled, expect.text.pooled       [items, d]   (no masking)
  expect.image.label_embedding, expect.text.label_embedding  [items, C] (no masking)
  expect.grad.<param>   gradient of  image(L1 + λ·L2) + text(L1 + λ·L2)  (λ = model.lambda)
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MASK_TOKEN = 2
LN_EPS = 1e-5
CONFIG_FIELDS = [
    "region_dim", "max_regions", "word_dim", "gru_hidden", "dim", "layers", "heads", "ffn",
    "max_tokens", "vocab", "labels", "object_classes", "dropout", "mask_prob", "lambda",
]


# ------------------------------------------------------------------------------------------
# configuration


def small_config():
    return dict(region_dim=256, max_regions=36, word_dim=64, gru_hidden=128, dim=256, layers=2,
                heads=4, ffn=512, max_tokens=24, vocab=2000, labels=24, object_classes=100,
                dropout=0.1, mask_prob=0.15, **{"lambda": 0.01})


def tiny_config():
    return dict(region_dim=7, max_regions=6, word_dim=6, gru_hidden=5, dim=8, layers=2, heads=2,
                ffn=16, max_tokens=7, vocab=23, labels=4, object_classes=5, dropout=0.0,
                mask_prob=0.15, **{"lambda": 0.5})


def check_config(cfg):
    if sorted(cfg) != sorted(CONFIG_FIELDS):
        raise ValueError(f"model config fields {sorted(cfg)} != {sorted(CONFIG_FIELDS)}")
    if cfg["dim"] % cfg["heads"]:
        raise ValueError("dim must be divisible by heads")


def config_from_safetensors(path):
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta["model"])
    check_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------
# the model


def gelu(x):
    return F.gelu(x, approximate="tanh")


def position_encoding(steps, dim, dtype):
    """PE(t)_{2i} = sin(t / 10000^{2i/d}), PE(t)_{2i+1} = cos(t / 10000^{2i/d}); [steps, dim].

    Computed in float64 and rounded to f32 (it is an input of the model, like the features)."""
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)
    freq = torch.pow(10000.0, -(2.0 * torch.div(i, 2, rounding_mode="floor")) / dim)
    a = t * freq[None, :]
    pe = torch.where((torch.arange(dim) % 2 == 0)[None, :], torch.sin(a), torch.cos(a))
    return pe.float().to(dtype)


class SegmentEmbed(nn.Module):
    """Eq. 3: e_t = GELU(LayerNorm(psi1(x_t) + psi2(l_t)))."""

    def __init__(self, content, location, dim):
        super().__init__()
        self.psi1 = nn.Linear(content, dim)
        self.psi2 = nn.Linear(location, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def embed(self, x, loc):
        return gelu(self.norm(self.psi1(x) + self.psi2(loc)))


class ImageEncoder(SegmentEmbed):
    def __init__(self, cfg):
        super().__init__(cfg["region_dim"], 5, cfg["dim"])
        self.mask_feature = nn.Parameter(torch.zeros(cfg["region_dim"]))
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, features, boxes, masked):
        """features [B, R, Dr], boxes [B, R, 5], masked [B, R] bool → e [B, R, d]."""
        x = torch.where(masked[..., None], self.mask_feature.expand_as(features), features)
        return self.drop(self.embed(x, boxes))


class TextEncoder(SegmentEmbed):
    def __init__(self, cfg):
        super().__init__(2 * cfg["gru_hidden"], cfg["dim"], cfg["dim"])
        self.embedding = nn.Embedding(cfg["vocab"], cfg["word_dim"])
        self.gru = nn.GRU(cfg["word_dim"], cfg["gru_hidden"], num_layers=1, batch_first=True,
                          bidirectional=True)
        self.drop = nn.Dropout(cfg["dropout"])
        self.dim = cfg["dim"]

    def forward(self, tokens, lengths, masked):
        """tokens [B, T] long (padding arbitrary), lengths [B] long (cpu), masked [B, T] bool."""
        B, T = tokens.shape
        ids = torch.where(masked, torch.full_like(tokens, MASK_TOKEN), tokens)
        words = self.embedding(ids)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        pos = position_encoding(T, self.dim, states.dtype).to(states.device)
        return self.drop(self.embed(states, pos.expand(B, T, self.dim)))


class Attention(nn.Module):
    def __init__(self, dim, heads, sdpa=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.heads = heads
        self.sdpa = sdpa

    def forward(self, x, valid):
        """x [B, T, d], valid [B, T] bool (key padding mask: False = padding)."""
        B, T, d = x.shape
        h, dh = self.heads, d // self.heads
        # qkv columns: (q | k | v), head j owns columns j·dh..(j+1)·dh of each part.
        q, k, v = self.qkv(x).view(B, T, 3, h, dh).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
            ctx = torch.softmax(s, dim=-1) @ v
        return self.out(ctx.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    def __init__(self, dim, ffn, p):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.fc2(self.drop(gelu(self.fc1(x))))


class Block(nn.Module):
    """Post-LN: x1 = LN1(x + Drop(MHA(x))); y = LN2(x1 + Drop(FFN(x1)))."""

    def __init__(self, cfg, sdpa=False):
        super().__init__()
        d = cfg["dim"]
        self.attn = Attention(d, cfg["heads"], sdpa)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.ffn = FeedForward(d, cfg["ffn"], cfg["dropout"])
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, x, valid):
        x1 = self.norm1(x + self.drop(self.attn(x, valid)))
        return self.norm2(x1 + self.drop(self.ffn(x1)))


class Shared(nn.Module):
    def __init__(self, cfg, sdpa=False):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, sdpa) for _ in range(cfg["layers"]))

    def forward(self, x, valid):
        for blk in self.layers:
            x = blk(x, valid)
        return x


class Heads(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.object = nn.Linear(cfg["dim"], cfg["object_classes"])
        self.word = nn.Linear(cfg["dim"], cfg["vocab"])


def masked_mean(x, valid):
    """x [B, T, k], valid [B, T] bool → [B, k] mean over each item's valid rows."""
    w = valid.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1)


def l2norm(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


class SemShare(nn.Module):
    def __init__(self, cfg, sdpa=False):
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.shared = Shared(cfg, sdpa)
        self.classifier = nn.Linear(cfg["dim"], cfg["labels"])
        self.heads = Heads(cfg)

    # ---- encoders (padded batches) ----------------------------------------------------
    def encode_image(self, b, masked=None):
        valid = b["valid"]
        if masked is None:
            masked = torch.zeros_like(valid)
        e = self.image(b["features"], b["boxes"], masked)
        return self.shared(e, valid), valid

    def encode_text(self, b, masked=None):
        valid = b["valid"]
        if masked is None:
            masked = torch.zeros_like(valid)
        e = self.text(b["tokens"], b["lengths"], masked)
        return self.shared(e, valid), valid

    def encode(self, kind, b, masked=None):
        return self.encode_image(b, masked) if kind == "image" else self.encode_text(b, masked)

    # ---- objectives ---------------------------------------------------------------------
    def losses(self, kind, b, masked):
        """(L1, L2) of one modality. L1: mean BCE-with-logits over [items, C] of g(z);
        L2: mean CE over the masked rows (heads.object for images, heads.word for texts)."""
        h, valid = self.encode(kind, b, masked)
        z = masked_mean(h, valid)
        l1 = F.binary_cross_entropy_with_logits(self.classifier(z), b["labels"])
        head = self.heads.object if kind == "image" else self.heads.word
        targets = b["classes"] if kind == "image" else b["tokens"]
        if masked.any():
            l2 = F.cross_entropy(head(h[masked]), targets[masked])
        else:
            l2 = h.new_zeros(())
        return l1, l2

    def embed(self, kind, b, which="pooled"):
        h, valid = self.encode(kind, b)
        if which == "pooled":
            return masked_mean(h, valid)
        # √softplus(g): `Backend::label_coordinates` (src/backend/mod.rs) says why not the paper's σ(g).
        s = l2norm(torch.sqrt(F.softplus(self.classifier(h))))
        return l2norm(masked_mean(s, valid))


def load_checkpoint(model, path):
    """Load a semshare checkpoint (or fixture): every tensor named like a parameter; the
    optimizer moments and fixture inputs/expectations are ignored."""
    from safetensors.torch import load_file
    st = load_file(path)
    sd = {k: v for k, v in st.items() if not k.startswith(("optimizer.", "input.", "expect."))}
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, strict=True)
    return st


# ------------------------------------------------------------------------------------------
# packed <-> padded


def offsets_of(lengths):
    off = [0]
    for l in lengths:
        off.append(off[-1] + int(l))
    return off


def pad(packed, lengths, total=None, fill=0):
    """[tokens, ...] → [items, T, ...]."""
    lengths = [int(l) for l in lengths]
    T = total or max(lengths)
    out = packed.new_full((len(lengths), T) + tuple(packed.shape[1:]), fill)
    off = offsets_of(lengths)
    for b, l in enumerate(lengths):
        out[b, :l] = packed[off[b]:off[b] + l]
    return out


def valid_mask(lengths, T):
    lengths = torch.as_tensor([int(l) for l in lengths])
    return torch.arange(T)[None, :] < lengths[:, None]


def rows_mask(rows, lengths, T):
    """Packed row indices → [items, T] bool."""
    m = torch.zeros(len(lengths), T, dtype=torch.bool)
    off = offsets_of(lengths)
    for r in [int(r) for r in rows]:
        b = max(i for i in range(len(lengths)) if off[i] <= r)
        m[b, r - off[b]] = True
    return m


def image_batch(features, boxes, lengths, classes, labels, dtype, T=None):
    T = T or max(int(l) for l in lengths)
    return dict(features=pad(features.to(dtype), lengths, T), boxes=pad(boxes.to(dtype), lengths, T),
                classes=pad(classes.long(), lengths, T), labels=labels.to(dtype),
                valid=valid_mask(lengths, T), lengths=torch.as_tensor([int(l) for l in lengths]))


def text_batch(tokens, lengths, labels, dtype, T=None):
    T = T or max(int(l) for l in lengths)
    return dict(tokens=pad(tokens.long(), lengths, T), labels=labels.to(dtype),
                valid=valid_mask(lengths, T), lengths=torch.as_tensor([int(l) for l in lengths], dtype=torch.long))


# ------------------------------------------------------------------------------------------
# fixture


def random_parameters(model, gen):
    """Reasonable random values (not the Rust initialisation), rounded to f32."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
            if name.startswith("text.gru."):
                v = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.8
            elif ".norm" in name and name.endswith(".weight"):
                v = 1.0 + 0.2 * r(*p.shape)
            elif name.endswith(".bias"):
                v = 0.1 * r(*p.shape)
            elif name == "image.mask_feature":
                v = r(*p.shape)
            elif name == "text.embedding.weight":
                v = 0.5 * r(*p.shape)
            else:  # [out, in] matrices
                v = r(*p.shape) / math.sqrt(p.shape[1])
            p.copy_(v.float().to(p.dtype))


def run_fixture(model, cfg, inp):
    """Forward + backward of both modalities; returns the dict of expect.* tensors."""
    dt = torch.float64
    img = image_batch(inp["input.image.features"], inp["input.image.boxes"], inp["input.image.lengths"],
                      inp["input.image.classes"], inp["input.image.labels"], dt)
    txt = text_batch(inp["input.text.tokens"], inp["input.text.lengths"], inp["input.text.labels"], dt)
    im_mask = rows_mask(inp["input.image.mask_rows"], inp["input.image.lengths"], img["valid"].shape[1])
    tx_mask = rows_mask(inp["input.text.mask_rows"], inp["input.text.lengths"], txt["valid"].shape[1])
    lam = cfg["lambda"]
    model.zero_grad(set_to_none=True)
    il1, il2 = model.losses("image", img, im_mask)
    tl1, tl2 = model.losses("text", txt, tx_mask)
    (il1 + lam * il2 + tl1 + lam * tl2).backward()
    out = {
        "expect.image.label_loss": il1.detach().reshape(1),
        "expect.image.context_loss": il2.detach().reshape(1),
        "expect.text.label_loss": tl1.detach().reshape(1),
        "expect.text.context_loss": tl2.detach().reshape(1),
    }
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"expect.grad.{name}"] = g.detach()
    with torch.no_grad():
        for kind, b in (("image", img), ("text", txt)):
            out[f"expect.{kind}.pooled"] = model.embed(kind, b, "pooled")
            out[f"expect.{kind}.label_embedding"] = model.embed(kind, b, "label")
    return out


def make_fixture(args):
    from safetensors.torch import save_file
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(1000 + args.seed)
    cfg = tiny_config()
    if args.tiny_json:
        cfg.update(json.loads(args.tiny_json))
    model = SemShare(cfg).double()
    random_parameters(model, gen)

    if args.seed == 1:
        img_len, txt_len = [6, 1, 3, 5], [7, 1, 4, 2]
    else:  # a different shape, still with a length-1 and a full-length item
        img_len = [int(x) for x in torch.randint(1, cfg["max_regions"] + 1, (4,), generator=gen)]
        txt_len = [int(x) for x in torch.randint(1, cfg["max_tokens"] + 1, (4,), generator=gen)]
        img_len[1], img_len[3] = 1, cfg["max_regions"]
        txt_len[0], txt_len[2] = cfg["max_tokens"], 1
    ni, nt = sum(img_len), sum(txt_len)
    C = cfg["labels"]
    x1, y1 = torch.rand(ni, generator=gen) * 0.5, torch.rand(ni, generator=gen) * 0.5
    x2 = x1 + 0.1 + torch.rand(ni, generator=gen) * 0.4
    y2 = y1 + 0.1 + torch.rand(ni, generator=gen) * 0.4
    labels = lambda n: (torch.rand(n, C, generator=gen) < 0.4).float()
    inp = {
        "input.image.features": torch.randn(ni, cfg["region_dim"], generator=gen),
        "input.image.boxes": torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], 1),
        "input.image.lengths": torch.tensor(img_len, dtype=torch.int32),
        "input.image.classes": torch.randint(0, cfg["object_classes"], (ni,), generator=gen, dtype=torch.int32),
        "input.image.mask_rows": torch.sort(torch.randperm(ni, generator=gen)[:3]).values.to(torch.int32),
        "input.image.labels": labels(4),
        "input.text.tokens": torch.randint(3, cfg["vocab"], (nt,), generator=gen, dtype=torch.int32),
        "input.text.lengths": torch.tensor(txt_len, dtype=torch.int32),
        "input.text.mask_rows": torch.sort(torch.randperm(nt, generator=gen)[:3]).values.to(torch.int32),
        "input.text.labels": labels(4),
    }
    exp = run_fixture(model, cfg, inp)
    tensors = {name: p.detach().float().contiguous() for name, p in model.named_parameters()}
    tensors.update({k: v.contiguous() for k, v in inp.items()})
    tensors.update({k: v.float().contiguous() for k, v in exp.items()})
    meta = {"format": "semshare-torch-parity-v1", "model": json.dumps(cfg), "seed": str(args.seed),
            "torch": torch.__version__}
    save_file(tensors, args.out, metadata=meta)
    print(json.dumps({"fixture": args.out, "seed": args.seed, "image_lengths": img_len,
                      "text_lengths": txt_len,
                      "losses": {k: float(v) for k, v in exp.items() if k.endswith("_loss")}}))


def check_fixture(args):
    from safetensors.torch import load_file
    cfg = config_from_safetensors(args.file)
    model = SemShare(cfg).double()
    st = load_checkpoint(model, args.file)
    exp = run_fixture(model, cfg, {k: v for k, v in st.items() if k.startswith("input.")})
    worst = 0.0
    for k, v in exp.items():
        ref = st[k].double()
        err = (v - ref).norm() / ref.norm().clamp_min(1e-30)
        worst = max(worst, float(err))
    print(json.dumps({"file": args.file, "tensors": len(exp), "max_rel_err_vs_stored_f32": worst}))
    if worst > 1e-6:
        sys.exit(1)


# ------------------------------------------------------------------------------------------
# CPU benchmark (ANCHORS.md)


def bench_cpu(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = small_config()
    B, R, T = 32, cfg["max_regions"], cfg["max_tokens"]
    model = SemShare(cfg, sdpa=(args.attn == "sdpa")).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    if args.mixed:
        img_len = torch.randint(12, R + 1, (B,)).tolist()
        txt_len = torch.randint(6, T + 1, (B,)).tolist()
    else:
        img_len, txt_len = [R] * B, [T] * B
    ni, nt = sum(img_len), sum(txt_len)
    dt = torch.float32
    img = image_batch(torch.randn(ni, cfg["region_dim"]), torch.rand(ni, 5), img_len,
                      torch.randint(0, cfg["object_classes"], (ni,)),
                      (torch.rand(B, cfg["labels"]) < 0.2).float(), dt, T=R)
    txt = text_batch(torch.randint(3, cfg["vocab"], (nt,)), txt_len,
                     (torch.rand(B, cfg["labels"]) < 0.2).float(), dt, T=T)
    lam = cfg["lambda"]

    def mask_for(b):
        return (torch.rand(b["valid"].shape) < cfg["mask_prob"]) & b["valid"]

    # --bf16: CPU autocast (matmuls and linears in bf16 on oneDNN, AMX where the CPU has it;
    # the rest fp32), the PyTorch counterpart of semshare's `--precision bf16`.
    def precision():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step():
        model.train()
        im, tm = mask_for(img), mask_for(txt)
        opt.zero_grad(set_to_none=True)
        with precision():
            il1, il2 = model.losses("image", img, im)
            tl1, tl2 = model.losses("text", txt, tm)
            loss = il1 + lam * il2 + tl1 + lam * tl2
        loss.backward()
        opt.step()

    def embed(which):
        model.eval()
        with torch.no_grad(), precision():
            model.embed("image", img, which)
            model.embed("text", txt, which)

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        ts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts), min(ts)

    common = dict(torch=torch.__version__, threads=args.threads, preset="small", batch=B,
                  inputs="mixed" if args.mixed else "full", attn=args.attn, dtype="bf16" if args.bf16 else "fp32",
                  runs=args.runs, regions=ni, tokens=nt)

    def load():  # other work on the machine distorts these timings: say how much there was
        return dict(loadavg_1m=round(os.getloadavg()[0], 2))

    med, best = timed(step)
    print(json.dumps(dict(measure="train_step", median_ms=round(med, 2), min_ms=round(best, 2),
                          pairs_per_s=round(B / med * 1e3, 1), **common, **load())), flush=True)
    for which in ("pooled", "label"):
        med, best = timed(lambda: embed(which))
        print(json.dumps(dict(measure=f"embed_{which}", median_ms=round(med, 2), min_ms=round(best, 2),
                              **common, **load())), flush=True)


# ------------------------------------------------------------------------------------------
# GPU benchmark (ANCHORS.md)


def paper_config():
    return dict(region_dim=1024, max_regions=36, word_dim=300, gru_hidden=512, dim=1024, layers=6,
                heads=8, ffn=2048, max_tokens=64, vocab=10000, labels=24, object_classes=1600,
                dropout=0.1, mask_prob=0.15, **{"lambda": 0.01})


class Timer:
    """Median/min ms of fn over `runs` after `warmup`: CUDA events on a GPU (the work is
    asynchronous), perf_counter around a synchronised call on the CPU."""

    def __init__(self, dev, warmup, runs):
        self.dev, self.warmup, self.runs = dev, warmup, runs

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.dev)
        ts = []
        for _ in range(self.runs):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(ts), 4), round(min(ts), 4)


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def autocast_for(dev, mode):
    """bf16 autocast for mode bf16*, else a no-op context."""
    import contextlib
    if mode.startswith("bf16"):
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_model(args, dev, out, modes):
    cfg = tiny_config() if args.tiny else paper_config()
    B = 4 if args.tiny else 128
    R, T = cfg["max_regions"], (cfg["max_tokens"] if args.tiny else 32)
    torch.manual_seed(0)
    img_len, txt_len = [R] * B, [T] * B
    ni, nt = sum(img_len), sum(txt_len)
    dt = torch.float32
    img = image_batch(torch.randn(ni, cfg["region_dim"]), torch.rand(ni, 5), img_len,
                      torch.randint(0, cfg["object_classes"], (ni,)),
                      (torch.rand(B, cfg["labels"]) < 0.2).float(), dt, T=R)
    txt = text_batch(torch.randint(3, cfg["vocab"], (nt,)), txt_len,
                     (torch.rand(B, cfg["labels"]) < 0.2).float(), dt, T=T)
    img = {k: v.to(dev) for k, v in img.items()}
    txt = {k: (v if k == "lengths" else v.to(dev)) for k, v in txt.items()}  # GRU packing wants CPU lengths
    lam = cfg["lambda"]
    timer = Timer(dev, args.warmup, args.runs)
    for mode in modes:
        torch.manual_seed(0)
        model = SemShare(cfg, sdpa=(args.attn == "sdpa")).to(dev)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                fused=(dev.type == "cuda"))
        set_tf32(mode == "tf32")
        if mode == "bf16-compile":
            # torch.compile(model) would compile only forward(), which this model does not use:
            # compile the submodules that do the work (the GRU's packing stays eager).
            model.shared = torch.compile(model.shared)
            model.image = torch.compile(model.image)
            model.classifier = torch.compile(model.classifier)
        run_model = model

        def mask_for(b):
            return (torch.rand(b["valid"].shape, device=dev) < cfg["mask_prob"]) & b["valid"]

        def step():
            run_model.train()
            im, tm = mask_for(img), mask_for(txt)
            opt.zero_grad(set_to_none=True)
            with autocast_for(dev, mode):
                il1, il2 = run_model.losses("image", img, im)
                tl1, tl2 = run_model.losses("text", txt, tm)
                loss = il1 + lam * il2 + tl1 + lam * tl2
            loss.backward()
            opt.step()

        def embed():
            run_model.eval()
            with torch.no_grad(), autocast_for(dev, mode):
                run_model.embed("image", img, "pooled")
                run_model.embed("text", txt, "pooled")

        common = dict(mode=mode, tf32=(mode == "tf32"), attn=args.attn, preset="tiny" if args.tiny else "paper",
                      batch=B, regions=ni, tokens=nt, params=params, runs=args.runs, **out)
        try:
            med, best = timer(step)
            print(json.dumps(dict(measure="train_step", median_ms=med, min_ms=best,
                                  pairs_per_s=round(B / med * 1e3, 1), **common)), flush=True)
            med, best = timer(embed)
            print(json.dumps(dict(measure=f"embed_{B}+{B}", median_ms=med, min_ms=best, **common)), flush=True)
        except Exception as e:  # one failing mode (e.g. compile) must not lose the others
            print(json.dumps(dict(measure="model", error=f"{type(e).__name__}: {e}", **common)), flush=True)
        del model, opt, run_model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def bench_ops(args, dev, out):
    tiny = args.tiny
    timer = Timer(dev, args.warmup, args.runs)
    copies = 4  # rotate inputs: LayerNorm's 19 MB (and the SDPA operands per copy) fit in L2
    counter = [0]

    def nxt(xs):
        counter[0] += 1
        return xs[counter[0] % len(xs)]

    def emit(op, prec, shape, fn, **extra):
        try:
            med, best = timer(fn)
            print(json.dumps(dict(measure=op, mode=prec, shape=shape, median_ms=med,
                                  min_ms=best, runs=args.runs, **extra, **out)), flush=True)
        except Exception as e:
            print(json.dumps(dict(measure=op, mode=prec, shape=shape,
                                  error=f"{type(e).__name__}: {e}", **out)), flush=True)

    set_tf32(False)
    B, H, L, Dh = (4, 2, 6, 8) if tiny else (128, 8, 36, 128)
    rows, d = (24, 16) if tiny else (4608, 1024)
    gb, gt, gi, gh = (4, 7, 6, 5) if tiny else (128, 32, 300, 512)
    ce_rows, vocab = (9, 23) if tiny else (614, 10000)
    n_rank, topk = (50, 5) if tiny else (5000, 100)
    for prec in ("fp32", "bf16"):
        ac = lambda: autocast_for(dev, prec)
        # SDPA, no mask (every item has 36 regions): forward, and forward + backward of q, k, v.
        qkv = [[torch.randn(B, H, L, Dh, device=dev, requires_grad=True) for _ in range(3)] for _ in range(copies)]
        gout = torch.randn(B, H, L, Dh, device=dev)

        def sdpa_fwd():
            q, k, v = nxt(qkv)
            with torch.no_grad(), ac():
                F.scaled_dot_product_attention(q, k, v)

        def sdpa_fwd_bwd():
            q, k, v = nxt(qkv)
            with ac():
                o = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(o, (q, k, v), gout.to(o.dtype))

        emit("sdpa_fwd", prec, [B, H, L, Dh], sdpa_fwd)
        emit("sdpa_fwd_bwd", prec, [B, H, L, Dh], sdpa_fwd_bwd)
        del qkv
        # LayerNorm over d: forward, and forward + backward (dx, dgamma, dbeta).
        xs = [torch.randn(rows, d, device=dev, requires_grad=True) for _ in range(copies)]
        w = torch.ones(d, device=dev, requires_grad=True)
        bias = torch.zeros(d, device=dev, requires_grad=True)
        gy = torch.randn(rows, d, device=dev)

        def ln_fwd():
            with torch.no_grad(), ac():
                F.layer_norm(nxt(xs), (d,), w, bias, LN_EPS)

        def ln_fwd_bwd():
            x = nxt(xs)
            with ac():
                y = F.layer_norm(x, (d,), w, bias, LN_EPS)
            torch.autograd.grad(y, (x, w, bias), gy.to(y.dtype))

        emit("layernorm_fwd", prec, [rows, d], ln_fwd)
        emit("layernorm_fwd_bwd", prec, [rows, d], ln_fwd_bwd)
        del xs
        # Bi-GRU (cuDNN on a GPU), full-length sequences: forward, and forward + backward.
        gru = nn.GRU(gi, gh, batch_first=True, bidirectional=True).to(dev)
        gx = [torch.randn(gb, gt, gi, device=dev, requires_grad=True) for _ in range(copies)]
        ggo = torch.randn(gb, gt, 2 * gh, device=dev)

        def gru_fwd():
            with torch.no_grad(), ac():
                gru(nxt(gx))

        def gru_fwd_bwd():
            x = nxt(gx)
            with ac():
                o, _ = gru(x)
            torch.autograd.grad(o, [x] + list(gru.parameters()), ggo.to(o.dtype))

        emit("bigru_fwd", prec, [gb, gt, gi, gh], gru_fwd)
        emit("bigru_fwd_bwd", prec, [gb, gt, gi, gh], gru_fwd_bwd)
        del gru, gx
        # Multi-label BCE with logits and masked-token cross-entropy, forward + backward.
        bl = [torch.randn(gb, 24, device=dev, requires_grad=True) for _ in range(copies)]
        by = (torch.rand(gb, 24, device=dev) < 0.2).float()

        def bce():
            x = nxt(bl)
            with ac():
                loss = F.binary_cross_entropy_with_logits(x, by)
            torch.autograd.grad(loss, x)

        cl = [torch.randn(ce_rows, vocab, device=dev, requires_grad=True) for _ in range(copies)]
        cy = torch.randint(0, vocab, (ce_rows,), device=dev)

        def ce():
            x = nxt(cl)
            with ac():
                loss = F.cross_entropy(x, cy)
            torch.autograd.grad(loss, x)

        emit("bce_fwd_bwd", prec, [gb, 24], bce)
        emit("ce_fwd_bwd", prec, [ce_rows, vocab], ce)
        del bl, cl
    # Retrieval: cosine similarity of n queries against n gallery items, top-k per query (fp32).
    qe = torch.nn.functional.normalize(torch.randn(n_rank, 1024 if not tiny else 16, device=dev), dim=1)
    ge = torch.nn.functional.normalize(torch.randn(n_rank, qe.shape[1], device=dev), dim=1)
    emit("cosine_rank_topk", "fp32", [n_rank, n_rank, topk], lambda: torch.topk(qe @ ge.T, topk, dim=1))
    # Device copy bandwidth: bytes read + written per second.
    n = (1 << 16) if tiny else (1 << 28)  # 1 GiB of f32 on the GPU
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    med, best = timer(lambda: dst.copy_(src))
    print(json.dumps(dict(measure="copy_bandwidth", bytes=2 * 4 * n, median_ms=med,
                          gb_per_s_median=round(2 * 4 * n / med / 1e6, 1),
                          gb_per_s_best=round(2 * 4 * n / best / 1e6, 1), **out)), flush=True)


def bench_gpu(args):
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench-gpu: torch sees no CUDA device (use --device cpu --tiny for a smoke run)")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("fp32", "tf32", "bf16")]
    if bad:
        sys.exit(f"bench-gpu: unknown modes {bad} (fp32, tf32, bf16)")
    if args.compile:
        modes.append("bf16-compile")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = dict(torch=torch.__version__, device=name,
               cuda=torch.version.cuda if dev.type == "cuda" else None)
    # The ops first: a slow torch.compile (the model's last mode) must not cost the ops'
    # baselines and the copy bandwidth when the caller's time cap ends the run.
    if not args.no_ops:
        bench_ops(args, dev, out)
    if not args.no_model:
        bench_model(args, dev, out, modes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--tiny-json", default=None, help="JSON overrides of the tiny config")
    c = sub.add_parser("check")
    c.add_argument("--file", required=True)
    b = sub.add_parser("bench-cpu")
    b.add_argument("--mixed", action="store_true")
    b.add_argument("--bf16", action="store_true", help="CPU autocast to bfloat16")
    b.add_argument("--attn", choices=["explicit", "sdpa"], default="explicit")
    b.add_argument("--runs", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    g = sub.add_parser("bench-gpu")
    g.add_argument("--device", default="cuda")
    g.add_argument("--tiny", action="store_true", help="tiny config and shapes (smoke run)")
    g.add_argument("--modes", default="fp32,tf32,bf16")
    g.add_argument("--compile", action="store_true", help="also bf16 autocast + torch.compile")
    g.add_argument("--attn", choices=["explicit", "sdpa"], default="sdpa")
    g.add_argument("--runs", type=int, default=30)
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--no-model", action="store_true")
    g.add_argument("--no-ops", action="store_true")
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    {"fixture": make_fixture, "check": check_fixture, "bench-cpu": bench_cpu, "bench-gpu": bench_gpu}[a.cmd](a)


if __name__ == "__main__":
    main()
