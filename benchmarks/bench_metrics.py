"""Throughput of the fused row comparison against the same metrics written the
natural way in torch and in numpy, plus a memory-read-bandwidth probe, all in
one run with the same thread count.

Prints rows/s and GB/s of input for each implementation and the ratios
ours/torch, ours/numpy and ours/bandwidth. numpy's elementwise operations are
single-threaded whatever the thread count; its ratio is reported as measured.

    python benchmarks/bench_metrics.py                # both shapes, fp32 and bf16
    python benchmarks/bench_metrics.py --threads 2 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import logitparity as lp

TOPK = (1, 5, 10)


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g) * 2.5 + 4.0
    b = a + 0.05 * torch.randn(rows, vocab, generator=g)
    t = torch.randint(0, vocab, (rows,), generator=g)
    return a.to(dtype), b.to(dtype), t


def ours(a, b, t, threads, js):
    return lp.compare_logits(a, b, targets=t, topk=TOPK, threads=threads, js=js)


def torch_natural(a, b, t):
    """Every field of compare_logits, written the way one would in torch."""
    a = a.float()
    b = b.float()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    pa, pb = la.exp(), lb.exp()
    out = {
        "kl_ref_cand": (pa * (la - lb)).sum(-1),
        "kl_cand_ref": (pb * (lb - la)).sum(-1),
    }
    lm = (0.5 * (pa + pb)).log()
    out["js"] = 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1)
    out["cosine"] = F.cosine_similarity(a, b, dim=-1)
    d = (a - b).abs()
    out["max_abs_logit"], out["mean_abs_logit"] = d.amax(-1), d.mean(-1)
    out["max_abs_logprob"] = (la - lb).abs().amax(-1)
    out["entropy_ref"], out["entropy_cand"] = -(pa * la).sum(-1), -(pb * lb).sum(-1)
    va, ia = a.topk(max(TOPK), -1)
    vb, ib = b.topk(max(TOPK), -1)
    out["margin_ref"], out["margin_cand"] = va[:, 0] - va[:, 1], vb[:, 0] - vb[:, 1]
    top_b = b.gather(1, ia[:, :1])
    out["rank"] = (b > top_b).sum(-1)
    for k in TOPK:
        out[f"top{k}"] = (ia[:, :k, None] == ib[:, None, :k]).sum((1, 2))
    out["nll_ref"] = -la.gather(1, t[:, None])[:, 0]
    out["nll_cand"] = -lb.gather(1, t[:, None])[:, 0]
    out["delta_p"] = pb.gather(1, t[:, None])[:, 0] - pa.gather(1, t[:, None])[:, 0]
    return out


def numpy_natural(a, b, t):
    """The same in numpy (float32, single-threaded elementwise)."""

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))

    la, lb = log_softmax(a), log_softmax(b)
    pa, pb = np.exp(la), np.exp(lb)
    out = {"kl_ref_cand": (pa * (la - lb)).sum(-1), "kl_cand_ref": (pb * (lb - la)).sum(-1)}
    lm = np.log(0.5 * (pa + pb))
    out["js"] = 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1)
    out["cosine"] = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    d = np.abs(a - b)
    out["max_abs_logit"], out["mean_abs_logit"] = d.max(-1), d.mean(-1)
    out["max_abs_logprob"] = np.abs(la - lb).max(-1)
    out["entropy_ref"], out["entropy_cand"] = -(pa * la).sum(-1), -(pb * lb).sum(-1)
    k = max(TOPK)
    ia = np.argpartition(-a, k, -1)[:, :k]
    ib = np.argpartition(-b, k, -1)[:, :k]
    ia = np.take_along_axis(ia, np.argsort(-np.take_along_axis(a, ia, 1), 1, kind="stable"), 1)
    ib = np.take_along_axis(ib, np.argsort(-np.take_along_axis(b, ib, 1), 1, kind="stable"), 1)
    rows = np.arange(a.shape[0])
    out["margin_ref"] = a[rows, ia[:, 0]] - a[rows, ia[:, 1]]
    out["rank"] = (b > b[rows, ia[:, 0]][:, None]).sum(-1)
    for kk in TOPK:
        out[f"top{kk}"] = (ia[:, :kk, None] == ib[:, None, :kk]).sum((1, 2))
    out["nll_ref"], out["nll_cand"] = -la[rows, t], -lb[rows, t]
    out["delta_p"] = pb[rows, t] - pa[rows, t]
    return out


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth_probe(threads: int, nbytes: int = 1 << 30, repeat: int = 3) -> float:
    """Read bandwidth in GB/s: a multi-threaded torch sum over a 1 GiB buffer
    (vectorised, so bound by memory, not arithmetic)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # fault pages in
    return nbytes / timed(lambda: x.sum(), repeat) / 1e9


def small_calls(rows: int, threads: int, vocab: int = 49152, calls: int = 300) -> None:
    """Per-call time of compare_logits on small batches, where starting
    threads per call (rather than once per process) would show."""
    a, b, t = make_inputs(rows, vocab, torch.float32)
    an, bn, tn = a.numpy(), b.numpy(), t.numpy()
    for _ in range(20):
        lp.compare_logits(an, bn, targets=tn, threads=threads)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        lp.compare_logits(an, bn, targets=tn, threads=threads)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(f"small calls: {rows}x{vocab} fp32, threads={threads}: median {med * 1e6:.0f} us per call "
          f"({rows / med:.0f} rows/s), p10 {times[len(times) // 10] * 1e6:.0f} us over {calls} calls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shapes", default="512x151936,2048x49152")
    ap.add_argument("--numpy-rows", type=int, default=64,
                    help="rows given to numpy (single-threaded; rows/s is what is compared)")
    ap.add_argument("--impls", default="ours,torch,numpy",
                    help="comma list of ours, torch, numpy (ratios need all three)")
    ap.add_argument("--small-calls", type=int, default=0, metavar="ROWS",
                    help="instead: time many calls of ROWS rows x 49152 (compare_dumps calls the "
                         "core once per prompt), median per call in us")
    args = ap.parse_args()
    impls = set(args.impls.split(","))
    torch.set_num_threads(args.threads)
    if args.small_calls:
        small_calls(args.small_calls, args.threads)
        return
    bw = bandwidth_probe(args.threads)
    print(f"threads={args.threads}  read bandwidth probe (torch sum, 1 GiB): {bw:.1f} GB/s")
    print(f"cpu: {os.uname().machine}, torch {torch.__version__}, numpy {np.__version__}")
    header = (f"{'shape':>12} {'dtype':>5} {'impl':>14} {'rows/s':>10} {'GB/s in':>8} "
              f"{'ours/torch':>10} {'ours/numpy':>10} {'ours/bw':>8}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        rows, vocab = (int(v) for v in shape.split("x"))
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b, t = make_inputs(rows, vocab, dtype)
            bytes_in = 2 * a.numel() * a.element_size()
            res = {}
            for label, js in (("ours (all)", True), ("ours (no js)", False)):
                ours(a[:4], b[:4], t[:4], args.threads, js)  # warm up
                res[label] = rows / timed(lambda: ours(a, b, t, args.threads, js), args.repeat)
            nan = float("nan")
            res["torch"] = res["numpy"] = nan
            if "torch" in impls:
                torch_natural(a[:4], b[:4], t[:4])
                res["torch"] = rows / timed(lambda: torch_natural(a, b, t), max(1, args.repeat - 1))
            if "numpy" in impls:
                nr = min(rows, args.numpy_rows)
                an = a[:nr].float().numpy()
                bn = b[:nr].float().numpy()
                tn = t[:nr].numpy()
                res["numpy"] = nr / timed(lambda: numpy_natural(an, bn, tn), 1)
            for label, rps in res.items():
                if rps != rps:  # not run
                    continue
                gbs = rps * bytes_in / rows / 1e9
                extra = ""
                if label.startswith("ours"):
                    extra = (f"{rps / res['torch']:>10.1f} {rps / res['numpy']:>10.1f} "
                             f"{gbs / bw:>8.0%}")
                print(f"{shape:>12} {name:>5} {label:>14} {rps:>10.1f} {gbs:>8.2f} {extra}")
            if "torch" not in impls:
                continue
            # The fused kernel and torch agree on what they both compute.
            m = ours(a[:8], b[:8], t[:8], args.threads, True)
            tn8 = torch_natural(a[:8], b[:8], t[:8])
            err = float(np.max(np.abs(m.kl_ref_cand - tn8["kl_ref_cand"].double().numpy())))
            print(f"{'':>12} {'':>5} {'check':>14} max |KL ours - KL torch| on 8 rows = {err:.2e}")


if __name__ == "__main__":
    main()
