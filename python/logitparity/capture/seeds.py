"""Sample sets: one sampled dump per seed (``dump --mode sample --seeds``),
and a set scored on another set's samples (``dump --mode score
--reference-dump SET``), for logitparity.sampling.compare_sampled.

A set is a directory holding ``samples.json`` (format
"logitparity-sample-set", version "1.0", the seeds and their dump directories)
and one ordinary dump ``seed-S`` per seed. The index is written first, so an
interrupted set says which seeds it meant to hold; each seed's dump is
durable and resumable like any dump.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from logitparity._renamed import renamed_keyword
from logitparity.capture.run import capture
from logitparity.sampling import load_sample_set, write_sample_index

__all__ = ["capture_samples", "parse_seeds", "score_samples"]


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """'0,1,2' or '0-3' (inclusive) or a list -> distinct ints in order."""
    if isinstance(text, str):
        out: list[int] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
            except ValueError:
                raise ValueError(f"--seeds must be integers like 0,1,2 or 0-3, got {text!r}") from None
    else:
        out = [int(s) for s in text]
    if not out:
        raise ValueError(f"--seeds names no seed, got {text!r}; e.g. --seeds 0-3")
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds names a seed twice: {out}")
    return out


def _loaded(model: Any, dtype: str, device: str) -> Any:
    """Load the weights once for every seed (an engine or LoadedModel as is)."""
    from logitparity.capture.engine import Engine
    from logitparity.capture.hf import LoadedModel, load_model

    if isinstance(model, (LoadedModel, Engine)):
        return model
    return load_model(model, dtype=dtype, device=device)


@renamed_keyword("logits", "storage")
def capture_samples(model: Any, prompts: Any, out: str | os.PathLike, *, seeds: Sequence[int], dtype: str = "fp32",
                    device: str = "cpu", **kw: Any) -> Path:
    """Sample ``model`` once per seed into ``out/seed-S`` (capture(...,
    mode="sample", seed=S, **kw)); -> out."""
    seeds = parse_seeds(seeds)
    for bad in ("mode", "seed", "reference_dump"):
        if bad in kw:
            raise ValueError(f"capture_samples sets {bad} itself (mode sample, one seed per dump); drop {bad}=")
    out = Path(out)
    write_sample_index(out, seeds, "sample")
    lm = _loaded(model, dtype, device)
    for s in seeds:
        capture(lm, prompts, out / f"seed-{s}", mode="sample", seed=s, dtype=dtype, device=device, **kw)
    return out


@renamed_keyword("logits", "storage")
def score_samples(model: Any, reference: Any, out: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu",
                  **kw: Any) -> Path:
    """Score ``model`` on every seed's samples of the set ``reference``
    (capture(..., mode="score", reference_dump=that seed's dump)) into
    ``out/seed-S``; -> out."""
    ref = load_sample_set(reference, "reference_dump")
    if any(s is None for s in ref.seeds):
        raise ValueError(f"{ref.path} is not a sampled run (no seed); score a sample set or sample dump")
    out = Path(out)
    write_sample_index(out, ref.seeds, "score")
    lm = _loaded(model, dtype, device)
    for s, d in zip(ref.seeds, ref.dumps):
        capture(lm, None, out / f"seed-{s}", mode="score", reference_dump=d, dtype=dtype, device=device, **kw)
    return out
