"""GPU throughput of the fused row comparison on CUDA tensors (the core's CUDA
kernels, read in place) against the same metrics written the natural way in
torch (eager) and the same code under torch.compile, on the same inputs in one
run, plus an HBM read-bandwidth probe (a torch sum over 4 GiB).

Prints rows/s, the effective read rate (both inputs read once) and the ratios
ours/eager, ours/compile and ours/bandwidth; checks KL against torch's float64
KL on a few rows. Ours gets the targets as a CUDA tensor (read in place).
Times are medians of wall-clock calls after warm-up, each ending in
torch.cuda.synchronize() (ours returns host arrays; torch's results stay on
the GPU, which favours torch slightly), taken in --rounds rounds that
alternate the implementations (ours, eager, compile, ours, ...); the table
shows the median of the rounds' medians, and the spread of ours over the
rounds (one pass in a fixed order moved ours by 10% with what ran before
it: the same build gave 1.48M and 1.67M rows/s at 512x151936 fp32 in two
runs of one device call).

    python benchmarks/bench_gpu.py                   # 512x151936 and 2048x49152, fp32 and bf16
    python benchmarks/bench_gpu.py --impls ours --repeat 50
    python benchmarks/bench_gpu.py --host-breakdown   # where a call's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import logitparity as lp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import TOPK, torch_natural  # noqa: E402  (the same metric code)


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g, device="cuda") * 2.5 + 4.0
    b = a + 0.05 * torch.randn(rows, vocab, generator=g, device="cuda")
    t = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    return a.to(dtype), b.to(dtype), t


def timed(fn, repeat: int, warmup: int = 3, sync: bool = True) -> float:
    """Median seconds of `repeat` calls of fn, each ending in a synchronize
    unless sync is False (host-only steps, benchmarks/prof_host.py)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth_probe(nbytes: int = 4 << 30) -> float:
    """HBM read bandwidth in bytes/s: a sum over a 4 GiB float32 buffer."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    x.sum()
    best = float("inf")
    for _ in range(10):
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="512x151936,2048x49152")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds alternating the implementations; the median round is shown")
    ap.add_argument("--impls", default="ours,eager,compile")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--host-breakdown", action="store_true",
                    help="also time a call's parts at 512x151936 fp32 (call, core call, GPU span, 1 row)")
    args = ap.parse_args()
    impls = set(args.impls.split(","))
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    from logitparity import _core

    if not _core.cuda_built():
        sys.exit("bench_gpu: logitparity was built without its CUDA kernels")
    bw = bandwidth_probe()
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; HBM read probe (torch sum, 4 GiB): {bw / 1e12:.2f} TB/s")
    compiled = torch.compile(torch_natural) if "compile" in impls else None
    header = (f"{'shape':>12} {'dtype':>5} {'impl':>14} {'rows/s':>11} {'TB/s in':>8} "
              f"{'/eager':>7} {'/compile':>8} {'/bw':>5}")
    print(header)
    print("-" * len(header))
    results = {"device": name, "torch": torch.__version__, "bandwidth_Bps": bw, "runs": []}
    for shape in args.shapes.split(","):
        rows, vocab = (int(v) for v in shape.split("x"))
        for dname in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
            a, b, t = make_inputs(rows, vocab, dtype)
            t_host = t.cpu().numpy()  # for the float64 check below
            bytes_in = 2 * a.numel() * a.element_size()
            res: dict[str, float] = {}
            compile_s = None
            if "compile" in impls:  # compiled before the rounds (not timed in them)
                t0 = time.perf_counter()
                compiled(a, b, t)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
            per_round: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for label, js in (("ours (no js)", False), ("ours (js)", True)):
                    if "ours" in impls:
                        per_round.setdefault(label, []).append(rows / timed(
                            lambda: lp.compare_logits(a, b, targets=t, topk=TOPK, js=js), args.repeat))
                if "eager" in impls:
                    per_round.setdefault("torch eager", []).append(
                        rows / timed(lambda: torch_natural(a, b, t), max(3, args.repeat // 3)))
                if "compile" in impls:
                    per_round.setdefault("torch.compile", []).append(
                        rows / timed(lambda: compiled(a, b, t), max(3, args.repeat // 3)))
            res = {label: statistics.median(v) for label, v in per_round.items()}
            eager = res.get("torch eager", float("nan"))
            comp = res.get("torch.compile", float("nan"))
            for label, rps in res.items():
                rate = rps * bytes_in / rows
                spread = per_round[label]
                extra = (f"  rounds {min(spread):.0f} - {max(spread):.0f}"
                         if label.startswith("ours") and len(spread) > 1 else "")
                print(f"{shape:>12} {dname:>5} {label:>14} {rps:>11.0f} {rate / 1e12:>8.3f} "
                      f"{rps / eager:>7.1f} {rps / comp:>8.1f} {rate / bw:>5.0%}{extra}")
            if compile_s is not None:
                res["compile_s"] = compile_s
            # ours against torch's float64 KL on 8 rows
            m = lp.compare_logits(a[:8], b[:8], targets=t_host[:8], js=True)
            la = torch.log_softmax(a[:8].double(), -1)
            lb = torch.log_softmax(b[:8].double(), -1)
            kl = (la.exp() * (la - lb)).sum(-1).cpu().numpy()
            err = float(np.max(np.abs(m.kl_ref_cand - kl) / np.abs(kl)))
            same = bool(np.array_equal(m.argmax_ref, a[:8].float().argmax(-1).cpu().numpy()))
            print(f"{'':>12} {'':>5} {'check':>14} max rel |KL ours - KL torch f64| on 8 rows = "
                  f"{err:.1e}; argmax equal: {same}")
            results["runs"].append({"shape": shape, "dtype": dname, "rows_per_s": res,
                                    "rows_per_s_rounds": per_round,
                                    "bytes_in_per_call": bytes_in, "kl_rel_err": err})
            del a, b, t
            torch.cuda.empty_cache()
    if args.host_breakdown:
        results["host_breakdown_us"] = host_breakdown(args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def host_breakdown(repeat: int) -> dict[str, float]:
    """Where a call's time goes at 512x151936 fp32 (no js, CUDA targets):
    the whole call, the core's call alone (pointers in, host arrays out), the
    GPU span between two events around the call, and a 1-row call."""
    from logitparity import _core

    a, b, t = make_inputs(512, 151936, torch.float32)
    st = torch.cuda.current_stream().cuda_stream
    out = {
        "call": timed(lambda: lp.compare_logits(a, b, targets=t, topk=TOPK), repeat) * 1e6,
        "core_call": timed(lambda: _core.compare_rows_cuda(
            a.data_ptr(), 0, 151936, b.data_ptr(), 0, 151936, 512, 151936, None, list(TOPK), False,
            st, t.data_ptr()), repeat) * 1e6,
        "call_1_row": timed(lambda: lp.compare_logits(a[:1], b[:1], targets=t[:1], topk=TOPK),
                            repeat) * 1e6,
    }
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spans = []
    for _ in range(repeat):
        start.record()
        lp.compare_logits(a, b, targets=t, topk=TOPK)
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end) * 1e3)
    out["gpu_span"] = statistics.median(spans)
    print("host breakdown, 512x151936 fp32, no js, us (medians): " +
          ", ".join(f"{k} {v:.0f}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
