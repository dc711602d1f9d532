"""Loading Hugging Face models (local directories or GGUF files) and their
identity for the dump manifest. Never contacts a hub: every load is
``local_files_only`` and a missing file is a FileNotFoundError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from logitparity.dump import SPECIAL_TOKEN_NAMES, tokens_hash
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


def _sha256_text(text: str) -> str:
    return f"sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


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
        "chat_template_hash": _sha256_text(template) if isinstance(template, str) else None,
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


def load_model(model: str | os.PathLike | None = None, *, dtype: str = "fp32", device: str = "cpu",
               tokenizer: Any = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for capture.

    model: None (the embedded default, SmolLM2-135M-Instruct), a Hugging Face
    directory, or a .gguf file (converted once and cached). dtype: fp32 |
    bf16 | fp16. device: cpu | cuda | cuda:N | auto (accelerate device_map,
    for models larger than one GPU). tokenizer: one already loaded from the
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
    path, source = _resolve(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if device == "auto":
            kw["device_map"] = "auto"
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"could not load the model in {path} ({type(e).__name__}: {e}); expected a Hugging Face "
                         "causal-LM directory (config.json, weights, tokenizer)") from None
    if device not in ("cpu", "auto"):
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
            "config_hash": _sha256_text(json.dumps(json.loads(config_text), sort_keys=True)),
            "weights_hash": source["weights_hash"],
            "n_parameters": int(sum(p.numel() for p in lm.parameters())),
            "attn_implementation": getattr(lm.config, "_attn_implementation", None),
        },
        "tokenizer": tokenizer_identity(tokenizer, eos_ids),
    }
    input_device = "cpu" if device == "cpu" else str(lm.get_input_embeddings().weight.device)
    return LoadedModel(lm, tokenizer, identity, dtype, input_device)
