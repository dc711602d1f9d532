"""The decode loops: batched greedy / seeded sampling with a KV cache, and
teacher-forced scoring. Written out here rather than through
``model.generate`` so that the token is always chosen from exactly the raw
logits that are stored: no repetition penalty, no logit processors, no
generation-config defaults from the model directory.

Batches are left-padded; the attention mask hides the padding and position
ids count only real tokens, so a prompt's positions are the same in any batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import zlib
from typing import Any, Sequence

import torch

__all__ = ["Generated", "Sampler", "generate_batch", "score_batch"]


def _grad_off(fn):
    """Run a decode loop under torch.inference_mode(), or torch.no_grad()
    for a model placed by an accelerate device map: the weights accelerate
    brings in from an offload for each forward pass would otherwise be
    inference tensors, and torch's CPU linear takes another kernel for an
    inference-tensor weight on a strided input (the prefill's last-position
    slice) than for the resident Parameter, so the prefill row differed in
    its last bits from the single-device run. Under no_grad they are
    ordinary tensors and every row is bitwise the single-device one
    (tests/test_distributed.py)."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with torch.no_grad() if getattr(model, "hf_device_map", None) else torch.inference_mode():
            return fn(model, *args, **kwargs)

    return run


@dataclasses.dataclass
class Generated:
    """One prompt's output. ``logits``: [n, vocab] raw logits on the model's
    device, row j the vector token j was chosen from (or, scoring, that
    predicts it)."""

    tokens: list[int]
    logits: torch.Tensor
    stop_reason: str
    ttft_s: float | None
    decode_tokens_per_s: float | None


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Seeded sampling from the sampled-from distribution of
    logitparity.sampling (softmax(logits / temperature) in float64, the top-p
    nucleus with ties at its boundary kept by lower token id, renormalized):
    the one definition that compare_sampled compares. Each prompt draws from
    its own generator seeded by (seed, prompt id), so the sampled tokens do
    not depend on batching; the draw is an inverse-CDF lookup (token-id
    order) of u ~ U[0, 1) from that generator."""

    temperature: float
    top_p: float | None
    seed: int

    def generator(self, prompt_id: str) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**63))

    def choose(self, logits: torch.Tensor, gen: torch.Generator) -> int:
        from logitparity.sampling import draw, sampling_probs

        row = logits.detach().to("cpu", torch.float64).numpy()
        p = sampling_probs(row, self.temperature, self.top_p)
        u = float(torch.rand(1, generator=gen, dtype=torch.float64).item())
        return draw(p, u)


def _cache_kwarg(model: Any) -> str:
    # transformers 5 renamed past_key_values to cache.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@_grad_off
def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    *,
    device: str,
    pad_id: int,
    eos_ids: Sequence[int],
    stop_ids: Sequence[int] = (),
    max_new_tokens: int,
    sampler: Sampler | None = None,
) -> list[Generated]:
    """Greedy (sampler None) or sampled continuation of each prompt (token
    ids, non-empty), up to max_new_tokens, stopping at an EOS id ("eos") or a
    stop id ("stop_token"); the stopping token is kept as the last token."""
    from transformers import DynamicCache

    n = len(prompts)
    input_ids, mask = _left_pad(prompts, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    gens = [sampler.generator(i) for i in ids] if sampler else None
    eos, stop = set(eos_ids), set(stop_ids)
    tokens: list[list[int]] = [[] for _ in range(n)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    t_last = [0.0] * n
    t0 = time.perf_counter()
    t_first = None
    step_ids = input_ids
    for step in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        # Rows stay where the model ran: on a GPU, the dump's kernels read
        # them there and only what it stores crosses to the host.
        logits = out.logits[:, -1, :]
        if sampler is None:
            nxt = torch.argmax(logits, dim=-1).tolist()  # first index on ties
        else:
            nxt = [sampler.choose(logits[b], gens[b]) if reasons[b] is None else pad_id for b in range(n)]
        now = time.perf_counter()
        if t_first is None:
            t_first = now - t0
        for b in range(n):
            if reasons[b] is not None:
                continue
            tok = int(nxt[b])
            tokens[b].append(tok)
            rows[b].append(logits[b])
            t_last[b] = now
            if tok in eos:
                reasons[b] = "eos"
            elif tok in stop:
                reasons[b] = "stop_token"
            elif len(tokens[b]) == max_new_tokens:
                reasons[b] = "max_new_tokens"
        if all(r is not None for r in reasons):
            break
        step_ids = torch.tensor([[t if r is None else pad_id] for t, r in zip(nxt, reasons)], dtype=torch.long, device=device)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    results = []
    for b in range(n):
        k = len(tokens[b])
        decode_s = t_last[b] - t0 - t_first
        tps = (k - 1) / decode_s if k > 1 and decode_s > 0 else None
        results.append(Generated(tokens[b], torch.stack(rows[b]), reasons[b] or "max_new_tokens", t_first, tps))
    return results


@_grad_off
def score_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    device: str,
    pad_id: int,
) -> list[torch.Tensor]:
    """Teacher-forced logits: for each (prompt, continuation) one forward pass
    over prompt + continuation[:-1]; returns [len(continuation), vocab] on the
    model's device, row j predicting continuation[j]. Only the needed positions are
    projected to the vocabulary."""
    seqs = [list(p) + list(c[:-1]) for p, c in zip(prompts, continuations)]
    keep = max(len(c) for c in continuations)
    if keep == 0:
        vocab = model.get_output_embeddings().weight.shape[0]
        return [torch.zeros((0, vocab)) for _ in prompts]
    input_ids, mask = _left_pad(seqs, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep)
    logits = out.logits  # on the model's device (see generate_batch)
    return [logits[b, keep - len(c):, :] for b, c in enumerate(continuations)]
