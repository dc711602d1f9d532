"""Layer localization on the default model (SmolLM2-135M-Instruct, 30
decoder layers), one torch thread, in one run:

1. Every planted bug of ``logitparity.capture.plants`` in each of --layers:
   ``compare_layers(..., mode="isolated")`` must name the planted layer and
   submodule (the named path starts with the plant's module path). Lossless
   changes (weights_cloned, split_gate_up, rope_shift_both: q and k shifted
   alike keep every relative distance, 2 torch threads) must name none, and so must
   a clean bf16 candidate against the fp32 reference with a bf16 floor
   measured on other prompts (default prompts 8-11; compared on 0-3).
2. Activation capture of every decoder layer's output on the prefill of 16
   default prompts (``capture_activations``, rows and statistics) vs a plain
   capture of the same prompts (``capture``, max_new_tokens=1: the prefill
   and its logits), as a time ratio (target <= 3x), with the peak RSS after
   each.

    python benchmarks/bench_layers.py                   # the table and the ratio
    python benchmarks/bench_layers.py --layers 10 --skip-capture
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss_mib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="10,3,25", help="comma-separated layers to plant in (default 10,3,25)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts compared (default 4)")
    ap.add_argument("--capture-prompts", type=int, default=16, help="prompts of the capture benchmark (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="capture timings: best of N (default 3)")
    ap.add_argument("--skip-capture", action="store_true")
    ap.add_argument("--skip-plants", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import logitparity.layers as L
    from logitparity.capture import capture, load_model
    from logitparity.capture.hooks import capture_activations
    from logitparity.capture.plants import PLANTS, planted
    from logitparity.prompts import load_prompts

    lm = load_model(None)
    prompts = load_prompts()
    test = prompts[: args.prompts]
    ok_all = True
    if not args.skip_plants:
        layers = [int(x) for x in args.layers.split(",")]
        t0 = time.perf_counter()
        rt = L.trace_reference(lm, test)
        print(f"reference traced: {len(rt.paths)} modules x {len(test)} prompts "
              f"({sum(len(t) for t in rt.token_ids)} positions) in {time.perf_counter() - t0:.1f} s\n")
        print("| change | layer | expected | named (isolated) | rel L2 there / band | largest isolated rel L2 | correct |")
        print("|---|---|---|---|---|---|---|")

        def row(name, layer, expected, c):
            nonlocal ok_all
            named = c.first_divergent
            ok = (named is None) if expected is None else (named is not None and named.startswith(expected))
            # A named submodule must be exactly the plant's (mlp, not mlp of another layer).
            if expected is not None and named is not None:
                ok = ok and (named == expected or named.startswith(expected + "."))
            ok_all &= ok
            ratio = "—"
            if named is not None:
                m = c.module(named)
                ratio = f"{m.isolated.rel_l2:.3g} / {m.band.rel_l2:.3g}"
            top = max(c.modules, key=lambda m: m.isolated.rel_l2)
            largest = f"{top.isolated.rel_l2:.2g} ({top.path})" if top.isolated.rel_l2 > 0 else "0 (bitwise)"
            print(f"| {name} | {layer} | {expected or 'none'} | {named or 'none'} | {ratio} | {largest} | "
                  f"{'yes' if ok else '**NO**'} |", flush=True)

        t0 = time.perf_counter()
        n = 0
        for name, plant in PLANTS.items():
            for layer in layers:
                with planted(lm, name, layer=layer):
                    c = L.compare_layers(rt, lm)
                n += 1
                lossless = plant.kind == "benign"
                row(name, layer, None if lossless else plant.module_path(layer), c)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        row("torch threads 2 vs 1", "all", None, L.compare_layers(rt, lm))
        torch.set_num_threads(threads)
        n += 1
        per = (time.perf_counter() - t0) / n
        bf16 = load_model(None, dtype="bf16")
        floor_prompts = prompts[8:12]
        with tempfile.TemporaryDirectory() as tmp:
            f = L.save_floor(L.compare_layers(lm, bf16, floor_prompts), Path(tmp) / "bf16-floor.json",
                             description="bf16 twin on default prompts 8-11")
            c = L.compare_layers(lm, bf16, test, noise_floor=f)
        worst = max(c.modules, key=lambda m: m.isolated.rel_l2 / m.band.rel_l2)
        row(f"bf16 candidate, bf16 floor (worst: {worst.path} at "
            f"{worst.isolated.rel_l2 / worst.band.rel_l2:.2f} of its band)", "all", None, c)
        cd = L.compare_layers(lm, bf16, test)
        row("bf16 candidate, default bf16 band", "all", None, cd)
        print(f"\none isolated comparison: {per:.2f} s on average ({len(rt.paths)} modules, {len(test)} prompts)")
        print(f"all correct: {ok_all}")
        del bf16

    if not args.skip_capture and not args.skip_plants:
        # A fresh process, so that its peak RSS is the capture's (not the bf16 twin's above).
        import subprocess

        rc = subprocess.call([sys.executable, __file__, "--skip-plants", "--repeat", str(args.repeat),
                              "--capture-prompts", str(args.capture_prompts)])
        return 1 if not ok_all else rc
    if not args.skip_capture:
        caps = prompts[: args.capture_prompts]
        with tempfile.TemporaryDirectory() as tmp:
            # Warm-up (first-call allocations, tokenizer caches) outside the timings.
            capture(lm, caps[:2], Path(tmp) / "warm", max_new_tokens=1, progress=False)
            rss0 = peak_rss_mib()
            # Each timing is the best of --repeat runs: this machine is shared.
            plain = act = act_stats = float("inf")
            for i in range(args.repeat):
                t0 = time.perf_counter()
                d = capture(lm, caps, Path(tmp) / f"plain{i}", max_new_tokens=1, progress=False)
                plain = min(plain, time.perf_counter() - t0)
            rss1 = peak_rss_mib()
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                capture_activations(lm, d, modules="layers", storage="rows", budget_mb=256)
                act = min(act, time.perf_counter() - t0)
            rss2 = peak_rss_mib()
            rows_mb = sum(p.stat().st_size for p in (Path(d) / "activations").glob("act-*.safetensors")) / 1e6
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                capture_activations(lm, d, modules="layers", storage="stats")
                act_stats = min(act_stats, time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in (Path(d) / "activations").iterdir())
        print(f"\ncapture benchmark: {len(caps)} default prompts, prefill, every decoder layer's output (30 modules)")
        print(f"plain capture (max_new_tokens=1): {plain:.2f} s (best of {args.repeat}); activation capture, rows + statistics: "
              f"{act:.2f} s ({act / plain:.2f}x); statistics only: {act_stats:.2f} s ({act_stats / plain:.2f}x); "
              f"target <= 3x")
        print(f"peak RSS (this process: the fp32 model, then both captures): {rss0:.0f} MiB after loading and a "
              f"warm-up, {rss1:.0f} MiB after the plain capture, {rss2:.0f} MiB after the activation capture "
              f"(rows: {rows_mb:.1f} MB of activation rows written); activations part, stats only: {size / 1e6:.2f} MB")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
