"""Old vs new C++ core in one run: the fused row comparison of two builds of
logitparity._core (each a path to its .so), alternated so that both see the
same machine state. Prints rows/s (best of --repeat) per shape and JS setting.
Rows: b = a + SIGMA randn (--sigma, default 0.05: close rows; 0.5 puts a
third of the tokens beyond the KL series' range, as rows of a quantized
model against its reference do). --dumps REF CAND: instead, the full-logit
rows of two dumps (each prompt's first min(n_ref, n_cand) positions; e.g.
the demo's out/demo/reference-fp32 and out/demo/candidate-bf16).

    python benchmarks/ab_core.py OLD/_core*.so NEW/_core*.so --threads 16 --rounds 5
    python benchmarks/ab_core.py OLD.so NEW.so --dumps out/demo/reference-fp32 out/demo/candidate-bf16

Build a module from another commit with
    git archive COMMIT | tar -x -C /tmp/old && cmake -S /tmp/old -B /tmp/b-old -DLOGITPARITY_PYTHON=ON \\
        -DLOGITPARITY_CUDA=OFF -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) && cmake --build /tmp/b-old --target _core
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

import numpy as np

SHAPES = ((512, 151936), (2048, 49152))


def dump_rows(ref: str, cand: str) -> tuple[np.ndarray, np.ndarray]:
    """The aligned full-logit rows of two dumps, as float32 [rows, vocab]."""
    from logitparity.dump import load_dump

    r, c = load_dump(ref), load_dump(cand)
    a, b = [], []
    for pid in r.ids:
        x, y = r.logits(pid, as_float32=True), c.logits(pid, as_float32=True)
        n = min(len(x), len(y))
        a.append(x[:n])
        b.append(y[:n])
    return np.ascontiguousarray(np.concatenate(a)), np.ascontiguousarray(np.concatenate(b))


def inputs(sigma: float, dumps: list[str] | None):
    if dumps:
        a, b = dump_rows(*dumps)
        yield a, b, np.zeros(len(a), dtype=np.int64)
        return
    for rows, vocab in SHAPES:
        rng = np.random.default_rng(0)
        a = (rng.normal(size=(rows, vocab)) * 2.5 + 4).astype(np.float32)
        b = (a + sigma * rng.normal(size=a.shape)).astype(np.float32)
        yield a, b, rng.integers(0, vocab, size=rows).astype(np.int64)


def measure(path: str, repeat: int, threads: int, sigma: float = 0.05,
            dumps: list[str] | None = None) -> list[float]:
    # One build per process: two _core builds loaded into one process share
    # the first one's code (the second module's calls bind to it).
    spec = importlib.util.spec_from_file_location("_core", path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    out = []
    for a, b, t in inputs(sigma, dumps):
        rows = len(a)
        for js in (False, True):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                core.compare_rows(a, False, b, False, t, [1, 5, 10], js, threads)
                best = min(best, time.perf_counter() - t0)
            out.append(rows / best)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=0.05, help="b = a + SIGMA randn")
    ap.add_argument("--dumps", nargs=2, metavar=("REF", "CAND"), help="rows of two full-logit dumps")
    ap.add_argument("--one", metavar="PATH", help=argparse.SUPPRESS)  # a child process: one module
    args = ap.parse_args()
    shapes = [("dumps", "")] if args.dumps else [(r, f"x{v}") for r, v in SHAPES]
    cols = [f"{r}{v} {'js' if js else 'no js'}" for r, v in shapes for js in (False, True)]
    best = {"old": [0.0] * len(cols), "new": [0.0] * len(cols)}
    print(f"threads={args.threads}, sigma={args.sigma}; rows/s, best of {args.repeat} per round; "
          + " | ".join(cols))
    for i in range(args.rounds):
        for name in ("old", "new"):  # each build in its own process: one _core per process
            code = (f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import ab_core; "
                    f"print(ab_core.measure({getattr(args, name)!r}, {args.repeat}, {args.threads}, "
                    f"{args.sigma}, {args.dumps!r}))")
            got = eval(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True).stdout)
            best[name] = [max(x, y) for x, y in zip(best[name], got)]
            print(f"round {i + 1} {name}: " + " | ".join(f"{x:,.0f}" for x in got))
    print("best new/old: " + " | ".join(f"{n / o:.3f}" for n, o in zip(best["new"], best["old"])))


if __name__ == "__main__":
    main()
