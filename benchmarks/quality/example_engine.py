#!/usr/bin/env python3
"""An example external engine: greedy decoding of a Llama-style model,
written without transformers or logitparity, that writes a logitparity dump.

It proves the dump format is engine-neutral: the model is a hand-written
forward pass in torch over the weights read with safetensors, the tokenizer
identity is computed from tokenizer.json with json alone, and the dump is
written with ``safetensors.numpy.save_file`` and json, following
docs/dump-format.md. A Rust or C++ engine would do the same.

Input: a prompts file in JSONL with ``id``, ``category``, ``text``,
``chat_template`` and ``prompt_token_ids`` per line (the harness
``quality_candidate_compare.sh`` writes it from the reference dump, so both
runs see the exact same input tokens; this engine has no tokenizer of its
own). Output: a dump directory.

    python benchmarks/quality/example_engine.py --model HF_DIR \
        --prompts prompts.jsonl --out cand-dump [--dtype fp32|bf16] [--max-new-tokens 32]

No KV cache: each step recomputes the whole sequence (simple, slow, fine
for small models and short continuations).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT, VERSION = "logitparity-dump", "1.0"
ENGINE = {"name": "example-engine", "version": "0.1"}


# ---------------------------------------------------------------- the model


class Llama:
    """Llama-family forward pass (RMSNorm, rotary embeddings, grouped-query
    attention, SwiGLU MLP) from a Hugging Face config.json + safetensors."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        cfg = json.loads((model_dir / "config.json").read_text())
        self.dtype = dtype
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        rope = cfg.get("rope_parameters") or {}
        self.theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        if (rope.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type") or "default") != "default":
            raise SystemExit("example_engine: only the default rotary embedding is implemented")
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.w[k] = st.get_tensor(k).to(dtype)
        if "lm_head.weight" not in self.w:  # tied embeddings
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.vocab = self.w["lm_head.weight"].shape[0]
        self.config_hash = "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
        self.architecture = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x32.to(x.dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        ang = pos[:, None].float() * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = self.head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        """Raw logits (float32, [vocab]) predicting the token after ids."""
        w, n = self.w, len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        pos = torch.arange(n)
        mask = torch.full((n, n), -math.inf).triu(1)
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, self.n_heads, self.head_dim).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, self.n_kv, self.head_dim).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, self.n_kv, self.head_dim).transpose(0, 1)
            q, k = self._rope(q, pos), self._rope(k, pos)
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            att = (q @ k.transpose(1, 2)) / math.sqrt(self.head_dim) + mask.to(q.dtype)
            att = torch.softmax(att.float(), dim=-1).to(q.dtype)
            o = (att @ v).transpose(0, 1).reshape(n, self.n_heads * self.head_dim)
            x = x + o @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            g = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            x = x + g @ w[p + "mlp.down_proj.weight"].T
        x = self._norm(x[-1:], w["model.norm.weight"])
        return (x @ w["lm_head.weight"].T)[0].float()


# ------------------------------------------------------------ the tokenizer


def tokenizer_identity(model_dir: Path) -> dict:
    """vocab_size, tokens_hash, special_tokens and eos_token_ids from
    tokenizer.json, tokenizer_config.json and generation_config.json."""
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    id_to_tok: dict[int, str] = {int(i): t for t, i in tj["model"]["vocab"].items()}
    for a in tj.get("added_tokens", []):
        id_to_tok[int(a["id"])] = a["content"]
    n = max(id_to_tok) + 1
    tokens = [id_to_tok.get(i) for i in range(n)]
    tok_to_id = {t: i for i, t in id_to_tok.items()}
    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        t = tcfg.get(name)
        if isinstance(t, dict):
            t = t.get("content")
        if t is not None:
            special[name] = {"token": t, "id": tok_to_id.get(t)}
    eos: list[int] = []
    for src in ("generation_config.json", "config.json"):
        p = model_dir / src
        v = json.loads(p.read_text()).get("eos_token_id") if p.is_file() else None
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and x not in eos:
                eos.append(x)
    if "eos_token" in special and special["eos_token"]["id"] not in eos and special["eos_token"]["id"] is not None:
        eos.append(special["eos_token"]["id"])
    tokens_hash = hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"vocab_size": n, "tokens_hash": f"sha256:{tokens_hash}", "special_tokens": special,
            "eos_token_ids": eos}


# ------------------------------------------------------------ the dump


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--prompts", required=True, help="JSONL with id, category, text, chat_template, prompt_token_ids")
    ap.add_argument("--out", required=True, help="dump directory to create")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("EXAMPLE_ENGINE_THREADS", "1")))

    model_dir = Path(args.model)
    prompts = [json.loads(line) for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [p.get("id") for p in prompts if "prompt_token_ids" not in p]
    if missing:
        raise SystemExit(f"example_engine: prompts {missing[:3]} have no prompt_token_ids (this engine has no tokenizer)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = Llama(model_dir, dtype)
    tok = tokenizer_identity(model_dir)
    eos = set(tok["eos_token_ids"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    weights = sorted(model_dir.glob("*.safetensors"))
    wh = hashlib.sha256()
    for f in weights:
        wh.update(f"{f.name}\0sha256:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False,
        "engine": ENGINE,
        "model": {"path": str(model_dir.resolve()), "name": model_dir.name, "architecture": model.architecture,
                  "config_hash": model.config_hash, "weights_hash": f"sha256:{wh.hexdigest()}", "hf_dir": str(model_dir.resolve())},
        "tokenizer": tok, "dtype": args.dtype, "device": "cpu",
        "decoding": {"mode": "greedy", "temperature": None, "top_p": None, "seed": None,
                     "max_new_tokens": args.max_new_tokens, "stop_token_ids": [], "eos_token_ids": tok["eos_token_ids"],
                     "repetition_penalty": 1.0, "logit_processors": [], "chat_template": "auto"},
        "logits": {"storage": "full", "dtype": args.dtype, "vocab_size": model.vocab, "lse_dtype": None},
        "libraries": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    write_json_atomic(out / "manifest.json", manifest)
    (out / "records.jsonl").write_text("", encoding="utf-8")

    t_run = time.perf_counter()
    n_tokens = 0
    for seq, p in enumerate(prompts):  # one prompt per shard: simple and resumable
        ids = list(p["prompt_token_ids"])
        gen, rows, reason = [], [], "max_new_tokens"
        t0 = time.perf_counter()
        ttft = None
        for _ in range(args.max_new_tokens):
            logits = model.last_logits(ids + gen)
            if ttft is None:
                ttft = time.perf_counter() - t0
            nxt = int(torch.argmax(logits))  # first index on ties
            gen.append(nxt)
            rows.append(logits.numpy())
            if nxt in eos:
                reason = "eos"
                break
        dt = time.perf_counter() - t0 - ttft
        x = np.stack(rows).astype(np.float32)
        tensor = bf16_bits(x) if args.dtype == "bf16" else x
        shard = f"shard-{seq:05d}.safetensors"
        key = f"{seq:06d}/logits"
        if args.dtype == "bf16":  # safetensors.numpy has no bfloat16: write BF16 bytes under a uint16 view
            _save_bf16(out / f"{shard}.tmp", key, tensor)
        else:
            save_file({key: tensor}, str(out / f"{shard}.tmp"), metadata={"format": FORMAT, "version": VERSION})
        os.replace(out / f"{shard}.tmp", out / shard)
        rec = {"id": p["id"], "category": p.get("category", "default"), "prompt": p["text"],
               "chat_template": bool(p.get("chat_template", False)), "prompt_token_ids": ids,
               "generated_token_ids": gen, "stop_reason": reason, "n_positions": len(gen), "shard": shard,
               "tensors": {"logits": key},
               "timing": {"ttft_s": ttft, "decode_tokens_per_s": (len(gen) - 1) / dt if len(gen) > 1 and dt > 0 else None,
                          "batch_size": 1}}
        with open(out / "records.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n_tokens += len(gen)
    wall = time.perf_counter() - t_run
    manifest["complete"] = True
    manifest["run"] = {"wall_s": wall, "prompts": len(prompts), "tokens": n_tokens, "tokens_per_s": n_tokens / wall,
                       "batch_size": 1, "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       "peak_gpu_bytes": None}
    write_json_atomic(out / "manifest.json", manifest)
    print(f"example_engine: {len(prompts)} prompts, {n_tokens} tokens in {wall:.1f} s -> {out}", file=sys.stderr)
    return 0


def _save_bf16(path: Path, key: str, bits: np.ndarray) -> None:
    """A safetensors file with one BF16 tensor, written by hand from the
    format's definition (8-byte header length, JSON header, raw bytes)."""
    data = np.ascontiguousarray(bits, dtype="<u2").tobytes()
    header = {"__metadata__": {"format": FORMAT, "version": VERSION},
              key: {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [0, len(data)]}}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


if __name__ == "__main__":
    sys.exit(main())
