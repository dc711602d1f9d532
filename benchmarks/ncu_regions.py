"""Where a kernel's instructions and stall samples go, from ncu's source view
exported as CSV (`ncu -i REP --page source --csv --print-source sass`): the
straight-line runs of SASS (equal execution counts) ranked by stall samples,
each with its share of executed instructions and samples, and the stall
reasons over the whole kernel. Used for the step table of docs/gpu.md.

    python3 benchmarks/ncu_regions.py source.csv [--top 25]
"""

from __future__ import annotations

import argparse
import csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    hdr, data = rows[1], rows[2:]  # row 0 names the kernel
    ix = {h: i for i, h in enumerate(hdr)}
    base = int(data[0][0], 16)
    ex = [int(r[ix["Instructions Executed"]] or 0) for r in data]
    sm = [int(r[ix["Warp Stall Sampling (All Samples)"]] or 0) for r in data]
    total_ex, total_sm = sum(ex), sum(sm)
    print(f"{rows[0][1] if len(rows[0]) > 1 else ''}\nexecuted {total_ex}, samples {total_sm}")
    runs, start = [], 0
    for i in range(1, len(data) + 1):
        if i == len(data) or ex[i] != ex[start]:
            runs.append((start, i))
            start = i
    ranked = sorted(runs, key=lambda r: -sum(sm[r[0]:r[1]]))[:args.top]
    for a, b in ranked:
        off = lambda k: hex(int(data[k][0], 16) - base)  # noqa: E731
        print(f"{off(a):>8}-{off(b - 1):>8} n={b - a:4d} count={ex[a]:>9} "
              f"instr={100 * sum(ex[a:b]) / total_ex:5.1f}% samples={100 * sum(sm[a:b]) / total_sm:5.1f}%  "
              f"{data[a][1].strip()[:40]} .. {data[b - 1][1].strip()[:30]}")
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    tot = {h: sum(int(r[ix[h]] or 0) for r in data) for h in stalls}
    s = sum(tot.values()) or 1
    print(" ".join(f"{h[6:]}={100 * v / s:.1f}%" for h, v in sorted(tot.items(), key=lambda x: -x[1])[:10]))


if __name__ == "__main__":
    main()
