"""capture(): run an engine (a Hugging Face model, llama.cpp, any ``Engine``)
over a prompt set and stream the result into a dump."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from logitparity._renamed import renamed_keyword
from logitparity.capture.engine import Engine, HFEngine, StopRule, hf_encode
from logitparity.dump import DEFAULT_SHARD_BYTES, Dump, DumpWriter, check_tokenizer, load_dump, parse_storage
from logitparity.prompts import Prompt, load_prompts

__all__ = ["MODES", "capture"]

MODES = ("greedy", "sample", "score")
_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "gguf", "numpy")


def _libraries(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Versions of python, logitparity, the HF stack and ``extra`` (an
    engine's own libraries, ``identity["engine"]["libraries"]``)."""
    import logitparity

    out: dict[str, str | None] = {"python": platform.python_version(), "logitparity": logitparity.__version__}
    for name in (*_LIBRARIES, *(n for n in extra if n not in _LIBRARIES)):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _check_args(mode: str, reference_dump: Any, max_new_tokens: int, batch_size: int, temperature: float,
                top_p: float | None, storage: str, limit: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "score" and reference_dump is None:
        raise ValueError("mode 'score' needs reference_dump (--reference-dump DIR): the dump whose generated tokens are scored")
    if mode != "score" and reference_dump is not None:
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
    parse_storage(storage)


def _select(prompts: list[Prompt], ref: Dump | None, limit: int | None) -> list[Prompt]:
    if ref is not None:
        from_ref = [Prompt(r["id"], r["category"], r["prompt"]) for r in ref.records]
        if prompts is None:
            prompts = from_ref
        else:
            known = {r["id"]: r for r in ref.records}
            for p in prompts:
                r = known.get(p.id)
                if r is None:
                    raise ValueError(f"prompt {p.id!r} is not in the reference dump {ref.path}")
                if r["prompt"] != p.text:
                    raise ValueError(f"prompt {p.id!r} differs from the reference dump's text ({ref.path}); use the same prompts file")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise ValueError(f"prompt id {p.id!r} appears twice; ids must be unique")
        seen.add(p.id)
    return prompts[:limit] if limit else prompts


def _tokenize(tokenizer: Any, prompt: Prompt, chat_template: bool | None) -> tuple[list[int], bool]:
    """A prompt's ids with a transformers tokenizer (``hf_encode``); kept for
    benchmarks/bench_capture.py."""
    ids, used = hf_encode(tokenizer, prompt.text, chat_template)
    if not ids:
        raise ValueError(f"prompt {prompt.id!r} tokenizes to no tokens; give it some text")
    return ids, used


@renamed_keyword("logits", "storage")
def capture(
    model: Any = None,
    prompts: str | os.PathLike | Sequence[Prompt] | None = None,
    out: str | os.PathLike = "dump",
    *,
    mode: str = "greedy",
    reference_dump: str | os.PathLike | Dump | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    max_new_tokens: int = 64,
    category_budgets: Mapping[str, int] | None = None,
    batch_size: int = 8,
    storage: str = "full",
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
    truncate_prompts: bool = False,
    part: Any = None,
) -> Path:
    """Capture ``model`` on ``prompts`` into the dump directory ``out``.

    model: None (the embedded default), a Hugging Face directory, a .gguf
    file, or a LoadedModel (these run on transformers, through HFEngine;
    ``dtype`` and ``device`` apply when this call loads the weights), or any
    engine of the protocol in capture.engine (a LlamaCppEngine, an HFEngine),
    used as it is. prompts: None (the embedded default set), a
    prompts file, or a list of Prompt. mode: greedy | sample (seeded,
    ``temperature``, optional ``top_p``) | score (teacher-forced on the
    generated tokens of ``reference_dump``; prompts default to its records;
    the engine's tokenizer identity must equal the reference's when the
    reference records one, TokenizerMismatch otherwise).
    Generation stops at one of the engine's EOS ids (``engine.eos_token_ids()``,
    the manifest's ``decoding.eos_token_ids``), one of ``stop_token_ids``, or
    ``max_new_tokens``; ``category_budgets`` ({category: tokens}) gives the
    prompts of a category their own budget instead (JSON answers need room to
    close; the manifest's ``decoding.category_budgets``, and each such record's
    ``max_new_tokens``). chat_template: None applies the tokenizer's template
    when it has one. storage: what the dump keeps of each logit row, 'full'
    or 'topk:K' (``dump.parse_storage``; ``logits=`` is its old name,
    deprecated); logits_dtype: fp32 | fp16 | bf16 (full storage).
    resume: continue an interrupted dump (batches are cut from the whole
    prompt list, so the logits are bitwise those of an uninterrupted run;
    prompts of a damaged shard are captured again).
    limit: only the first N prompts. Prompts longer than the engine's context
    (``max_context``, less the new tokens) are refused before the model loads
    (before the output directory is touched), or keep their last tokens with
    ``truncate_prompts`` (the record says ``truncated_from``).
    part: one rank's share of a data-parallel capture (a
    ``logitparity.distributed.Part``; use ``distributed.capture_ranks``):
    the batches are cut from the whole list as here, the rank keeps every
    world_size-th, and writes them as its own dump under ``out/ranks/``
    (returned); a part already complete returns before the model loads.
    Each batch reaches disk (shard, then records) as soon as it is done, so a
    killed run loses at most the batch in flight. Returns the dump path.
    """
    from logitparity.capture.decode import Sampler
    from logitparity.capture.hf import LoadedModel, load_model, load_tokenizer

    _check_args(mode, reference_dump, max_new_tokens, batch_size, temperature, top_p, storage, limit)
    budgets = _check_budgets(category_budgets, mode)
    ref = reference_dump if isinstance(reference_dump, Dump) or reference_dump is None else load_dump(reference_dump)
    if prompts is not None and not isinstance(prompts, (list, tuple)):
        prompts = load_prompts(prompts)
    selected = _select(list(prompts) if prompts is not None else load_prompts() if ref is None else None, ref, limit)
    tok = None
    if isinstance(model, LoadedModel):
        engine = HFEngine(model)
    elif isinstance(model, Engine):
        engine = model
    else:  # a path or None: the prompts are checked before the weights load
        engine, (tok, n_ctx) = None, load_tokenizer(model)
    if engine is not None:
        n_ctx = getattr(engine, "max_context", None)
        _check_reference_tokenizer(engine, ref)
    encode = engine.encode if engine is not None else lambda text, use: hf_encode(tok, text, use)
    todo = _prepare(selected, encode, ref, chat_template, n_ctx, max_new_tokens, truncate_prompts, budgets)
    mine = None
    if part is not None:  # a rank of a data-parallel capture: its share of the one-process batches
        mine = part.select(_batches(todo, batch_size))
        if part.finished(mine):
            return part.path
        out = part.path
    if engine is None:
        engine = HFEngine(load_model(model, dtype=dtype, device=device, tokenizer=tok))
        _check_reference_tokenizer(engine, ref)
    eos_ids = list(engine.eos_token_ids())
    vocab = int(engine.vocab_size)
    for p, ids, _, cont, *_ in todo:
        bad = [t for t in ids + cont if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"reference record {p.id!r} holds token id {bad[0]} outside this model's vocabulary "
                             f"[0, {vocab}); were both runs made with the same tokenizer?")

    stop = StopRule(tuple(eos_ids), tuple(sorted(int(t) for t in stop_token_ids)))
    decoding: dict[str, Any] = {
        "mode": mode,
        "temperature": temperature if mode == "sample" else None,
        "top_p": top_p if mode == "sample" else None,
        "seed": seed if mode == "sample" else None,
        "max_new_tokens": max_new_tokens if ref is None else ref.manifest.get("decoding", {}).get("max_new_tokens"),
        "stop_token_ids": list(stop.stop_ids),
        "eos_token_ids": eos_ids,
        "repetition_penalty": 1.0,
        "logit_processors": [],
        "chat_template": "auto" if chat_template is None else bool(chat_template),
    }
    if budgets:
        decoding["category_budgets"] = budgets
    ident = engine.identity  # engine, model, tokenizer, dtype, device
    extra = ident["engine"].get("libraries", ())
    ident["engine"] = {k: v for k, v in ident["engine"].items() if k != "libraries"}
    manifest: dict[str, Any] = {
        **ident,
        "decoding": decoding,
        "libraries": _libraries(extra),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    if part is not None:
        manifest["distributed"] = part.manifest_entry()
    if ref is not None:
        manifest["reference"] = {"path": str(ref.path.resolve()), "created": ref.manifest.get("created"),
                                 "mode": ref.manifest.get("decoding", {}).get("mode"), "model": ref.manifest.get("model")}
    sampler = Sampler(float(temperature), top_p, int(seed)) if mode == "sample" else None

    with DumpWriter(out, manifest, storage=storage, logits_dtype=logits_dtype, shard_bytes=shard_bytes,
                    resume=resume) as writer:
        done = {r["id"]: r["prompt"] for r in writer.records}
        for p, *_ in todo:
            if p.id in done and done[p.id] != p.text:
                raise ValueError(f"cannot resume {out}: prompt {p.id!r} has a different text than in the dump; "
                                 "use the same prompts file or a new directory")
        # Batches are cut from the whole list, so a resumed prompt shares its
        # batch (and padding, and matmul shapes) with the same prompts as in
        # an uninterrupted run; a batch is skipped only when all of it is done.
        batches = [b for b in (_batches(todo, batch_size) if mine is None else mine)
                   if any(t[0].id not in done for t in b)]
        _run(writer, batches, set(done), engine, mode, ref, max_new_tokens, stop, sampler,
             progress, resumed=bool(done) or bool(writer.recaptured), batch_size=batch_size)
    return Path(out)


def _check_reference_tokenizer(engine: Any, ref: Dump | None) -> None:
    """Score mode: the engine's tokenizer must be the reference's (when the
    reference records one; the vocabulary range is checked either way)."""
    theirs = ref.manifest.get("tokenizer") if ref is not None else None
    if theirs:
        check_tokenizer(engine.identity["tokenizer"], theirs, ours_name=f"this engine ({engine.name})",
                        theirs_name=f"the reference dump {ref.path}")


def _check_budgets(budgets: Mapping[str, int] | None, mode: str) -> dict[str, int]:
    if budgets is None:
        return {}
    if not isinstance(budgets, Mapping):
        raise ValueError(f"category_budgets must map a category to a token budget, got {type(budgets).__name__}")
    if mode == "score" and budgets:
        raise ValueError("category_budgets apply to generation; score mode scores the reference's tokens")
    for k, n in budgets.items():
        if not isinstance(k, str) or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"category_budgets must map a category name to a positive int, got {k!r}: {n!r}")
    return dict(sorted(budgets.items()))


def _budget(item: tuple) -> int | None:
    """A work item's own token budget (category_budgets), None for the run's."""
    return item[4].get("max_new_tokens") if len(item) > 4 else None


def _prepare(selected: list[Prompt], encode: Any, ref: Dump | None, chat_template: bool | None, n_ctx: int | None,
             max_new_tokens: int, truncate: bool, budgets: Mapping[str, int] | None = None) -> list:
    """Tokenize (``encode(text, chat_template)``, or take the reference's
    tokens) and check every prompt against the context; -> work list sorted
    longest first."""
    todo = []
    too_long = []
    for p in selected:
        if ref is None:
            ids, used = encode(p.text, chat_template)
            ids = list(ids)
            if not ids:
                raise ValueError(f"prompt {p.id!r} tokenizes to no tokens; give it some text"
                                 + (" (an empty prompt has tokens only with the chat template: drop "
                                    "--no-chat-template / chat_template=False, or leave it out)" if not p.text else ""))
            cont: list[int] = []
            budget = (budgets or {}).get(p.category, max_new_tokens)
            need = len(ids) + budget - 1  # the last new token is never fed back
        else:
            r = ref.record(p.id)
            ids, used, cont = list(r["prompt_token_ids"]), bool(r["chat_template"]), list(r["generated_token_ids"])
            need = len(ids) + max(len(cont), 1) - 1
            budget = max_new_tokens
        extra: dict[str, Any] = {} if budget == max_new_tokens else {"max_new_tokens": budget}
        if n_ctx is not None and need > n_ctx:
            room = n_ctx - (need - len(ids))
            if not truncate or ref is not None or room < 1:
                too_long.append((p.id, len(ids), need))
                continue
            extra["truncated_from"] = len(ids)
            ids = ids[-room:]
        todo.append((p, ids, used, cont, extra))
    if too_long:
        shown = ", ".join(f"{i!r} ({n} prompt tokens, {need} positions)" for i, n, need in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        fix = ("score mode cannot truncate the reference's prompts: use a model with a longer context"
               if ref is not None else
               "lower --max-new-tokens, shorten the prompts, or pass --truncate-prompts (truncate_prompts=True) "
               "to keep each prompt's last tokens")
        raise ValueError(f"{len(too_long)} prompt(s) exceed the model's context of {n_ctx} positions: {shown}{more}; "
                         f"{fix}")
    todo.sort(key=lambda t: -(len(t[1]) + len(t[3])))  # similar lengths share a batch: less padding
    return [(p, ids, used, cont) if not extra else (p, ids, used, cont, extra) for p, ids, used, cont, extra in todo]


def _run(writer: DumpWriter, batches: list, done: set, engine: Any, mode: str, ref: Dump | None,
         max_new_tokens: int, stop: StopRule, sampler: Any, progress: bool, resumed: bool, batch_size: int) -> None:
    from tqdm import tqdm  # tqdm.auto warns in Jupyter without ipywidgets

    t0 = time.perf_counter()
    n_tokens = 0
    n_prompts = 0
    total = sum(1 for b in batches for t in b if t[0].id not in done)
    bar = tqdm(total=total, unit="prompt", disable=not progress, desc=f"dump {mode}", dynamic_ncols=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        for batch in batches:
            tb = time.perf_counter()
            if mode == "score":
                rows = engine.score([b[1] for b in batch], [b[3] for b in batch])
                forward_s = time.perf_counter() - tb
                outs = [(b[3], r, ref.record(b[0].id)["stop_reason"], {"ttft_s": None, "decode_tokens_per_s": None,
                                                                        "forward_s": forward_s}) for b, r in zip(batch, rows)]
            else:
                gens = engine.generate([b[1] for b in batch], [b[0].id for b in batch],
                                       max_new_tokens=_budget(batch[0]) or max_new_tokens,
                                       stop=stop, sampler=sampler)
                outs = [(g.tokens, g.logits, g.stop_reason, {"ttft_s": g.ttft_s, "decode_tokens_per_s": g.decode_tokens_per_s})
                        for g in gens]
            added = 0
            for item, (tokens, logit_rows, reason, timing) in zip(batch, outs):
                p, ids, used = item[0], item[1], item[2]
                if p.id in done:  # finished before the interruption: its batch ran again only for the others
                    continue
                rec = {"id": p.id, "category": p.category, "prompt": p.text, "chat_template": used,
                       "prompt_token_ids": ids, "generated_token_ids": [int(t) for t in tokens], "stop_reason": reason,
                       "timing": {**timing, "batch_size": len(batch)}}
                if len(item) > 4:
                    rec.update(item[4])
                writer.add(rec, logit_rows)
                n_tokens += len(tokens)
                added += 1
            writer.flush()  # the batch reaches disk now: a kill loses at most the next one
            n_prompts += added
            bar.update(added)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        bar.close()
        wall = time.perf_counter() - t0
        run = {"started": started, "wall_s": wall, "prompts": n_prompts, "tokens": n_tokens,
               "tokens_per_s": n_tokens / wall if wall > 0 else None, "batch_size": batch_size,
               "peak_host_rss_bytes": _peak_rss_bytes(), "peak_gpu_bytes": _peak_gpu_bytes(engine.device),
               "resumed": resumed}
        writer.manifest["run"] = run


def _batches(todo: list, batch_size: int) -> list[list]:
    """Slices of the length-sorted (longest first) work list, at most
    batch_size long, cut early where an item is under half the batch's longest
    so that padding never more than doubles a prompt's length."""
    out: list[list] = []
    for item in todo:
        n = len(item[1]) + len(item[3])
        if (out and len(out[-1]) < batch_size and 2 * n >= len(out[-1][0][1]) + len(out[-1][0][3])
                and _budget(item) == _budget(out[-1][0])):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def _peak_gpu_bytes(device: str) -> int | None:
    if device == "cpu":  # llama.cpp's CPU engine too: torch need not load
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return int(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))
