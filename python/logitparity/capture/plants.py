"""Planted bugs and benign changes, each confined to one decoder layer, to
prove the judge: a verdict must FAIL every bug and PASS every benign change,
and the layer comparison must name the layer (and the submodule) a bug sits
in.

Each plant patches a loaded Llama-style Hugging Face model in place (weights,
an attribute or a forward hook) and is undone when its ``with`` block ends, so
the same loaded model serves the reference and the candidate. A plant acts in
every forward pass, so it shows in KV-cached greedy decoding and in
teacher-forced scoring alike::

    from logitparity.capture import capture, load_model
    from logitparity.capture.plants import planted

    lm = load_model(None)
    capture(lm, None, "ref")
    with planted(lm, "down_proj_roll", layer=10):
        capture(lm, None, "cand")

Names are canonical module paths (``model.layers.10.mlp``), the names the
layer comparison reports. ``PLANTS`` lists every plant with its kind
(``"bug"`` or ``"benign"``), the submodule it sits in and what it does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

__all__ = ["OUTLIER_CHANNEL", "OUTLIER_SCALE", "PLANTS", "Plant", "planted"]

# mlp_input_outlier: which channel of the MLP input it scales, and by how much.
OUTLIER_CHANNEL = 3
OUTLIER_SCALE = 50.0


@dataclasses.dataclass(frozen=True)
class Plant:
    """One planted change. ``submodule`` is the path below
    ``model.layers.{layer}`` of the module whose own computation is wrong
    (``self_attn``, ``mlp``, ``post_attention_layernorm``), None for a
    benign change."""

    name: str
    kind: str  # "bug" | "benign"
    submodule: str | None
    description: str
    apply: Callable[[Any, int], Callable[[], None]]  # (hf_model, layer) -> undo

    def module_path(self, layer: int) -> str | None:
        """Canonical path of the module holding the bug in ``layer``."""
        return None if self.submodule is None else f"model.layers.{layer}.{self.submodule}"


def _hf(model: Any):
    """A LoadedModel or an HF causal LM -> the HF module."""
    return getattr(model, "model", None) if hasattr(model, "identity") else model


def _layer(hf, layer: int):
    layers = hf.model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must be in [0, {len(layers) - 1}] (the model has {len(layers)} decoder layers), "
                         f"got {layer}")
    return layers[layer]


def _swap_weight(param, new) -> Callable[[], None]:
    """Replace a parameter's values in place; the undo restores the saved copy bitwise."""
    import torch

    saved = param.detach().clone()
    with torch.no_grad():
        param.copy_(new)

    def undo() -> None:
        with torch.no_grad():
            param.copy_(saved)

    return undo


# --------------------------------------------------------------------------
# Bugs


def _down_proj_roll(hf, layer: int):
    # A bad repack: the rows of down_proj (one per hidden channel) shifted by one.
    import torch

    w = _layer(hf, layer).mlp.down_proj.weight
    return _swap_weight(w, torch.roll(w.detach(), shifts=1, dims=0))


def _attn_scale(hf, layer: int):
    # A softmax that shifts attention: scores scaled by 1.25/sqrt(d) instead of 1/sqrt(d).
    attn = _layer(hf, layer).self_attn
    old = attn.scaling
    attn.scaling = old * 1.25

    def undo() -> None:
        attn.scaling = old

    return undo


def _head_swap(hf, layer: int):
    # A stride bug in the attention output: heads 0 and 1 trade places before o_proj.
    attn = _layer(hf, layer).self_attn
    d = attn.head_dim
    w = attn.o_proj.weight.detach().clone()
    w[:, 0:d], w[:, d:2 * d] = attn.o_proj.weight[:, d:2 * d].detach(), attn.o_proj.weight[:, 0:d].detach()
    return _swap_weight(attn.o_proj.weight, w)


def _rope_offset(hf, layer: int):
    # Rotary embedding one position ahead for the queries only (the keys keep
    # their own positions), so every relative distance is off by one. (Moving
    # both queries and keys would change nothing: RoPE scores depend only on
    # the distance.) The extra rotation by angle(1) = inv_freq is applied to
    # q_proj's output; rotations of one pair commute, so this is RoPE at p + 1.
    import torch

    attn = _layer(hf, layer).self_attn
    inv_freq = hf.model.rotary_emb.inv_freq
    d = attn.head_dim

    def hook(module, args, out):
        step = torch.cat([inv_freq, inv_freq]).to(torch.float32)
        cb, sb = torch.cos(step).to(out.dtype), torch.sin(step).to(out.dtype)
        q = out.view(*out.shape[:-1], -1, d)
        half = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1)  # rotate_half
        return (q * cb + half * sb).view(out.shape)

    return attn.q_proj.register_forward_hook(hook).remove


def _fp16_down_proj_input(hf, layer: int):
    # The MLP's intermediate activation kept in fp16 (a dtype slip in one
    # fused kernel): rounded to 11 significant bits, |x| > 65504 -> inf.
    import torch

    mlp = _layer(hf, layer).mlp

    def pre_hook(module, args):
        x = args[0]
        return (x.to(torch.float16).to(x.dtype),)

    return mlp.down_proj.register_forward_pre_hook(pre_hook).remove


def _int8_gate_proj(hf, layer: int):
    # Wrong quantization granularity: gate_proj fake-quantized to int8 with
    # one scale for the whole tensor instead of one per output channel.
    import torch

    w = _layer(hf, layer).mlp.gate_proj.weight.detach()
    scale = w.abs().max().clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return _swap_weight(_layer(hf, layer).mlp.gate_proj.weight, q)


def _norm_weight_missing(hf, layer: int):
    # A weight that was never loaded: post_attention_layernorm left at ones.
    import torch

    w = _layer(hf, layer).post_attention_layernorm.weight
    return _swap_weight(w, torch.ones_like(w))


def _causal_leak(hf, layer: int):
    # An off-by-one causal mask: query i also attends to key i + 1 (the next
    # token). It shows only where a forward pass holds more than one token
    # (prefill, teacher-forced scoring); a one-token decode step has no next
    # token to see. It lowers perplexity.
    import torch

    attn = _layer(hf, layer).self_attn
    original = attn.forward

    def leaky_mask(mask, q_len: int, k_len: int, device, dtype):
        offset = k_len - q_len
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        causal_plus_one = j <= offset + i + 1
        if mask is None:
            allowed = causal_plus_one[None, None]
        elif mask.dtype == torch.bool:
            nxt = torch.cat([mask[..., 1:, :], mask[..., -1:, :]], dim=-2)
            allowed = mask | (nxt & causal_plus_one)
        else:  # additive 0 / -inf
            ok = mask == 0
            nxt = torch.cat([ok[..., 1:, :], ok[..., -1:, :]], dim=-2)
            allowed = ok | (nxt & causal_plus_one)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                           torch.full((), float("-inf"), dtype=dtype, device=device))

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
        k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        mask = attention_mask[..., : k.shape[-2]] if attention_mask is not None else None
        scores = scores + leaky_mask(mask, q.shape[-2], k.shape[-2], scores.device, scores.dtype)
        w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return attn.o_proj(out), w

    attn.forward = forward

    def undo() -> None:
        attn.forward = original

    return undo


def _mlp_input_outlier(hf, layer: int):
    # A planted outlier channel: channel OUTLIER_CHANNEL of the MLP's input
    # scaled x OUTLIER_SCALE, through that entry of post_attention_layernorm's
    # weight (the MLP input is that norm's output), for logitparity.diagnostics
    # to find (stats_of) and rank (ablate).
    w = _layer(hf, layer).post_attention_layernorm.weight
    new = w.detach().clone()
    new[OUTLIER_CHANNEL] *= OUTLIER_SCALE
    return _swap_weight(w, new)


# --------------------------------------------------------------------------
# Benign changes


def _weights_cloned(hf, layer: int):
    # Same values in new storage (a layout change that is bitwise the same):
    # every parameter of the layer copied to a fresh contiguous tensor.
    import torch

    mod = _layer(hf, layer)
    saved = {n: p.data for n, p in mod.named_parameters()}
    for _, p in mod.named_parameters():
        p.data = torch.empty_like(p.data).copy_(p.data)

    def undo() -> None:
        for n, p in mod.named_parameters():
            p.data = saved[n]

    return undo


def _rope_shift_both(hf, layer: int):
    # Queries and keys both rotated one position ahead: RoPE scores depend only
    # on the relative distance, so this is lossless in exact arithmetic and
    # changes rounding only (a change the judge must pass). cos/sin of
    # angle(p + 1) = angle(p) + inv_freq, by the angle-sum identities.
    import torch

    attn = _layer(hf, layer).self_attn
    inv_freq = hf.model.rotary_emb.inv_freq

    def pre_hook(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        step = torch.cat([inv_freq, inv_freq]).to(torch.float32)
        cb, sb = torch.cos(step).to(cos.dtype), torch.sin(step).to(cos.dtype)
        kwargs["position_embeddings"] = (cos * cb - sin * sb, sin * cb + cos * sb)
        return args, kwargs

    return attn.register_forward_pre_hook(pre_hook, with_kwargs=True).remove


def _split_gate_up(hf, layer: int):
    # gate_proj and up_proj run as one fused matmul whose output is split: the
    # same arithmetic per output element, other matmul shapes (may reorder
    # float additions inside the BLAS).
    import torch

    mlp = _layer(hf, layer).mlp
    original = mlp.forward
    fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach()
    n = mlp.gate_proj.weight.shape[0]

    def forward(x):
        gu = torch.nn.functional.linear(x, fused)
        return mlp.down_proj(mlp.act_fn(gu[..., :n]) * gu[..., n:])

    mlp.forward = forward

    def undo() -> None:
        mlp.forward = original

    return undo


PLANTS: dict[str, Plant] = {p.name: p for p in [
    Plant("down_proj_roll", "bug", "mlp", "down_proj rows rolled by one (a bad weight repack)", _down_proj_roll),
    Plant("attn_scale", "bug", "self_attn", "attention scores scaled by 1.25/sqrt(d) (a shifted softmax)",
          _attn_scale),
    Plant("head_swap", "bug", "self_attn", "attention heads 0 and 1 swapped before o_proj (a stride bug)",
          _head_swap),
    Plant("rope_offset", "bug", "self_attn",
          "rotary embedding one position ahead for the queries only (relative distances off by one)", _rope_offset),
    Plant("fp16_down_proj_input", "bug", "mlp",
          "MLP intermediate activation rounded to fp16 (a dtype slip; overflows to inf past 65504)",
          _fp16_down_proj_input),
    Plant("int8_gate_proj", "bug", "mlp", "gate_proj fake-quantized int8 with one per-tensor scale",
          _int8_gate_proj),
    Plant("norm_weight_missing", "bug", "post_attention_layernorm",
          "post-attention RMSNorm weight left at ones (a weight not loaded)", _norm_weight_missing),
    Plant("causal_leak", "bug", "self_attn",
          "causal mask off by one: each query also sees the next token (prefill and scoring only)", _causal_leak),
    Plant("mlp_input_outlier", "bug", "post_attention_layernorm",
          f"channel {OUTLIER_CHANNEL} of the MLP input scaled x{OUTLIER_SCALE:g} (a planted outlier channel, "
          "through the post-attention norm's weight)", _mlp_input_outlier),
    Plant("weights_cloned", "benign", None, "the layer's weights copied to new storage (bitwise the same)",
          _weights_cloned),
    Plant("split_gate_up", "benign", None, "gate_proj and up_proj fused into one matmul, output split",
          _split_gate_up),
    Plant("rope_shift_both", "benign", None,
          "queries and keys rotated one position ahead together (relative distances kept: rounding only)",
          _rope_shift_both),
]}


@contextlib.contextmanager
def planted(model: Any, name: str, *, layer: int) -> Iterator[Plant]:
    """Apply plant ``name`` to decoder layer ``layer`` of ``model`` (a
    ``LoadedModel`` or an HF Llama-style causal LM) for the ``with`` block;
    the model is restored bitwise afterwards."""
    if name not in PLANTS:
        import difflib

        close = difflib.get_close_matches(name, PLANTS, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown plant {name!r}; choose one of {sorted(PLANTS)}{hint}")
    hf = _hf(model)
    if hf is None or not hasattr(getattr(hf, "model", None), "layers"):
        raise TypeError(f"model must be a LoadedModel or a Llama-style HF causal LM with .model.layers, "
                        f"got {type(model).__name__}")
    plant = PLANTS[name]
    undo = plant.apply(hf, layer)
    try:
        yield plant
    finally:
        undo()
