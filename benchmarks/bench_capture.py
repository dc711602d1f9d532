"""Capture overhead, dump size and peak memory on the default model.

1. Overhead: the default prompts x N new tokens, captured with
   ``logitparity.capture`` (greedy, full fp32 logits, written to disk) vs bare
   batched ``model.generate(..., output_logits=True)`` on the same batches
   (same tokenization, length-sorted, left-padded) in the same process. Both
   keep every step's logits; only capture writes them. Target: capture time
   <= 1.15 x generate time.
2. Peak RSS of a whole capture process at two prompt counts (the default set
   cycled), which should not grow with the prompt count (shards stream).

    python benchmarks/bench_capture.py                      # the issue's sizes
    python benchmarks/bench_capture.py --prompts 16 --max-new-tokens 16 --rss-prompts 32,128
    # on a GPU machine without the default model: a random model of
    # SmolLM2-135M's shape (its weights do not matter for the timing)
    python benchmarks/bench_capture.py --device cuda --random-model smollm2-135m \
        --storage topk:64 --rss-prompts ''
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cycled_prompts(n: int):
    from logitparity.prompts import load_prompts

    base = load_prompts()
    out = []
    for i in range(n):
        p = base[i % len(base)]
        out.append(dataclasses.replace(p, id=p.id if i < len(base) else f"{p.id}#{i // len(base)}"))
    return out


# Shapes of random models for machines without the default model's weights.
RANDOM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
}


def random_model_dir(shape: str, path: Path) -> str:
    """A random Llama of a known shape with the tests' byte-level tokenizer
    (filled up to the model's vocab_size), saved to path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer

    tok = build_tokenizer()
    # Filler tokens up to the model's width, so that every id it generates
    # is a token of its tokenizer (the dump's validation checks that).
    tok.add_tokens([f"<extra_{i}>" for i in range(len(tok), RANDOM_SHAPES[shape]["vocab_size"])])
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=2048, eos_token_id=eos,
                         pad_token_id=pad, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def bare_generate(lm, prompts, batch_size: int, max_new_tokens: int) -> tuple[float, dict[str, list[int]]]:
    """Seconds for batched generate(output_logits=True) on capture's batches
    (the logits kept where the model runs, as capture keeps them)."""
    import torch

    from logitparity.capture.run import _batches, _tokenize

    tok = lm.tokenizer
    eos = lm.identity["tokenizer"]["eos_token_ids"]
    todo = [(p, _tokenize(tok, p, None)[0], True, []) for p in prompts]
    todo.sort(key=lambda t: -len(t[1]))
    tokens = {}
    t0 = time.perf_counter()
    for batch in _batches(todo, batch_size):
        width = max(len(b[1]) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, width - len(b[1]):] = torch.tensor(b[1])
            mask[i, width - len(b[1]):] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, eos_token_id=eos,
                                    pad_token_id=tok.pad_token_id)
        logits = torch.stack(out.logits, dim=1)  # [batch, steps, vocab], kept as capture keeps them
        if logits.is_cuda:
            torch.cuda.synchronize()
        del logits
        for i, b in enumerate(batch):
            seq = out.sequences[i, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
            tokens[b[0].id] = seq[:cut]
    return time.perf_counter() - t0, tokens


def overhead(args) -> dict:
    import torch

    from logitparity import load_dump
    from logitparity.capture import capture, load_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if args.random_model:
        model = random_model_dir(args.random_model, Path(tempfile.mkdtemp()) / "m")
    lm = load_model(model, device=args.device)
    prompts = cycled_prompts(args.prompts)
    bare_generate(lm, prompts[:2], 2, 4)  # warm-up
    rows = []
    for rep in range(args.repeats):  # alternate the order: a shared machine drifts
        row: dict = {"repeat": rep}
        for which in (("generate", "capture") if rep % 2 == 0 else ("capture", "generate")):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "generate":
                _, bare_tokens = bare_generate(lm, prompts, args.batch_size, args.max_new_tokens)
            else:
                tmp = tempfile.TemporaryDirectory()
                out = capture(lm, prompts, Path(tmp.name) / "d", max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, storage=args.storage, progress=False)
            row[f"{which}_s"] = time.perf_counter() - t0
            row[f"{which}_cpu_s"] = time.process_time() - c0
        dump = load_dump(out)
        row["ratio"] = row["capture_s"] / row["generate_s"]
        row["cpu_ratio"] = row["capture_cpu_s"] / row["generate_cpu_s"]
        row["dump_bytes"] = sum(p.stat().st_size for p in out.iterdir())
        row["tokens"] = sum(len(r["generated_token_ids"]) for r in dump.records)
        same = sum(dump.record(pid)["generated_token_ids"] == bare_tokens[pid] for pid in dump.ids)
        row["same_tokens_as_generate"] = f"{same}/{len(prompts)}"
        tmp.cleanup()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"overhead": rows, "best_ratio": min(r["ratio"] for r in rows),
            "best_cpu_ratio": min(r["cpu_ratio"] for r in rows)}


def peak_rss(n: int, args) -> dict:
    code = (
        "import json, sys, tempfile, torch; sys.path[:0] = [%r]\n"
        "if %d: torch.set_num_threads(%d)\n"
        "from bench_capture import cycled_prompts\n"
        "from logitparity.capture import capture\n"
        "from logitparity import load_dump\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    out = capture(None, cycled_prompts(%d), tmp + '/d', max_new_tokens=%d, batch_size=%d, storage=%r, progress=False)\n"
        "    d = load_dump(out)\n"
        "    size = sum(p.stat().st_size for p in out.iterdir())\n"
        "    print(json.dumps({'prompts': len(d), 'peak_rss_mib': d.manifest['run']['peak_host_rss_bytes'] / 2**20,\n"
        "                      'dump_mb': size / 1e6, 'shards': len(list(out.glob('shard-*'))),\n"
        "                      'wall_s': d.manifest['run']['wall_s']}))\n"
    ) % (str(Path(__file__).parent), args.threads, args.threads, n, args.rss_max_new_tokens, args.batch_size, args.storage)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--storage", "--logits", dest="storage", default="full", help="full | topk:K (--logits: the old name)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rss-prompts", default="64,256", help="comma-separated prompt counts for the RSS runs ('' to skip)")
    parser.add_argument("--rss-max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--model", default=None, help="model path (default: the default model)")
    parser.add_argument("--random-model", default=None, choices=sorted(RANDOM_SHAPES),
                        help="a random model of this shape instead (no weights needed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    result: dict = {"settings": vars(args)}
    if not args.skip_overhead:
        result.update(overhead(args))
        print(f"capture / generate: wall {result['best_ratio']:.3f}, CPU {result['best_cpu_ratio']:.3f} "
              "(best of repeats; target <= 1.15)", flush=True)
    rss = []
    for n in [int(x) for x in args.rss_prompts.split(",") if x]:
        rss.append(peak_rss(n, args))
        print(json.dumps(rss[-1]), flush=True)
    result["rss"] = rss
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
