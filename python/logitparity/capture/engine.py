"""The engine protocol: what a capture engine provides, and one driver that
turns any engine into a dump.

An engine is loaded once (its constructor) and then answers four things:

- ``identity`` (a property): the manifest sections that say what ran: ``engine`` (name,
  version, build and run settings), ``model``, ``tokenizer`` (the identity
  that ``compare`` checks, computed as docs/dump-format.md defines it),
  ``dtype`` and ``device``;
- ``encode(text, chat_template)``: a prompt's input token ids, and whether a
  chat template was applied;
- ``generate(prompts, ids, ...)``: greedy (no sampler) or seeded sampled
  continuations of a batch of prompts, with the raw logit row of every step;
- ``score(prompts, continuations)``: teacher-forced rows, row j predicting
  continuation[j] from prompt + continuation[:j].

Rows are raw: the model's final projection, before any temperature, top-p,
repetition penalty or other processor. The token of a greedy step is the
first index of the row's maximum; a sampled token comes from
``decode.Sampler`` (seeded by run seed and prompt id, so every engine draws
the same way from the same distribution).

``capture_engine(engine, ...)`` is the driver: it tokenizes every prompt
(or takes a reference dump's tokens in score mode), checks the engine's
tokenizer against the reference dump's, and streams rows through
``DumpWriter``, so every engine writes the same dumps. ``HFEngine`` adapts a
``LoadedModel`` to the protocol; ``load_engine(name, model, ...)`` builds an
engine by name ("hf" or "llama.cpp").
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from logitparity.dump import DEFAULT_SHARD_BYTES, Dump, DumpWriter, load_dump, parse_storage
from logitparity.prompts import Prompt, load_prompts

__all__ = ["ENGINES", "Engine", "HFEngine", "Output", "StopRule", "TokenizerMismatch", "capture_engine",
           "check_tokenizer", "load_engine", "parse_engine_options"]

ENGINES = ("hf", "llama.cpp")
MODES = ("greedy", "sample", "score")
# The tokenizer identity keys two runs must share (docs/dump-format.md).
TOKENIZER_KEYS = ("vocab_size", "tokens_hash", "special_tokens")


@dataclasses.dataclass
class Output:
    """One prompt's result: ``tokens`` generated (the stopping token kept
    last), ``logits`` float32 [len(tokens), vocab] raw rows (numpy or torch),
    ``stop_reason`` one of eos | stop_token | max_new_tokens, and timing."""

    tokens: list[int]
    logits: Any
    stop_reason: str
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When generation stops: at one of ``eos_ids`` (stop reason "eos") or of
    ``stop_ids`` (extra ids, "stop_token"), the stopping token kept."""

    eos_ids: tuple[int, ...]
    stop_ids: tuple[int, ...] = ()

    def reason(self, token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if token in self.stop_ids:
            return "stop_token"
        return None


@runtime_checkable
class Engine(Protocol):
    """The capture engine protocol (see the module doc)."""

    name: str
    vocab_size: int  # width of a logit row
    dtype: str  # the manifest's dtype: fp32 | bf16 | fp16 or the engine's own name (q4_1)
    device: str

    @property
    def identity(self) -> dict[str, Any]: ...

    def eos_token_ids(self) -> list[int]: ...

    def encode(self, text: str, chat_template: bool | None) -> tuple[list[int], bool]: ...

    def generate(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], *, max_new_tokens: int,
                 stop: StopRule, sampler: Any = None) -> list[Output]: ...

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Any]: ...


class TokenizerMismatch(ValueError):
    """Two tokenizer identities differ (a ValueError: exit 2 in the CLI)."""


def check_tokenizer(ours: dict[str, Any], theirs: dict[str, Any], *, ours_name: str, theirs_name: str) -> None:
    """Raise TokenizerMismatch naming every tokenizer key (vocab_size,
    tokens_hash, special_tokens) whose values differ, with both values in
    full."""
    diffs = []
    for key in TOKENIZER_KEYS:
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"tokenizer.{key}: {ours_name} {json.dumps(a, sort_keys=True, ensure_ascii=False)}, "
                         f"{theirs_name} {json.dumps(b, sort_keys=True, ensure_ascii=False)}")
    if diffs:
        raise TokenizerMismatch(
            f"{ours_name} and {theirs_name} use different tokenizers ({'; '.join(diffs)}); token ids would not "
            "mean the same text on both sides: use the same model file (or its exact conversion) for both"
        )


def parse_engine_options(items: Sequence[str]) -> dict[str, Any]:
    """['n_threads=2', 'flash_attn=on'] -> {'n_threads': 2, 'flash_attn': True}
    (ints, on/off/true/false, else the string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"engine option must look like KEY=VALUE (e.g. n_threads=2), got {item!r}")
        low = value.lower()
        if low in ("on", "true", "yes"):
            out[key] = True
        elif low in ("off", "false", "no"):
            out[key] = False
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def load_engine(name: str, model: Any = None, *, dtype: str = "fp32", device: str = "cpu",
                options: dict[str, Any] | None = None) -> Engine:
    """An engine by name: "hf" (transformers; ``dtype``, ``device``) or
    "llama.cpp" (llama-cpp-python on a .gguf; ``options`` are the keyword
    arguments of LlamaCppEngine: n_threads, n_batch, n_ubatch, n_ctx,
    flash_attn, stop_rule). model None is the embedded default."""
    options = dict(options or {})
    if name == "hf":
        if options:
            raise ValueError(f"engine options {sorted(options)} apply to --engine llama.cpp only")
        from logitparity.capture.hf import load_model

        return HFEngine(load_model(model, dtype=dtype, device=device))
    if name == "llama.cpp":
        if dtype != "fp32":
            raise ValueError(f"--dtype {dtype} applies to --engine hf; llama.cpp computes in the GGUF's own types")
        if device != "cpu":
            raise ValueError(f"--device {device} applies to --engine hf; this llama.cpp engine runs on the CPU")
        from logitparity.capture.llamacpp import OPTIONS, LlamaCppEngine

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown llama.cpp engine option(s) {unknown}; known: {', '.join(OPTIONS)}")
        return LlamaCppEngine(model, **options)
    raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")


# --------------------------------------------------------------------------
# the Hugging Face engine behind the protocol


class HFEngine:
    """A ``LoadedModel`` (capture.hf) behind the engine protocol; the loops
    are capture.decode's, so its rows equal capture()'s."""

    name = "hf-transformers"

    def __init__(self, lm: Any):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.vocab_size = int(lm.model.get_output_embeddings().weight.shape[0])
        tok = lm.tokenizer
        eos = lm.identity["tokenizer"]["eos_token_ids"]
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)

        self.dtype, self.device, self.model = lm.dtype, lm.device, lm.model

    @property
    def identity(self) -> dict[str, Any]:
        return {"engine": {"name": self.name, "version": importlib.metadata.version("transformers")},
                **self.lm.identity, "dtype": self.lm.dtype, "device": self.lm.device}

    def eos_token_ids(self) -> list[int]:
        return list(self.lm.identity["tokenizer"]["eos_token_ids"])

    def encode(self, text: str, chat_template: bool | None) -> tuple[list[int], bool]:
        tok = self.tokenizer
        has = isinstance(getattr(tok, "chat_template", None), str)
        use = has if chat_template is None else chat_template
        if use and not has:
            raise ValueError("chat_template=True but the tokenizer has no chat template; pass None (auto) or False")
        if use:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"]), True
        return list(tok(text)["input_ids"]), False

    def generate(self, prompts, ids, *, max_new_tokens, stop, sampler=None) -> list[Output]:
        from logitparity.capture.decode import generate_batch

        gens = generate_batch(self.lm.model, prompts, ids, device=self.lm.device, pad_id=self._pad,
                              eos_ids=stop.eos_ids, stop_ids=stop.stop_ids, max_new_tokens=max_new_tokens,
                              sampler=sampler)
        return [Output(g.tokens, g.logits, g.stop_reason, g.ttft_s, g.decode_tokens_per_s) for g in gens]

    def score(self, prompts, continuations) -> list[Any]:
        from logitparity.capture.decode import score_batch

        return score_batch(self.lm.model, prompts, continuations, device=self.lm.device, pad_id=self._pad)


# --------------------------------------------------------------------------
# the driver


def _libraries(extra: Sequence[str]) -> dict[str, str | None]:
    import logitparity

    out: dict[str, str | None] = {"python": platform.python_version(), "logitparity": logitparity.__version__}
    for name in ("numpy", "safetensors", "torch", "transformers", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _peak_rss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _check_args(mode: str, ref: Any, max_new_tokens: int, batch_size: int, temperature: float,
                top_p: float | None, logits: str, limit: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "score" and ref is None:
        raise ValueError("mode 'score' needs reference_dump (--reference-dump DIR): the dump whose tokens are scored")
    if mode != "score" and ref is not None:
        raise ValueError(f"reference_dump is only used with mode 'score', got mode {mode!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if mode == "sample" and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    parse_storage(logits)


def capture_engine(
    engine: Engine,
    prompts: str | os.PathLike | Sequence[Prompt] | None = None,
    out: str | os.PathLike = "dump",
    *,
    mode: str = "greedy",
    reference_dump: str | os.PathLike | Dump | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 1,
    logits: str = "full",
    logits_dtype: str = "fp32",
    temperature: float = 0.7,
    top_p: float | None = None,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    chat_template: bool | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Capture ``engine`` on ``prompts`` into the dump directory ``out``
    (same arguments and manifest as ``capture``; see its docstring). In
    score mode the engine's tokenizer identity must equal the reference
    dump's (TokenizerMismatch otherwise), and prompts default to its records.
    The decoding section's ``eos_token_ids`` is the engine's own stop rule
    (``engine.eos_token_ids()``), ``stop_token_ids`` the extra ids."""
    from logitparity.capture.decode import Sampler

    _check_args(mode, reference_dump, max_new_tokens, batch_size, temperature, top_p, logits, limit)
    ref = reference_dump if isinstance(reference_dump, Dump) or reference_dump is None else load_dump(reference_dump)
    ident = engine.identity
    if ref is not None:
        check_tokenizer(ident["tokenizer"], ref.manifest.get("tokenizer") or {},
                        ours_name=f"this engine ({ident['engine']['name']})",
                        theirs_name=f"the reference dump {ref.path}")
    if prompts is not None and not isinstance(prompts, (list, tuple)):
        prompts = load_prompts(prompts)
    if ref is not None:
        by_id = {r["id"]: r for r in ref.records}
        chosen = [Prompt(r["id"], r["category"], r["prompt"]) for r in ref.records] if prompts is None else list(prompts)
        for p in chosen:
            r = by_id.get(p.id)
            if r is None or r["prompt"] != p.text:
                raise ValueError(f"prompt {p.id!r} is not in the reference dump {ref.path} with the same text; "
                                 "use the reference's prompts")
    else:
        chosen = list(prompts) if prompts is not None else load_prompts()
    if len({p.id for p in chosen}) != len(chosen):
        raise ValueError("prompt ids must be unique")
    chosen = chosen[:limit] if limit else chosen
    vocab = int(engine.vocab_size)
    eos_ids = sorted(int(t) for t in engine.eos_token_ids())
    stop = StopRule(tuple(eos_ids), tuple(sorted(int(t) for t in stop_token_ids)))
    decoding = {
        "mode": mode,
        "temperature": temperature if mode == "sample" else None,
        "top_p": top_p if mode == "sample" else None,
        "seed": seed if mode == "sample" else None,
        "max_new_tokens": max_new_tokens if ref is None else (ref.manifest.get("decoding") or {}).get("max_new_tokens"),
        "stop_token_ids": list(stop.stop_ids),
        "eos_token_ids": eos_ids,
        "repetition_penalty": 1.0,
        "logit_processors": [],
        "chat_template": "auto" if chat_template is None else bool(chat_template),
    }
    manifest = {**ident, "decoding": decoding,
                "libraries": _libraries(ident.get("engine", {}).get("libraries", ())),
                "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
    manifest["engine"] = {k: v for k, v in manifest["engine"].items() if k != "libraries"}
    if ref is not None:
        manifest["reference"] = {"path": str(ref.path.resolve()), "created": ref.manifest.get("created"),
                                 "mode": (ref.manifest.get("decoding") or {}).get("mode"),
                                 "model": ref.manifest.get("model")}
    todo = []
    for p in chosen:  # tokenize and check everything before the output directory is touched
        if ref is None:
            ids, used = engine.encode(p.text, chat_template)
            if not ids:
                raise ValueError(f"prompt {p.id!r} tokenizes to no tokens; give it some text")
            cont: list[int] = []
        else:
            r = ref.record(p.id)
            ids, used, cont = list(r["prompt_token_ids"]), bool(r["chat_template"]), list(r["generated_token_ids"])
        bad = [t for t in ids + cont if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {p.id!r} holds token id {bad[0]} outside the engine's vocabulary [0, {vocab}); "
                             "were both runs made with the same tokenizer?")
        todo.append((p, ids, used, cont))
    sampler = Sampler(float(temperature), top_p, int(seed)) if mode == "sample" else None

    with DumpWriter(out, manifest, logits=logits, logits_dtype=logits_dtype, shard_bytes=shard_bytes,
                    resume=resume) as writer:
        done = {r["id"]: r["prompt"] for r in writer.records}
        for p, *_ in todo:
            if p.id in done and done[p.id] != p.text:
                raise ValueError(f"cannot resume {out}: prompt {p.id!r} has a different text than in the dump")
        todo = [t for t in todo if t[0].id not in done]
        _run(writer, engine, todo, mode, ref, batch_size, max_new_tokens, stop, sampler, progress, bool(done))
    return Path(out)


def _run(writer: DumpWriter, engine: Engine, todo: list, mode: str, ref: Dump | None, batch_size: int,
         max_new_tokens: int, stop: StopRule, sampler: Any, progress: bool, resumed: bool) -> None:
    from tqdm import tqdm

    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    n_tokens = n_prompts = 0
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress, desc=f"dump {mode}", dynamic_ncols=True)
    try:
        for lo in range(0, len(todo), batch_size):
            batch = todo[lo:lo + batch_size]
            tb = time.perf_counter()
            if mode == "score":
                rows = engine.score([b[1] for b in batch], [b[3] for b in batch])
                forward_s = time.perf_counter() - tb
                outs = [Output(b[3], r, ref.record(b[0].id)["stop_reason"]) for b, r in zip(batch, rows)]
                timings = [{"ttft_s": None, "decode_tokens_per_s": None, "forward_s": forward_s}] * len(batch)
            else:
                outs = engine.generate([b[1] for b in batch], [b[0].id for b in batch],
                                       max_new_tokens=max_new_tokens, stop=stop, sampler=sampler)
                timings = [{"ttft_s": o.ttft_s, "decode_tokens_per_s": o.decode_tokens_per_s} for o in outs]
            for (p, ids, used, _), o, timing in zip(batch, outs, timings):
                writer.add({"id": p.id, "category": p.category, "prompt": p.text, "chat_template": used,
                            "prompt_token_ids": list(ids), "generated_token_ids": [int(t) for t in o.tokens],
                            "stop_reason": o.stop_reason, "timing": {**timing, "batch_size": len(batch)}},
                           o.logits)
                n_tokens += len(o.tokens)
            n_prompts += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        wall = time.perf_counter() - t0
        writer.manifest["run"] = {"started": started, "wall_s": wall, "prompts": n_prompts, "tokens": n_tokens,
                                  "tokens_per_s": n_tokens / wall if wall > 0 else None, "batch_size": batch_size,
                                  "peak_host_rss_bytes": _peak_rss_bytes(), "peak_gpu_bytes": None,
                                  "resumed": resumed}


def as_float32_rows(x: Any) -> np.ndarray:
    """Rows (numpy or torch) -> float32 numpy [n, V] (a view when possible)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)
