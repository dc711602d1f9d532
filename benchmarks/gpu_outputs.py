"""Every output of compare_logits on the GPU, for cases that exercise each
path of the CUDA row kernel (close, far and bf16 rows, ties at the top-k
threshold, constant rows, rows with fewer finite logits than k, NaN rows,
tiny and odd vocabularies, misaligned rows, k up to 64), saved by one build
and compared by another: the proof that a change to the kernel's speed left
its results as they were (docs/gpu.md). Prints, per case, the fields that
differ and by how much (none: "identical"); exits 1 when any differs.

    PYTHONPATH=OLD python benchmarks/gpu_outputs.py --save old.npz
    PYTHONPATH=NEW python benchmarks/gpu_outputs.py --against old.npz
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import logitparity as lp
from logitparity.metrics import FIELDS, INT_FIELDS


def cases():
    """(name, ref, cand, targets, topk) on the GPU, seeded."""
    g = torch.Generator(device="cuda").manual_seed(7)

    def randn(r, v):
        return torch.randn(r, v, generator=g, device="cuda")

    def targets(r, v):
        return torch.randint(0, v, (r,), generator=g, device="cuda")

    a = randn(512, 151936) * 2.5 + 4.0
    yield "near fp32 512x151936", a, a + 0.05 * randn(512, 151936), targets(512, 151936), None
    yield "far fp32 512x151936", a, a + 0.5 * randn(512, 151936), targets(512, 151936), None
    yield "near bf16 512x151936", a.bfloat16(), (a + 0.05 * randn(512, 151936)).bfloat16(), None, None
    del a
    a = randn(2048, 49152) * 2.5
    yield "near fp32 2048x49152 k=1,32,64", a, a + 0.05 * randn(2048, 49152), targets(2048, 49152), [1, 32, 64]
    # Logits on a coarse grid: many ties at every rank of the top k.
    q = torch.round(a * 2) / 2
    yield "ties (half-logit grid) 2048x49152 k=1,5,10,64", q, torch.round((a + 0.3 * randn(2048, 49152)) * 2) / 2, None, [1, 5, 10, 64]
    del a, q
    c = torch.zeros(64, 32000, device="cuda")
    yield "constant rows 64x32000", c, c + 1.0, None, [1, 5, 10]
    m = torch.full((64, 32000), float("-inf"), device="cuda")
    m[:, 100:105] = randn(64, 5)
    yield "5 finite logits, k=10", m, m.clone(), None, [1, 5, 10]
    n = randn(16, 5000)
    n[3, 17] = float("nan")
    n[9, 4999] = float("inf")
    yield "NaN and +inf rows", n, n + 0.01 * randn(16, 5000), None, None
    for v in (1, 2, 7, 100, 1023, 1025, 50257):
        x = randn(600, v)
        yield f"vocab {v}", x, x + 0.1 * randn(600, v), targets(600, v), [1, min(v, 5)]
    w = randn(300, 49153)
    yield "misaligned rows (odd stride view)", w[:, 1:], (w + 0.05 * randn(300, 49153))[:, 1:], None, None
    h = randn(400, 32000) * 3
    yield "fp16 vs bf16", h.half(), (h + 0.05 * randn(400, 32000)).bfloat16(), None, [1, 5, 10, 20]


def outputs(m) -> dict[str, np.ndarray]:
    d = {}
    for name in FIELDS:
        d[name] = np.asarray(getattr(m, name))
    for name in INT_FIELDS:
        d[name] = np.asarray(getattr(m, name))
    for k, v in m.topk_common.items():
        d[f"topk_common@{k}"] = np.asarray(v)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write this build's outputs to an .npz")
    g.add_argument("--against", help="compare this build's outputs with a saved .npz")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_outputs: no CUDA device")
    saved = dict(np.load(args.against)) if args.against else None
    out, bad = {}, 0
    for name, ref, cand, t, topk in cases():
        m = lp.compare_logits(ref, cand, targets=t, topk=topk, js=True)
        for field, v in outputs(m).items():
            out[f"{name}|{field}"] = v
        if saved is None:
            continue
        diffs = []
        for field, v in outputs(m).items():
            w = saved.get(f"{name}|{field}")
            if w is None or w.shape != v.shape:
                diffs.append(f"{field}: missing or reshaped")
            elif not np.array_equal(v, w, equal_nan=True):
                with np.errstate(invalid="ignore"):
                    dv = np.abs(v.astype(np.float64) - w.astype(np.float64))
                    rel = dv / np.maximum(np.abs(w.astype(np.float64)), 1e-300)
                rows = int(np.sum(~((v == w) | (np.isnan(v.astype(float)) & np.isnan(w.astype(float))))))
                diffs.append(f"{field}: {rows} rows, max |d| {np.nanmax(dv):.3g}, max rel {np.nanmax(rel):.3g}")
        bad += bool(diffs)
        print(f"{name}: " + ("identical" if not diffs else "; ".join(diffs)))
    if saved is None:
        np.savez(args.save, **out)
        print(f"saved {len(out)} arrays to {args.save}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
