"""logitparity.layers on the tiny random Llama: every planted bug is named at
its layer and submodule in isolated mode, lossless changes and a clean bf16
candidate (with a bf16 floor from other prompts) are named nowhere, and the
figures agree with a float64 numpy computation from independent hooks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import randomize_norms  # noqa: E402
import logitparity.layers as L  # noqa: E402
from logitparity.capture import load_model  # noqa: E402
from logitparity.capture.plants import PLANTS, planted  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Question: what is 12 times 7? Answer: 84."]
OTHER = ["Once upon a time, in a quiet village by the sea.", "Bonjour le monde. Hallo Welt.",
         '{"name": "Ada", "age": 36}']


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return randomize_norms(load_model(tiny_model_dir))


@pytest.fixture(scope="module")
def ref_trace(lm):
    return L.trace_reference(lm, TEXTS)


BUGS = [n for n, p in PLANTS.items() if p.kind == "bug"]


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", BUGS)
def test_isolated_names_the_planted_layer_and_submodule(lm, ref_trace, name, layer):
    with planted(lm, name, layer=layer) as plant:
        c = L.compare_layers(ref_trace, lm)
    assert c.first_divergent == plant.module_path(layer)
    assert c.first_divergent_layer == layer
    ev = c.evidence
    assert ev["kind"] == plant.submodule and ev["layer"] == layer
    assert ev["error"]["rel_l2"] > ev["band"]["rel_l2"] or ev["error"]["rel_l2_max"] > ev["band"]["rel_l2_max"]
    # Isolation: every module of the other layer is bitwise the same.
    for m in c.modules:
        if m.layer != layer:
            assert m.isolated.rel_l2 == 0.0 and m.isolated.max_abs == 0.0, m.path


def test_rope_shift_of_queries_and_keys_is_lossless_in_exact_arithmetic(lm, ref_trace):
    """Shifting q and k by the same position keeps every relative distance:
    only rounding changes, well inside the fp32 band; the query-only shift
    (rope_offset) is a real bug."""
    with planted(lm, "rope_shift_both", layer=1):
        c = L.compare_layers(ref_trace, lm)
    assert c.first_divergent is None
    assert 0 < c.module("model.layers.1.self_attn").isolated.rel_l2 < 1e-5
    with planted(lm, "rope_offset", layer=1):
        assert L.compare_layers(ref_trace, lm).first_divergent == "model.layers.1.self_attn"


@pytest.mark.parametrize("name", ["weights_cloned", "split_gate_up"])
def test_lossless_changes_are_named_nowhere(lm, ref_trace, name):
    with planted(lm, name, layer=1):
        c = L.compare_layers(ref_trace, lm, mode="both")
    assert c.first_divergent is None and c.evidence is None
    assert all(m.propagated is not None and m.isolated is not None for m in c.modules)


def test_thread_count_is_named_nowhere(lm, ref_trace):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c = L.compare_layers(ref_trace, lm)
    finally:
        torch.set_num_threads(threads)
    assert c.first_divergent is None


def test_clean_bf16_candidate_with_a_bf16_floor_from_other_prompts(lm, tiny_model_dir, tmp_path):
    cand = randomize_norms(load_model(tiny_model_dir, dtype="bf16"))
    floor = L.compare_layers(lm, cand, OTHER)
    path = L.save_floor(floor, tmp_path / "floor.json", description="bf16 twin on OTHER")
    c = L.compare_layers(lm, cand, TEXTS, noise_floor=path)
    assert c.first_divergent is None
    assert c.ref_dtype == "fp32" and c.cand_dtype == "bf16"
    assert all("floor" in m.band.source for m in c.modules)
    # The bf16 error is real (not zero) and the floor is what keeps it in.
    assert max(m.isolated.rel_l2 for m in c.modules) > 1e-3
    # Without a floor the documented bf16 default band also holds it.
    assert L.compare_layers(lm, cand, TEXTS).first_divergent is None
    # Against an fp32 band the same candidate diverges at its first module.
    fp32_floor = L.LayerFloor({m.path: (0.0, 0.0) for m in c.modules}, 1.0, "isolated", "fp32", "fp32", "zero")
    assert L.compare_layers(lm, cand, TEXTS, noise_floor=fp32_floor).first_divergent == \
        "model.layers.0.input_layernorm"


def _hook_outputs(hf, ids, paths):
    got, inputs, handles = {}, {}, []
    mods = dict(hf.named_modules())
    for p in paths:
        def hook(m, args, kwargs, out, p=p):
            t = out[0] if isinstance(out, tuple) else out
            got[p] = t.detach().double().reshape(-1, t.shape[-1])
            inputs[p] = (args, kwargs)
        handles.append(mods[p].register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got, inputs


def _figures(pairs):
    """float64 numpy figures over a list of (ref rows, cand rows)."""
    a = np.concatenate([r.numpy() for r, _ in pairs])
    b = np.concatenate([c.numpy() for _, c in pairs])
    d = b - a
    rel_rows = np.linalg.norm(d, axis=1) / np.linalg.norm(a, axis=1)
    return {"rel_l2": np.linalg.norm(d) / np.linalg.norm(a),
            "cosine": float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())),
            "max_abs": np.abs(d).max(), "sqnr_db": 10 * math.log10((a * a).sum() / (d * d).sum()),
            "rel_l2_mean": rel_rows.mean(), "rel_l2_max": rel_rows.max(), "positions": a.shape[0]}


def test_figures_match_float64_numpy(lm, ref_trace):
    path = "model.layers.1.mlp"
    tok = lm.tokenizer
    ids = [list(t) for t in ref_trace.token_ids]
    clean = [_hook_outputs(lm.model, t, [path]) for t in ids]
    with planted(lm, "int8_gate_proj", layer=1):
        c = L.compare_layers(ref_trace, lm, mode="both")
        bad = [_hook_outputs(lm.model, t, [path]) for t in ids]
        mlp = lm.model.get_submodule(path)
        with torch.no_grad():
            iso = [mlp(cl[1][path][0][0]).double().reshape(-1, 64) for cl in clean]
    assert tok is not None
    m = c.module(path)
    for got, want in ((m.propagated, _figures([(cl[0][path], bd[0][path]) for cl, bd in zip(clean, bad)])),
                      (m.isolated, _figures([(cl[0][path], i) for cl, i in zip(clean, iso)]))):
        assert got.positions == want["positions"] == sum(len(t) for t in ids)
        for k in ("rel_l2", "cosine", "max_abs", "sqnr_db", "rel_l2_mean", "rel_l2_max"):
            # float32 outputs, float64 sums on both sides: 1e-9 relative
            assert getattr(got, k) == pytest.approx(want[k], rel=1e-9), k
        assert got.nonfinite_ref == got.nonfinite_cand == 0


def test_propagated_mode_and_all_modules(lm, ref_trace):
    rt = L.trace_reference(lm, TEXTS, modules="all")
    with planted(lm, "down_proj_roll", layer=0):
        c = L.compare_layers(rt, lm, mode="propagated")
    # With every Linear observed, the bug is pinned to the projection itself.
    assert c.first_divergent == "model.layers.0.mlp.down_proj"
    assert c.judged_by == "propagated" and c.modules[0].isolated is None
    # Propagated errors are inherited downstream: the later layer differs too.
    assert c.module("model.layers.1").propagated.rel_l2 > 0


def load_model_copy(lm):
    import copy

    return copy.deepcopy(lm.model)


def test_nonfinite_candidate_leaves_the_band(lm, ref_trace):
    mlp = lm.model.model.layers[1].mlp

    def hook(m, args, out):
        out = out.clone()
        out[..., 0, 3] = float("inf")
        return out

    h = mlp.register_forward_hook(hook)
    try:
        c = L.compare_layers(ref_trace, lm)
    finally:
        h.remove()
    e = c.module("model.layers.1.mlp").isolated
    assert e.nonfinite_cand == len(TEXTS) and e.nonfinite_ref == 0
    assert c.first_divergent == "model.layers.1.mlp"
    assert "non-finite" in c.evidence["why"]


def _deep_model(layers=8, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bad", [0, 3, 7])
def test_bisect_finds_the_first_bad_layer_in_log_passes(bad):
    import copy

    ref = _deep_model()
    cand = copy.deepcopy(ref)
    prompts = [[1, 5, 9, 22, 3, 17], [4, 4, 8, 100, 2]]
    with planted(cand, "down_proj_roll", layer=bad):
        b = L.bisect_layers(ref, cand, prompts)
    assert b.first_bad_layer == bad and not b.outside_layers
    assert b.passes <= 2 + math.ceil(math.log2(8))
    assert L.bisect_layers(ref, cand, prompts).first_bad_layer is None
    # A second bad layer later does not move the answer.
    with planted(cand, "down_proj_roll", layer=bad), planted(cand, "attn_scale", layer=7):
        assert L.bisect_layers(ref, cand, prompts).first_bad_layer == bad


def test_plain_hf_modules_and_token_ids():
    import copy

    ref = _deep_model(layers=3)
    cand = copy.deepcopy(ref)
    with planted(cand, "attn_scale", layer=2):
        c = L.compare_layers(ref, cand, [[1, 2, 3, 4, 5]])
    assert c.first_divergent == "model.layers.2.self_attn" and c.prompts == ["tokens-0"]


def test_floor_file_round_trip_and_format(lm, ref_trace, tmp_path):
    with planted(lm, "split_gate_up", layer=1):
        c = L.compare_layers(ref_trace, lm)
    p = L.save_floor(c, tmp_path / "f.json", description="split", margin=2.0)
    doc = json.loads(p.read_text())
    assert doc["format"] == "logitparity-layer-floor" and doc["version"] == "1.0" and doc["mode"] == "isolated"
    assert set(doc["modules"]) == {m.path for m in c.modules}
    floor = L.load_floor(p)
    assert floor.margin == 2.0
    band = floor.band("model.layers.1.mlp")
    want = max(2.0 * c.module("model.layers.1.mlp").isolated.rel_l2, L.default_band("fp32", "fp32").rel_l2)
    assert band.rel_l2 == want


def test_floor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"floor file .*nope.json does not exist; write one with"):
        L.load_floor(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "logitparity-dump"}))
    with pytest.raises(ValueError, match=r"layer floor file .*bad.json: expected format 'logitparity-layer-floor', "
                                         r"found format 'logitparity-dump', which is a dump manifest"):
        L.load_floor(bad)
    bad.write_text(json.dumps({"format": "logitparity-layer-floor", "version": "2.0", "modules": {}}))
    with pytest.raises(ValueError, match=r"bad.json: version 2.0 is newer than this logitparity reads \(1.0\); upgrade logitparity"):
        L.load_floor(bad)
    bad.write_text(json.dumps({"format": "logitparity-layer-floor", "version": "1.0", "modules": {"m": {}}}))
    with pytest.raises(ValueError, match=r"module 'm' needs numeric 'rel_l2' and 'rel_l2_max'"):
        L.load_floor(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(Expecting"):
        L.load_floor(bad)
    with pytest.raises(TypeError, match=r"noise_floor must be None, a floor file path or a LayerFloor, got int"):
        L._resolve_floor(3)


def test_default_band_definition():
    b = L.default_band("fp32", "bf16")
    assert b.rel_l2 == 16 * 2.0 ** -8 and b.rel_l2_max == 4 * b.rel_l2
    assert L.default_band("fp32", "fp32").rel_l2 == 1024 * 2.0 ** -24
    with pytest.raises(ValueError, match=r"cand_dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'int8'"):
        L.default_band("fp32", "int8")


def test_argument_errors(lm, ref_trace):
    with pytest.raises(ValueError, match=r"mode must be one of \('isolated', 'propagated', 'both'\), got 'x'"):
        L.compare_layers(ref_trace, lm, mode="x")
    with pytest.raises(ValueError, match=r"reference and candidate are the same model object.*trace_reference"):
        L.compare_layers(lm, lm)
    with pytest.raises(ValueError, match=r"prompts are text but no tokenizer is known"):
        L.compare_layers(lm.model, load_model_copy(lm), ["hello"])
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlpp' is not in the model.*did you mean "
                                         r"'model.layers.0.mlp'"):
        L.trace_reference(lm, TEXTS, modules=["model.layers.0.mlpp"])
    with pytest.raises(ValueError, match=r"reference is a ReferenceTrace: its prompts and modules are fixed"):
        L.compare_layers(ref_trace, lm, TEXTS)
    with pytest.raises(TypeError, match=r"candidate must be a LoadedModel .* got str"):
        L.compare_layers(ref_trace, "model-dir")
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a Prompt, a non-empty str or a list of token ids"):
        L.compare_layers(lm, load_model_copy(lm), [""])
    with pytest.raises(ValueError, match=r"bisect needs two distinct model objects"):
        L.bisect_layers(lm, lm, TEXTS)
