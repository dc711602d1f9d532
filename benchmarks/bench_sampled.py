"""Sampling done right, measured: the sampled comparison (logitparity.sampling)
of the default model's fp32 reference against a bf16 candidate (benign) and
an fp32 candidate with a planted bug, at temperature T and top-p P over
several seeds, each side scored on the other's samples.

Prints one row per candidate: sampled match at 10, the sampled-from JS and
KL along both paths, impossible draws, the length / token-frequency /
stop-reason tests, and the verdict of the built-in ``sampled`` policy; then
the time of each step.

    python benchmarks/bench_sampled.py --prompts 8 --max-new-tokens 24 --seeds 0-3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts, round-robin over categories (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seeds", default="0-3", help="seeds (default 0-3)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--plant", default="down_proj_roll", help="the bug of the second candidate (default down_proj_roll)")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--keep", default=None, help="keep the dumps in this directory")
    ap.add_argument("--compare-only", action="store_true", help="reuse the dumps in --keep; only compare")
    args = ap.parse_args()

    import torch

    from logitparity.capture import load_model
    from logitparity.capture.plants import planted
    from logitparity.capture.seeds import capture_samples, parse_seeds, score_samples
    from logitparity.cli.demo import spread
    from logitparity.prompts import load_prompts
    from logitparity.sampling import compare_sampled

    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-sampled-"))
    prompts = spread(load_prompts(), args.prompts)
    seeds = parse_seeds(args.seeds)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=4,
              progress=False)
    times: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        times[name] = time.perf_counter() - t0
        return out

    print(f"[bench] {len(prompts)} prompts x {args.max_new_tokens} tokens, seeds {seeds}, T={args.temperature}, "
          f"top-p {args.top_p}; dumps in {work}", file=sys.stderr)
    ref, cand, bug = work / "ref", work / "bf16", work / "bug"
    if not args.compare_only:
        ref_lm = load_model(None)
        ref = timed("sample fp32 reference", capture_samples, ref_lm, prompts, work / "ref", seeds=seeds, **kw)
        bf = load_model(None, dtype="bf16")
        cand = timed("sample bf16 candidate", capture_samples, bf, prompts, work / "bf16", seeds=seeds, **kw)
        timed("score bf16 on the reference's samples", score_samples, bf, ref, work / "bf16-on-ref", batch_size=4,
              progress=False)
        del bf
        timed("score fp32 on the bf16 samples", score_samples, ref_lm, cand, work / "ref-on-bf16", batch_size=4,
              progress=False)
        with planted(ref_lm, args.plant, layer=args.layer):
            bug = timed(f"sample fp32 + {args.plant}", capture_samples, ref_lm, prompts, work / "bug", seeds=seeds, **kw)
            timed(f"score fp32 + {args.plant} on the reference's samples", score_samples, ref_lm, ref,
                  work / "bug-on-ref", batch_size=4, progress=False)
        timed(f"score fp32 on the {args.plant} samples", score_samples, ref_lm, bug, work / "ref-on-bug", batch_size=4,
              progress=False)
    rows = []
    for name, c, cor, roc in (("bf16 (benign)", cand, "bf16-on-ref", "ref-on-bf16"),
                              (f"fp32 + {args.plant} (layer {args.layer})", bug, "bug-on-ref", "ref-on-bug")):
        t0 = time.perf_counter()
        sc = compare_sampled(ref, c, cand_on_ref=work / cor, ref_on_cand=work / roc)
        times[f"compare {name}"] = time.perf_counter() - t0
        rows.append((name, sc))
    print("| candidate | sampled match at 10 | JS ref path | JS cand path | KL(ref ‖ cand) ref path (+inf) | "
          "raw KL ref path | impossible draws | length p | token-freq JS (p) | stop-reason p | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, sc in rows:
        from logitparity.stats import describe

        def f(field, path, raw=False):
            d = describe(sc.token_values(field, sc.path_mask(path), raw=raw))
            return f"{d.mean:.3e}" + (f" (+{d.n_inf})" if d.n_inf else "")
        tf = sc.drift.test("token_frequency")
        print(f"| {name} | {sc.sampled_match(10)} | {f('js', 'reference')} | {f('js', 'candidate')} | "
              f"{f('kl_ref_cand', 'reference')} | {f('kl_ref_cand', 'reference', True)} | "
              f"{sc.impossible_draws('reference')} | {sc.metric('length_p')[0]:.3g} | "
              f"{tf.statistic:.3e} ({tf.p_value:.3g}) | {sc.metric('stop_reason_p')[0]:.3g} | "
              f"{'PASS' if sc.verdict.passed else 'FAIL'} |")
    print()
    for k, v in times.items():
        print(f"{k}: {v:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
