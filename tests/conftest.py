"""Shared fixtures: a tiny random Llama-style model saved as a Hugging Face
directory, built offline from a config with a fixed seed.

``tiny_model_dir`` (session-scoped) holds config.json, model.safetensors,
generation_config.json and a byte-level BPE tokenizer (ChatML chat template,
eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS). Its vocabulary is
TINY_VOCAB tokens and the model's logit rows have the same width.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 times 7? Answer: 84.",
    '{"name": "Ada", "age": 36, "languages": ["en", "fr"]}',
    "Bonjour le monde. Hallo Welt. Hola mundo. こんにちは世界。",
    "Once upon a time, in a quiet village by the sea, there lived a lighthouse keeper.",
]


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """Byte-level BPE trained on a fixed corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(path, *, seed: int = 0, vocab_size: int = TINY_VOCAB, model_vocab_size: int | None = None) -> str:
    """Save a tiny random LlamaForCausalLM (hidden 64, 2 layers) and its
    tokenizer to ``path``; returns the path as a string. ``vocab_size``: the
    tokenizer's (the fixed corpus supports up to 439);
    ``model_vocab_size``: a padded width for the logit rows (default: the
    tokenizer's). Different seeds give different weights, same tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size, len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=model_vocab_size or vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def randomize_norms(lm, seed: int = 0):
    """Give a loaded model trained-looking norm weights, 1 + 0.2·N(0, 1) drawn
    from ``seed``: a random init leaves them at ones, where a missing or scaled
    norm weight would change nothing. Returns ``lm``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return lm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a tiny random Llama-style HF model directory (see module doc)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module's model runs (tiny models gain nothing
    from more, and on a shared 2-core machine two threads were 10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
