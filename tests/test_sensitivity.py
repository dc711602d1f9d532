"""Sensitivity map (logitparity.sensitivity, capture.quantize,
capture.layerwise): every transform against a float64 NumPy reference, the
suffix pass against a full forward, the map's KL against a by-hand path
(NumPy-quantized weights in a copy of the model, a plain forward, NumPy
KL), bit-exact restoration, the plan, saliency, summary statistics, and one
test per CLI error message."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from logitparity.capture.quantize import (FP8_E4M3_MAX, cast_bf16, cast_fp8_e4m3, cast_fp16,  # noqa: E402
                                          fake_quant, make_transform, prune_magnitude)
from logitparity.sensitivity import (RISK_CUTOFFS, average_ranks, risk_of, sensitivity_map,  # noqa: E402
                                     spearman)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------
# float64 NumPy references, written as plain loops over groups


def ref_fake_quant(w: np.ndarray, bits: int, group: int | None, symmetric: bool) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    out = np.empty_like(w)
    g = w.shape[1] if group is None else group
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0:c0 + g]
            if symmetric:
                qmax = 2.0 ** (bits - 1) - 1
                amax = np.max(np.abs(x))
                if amax == 0:
                    out[r, c0:c0 + g] = x
                    continue
                s = amax / qmax
                out[r, c0:c0 + g] = np.clip(np.round(x / s), -qmax, qmax) * s
            else:
                levels = 2.0 ** bits - 1
                lo, hi = np.min(x), np.max(x)
                if hi == lo:
                    out[r, c0:c0 + g] = x
                    continue
                s = (hi - lo) / levels
                z = np.clip(np.round(-lo / s), 0, levels)
                out[r, c0:c0 + g] = (np.clip(np.round(x / s) + z, 0, levels) - z) * s
    return out


def e4m3_grid() -> np.ndarray:
    """Non-negative finite E4M3FN values, code 0 … 126 (127 is NaN), decoded
    from the bits: exponent e = code >> 3 (bias 7), mantissa m = code & 7."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(2.0 ** -6 * (m / 8) if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))
    grid = np.array(vals)
    assert np.all(np.diff(grid) > 0) and grid[-1] == 448.0
    return grid


def ref_fp8(x: np.ndarray) -> np.ndarray:
    grid = e4m3_grid()
    out = np.empty_like(x, dtype=np.float64)
    for i, v in enumerate(np.asarray(x, dtype=np.float64).reshape(-1)):
        if np.isnan(v):
            out.flat[i] = np.nan
            continue
        a = min(abs(v), 448.0)
        j = int(np.searchsorted(grid, a))
        if j < grid.size and grid[j] == a:
            q = a
        else:
            lo, hi = grid[j - 1], grid[j]
            dl, dh = a - lo, hi - a
            q = lo if dl < dh else hi if dh < dl else (lo if (j - 1) % 2 == 0 else hi)  # tie: even code
        out.flat[i] = math.copysign(q, v)
    return out


def ref_bf16(x: np.ndarray) -> np.ndarray:
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return (r & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _weights(shape=(6, 64), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = 0.0125  # a constant group
    w[2, 5] = 0.9  # an outlier
    return w


# --------------------------------------------------------------------------
# the transforms


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("group", [None, 16, 32], ids=["per-channel", "g16", "g32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_fake_quant_matches_float64_reference(bits, group, symmetric):
    w = _weights()
    got = fake_quant(w, bits, group_size=group, symmetric=symmetric)
    want = ref_fake_quant(w.numpy(), bits, group, symmetric).astype(np.float32)
    assert got.dtype == torch.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got.numpy(), want)
    # levels: at most 2^bits distinct values per group
    g = w.shape[1] if group is None else group
    for row in got.numpy():
        for c0 in range(0, w.shape[1], g):
            assert np.unique(row[c0:c0 + g]).size <= 2 ** bits


def test_int4_symmetric_by_hand():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    # scale 0.1; 0.7/0.1 = 7, -3.5 -> -4 (half to even), 1, 0
    np.testing.assert_allclose(fake_quant(w, 4).numpy(), [[0.7, -0.4, 0.1, 0.0]], rtol=1e-6)


def test_casts_match_references():
    x = torch.tensor(np.concatenate([np.random.default_rng(1).normal(0, 3, 2000),
                                     [65504.0, 65520.0, 1e5, -1e-8, 0.0, 3.0e-5, np.inf, -np.inf]]),
                     dtype=torch.float32)
    with np.errstate(over="ignore"):  # 65520 and 1e5 overflow to inf, as the cast must
        want16 = x.numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cast_fp16(x).numpy(), want16)
    assert torch.isinf(cast_fp16(torch.tensor([65520.0]))).all()  # fp16 overflows to inf
    finite = x[torch.isfinite(x)]
    np.testing.assert_array_equal(cast_bf16(finite).numpy(), ref_bf16(finite.numpy()))


def test_fp8_e4m3_matches_the_grid():
    grid = e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    rng = np.random.default_rng(2)
    rand = np.exp(rng.uniform(np.log(1e-4), np.log(1000.0), 4000)) * rng.choice([-1, 1], 4000)
    x = np.concatenate([grid, -grid, mids, -mids, rand, [449.0, 464.0, 480.0, 1e6, -1e6, np.inf, -np.inf, np.nan,
                                                         2.0 ** -10, 2.0 ** -10 * 3, 2.0 ** -11]])
    got = cast_fp8_e4m3(torch.tensor(x, dtype=torch.float64)).numpy()
    want = ref_fp8(x)
    np.testing.assert_array_equal(got, want)
    assert np.nanmax(np.abs(got)) == FP8_E4M3_MAX
    # float32 weights: the same values
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(cast_fp8_e4m3(torch.tensor(x32)).numpy(), ref_fp8(x32.astype(np.float64))
                                  .astype(np.float32))
    # where torch has the float8 dtype, its cast agrees inside the range
    if hasattr(torch, "float8_e4m3fn"):
        inside = torch.tensor(x[np.isfinite(x) & (np.abs(x) <= 448)], dtype=torch.float32)
        np.testing.assert_array_equal(cast_fp8_e4m3(inside).numpy(),
                                      inside.to(torch.float8_e4m3fn).to(torch.float32).numpy())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_prune_matches_reference(sparsity):
    w = _weights(seed=3)
    got = prune_magnitude(w, sparsity).numpy()
    flat = w.numpy().reshape(-1).copy()
    k = int(math.floor(sparsity * flat.size))
    flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
    np.testing.assert_array_equal(got, flat.reshape(w.shape))
    assert (got == 0).sum() >= k


def test_prune_ties_take_the_lower_index_first():
    w = torch.tensor([[0.5, -0.5, 0.5, 0.25]])
    np.testing.assert_array_equal(prune_magnitude(w, 0.5).numpy(), [[0.0, -0.5, 0.5, 0.0]])


def test_transform_names():
    assert make_transform("int4", group_size=32).name == "int4 g=32 sym"
    assert make_transform("int8", symmetric=False).name == "int8 per-channel asym"
    assert make_transform("fp8").name == "fp8-e4m3"
    assert make_transform("prune", sparsity=0.5).name == "prune 0.5"


@pytest.mark.parametrize("kwargs, match", [
    (dict(transform="int3"), r"transform \(--transform\) must be one of int8, int4, .*got 'int3'; did you mean"),
    (dict(transform="int4", group_size=0), r"group_size \(--group-size\) must be a positive int .* got 0"),
    (dict(transform="fp16", group_size=32), r"group_size \(--group-size\) applies to int8/int4 only"),
    (dict(transform="bf16", symmetric=False), r"symmetric=False \(--asymmetric\) applies to int8/int4 only"),
    (dict(transform="prune"), r"transform 'prune' needs sparsity \(--sparsity\) in \[0, 1\)"),
    (dict(transform="prune", sparsity=1.0), r"sparsity \(--sparsity\) must be a number in \[0, 1\) .*got 1.0"),
    (dict(transform="prune", sparsity=-0.1), r"sparsity \(--sparsity\) must be a number in \[0, 1\) .*got -0.1"),
    (dict(transform="int4", sparsity=0.5), r"sparsity \(--sparsity\) applies to transform 'prune' only"),
    (dict(transform=3.0), r"transform must be one of .* or a callable"),
])
def test_make_transform_errors(kwargs, match):
    t = kwargs.pop("transform")
    with pytest.raises(ValueError, match=match):
        make_transform(t, **kwargs)


# --------------------------------------------------------------------------
# summary statistics


def test_spearman_against_hand_formulas():
    a = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.6])
    b = np.array([2.0, 7.0, 1.0, 8.0, 2.8, 1.8, 3.0])
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    n = a.size
    want = 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))  # no ties
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties: average ranks [0.5, 0.5, 2] vs [0, 1, 2] -> Pearson of the ranks
    np.testing.assert_array_equal(average_ranks([1.0, 1.0, 2.0]), [0.5, 0.5, 2.0])
    x, y = np.array([0.5, 0.5, 2.0]), np.array([0.0, 1.0, 2.0])
    want = float(np.corrcoef(x, y)[0, 1])
    assert spearman([1.0, 1.0, 2.0], [10.0, 20.0, 30.0]) == pytest.approx(want, abs=1e-12)
    assert math.isnan(spearman([1.0, 1.0], [1.0, 2.0]))


def test_risk_cutoffs():
    lo, hi = RISK_CUTOFFS
    assert [risk_of(x) for x in (0.0, lo * 0.999, lo, hi * 0.999, hi, math.inf, math.nan)] == \
        ["L", "L", "M", "M", "H", "H", "H"]


# --------------------------------------------------------------------------
# the model side: a 4-layer tiny Llama built in memory (no tokenizer:
# prompts are token-id lists)


@pytest.fixture(scope="module")
def four_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(5)
    return LlamaForCausalLM(cfg).eval()


def _seqs(n=3, length=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, length).tolist() for _ in range(n)]


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl_by_hand(model, seqs, layer, bits=4, group=32, symmetric=True):
    """The independent path: NumPy-quantized weights loaded into a copy of
    the model, a plain full forward, KL in float64 NumPy."""
    cand = copy.deepcopy(model)
    lay = cand.model.layers[layer]
    with torch.no_grad():
        for mod in lay.modules():
            if isinstance(mod, torch.nn.Linear):
                q = ref_fake_quant(mod.weight.numpy(), bits, group, symmetric)
                mod.weight.copy_(torch.tensor(q, dtype=torch.float32))
    kls = []
    for s in seqs:
        ids = torch.tensor([s])
        with torch.no_grad():
            a = model(input_ids=ids).logits[0, :-1].numpy()
            b = cand(input_ids=ids).logits[0, :-1].numpy()
        lp, lq = _np_log_softmax(a), _np_log_softmax(b)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    return np.concatenate(kls)


def test_map_kl_matches_by_hand_for_every_layer(four_layer):
    seqs = _seqs()
    m = sensitivity_map(four_layer, "int4", group_size=32, prompts=seqs, layers=[0, 2, 3])
    assert [c.layer for c in m.cells] == [0, 2, 3] and m.layers_label == "0, 2, 3"
    assert "Strip, layers 0, 2, 3:" in m.to_markdown()
    for c in m.cells:
        hand = _kl_by_hand(four_layer, seqs, c.layer)
        assert c.figures.tokens == hand.size == 3 * 39
        assert c.mean_kl == pytest.approx(hand.mean(), rel=0.10)  # the done-when criterion
        assert c.mean_kl == pytest.approx(hand.mean(), rel=1e-3)  # what it actually is
        assert c.figures.kl.p99 == pytest.approx(np.percentile(hand, 99), rel=1e-3)
        assert c.mean_kl > 0


def test_summary_figures_against_numpy(four_layer):
    seqs = _seqs(2, 30, seed=1)
    m = sensitivity_map(four_layer, "int8", prompts=seqs, layers=[1])
    f = m.cells[0].figures
    cand = copy.deepcopy(four_layer)
    with torch.no_grad():
        for mod in cand.model.layers[1].modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.tensor(ref_fake_quant(mod.weight.numpy(), 8, None, True), dtype=torch.float32))
    kl, same, na, nb = [], [], [], []
    for s in seqs:
        ids = torch.tensor([s])
        with torch.no_grad():
            lp = _np_log_softmax(four_layer(input_ids=ids).logits[0, :-1].numpy())
            lq = _np_log_softmax(cand(input_ids=ids).logits[0, :-1].numpy())
        t = np.array(s[1:])
        kl.append((np.exp(lp) * (lp - lq)).sum(-1))
        same.append(lp.argmax(-1) == lq.argmax(-1))
        na.append(-lp[np.arange(t.size), t])
        nb.append(-lq[np.arange(t.size), t])
    kl, same, na, nb = map(np.concatenate, (kl, same, na, nb))
    n = kl.size
    assert f.kl.mean == pytest.approx(kl.mean(), rel=1e-4)
    assert f.kl.se == pytest.approx(kl.std(ddof=1) / math.sqrt(n), rel=1e-3)
    assert f.same_top1.k == int(same.sum()) and f.same_top1.n == n
    pa, pb = math.exp(na.mean()), math.exp(nb.mean())
    c = np.cov(np.stack([na, nb]), ddof=1)
    se = math.sqrt((pa ** 2 * c[0, 0] + pb ** 2 * c[1, 1] - 2 * pa * pb * c[0, 1]) / n)
    assert f.delta_ppl == pytest.approx(pb - pa, rel=1e-4, abs=1e-9)
    assert f.delta_ppl_se == pytest.approx(se, rel=1e-3)
    assert m.reference_ppl == pytest.approx(pa, rel=1e-5)


def test_suffix_pass_equals_full_forward_bitwise(four_layer):
    from logitparity.capture.layerwise import logits_from_layer, reference_pass

    seqs = _seqs(2, 33, seed=2)
    ref = reference_pass(four_layer, seqs)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            full = four_layer(input_ids=torch.tensor([s]), use_cache=False).logits[0].numpy()
        np.testing.assert_array_equal(ref.logits[i], full)
        for start in range(4):
            np.testing.assert_array_equal(logits_from_layer(four_layer, ref, i, start), full)
    # with a transform applied: suffix and full-forward maps agree bitwise
    a = sensitivity_map(four_layer, "int4", group_size=16, prompts=seqs, by_module=True, layers=[1, 3])
    b = sensitivity_map(four_layer, "int4", group_size=16, prompts=seqs, by_module=True, layers=[1, 3], suffix=False)
    assert [c.mean_kl for c in a.cells] == [c.mean_kl for c in b.cells]
    assert [c.figures.delta_ppl for c in a.cells] == [c.figures.delta_ppl for c in b.cells]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bits(a, b):
    return all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_weights_restored_bitwise(four_layer):
    before = _state(four_layer)
    sensitivity_map(four_layer, "fp8-e4m3", prompts=_seqs(1, 20), by_module=True, budget=1e-3, saliency=True)
    assert _same_bits(before, _state(four_layer))
    calls = []

    def boom(w):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return w * 0

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity_map(four_layer, boom, prompts=_seqs(1, 20), layers=[2])
    assert _same_bits(before, _state(four_layer))
    assert all(not p.requires_grad or p.grad is None for p in four_layer.parameters())


def test_callable_and_module_selection(four_layer):
    seqs = _seqs(1, 20)
    m = sensitivity_map(four_layer, lambda w: w.clone(), prompts=seqs, modules="mlp", layers=[0])
    assert m.cells[0].mean_kl == 0.0 and m.kinds == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert m.transform == "callable <lambda>"
    m = sensitivity_map(four_layer, "prune", sparsity=0.5, prompts=seqs, modules="down_proj,q_proj", by_module=True,
                        layers="0-1")
    assert [c.label for c in m.cells] == ["0.self_attn.q_proj", "0.mlp.down_proj", "1.self_attn.q_proj",
                                          "1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"must return a tensor of the weight's shape \(64, 64\), got \(3,\)"):
        sensitivity_map(four_layer, lambda w: torch.zeros(3), prompts=seqs, layers=[0])


def test_plan_keeps_the_most_fragile_and_measures(four_layer):
    seqs = _seqs(2, 30, seed=4)
    m = sensitivity_map(four_layer, "int4", group_size=32, prompts=seqs)
    kl = {c.layer: c.mean_kl for c in m.cells}
    order = sorted(kl, key=lambda k: -kl[k])
    total = sum(kl.values())
    budget = (total - kl[order[0]]) * 1.001  # keeping the worst layer is enough
    m2 = sensitivity_map(four_layer, "int4", group_size=32, prompts=seqs, budget=budget)
    p = m2.plan
    assert p.kept == (str(order[0]),) and set(p.transformed) == {str(i) for i in order[1:]}
    assert p.predicted_kl == pytest.approx(total - kl[order[0]], rel=1e-12)
    assert p.predicted_all_kl == pytest.approx(total, rel=1e-12)
    # measured: every other layer quantized by hand at once
    cand = copy.deepcopy(four_layer)
    with torch.no_grad():
        for i in order[1:]:
            for mod in cand.model.layers[i].modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(torch.tensor(ref_fake_quant(mod.weight.numpy(), 4, 32, True), dtype=torch.float32))
    kls = []
    for s in seqs:
        with torch.no_grad():
            lp = _np_log_softmax(four_layer(input_ids=torch.tensor([s])).logits[0, :-1].numpy())
            lq = _np_log_softmax(cand(input_ids=torch.tensor([s])).logits[0, :-1].numpy())
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    assert p.measured.kl.mean == pytest.approx(np.concatenate(kls).mean(), rel=1e-3)
    assert "| predicted |" in m2.to_markdown() and "## Mixed-precision plan" in m2.to_markdown()
    # a budget above the total keeps nothing
    m3 = sensitivity_map(four_layer, "int4", group_size=32, prompts=seqs, budget=total * 2, layers=[0, 1])
    assert m3.plan.kept == () and m3.plan.measured is not None


def test_saliency_against_autograd_by_hand(four_layer):
    seqs = _seqs(2, 25, seed=6)
    m = sensitivity_map(four_layer, "int8", prompts=seqs, saliency=True, layers=[0, 3])
    model = copy.deepcopy(four_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    loss = 0.0
    norms: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(module, args, name=name):
                x = args[0].detach()[0, :-1].double()
                norms[name] = norms.get(name, 0) + (x ** 2).sum(0)
            handles.append(mod.register_forward_pre_hook(hook))
    n = sum(len(s) - 1 for s in seqs)
    for s in seqs:
        logits = model(input_ids=torch.tensor([s])).logits[0, :-1]
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum") / n
    loss.backward()
    for h in handles:
        h.remove()
    for layer in (0, 3):
        wg = aw = 0.0
        for name, mod in model.model.layers[layer].named_modules():
            if isinstance(mod, torch.nn.Linear):
                path = f"model.layers.{layer}.{name}"
                wg += float((mod.weight.detach().double() * mod.weight.grad.double()).abs().sum())
                aw += float((mod.weight.detach().double().abs() * norms[path].sqrt()[None, :]).sum())
        assert m.saliency.weight_grad[str(layer)] == pytest.approx(wg, rel=1e-4)
        assert m.saliency.act_weight[str(layer)] == pytest.approx(aw, rel=1e-6)
    assert m.saliency.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert m.saliency.saved_bytes_peak > 0 and m.saliency.grad_bytes == 2 * 4 * sum(
        mod.weight.numel() for mod in four_layer.model.layers[0].modules() if isinstance(mod, torch.nn.Linear))


# --------------------------------------------------------------------------
# text input, reports, the tiny HF directory and the CLI


def test_text_windows_and_reports(tiny_model_dir, tmp_path):
    from logitparity.capture import load_model
    from logitparity.report.sensitivity import write_sensitivity_json, write_sensitivity_plot

    lm = load_model(tiny_model_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 12
    n_tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    m = sensitivity_map(lm, "int4", group_size=16, text=text, ctx=50, by_module=True, saliency=True, budget=1e-4)
    # no BOS: disjoint windows of 50 tokens, the first token of each unscored
    windows = math.ceil(n_tokens / 50)
    assert m.inputs["windows"] == windows and m.inputs["tokens"] == n_tokens - windows
    md = m.to_markdown()
    assert "| rank | layer | module | risk | mean KL ± se ↓ |" in md and "Spearman rank correlation" in md
    assert m.strip() in md and len(m.strip()) == 2
    doc = write_sensitivity_json(m, tmp_path / "s.json").read_text()
    assert '"format": "logitparity-sensitivity"' in doc
    png = write_sensitivity_plot(m, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(args, capsys):
    from logitparity.cli import main

    rc = main(["sensitivity", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_help(capsys):
    from logitparity.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sensitivity", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--transform", "--group-size", "--asymmetric", "--sparsity", "--modules", "--layers", "--budget",
                 "--by-module", "--saliency", "--plot"):
        assert flag in out


def test_cli_runs(tiny_model_dir, tmp_path, capsys):
    rc, out, err = _cli([tiny_model_dir, "--transform", "int4", "--group-size", "32", "--prompts",
                         str(_prompts_file(tmp_path)), "--budget", "1", "--report", str(tmp_path / "s.md"),
                         "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), "--quiet"], capsys)
    assert rc == 0, err
    assert "int4 g=32 sym: 2 cells" in out and "plan (budget 1): keep 0 at reference precision" in out
    assert (tmp_path / "s.md").read_text().startswith("# logitparity sensitivity: int4 g=32 sym")
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s.json").is_file()


def test_cli_exit_1_when_the_measured_plan_is_over_budget(tiny_model_dir, tmp_path, capsys):
    """On this model and text the module cells' int4 effects add
    super-additively: a budget just above the predicted total keeps nothing,
    and the measured plan is over it."""
    from pathlib import Path

    from logitparity.capture import load_model

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    m = sensitivity_map(load_model(tiny_model_dir), "int4", group_size=16, text=Path(text), ctx=64, by_module=True,
                        budget=1.0)
    total = m.plan.predicted_all_kl
    assert m.plan.measured.kl.mean > 1.05 * total  # what makes the case
    rc, out, err = _cli([tiny_model_dir, "--transform", "int4", "--group-size", "16", "--text-file", str(text),
                         "--ctx", "64", "--by-module", "--budget", repr(1.01 * total), "--json",
                         str(tmp_path / "s.json"), "--quiet"], capsys)
    assert rc == 1, err
    assert "keep 0 at reference precision" in out
    import json

    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["plan"]["within_budget"] is False


def _prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"id": "a", "category": "prose", "text": "Once upon a time, in a quiet village by the sea."}\n'
                 '{"id": "b", "category": "code", "text": "def add(a, b):\\n    return a + b"}\n')
    return p


@pytest.mark.parametrize("args, match", [
    (["--transform", "int3"], r"transform \(--transform\) must be one of int8, int4, fp16, bf16, fp8-e4m3, prune .*"
                              r"got 'int3'"),
    (["--transform", "int4", "--group-size", "48"],
     r"group_size \(--group-size\) must divide in_features of every selected module, got 48, which does not divide "
     r"64 \(model.layers.0.self_attn.q_proj\); choose a divisor such as 16, 32, 64"),
    (["--transform", "int4", "--group-size", "-2"], r"group_size \(--group-size\) must be a positive int"),
    (["--transform", "prune", "--sparsity", "1.5"], r"sparsity \(--sparsity\) must be a number in \[0, 1\)"),
    (["--transform", "prune"], r"transform 'prune' needs sparsity \(--sparsity\)"),
    (["--transform", "fp16", "--group-size", "32"], r"group_size \(--group-size\) applies to int8/int4 only"),
    (["--transform", "int8", "--modules", "mlp.gate"],
     r"modules \(--modules\): unknown module type 'mlp.gate'; the decoder layers' Linear modules are "
     r"self_attn.q_proj, .*did you mean 'mlp.gate_proj'\?"),
    (["--transform", "int8", "--budget", "0"], r"budget \(--budget\) must be a positive mean KL in nats .*got 0.0"),
    (["--transform", "int8", "--budget", "-1"], r"budget \(--budget\) must be a positive mean KL in nats .*got -1.0"),
    (["--transform", "int8", "--layers", "0-5"],
     r"layers \(--layers\) must be in \[0, 1\] \(the model has 2 decoder layers\), got 2"),
    (["--transform", "int8", "--layers", "a-b"], r"layers \(--layers\) must be layer numbers and ranges"),
    (["--transform", "int8", "--cutoffs", "0.01,0.001"], r"cutoffs \(--cutoffs\) must satisfy 0 < M < H"),
    (["--transform", "int8", "--cutoffs", "x"], r"--cutoffs must be two numbers 'M,H'"),
    (["--transform", "int8", "--prompts", "p.jsonl", "--text-file", "t.txt"],
     r"--prompts and --text-file both given"),
    (["--transform", "int8", "--text-file", "missing.txt"], r"--text-file missing.txt does not exist"),
    (["--transform", "int8", "--max-tokens", "1"], r"max_tokens \(--max-tokens\) must be an int >= 2, got 1"),
])
def test_cli_errors(tiny_model_dir, capsys, args, match):
    rc, out, err = _cli([tiny_model_dir, *args, "--quiet"], capsys)
    assert rc == 2
    assert err.startswith("logitparity sensitivity: error: ")
    import re

    assert re.search(match, err), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# the default model: the map's KL against the by-hand path for three layers


@pytest.mark.slow
def test_default_model_three_layers_by_hand():
    from logitparity.capture import load_model

    lm = load_model(None)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be " \
           "in want of a wife."
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    m = sensitivity_map(lm, "int4", group_size=32, prompts=[ids], layers=[0, 14, 29])
    for c in m.cells:
        hand = _kl_by_hand(lm.model, [ids], c.layer)
        assert c.mean_kl == pytest.approx(hand.mean(), rel=0.10), c.layer
