"""logitparity.diagnostics on the tiny random Llama: every statistic of
stats_of against float64 numpy from independent hooks, the outlier rule and
the ablation ranking against a planted outlier (and KL/ΔPPL by hand), the
coverage warning, the renderers and the argument errors."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import randomize_norms  # noqa: E402
import logitparity as lp  # noqa: E402
from logitparity import diagnostics as D  # noqa: E402
from logitparity.capture import load_model  # noqa: E402
from logitparity.capture.hooks import tokenize_prompts  # noqa: E402
from logitparity.capture.plants import OUTLIER_CHANNEL, planted  # noqa: E402
from logitparity.prompts import Prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = [Prompt("p-code", "code", "def add(a, b):\n    return a + b\n"),
           Prompt("p-math", "math", "Question: what is 12 times 7? Answer: 84."),
           Prompt("p-fox", "factual", "The quick brown fox jumps over the lazy dog. Bonjour le monde.")]
SITE = "model.layers.1.mlp:input"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    # trained-looking norms, so that a scaled norm entry is not the only non-one
    return randomize_norms(load_model(tiny_model_dir), seed=1)


@pytest.fixture(scope="module")
def stats(lm):
    return D.stats_of(lm, PROMPTS)


def _site_rows(lm, texts_ids, module, what):
    """Rows of one site per prompt, from a hook of this test's own."""
    got = []
    if what == "input":
        h = module.register_forward_pre_hook(
            lambda m, a, kw: got.append((a[0] if a else kw["hidden_states"]).detach()[0].clone()), with_kwargs=True)
    else:
        h = module.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o)
                                                                    .detach()[0].clone()))
    logits = []
    try:
        with torch.no_grad():
            for ids in texts_ids:
                logits.append(lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy())
    finally:
        h.remove()
    return [g.double().numpy() for g in got], logits


def _moments(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    m = x.mean()
    d = x - m
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    return {"mean": m, "variance": m2, "skewness": m3 / m2**1.5, "kurtosis": m4 / m2**2, "min": x.min(),
            "max": x.max()}


def _nearest_rank(x: np.ndarray, q: float) -> float:
    a = np.sort(np.abs(x[np.isfinite(x)]))
    return float(a[max(1, math.ceil(round(q * a.size, 9))) - 1])


def _check_moments(t, x):
    want = _moments(x)
    for k in ("mean", "variance", "skewness", "kurtosis"):
        assert getattr(t, k) == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    assert t.min == want["min"] and t.max == want["max"]
    assert t.excess_kurtosis == pytest.approx(want["kurtosis"] - 3, rel=1e-9)


@pytest.mark.parametrize("key,module,what", [
    ("model.layers.1.mlp:input", "model.layers.1.mlp", "input"),
    ("model.layers.0.self_attn:input", "model.layers.0.self_attn", "input"),
    ("model.layers.1.mlp.down_proj:input", "model.layers.1.mlp.down_proj", "input"),
    ("model.layers.0", "model.layers.0", "output"),
    ("model.layers.1.self_attn", "model.layers.1.self_attn", "output"),
])
def test_activation_statistics_match_float64(lm, stats, key, module, what):
    ids = tokenize_prompts(lm.tokenizer, PROMPTS)
    rows, _ = _site_rows(lm, ids, lm.model.get_submodule(module), what)
    x = np.concatenate(rows)
    t = stats.activation(key)
    assert t.kind == "activation" and t.tensor == what and t.shape == x.shape
    assert t.count == x.size and t.finite == x.size
    _check_moments(t, x)
    assert t.zero_fraction == np.mean(x == 0) and t.nan_fraction == 0.0 and t.inf_fraction == 0.0
    np.testing.assert_array_equal(t.channel_max_abs, np.abs(x).max(0).astype(np.float32))
    bound = 2.0 ** -8
    for name, q in D.QUANTILES.items():
        want = _nearest_rank(x, q)
        assert abs(getattr(t, name) - want) <= bound * want, (name, getattr(t, name), want)
    # per-position L2 norm, averaged over the prompts that reach each position
    n = max(len(r) for r in rows)
    sums, counts = np.zeros(n), np.zeros(n)
    for r in rows:
        sums[: len(r)] += np.linalg.norm(r, axis=1)
        counts[: len(r)] += 1
    np.testing.assert_allclose(t.position_norm, sums / counts, rtol=1e-12)


def test_logit_norm_and_entropy_match_float64(lm, stats):
    ids = tokenize_prompts(lm.tokenizer, PROMPTS)
    _, logits = _site_rows(lm, ids, lm.model.model.layers[0], "output")
    z = np.concatenate(logits)
    norms = np.linalg.norm(z, axis=1)
    zs = z - z.max(1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(1, keepdims=True))
    ent = -(np.exp(logp) * logp).sum(1)
    assert stats.logits["norm"].mean == pytest.approx(norms.mean(), rel=1e-6)
    assert stats.logits["norm"].max == pytest.approx(norms.max(), rel=1e-6)
    # The entropies come from the row kernel, whose terms are float32 exps summed in float64:
    # about 1e-8 relative on rows like these (docs/metrics.md allows 1e-6). 1e-9 held on the
    # first machines by the luck of the data and failed on another CPU (p99 off by 1.05e-9).
    assert stats.logits["entropy"].mean == pytest.approx(ent.mean(), rel=1e-7)
    assert stats.logits["entropy"].p99 == pytest.approx(np.percentile(ent, 99), rel=1e-7)


def test_weight_statistics_match_float64_with_exact_quantiles(lm, stats):
    hf = lm.model
    checked = 0
    for name, p in hf.named_parameters():
        w = p.detach().double().numpy()
        t = stats.weight(name)
        rows = w.T if (w.ndim == 2 and ("proj" in name or name == "lm_head.weight")) else w.reshape(-1, w.shape[-1])  # Linear: output channels
        assert t.shape == rows.shape and t.quantiles == "exact"
        _check_moments(t, rows)
        np.testing.assert_array_equal(t.channel_max_abs, np.abs(rows).max(0).astype(np.float32))
        for key, q in D.QUANTILES.items():
            assert getattr(t, key) == _nearest_rank(rows, q), (name, key)
        checked += 1
    assert checked == len(stats.weights) == 21  # embed, 2 x (9 per layer), norm, lm_head


def test_nan_inf_and_zero_fractions(lm, tmp_path):
    """Non-finite values are counted, and left out of the moments."""
    hf = lm.model
    w = hf.model.layers[1].mlp.up_proj.weight  # after the hooked site: its NaN does not reach it
    saved = w.detach().clone()

    def hook(m, a, out):
        out = out.clone()
        out[:, 0, :3] = float("nan")
        out[:, 1, :2] = float("inf")
        out[:, 2, 0] = float("-inf")
        out[:, 3, :] = 0.0
        return out

    h = hf.model.layers[0].mlp.down_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            w[0, 0], w[0, 1], w[1, 1], w[2, 2] = float("nan"), float("inf"), 0.0, 0.0
        s = D.stats_of(lm, PROMPTS[:1], attention=False)
        x, _ = _site_rows(lm, tokenize_prompts(lm.tokenizer, PROMPTS[:1]), hf.model.layers[0].mlp, "output")
    finally:
        h.remove()
        with torch.no_grad():
            w.copy_(saved)
    t = s.activation("model.layers.0.mlp")
    x = x[0]
    assert t.nan_fraction == 3 / x.size and t.inf_fraction == 3 / x.size
    assert t.zero_fraction == np.mean(x == 0) and t.finite == x.size - 6
    _check_moments(t, x)
    tw = s.weight("model.layers.1.mlp.up_proj.weight")
    n = saved.numel()
    assert tw.nan_fraction == 1 / n and tw.inf_fraction == 1 / n
    assert tw.zero_fraction == pytest.approx((np.sum(saved.numpy() == 0) + 2) / n)
    assert "query" not in {a.tensor for a in s.activations}  # attention=False
    # layer 1 and the logits are all NaN now: the JSON says null, never NaN
    from logitparity.report.stats import write_stats_json

    assert math.isnan(s.logits["entropy"].mean)
    d = json.loads(write_stats_json(s, tmp_path / "nan.json").read_text())
    assert d["logits"]["entropy"]["mean"] is None


def test_attention_range_matches_the_score_site(lm, stats):
    for a in stats.attention:
        t = stats.activation(f"{a['path']}.scores")
        assert a["heads"] == 4 and len(a["max"]) == 4
        assert a["range"] == [t.min, t.max]
        assert max(a["max"]) == t.max and min(a["min"]) == t.min


def test_clean_tiny_model_has_no_outlier_and_the_plant_is_found(lm, stats):
    assert stats.outliers == []
    with planted(lm, "mlp_input_outlier", layer=1):
        s = D.stats_of(lm, PROMPTS, weights=True)
        top = s.outliers[0]
        assert (top.key, top.layer, top.channel) == (SITE, 1, OUTLIER_CHANNEL)
        t = s.activation(SITE)
        assert top.score == pytest.approx(t.channel_max_abs[OUTLIER_CHANNEL] / np.median(t.channel_max_abs))
        assert top.score > D.OUTLIER_FACTOR
        ids = s.token_ids[[p["id"] for p in s.prompts].index(top.prompt_id)]
        assert top.token == lm.tokenizer.decode(ids[top.position:top.position + 1])
        assert top.context.endswith(top.token)
        assert set(top.categories) <= {"code", "math", "factual"} and top.categories
        # positions over the cut, by hand from this test's own hook
        rows, _ = _site_rows(lm, s.token_ids, lm.model.model.layers[1].mlp, "input")
        x = np.abs(np.concatenate(rows)[:, OUTLIER_CHANNEL])
        over = x > D.OUTLIER_FACTOR * top.typical
        assert top.positions_over == int(over.sum()) and top.fraction_over == pytest.approx(over.mean())
        assert top.systematic and s.systematic_outliers[0] == top
        ids_all = np.concatenate([np.asarray(t) for t in s.token_ids])
        want = collections.Counter(ids_all[over].tolist()).most_common(1)[0]
        assert top.top_tokens[0] == (lm.tokenizer.decode([want[0]]), want[1])
        # the weight that carries it is a weight outlier too (x50 in a norm weight)
        w = s.weight_outliers[0]
        assert (w.key, w.channel) == ("model.layers.1.post_attention_layernorm.weight", OUTLIER_CHANNEL)
        a = D.ablate(lm, s, 3)
        c = D.ablate(lm, s, 3, mode="clamp")
        y = D.ablate(lm, s, 1, systematic=True)
    assert (y.rows[0].key, y.rows[0].channel) == (SITE, OUTLIER_CHANNEL) and len(y.rows) == 1
    assert (a.rows[0].key, a.rows[0].channel) == (SITE, OUTLIER_CHANNEL)
    assert (c.rows[0].key, c.rows[0].channel) == (SITE, OUTLIER_CHANNEL)
    assert a.rows[0].kl.mean > 0 and a.rows[0].limit is None
    assert c.rows[0].limit == pytest.approx(D.OUTLIER_FACTOR * top.typical)
    kls = [r.kl.mean for r in a.rows]
    assert kls == sorted(kls, reverse=True)


def test_ablation_kl_and_delta_ppl_by_hand(lm, stats):
    """Zero channel 5 of the layer-0 MLP input with a hook of our own: mean
    KL(untouched || ablated) and ΔPPL of the prompts' next tokens in float64."""
    hf = lm.model
    ids = stats.token_ids

    def logits():
        with torch.no_grad():
            return [hf(input_ids=torch.tensor([t]), use_cache=False).logits[0].double().numpy() for t in ids]

    base = logits()

    def pre(m, a, kw):
        x = (a[0] if a else kw["hidden_states"]).clone()
        x[..., 5] = 0
        if a:
            return (x, *a[1:]), kw
        return a, {**kw, "hidden_states": x}

    h = hf.model.layers[0].mlp.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        abl = logits()
    finally:
        h.remove()

    def logp(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    kl, nll_a, nll_b = [], [], []
    for t, za, zb in zip(ids, base, abl):
        pa, pb = logp(za), logp(zb)
        kl.append((np.exp(pa) * (pa - pb)).sum(1))
        nxt = np.array(t[1:])
        nll_a.append(-pa[np.arange(len(nxt)), nxt])
        nll_b.append(-pb[np.arange(len(nxt)), nxt])
    kl = np.concatenate(kl)
    dppl = math.exp(np.concatenate(nll_b).mean()) - math.exp(np.concatenate(nll_a).mean())
    r = D.ablate(lm, stats, channels=[("model.layers.0.mlp:input", 5)]).rows[0]
    assert r.kl.mean == pytest.approx(kl.mean(), rel=1e-5) and r.kl.n == kl.size
    assert r.delta_ppl == pytest.approx(dppl, rel=1e-5, abs=1e-9)
    assert r.mode == "zero" and r.channel == 5 and r.layer == 0


def test_coverage_warning_and_category_slices(lm, stats):
    from logitparity.prompts import default_categories

    assert stats.missing_categories == sorted(set(default_categories()) - {"code", "math", "factual"})
    assert any(w.startswith("calibration coverage: the prompts used have no context_limit, creative, edge") for w in stats.warnings)
    assert [c["category"] for c in stats.categories] == ["code", "factual", "math"]
    code = stats.categories[0]
    assert code["prompts"] == 1 and code["positions"] == stats.prompts[0]["positions"]
    full = D.stats_of(lm, weights=False, attention=False)  # one prompt per default category but the heavy one
    assert full.missing_categories == ["context_limit"]
    assert [w for w in full.warnings if "coverage" in w][0].startswith(
        "calibration coverage: the prompts used have no context_limit prompts")
    assert sorted(p["category"] for p in full.prompts) == [c for c in default_categories() if c != "context_limit"]


def test_compare_report_warns_about_missing_categories(tmp_path):
    from logitparity.compare import compare_dumps
    from logitparity.report import comparison_dict, render_markdown
    from test_compare import planted as planted_dumps

    ref, cand, _, _ = planted_dumps(tmp_path)
    c = compare_dumps(ref, cand)
    md = render_markdown(c)
    assert "**Warning:** calibration coverage: the prompts used have no" in md
    assert comparison_dict(c)["missing_categories"]


def test_renderers(lm, tmp_path):
    from logitparity.report.stats import ablation_markdown, stats_markdown, write_stats_json, write_stats_plot

    with planted(lm, "mlp_input_outlier", layer=1):
        s = D.stats_of(lm, PROMPTS)
        a = D.ablate(lm, s, 2)
    md = stats_markdown(s)
    for section in ("## Outlier channels (activations)", "## Heavy-tailed tensors", "## Per layer", "## Logits",
                    "## By category", "## Weights"):
        assert section in md
    assert f"| 1 | `{SITE}` | 1 | {OUTLIER_CHANNEL} |" in md
    assert "**Warning:** calibration coverage" in md
    am = ablation_markdown(a)
    assert f"| 1 | `{SITE}` | 1 | {OUTLIER_CHANNEL} |" in am
    p = write_stats_json(s, tmp_path / "s.json", a)
    d = json.loads(p.read_text())
    assert d["format"] == "logitparity-stats" and d["outliers"][0]["channel"] == OUTLIER_CHANNEL
    assert d["ablation"]["ranking"][0]["key"] == SITE
    assert len(d["activations"]) == len(s.activations) and "channel_max_abs" in d["weights"][0]
    png = write_stats_plot(s, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lp.stats_of is D.stats_of and lp.ablate is D.ablate
    assert "top outlier=model.layers.1.mlp:input channel 3" in repr(s)


@pytest.mark.parametrize("kwargs,match", [
    ({"outlier_factor": 0}, r"outlier_factor must be a positive number .*got 0"),
    ({"prompts": []}, r"prompts must be None \(one prompt of each default category\), a prompts file, or a "
                      r"non-empty list of Prompt or str, got \[\]"),
    ({"prompts": [3]}, r"prompts\[0\] must be a Prompt or a str, got 3"),
    ({"limit": 0}, r"limit must be a positive int or None \(the first N prompts\), got 0"),
])
def test_stats_of_argument_errors(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.stats_of(lm, **kwargs)


def test_stats_of_needs_a_tokenizer(lm):
    with pytest.raises(ValueError, match=r"model has no tokenizer: pass a LoadedModel"):
        D.stats_of(lm.model, PROMPTS)


def test_ablate_argument_errors(lm, stats):
    with pytest.raises(ValueError, match=r"mode must be one of \('zero', 'clamp'\) .*got 'drop'"):
        D.ablate(lm, stats, 1, mode="drop")
    with pytest.raises(ValueError, match=r"n must be an int >= 1 .*got 0"):
        D.ablate(lm, stats, 0)
    with pytest.raises(ValueError, match=r"channels: site 'model.layers.7.mlp:input' is not in stats"):
        D.ablate(lm, stats, channels=[("model.layers.7.mlp:input", 0)])
    with pytest.raises(ValueError, match=r"channels: channel of model.layers.0.mlp:input must be in \[0, 63\], got 64"):
        D.ablate(lm, stats, channels=[("model.layers.0.mlp:input", 64)])
    with pytest.raises(TypeError, match=r"stats must be the ModelStats of stats_of\(model, ...\), got dict"):
        D.ablate(lm, {}, 1)


# ------------------------------------------------------------ against a reference


def test_outlier_shift_names_the_planted_channel_and_its_ablation_tops(lm, stats):
    with planted(lm, "mlp_input_outlier", layer=1):
        s = D.stats_of(lm, PROMPTS, weights=False)
        shifts = D.outlier_shift(stats, s)
        top = shifts[0]
        assert (top.key, top.layer, top.channel) == (SITE, 1, OUTLIER_CHANNEL)
        # the ratio, by hand from the two measurements; upstream of the plant nothing moved,
        # so the planted channel grew by exactly the plant's factor (up to float32 rounding)
        ref_c, cand_c = stats.activation(SITE).channel_max_abs, s.activation(SITE).channel_max_abs
        assert top.ratio == pytest.approx(float(cand_c[OUTLIER_CHANNEL]) / float(ref_c[OUTLIER_CHANNEL]), rel=1e-12)
        assert top.ratio == pytest.approx(50.0, rel=1e-5)
        # exactly the channels past the factor, over every shared site, by hand
        want = set()
        for t in s.activations:
            if t.key.endswith(".scores"):
                continue
            r = np.asarray(stats.activation(t.key).channel_max_abs, np.float64)
            c = np.asarray(t.channel_max_abs, np.float64)
            want |= {(t.key, int(i)) for i in np.flatnonzero(c > D.SHIFT_FACTOR * r)}
        assert {(x.key, x.channel) for x in shifts} == want
        # forward order, the highest ratio first within a site: the plant's site comes first
        assert all((a.order, -a.ratio) <= (b.order, -b.ratio) for a, b in zip(shifts, shifts[1:]))
        from logitparity.capture.sites import site_module

        chans = [(x.key, x.channel) for x in shifts if site_module(x.key)[1] in ("input", "output")][:3]
        a = D.ablate(lm, s, channels=chans)
    assert (a.rows[0].key, a.rows[0].channel) == (SITE, OUTLIER_CHANNEL)
    assert D.outlier_shift(stats, stats) == []  # the model against itself: nothing grew


def test_outlier_shift_errors(lm, stats):
    with pytest.raises(ValueError, match=r"factor must be a number > 1 \(how many times a channel's max \|x\| must "
                                         r"grow\), got 1"):
        D.outlier_shift(stats, stats, factor=1)
    with pytest.raises(TypeError, match=r"ref and cand must be ModelStats from stats_of, got dict and ModelStats"):
        D.outlier_shift({}, stats)
    other = D.stats_of(lm, PROMPTS[:2], weights=False, attention=False)
    with pytest.raises(ValueError, match=r"ref and cand were measured on different tokens .*run stats_of on the "
                                         r"same prompts"):
        D.outlier_shift(stats, other)
