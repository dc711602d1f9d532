"""A CUDA kernel's SASS by basic blocks, on a machine without a GPU: what
ncu's source view counts, for a build's machine code (the row kernel's
instructions per step can then be counted before a device call; its time
still needs the device).

Needs cuobjdump and nvdisasm: the CUDA toolkit's, or the PyPI wheels
(`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, found in their
site-packages folder). Reads a cubin or the built module (its sm_90 code).

    python benchmarks/sass_blocks.py build/*/_core*.so --kernel 'CompareRowsKernelIffLi256E'
    python benchmarks/sass_blocks.py MODULE --kernel K --around-mufu 16   # the clean group's block
    python benchmarks/sass_blocks.py MODULE --kernel K --range 27a0 5290  # every block of a span

The default prints the kernel's instruction count and its largest blocks.
A block is a straight run of instructions between branch targets and
branches, calls, barriers and exits; each line shows its address, length,
last instruction and its most common opcodes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import site
import subprocess
import sys


def find_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "bin", name)))
        if hits:
            return hits[-1]
    sys.exit(f"sass_blocks: {name} not found on PATH or in site-packages; install it with "
             f"`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` or a CUDA toolkit")


def kernel_sass(path: str, pattern: str, arch: str) -> tuple[str, list[tuple[int, str]]]:
    cuobjdump = find_tool("cuobjdump")
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_tool("nvdisasm")))
    out = subprocess.run([cuobjdump, "-sass", "-arch", arch, path], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        sys.exit(f"sass_blocks: cuobjdump failed on {path}: {out.stderr.strip()}")
    text = out.stdout.split("\n")
    starts = [i for i, line in enumerate(text) if "Function :" in line]
    names = [text[i].split("Function :", 1)[1].strip() for i in starts]
    chosen = [k for k, n in enumerate(names) if re.search(pattern, n)]
    if len(chosen) != 1:
        listing = "\n  ".join(names) if names else "(no kernels)"
        sys.exit(f"sass_blocks: --kernel {pattern!r} matched {len(chosen)} of the kernels in "
                 f"{path}; expected one of:\n  {listing}")
    k = chosen[0]
    end = starts[k + 1] if k + 1 < len(starts) else len(text)
    ins = []
    for line in text[starts[k]:end]:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return names[k], ins


def basic_blocks(ins: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    leaders = {ins[0][0]}
    for _, t in ins:
        for m in re.finditer(r"\b(?:BRA|BSSY|CALL\.REL\.NOINC|CALL\.REL)\b[^;]*?(0x[0-9a-f]+)", t):
            leaders.add(int(m.group(1), 16))
    for i, (_, t) in enumerate(ins[:-1]):
        if re.search(r"\b(BRA|EXIT|RET|CALL|BSYNC|WARPSYNC|BAR)\b", t):
            leaders.add(ins[i + 1][0])
    blocks, cur = [], []
    for a, t in ins:
        if a in leaders and cur:
            blocks.append(cur)
            cur = []
        cur.append((a, t))
    if cur:
        blocks.append(cur)
    return blocks


def opcode(t: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]


def line(j: int, b: list[tuple[int, str]]) -> str:
    ops = collections.Counter(opcode(t) for _, t in b)
    return (f"[{j}] {b[0][0]:#07x} {len(b):4d} | {b[-1][1][:56]:56s} | "
            + ", ".join(f"{k} {v}" for k, v in ops.most_common(6)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary", help="a cubin, or the built module (_core*.so)")
    ap.add_argument("--kernel", required=True, help="regular expression matching one kernel's mangled name")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--around-mufu", type=int, metavar="N",
                    help="the blocks holding at least N MUFU.EX2, with the blocks around them")
    ap.add_argument("--range", nargs=2, metavar=("LO", "HI"), help="every block from LO to HI (hex)")
    ap.add_argument("--largest", type=int, default=12)
    args = ap.parse_args()
    name, ins = kernel_sass(args.binary, args.kernel, args.arch)
    blocks = basic_blocks(ins)
    print(f"{name}: {len(ins)} instructions, {len(blocks)} blocks")
    if args.range:
        lo, hi = (int(x, 16) for x in args.range)
        for j, b in enumerate(blocks):
            if lo <= b[0][0] <= hi:
                print(line(j, b))
    elif args.around_mufu:
        for j, b in enumerate(blocks):
            if sum("MUFU.EX2" in t for _, t in b) >= args.around_mufu:
                for i in range(max(0, j - 6), min(len(blocks), j + 8)):
                    print(("> " if i == j else "  ") + line(i, blocks[i]))
                print()
    else:
        for j in sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))[:args.largest]:
            print(line(j, blocks[j]))


if __name__ == "__main__":
    main()
