"""Planted bugs stay inside their layer and submodule, benign changes keep
the outputs, and every plant is undone bitwise."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import randomize_norms  # noqa: E402
from logitparity.capture import capture, load_model  # noqa: E402
from logitparity.capture.plants import PLANTS, planted  # noqa: E402

LAYER = 1  # the tiny model's last decoder layer


@pytest.fixture(scope="module")
def lm(tiny_model_dir, torch_one_thread):
    """The tiny model with trained-looking norm weights (a random init leaves
    them at ones, where a missing norm weight would change nothing)."""
    return randomize_norms(load_model(tiny_model_dir))


def _outputs(lm, ids):
    """Logits and the outputs of every module of interest, by canonical path."""
    hf = lm.model
    names = {}
    for i, layer in enumerate(hf.model.layers):
        names[f"model.layers.{i}"] = layer
        for sub in ("self_attn", "mlp", "post_attention_layernorm"):
            names[f"model.layers.{i}.{sub}"] = getattr(layer, sub)
    got, handles = {}, []
    for path, mod in names.items():
        def hook(m, args, out, path=path):
            got[path] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            got["logits"] = hf(input_ids=ids).logits.detach().clone()
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="module")
def ids(lm):
    return torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])


@pytest.mark.parametrize("name", [n for n, p in PLANTS.items() if p.kind == "bug"])
def test_bug_is_confined_to_its_layer_and_submodule(lm, ids, name):
    clean = _outputs(lm, ids)
    with planted(lm, name, layer=LAYER) as plant:
        bad = _outputs(lm, ids)
    after = _outputs(lm, ids)
    # Layer 0 is untouched, bitwise.
    for path in [p for p in clean if p.startswith("model.layers.0")]:
        assert torch.equal(clean[path], bad[path]), path
    # The bug's own submodule changes output.
    target = plant.module_path(LAYER)
    assert target == f"model.layers.{LAYER}.{plant.submodule}"
    assert not torch.equal(clean[target], bad[target]), target
    # Modules that run before it in the same layer are untouched: the MLP and
    # norm bugs leave the layer's attention bitwise the same.
    if plant.submodule != "self_attn":
        assert torch.equal(clean[f"model.layers.{LAYER}.self_attn"], bad[f"model.layers.{LAYER}.self_attn"])
    if plant.submodule == "mlp":
        norm = f"model.layers.{LAYER}.post_attention_layernorm"
        assert torch.equal(clean[norm], bad[norm])
    assert not torch.equal(clean["logits"], bad["logits"])
    # Undone bitwise.
    for path in clean:
        assert torch.equal(clean[path], after[path]), path


def test_benign_weights_cloned_is_bitwise_the_same(lm, ids):
    clean = _outputs(lm, ids)
    with planted(lm, "weights_cloned", layer=LAYER):
        other = _outputs(lm, ids)
    for path in clean:
        assert torch.equal(clean[path], other[path]), path


def test_benign_split_gate_up_agrees_to_float32_rounding(lm, ids):
    clean = _outputs(lm, ids)
    with planted(lm, "split_gate_up", layer=LAYER):
        other = _outputs(lm, ids)
    diff = (clean["logits"] - other["logits"]).abs().max().item()
    assert diff <= 1e-5 * clean["logits"].abs().max().item()


def test_benign_rope_shift_both_agrees_to_float32_rounding(lm, ids):
    clean = _outputs(lm, ids)
    with planted(lm, "rope_shift_both", layer=LAYER):
        other = _outputs(lm, ids)
    assert not torch.equal(clean["logits"], other["logits"])  # rounding differs
    diff = (clean["logits"] - other["logits"]).abs().max().item()
    assert diff <= 1e-5 * clean["logits"].abs().max().item()


def test_causal_leak_lets_a_position_see_the_next_token(lm, ids):
    """Changing token 1 changes the leaky layer's attention output at
    position 0, and does not without the plant (an independent check of the
    mask: causality is what the clean model guarantees)."""
    other = ids.clone()
    other[0, 1] = (other[0, 1] + 1) % lm.model.config.vocab_size
    path = f"model.layers.{LAYER}.self_attn"
    a, b = _outputs(lm, ids), _outputs(lm, other)
    assert torch.equal(a[path][0, 0], b[path][0, 0])
    with planted(lm, "causal_leak", layer=LAYER):
        a, b = _outputs(lm, ids), _outputs(lm, other)
        # Position 0 of layer 0 cannot see token 1; only the leaky layer does.
        assert torch.equal(a[f"model.layers.0.self_attn"][0, 0], b[f"model.layers.0.self_attn"][0, 0])
        assert not torch.equal(a[path][0, 0], b[path][0, 0])


def test_causal_leak_with_a_causal_mask_only_is_the_clean_attention(lm, ids):
    """The leaky forward computes the clean attention when its extra
    diagonal is empty: a one-token sequence has no next token."""
    one = ids[:, :1]
    clean = _outputs(lm, one)
    with planted(lm, "causal_leak", layer=LAYER):
        leaky = _outputs(lm, one)
    torch.testing.assert_close(leaky["logits"], clean["logits"], rtol=1e-5, atol=1e-6)


def test_plants_run_under_greedy_capture(lm, tmp_path):
    """Every plant works in KV-cached batched decoding (left padding)."""
    ref = capture(lm, None, tmp_path / "ref", limit=3, max_new_tokens=4, batch_size=3)
    for name in PLANTS:
        with planted(lm, name, layer=LAYER):
            capture(lm, None, tmp_path / name, limit=3, max_new_tokens=4, batch_size=3)
    assert ref.exists()


def test_unknown_plant_names_the_choices(lm):
    with pytest.raises(ValueError, match=r"unknown plant 'down_proj_rol'.*did you mean 'down_proj_roll'"):
        with planted(lm, "down_proj_rol", layer=0):
            pass


def test_layer_out_of_range(lm):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\] \(the model has 2 decoder layers\), got 2"):
        with planted(lm, "attn_scale", layer=2):
            pass


def test_not_a_model():
    with pytest.raises(TypeError, match="model must be a LoadedModel or a Llama-style HF causal LM"):
        with planted(object(), "attn_scale", layer=0):
            pass
