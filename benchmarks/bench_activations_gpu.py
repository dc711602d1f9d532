"""GPU throughput of the activation statistics on CUDA tensors: the core's
CUDA kernels read in place (`_core.activation_diff_cuda`,
`DistributionAccumulator.add_cuda`) against the host path that compare_layers
and ActivationWriter took before (copy to the host, then the CPU kernel on
--threads threads) and against the difference figures written the natural
way in torch (float64, eager and under torch.compile), on the same tensors
in one run. Also checks that the GPU figures equal the CPU kernel's (sums to
1e-12 relative, counts and max |diff| exactly).

Prints elements/s, the effective read rate (both tensors once) and the
ratios. Times are medians of wall-clock calls after warm-up, each ending in
torch.cuda.synchronize().

    python benchmarks/bench_activations_gpu.py                # 2048x4096 and 512x576, fp32 and bf16
    python benchmarks/bench_activations_gpu.py --shapes 4096x8192 --repeat 50
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from logitparity import _core
from logitparity.capture.hooks import to_numpy_rows

from bench_gpu import bandwidth_probe, timed

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def natural(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cosine, relative L2, max |b - a| and SQNR over the entries finite on
    both sides, in float64 (what activation_diff reports)."""
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
    d = b - a
    dot, ra, rb, dd = (a * b).sum(), (a * a).sum(), (b * b).sum(), (d * d).sum()
    return torch.stack([dot / (ra * rb).sqrt(), (dd / ra).sqrt(), d.abs().max(),
                        10 * torch.log10(ra / dd)])


def run(rows: int, width: int, dtype: torch.dtype, repeat: int, threads: int, impls: list[str]):
    g = torch.Generator(device="cuda").manual_seed(rows + width)
    a = (torch.randn(rows, width, generator=g, device="cuda") * 3.0).to(dtype)
    b = (a.float() + 0.01 * torch.randn(rows, width, generator=g, device="cuda")).to(dtype)
    stream = torch.cuda.current_stream().cuda_stream
    code = CODES[dtype]

    def ours():
        return _core.activation_diff_cuda(a.data_ptr(), code, width, b.data_ptr(), code, width, rows,
                                          width, stream)

    def host():
        x, xb = to_numpy_rows(a)
        y, yb = to_numpy_rows(b)
        return _core.activation_diff(x, xb, y, yb, threads)

    # The figures agree before anything is timed.
    got_rows, got = ours()
    want_rows, want = host()
    names = list(_core.DIFF_FIELDS)
    exact = [names.index(f) for f in ("max_abs", "nonfinite_ref", "nonfinite_cand", "count")]
    np.testing.assert_array_equal(got_rows[:, exact], want_rows[:, exact])
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)

    out = {"shape": f"{rows}x{width}", "dtype": str(dtype).split(".")[-1], "elements_per_s": {}}
    fns = {"ours (diff)": ours, "host path (diff)": host}
    if "eager" in impls:
        fns["torch eager (diff)"] = lambda: natural(a, b)
    if "compile" in impls:
        compiled = torch.compile(natural)
        compiled(a, b)
        fns["torch.compile (diff)"] = lambda: compiled(a, b)
    acc = _core.DistributionAccumulator(width)
    fns["ours (distribution)"] = lambda: acc.add_cuda(a.data_ptr(), code, width, rows, width, stream)
    host_acc = _core.DistributionAccumulator(width)

    def host_dist():
        x, xb = to_numpy_rows(a)
        host_acc.add(x, xb)

    fns["host path (distribution)"] = host_dist
    for name, fn in fns.items():
        out["elements_per_s"][name] = rows * width / timed(fn, repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x4096,512x576")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of the host path (0: all)")
    ap.add_argument("--impls", default="eager,compile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = bandwidth_probe()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; HBM read probe: {bw / 1e12:.2f} TB/s")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    runs = []
    for shape in args.shapes.split(","):
        rows, width = (int(v) for v in shape.split("x"))
        for dn in args.dtypes.split(","):
            r = run(rows, width, dtypes[dn], args.repeat, args.threads, args.impls.split(","))
            runs.append(r)
            item = 4 if dn == "fp32" else 2
            e = r["elements_per_s"]
            for name, v in e.items():
                dist = "distribution" in name
                host = e["host path (distribution)" if dist else "host path (diff)"]
                read = v * item * (1 if dist else 2)  # bytes/s: the tensor(s) read once
                print(f"{shape:>11} {dn:>5} {name:>26} {v / 1e9:8.2f} G elem/s "
                      f"{read / 1e12:6.3f} TB/s ({100 * read / bw:3.0f}%)  /host path {v / host:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth_Bps": bw, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
