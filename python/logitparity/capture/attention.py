"""What the attention kernel of a Hugging Face Llama-family model receives:
the query and key after rotary embedding, the value, and the range of the
pre-softmax scores QKᵀ·scaling over the keys the mask lets each query see.

These tensors are not module outputs (no forward hook sees them), so
``attention_probe`` wraps the *attention function* the model's attention
modules call (``ALL_ATTENTION_FUNCTIONS`` of the model's modeling file:
sdpa, eager, flash, …), for the duration of a ``with`` block, without
editing transformers. The wrapper records the very tensors it is handed and
then calls the original function with them unchanged, so what is recorded is
what the attention uses (tests/test_attention_probe.py checks it against a
float64 computation by hand). Calls from other modules pass straight through.

Virtual module paths (``ATTENTION_TENSORS``), beside the attention module:

- ``model.layers.L.self_attn.query``: rows ``[positions, heads · head_dim]``,
  after rotary embedding (head h in columns ``[h·d, (h+1)·d)``);
- ``model.layers.L.self_attn.key``, ``….value``: ``[keys, kv_heads · head_dim]``
  (key after rotary embedding; both after the KV-cache update, before the
  grouped-query repeat);
- ``model.layers.L.self_attn.scores``: ``[positions, 2 · heads]``: per query
  position and head, the max (columns ``[0, H)``) and the min (``[H, 2H)``)
  of q·k·scaling over the keys the mask allows (causal: keys ≤ the query's
  position), computed in float32 from the recorded query and key. The
  additive mask is not added (its allowed entries are 0).

A module whose forward does not call the attention function (a hand-written
forward, e.g. the ``causal_leak`` plant) records nothing; callers say so.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["ATTENTION_TENSORS", "attention_probe", "is_attention_path", "split_attention_path",
           "scores_range"]

ATTENTION_TENSORS = ("query", "key", "value", "scores")
_PATH_RE = re.compile(r"^(?P<attn>.+\.self_attn)\.(?P<tensor>query|key|value|scores)$")


def split_attention_path(path: str) -> tuple[str, str] | None:
    """'model.layers.3.self_attn.query' -> ('model.layers.3.self_attn', 'query'); None otherwise."""
    m = _PATH_RE.match(path)
    return (m.group("attn"), m.group("tensor")) if m else None


def is_attention_path(path: str) -> bool:
    return split_attention_path(path) is not None


def _interface(module: Any) -> tuple[Any, str, Callable]:
    """(the attention-function mapping the module's forward reads, the key it
    reads, the function it gets today) for an HF attention module."""
    ns = sys.modules.get(type(module).__module__)
    iface = getattr(ns, "ALL_ATTENTION_FUNCTIONS", None)
    default = getattr(ns, "eager_attention_forward", None)
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if iface is None or default is None or not isinstance(impl, str) or not hasattr(iface, "get_interface"):
        raise TypeError(f"{type(module).__name__} does not dispatch through transformers' attention interface "
                        "(ALL_ATTENTION_FUNCTIONS and eager_attention_forward in its modeling file); the "
                        "query/key/value and score capture supports Hugging Face Llama-family attention")
    return iface, impl, iface.get_interface(impl, default)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, d] -> [batch · seq, heads · d]."""
    b, h, s, d = t.shape
    return t.detach().transpose(1, 2).reshape(b * s, h * d)


def _allowed(mask: Any, module: Any, b: int, t: int, s: int, device: Any) -> torch.Tensor:
    """Bool [batch or 1, 1 or heads, t, s]: which keys each query may see,
    read from the mask the attention function got (None: causal as sdpa's
    is_causal, aligned to the last key; bool: True = allowed; additive
    float: allowed where the mask is above half the dtype's lowest value)."""
    if mask is None:
        if t > 1 and getattr(module, "is_causal", True):
            i = torch.arange(t, device=device)[:, None]
            j = torch.arange(s, device=device)[None, :]
            return (j <= i + (s - t))[None, None]
        return torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
    m = mask[..., :s]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def scores_range(module: Any, query: torch.Tensor, key: torch.Tensor, mask: Any,
                 scaling: float) -> torch.Tensor:
    """[batch · positions, 2 · heads] float32: per query and head, max then
    min of q·k·scaling over the allowed keys (NaN for a query that sees no
    key, e.g. a left-padding row)."""
    b, h, t, d = query.shape
    kvh, s = key.shape[1], key.shape[2]
    k = key.detach().float()
    if h != kvh:  # grouped-query attention: repeat each key head (repeat_kv)
        k = k[:, :, None].expand(b, kvh, h // kvh, s, d).reshape(b, h, s, d)
    scores = torch.matmul(query.detach().float(), k.transpose(-1, -2)) * float(scaling)
    ok = _allowed(mask, module, b, t, s, scores.device).expand(b, h, t, s)
    hi = torch.where(ok, scores, scores.new_full((), -torch.inf)).amax(-1)
    lo = torch.where(ok, scores, scores.new_full((), torch.inf)).amin(-1)
    none = ~ok.any(-1)
    hi = torch.where(none, torch.nan, hi)
    lo = torch.where(none, torch.nan, lo)
    return torch.cat([hi, lo], dim=1).transpose(1, 2).reshape(b * t, 2 * h)


@contextlib.contextmanager
def attention_probe(hf: Any, attention_paths: Sequence[str],
                    on_tensor: Callable[[str, str, torch.Tensor], None],
                    tensors: Sequence[str] = ATTENTION_TENSORS) -> Iterator[None]:
    """For the ``with`` block, every call of the attention function by one of
    the attention modules at ``attention_paths`` (``model.layers.L.self_attn``)
    reports ``on_tensor(attention_path, name, rows)`` for each name in
    ``tensors`` (rows as in the module docstring), then runs unchanged."""
    bad = [t for t in tensors if t not in ATTENTION_TENSORS]
    if bad:
        raise ValueError(f"tensors must be drawn from {ATTENTION_TENSORS}, got {bad[0]!r}")
    names = dict(hf.named_modules())
    targets: dict[int, str] = {}
    installs: dict[tuple[int, str], tuple[Any, str, Callable]] = {}
    for path in attention_paths:
        mod = names.get(path)
        if mod is None:
            raise ValueError(f"module {path!r} is not in the model (attention modules are paths like "
                             "'model.layers.0.self_attn')")
        iface, impl, fn = _interface(mod)
        targets[id(mod)] = path
        installs.setdefault((id(iface), impl), (iface, impl, fn))

    def wrap(original: Callable) -> Callable:
        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            path = targets.get(id(module))
            if path is not None:
                for name in tensors:
                    if name == "query":
                        on_tensor(path, name, _rows(query))
                    elif name == "key":
                        on_tensor(path, name, _rows(key))
                    elif name == "value":
                        on_tensor(path, name, _rows(value))
                    else:
                        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
                        if scaling is None:
                            scaling = query.shape[-1] ** -0.5
                        on_tensor(path, name, scores_range(module, query, key, attention_mask, scaling))
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        return wrapper

    saved = []
    for iface, impl, fn in installs.values():
        local = getattr(iface, "_local_mapping", {})
        saved.append((iface, impl, impl in local, local.get(impl)))
        iface[impl] = wrap(fn)
    try:
        yield
    finally:
        for iface, impl, had, old in reversed(saved):
            if had:
                iface[impl] = old
            else:
                del iface[impl]
