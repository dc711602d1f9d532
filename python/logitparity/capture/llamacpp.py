"""The llama.cpp engine: a GGUF run natively by llama.cpp (through the
ctypes bindings of ``llama-cpp-python``), behind the engine protocol of
capture/engine.py, so its dumps are the same kind as the Hugging Face ones.

It drives llama.cpp's C API directly (model, context, batch, decode,
``llama_get_logits_ith``) rather than ``llama_cpp.Llama``'s completion
methods, so that nothing touches the logits: no sampler chain, no repetition
penalty, no grammar. Every stored row is the float32 vector llama.cpp
returned for that position; a greedy token is its first maximal index, a
sampled token comes from the shared ``decode.Sampler``.

- greedy / sample: the prompt is decoded in batches of ``n_batch`` tokens
  with an output for its last position only, then one token per decode, the
  KV cache carrying the prefix (the way llama.cpp generates);
- score: prompt + continuation are decoded as one sequence (in ``n_batch``
  chunks) with outputs at the positions that predict the continuation, the
  way ``llama-perplexity`` scores a chunk (it, too, feeds the last token).

Tokenizer: llama.cpp's own vocabulary and tokenizer; the chat template is
the GGUF's ``tokenizer.chat_template`` rendered with Jinja2 as transformers
renders it (sandboxed, trim_blocks, lstrip_blocks). The tokenizer identity
is computed from llama.cpp's vocabulary exactly as capture.hf computes it
from transformers' (docs/engines.md), so ``compare`` checks the two against
each other.

Stop rule (``stop_rule``): "tokenizer" (default) stops at the tokenizer's
EOS id, the rule the HF engine uses, so the runs are comparable;
"llama.cpp" stops at every id llama.cpp calls end-of-generation
(``llama_vocab_is_eog``; {0, 2, 4} for SmolLM2). The manifest's
``decoding.eos_token_ids`` holds the rule used, ``engine.eog_token_ids``
llama.cpp's set either way.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitparity.capture.engine import Output, StopRule
from logitparity.dump import text_sha256, tokens_hash

__all__ = ["LlamaCppEngine", "OPTIONS", "STOP_RULES", "TokenizerView", "llama_cpp_available"]

STOP_RULES = ("tokenizer", "llama.cpp")
OPTIONS = ("n_ctx", "n_batch", "n_ubatch", "n_threads", "flash_attn", "stop_rule", "verbose")  # --engine-opt keys
DEFAULT_N_CTX = 2048
DEFAULT_N_BATCH = 512
# The vendored llama.cpp commit of each llama-cpp-python release we have
# built (the library does not report it at run time); read from the sdist's
# vendor/llama.cpp submodule.
_VENDORED_COMMIT = {"0.3.36": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}


def llama_cpp_available() -> str | None:
    """None when llama_cpp imports, else the reason it does not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an ImportError or a failing shared library load
        return f"llama_cpp is not importable ({type(e).__name__}: {e})"
    return None


def _import():
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except Exception as e:  # noqa: BLE001
        raise ValueError(  # a ValueError: the CLI reports it (exit 2) without a traceback
            f"the llama.cpp engine needs llama-cpp-python ({type(e).__name__}: {e}); build it with "
            "`CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python==0.3.36` (docs/engines.md)"
        ) from None
    return llama_cpp, set_verbose


class LlamaCppEngine:
    """A GGUF loaded in llama.cpp (CPU), ready for capture.

    model: a .gguf path, or None for the embedded default
    (SmolLM2-135M-Instruct Q4_1). n_ctx: KV cache positions (prompt + new
    tokens must fit; default 2048). n_batch, n_ubatch: logical and physical
    batch sizes of prompt processing (default 512, llama-cpp-python's).
    n_threads: decode threads (default 1: deterministic and kind to shared
    machines; thread count does not change llama.cpp's CPU results, it
    splits rows). flash_attn: llama.cpp's flash attention (default False,
    llama-cpp-python's default; llama-perplexity turns it on). stop_rule:
    "tokenizer" | "llama.cpp" (module doc). verbose: llama.cpp's log.
    """

    name = "llama.cpp"

    def __init__(self, model: str | os.PathLike | None = None, *, n_ctx: int = DEFAULT_N_CTX,
                 n_batch: int = DEFAULT_N_BATCH, n_ubatch: int | None = None, n_threads: int = 1,
                 flash_attn: bool = False, stop_rule: str = "tokenizer", verbose: bool = False):
        for key, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_threads", n_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        n_ubatch = n_batch if n_ubatch is None else n_ubatch
        if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or not 1 <= n_ubatch <= n_batch:
            raise ValueError(f"n_ubatch must be an int in [1, n_batch={n_batch}], got {n_ubatch!r}")
        if not isinstance(flash_attn, bool):
            raise ValueError(f"flash_attn must be on or off (a bool), got {flash_attn!r}")
        if stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")
        from logitparity.models import default_gguf_path, file_sha256

        path = default_gguf_path() if model is None else Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; the llama.cpp engine needs a .gguf file")
        if path.suffix != ".gguf":
            raise ValueError(f"the llama.cpp engine runs GGUF files, got {path}; convert it with llama.cpp's "
                             "convert_hf_to_gguf.py, or use --engine hf for a Hugging Face directory")
        self.path = path.resolve()
        self.default = model is None
        self.stop_rule = stop_rule
        self.n_ctx, self.n_batch, self.n_ubatch, self.n_threads = n_ctx, n_batch, n_ubatch, n_threads
        self.flash_attn = flash_attn
        lc, set_verbose = _import()
        self._lc = lc
        set_verbose(verbose)
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = lc.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {self.path} (not a GGUF it supports?); "
                             "run with verbose=True to see its log")
        self._ctx = None
        self._batch = None
        try:
            self._vocab = lc.llama_model_get_vocab(self._model)
            cparams = lc.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_ubatch
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cparams.no_perf = True
            self._cparams = cparams
            self._ctx = lc.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ValueError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch})")
            self._batch = lc.llama_batch_init(n_batch, 0, 1)
            self.vocab_size = int(lc.llama_vocab_n_tokens(self._vocab))
            self._weights_hash = file_sha256(self.path)
            self._identity = self._make_identity()
        except BaseException:
            self.close()
            raise

    # ---- lifetime
    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        lc = getattr(self, "_lc", None)
        if lc is None:
            return
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- identity
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp reports it (None if absent)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def metadata(self) -> dict[str, str]:
        out = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(self._lc.llama_model_meta_count(self._model)):
            if self._lc.llama_model_meta_key_by_index(self._model, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            if self._lc.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf)) < 0:
                continue
            out[key] = buf.value.decode("utf-8", "replace")
        return out

    def token_text(self, token: int) -> str:
        return self._lc.llama_vocab_get_text(self._vocab, int(token)).decode("utf-8")

    def chat_template(self) -> str | None:
        t = self._lc.llama_model_chat_template(self._model, None)
        return t.decode("utf-8") if t else None

    def eog_token_ids(self) -> list[int]:
        """Every id llama.cpp treats as end of generation."""
        return [i for i in range(self.vocab_size) if self._lc.llama_vocab_is_eog(self._vocab, i)]

    def _special_ids(self) -> dict[str, int]:
        lc, v = self._lc, self._vocab
        ids = {"bos_token": lc.llama_vocab_bos(v), "eos_token": lc.llama_vocab_eos(v),
               "pad_token": lc.llama_vocab_pad(v)}
        unk = self.meta("tokenizer.ggml.unknown_token_id")  # the C API has no getter for it
        if unk is not None:
            ids["unk_token"] = int(unk)
        return {k: int(i) for k, i in ids.items() if i is not None and int(i) >= 0}

    def tokenizer_identity(self) -> dict[str, Any]:
        """vocab_size, tokens_hash, special_tokens, eos_token_ids,
        chat_template_hash, computed as capture.hf.tokenizer_identity does:
        tokens_hash by dump.tokens_hash (the token strings in id order,
        docs/dump-format.md "Hashes"); special tokens are bos/eos/pad/unk
        where the model defines them."""
        tokens = [self.token_text(i) for i in range(self.vocab_size)]
        special = {k: {"token": tokens[i], "id": i} for k, i in self._special_ids().items()}
        eos = self._lc.llama_vocab_eos(self._vocab)
        template = self.chat_template()
        return {
            "vocab_size": self.vocab_size,
            "tokens_hash": tokens_hash(tokens),
            "special_tokens": special,
            "eos_token_ids": [int(eos)] if eos >= 0 else [],
            "chat_template_hash": text_sha256(template) if template is not None else None,
            "class": f"llama.cpp vocab type {int(self._lc.llama_vocab_type(self._vocab))}",
        }

    def _make_identity(self) -> dict[str, Any]:
        lc = self._lc
        version = str(getattr(lc, "__version__", None) or importlib.metadata.version("llama_cpp_python"))
        buf = ctypes.create_string_buffer(1024)
        lc.llama_model_desc(self._model, buf, len(buf))
        desc = buf.value.decode("utf-8", "replace")
        meta = self.metadata()
        config = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
        lib = Path(lc.__file__).parent / "lib"
        libs = sorted(p for p in lib.glob("lib*.so*") if p.is_file()) if lib.is_dir() else []
        build = hashlib.sha256()
        for p in libs:
            build.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
        ftype = desc.split()[-1].lower() if desc else None
        engine = {
            "name": self.name,
            "version": version,
            "llama_cpp_python": version,
            "llama_cpp_commit": _VENDORED_COMMIT.get(version),
            "build_hash": f"sha256:{build.hexdigest()}" if libs else None,
            "build_libraries": [p.name for p in libs],
            "system_info": lc.llama_print_system_info().decode("utf-8", "replace").strip(),
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads,
            "n_ctx": int(lc.llama_n_ctx(self._ctx)),
            "n_batch": int(lc.llama_n_batch(self._ctx)),
            "n_ubatch": int(lc.llama_n_ubatch(self._ctx)),
            "flash_attn": self.flash_attn,
            "kv_cache_type": {"k": int(self._cparams.type_k), "v": int(self._cparams.type_v)},
            "n_gpu_layers": 0,
            "stop_rule": self.stop_rule,
            "eog_token_ids": self.eog_token_ids(),
            "libraries": ["llama_cpp_python", "jinja2"],
        }
        model = {
            "path": str(self.path),
            "name": meta.get("general.name") or self.path.stem,
            "architecture": meta.get("general.architecture"),
            "format": "gguf",
            "config_hash": text_sha256(json.dumps(config, sort_keys=True, ensure_ascii=False)),
            "weights_hash": self._weights_hash,
            "n_parameters": int(lc.llama_model_n_params(self._model)),
            "description": desc,
            "default": self.default,
        }
        return {"engine": engine, "model": model, "tokenizer": self.tokenizer_identity(),
                "dtype": ftype or "gguf", "device": "cpu"}

    @property
    def identity(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))  # a copy callers may edit

    @property
    def dtype(self) -> str:
        return self._identity["dtype"]

    device = "cpu"

    @property
    def max_context(self) -> int:
        """Positions one sequence may use: the context size (n_ctx)."""
        return self.n_ctx

    @property
    def tokenizer(self) -> "TokenizerView":
        return TokenizerView(self)

    def eos_token_ids(self) -> list[int]:
        """The stop rule's EOS ids (``stop_rule``)."""
        if self.stop_rule == "llama.cpp":
            return self.eog_token_ids()
        return list(self._identity["tokenizer"]["eos_token_ids"])

    # ---- tokens
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lc.llama_token * n_max)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise ValueError(f"llama.cpp could not tokenize a text of {len(data)} bytes (it needs {-n} tokens)")
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in ids:
            n = self._lc.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, True)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp starts a text with BOS (tokenizer.ggml.add_bos_token)."""
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_token_id(self) -> int | None:
        b = int(self._lc.llama_vocab_bos(self._vocab))
        return b if b >= 0 else None

    def apply_chat_template(self, text: str) -> str:
        """The user message ``text`` in the GGUF's chat template, with the
        generation prompt, rendered like transformers' apply_chat_template."""
        template = self.chat_template()
        if template is None:
            raise ValueError(f"{self.path.name} has no tokenizer.chat_template; pass chat_template=False")
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        special = self._identity["tokenizer"]["special_tokens"]
        return env.from_string(template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True,
            bos_token=special.get("bos_token", {}).get("token", ""),
            eos_token=special.get("eos_token", {}).get("token", ""))

    def encode(self, text: str, chat_template: bool | None) -> tuple[list[int], bool]:
        """Input ids of a prompt: the chat template applied when the GGUF has
        one (chat_template None) or when asked; special tokens in the text
        are parsed, as transformers does."""
        has = self.chat_template() is not None
        use = has if chat_template is None else bool(chat_template)
        if use:
            return self.tokenize(self.apply_chat_template(text), add_special=False, parse_special=True), True
        return self.tokenize(text, add_special=True, parse_special=True), False

    # ---- decoding
    def _decode(self, tokens: Sequence[int], pos0: int, outputs: Sequence[bool]) -> None:
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        for i, (t, o) in enumerate(zip(tokens, outputs)):
            b.token[i] = int(t)
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = bool(o)
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {pos0} ({n} tokens; n_ctx "
                               f"{self.n_ctx}): the sequence may not fit the context, pass a larger n_ctx")

    def _row(self, i: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def _clear(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{what} needs {n} positions but the llama.cpp context holds n_ctx={self.n_ctx}; "
                             f"pass n_ctx >= {n} (--engine-opt n_ctx={n})")

    def _feed(self, tokens: Sequence[int], pos0: int, want: Sequence[bool]) -> list[np.ndarray]:
        """Decode tokens from position pos0 in n_batch chunks; -> the rows of
        the positions where want is True, in order."""
        rows: list[np.ndarray] = []
        for lo in range(0, len(tokens), self.n_batch):
            chunk, w = tokens[lo:lo + self.n_batch], want[lo:lo + self.n_batch]
            self._decode(chunk, pos0 + lo, w)
            rows += [self._row(j) for j, o in enumerate(w) if o]
        return rows

    def generate(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], *, max_new_tokens: int,
                 stop: StopRule, sampler: Any = None) -> list[Output]:
        """Greedy (sampler None) or sampled continuations, one sequence at a
        time, the raw row of every step kept."""
        return [self._generate_one(list(p), pid, max_new_tokens, stop, sampler) for p, pid in zip(prompts, ids)]

    def _generate_one(self, prompt: list[int], pid: str, max_new_tokens: int, stop: StopRule,
                      sampler: Any) -> Output:
        if not prompt:
            raise ValueError(f"prompt {pid!r} has no tokens; generation needs at least one")
        self._check_fits(len(prompt) + max_new_tokens - 1, f"prompt {pid!r} ({len(prompt)} tokens) + {max_new_tokens} new")
        gen = sampler.generator(pid) if sampler is not None else None
        self._clear()
        t0 = time.perf_counter()
        row = self._feed(prompt, 0, [False] * (len(prompt) - 1) + [True])[0]
        ttft = time.perf_counter() - t0
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        reason = "max_new_tokens"
        while True:
            if sampler is None:
                tok = int(np.argmax(row))  # first index on ties
            else:
                import torch

                tok = int(sampler.choose(torch.from_numpy(row), gen))
            tokens.append(tok)
            rows.append(row)
            r = stop.reason(tok)
            if r is not None or len(tokens) == max_new_tokens:
                reason = r or "max_new_tokens"
                break
            self._decode([tok], len(prompt) + len(tokens) - 1, [True])
            row = self._row(0)
        t_end = time.perf_counter()
        tps = (len(tokens) - 1) / (t_end - t0 - ttft) if len(tokens) > 1 and t_end - t0 > ttft else None
        return Output(tokens, np.stack(rows), reason, ttft, tps)

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced rows [len(continuation), vocab]: prompt +
        continuation decoded as one sequence (the last token too, as
        llama-perplexity feeds a whole chunk), outputs at the positions that
        predict each continuation token."""
        out = []
        for prompt, cont in zip(prompts, continuations):
            prompt, cont = list(prompt), list(cont)
            if not cont:
                out.append(np.zeros((0, self.vocab_size), np.float32))
                continue
            if not prompt:
                raise ValueError("score needs at least one prompt token (the first prediction needs context)")
            seq = prompt + cont
            self._check_fits(len(seq), f"a scored sequence of {len(prompt)} + {len(cont)} tokens")
            want = [False] * (len(prompt) - 1) + [True] * len(cont) + [False]
            self._clear()
            out.append(np.stack(self._feed(seq, 0, want)))
        return out

    # ---- per-layer tensors (llama.cpp's graph eval callback)
    def layer_outputs(self, tokens: Sequence[int], *, names: Sequence[str] = ("l_out",)) -> dict[str, np.ndarray]:
        """Per-layer tensors of one forward pass over ``tokens``, read from
        llama.cpp's compute graph through its eval callback (``cb_eval``), keyed
        by canonical module path: ``l_out-i`` (decoder layer i's output, the
        residual stream after its MLP) -> ``model.layers.i``, float32
        [len(tokens), n_embd]; other graph names (e.g. ``ffn_out``,
        ``attn_out``) are returned under ``<name>-i`` as llama.cpp calls them.
        A separate context with the same settings runs the pass, so the
        capture context never pays for the callback."""
        lc = self._lc
        ggml = _ggml_lib(Path(lc.__file__).parent / "lib")
        wanted = tuple(f"{n}-" for n in names)
        out: dict[str, np.ndarray] = {}

        @lc.ggml_backend_sched_eval_callback
        def callback(t, ask, _user):
            tensor = ctypes.cast(t, ctypes.POINTER(_GgmlTensor)).contents
            name = tensor.name.decode("utf-8", "replace")
            if not name.startswith(wanted):
                return bool(not ask)  # ask: not wanted; done: keep going
            if ask:
                return True
            if tensor.type != 0:  # GGML_TYPE_F32
                return True
            ne = [int(tensor.ne[i]) for i in range(4)]
            buf = np.empty(ne[1] * ne[0] * max(ne[2], 1) * max(ne[3], 1), np.float32)
            ggml.ggml_backend_tensor_get(t, buf.ctypes.data_as(ctypes.c_void_p), 0, buf.nbytes)
            key = name
            if name.startswith("l_out-"):
                key = f"model.layers.{name.split('-', 1)[1]}"
            out[key] = buf.reshape(ne[1], ne[0]) if ne[2] <= 1 and ne[3] <= 1 else buf
            return True

        cparams = lc.llama_context_default_params()
        for f in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch", "flash_attn_type"):
            setattr(cparams, f, getattr(self._cparams, f))
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        tokens = list(tokens)
        if not 1 <= len(tokens) <= self.n_batch:
            raise ValueError(f"layer_outputs takes 1 to n_batch={self.n_batch} tokens, got {len(tokens)}")
        ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ValueError("llama.cpp could not create a context for the layer capture")
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} in the layer capture")
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))


def _layer_order(key: str) -> tuple[int, str]:
    tail = key.rsplit(".", 1)[-1].rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 30, key)


class _GgmlTensor(ctypes.Structure):
    """The leading fields of ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4,
    GGML_MAX_OP_PARAMS 64 bytes, GGML_MAX_SRC 10, GGML_MAX_NAME 64) of the
    vendored ggml; only type, ne and name are read."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p)]


def _ggml_lib(libdir: Path):
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


class TokenizerView:
    """The few tokenizer calls ppl makes, answered by llama.cpp's own
    tokenizer (special-token text is not parsed, as llama-perplexity does)."""

    is_fast = False  # no offsets: ppl decodes the truncated tokens instead

    def __init__(self, engine: LlamaCppEngine):
        self._e = engine
        special = engine.identity["tokenizer"]["special_tokens"]
        self.bos_token_id = engine.bos_token_id
        self.bos_token = special.get("bos_token", {}).get("token")
        self.pad_token_id = special.get("pad_token", {}).get("id")
        self.add_bos = engine.add_bos

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        if return_offsets_mapping:
            raise ValueError("llama.cpp's tokenizer gives no offsets")
        return {"input_ids": self._e.tokenize(text, add_special=add_special_tokens, parse_special=False)}

    def decode(self, ids: Sequence[int]) -> str:
        return self._e.detokenize(ids)
