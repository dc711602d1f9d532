"""Token ids -> text for reports, from a tokenizer.json with the
``tokenizers`` package alone (no transformers import: it took ~95% of a
demo-sized ``compare`` on 2 cores).

The tokenizer directory comes from the dump's manifest, so it is data: it is
used only when its vocabulary hashes to the manifest's
``tokenizer.tokens_hash`` (so the text shown is the text of those ids), it is
parsed as JSON by the tokenizers library (nothing in it can run code), and a
failure means "show token ids", never an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from logitparity._dicts import dig as _get

__all__ = ["auto_decoder"]

# transformers' clean_up_tokenization (applied when tokenizer_config.json asks for it)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _cleanup_wanted(directory: Path) -> bool:
    import json

    try:
        cfg = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("clean_up_tokenization_spaces") is True


def auto_decoder(manifest: dict) -> Callable[[Sequence[int]], str] | None:
    """A decoder for the dump's token ids, or None when no tokenizer.json
    matching the manifest's vocabulary is found locally."""
    from logitparity.dump import tokens_hash

    want_hash = _get(manifest, "tokenizer", "tokens_hash")
    want_size = _get(manifest, "tokenizer", "vocab_size")
    if not isinstance(want_hash, str) or not isinstance(want_size, int) or isinstance(want_size, bool):
        return None
    dirs = [_get(manifest, "tokenizer", "path"), _get(manifest, "model", "tokenizer_path"),
            _get(manifest, "model", "hf_dir"), _get(manifest, "model", "path")]
    for d in dirs:
        if not isinstance(d, str) or not d:
            continue
        directory = Path(d)
        tj = directory / "tokenizer.json"
        try:
            if not tj.is_file():
                continue
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tj))
            if tok.get_vocab_size(with_added_tokens=True) != want_size:
                continue
            if tokens_hash([tok.id_to_token(i) for i in range(want_size)]) != want_hash:
                continue
        except Exception:  # noqa: BLE001 - an unreadable tokenizer means: show ids
            continue
        cleanup = _cleanup_wanted(directory)

        def decode(ids: Sequence[int], tok=tok, cleanup=cleanup) -> str:
            text = tok.decode([int(i) for i in ids], skip_special_tokens=False)
            if cleanup:
                for a, b in _CLEANUP:
                    text = text.replace(a, b)
            return text

        return decode
    return None
