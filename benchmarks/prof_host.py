"""Where the host time of a CUDA `compare_logits` call goes (docs/gpu.md,
"Host side of a call"): the call against its parts, each timed on its own
(medians of --repeat single calls, perf_counter), on CUDA tensors of one shape:

  sync_idle     torch.cuda.synchronize() with nothing queued
  launch_sync   one tiny torch kernel + synchronize (a launch's round trip)
  call          lp.compare_logits(a, b, targets=t, topk=(1, 5, 10)) + synchronize
  core          the core's call alone, with the wrapper's arguments + synchronize
  core_1x64     the core's call on one row of 64 logits (its fixed cost)
  wrapper       the call with the core's call replaced by its saved result
  cuda_rows ... the wrapper's steps, one by one (no GPU work)

--cprofile N also prints cProfile's top functions over N calls.

    python benchmarks/prof_host.py [--shape 512x151936] [--repeat 300] [--cprofile 200]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import numpy as np
import torch

import logitparity as lp
from logitparity import _cuda_arrays as ca
from logitparity import metrics as lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import timed  # noqa: E402  (the same timing loop)

TOPK = (1, 5, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="512x151936")
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--cprofile", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prof_host: no CUDA device")
    core = lm._core()
    rows, vocab = (int(v) for v in args.shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(rows, vocab, generator=g, device="cuda") * 2.5 + 4.0
    b = a + 0.05 * torch.randn(rows, vocab, generator=g, device="cuda")
    t = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    tiny_a, tiny_b, tiny_t = a[:1, :64].contiguous(), b[:1, :64].contiguous(), t[:1] % 64
    one = torch.zeros(1, device="cuda")
    ra = ca.cuda_rows(a, "ref", False)
    st = ra.stream

    def core_call(x, y, tt, r, v):
        return core.compare_rows_cuda(x.data_ptr(), 0, v, y.data_ptr(), 0, v, r, v, None,
                                      list(TOPK), False, st, tt.data_ptr())

    saved = core_call(a, b, t, rows, vocab)
    n_int = len(lm.INT_FIELDS)
    saved_ints = np.ascontiguousarray(saved[0][:, -n_int:].T, dtype=np.int64)

    class Done:
        def finish(self):
            pass

    class SavedCore:  # the core's result without the call: the wrapper alone
        def compare_rows_cuda(self, *_a, **_k):
            return saved

        def compare_rows_cuda_start(self, *_a, **_k):
            return (Done(), *saved, saved_ints)

        def __getattr__(self, name):
            return getattr(core, name)

    def wrapper_only():
        real = lm._core
        lm._core = lambda: SavedCore()
        try:
            lp.compare_logits(a, b, targets=t, topk=TOPK)
        finally:
            lm._core = real

    ks = lm._topk_list(TOPK, vocab)
    fields, names, overlap = saved
    parts = {
        "sync_idle": (lambda: None, True),
        "launch_sync": (lambda: one.add_(1.0), True),
        "call": (lambda: lp.compare_logits(a, b, targets=t, topk=TOPK), True),
        "core": (lambda: core_call(a, b, t, rows, vocab), True),
        "core_1x64": (lambda: core_call(tiny_a, tiny_b, tiny_t, 1, 64), True),
        "wrapper": (wrapper_only, False),
        "on_cuda x2": (lambda: (ca.on_cuda(a), ca.on_cuda(b)), False),
        "check_same_device": (lambda: ca.check_same_device(a, b), False),
        "cuda_rows x2": (lambda: (ca.cuda_rows(a, "ref", False), ca.cuda_rows(b, "cand", False)), False),
        "torch_stream": (lambda: ca.torch_stream(a.device), False),
        "device_targets": (lambda: lm._device_targets(t, ra), False),
        "topk_list": (lambda: getattr(lm, "_topk_cached", lm._topk_list)(TOPK, vocab), False),
        "row_metrics": (lambda: lm._row_metrics(fields, names, overlap, ks, (rows,)), False),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {rows}x{vocab} fp32, "
          f"medians of {args.repeat} calls, us")
    for name, (fn, sync) in parts.items():
        print(f"  {name:>18} {timed(fn, args.repeat, warmup=5, sync=sync) * 1e6:9.1f}")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.cprofile):
            lp.compare_logits(a, b, targets=t, topk=TOPK)
            torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
