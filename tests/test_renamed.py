"""One name for the storage mode: ``storage="full" | "topk:K"`` in every
Python entry point. The old keywords (``logits=`` of capture / DumpWriter /
capture_ranks / capture_samples / score_samples, ``cache_topk=K`` of
perplexity) still work for one release, warn with the exact replacement, and
give what the new keyword gives; old and new together is an error naming
both."""

from __future__ import annotations

import inspect
import json
import warnings

import numpy as np
import pytest

from logitparity._renamed import renamed_keyword, storage_from_cache_topk
from logitparity.baseline_cache import BaselineCache
from logitparity.capture import capture, load_model
from logitparity.capture.seeds import capture_samples, score_samples
from logitparity.cli import main
from logitparity.distributed import capture_ranks
from logitparity.dump import DumpWriter, load_dump
from logitparity.ppl import perplexity
from logitparity.prompts import Prompt

MANIFEST = {"engine": {"name": "test", "version": "0"}, "model": {"name": "m"}, "tokenizer": {"vocab_size": 8},
            "dtype": "fp32", "device": "cpu", "decoding": {"mode": "greedy"}}
PROMPTS = [Prompt("a", "x", "Hello there"), Prompt("b", "y", "12 * 7 =")]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)


def _write(path, **kw) -> dict:
    rows = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    with DumpWriter(path, MANIFEST, **kw) as w:
        w.add({"id": "p", "category": "", "prompt": "", "chat_template": False, "prompt_token_ids": [1],
               "generated_token_ids": [1, 2, 3], "stop_reason": "max_new_tokens"}, rows)
    return json.loads((path / "manifest.json").read_text())["logits"]


# --- the new keyword is the signature's ------------------------------------------------


@pytest.mark.parametrize("fn", [capture, capture_ranks, capture_samples, score_samples, DumpWriter, perplexity],
                         ids=lambda f: f.__name__)
def test_signatures_say_storage(fn):
    params = inspect.signature(fn).parameters
    assert "logits" not in params and "cache_topk" not in params
    if "storage" in params:  # capture_ranks / capture_samples / score_samples pass it on in **kw
        assert params["storage"].default == "full"
    else:
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())


# --- DumpWriter ------------------------------------------------------------------------


def test_dump_writer_logits_warns_and_writes_what_storage_writes(tmp_path):
    with pytest.warns(DeprecationWarning, match=r"^DumpWriter\(logits='topk:4'\) is deprecated; use "
                                                r"storage='topk:4' \(logits= goes in the next release\)$") as rec:
        old = _write(tmp_path / "old", logits="topk:4")
    assert rec[0].filename == __file__  # the warning points at the caller, not at the decorator
    assert old == _write(tmp_path / "new", storage="topk:4") and old["storage"] == "topk:4"


def test_dump_writer_logits_and_storage_together_is_an_error(tmp_path):
    with pytest.raises(TypeError, match=r"^DumpWriter\(\) got both storage= and its old name logits=; "
                                        r"pass only storage='full'$"):
        DumpWriter(tmp_path / "d", MANIFEST, logits="topk:4", storage="full")
    assert not (tmp_path / "d").exists()  # refused before anything was written


# --- capture and the drivers that call it ----------------------------------------------


def test_capture_logits_warns_and_captures_what_storage_captures(lm, tmp_path):
    kw = dict(max_new_tokens=3, batch_size=2, progress=False)
    with pytest.warns(DeprecationWarning, match=r"^capture\(logits='topk:5'\) is deprecated; use storage='topk:5'"):
        old = load_dump(capture(lm, PROMPTS, tmp_path / "old", logits="topk:5", **kw))
    new = load_dump(capture(lm, PROMPTS, tmp_path / "new", storage="topk:5", **kw))
    assert old.storage == new.storage == "topk:5"
    for pid in new.ids:
        for a, b in zip(old.topk(pid), new.topk(pid)):
            np.testing.assert_array_equal(a, b)


def test_capture_logits_and_storage_together_is_an_error(lm, tmp_path):
    with pytest.raises(TypeError, match=r"^capture\(\) got both storage= and its old name logits=; "
                                        r"pass only storage='topk:8'$"):
        capture(lm, PROMPTS, tmp_path / "d", logits="full", storage="topk:8", progress=False)


@pytest.mark.parametrize("fn, kw, refused", [
    (capture_ranks, dict(rank=0, world_size=1), "model 'no-such-model' does not exist locally"),
    (capture_samples, dict(seeds=[0], mode="greedy"), "capture_samples sets mode itself"),
    (score_samples, {}, "no such dump directory"),
], ids=["capture_ranks", "capture_samples", "score_samples"])
def test_drivers_warn_under_their_own_name(fn, kw, refused, tmp_path):
    # Each call is then refused before a model runs (a missing model, mode=,
    # a missing sample set): the warning came first, from the driver.
    first = tmp_path / "no-set" if fn is score_samples else PROMPTS
    with pytest.warns(DeprecationWarning, match=rf"^{fn.__name__}\(logits='topk:3'\) is deprecated; "
                                                r"use storage='topk:3'"):
        with pytest.raises((ValueError, FileNotFoundError), match=refused):
            fn("no-such-model", first, tmp_path / "out", logits="topk:3", **kw)
    with pytest.raises(TypeError, match=rf"^{fn.__name__}\(\) got both storage= and its old name logits="):
        fn("no-such-model", first, tmp_path / "out2", logits="topk:3", storage="topk:3", **kw)


# --- perplexity ------------------------------------------------------------------------


def test_perplexity_cache_topk_warns_and_caches_what_storage_caches(lm, tmp_path):
    kw = dict(text=TEXT, ctx=16, stride=8, bootstrap=0, progress=False)
    with pytest.warns(DeprecationWarning, match=r"^perplexity\(cache_topk=4\) is deprecated; use storage='topk:4' "
                                                r"\(cache_topk= goes in the next release\)$"):
        old = perplexity(lm, save_baseline=tmp_path / "old", cache_topk=4, **kw)
    new = perplexity(lm, save_baseline=tmp_path / "new", storage="topk:4", **kw)
    a, b = BaselineCache(tmp_path / "old"), BaselineCache(tmp_path / "new")
    assert a.k == b.k == 4 and old.cache["storage"] == new.cache["storage"] == "topk:4"
    ra, rb = a.rows(0, len(a)), b.rows(0, len(b))
    np.testing.assert_array_equal(ra.topk_values, rb.topk_values)
    np.testing.assert_array_equal(ra.tail, rb.tail)


def test_perplexity_cache_topk_none_is_full_storage():
    with pytest.warns(DeprecationWarning, match=r"^perplexity\(cache_topk=None\) is deprecated; use storage='full'"):
        with pytest.raises(ValueError, match="windows must be one of"):  # stops before any model loads
            perplexity(None, cache_topk=None, windows="nope")


def test_perplexity_cache_topk_and_storage_together_is_an_error():
    with pytest.raises(TypeError, match=r"^perplexity\(\) got both storage= and its old name cache_topk=; "
                                        r"pass only storage='topk:8'$"):
        perplexity(None, cache_topk=8, storage="topk:8")


def test_perplexity_bad_cache_topk_names_the_old_keyword_and_the_new_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before it warns
        with pytest.raises(ValueError, match=r"^cache_topk must be an int >= 1, got 0; pass storage='topk:K' instead$"):
            perplexity(None, cache_topk=0)


def test_perplexity_bad_storage_is_refused_before_the_model_loads():
    with pytest.raises(ValueError, match=r"^logits storage must be 'full' or 'topk:K' with K >= 1 \(e.g. 'topk:64'\), "
                                         r"got 'top4'$"):
        perplexity("no-such-model", storage="top4")


def test_cli_ppl_bad_cache_topk_names_the_option(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc = main(["ppl", "--model", tiny_model_dir, "--text-file", str(text), "--save-baseline", str(tmp_path / "c"),
               "--cache-topk", "0", "--no-progress"])
    assert rc == 2
    assert "--cache-topk must be >= 1, got 0; use --storage topk:K" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --- the decorator itself --------------------------------------------------------------


def test_renamed_keyword_converts_and_keeps_other_arguments():
    @renamed_keyword("cache_topk", "storage", storage_from_cache_topk, where="f")
    def f(a, *, storage="full", b=0):
        return a, storage, b

    assert f(1, storage="topk:2", b=3) == (1, "topk:2", 3)
    with pytest.warns(DeprecationWarning, match=r"^f\(cache_topk=7\) is deprecated; use storage='topk:7'"):
        assert f(1, cache_topk=7, b=3) == (1, "topk:7", 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'logits'"):
        f(1, logits="full")
    assert f.__name__ == "f" and list(inspect.signature(f).parameters) == ["a", "storage", "b"]


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "4"])
def test_storage_from_cache_topk_refuses_what_cache_topk_never_took(k):
    with pytest.raises(ValueError, match=r"^cache_topk must be an int >= 1, got "):
        storage_from_cache_topk(k)
