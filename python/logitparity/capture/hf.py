"""Loading Hugging Face models (local directories or GGUF files) and their
identity for the dump manifest. Never contacts a hub: every load is
``local_files_only`` and a missing file is a FileNotFoundError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from logitparity.dump import SPECIAL_TOKEN_NAMES, text_sha256, tokens_hash
from logitparity.models import SOURCE_FILE, default_model_dir, file_sha256, gguf_model_dir

__all__ = ["DTYPES", "LoadedModel", "convert_gguf", "load_model"]

DTYPES = ("fp32", "bf16", "fp16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for capture. ``identity`` holds the manifest's ``model``
    and ``tokenizer`` sections; ``device`` is where inputs go."""

    model: Any
    tokenizer: Any
    identity: dict[str, Any]
    dtype: str
    device: str


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _torch_dtype(dtype: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return table[dtype]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a Hugging Face safetensors directory ``out``
    (model, tokenizer with its chat template, generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kw = dict(gguf_file=gguf.name, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer marker
    # so that save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _resolve(model: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """-> (HF directory to load, source description for the identity)."""
    if model is None:
        path = default_model_dir()
        source = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
        return path, {"path": source["gguf"], "format": "gguf", "weights_hash": source["gguf_sha256"]}
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_model_dir(p), {"path": str(p.resolve()), "format": "gguf", "weights_hash": file_sha256(p)}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {p} has no config.json; expected a Hugging Face model directory")
        return p, {"path": str(p.resolve()), "format": "hf", "weights_hash": _weights_hash(p)}
    if p.exists():
        raise ValueError(f"model {p} is a file but not a .gguf; pass a Hugging Face directory or a .gguf file")
    raise FileNotFoundError(
        f"model {str(model)!r} does not exist locally; pass a Hugging Face directory or a .gguf file "
        "(models are never downloaded at run time)"
    )


def _weights_hash(path: Path) -> str:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"model directory {path} holds no weights (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def tokenizer_identity(tokenizer: Any, eos_ids: list[int]) -> dict[str, Any]:
    """Vocab size, hash of the token strings in id order, special tokens."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            special[name] = {"token": str(tok), "id": tokenizer.convert_tokens_to_ids(str(tok))}
    template = getattr(tokenizer, "chat_template", None)
    return {
        "vocab_size": n,
        "tokens_hash": tokens_hash(tokens),
        "special_tokens": special,
        "eos_token_ids": eos_ids,
        "chat_template_hash": text_sha256(template) if isinstance(template, str) else None,
        "class": type(tokenizer).__name__,
    }


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


# config.json keys that give the longest sequence a model was built for, by family
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context (positions it was built for) from its config.json
    dict, or None when the config does not say."""
    for src in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in _CONTEXT_KEYS:
            v = src.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def load_tokenizer(model: str | os.PathLike | None = None) -> tuple[Any, int | None]:
    """The tokenizer of ``model`` and its context length, without loading the
    weights (so prompts can be checked before the model loads)."""
    path, _ = _resolve(model)
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"could not load the tokenizer in {path} ({type(e).__name__}: {e}); "
                         "expected a Hugging Face tokenizer (tokenizer.json or tokenizer_config.json)") from None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'} is not readable JSON ({e})") from None
    return tokenizer, context_length(config) if isinstance(config, dict) else None


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_placement(device: str, device_map: Any, max_memory: Any, offload_folder: Any) -> Any:
    """The device_map to pass to from_pretrained (None: one device), its
    arguments checked (accelerate's own errors name no argument)."""
    import torch

    if device_map is None:
        if device != "auto":
            if max_memory is not None or offload_folder is not None:
                raise ValueError("max_memory and offload_folder apply to a device map: pass device_map='auto' "
                                 "(--device-map auto) or an explicit map, or device='auto'")
            return None
        device_map = "auto"
    elif device not in ("cpu", "auto"):
        raise ValueError(f"pass either device ({device!r}) or device_map, not both: a device map places every "
                         "module itself (its GPU entries are indices or 'cuda:N')")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"device_map must be one of {DEVICE_MAP_STRATEGIES} or a dict module -> device "
                             f"(e.g. {{'model.layers.0': 0, 'lm_head': 'cpu'}}), got {device_map!r}")
    elif isinstance(device_map, dict) and device_map:
        for mod, dev in device_map.items():
            ok = isinstance(mod, str) and (
                dev in ("cpu", "disk") or (isinstance(dev, int) and not isinstance(dev, bool) and 0 <= dev < max(gpus, 1))
                or (isinstance(dev, str) and re.fullmatch(r"cuda(:\d+)?", dev) is not None))
            if not ok:
                raise ValueError(f"device_map[{mod!r}] must be 'cpu', 'disk', a GPU index or 'cuda:N', got {dev!r}")
            if (isinstance(dev, int) or str(dev).startswith("cuda")) and not gpus:
                raise ValueError(f"device_map[{mod!r}] is {dev!r} but torch sees no CUDA device; map it to 'cpu' "
                                 "or 'disk'")
        if "disk" in device_map.values() and offload_folder is None:
            raise ValueError("device_map puts modules on 'disk': pass offload_folder (--offload-folder DIR), the "
                             "directory accelerate keeps their weights in")
    else:
        raise ValueError(f"device_map must be a strategy name {DEVICE_MAP_STRATEGIES} or a non-empty dict module "
                         f"-> device, got {device_map!r}")
    if max_memory is not None:
        if not isinstance(device_map, str):
            raise ValueError("max_memory bounds what an automatic device map places; an explicit map ignores it")
        if not isinstance(max_memory, dict) or not max_memory:
            raise ValueError(f"max_memory must be a dict device -> bytes or size string (e.g. {{0: '20GiB', "
                             f"'cpu': '64GiB'}}), got {max_memory!r}")
        for dev, size in max_memory.items():
            if not (dev in ("cpu", "disk") or (isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0)):
                raise ValueError(f"max_memory key must be 'cpu', 'disk' or a GPU index, got {dev!r}")
            if not ((isinstance(size, int) and not isinstance(size, bool) and size > 0)
                    or (isinstance(size, str) and re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", size, re.I))):
                raise ValueError(f"max_memory[{dev!r}] must be a positive byte count or a size like '20GiB', "
                                 f"got {size!r}")
    return device_map


def parse_device_map(spec: str) -> Any:
    """--device-map: a strategy name, or a JSON file {module: device}."""
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                         f"{{module: device}}, got {spec!r} (no such file)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--device-map {p}: not readable JSON ({e}); expected an object module -> device") from None
    if not isinstance(m, dict):
        raise ValueError(f"--device-map {p}: expected a JSON object module -> device, got {type(m).__name__}")
    return m


def parse_max_memory(spec: str) -> dict[Any, Any]:
    """--max-memory '0=20GiB,cpu=64GiB' -> {0: '20GiB', 'cpu': '64GiB'}."""
    out: dict[Any, Any] = {}
    for item in str(spec).split(","):
        dev, sep, size = item.strip().partition("=")
        if not sep or not dev or not size:
            raise ValueError(f"--max-memory must look like DEVICE=SIZE[,DEVICE=SIZE] (e.g. 0=20GiB,cpu=64GiB), "
                             f"got {spec!r}")
        out[int(dev) if dev.isdigit() else dev] = int(size) if size.isdigit() else size
    return out


def _input_device(lm: Any) -> str:
    """Where a device-mapped model takes its input ids: the device its
    embedding executes on (accelerate's hook), cpu for offloaded weights."""
    emb = lm.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        dev = emb.weight.device
    dev = str(dev) if not isinstance(dev, int) else f"cuda:{dev}"
    return "cpu" if dev in ("meta", "disk") else dev


def load_model(model: str | os.PathLike | None = None, *, dtype: str = "fp32", device: str = "cpu",
               tokenizer: Any = None, device_map: Any = None, max_memory: Any = None,
               offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for capture.

    model: None (the embedded default, SmolLM2-135M-Instruct), a Hugging Face
    directory, or a .gguf file (converted once and cached). dtype: fp32 |
    bf16 | fp16. device: cpu | cuda | cuda:N | auto (accelerate
    ``device_map="auto"``, for models larger than one GPU). device_map:
    accelerate's placement instead of one device: a strategy ("auto",
    "balanced", "balanced_low_0", "sequential") or a dict module -> device
    ('cpu', 'disk', a GPU index); max_memory: the strategy's bound per device
    ({0: '20GiB', 'cpu': '64GiB'}); offload_folder: where weights placed on
    'disk' live (docs/distributed.md). The manifest's ``placement`` records
    the map used. tokenizer: one already loaded from the
    same model (load_tokenizer). Nothing read from the model directory runs
    code: trust_remote_code is off, so a directory asking for custom code is
    an error, never a prompt.
    """
    import torch

    torch_dtype = _torch_dtype(dtype)
    if not (device in ("cpu", "cuda", "auto") or str(device).startswith("cuda:")):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        if device != "auto":
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device; use --device cpu")
    placement = _check_placement(device, device_map, max_memory, offload_folder)
    path, source = _resolve(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if placement is not None:
            kw["device_map"] = placement
            if max_memory is not None:
                kw["max_memory"] = max_memory
            if offload_folder is not None:
                kw["offload_folder"] = str(offload_folder)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"could not load the model in {path} ({type(e).__name__}: {e}); expected a Hugging Face "
                         "causal-LM directory (config.json, weights, tokenizer)") from None
    if placement is None and device != "cpu":
        lm = lm.to(device)
    lm.eval()
    if device != "cpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config_text = (path / "config.json").read_text(encoding="utf-8")
    eos_ids = eos_token_ids(lm, tokenizer)
    identity = {
        "model": {
            **source,
            "name": getattr(lm.config, "_name_or_path", None) or path.name,
            "architecture": (getattr(lm.config, "architectures", None) or [type(lm).__name__])[0],
            "hf_dir": str(path.resolve()),
            "config_hash": text_sha256(json.dumps(json.loads(config_text), sort_keys=True)),
            "weights_hash": source["weights_hash"],
            "n_parameters": int(sum(p.numel() for p in lm.parameters())),
            "attn_implementation": getattr(lm.config, "_attn_implementation", None),
        },
        "tokenizer": tokenizer_identity(tokenizer, eos_ids),
    }
    if placement is not None:
        hf_map = getattr(lm, "hf_device_map", None) or {}
        identity["placement"] = {
            "device_map": placement if isinstance(placement, str) else {k: str(v) for k, v in placement.items()},
            "modules": {k: v if isinstance(v, str) else f"cuda:{v}" for k, v in hf_map.items()},
            "max_memory": None if max_memory is None else {str(k): v for k, v in max_memory.items()},
            "offload_folder": None if offload_folder is None else str(Path(offload_folder).resolve()),
        }
    input_device = "cpu" if placement is None and device == "cpu" else (
        _input_device(lm) if placement is not None else str(lm.get_input_embeddings().weight.device))
    return LoadedModel(lm, tokenizer, identity, dtype, input_device)
