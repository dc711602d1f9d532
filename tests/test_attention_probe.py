"""capture.attention: the query/key/value the attention function receives
and the pre-softmax score range, against a float64 computation by hand on
the tiny random Llama (grouped-query: 4 heads, 2 key/value heads); the model
is unchanged by the probe; the layer comparison and the dump's activations
part carry the attention tensors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import logitparity.layers as L  # noqa: E402
from logitparity.capture import capture, load_model  # noqa: E402
from logitparity.capture.attention import attention_probe  # noqa: E402
from logitparity.capture.hooks import capture_activations, select_modules  # noqa: E402
from logitparity.capture.plants import planted  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def ids(lm):
    return lm.tokenizer.encode(TEXTS[0])


def _by_hand(hf, layer: int, ids: list[int]):
    """q, k, v (after RoPE) as [T, heads·d] and the score max/min per
    position and head, in float64 from the attention input."""
    attn = hf.model.layers[layer].self_attn
    got = {}
    h = attn.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("x", kw["hidden_states"].detach()),
                                       with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        h.remove()
    x = got["x"][0].double().numpy()
    cfg = hf.config
    d = attn.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    t = x.shape[0]
    q = x @ attn.q_proj.weight.detach().double().numpy().T
    k = x @ attn.k_proj.weight.detach().double().numpy().T
    v = x @ attn.v_proj.weight.detach().double().numpy().T
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(m, heads):
        m = m.reshape(t, heads, d)
        rot = np.concatenate([-m[..., d // 2:], m[..., : d // 2]], -1)
        return (m * cos[:, None] + rot * sin[:, None]).reshape(t, heads * d)

    q, k = rope(q, nh), rope(k, nkv)
    qh = q.reshape(t, nh, d)
    kh = np.repeat(k.reshape(t, nkv, d), nh // nkv, axis=1)
    s = np.einsum("ihd,jhd->hij", qh, kh) / np.sqrt(d)
    causal = np.tril(np.ones((t, t), dtype=bool))
    hi = np.where(causal, s, -np.inf).max(-1).T  # [t, heads]
    lo = np.where(causal, s, np.inf).min(-1).T
    return q, k, v, np.concatenate([hi, lo], 1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_probe_records_what_the_attention_uses_against_float64(lm, ids, impl):
    hf = lm.model
    old = hf.config._attn_implementation
    hf.config._attn_implementation = impl
    try:
        with torch.no_grad():
            plain = hf(input_ids=torch.tensor([ids]), use_cache=False).logits
        got = {}
        with attention_probe(hf, ["model.layers.1.self_attn"], lambda p, n, r: got.__setitem__(n, r.clone())):
            with torch.no_grad():
                probed = hf(input_ids=torch.tensor([ids]), use_cache=False).logits
    finally:
        hf.config._attn_implementation = old
    assert torch.equal(plain, probed)  # the probe changes nothing
    q, k, v, sc = _by_hand(hf, 1, ids)
    for name, want in (("query", q), ("key", k), ("value", v), ("scores", sc)):
        g = got[name].double().numpy()
        assert g.shape == want.shape, name
        np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-6 * np.abs(want).max(), err_msg=name)
    # the first query sees only the first key: max == min
    np.testing.assert_array_equal(got["scores"][0, :4], got["scores"][0, 4:])


def test_probe_is_removed_and_ignores_other_modules(lm, ids):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    seen = []
    with attention_probe(lm.model, ["model.layers.0.self_attn"], lambda p, n, r: seen.append((p, n))):
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    assert {p for p, _ in seen} == {"model.layers.0.self_attn"}
    assert [n for _, n in seen] == ["query", "key", "value", "scores"]
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before


def test_probe_rejects_unknown_tensor_and_module(lm):
    with pytest.raises(ValueError, match=r"tensors must be drawn from \('query', 'key', 'value', 'scores'\), got 'q'"):
        with attention_probe(lm.model, ["model.layers.0.self_attn"], lambda *a: None, ["q"]):
            pass
    with pytest.raises(ValueError, match=r"module 'model.layers.9.self_attn' is not in the model"):
        with attention_probe(lm.model, ["model.layers.9.self_attn"], lambda *a: None):
            pass


def test_select_modules_attention_set_and_bad_path(lm):
    paths = select_modules(lm.model, ["layers", "attention"])
    assert paths[:2] == ["model.layers.0", "model.layers.1"]
    assert "model.layers.1.self_attn.scores" in paths and len(paths) == 2 + 8
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.qery' is not in the model"):
        select_modules(lm.model, ["model.layers.0.self_attn.qery"])


def test_layers_names_the_query_for_a_query_only_rope_bug(lm):
    """rope_offset rotates the queries only: the first module out of band is
    the query after rotary embedding (the key is bitwise the same); attn_scale
    leaves q and k alone and shows first in the score range."""
    rt = L.trace_reference(lm, TEXTS, modules=["default", "attention"])
    assert "model.layers.1.self_attn.query" in rt.paths
    with planted(lm, "rope_offset", layer=1):
        c = L.compare_layers(rt, lm)
    assert c.first_divergent == "model.layers.1.self_attn.query"
    assert c.module("model.layers.1.self_attn.key").isolated.rel_l2 == 0.0
    with planted(lm, "attn_scale", layer=1):
        c = L.compare_layers(rt, lm)
    assert c.first_divergent == "model.layers.1.self_attn.scores"
    assert c.module("model.layers.1.self_attn.query").isolated.rel_l2 == 0.0
    # the order is execution order: attention tensors before the attention's output
    order = [m.path for m in c.modules]
    assert order.index("model.layers.1.self_attn.scores") < order.index("model.layers.1.self_attn")


def test_propagated_and_isolated_on_a_hand_written_attention_forward(lm):
    """causal_leak replaces the attention forward: it never calls the
    attention function, and the isolated comparison says so."""
    rt = L.trace_reference(lm, TEXTS[:1], modules=["model.layers.1.self_attn.query"])
    with planted(lm, "causal_leak", layer=1):
        with pytest.raises(ValueError, match=r"model.layers.1.self_attn did not call the attention function"):
            L.compare_layers(rt, lm)


def test_dump_activations_carry_attention_tensors(lm, tmp_path):
    ref = capture(lm, None, tmp_path / "ref", limit=2, max_new_tokens=2, progress=False)
    capture_activations(lm, ref, modules=["layers", "attention"], storage="rows")
    with planted(lm, "attn_scale", layer=1):
        cand = capture(lm, None, tmp_path / "cand", limit=2, max_new_tokens=2, progress=False)
        capture_activations(lm, cand, modules=["layers", "attention"], storage="rows")
    from logitparity.activations import load_activations

    acts = load_activations(ref)
    assert acts.modules[:5] == ["model.layers.0.self_attn.query", "model.layers.0.self_attn.key",
                                "model.layers.0.self_attn.value", "model.layers.0.self_attn.scores", "model.layers.0"]
    s = acts.stats("model.layers.0.self_attn.scores")
    assert s["count"] > 0 and s["nan_fraction"] == 0.0
    c = L.compare_activation_dumps(ref, cand)
    assert c.first_divergent == "model.layers.1.self_attn.scores"
