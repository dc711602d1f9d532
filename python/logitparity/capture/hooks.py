"""Forward hooks on Hugging Face decoder models: the torch side of
``logitparity.layers`` and of the dump's activations part.

Everything here runs a model; nothing computes a figure (the C++ core does,
driven by ``logitparity.layers`` and ``logitparity.activations``).

Module names are canonical paths as ``named_modules`` spells them for a
Llama-style causal LM (``model.layers.10.mlp.down_proj``). A module's
*output* is its first tensor output (attention returns ``(output, weights)``)
reshaped to ``[positions, width]``; one prompt runs at a time (batch 1, no
padding), with ``use_cache=False`` so nothing carries between passes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from logitparity.layers import module_kind

__all__ = [
    "DEFAULT_KINDS",
    "MODULE_SETS",
    "has_module",
    "capture_activations",
    "ModuleRecord",
    "Trace",
    "decoder_layers",
    "hf_module",
    "module_kind",
    "select_modules",
    "swapped_layers",
    "tokenize_prompts",
    "trace",
    "logits_rows",
    "run_isolated",
    "to_numpy_rows",
]

# What the layer comparison looks at by default: per decoder layer its two
# norms, attention, MLP and the layer's output (the residual stream).
DEFAULT_KINDS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "layer")


def hf_module(model: Any, name: str = "model") -> Any:
    """A LoadedModel or an HF causal LM -> the HF module (checked)."""
    hf = model.model if hasattr(model, "identity") and hasattr(model, "tokenizer") else model
    if not isinstance(hf, torch.nn.Module):
        raise TypeError(f"{name} must be a LoadedModel (logitparity.capture.load_model) or a torch "
                        f"nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    return hf


def decoder_layers(hf: Any, name: str = "model") -> Any:
    """The ModuleList of decoder layers (``hf.model.layers``)."""
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{name} must be a Llama-style causal LM with decoder layers at .model.layers, "
                        f"got {type(hf).__name__}")
    return layers


# Module sets by name (select_modules, capture_activations).
MODULE_SETS = ("default", "all", "layers", "attention")


def _attention_paths(hf: Any) -> list[str]:
    """The attention tensors (capture.attention) of every decoder layer:
    query and key after rotary embedding, value, score range."""
    from logitparity.capture.attention import ATTENTION_TENSORS

    names = dict(hf.named_modules())
    return [f"{p}.{t}" for p in names if module_kind(p)[1] == "self_attn" for t in ATTENTION_TENSORS]


def has_module(hf: Any, path: str, names: dict | None = None) -> bool:
    """A module path of ``hf``, or an attention tensor of one of its attention modules."""
    from logitparity.capture.attention import split_attention_path

    names = dict(hf.named_modules()) if names is None else names
    att = split_attention_path(path)
    return path in names or (att is not None and att[0] in names)


def select_modules(hf: Any, modules: str | Sequence[str] | None = None) -> list[str]:
    """Module paths to observe, in ``named_modules`` order. modules: None or
    'default' (DEFAULT_KINDS of every decoder layer), 'all' (those plus every
    Linear and every norm inside the layers), 'layers' (every decoder layer's
    output), 'attention' (every layer's query and key after rotary embedding,
    value and score range: capture.attention), or a list of paths and of
    these names (``['default', 'attention']``)."""
    decoder_layers(hf)
    names = dict(hf.named_modules())
    if modules is None or modules in ("default", "all"):
        out = []
        for path, mod in names.items():
            layer, kind = module_kind(path)
            if layer is None:
                continue
            if kind in DEFAULT_KINDS or (modules == "all" and (
                    isinstance(mod, torch.nn.Linear) or "norm" in type(mod).__name__.lower())):
                out.append(path)
        return out
    if modules == "layers":
        return [p for p in select_modules(hf, None) if module_kind(p)[1] == "layer"]
    if modules == "attention":
        return _attention_paths(hf)
    if isinstance(modules, str):
        raise ValueError(f"modules must be None, one of {MODULE_SETS}, or a list of module paths and set names, "
                         f"got {modules!r}")
    out = []
    for m in modules:
        for p in (select_modules(hf, m) if m in MODULE_SETS else [m]):
            if p not in out:
                out.append(p)
    missing = [m for m in out if not has_module(hf, m, names)]
    if missing:
        import difflib

        close = difflib.get_close_matches(missing[0], list(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"module {missing[0]!r} is not in the model (paths as named_modules() spells them, "
                         f"e.g. 'model.layers.0.mlp', attention tensors as 'model.layers.0.self_attn.query'){hint}")
    return out


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Prompt objects (or strings) -> token ids, with the same chat-template
    rule as capture (the template when the tokenizer has one)."""
    from logitparity.capture.engine import hf_encode
    from logitparity.prompts import Prompt

    out = []
    for i, p in enumerate(prompts):
        prompt = p if isinstance(p, Prompt) else Prompt(f"prompt-{i}", "default", p)
        ids = hf_encode(tokenizer, prompt.text, None)[0]
        if not ids:
            raise ValueError(f"prompt {prompt.id!r} tokenizes to no tokens; give it some text")
        out.append(ids)
    return out


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"module output is {type(out).__name__}, not a tensor or a tuple starting with one")


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(-1, t.shape[-1])


@dataclasses.dataclass
class ModuleRecord:
    """One module's call in one pass: its output rows and (when kept) the
    positional and keyword inputs it was called with."""

    path: str
    output: torch.Tensor  # [positions, width], the module's dtype
    args: tuple | None = None
    kwargs: dict | None = None


@dataclasses.dataclass
class Trace:
    """One forward pass of one prompt: modules in completion order (a
    submodule before the layer that holds it) and the final logits rows."""

    input_ids: list[int]
    modules: list[ModuleRecord]
    logits: torch.Tensor  # [positions, vocab]


def _detach_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach_tree(v) for v in x)
    if isinstance(x, list):
        return [_detach_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach_tree(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _hooks(hf: Any, paths: Sequence[str], on_output) -> Iterator[None]:
    names = dict(hf.named_modules())
    handles = []
    for path in paths:
        def hook(module, args, kwargs, output, path=path):
            on_output(path, args, kwargs, output)

        handles.append(names[path].register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_device(hf: Any) -> torch.device:
    return hf.get_input_embeddings().weight.device


def trace(hf: Any, input_ids: Sequence[int], paths: Sequence[str], *, keep_inputs: bool = False,
          keep_outputs: bool = True) -> Trace:
    """Run ``hf`` on one prompt, recording every module in ``paths`` as it
    completes (its output rows, and with keep_inputs its call's inputs).
    Attention tensors (``…self_attn.query``, capture.attention) are recorded
    as the attention function receives them; with keep_inputs, their record
    holds the inputs of the attention module that computed them."""
    from logitparity.capture.attention import attention_probe, split_attention_path

    records: list[ModuleRecord] = []
    names = dict(hf.named_modules())
    real = [p for p in paths if p in names]
    virtual: dict[str, list[str]] = {}
    for p in paths:
        att = split_attention_path(p)
        if p not in names and att is not None:
            virtual.setdefault(att[0], []).append(att[1])
    attn_inputs: dict[str, tuple] = {}

    def on_output(path, args, kwargs, output):
        rec = ModuleRecord(path, flat_rows(first_tensor(output)) if keep_outputs else torch.empty(0))
        if keep_inputs:
            rec.args, rec.kwargs = _detach_tree(args), _detach_tree(kwargs)
        records.append(rec)

    def on_tensor(attn_path, name, rows):
        if name not in virtual[attn_path]:
            return
        rec = ModuleRecord(f"{attn_path}.{name}", rows if keep_outputs else torch.empty(0))
        if keep_inputs:
            rec.args, rec.kwargs = attn_inputs[attn_path]
        records.append(rec)

    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(hf))
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_hooks(hf, real, on_output))
        if virtual:
            if keep_inputs:
                for attn_path in virtual:
                    def pre(module, args, kwargs, attn_path=attn_path):
                        attn_inputs[attn_path] = (_detach_tree(args), _detach_tree(kwargs))

                    h = names[attn_path].register_forward_pre_hook(pre, with_kwargs=True)
                    stack.callback(h.remove)
            wanted = sorted({t for ts in virtual.values() for t in ts}, key=("query", "key", "value", "scores").index)
            stack.enter_context(attention_probe(hf, list(virtual), on_tensor, wanted))
        out = hf(input_ids=ids, use_cache=False)
    return Trace(list(input_ids), records, flat_rows(out.logits))


def _cast_tree(x: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_cast_tree(v, dtype, device) for v in x)
    if isinstance(x, list):
        return [_cast_tree(v, dtype, device) for v in x]
    if isinstance(x, dict):
        return {k: _cast_tree(v, dtype, device) for k, v in x.items()}
    return x


def _module_dtype(module: Any, fallback: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


def run_isolated(hf: Any, record: ModuleRecord) -> torch.Tensor:
    """Module ``record.path`` of ``hf`` called on the reference's inputs
    (floating tensors cast to the module's dtype) -> its output rows. For an
    attention tensor, the attention module is called on them and the tensor
    its attention function receives is returned."""
    from logitparity.capture.attention import attention_probe, split_attention_path

    att = split_attention_path(record.path)
    names = dict(hf.named_modules())
    if att is not None and record.path not in names:
        module = names[att[0]]
        got: list[torch.Tensor] = []
        with attention_probe(hf, [att[0]], lambda p, n, rows: got.append(rows), [att[1]]):
            _call_on(module, record, hf)
        if not got:
            raise ValueError(f"{att[0]} did not call the attention function (a hand-written forward?), so its "
                             f"{att[1]} cannot be observed; compare without the attention tensors")
        return got[-1]
    return flat_rows(first_tensor(_call_on(hf.get_submodule(record.path), record, hf)))


def _call_on(module: Any, record: ModuleRecord, hf: Any) -> Any:
    dev = next(module.parameters()).device if any(True for _ in module.parameters()) else model_device(hf)
    dtype = _module_dtype(module, record.output.dtype)
    args = _cast_tree(record.args, dtype, dev)
    kwargs = _cast_tree(record.kwargs, dtype, dev)
    with torch.no_grad():
        return module(*args, **kwargs)


@contextlib.contextmanager
def swapped_layers(candidate: Any, reference: Any, layers: Sequence[int]) -> Iterator[None]:
    """The candidate with its decoder layers ``layers`` replaced by the
    reference's (copied to the candidate's dtype where they differ), restored
    afterwards."""
    cand_layers = decoder_layers(candidate, "candidate")
    ref_layers = decoder_layers(reference, "reference")
    saved = {i: cand_layers[i] for i in layers}
    try:
        for i in layers:
            ref = ref_layers[i]
            dtype = _module_dtype(cand_layers[i], torch.float32)
            dev = next(cand_layers[i].parameters()).device
            if _module_dtype(ref, dtype) != dtype or next(ref.parameters()).device != dev:
                ref = copy.deepcopy(ref).to(device=dev, dtype=dtype)
            cand_layers[i] = ref
        yield
    finally:
        for i, mod in saved.items():
            cand_layers[i] = mod


def logits_rows(hf: Any, input_ids: Sequence[int]) -> torch.Tensor:
    """Final logits rows of one prompt (no hooks)."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(hf))
    with torch.no_grad():
        return flat_rows(hf(input_ids=ids, use_cache=False).logits)


def to_numpy_rows(t: torch.Tensor):
    """[rows, width] tensor -> (numpy array the core reads without a copy
    where possible, is_bf16): float32/float16 as they are, bfloat16 as uint16
    bits, anything else as float32."""
    import numpy as np

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), True
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy(), False
    return t.float().numpy(), False


def capture_activations(model: Any, dump_dir: Any, *, modules: str | Sequence[str] | None = "layers",
                        limit: int | None = None, generated: int = 0, storage: str = "stats",
                        budget_mb: float | None = None, aliases: dict[str, str] | None = None) -> Any:
    """Record module outputs of ``model`` into the activations part of the
    dump ``dump_dir`` (captured from the same model), one forward pass per
    prompt over the prompt tokens and the first ``generated`` generated
    tokens (teacher-forced: the positions of the prefill and of the first
    decode steps). modules: 'layers' (every decoder layer's output), None or
    'default' (DEFAULT_KINDS), 'all', 'attention' (query/key after rotary
    embedding, value, score range: capture.attention), or a list of paths
    and of these names (``['layers', 'attention']``). limit: the first N
    records. Returns the activations manifest path."""
    from logitparity.activations import DEFAULT_BUDGET_MB, ActivationWriter
    from logitparity.dump import load_dump

    if isinstance(generated, bool) or not isinstance(generated, int) or generated < 0:
        raise ValueError(f"generated must be an int >= 0 (generated tokens to include), got {generated!r}")
    rows_of = _engine_rows(model, modules) if hasattr(model, "layer_outputs") else _hf_rows(model, modules)
    dump = load_dump(dump_dir)
    records = list(dump.records)[:limit] if limit else list(dump.records)
    writer = None
    for r in records:
        ids = list(r["prompt_token_ids"]) + list(r["generated_token_ids"])[:generated]
        rows = rows_of(ids)
        if writer is None:  # modules listed in execution order, as the first pass ran them
            writer = ActivationWriter(dump.path, list(rows), storage=storage,
                                      budget_mb=DEFAULT_BUDGET_MB if budget_mb is None else budget_mb,
                                      aliases=aliases,
                                      positions={"prefill": True, "generated": generated, "kv_cache": False})
        writer.add(r["id"], rows)
    if writer is None:
        raise ValueError(f"dump {dump.path} has no records to record activations of")
    return writer.close()


def _hf_rows(model: Any, modules: Any):
    """-> ids -> {path: (rows, bf16)} of an HF model's modules, in execution order."""
    hf = hf_module(model)
    paths = select_modules(hf, modules)

    def rows_of(ids: list[int]) -> dict[str, Any]:
        # Tensors: the writer adds CUDA ones to its statistics on the GPU and
        # copies the rest (and any rows it keeps) to the host.
        return {rec.path: rec.output for rec in trace(hf, ids, paths).modules}

    return rows_of


def _engine_rows(engine: Any, modules: Any):
    """The same for an engine with ``layer_outputs(tokens)`` (the llama.cpp
    engine: decoder layer outputs from its graph, already under their
    canonical paths ``model.layers.i``)."""
    if modules not in ("layers", None, "default"):
        raise ValueError(f"{type(engine).__name__} records decoder layer outputs only (modules='layers'), "
                         f"got modules={modules!r}")

    def rows_of(ids: list[int]) -> dict[str, Any]:
        outs = {k: v for k, v in engine.layer_outputs(ids).items() if k.startswith("model.layers.")}
        order = sorted(outs, key=lambda p: int(p.rsplit(".", 1)[1]))
        return {p: (np.ascontiguousarray(outs[p], dtype=np.float32), False) for p in order}

    return rows_of
