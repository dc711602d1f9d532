#!/usr/bin/env python3
"""Capture a Hugging Face model (PyTorch) on a prompt set into a dump: the
reference side of the quality harness.

    python benchmarks/quality/quality_pytorch_compare.py --out ref-dump \
        [--model HF_DIR_OR_GGUF] [--prompts FILE] [--dtype fp32] [--limit N] [--max-new-tokens M]

Then run a candidate (another dtype here, or any engine through
quality_candidate_compare.sh) and compare with quality_compare.py. A thin
script over ``logitparity.capture.capture``; ``logitparity dump`` has every
option.
"""

from __future__ import annotations

import argparse
import sys

from logitparity.capture import capture


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dump directory to write")
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", default=None, help="prompts file (default: the embedded prompt set)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--storage", "--logits", dest="storage", default="full", help="full | topk:K (--logits: the old name)")
    args = ap.parse_args(argv)
    out = capture(args.model, args.prompts, args.out, dtype=args.dtype, device=args.device, limit=args.limit,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, storage=args.storage,
                  logits_dtype="bf16" if args.dtype == "bf16" else "fp32")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
