"""The call that docs/gpu.md profiles: compare_logits twice on 512x151936
CUDA tensors, a = randn * 2.5 + 4 and b = a + s randn with CUDA targets, for
ncu with --launch-skip 1 --launch-count 1 (the second call's kernel). Kinds:
near (fp32, s = 0.05: every |e| below 1/2, the default), far (fp32, s = 0.5:
about a third of the tokens beyond 1/2, so nearly every group takes the
kernel's far path) and bf16 (near, both rows rounded to bfloat16); --js adds the
Jensen-Shannon sweep; --shape RxV other rows (the fixed cost per block in
docs/gpu.md is fitted from the same element count as 256x303872 ...
4096x18992).

    ncu --set full --import-source yes --clock-control none -k regex:CompareRows \\
        --launch-skip 1 --launch-count 1 -o prof python3 benchmarks/prof_gpu.py [--kind far]
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv
    python3 benchmarks/ncu_regions.py source.csv
"""

import argparse

import torch

import logitparity as lp

KINDS = ("near", "far", "bf16")
# Field means to 12 digits: two builds of the kernel are compared by them
# (benchmarks/device_ab.sh, benchmarks/kernel_sweep.py).
FIELDS = ("kl_ref_cand", "kl_cand_ref", "entropy_ref", "cosine", "max_abs_logit", "nll_ref")


def inputs(kind: str, rows: int, vocab: int):
    """The rows of a kind (the module docstring) on the GPU, and targets."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(rows, vocab, generator=g, device="cuda") * 2.5 + 4.0
    b = a + (0.5 if kind == "far" else 0.05) * torch.randn(rows, vocab, generator=g, device="cuda")
    if kind == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    t = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    return a, b, t


def field_means(m, js: bool = False) -> str:
    fields = FIELDS + (("js",) if js else ())
    return ", ".join(f"{f} {float(getattr(m, f).mean()):.12g}" for f in fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, default="near")
    ap.add_argument("--js", action="store_true", help="also the Jensen-Shannon sweep")
    ap.add_argument("--shape", default="512x151936", help="rows x vocab (default 512x151936)")
    args = ap.parse_args()
    try:
        rows, vocab = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape: expected ROWSxVOCAB such as 512x151936, got {args.shape!r}")
    a, b, t = inputs(args.kind, rows, vocab)
    for _ in range(2):
        m = lp.compare_logits(a, b, targets=t, js=args.js)
    torch.cuda.synchronize()
    print(f"{args.kind}: " + field_means(m, args.js))


if __name__ == "__main__":
    main()
