"""Scale-out on one host: a one-process capture and comparison against the
same under ``torchrun --nproc-per-node N`` (docs/distributed.md), with the
identity checks (the merged dump's records and every row bitwise equal to
the one-process dump; the split comparison's JSON report byte-identical).

Prints wall times (whole commands, start-up and model load included, and the
capture's own ``run.wall_s``) and their ratios, measured in one run.

    python benchmarks/bench_distributed.py                          # CPU: 2 ranks, 1 torch thread each
    python benchmarks/bench_distributed.py --device cuda --nproc 2,4,8 --prompts 256 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prompts_file(path: Path, n: int) -> Path:
    from logitparity.prompts import load_prompts

    base = load_prompts()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            p = base[i % len(base)]
            p = dataclasses.replace(p, id=p.id if i < len(base) else f"{p.id}#{i // len(base)}")
            f.write(json.dumps({"id": p.id, "category": p.category, "text": p.text}) + "\n")
    return path


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def same_content(a_path: Path, b_path: Path) -> bool:
    from logitparity import load_dump

    a, b = load_dump(a_path), load_dump(b_path)
    if a.ids != b.ids:
        return False
    own = ("shard", "tensors", "timing")
    for pid in a.ids:
        ra, rb = a.record(pid), b.record(pid)
        if {k: v for k, v in ra.items() if k not in own} != {k: v for k, v in rb.items() if k not in own}:
            return False
        x, y = a.logits(pid), b.logits(pid)
        if x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=18, help="prompts (the default set, cycled)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (rank r on cuda:r; the one process on cuda:0)")
    ap.add_argument("--nproc", default="2", help="comma-separated rank counts to run (e.g. 2,4,8)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (CPU)")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(args.torch_threads), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    pf = prompts_file(tmp / "prompts.jsonl", args.prompts)
    common = ["--prompts", str(pf), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
              str(args.batch_size), "--dtype", args.dtype, "--no-progress", "--torch-threads", str(args.torch_threads)]
    if args.model:
        common += ["--model", args.model]
    one_dev = "cuda:0" if args.device == "cuda" else args.device
    py = [sys.executable, "-m", "logitparity"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

    from logitparity import load_dump

    one = tmp / "one"
    t1 = timed([*py, "dump", *common, "--device", one_dev, "--out", str(one)], env)
    inner1 = load_dump(one).manifest["run"]["wall_s"]
    cand = tmp / "cand"
    timed([*py, "dump", *common, "--device", one_dev, "--out", str(cand), "--logits-dtype", "bf16"], env)
    tc1 = timed([*py, "compare", str(one), str(cand), "--json", str(tmp / "one.json")], env)
    tokens = load_dump(one).manifest["run"]["tokens"]
    print(f"device {args.device}, {args.prompts} prompts x {args.max_new_tokens} new tokens ({tokens} tokens), "
          f"batch {args.batch_size}, {args.dtype}, {args.torch_threads} torch thread(s) per process")
    print(f"| ranks | dump command s | capture run.wall_s | tok/s (capture) | speed-up (command, capture) | "
          f"merged == one process | compare command s | report identical |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 | {t1:.1f} | {inner1:.2f} | {tokens / inner1:.1f} | 1.00, 1.00 | - | {tc1:.1f} | - |")
    for n in (int(x) for x in args.nproc.split(",")):
        out = tmp / f"ranks{n}"
        tn = timed([*run, f"--nproc-per-node={n}", "-m", "logitparity", "dump", *common, "--device", args.device,
                    "--out", str(out)], env)
        inner = load_dump(out).manifest["run"]["wall_s"]
        same = same_content(one, out)
        tcn = timed([*run, f"--nproc-per-node={n}", "-m", "logitparity", "compare", str(one), str(cand), "--json",
                     str(tmp / f"ranks{n}.json")], env)
        rep = (tmp / f"ranks{n}.json").read_bytes() == (tmp / "one.json").read_bytes()
        print(f"| {n} | {tn:.1f} | {inner:.2f} | {tokens / inner:.1f} | {t1 / tn:.2f}, {inner1 / inner:.2f} | "
              f"{'yes (bitwise)' if same else 'NO'} | {tcn:.1f} | {'yes' if rep else 'NO'} |")
    print(f"(work files in {tmp})")


if __name__ == "__main__":
    main()
