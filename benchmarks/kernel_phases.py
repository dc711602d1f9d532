"""Where a row kernel's time goes, phase by phase, from a timing build.

A build with -DLOGITPARITY_CUDA_PHASES=N (benchmarks/device_ab.sh:
VARIANTS="ph:-DLOGITPARITY_CUDA_PHASES=16") makes thread 0 of every N-th block
print its start and end (%globaltimer, ns) and the SM clock (clock64) at each
phase of the row. This runs benchmarks/prof_gpu.py with such a build (two
calls; the second is read), and prints the kernel's span over all blocks, the
spread of the blocks' starts and ends, and the median time of each phase
over the blocks (each block's cycles turned into time by its own clock rate:
its cycles over its nanoseconds).

    PYTHONPATH=/tmp/ab-py-ph python3 benchmarks/kernel_phases.py --kind near --shape 512x151936

Phases, in the kernel's order (thread 0's view, after the barriers named):
  first    the pipeline's first copies and the first chunk's maxima
  sweep0   warp 0's main loop
  wait     from warp 0's end of the loop to the last warp's
  kth      the k-th of the threads' maxima (BlockKth: a sort per warp, ranks)
  flag     the threads that hold top-k candidates listed (a barrier)
  rescan   their groups read again and offered (RescanTopK)
  merge    the warps' lists compacted and merged (MergeTopLists)
  reduce   the row maxima, the rescale, the sums' block reductions
  end      js, the top-1 rank, the overlaps, the fields (thread 0)
Results of a timing build are right; its times include the stamps (a few
instructions each) and printf at the end, which is slow and delays the
blocks that are still running (with N = 1 the 512-row kernel took 1.27 ms
instead of 0.24; N = 16 keeps that small).
"""

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

PHASES = ("first", "sweep0", "wait", "kth", "flag", "rescan", "merge", "reduce", "end")


def parse(lines: list[str]) -> list[list[int]]:
    recs = [list(map(int, ln.split()[1:])) for ln in lines if ln.startswith("phases ")]
    if not recs or len(recs) % 2:
        raise SystemExit(
            f"expected the same number of 'phases' lines from each of the two calls, got "
            f"{len(recs)} in all: is the module a -DLOGITPARITY_CUDA_PHASES=N build?"
        )
    return recs[len(recs) // 2:]  # the second call's (printf's buffer flushes at each sync)


def summarize(recs: list[list[int]]) -> str:
    starts = [r[1] for r in recs]
    ends = [r[2] for r in recs]
    t0 = min(starts)
    out = [
        f"blocks {len(recs)}: span {(max(ends) - t0) / 1e3:.1f} us, starts spread "
        f"{(max(starts) - t0) / 1e3:.1f} us, ends from {(min(ends) - t0) / 1e3:.1f} to "
        f"{(max(ends) - t0) / 1e3:.1f} us"
    ]
    per_phase = {p: [] for p in PHASES}
    block_us = []
    for r in recs:
        cyc = r[3:]  # first, loop0, looplast, kth, flag, rescan, merge, reduce, end (from start)
        ns = r[2] - r[1]
        rate = cyc[-1] / ns if ns > 0 else 1.0  # cycles per ns
        prev = 0
        for name, c in zip(PHASES, cyc):
            per_phase[name].append((c - prev) / rate / 1e3)
            prev = c
        block_us.append(ns / 1e3)
    out.append(f"block time: median {statistics.median(block_us):.1f} us")
    out.append("phase    median us   p90 us")
    for name in PHASES:
        v = sorted(per_phase[name])
        out.append(f"{name:8s} {statistics.median(v):9.2f} {v[int(0.9 * (len(v) - 1))]:8.2f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="near", help="prof_gpu.py's kind (near, far, bf16)")
    ap.add_argument("--shape", default="512x151936", help="rows x vocab (default 512x151936)")
    ap.add_argument("--js", action="store_true")
    args = ap.parse_args()
    cmd = [sys.executable, str(Path(__file__).with_name("prof_gpu.py")), "--kind", args.kind,
           "--shape", args.shape] + (["--js"] if args.js else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"prof_gpu.py failed ({run.returncode}):\n{run.stderr[-2000:]}")
    lines = run.stdout.splitlines()
    print(f"{args.kind} {args.shape}{' js' if args.js else ''}: " + next(
        (ln for ln in lines if ln.startswith(args.kind + ":")), "(no field means)"))
    print(summarize(parse(lines)))


if __name__ == "__main__":
    main()
