"""perplexity(): windows, agreement with the Hugging Face perplexity recipe
computed directly with torch, pair figures against float64 references, the
baseline cache round trip and every rejection, input errors, the CLI, and
(slow) the real default model."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_VOCAB, build_tiny_model  # noqa: E402
from logitparity.baseline_cache import BaselineCache  # noqa: E402
from logitparity.cli import main  # noqa: E402
from logitparity.ppl import DEFAULT_CORPUS, Window, perplexity, plan_windows  # noqa: E402

CORPUS = DEFAULT_CORPUS.read_text(encoding="utf-8")
TEXT = CORPUS[:1500]
CTX, STRIDE = 64, 32


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from logitparity.capture.hf import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_bos(tiny_model_dir):
    """The tiny model with '<|im_start|>' declared as its BOS token."""
    from logitparity.capture.hf import load_model

    lm = load_model(tiny_model_dir)
    lm.tokenizer.bos_token = "<|im_start|>"
    return lm


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Same architecture and tokenizer, other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-other"), seed=1)


def _ids(lm, text=TEXT):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_recipe(lm, ids, ctx, stride, bos_id):
    """The Hugging Face perplexity recipe, written out with torch: -> (sum of
    token NLLs, tokens scored, per-window full logits [T, V] float64 with the
    label mask)."""
    model = lm.model
    span = ctx - (bos_id is not None)
    ids_t = torch.tensor(ids)
    total, count, prev_end, windows = 0.0, 0, 0, []
    for begin in range(0, len(ids), stride):
        end = min(begin + span, len(ids))
        trg_len = end - prev_end
        inp = ids_t[begin:end]
        if bos_id is not None:
            inp = torch.cat([torch.tensor([bos_id]), inp])
        target = inp.clone()
        target[:-trg_len] = -100
        with torch.no_grad():
            out = model(inp[None], labels=target[None])
        n_valid = int((target[1:] != -100).sum())
        total += float(out.loss) * n_valid
        count += n_valid
        windows.append((out.logits[0].double(), target))
        prev_end = end
        if end == len(ids):
            break
    return total, count, windows


def _scored_logits(windows):
    """Rows [n, V] float64 of the scored positions, in scoring order."""
    rows = [logits[:-1][target[1:] != -100] for logits, target in windows]
    return torch.cat(rows)


# ---------------------------------------------------------------- windows


def test_plan_windows_with_bos_scores_every_token_once():
    w = plan_windows(10, ctx=5, stride=2, bos=True)  # span 4
    assert w == [Window(0, 4, 0), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    scored = np.concatenate([np.arange(x.first, x.end) for x in w])
    assert scored.tolist() == list(range(10))


def test_plan_windows_without_bos_skips_only_the_first_token():
    w = plan_windows(10, ctx=4, stride=4, bos=False)  # disjoint: HF drops each window's first token
    assert w == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    w = plan_windows(10, ctx=4, stride=2, bos=False)
    scored = np.concatenate([np.arange(x.first, x.end) for x in w])
    assert scored.tolist() == list(range(1, 10))


def test_plan_windows_text_shorter_than_one_window_is_one_window():
    assert plan_windows(3, ctx=512, stride=256, bos=True) == [Window(0, 3, 0)]


@pytest.mark.parametrize("stride", [0, 5])
def test_plan_windows_rejects_stride_outside_span(stride):
    with pytest.raises(ValueError, match=r"stride must be in \[1, 4\]"):
        plan_windows(10, ctx=5, stride=stride, bos=True)


def test_plan_windows_rejects_tiny_ctx():
    with pytest.raises(ValueError, match="ctx must be at least 2"):
        plan_windows(10, ctx=1, stride=1, bos=False)


def test_plan_windows_one_token_without_bos_is_an_error():
    with pytest.raises(ValueError, match="has 1 token.*no BOS"):
        plan_windows(1, ctx=8, stride=4, bos=False)


# ------------------------------------------------- agreement with the HF recipe


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_hf_recipe_without_bos(tiny, batch_size):
    total, count, _ = _hf_recipe(tiny, _ids(tiny), CTX, STRIDE, None)
    r = perplexity(tiny, text=TEXT, ctx=CTX, stride=STRIDE, batch_size=batch_size, progress=False)
    assert r.settings["scored"] == count
    assert r.ref.ppl == pytest.approx(math.exp(total / count), rel=1e-4)


def test_matches_hf_recipe_with_bos(tiny_bos):
    bos = tiny_bos.tokenizer.bos_token_id
    assert bos is not None
    total, count, _ = _hf_recipe(tiny_bos, _ids(tiny_bos), CTX, STRIDE, bos)
    r = perplexity(tiny_bos, text=TEXT, ctx=CTX, stride=STRIDE, progress=False)
    assert r.settings["bos_token_id"] == bos and count == len(_ids(tiny_bos))
    assert r.ref.ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    off = perplexity(tiny_bos, text=TEXT, ctx=CTX, stride=STRIDE, add_bos=False, progress=False)
    assert off.settings["bos_token_id"] is None and off.settings["scored"] == count - 1


def test_disjoint_windows_match_hf_recipe(tiny):
    total, count, _ = _hf_recipe(tiny, _ids(tiny), CTX, CTX, None)
    r = perplexity(tiny, text=TEXT, ctx=CTX, stride=CTX, progress=False)
    assert r.ref.ppl == pytest.approx(math.exp(total / count), rel=1e-4)


def test_reference_figures_from_token_nll(tiny):
    r = perplexity(tiny, text=TEXT, ctx=CTX, stride=STRIDE, progress=False)
    nll = r.tokens["nll_ref"]
    words, nbytes = len(TEXT.split()), len(TEXT.encode())
    assert (r.text["words"], r.text["bytes"]) == (words, nbytes)
    assert r.ref.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert r.ref.ppl_se == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(nll.size), rel=1e-9)
    assert r.ref.word_perplexity == pytest.approx(math.exp(nll.sum() / words), rel=1e-9)
    assert r.ref.byte_perplexity == pytest.approx(math.exp(nll.sum() / nbytes), rel=1e-9)
    assert r.ref.bits_per_byte == pytest.approx(nll.sum() / nbytes / math.log(2), rel=1e-12)


# ------------------------------------------------------------ pair figures


def test_identical_models_give_exactly_zero(tiny, tiny_model_dir):
    r = perplexity(tiny, candidate=tiny_model_dir, text=TEXT, ctx=CTX, stride=STRIDE, progress=False)
    p = r.pair
    assert p.delta_ppl == 0.0 and p.ln_ppl_ratio == 0.0 and p.ppl_ratio == 1.0
    assert p.delta_ppl_ci95 == (0.0, 0.0)
    assert np.all(r.tokens["kl_ref_cand"] == 0.0) and np.all(r.tokens["kl_cand_ref"] == 0.0)
    assert p.kl_ref_cand.max == 0.0 and p.delta_p_rms == 0.0
    assert p.same_top1.rate == 1.0


def test_pair_figures_against_float64_reference(tiny, other_dir):
    from logitparity.capture.hf import load_model

    other = load_model(other_dir)
    ids = _ids(tiny)
    ta, na, wa = _hf_recipe(tiny, ids, CTX, STRIDE, None)
    tb, nb, wb = _hf_recipe(other, ids, CTX, STRIDE, None)
    r = perplexity(tiny, candidate=other, text=TEXT, ctx=CTX, stride=STRIDE, bootstrap=200, seed=7,
                   progress=False)
    assert r.cand.ppl == pytest.approx(math.exp(tb / nb), rel=1e-4)
    lp = torch.log_softmax(_scored_logits(wa), -1)
    lq = torch.log_softmax(_scored_logits(wb), -1)
    kl_pq = (lp.exp() * (lp - lq)).sum(-1).numpy()
    kl_qp = (lq.exp() * (lq - lp)).sum(-1).numpy()
    np.testing.assert_allclose(r.tokens["kl_ref_cand"], kl_pq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.tokens["kl_cand_ref"], kl_qp, rtol=1e-4, atol=1e-6)
    t = torch.tensor(ids[1:])
    dp = (lq.exp() - lp.exp())[torch.arange(t.numel()), t].numpy()
    np.testing.assert_allclose(r.tokens["delta_p"], dp, atol=1e-6)
    same = (lp.argmax(-1) == lq.argmax(-1)).numpy()
    assert r.pair.same_top1.k == int(same.sum())

    a, b = r.tokens["nll_ref"], r.tokens["nll_cand"]
    d = b - a
    p = r.pair
    assert p.ln_ppl_ratio == pytest.approx(d.mean(), rel=1e-9)
    assert p.ln_ppl_ratio_se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-9)
    assert p.ppl_ratio == pytest.approx(r.cand.ppl / r.ref.ppl, rel=1e-9)
    pa, pb, n = math.exp(a.mean()), math.exp(b.mean()), a.size
    va, vb, cab = a.var(ddof=1), b.var(ddof=1), np.cov(a, b)[0, 1]
    assert p.delta_ppl == pytest.approx(pb - pa, rel=1e-9)
    assert p.delta_ppl_se == pytest.approx(math.sqrt((pa**2 * va + pb**2 * vb - 2 * pa * pb * cab) / n), rel=1e-6)
    assert p.nll_pearson == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
    assert p.delta_p_rms == pytest.approx(math.sqrt(np.mean(dp**2)), rel=1e-5)
    lo, hi = p.delta_ppl_ci95
    assert lo < p.delta_ppl < hi
    again = perplexity(tiny, candidate=other, text=TEXT, ctx=CTX, stride=STRIDE, bootstrap=200, seed=7,
                       progress=False)
    assert again.pair.delta_ppl_ci95 == p.delta_ppl_ci95  # seeded
    doc = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert doc["pair"]["kl_ref_cand"]["mean"] == pytest.approx(p.kl_ref_cand.mean)
    md = r.to_markdown()
    assert "ΔPPL" in md and "KL(ref ‖ cand)" in md and "Hugging Face perplexity recipe" in md


def test_planted_bug_moves_the_distributions(tiny_model_dir, tiny):
    from logitparity.capture.hf import load_model

    bug = load_model(tiny_model_dir)
    w = bug.model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(torch.roll(w, 1, dims=0))
    r = perplexity(tiny, candidate=bug, text=TEXT, ctx=CTX, stride=STRIDE, bootstrap=0, progress=False)
    # A random model predicts near-uniformly, so its PPL barely moves; the
    # distributions do. The default-model test below checks ΔPPL.
    assert r.pair.kl_ref_cand.mean > 1e-4 and r.pair.kl_cand_ref.mean > 1e-4
    assert r.pair.same_top1.rate < 0.9 and r.pair.delta_ppl != 0


# ------------------------------------------------------------ baseline cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for name, kw in {"fp32": dict(cache_dtype="fp32"), "fp16": {}, "bf16": dict(cache_dtype="bf16"),
                     "top8": dict(storage="topk:8")}.items():
        perplexity(tiny, text=TEXT, ctx=CTX, stride=STRIDE, save_baseline=root / name, progress=False, **kw)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def live_pair(tiny, other_dir):
    from logitparity.capture.hf import load_model

    other = load_model(other_dir)
    return other, perplexity(tiny, candidate=other, text=TEXT, ctx=CTX, stride=STRIDE, bootstrap=0,
                             progress=False)


@pytest.mark.parametrize("name,tol", [("fp32", 1e-5), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_cache_round_trip_matches_live_reference(caches, live_pair, name, tol):
    other, live = live_pair
    r = perplexity(candidate=other, baseline_cache=caches[name], bootstrap=0, progress=False)
    for key in ("nll_ref", "nll_cand", "delta_p", "same_top1"):
        np.testing.assert_array_equal(r.tokens[key], live.tokens[key])
    assert r.ref.ppl == live.ref.ppl and r.cand.ppl == live.cand.ppl and r.pair.delta_ppl == live.pair.delta_ppl
    assert r.text == live.text and r.settings["scored"] == live.settings["scored"]
    np.testing.assert_allclose(r.tokens["kl_ref_cand"], live.tokens["kl_ref_cand"], rtol=tol, atol=1e-7)
    np.testing.assert_allclose(r.tokens["kl_cand_ref"], live.tokens["kl_cand_ref"], rtol=tol, atol=1e-7)
    assert r.cache["bytes_per_token"] > 0 and "cache" in r.pair.kl


def test_cache_without_candidate_reproduces_reference_ppl(caches, live_pair):
    r = perplexity(baseline_cache=caches["fp16"], progress=False)
    assert r.ref.ppl == live_pair[1].ref.ppl and r.cand is None


def test_topk_cache_kl_is_a_lower_bound(caches, live_pair):
    other, live = live_pair
    r = perplexity(candidate=other, baseline_cache=caches["top8"], bootstrap=0, progress=False)
    np.testing.assert_array_equal(r.tokens["nll_ref"], live.tokens["nll_ref"])
    np.testing.assert_array_equal(r.tokens["delta_p"], live.tokens["delta_p"])
    for key in ("kl_ref_cand", "kl_cand_ref"):
        assert np.all(r.tokens[key] <= live.tokens[key] * (1 + 1e-6) + 1e-9)
        assert r.tokens[key].mean() > 0
    assert "lower bound" in r.pair.kl
    full = BaselineCache(caches["fp16"]).bytes_per_token
    assert BaselineCache(caches["top8"]).bytes_per_token < full / 4


def test_cache_rejects_another_tokenizer(caches, tmp_path):
    from logitparity.capture.hf import load_model

    small = load_model(build_tiny_model(tmp_path / "v320", vocab_size=320))
    with pytest.raises(ValueError, match="another tokenizer.*vocab_size"):
        perplexity(candidate=small, baseline_cache=caches["fp16"], progress=False)


def test_live_pair_rejects_another_tokenizer_naming_every_key(tiny, tiny_model_dir, tmp_path, capsys):
    """The check and message of capture's score mode (dump.check_tokenizer)."""
    from logitparity.capture.hf import load_model
    from logitparity.dump import TokenizerMismatch

    small_dir = build_tiny_model(tmp_path / "v320", vocab_size=320)
    small = load_model(small_dir)
    ha, hb = tiny.identity["tokenizer"]["tokens_hash"], small.identity["tokenizer"]["tokens_hash"]
    want = ("the reference model and the candidate model use different tokenizers (tokenizer.vocab_size: "
            f"the reference model {TINY_VOCAB}, the candidate model 320; tokenizer.tokens_hash: the reference "
            f'model "{ha}", the candidate model "{hb}"); token ids would not mean the same text on both sides: '
            "use the same model file (or its exact conversion) for both")
    with pytest.raises(TokenizerMismatch, match=re.escape(want)):
        perplexity(tiny, candidate=small, text=TEXT, ctx=CTX, stride=STRIDE, progress=False)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["ppl", "--model", tiny_model_dir, "--candidate", small_dir, "--text-file", str(text)]) == 2
    assert want in capsys.readouterr().err


def test_cache_rejects_another_text(caches, tiny):
    with pytest.raises(ValueError, match="another text"):
        perplexity(candidate=tiny, baseline_cache=caches["fp16"], text=TEXT + " more", progress=False)


def test_cache_rejects_other_window_settings(caches, tiny):
    with pytest.raises(ValueError, match=f"ctx={CTX}, got ctx=32"):
        perplexity(candidate=tiny, baseline_cache=caches["fp16"], ctx=32, progress=False)
    with pytest.raises(ValueError, match="max_tokens=None, got max_tokens=100"):
        perplexity(candidate=tiny, baseline_cache=caches["fp16"], max_tokens=100, progress=False)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_cache_rejects_wrong_format_tag(caches, tmp_path):
    d = _copy(caches["top8"], tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    m["format"] = "logitparity-dump"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="expected format 'logitparity-ppl-baseline', found format 'logitparity-dump', which is a dump manifest"):
        BaselineCache(d)


def test_cache_version_new_and_legacy(caches, tmp_path):
    """A new cache says version "1.0"; one written before (the integer 1) still loads."""
    m = json.loads((caches["top8"] / "manifest.json").read_text())
    assert (m["format"], m["version"]) == ("logitparity-ppl-baseline", "1.0")
    d = _copy(caches["top8"], tmp_path / "c")
    (d / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    old, new = BaselineCache(d), BaselineCache(caches["top8"])
    assert old.manifest["version"] == "1.0" and len(old) == len(new)
    np.testing.assert_array_equal(old.rows(0, len(old)).topk_values, new.rows(0, len(new)).topk_values)


def test_cache_rejects_other_version(caches, tmp_path):
    d = _copy(caches["top8"], tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"version 99 is newer than this logitparity reads \(1.0\); upgrade"):
        BaselineCache(d)


def test_cache_rejects_missing_manifest_and_shard(caches, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BaselineCache(tmp_path / "nothing")
    d = _copy(caches["top8"], tmp_path / "c")
    (d / "shard-00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard .*shard-00000.safetensors is missing"):
        BaselineCache(d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        BaselineCache(d)


def test_save_baseline_refuses_a_foreign_directory_and_replaces_a_cache(tiny, caches, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a baseline cache; refusing to overwrite"):
        perplexity(tiny, text=TEXT, ctx=CTX, stride=STRIDE, save_baseline=tmp_path, progress=False)
    d = _copy(caches["top8"], tmp_path / "c")
    perplexity(tiny, text=TEXT[:300], ctx=CTX, stride=STRIDE, save_baseline=d, storage="topk:4", progress=False)
    assert BaselineCache(d).k == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial dirs left


def test_model_and_cache_together_is_an_error(caches, tiny):
    with pytest.raises(ValueError, match="either model .* or baseline_cache"):
        perplexity(tiny, baseline_cache=caches["fp16"], progress=False)
    with pytest.raises(ValueError, match="save_baseline needs a live reference"):
        perplexity(baseline_cache=caches["fp16"], save_baseline="x", progress=False)


# ------------------------------------------------------------ inputs


@pytest.mark.parametrize("text", ["", "  \n\t "])
def test_empty_text_is_an_error(tiny, text):
    with pytest.raises(ValueError, match="is empty"):
        perplexity(tiny, text=text, progress=False)


def test_text_and_text_file_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="either text or text_file"):
        perplexity(tiny, text="a", text_file=DEFAULT_CORPUS, progress=False)
    with pytest.raises(FileNotFoundError, match="text_file .*missing.txt does not exist"):
        perplexity(tiny, text_file=tmp_path / "missing.txt", progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8"):
        perplexity(tiny, text_file=bad, progress=False)
    with pytest.raises(TypeError, match="text must be a str"):
        perplexity(tiny, text=b"bytes", progress=False)


def test_ctx_beyond_model_context_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"ctx=4096 exceeds the reference model's context \(2048"):
        perplexity(tiny, text=TEXT, ctx=4096, progress=False)


def test_text_shorter_than_one_window_is_scored_in_one_window(tiny):
    r = perplexity(tiny, text="The quick brown fox.", ctx=512, stride=256, progress=False)
    n = len(_ids(tiny, "The quick brown fox."))
    assert r.settings["windows"] == 1 and r.settings["scored"] == n - 1


def test_max_tokens_counts_words_and_bytes_of_the_covered_text(tiny):
    r = perplexity(tiny, text=TEXT, ctx=CTX, stride=STRIDE, max_tokens=100, progress=False)
    assert r.text["tokens"] == 100 and r.text["truncated"] and r.settings["scored"] == 99
    assert r.text["bytes"] < len(TEXT.encode())
    assert r.text["sha256"].startswith("sha256:")


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1"),
    (dict(cache_topk=0, save_baseline="x"), "cache_topk must be an int >= 1"),
    (dict(ctx=1.5), "ctx must be an int"),
])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny, text=TEXT, progress=False, **kw)


def test_add_bos_without_a_bos_token_is_an_error(tiny):
    with pytest.raises(ValueError, match="tokenizer has no BOS token"):
        perplexity(tiny, text=TEXT, add_bos=True, progress=False)


# ------------------------------------------------------------ CLI


def test_cli_ppl_writes_json_and_report(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc = main(["ppl", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--text-file", str(text),
               "--ctx", "64", "--stride", "32", "--json", str(tmp_path / "o.json"),
               "--report", str(tmp_path / "o.md"), "--bootstrap", "50"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| PPL |" in out and (tmp_path / "o.md").read_text() == out
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["pair"]["delta_ppl"] == 0.0 and doc["settings"]["ctx"] == 64


def test_cli_ppl_storage_names_the_cache_storage_like_dump(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:400], encoding="utf-8")
    base = ["ppl", "--model", tiny_model_dir, "--text-file", str(text), "--ctx", "64", "--stride", "32", "--bootstrap", "0"]
    for flags, name in ((["--storage", "topk:4"], "new"), (["--cache-topk", "4"], "old")):
        assert main(base + ["--save-baseline", str(tmp_path / name)] + flags) == 0
    new, old = BaselineCache(tmp_path / "new"), BaselineCache(tmp_path / "old")
    assert new.manifest["storage"] == old.manifest["storage"] == {"logits": "topk:4", "dtype": None, "vocab": new.vocab}
    np.testing.assert_array_equal(new.rows(0, len(new)).tail, old.rows(0, len(old)).tail)
    assert capsys.readouterr().err.count("logitparity ppl: note: --cache-topk 4 is the old spelling of --storage "
                                         "topk:4; use --storage topk:4 (the old one goes in the next release)") == 1
    assert main(base + ["--save-baseline", str(tmp_path / "x"), "--storage", "topk:4", "--cache-topk", "4"]) == 2
    assert "--storage topk:4 and --cache-topk 4 both set the cache's storage; pass only --storage" in capsys.readouterr().err
    assert main(base + ["--save-baseline", str(tmp_path / "x"), "--storage", "top4"]) == 2
    assert "--storage: logits storage must be 'full' or 'topk:K' with K >= 1 (e.g. 'topk:64'), got 'top4'" in \
        capsys.readouterr().err


def test_cli_ppl_bad_input_exits_2(tiny_model_dir, tmp_path, capsys):
    for flag in ("--text-file", "--text"):  # --text: the old spelling, the same option
        rc = main(["ppl", "--model", tiny_model_dir, flag, str(tmp_path / "none.txt")])
        err = capsys.readouterr().err
        assert rc == 2 and f"--text-file {tmp_path / 'none.txt'} does not exist; pass a UTF-8 text file" in err
        assert ("logitparity ppl: note: --text is the old spelling of --text-file; use --text-file" in err) == \
            (flag == "--text")
    assert main(["ppl", "--model", tiny_model_dir, "--text-file", str(tmp_path)]) == 2
    assert f"--text-file {tmp_path} is a directory; pass a UTF-8 text file" in capsys.readouterr().err


# ------------------------------------------------------------ the default model (slow)


@pytest.fixture(scope="module")
def default_fp32():
    from logitparity.capture.hf import load_model

    return load_model(None)


SLOW_KW = dict(text=CORPUS, ctx=128, stride=64, max_tokens=384, bootstrap=200, progress=False)


@pytest.mark.slow
def test_default_model_matches_hf_recipe(default_fp32):
    lm = default_fp32
    bos = lm.tokenizer.bos_token_id
    ids = _ids(lm, CORPUS)[:SLOW_KW["max_tokens"]]
    total, count, _ = _hf_recipe(lm, ids, 128, 64, bos)
    r = perplexity(lm, **SLOW_KW)
    assert r.settings["scored"] == count == 384 and r.settings["bos_token_id"] == bos
    assert r.ref.ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 3 < r.ref.ppl < 100  # a real language model on English prose


@pytest.mark.slow
def test_default_model_bf16_gives_small_positive_kl(default_fp32):
    r = perplexity(default_fp32, candidate=_default("bf16"), **SLOW_KW)
    kl = r.pair.kl_ref_cand
    assert 0 < kl.mean < 0.05 and r.pair.kl_cand_ref.mean > 0
    assert abs(r.pair.ln_ppl_ratio) < 0.05 and r.pair.same_top1.rate > 0.9


@pytest.mark.slow
def test_default_model_planted_bug_gives_large_delta_ppl_and_kl(default_fp32):
    bug = _default("fp32")
    w = bug.model.model.layers[5].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(torch.roll(w, 1, dims=0))
    r = perplexity(default_fp32, candidate=bug, **SLOW_KW)
    assert r.pair.delta_ppl > 1.0 and r.pair.delta_ppl_ci95[0] > 0
    assert r.pair.kl_ref_cand.mean > 0.1


def _default(dtype):
    from logitparity.capture.hf import load_model

    return load_model(None, dtype=dtype)


def test_topk_cache_tail_mass_is_float64_exact_like_the_dump(tmp_path):
    """A cache's top-K tail comes from a float64 log-sum-exp, as a dump's does:
    a tail of ~1e-12 (far below float32's epsilon) survives, matching a
    float64 numpy reference, and equals what a topk dump stores for the same rows."""
    from logitparity.baseline_cache import BaselineCache, BaselineCacheWriter
    from logitparity.topk_rows import exact_lse, tail_mass

    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 301)).astype(np.float32) - 40.0
    x[:, :4] = rng.normal(size=(6, 4)).astype(np.float32) * 0.1  # four tokens hold all but ~1e-15 of the mass
    x64 = x.astype(np.float64)
    lse64 = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    top = np.sort(x64, axis=1)[:, ::-1][:, :4]
    want = 1.0 - np.exp(top - lse64[:, None]).sum(1)
    assert (want > 1e-16).all() and (want < 1e-12).all()

    n = x.shape[0]
    w = BaselineCacheWriter(tmp_path / "c", storage="topk:4")
    w.add(x, position=np.arange(n), target=np.zeros(n, np.int64), nll=np.zeros(n),
          lse=np.zeros(n), argmax=x.argmax(1))  # the given lse is not what the tail uses
    w.close({"text": {"sha256": "0" * 64}, "settings": {}, "tokenizer": {}, "model": {}}, np.arange(n + 1))
    rows = BaselineCache(tmp_path / "c").rows(0, n)
    np.testing.assert_allclose(rows.tail, want, rtol=1e-6)
    np.testing.assert_allclose(rows.lse, lse64, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(tail_mass(rows.topk_values, exact_lse(x)), rows.tail)
