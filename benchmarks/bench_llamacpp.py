#!/usr/bin/env python3
"""HF fp32 against llama.cpp on the same GGUF: the cross-engine report, the
llama.cpp engine's own noise, and perplexity on llama-perplexity's windows.

    python benchmarks/bench_llamacpp.py [--limit 18] [--max-new-tokens 32] [--ctx 256 --chunks 16]
        [--threads 1] [--flash-attn] [--out out/bench-llamacpp]

Prints, measured in one run:

1. free-running: HF fp32 greedy (the de-quantized conversion of the default
   Q4_1 GGUF) vs llama.cpp greedy on the GGUF: greedy match at 10, splits
   (near-tie vs real), and teacher-forced (llama.cpp scored on HF's tokens):
   mean KL, same top-1;
2. llama.cpp's own noise: its greedy rows vs its score-mode rows on the same
   tokens (token-by-token decode with a KV cache vs one batched pass);
3. perplexity with --windows llama.cpp (ctx, ctx/2 scored), llama.cpp vs HF
   on the same tokens, and llama-perplexity's --kl-divergence arithmetic
   reproduced (its 16-bit log-prob storage of the base, its statistics)
   beside ours, for HF fp32 as base and llama.cpp as Q.

No llama-perplexity binary is built by the llama-cpp-python wheel, so 3
reproduces its arithmetic through the library (ppl.plan_chunks + the engine's
score, which feeds a chunk as llama-perplexity does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def llama_perplexity_kld(base: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """llama-perplexity --kl-divergence statistics of Q = cand rows against a
    base stored as llama-perplexity stores it (log-probs quantized to 16 bits
    over [max - 16, max], tools/perplexity/perplexity.cpp log_softmax and its
    KL loop, float32 where it uses float), over rows [n, V] and the tokens
    they predict."""
    kld, pd, nll, nllb, same = [], [], [], [], 0
    for a, b, t in zip(base.astype(np.float32), cand.astype(np.float32), targets):
        # the base file: scale, min_log_prob and uint16 codes
        mx, mn = np.float32(a.max()), np.float32(max(a.min(), a.max() - 16))
        lse_a = np.float32(math.log(np.exp((a - mx).astype(np.float32)).astype(np.float64).sum()))
        min_lp = np.float32(mn - mx - lse_a)
        scale = np.float32((mx - mn) / np.float32(65535))
        codes = np.where(a > mn, np.floor((a - mn) / scale + np.float32(0.5)), 0).astype(np.float64) if scale else \
            np.zeros_like(a, np.float64)
        lp_base = (np.float32(scale) * codes.astype(np.float32) + min_lp).astype(np.float32)
        # the candidate
        mb = np.float32(b.max())
        lse_b = np.float32(math.log(np.exp((b - mb).astype(np.float32)).astype(np.float64).sum()))
        n = np.float32(mb + lse_b - b[t])
        keep = lp_base > -16
        p = np.exp(lp_base[keep].astype(np.float64))
        kld.append(float(np.sum(p * (lp_base[keep] - b[keep] + (mb + lse_b)))))
        nb = -lp_base[t]
        nll.append(float(n))
        nllb.append(float(nb))
        pd.append(float(np.exp(np.float32(-n)) - np.exp(np.float32(-nb))))
        same += int(np.argmax(b) == np.argmax(lp_base))
    kld, pd = np.sort(np.array(kld)), np.sort(np.array(pd))
    count = kld.size

    def mean_unc(x: np.ndarray) -> tuple[float, float]:
        f = x.mean()
        df = (x * x).mean() - f * f
        return float(f), float(math.sqrt(df / (count - 1))) if df > 0 and count > 10 else 0.0

    def pct(v: np.ndarray, f: float) -> float:
        p = f * (v.size - 1)
        i = int(p)
        p -= i
        return float((1 - p) * v[i] + p * v[min(i + 1, v.size - 1)])

    median = float(0.5 * (kld[count // 2] + kld[count // 2 - 1]) if count % 2 == 0 else kld[count // 2])
    mse = mean_unc(pd * pd)
    same_p = same / count
    lq, lb = mean_unc(np.array(nll)), mean_unc(np.array(nllb))
    return {
        "count": count, "ppl_q": math.exp(lq[0]), "ppl_base": math.exp(lb[0]),
        "mean_kld": mean_unc(kld)[0], "mean_kld_unc": mean_unc(kld)[1], "median_kld": median,
        "p90_kld": pct(kld, 0.9), "p95_kld": pct(kld, 0.95), "p99_kld": pct(kld, 0.99), "p999_kld": pct(kld, 0.999),
        "max_kld": float(kld[-1]), "mean_dp": mean_unc(pd)[0], "rms_dp": math.sqrt(mse[0]),
        "same_top_p": same_p, "same_top_p_unc": math.sqrt(same_p * (1 - same_p) / (count - 1)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=18, help="prompts (round-robin over categories, as the demo)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256, help="llama.cpp chunk size for the perplexity part")
    ap.add_argument("--chunks", type=int, default=16, help="chunks of the bundled text scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (llama-perplexity's default)")
    ap.add_argument("--out", default="out/bench-llamacpp")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from logitparity.capture import capture, load_model
    from logitparity.capture.llamacpp import LlamaCppEngine
    from logitparity.cli.demo import spread
    from logitparity.compare import compare_dumps
    from logitparity.ppl import perplexity, plan_chunks
    from logitparity.prompts import load_prompts

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; pass another --out")
    prompts = spread(load_prompts(), args.limit)
    t0 = time.perf_counter()
    lm = load_model(None)
    eng = LlamaCppEngine(None, n_threads=args.threads, flash_attn=args.flash_attn, n_ctx=max(2048, args.ctx))
    ref, lg, ls_ref, ls_own = (out / n for n in ("hf-fp32", "llama-greedy", "llama-score-hf", "llama-score-own"))
    capture(lm, prompts, ref, max_new_tokens=args.max_new_tokens, batch_size=4, progress=False)
    t1 = time.perf_counter()
    capture(eng, prompts, lg, max_new_tokens=args.max_new_tokens, batch_size=1, progress=False)
    t2 = time.perf_counter()
    capture(eng, None, ls_ref, mode="score", reference_dump=ref, batch_size=1, progress=False)
    capture(eng, None, ls_own, mode="score", reference_dump=lg, batch_size=1, progress=False)
    free = compare_dumps(ref, lg, policy="quantized")
    tf = compare_dumps(ref, ls_ref, policy="quantized")
    self_noise = compare_dumps(lg, ls_own, policy="quantized")
    splits = [p.split for p in free.prompts if p.split]
    print(f"# cross-engine: HF fp32 vs llama.cpp {eng.dtype}, {len(prompts)} prompts x {args.max_new_tokens} tokens")
    print(f"HF capture {t1 - t0:.1f} s (model load included), llama.cpp greedy {t2 - t1:.1f} s")
    print(f"free-running verdict ({free.policy.name}): {'PASS' if free.verdict.passed else 'FAIL'}")
    for n in (10, 32):
        print(f"greedy match at {n}: {free.greedy_match(n)}")
    print(f"splits: {len(splits)} ({splits.count('near-tie')} near-tie, {splits.count('real')} real, "
          f"{splits.count('length')} length); margins at split (HF): "
          f"{sorted(round(p.margin_ref_at_split, 3) for p in free.prompts if p.split in ('near-tie', 'real'))}")
    for label, c in (("teacher-forced llama.cpp on HF tokens", tf), ("llama.cpp greedy vs its own score", self_noise)):
        kl = c.tokens.kl_ref_cand
        print(f"{label}: {len(kl)} positions, mean KL {kl.mean():.4g} ± {kl.std(ddof=1) / math.sqrt(len(kl)):.2g}, "
              f"median {np.median(kl):.3g}, p99 {np.percentile(kl, 99):.3g}, max {kl.max():.3g}, "
              f"same top-1 {c.same_top1()}; verdict ({c.policy.name}) {'PASS' if c.verdict.passed else 'FAIL'}")

    # perplexity on llama-perplexity's windows
    max_tokens = args.chunks * args.ctx - (1 if eng.add_bos else 0)
    t3 = time.perf_counter()
    res = perplexity(eng, candidate=lm, windows="llama.cpp", ctx=args.ctx, max_tokens=max_tokens, progress=False)
    t4 = time.perf_counter()
    print(f"\n# perplexity, --windows llama.cpp, ctx {args.ctx}, {res.settings['windows']} chunks, "
          f"{res.settings['scored']} scored tokens, BOS {res.settings['bos_token_id']}, "
          f"flash_attn {args.flash_attn} ({t4 - t3:.1f} s)")
    print(f"llama.cpp {eng.dtype}: PPL {res.ref.ppl:.4f} ± {res.ref.ppl_se:.4f}; HF fp32: PPL {res.cand.ppl:.4f} "
          f"± {res.cand.ppl_se:.4f}; ratio HF/llama.cpp {res.pair.ppl_ratio:.5f} ± {res.pair.ppl_ratio_se:.5f}")
    # both tools' KLD figures, base = HF fp32, Q = llama.cpp (rows recomputed, same windows)
    from logitparity.metrics import compare_logits
    from logitparity.ppl import _tokenize

    ids, _ = _tokenize(eng.tokenizer, (Path(__file__).parents[1] / "python/logitparity/data/pride_and_prejudice.txt")
                       .read_text(encoding="utf-8"), max_tokens)
    wins = plan_chunks(int(ids.size), args.ctx, eng.add_bos)
    from logitparity.capture.engine import HFEngine

    hf = HFEngine(lm)
    head = [eng.bos_token_id] if eng.add_bos else []
    P, Q, T = [], [], []
    for w in wins:
        prompt, cont = head + ids[w.begin:w.first].tolist(), ids[w.first:w.end].tolist()
        P.append(hf.score([prompt], [cont])[0].float().numpy())
        Q.append(eng.score([prompt], [cont])[0])
        T.append(np.asarray(cont))
    P, Q, T = np.concatenate(P), np.concatenate(Q), np.concatenate(T)
    ours = compare_logits(P, Q, targets=T, topk=(1,), js=False)
    theirs = llama_perplexity_kld(P, Q, T)
    kl = ours.kl_ref_cand
    dp = np.exp(-ours.nll_cand) - np.exp(-ours.nll_ref)
    rows = [
        ("PPL(Q) (llama.cpp)", f"{math.exp(ours.nll_cand.mean()):.4f}", f"{theirs['ppl_q']:.4f}"),
        ("PPL(base) (HF fp32)", f"{math.exp(ours.nll_ref.mean()):.4f}", f"{theirs['ppl_base']:.4f}"),
        ("mean KLD", f"{kl.mean():.6f}", f"{theirs['mean_kld']:.6f}"),
        ("median KLD", f"{np.median(kl):.6f}", f"{theirs['median_kld']:.6f}"),
        ("p90 KLD", f"{np.percentile(kl, 90):.6f}", f"{theirs['p90_kld']:.6f}"),
        ("p99 KLD", f"{np.percentile(kl, 99):.6f}", f"{theirs['p99_kld']:.6f}"),
        ("max KLD", f"{kl.max():.6f}", f"{theirs['max_kld']:.6f}"),
        ("mean Δp", f"{100 * dp.mean():.3f}%", f"{100 * theirs['mean_dp']:.3f}%"),
        ("RMS Δp", f"{100 * math.sqrt((dp * dp).mean()):.3f}%", f"{100 * theirs['rms_dp']:.3f}%"),
        ("same top p", f"{100 * (ours.argmax_ref == ours.argmax_cand).mean():.3f}%",
         f"{100 * theirs['same_top_p']:.3f}%"),
    ]
    print(f"\n| figure ({len(T)} tokens) | logitparity (exact, float64) | llama-perplexity arithmetic (16-bit base) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    (out / "summary.json").write_text(json.dumps({"llama_perplexity": theirs, "ppl": res.to_dict()}, indent=1,
                                                 default=float))
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
