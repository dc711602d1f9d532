"""Observation sites of a Hugging Face decoder for the distribution
diagnostics (``logitparity.diagnostics``): module inputs and outputs, and the
attention function's query/key/value and score range, as ``[positions,
width]`` rows; and channel ablation at a site. Torch only: every figure is
computed by the C++ core, driven from ``logitparity.diagnostics``.

A site is named by a key: ``PATH`` for a module's output (its first tensor
output), ``PATH:input`` for its first tensor input (the hidden states), and
``PATH.query|key|value|scores`` for the attention tensors of
``capture.attention`` (PATH = ``model.layers.L.self_attn``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from logitparity.capture.attention import ATTENTION_TENSORS, attention_probe, split_attention_path
from logitparity.capture.hooks import decoder_layers, first_tensor, flat_rows, model_device

__all__ = ["INPUT_SUFFIX", "channel_ablation", "channels_over", "default_sites", "forward_logits", "observing", "row_figures", "row_norms",
           "site_module", "weight_rows"]

INPUT_SUFFIX = ":input"
# Per decoder layer, in execution order: what each block reads and writes.
_LAYER_SITES = ("self_attn:input", "self_attn.query", "self_attn.key", "self_attn.value", "self_attn.scores",
                "self_attn.o_proj:input", "self_attn", "mlp:input", "mlp.down_proj:input", "mlp", "")


def default_sites(hf: Any, *, attention: bool = True) -> list[str]:
    """Site keys of every decoder layer (see _LAYER_SITES), plus the final
    norm's output; attention=False leaves out the four attention tensors."""
    layers = decoder_layers(hf)
    out = []
    for i in range(len(layers)):
        base = f"model.layers.{i}"
        for s in _LAYER_SITES:
            if not attention and split_attention_path(f"{base}.{s}") is not None:
                continue
            out.append(base if s == "" else f"{base}.{s}")
    names = dict(hf.named_modules())
    if "model.norm" in names:
        out.append("model.norm")
    return out


def site_module(key: str) -> tuple[str, str]:
    """'model.layers.1.mlp:input' -> ('model.layers.1.mlp', 'input');
    'model.layers.1.mlp' -> (…, 'output'); attention tensors -> (attention path, name)."""
    if key.endswith(INPUT_SUFFIX):
        return key[: -len(INPUT_SUFFIX)], "input"
    att = split_attention_path(key)
    if att is not None:
        return att
    return key, "output"


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


@contextlib.contextmanager
def observing(hf: Any, sites: Sequence[str], on_rows: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """For the ``with`` block, every forward pass reports ``on_rows(key,
    rows)`` for each site (rows detached, the model's dtype)."""
    names = dict(hf.named_modules())
    handles = []
    attn: dict[str, list[str]] = {}
    for key in sites:
        path, what = site_module(key)
        if path not in names:
            raise ValueError(f"site {key!r}: module {path!r} is not in the model")
        mod = names[path]
        if what == "input":
            def pre(module, args, kwargs, key=key):
                x = _first_input(args, kwargs)
                if x is not None:
                    on_rows(key, flat_rows(x))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        elif what == "output":
            def post(module, args, output, key=key):
                on_rows(key, flat_rows(first_tensor(output)))

            handles.append(mod.register_forward_hook(post))
        else:
            attn.setdefault(path, []).append(what)
    try:
        with contextlib.ExitStack() as stack:
            wanted = sorted({t for ts in attn.values() for t in ts}, key=ATTENTION_TENSORS.index)
            if attn:
                def on_tensor(path, name, rows):
                    if name in attn[path]:
                        on_rows(f"{path}.{name}", rows)

                stack.enter_context(attention_probe(hf, list(attn), on_tensor, wanted))
            yield
    finally:
        for h in handles:
            h.remove()


def forward_logits(hf: Any, input_ids: Sequence[int]) -> torch.Tensor:
    """One prompt, one forward pass (batch 1, no cache): logits [positions, vocab]."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(hf))
    with torch.no_grad():
        return flat_rows(hf(input_ids=ids, use_cache=False).logits)


def _ablate(x: torch.Tensor, channel: int, mode: str, limit: float) -> torch.Tensor:
    x = x.clone()
    if mode == "zero":
        x[..., channel] = 0
    else:  # clamp to [-limit, limit]
        x[..., channel] = x[..., channel].clamp(-limit, limit)
    return x


@contextlib.contextmanager
def channel_ablation(hf: Any, key: str, channel: int, *, mode: str = "zero", limit: float = 0.0) -> Iterator[None]:
    """Channel ``channel`` of site ``key`` (a module input or output) set to
    0 (mode 'zero') or clamped to [-limit, limit] (mode 'clamp') in every
    forward pass of the ``with`` block."""
    path, what = site_module(key)
    if what not in ("input", "output"):
        raise ValueError(f"site {key!r} is an attention tensor; ablation acts on module inputs and outputs")
    mod = dict(hf.named_modules()).get(path)
    if mod is None:
        raise ValueError(f"site {key!r}: module {path!r} is not in the model")
    if what == "input":
        def pre(module, args, kwargs):
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    return (*args[:i], _ablate(a, channel, mode, limit), *args[i + 1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = _ablate(kwargs["hidden_states"], channel, mode, limit)
            return args, kwargs

        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, args, output):
            if isinstance(output, torch.Tensor):
                return _ablate(output, channel, mode, limit)
            return (_ablate(output[0], channel, mode, limit), *output[1:])

        handle = mod.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def row_figures(rows: torch.Tensor) -> tuple[Any, ...]:
    """Per prompt, of rows [positions, width] (finite values only): per
    channel max |x| (float32) and the position where it is reached (first on
    ties), per position the L2 norm (float64), per channel the signed max
    and min (float64; -inf / +inf for a channel without a finite value)."""
    x = rows.detach().to("cpu")
    fin = torch.isfinite(x)
    a = torch.where(fin, x.abs(), torch.zeros((), dtype=x.dtype)).float()
    chan_max, chan_pos = a.max(dim=0)
    xd = torch.where(fin, x, torch.zeros((), dtype=x.dtype)).double()
    norms = torch.linalg.vector_norm(xd, dim=1)
    xf = x.double()
    col_max = torch.where(fin, xf, torch.full((), -torch.inf, dtype=torch.float64)).amax(dim=0)
    col_min = torch.where(fin, xf, torch.full((), torch.inf, dtype=torch.float64)).amin(dim=0)
    return chan_max.numpy(), chan_pos.numpy(), norms.numpy(), col_max.numpy(), col_min.numpy()


def row_norms(rows: torch.Tensor) -> Any:
    """L2 norm of each row in float64 (numpy), one row at a time in chunks
    (a [positions, vocab] logits block is not copied whole to float64)."""
    x = rows.detach().to("cpu")
    return torch.cat([torch.linalg.vector_norm(x[i:i + 256].double(), dim=1) for i in range(0, x.shape[0], 256)]).numpy()


def weight_rows(hf: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, rows [*, channels]) of every floating parameter, each
    storage once (tied weights under their first name). Channels are output
    channels: a Linear weight [out, in] is given transposed ([in, out]); an
    embedding [vocab, hidden] and 1-D weights (norms, biases: [1, n]) as they are."""
    linear = {f"{n}.weight" for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = set()
    for name, p in hf.named_parameters():
        if not p.is_floating_point() or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        w = p.detach()
        if w.dim() == 1:
            rows = w.reshape(1, -1)
        elif name in linear and w.dim() == 2:
            rows = w.t().contiguous()
        else:
            rows = w.reshape(-1, w.shape[-1])
        yield name, rows


def channels_over(rows: torch.Tensor, channels: Sequence[int], cuts: Any) -> Any:
    """Bool numpy [positions, len(channels)]: |x| of each channel above its
    cut (NaN is never above)."""
    x = rows.detach().to("cpu")[:, list(channels)].double().abs()
    return (x > torch.as_tensor(cuts, dtype=torch.float64)[None, :]).numpy()
