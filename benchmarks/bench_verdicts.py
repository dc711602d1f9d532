"""Issue 9's measured table and benchmark: does the default verdict tell a
real bug from numerical noise?

On the default model (SmolLM2-135M-Instruct, fp32 reference, one torch
thread unless --threads), on a spread of the default prompts:

1. calibrate two noise floors: fp32 (batch size, torch threads, greedy vs
   score) and bf16 (the precision twin, scored on the reference's tokens);
2. capture candidates: every plant of logitparity.capture.plants in one
   decoder layer, free-running (compared teacher-forced past each split
   with the same candidate's score-mode dump) and teacher-forced, plus
   lossless changes (threads, batch size, prompt order), in fp32 and bf16;
3. print one row per candidate: plant, kind, layer, mode, mean KL, ratio to
   the floor with its 95% bootstrap interval, p-value, the default verdict,
   and the raw fp16-policy verdict beside it;
4. the two-sided perplexity gate on causal_leak (in layer 20 it lowers PPL);
5. costs: calibrate (captures + floor), and today's compare vs the
   statistical verdict on the same pairs, printed as a ratio (target <= 1.5x).

    python benchmarks/bench_verdicts.py --layer 10 --prompts 8 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--layer", type=int, default=10, help="decoder layer the plants sit in (default 10 of 30)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts, round-robin over categories (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the reference (default 1)")
    ap.add_argument("--ppl-layer", type=int, default=20,
                    help="layer of the perplexity-gate plants (default 20: there causal_leak lowers PPL)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 half")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity gate")
    ap.add_argument("--keep", default=None, help="keep the dumps in this directory")
    args = ap.parse_args()

    import torch

    from logitparity.capture import capture, load_model
    from logitparity.capture.plants import PLANTS, planted
    from logitparity.cli.demo import spread
    from logitparity.compare import compare_dumps
    from logitparity.floor import build_floor, write_floor
    from logitparity.prompts import load_prompts

    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-verdicts-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = spread(load_prompts(), args.prompts)
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    bs = 4  # the reference's batch size
    t_cal = 0.0

    def cap(lm, path, *, batch=bs, ps=None, score=False, threads=None):
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        try:
            if score:
                capture(lm, None, path, mode="score", reference_dump=ref, batch_size=batch, progress=False)
            else:
                capture(lm, ps or prompts, path, batch_size=batch, **kw)
        finally:
            torch.set_num_threads(args.threads)
        return path, time.perf_counter() - t0

    print(f"[bench] {len(prompts)} prompts x {args.max_new_tokens} new tokens, plants in layer {args.layer}, "
          f"torch threads {args.threads}; dumps in {work}", file=sys.stderr)
    lm = load_model(args.model)
    n_layers = len(lm.model.model.layers)
    ref, dt = cap(lm, work / "ref")
    t_cal += dt
    pairs32 = []
    for name, kwargs, change in (
        ("batch", dict(batch=1), f"batch size {bs} vs 1"),
        ("threads", dict(threads=args.threads + 1), f"torch threads {args.threads} vs {args.threads + 1}"),
        ("mode", dict(score=True), "greedy (KV cache) vs score (one forward pass)"),
    ):
        p, dt = cap(lm, work / f"floor-{name}", **kwargs)
        t_cal += dt
        pairs32.append((p, change))
    t0 = time.perf_counter()
    floor32 = write_floor(build_floor([(compare_dumps(ref, p, decode=None), ch) for p, ch in pairs32]),
                          work / "floor-fp32.json")
    t_cal += time.perf_counter() - t0

    cands: list[tuple[str, str, str, Path, Path | None, str]] = []  # (plant, kind, mode, dump, continuation, floor)

    def plants_in(model, dtype: str, floor: Path) -> None:
        for name, plant in PLANTS.items():
            with planted(model, name, layer=args.layer):
                fr, _ = cap(model, work / f"{dtype}-{name}", batch=1)
                tf, _ = cap(model, work / f"{dtype}-{name}-tf", batch=1, score=True)
            cands.append((f"{dtype} + {name}", plant.kind, "free-running", fr, tf, floor))
            cands.append((f"{dtype} + {name}", plant.kind, "teacher-forced", tf, None, floor))

    p, _ = cap(lm, work / "fp32-threads", batch=1, threads=args.threads + 1)
    cands.append(("fp32, torch threads +1, batch 1", "lossless", "free-running", p, None, floor32))
    p, _ = cap(lm, work / "fp32-batch2", batch=2)
    cands.append(("fp32, batch size 2", "lossless", "free-running", p, None, floor32))
    p, _ = cap(lm, work / "fp32-order", ps=prompts[::-1], batch=3)
    cands.append(("fp32, prompts reversed, batch 3", "lossless", "free-running", p, None, floor32))
    p, _ = cap(lm, work / "fp32-tf-batch1", batch=1, score=True)
    cands.append(("fp32, scored with batch 1", "lossless", "teacher-forced", p, None, floor32))
    plants_in(lm, "fp32", floor32)

    ppl_rows = []
    if not args.no_ppl:
        from logitparity.ppl import gate, perplexity

        base = work / "ppl-base"
        perplexity(lm, max_tokens=512, ctx=256, save_baseline=base, progress=False)
        for name in ("causal_leak", "down_proj_roll", "weights_cloned"):
            with planted(lm, name, layer=args.ppl_layer):
                r = perplexity(candidate=lm, baseline_cache=base, progress=False)
            ppl_rows.append((name, r, gate(r, max_ppl_change="1%", direction="both"),
                             gate(r, max_ppl_change="1%", direction="increase")))
    del lm

    if not args.no_bf16:
        lm16 = load_model(args.model, dtype="bf16")
        twin, dt = cap(lm16, work / "twin-bf16", score=True)
        t_cal16 = dt
        t0 = time.perf_counter()
        floor16 = write_floor(build_floor([(compare_dumps(ref, twin, decode=None),
                                            "precision twin: the reference model in bf16, scored")]),
                              work / "floor-bf16.json")
        t_cal16 += time.perf_counter() - t0
        p, _ = cap(lm16, work / "bf16-clean", batch=1)
        q, _ = cap(lm16, work / "bf16-clean-tf", batch=1, score=True)
        cands.append(("bf16, batch 1", "benign", "free-running", p, q, floor16))
        cands.append(("bf16, scored with batch 1", "benign", "teacher-forced", q, None, floor16))
        plants_in(lm16, "bf16", floor16)
        del lm16

    # ---- the table
    head = ("| candidate | kind | mode | mean KL (nats) | floor ratio | 95% CI | p | verdict | raw fp16 verdict |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = []
    t_old = t_new = 0.0
    for label, kind, mode, dump, cont, floor in cands:
        c = compare_dumps(ref, dump, noise_floor=floor, continuation=cont, decode=None)
        raw = compare_dumps(ref, dump, policy="fp16", decode=None)
        r = c.verdict.results[0]
        kl = float(c.tokens.kl_ref_cand.mean())
        mode_s = mode + (" (+ teacher-forced past the split)" if cont is not None else "")
        rows.append(f"| {label} | {kind} | {mode_s} | {kl:.3e} | {r.measured:.3g} | "
                    f"[{r.ci_low:.3g}, {r.ci_high:.3g}] | {r.p_value:.2g} | "
                    f"{'PASS' if c.verdict.passed else 'FAIL'} | {'PASS' if raw.verdict.passed else 'FAIL'} |")
        # cost: today's compare vs the statistical verdict, same pair, best of 3
        old = min(_time(lambda: compare_dumps(ref, dump, policy="fp16", decode=None)) for _ in range(3))
        new = min(_time(lambda: compare_dumps(ref, dump, noise_floor=floor, decode=None)) for _ in range(3))
        t_old += old
        t_new += new
    print(f"\n## Verdicts, plants in layer {args.layer} of {n_layers}, {len(prompts)} prompts x "
          f"{args.max_new_tokens} new tokens\n")
    print(f"fp32 floor: {floor32} (batch size, torch threads, greedy vs score)" +
          ("" if args.no_bf16 else f"; bf16 floor: {floor16} (precision twin)") + "\n")
    print(head)
    print("\n".join(rows))
    if ppl_rows:
        print(f"\n## Two-sided perplexity gate (plants in layer {args.ppl_layer}, 512 tokens, ctx 256, limit 1%)\n")
        print("| plant | PPL ref → cand | ΔPPL [95% CI] | --direction both | --direction increase |\n|---|---|---|---|---|")
        for name, r, both, inc in ppl_rows:
            lo, hi = r.pair.delta_ppl_ci95
            print(f"| {name} | {r.ref.ppl:.3f} → {r.cand.ppl:.3f} | {r.pair.delta_ppl:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                  f"{'PASS' if both.passed else 'FAIL'} | {'PASS' if inc.passed else 'FAIL'} |")
    print("\n## Cost\n")
    print(f"calibrate fp32 floor (reference + 3 benign captures + floor): {t_cal:.1f} s"
          + ("" if args.no_bf16 else f"; bf16 floor (twin + floor): {t_cal16:.1f} s"))
    print(f"compare over {len(cands)} candidates: today's (policy fp16) {t_old:.2f} s, statistical verdict "
          f"{t_new:.2f} s: ratio {t_new / t_old:.2f}x (target <= 1.5x)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
