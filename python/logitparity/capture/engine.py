"""The engine protocol: what a capture engine provides (the one driver that
turns any engine into a dump is ``capture.run.capture``).

An engine is loaded once (its constructor) and then answers:

- ``identity`` (a property): the manifest sections that say what ran: ``engine`` (name,
  version, build and run settings), ``model``, ``tokenizer`` (the identity
  that ``compare`` checks, computed as docs/dump-format.md defines it),
  ``dtype`` and ``device``;
- ``encode(text, chat_template)``: a prompt's input token ids, and whether a
  chat template was applied; ``max_context``: the positions one sequence may
  use (None when unknown), against which capture checks every prompt;
- ``generate(prompts, ids, ...)``: greedy (no sampler) or seeded sampled
  continuations of a batch of prompts, with the raw logit row of every step;
- ``score(prompts, continuations)``: teacher-forced rows, row j predicting
  continuation[j] from prompt + continuation[:j].

Rows are raw: the model's final projection, before any temperature, top-p,
repetition penalty or other processor. The token of a greedy step is the
first index of the row's maximum; a sampled token comes from
``decode.Sampler`` (seeded by run seed and prompt id, so every engine draws
the same way from the same distribution).

``capture.run.capture(engine, ...)`` is the one driver: it takes any engine
(a ``LoadedModel``, a path or None wrapped in ``HFEngine``), tokenizes every
prompt with ``encode`` (or takes a reference dump's tokens in score mode),
checks the prompts against ``max_context`` and the engine's tokenizer against
the reference dump's, and streams rows through ``DumpWriter`` batch by batch
(durable shards, ``resume``), so every engine writes the same dumps.
``HFEngine`` adapts a ``LoadedModel`` to the protocol; ``load_engine(name,
model, ...)`` builds an engine by name ("hf" or "llama.cpp").
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Protocol, Sequence, runtime_checkable

from logitparity.dump import TokenizerMismatch, check_tokenizer

__all__ = ["ENGINES", "Engine", "HFEngine", "Output", "StopRule", "TokenizerMismatch", "check_tokenizer",
           "hf_encode", "load_engine", "parse_engine_options"]

ENGINES = ("hf", "llama.cpp")


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
    max_context: int | None  # positions one sequence may use (prompt + new tokens), None when unknown

    @property
    def identity(self) -> dict[str, Any]: ...

    def eos_token_ids(self) -> list[int]: ...

    def encode(self, text: str, chat_template: bool | None) -> tuple[list[int], bool]: ...

    def generate(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], *, max_new_tokens: int,
                 stop: StopRule, sampler: Any = None) -> list[Output]: ...

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Any]: ...


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


def hf_encode(tokenizer: Any, text: str, chat_template: bool | None) -> tuple[list[int], bool]:
    """A prompt's input ids with a transformers tokenizer, and whether its
    chat template was applied (None: when it has one)."""
    has = isinstance(getattr(tokenizer, "chat_template", None), str)
    use = has if chat_template is None else chat_template
    if use and not has:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=None (auto) or False")
    if use:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), True
    return list(tokenizer(text)["input_ids"]), False


class HFEngine:
    """A ``LoadedModel`` (capture.hf) behind the engine protocol, its loops
    capture.decode's; ``capture()`` wraps a LoadedModel or a path in one."""

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

    @property
    def max_context(self) -> int | None:
        """The model's context from its config (None when it does not say)."""
        from logitparity.capture.hf import context_length

        return context_length(self.lm.model.config.to_dict())

    def encode(self, text: str, chat_template: bool | None) -> tuple[list[int], bool]:
        return hf_encode(self.tokenizer, text, chat_template)

    def generate(self, prompts, ids, *, max_new_tokens, stop, sampler=None) -> list[Output]:
        from logitparity.capture.decode import generate_batch

        gens = generate_batch(self.lm.model, prompts, ids, device=self.lm.device, pad_id=self._pad,
                              eos_ids=stop.eos_ids, stop_ids=stop.stop_ids, max_new_tokens=max_new_tokens,
                              sampler=sampler)
        return [Output(g.tokens, g.logits, g.stop_reason, g.ttft_s, g.decode_tokens_per_s) for g in gens]

    def score(self, prompts, continuations) -> list[Any]:
        from logitparity.capture.decode import score_batch

        return score_batch(self.lm.model, prompts, continuations, device=self.lm.device, pad_id=self._pad)
