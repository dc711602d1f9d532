"""The CUDA row kernel's own time over several shapes, in one process: each
launch is queued behind a sleep kernel, between two CUDA events, so the
events' span is the kernel alone (no host time in it; ncu's durations agree
to a few µs, and a process per shape under ncu costs ~10 s of device time).
Rows as benchmarks/prof_gpu.py makes them (--kinds near, far, bf16). Prints
one line per shape and kind: the median of --repeat spans, rows/s, effective
read (both inputs once), and field means to 12 digits (two builds of the
kernel are compared by them).

    python benchmarks/kernel_sweep.py [--shapes 512x151936,2048x49152] [--kinds near,far,bf16] [--js]
"""

import argparse
import os
import statistics
import sys

import torch

import logitparity as lp
from logitparity import _cuda_arrays as ca
from logitparity import metrics as lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prof_gpu import KINDS, field_means, inputs  # noqa: E402  (the same rows)

TOPK = (1, 5, 10)
SHAPES = "512x151936,2048x49152,4096x18992,264x151936,132x151936,8x151936,1x151936"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help=f"rows x vocab, comma-separated (default {SHAPES})")
    ap.add_argument("--kinds", default="near", help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--js", action="store_true", help="also the Jensen-Shannon sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_sweep: no CUDA device")
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"--kinds: expected some of {', '.join(KINDS)}, got {kind!r}")
    core = lm._core()
    for shape in args.shapes.split(","):
        try:
            rows, vocab = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            ap.error(f"--shapes: expected ROWSxVOCAB such as 512x151936, got {shape!r}")
        for kind in kinds:
            a, b, t = inputs(kind, rows, vocab)
            ra, rb = ca.cuda_rows(a, "ref", False), ca.cuda_rows(b, "cand", False)
            call = (ra.ptr, ra.dtype, ra.stride, rb.ptr, rb.dtype, rb.stride, rows, vocab, None,
                    list(TOPK), args.js, ra.stream, t.data_ptr())
            m = lp.compare_logits(a, b, targets=t, js=args.js)
            spans = []
            for _ in range(args.repeat):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(2_000_000)  # ~1 ms: the queue stays ahead of the GPU
                e0.record()
                job = core.compare_rows_cuda_start(*call)
                e1.record()
                job[0].finish()
                e1.synchronize()
                spans.append(e0.elapsed_time(e1) * 1e3)
            us = statistics.median(spans)
            nbytes = a.element_size() * rows * vocab * 2
            print(f"{shape} {kind}: {us:9.1f} us  {rows / us * 1e6:12,.0f} rows/s  "
                  f"{nbytes / us / 1e6:5.2f} TB/s | {field_means(m, args.js)}", flush=True)
            del a, b, t, m


if __name__ == "__main__":
    main()
