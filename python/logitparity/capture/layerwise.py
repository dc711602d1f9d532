"""The torch side of the sensitivity map: one reference pass that keeps the
hidden states entering every decoder layer, candidate passes that start at
the first transformed layer, weights transformed in place and restored bit
for bit, and first-order saliency by autograd.

Nothing here computes a figure (``logitparity.sensitivity`` does, with the C++
core). Sequences run one at a time (batch 1, no padding, ``use_cache=False``).

Why the suffix pass is exact: layers before the first transformed one are
untouched, so the hidden states entering layer L are the reference's; the
suffix pass calls layers L … end, the final norm and the LM head with the
same keyword arguments (causal mask, rotary embeddings, positions) the full
forward gave them, i.e. the same operations on the same inputs, and its
logits equal a full forward's bitwise (tests/test_sensitivity.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from logitparity.capture.hooks import decoder_layers, first_tensor, hf_module, model_device
from logitparity.capture.quantize import Transform

__all__ = ["ReferencePass", "SaliencyFigures", "linear_kinds", "logits_from_layer", "reference_pass", "saliency",
           "target_modules", "transformed"]


def linear_kinds(hf: Any) -> list[str]:
    """The Linear module kinds inside decoder layer 0, in named_modules
    order ('self_attn.q_proj', …, 'mlp.down_proj')."""
    layer0 = decoder_layers(hf)[0]
    return [name for name, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)]


def target_modules(hf: Any, layers: Sequence[int], kinds: Sequence[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(path, module) of each kind in each layer, in layer order."""
    dl = decoder_layers(hf)
    out = []
    for i in layers:
        for k in kinds:
            out.append((f"model.layers.{i}.{k}", dl[i].get_submodule(k)))
    return out


@contextlib.contextmanager
def transformed(modules: Sequence[tuple[str, torch.nn.Linear]], transform: Transform) -> Iterator[None]:
    """The modules' weights replaced in place by ``transform``'s output for
    the block; the original tensors are copied first and copied back after
    (also on error), so the model is bitwise what it was."""
    saved = []
    try:
        with torch.no_grad():
            for path, mod in modules:
                w = mod.weight
                saved.append((w, w.detach().clone()))
                w.copy_(transform.apply(w))
        yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


@dataclasses.dataclass
class ReferencePass:
    """The reference's run over a set of sequences: per sequence its logits
    rows [positions, vocab] (float32 numpy), the hidden states entering each
    decoder layer, and the keyword arguments the layers were called with."""

    input_ids: list[list[int]]
    logits: list[np.ndarray]
    layer_inputs: list[list[torch.Tensor]]  # [sequence][layer] -> [1, positions, hidden]
    layer_kwargs: list[dict[str, Any]]  # [sequence] -> kwargs (the same for every layer)
    seconds: float


def _logits_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().reshape(-1, t.shape[-1])
    return t.to(device="cpu", dtype=torch.float32).contiguous().numpy()


def reference_pass(model: Any, sequences: Sequence[Sequence[int]]) -> ReferencePass:
    """Run the model once per sequence, keeping the logits and, through
    forward pre-hooks, every decoder layer's input hidden states and
    keyword arguments."""
    import time

    hf = hf_module(model)
    layers = decoder_layers(hf)
    t0 = time.perf_counter()
    logits, inputs, kwargs_all = [], [], []
    for seq in sequences:
        seen: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
        kw: dict[str, Any] = {}

        def pre(module, args, kwargs, i):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = h.detach()
            if i == 0:
                kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

        handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True)
                   for i, layer in enumerate(layers)]
        try:
            ids = torch.tensor([list(seq)], dtype=torch.long, device=model_device(hf))
            with torch.no_grad():
                out = hf(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        logits.append(_logits_numpy(out.logits))
        inputs.append(seen)
        kwargs_all.append(kw)
    return ReferencePass([list(s) for s in sequences], logits, inputs, kwargs_all, time.perf_counter() - t0)


def logits_from_layer(model: Any, ref: ReferencePass, index: int, start: int) -> np.ndarray:
    """Logits of sequence ``index`` computed from decoder layer ``start`` on,
    fed the reference's hidden states entering that layer (exact when no
    layer before ``start`` is changed; module docstring). start = 0 is a full
    forward of the layers (the embeddings are the reference's)."""
    hf = hf_module(model)
    layers = decoder_layers(hf)
    h = ref.layer_inputs[index][start]
    kw = ref.layer_kwargs[index]
    with torch.no_grad():
        for layer in layers[start:]:
            h = first_tensor(layer(h, **kw))
        h = hf.model.norm(h)
        return _logits_numpy(hf.lm_head(h))


@dataclasses.dataclass
class SaliencyFigures:
    """First-order saliency per Linear module (path -> value), and what the
    backward pass held."""

    weight_grad: dict[str, float]  # Σ |W ⊙ ∂loss/∂W|, loss = mean token NLL (nats)
    act_weight: dict[str, float]  # Σ_ij |W_ij| · ‖X_:,j‖₂ over the scored positions
    loss: float
    tokens: int
    saved_bytes_peak: int  # distinct storages autograd saved for one sequence's backward (parameters excluded), max
    grad_bytes: int  # the weight gradients kept
    seconds: float


def saliency(model: Any, sequences: Sequence[Sequence[int]], rows: Sequence[slice],
             targets: Sequence[np.ndarray], modules: Sequence[tuple[str, torch.nn.Linear]]) -> SaliencyFigures:
    """Weight × gradient and activation × weight norms of ``modules`` on the
    reference. loss = mean NLL over all scored positions of all sequences
    (rows[i] of sequence i's logits predict targets[i]); gradients flow to
    the listed weights only (every other parameter is frozen for the pass
    and restored after). Memory is measured, not estimated: the bytes of the
    distinct tensors autograd saves for backward (saved-tensor hooks) and
    of the weight gradients (one per weight, in its dtype)."""
    import time

    hf = hf_module(model)
    t0 = time.perf_counter()
    weights = {path: mod.weight for path, mod in modules}
    flags = {p: p.requires_grad for p in hf.parameters()}
    sq = {path: torch.zeros(w.shape[1], dtype=torch.float64) for path, w in weights.items()}
    n_total = int(sum(len(t) for t in targets))
    loss_sum = 0.0
    peak = 0
    param_storages = {p.untyped_storage().data_ptr() for p in hf.parameters()}

    def act_hook(path):
        def hook(module, args, kwargs=None):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sq[path] += (x[current_rows[0]] ** 2).sum(0)
        return hook

    current_rows: list[slice] = [slice(None)]
    handles = [mod.register_forward_pre_hook(act_hook(path)) for path, mod in modules]
    try:
        for p in hf.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for seq, r, tgt in zip(sequences, rows, targets):
            current_rows[0] = r
            saved: dict[int, int] = {}

            def pack(t):
                key = t.untyped_storage().data_ptr()
                if key not in param_storages:  # a weight saved for backward costs nothing extra
                    saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
                return t

            ids = torch.tensor([list(seq)], dtype=torch.long, device=model_device(hf))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = hf(input_ids=ids, use_cache=False)
                logp = torch.log_softmax(out.logits[0, r].to(torch.float32), dim=-1)
                t = torch.as_tensor(np.asarray(tgt), dtype=torch.long, device=logp.device)
                nll = -logp.gather(1, t[:, None]).sum()
            peak = max(peak, sum(saved.values()))
            (nll / n_total).backward()  # torch sums the sequences' gradients in .grad
            loss_sum += float(nll.detach())
        wg = {path: float((w.detach().to(torch.float64) * w.grad.to(torch.float64)).abs().sum())
              for path, w in weights.items()}
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
    aw = {path: float((weights[path].detach().to(torch.float64).abs() * sq[path].sqrt()[None, :]).sum())
          for path in weights}
    grad_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    return SaliencyFigures(wg, aw, loss_sum / max(n_total, 1), n_total, int(peak), int(grad_bytes),
                           time.perf_counter() - t0)
