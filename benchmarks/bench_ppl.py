"""Scoring speed of ``logitparity ppl`` on the default model (CPU): scored
tokens per second, split into model forward time (transformers, including
moving the kept logit rows to the host) and metric time (the C++ core: NLL,
or the fused pair kernel with KL both ways, plus gathering). Target: the
metric part <= 5% of forward + metric.

Two runs on the bundled corpus: the reference alone, and reference +
candidate (the same model loaded twice, so both forward passes run and the
pair kernel compares full 49152-token rows).

    python benchmarks/bench_ppl.py                       # ctx 512, stride 256, 2048 tokens
    python benchmarks/bench_ppl.py --max-tokens 512 --ctx 256 --stride 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from logitparity.capture.hf import load_model
    from logitparity.ppl import perplexity

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    ref = load_model(None)
    rows = []
    for mode in ("reference", "reference + candidate"):
        cand = load_model(None) if mode != "reference" else None
        r = perplexity(ref, candidate=cand, ctx=args.ctx, stride=args.stride, max_tokens=args.max_tokens,
                       batch_size=args.batch_size, bootstrap=0, progress=False)
        t = r.timing
        work = t["forward_s"] + t["metric_s"]
        rows.append({
            "mode": mode, "scored_tokens": r.settings["scored"], "windows": r.settings["windows"],
            "forward_s": t["forward_s"], "metric_s": t["metric_s"],
            "metric_share": t["metric_s"] / work, "tokens_per_s": r.settings["scored"] / work,
            "ppl": r.ref.ppl,
        })
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--json", help="write the rows as JSON")
    args = p.parse_args()
    rows = run(args)
    import torch

    print(f"default model, CPU ({platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}), ctx {args.ctx}, stride {args.stride}, batch {args.batch_size}")
    print("| mode | tokens | forward s | metric s | metric share | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['scored_tokens']} | {r['forward_s']:.2f} | {r['metric_s']:.3f} | "
              f"{100 * r['metric_share']:.2f}% | {r['tokens_per_s']:.0f} |")
    ok = all(r["metric_share"] <= 0.05 for r in rows)
    print(f"metric share <= 5%: {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
