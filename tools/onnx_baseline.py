#!/usr/bin/env python3
"""ONNX Runtime baseline for CPU inference (ANCHORS.md): the `small` model of
`torch_reference.py`, exported to ONNX (opset 17) and run by ONNX Runtime on the same threads,
timed in the same process as PyTorch eager, so both figures come from one run on one machine.

    python3 tools/onnx_baseline.py [--mixed] [--threads 2] [--runs 30]
        [--alternate-with BENCH_BINARY [--alternations 10] [--bf16]]

Prints one JSON line per runtime: median and min milliseconds to embed 32 images + 32 texts
(`pooled`), and the largest difference between the ONNX and PyTorch outputs.

`--alternate-with` (a built `benches/cpu`, e.g. `cargo bench --bench cpu --no-run`'s) instead
alternates ONNX Runtime's embedding with semshare's, `--alternations` times, each semshare
turn a short criterion run of `embed_small_32img_32txt/full` (or `/mixed`; `--bf16`: `_bf16` after it,
semshare at `--precision bf16` against ONNX Runtime's fp32, which has no bf16) right after an
ONNX Runtime turn in the same minute; one JSON line per turn, then the median of the ratios.
On a VM whose speed moves by 25 % from minute to minute, the
ratio of neighbouring turns is steadier than that of two medians minutes apart.
Needs: torch, onnx, onnxruntime (`pip install onnx onnxruntime`).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import torch_reference as ref


class Embed(nn.Module):
    """Both modalities in one graph: one ONNX Runtime session, one thread pool (two sessions'
    spinning pools would steal each other's cores)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features, boxes, image_valid, tokens, lengths, text_valid):
        image = self.model.embed("image", dict(features=features, boxes=boxes, valid=image_valid), "pooled")
        text = self.model.embed("text", dict(tokens=tokens, lengths=lengths, valid=text_valid), "pooled")
        return image, text


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 2), round(min(ts), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixed", action="store_true", help="variable lengths instead of full ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--alternate-with", metavar="BENCH_BINARY", help="alternate with semshare's embedding")
    ap.add_argument("--alternations", type=int, default=10)
    ap.add_argument("--bf16", action="store_true",
                    help="with --alternate-with: semshare's embedding in bf16 (ONNX Runtime's CPU has no bf16: "
                         "its fp32 is the reference, issue 17)")
    a = ap.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ref.small_config()
    B, R, T = 32, cfg["max_regions"], cfg["max_tokens"]
    model = ref.SemShare(cfg, sdpa=True).float().eval()
    if a.mixed:
        img_len = torch.randint(12, R + 1, (B,)).tolist()
        txt_len = torch.randint(6, T + 1, (B,)).tolist()
    else:
        img_len, txt_len = [R] * B, [T] * B
    ni, nt = sum(img_len), sum(txt_len)
    img = ref.image_batch(torch.randn(ni, cfg["region_dim"]), torch.rand(ni, 5), img_len,
                          torch.randint(0, cfg["object_classes"], (ni,)),
                          (torch.rand(B, cfg["labels"]) < 0.2).float(), torch.float32, T=R)
    txt = ref.text_batch(torch.randint(3, cfg["vocab"], (nt,)), txt_len,
                         (torch.rand(B, cfg["labels"]) < 0.2).float(), torch.float32, T=T)
    inputs = (img["features"], img["boxes"], img["valid"], txt["tokens"], txt["lengths"], txt["valid"])
    names = ["features", "boxes", "image_valid", "tokens", "lengths", "text_valid"]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # .eval() on the wrapper too: the exporter restores the wrapper's mode onto every submodule.
    embed = Embed(model).eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = os.path.join(tmp, "embed.onnx")
        torch.onnx.export(embed, inputs, path, input_names=names, output_names=["image", "text"], opset_version=17,
                          dynamo=False)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {n: t.numpy() for n, t in zip(names, inputs)}
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}  # the exporter may drop unused inputs
        worst = 0.0
        for got, want in zip(sess.run(None, feed), embed(*inputs)):
            want = want.numpy()
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))

        def onnx_embed():
            sess.run(None, feed)

        def torch_embed():
            model.embed("image", img, "pooled")
            model.embed("text", txt, "pooled")

        common = dict(threads=a.threads, preset="small", batch=B, inputs="mixed" if a.mixed else "full",
                      regions=ni, tokens=nt, runs=a.runs, torch=torch.__version__, onnxruntime=ort.__version__)
        if a.alternate_with:
            alternate(a, onnx_embed, common)
            return
        for runtime, fn in (("torch_eager", torch_embed), ("onnxruntime", onnx_embed), ("torch_eager", torch_embed)):
            med, best = timed(fn, a.warmup, a.runs)
            print(json.dumps(dict(measure="embed_pooled", runtime=runtime, median_ms=med, min_ms=best,
                                  onnx_max_rel_diff=worst, loadavg_1m=round(os.getloadavg()[0], 2), **common)),
                  flush=True)


def alternate(a, onnx_embed, common):
    """ONNX Runtime's embedding and semshare's (the bench binary's criterion run), turn about."""
    bench = ["embed_small_32img_32txt/" + ("mixed" if a.mixed else "full") + ("_bf16" if a.bf16 else "")]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    ratios = []
    for turn in range(1, a.alternations + 1):
        ort_ms, _ = timed(onnx_embed, a.warmup, a.runs)
        out = subprocess.run([a.alternate_with, "--bench", f"^{bench[0]}$", "--warm-up-time", "1",
                              "--measurement-time", "3", "--noplot"], capture_output=True, text=True, env=env)
        found = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", out.stdout)
        if out.returncode != 0 or not found:
            sys.exit(f"onnx_baseline: {a.alternate_with} gave no time for {bench[0]}:\n{out.stderr[-2000:]}")
        semshare_ms = float(found.group(1)) * {"ms": 1.0, "s": 1e3, "µs": 1e-3, "us": 1e-3}[found.group(2)]
        ratios.append(semshare_ms / ort_ms)
        print(json.dumps(dict(measure="embed_pooled", semshare_precision="bf16" if a.bf16 else "fp32", turn=turn,
                              onnxruntime_ms=ort_ms, semshare_ms=round(semshare_ms, 2),
                              ratio=round(ratios[-1], 3), loadavg_1m=round(os.getloadavg()[0], 2), **common)), flush=True)
    print(json.dumps(dict(measure="embed_pooled", semshare_precision="bf16" if a.bf16 else "fp32", turns=len(ratios), ratio_median=round(statistics.median(ratios), 3),
                          ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3))), flush=True)


if __name__ == "__main__":
    main()
