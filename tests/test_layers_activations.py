"""The dump's activations part (capture.hooks.capture_activations,
logitparity.activations), two-dump comparison, the report renderers and the
``logitparity layers`` CLI, on the tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import logitparity.layers as L  # noqa: E402
from logitparity.activations import ActivationWriter, load_activations  # noqa: E402
from logitparity.capture import capture, load_model  # noqa: E402
from logitparity.capture.hooks import capture_activations  # noqa: E402
from logitparity.capture.plants import planted  # noqa: E402
from logitparity.cli import main  # noqa: E402
from logitparity.report.layers import layers_markdown  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def dumps(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    ref = capture(lm, None, root / "ref", limit=3, max_new_tokens=4, progress=False)
    capture_activations(lm, ref, modules=None, storage="rows", generated=2)
    with planted(lm, "attn_scale", layer=1):
        cand = capture(lm, None, root / "cand", limit=3, max_new_tokens=4, progress=False)
        capture_activations(lm, cand, modules=None, storage="rows", generated=2)
    return ref, cand


def test_activations_part_holds_rows_and_exact_statistics(lm, dumps):
    ref, _ = dumps
    acts = load_activations(ref)
    assert acts.storage == "rows" and acts.manifest["positions"]["generated"] == 2
    assert acts.modules[:5] == ["model.layers.0.input_layernorm", "model.layers.0.self_attn",
                                "model.layers.0.post_attention_layernorm", "model.layers.0.mlp", "model.layers.0"]
    from logitparity.dump import load_dump

    d = load_dump(ref)
    rec = d.records[0]
    ids = rec["prompt_token_ids"] + rec["generated_token_ids"][:2]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
    rows, bf16 = acts.rows(rec["id"], "model.layers.0")
    assert not bf16 and rows.shape == (len(ids), 64)
    # hidden_states[1] is layer 0's output (the last one is after the final norm)
    np.testing.assert_array_equal(rows, hs[1][0].numpy())
    # Statistics merged over every prompt, against float64 numpy.
    allrows = np.concatenate([acts.rows(r["id"], "model.layers.1")[0] for r in d.records]).astype(np.float64)
    s = acts.stats("model.layers.1")
    x = allrows.ravel()
    assert s["count"] == x.size and s["finite"] == x.size
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12, abs=1e-12)
    assert s["variance"] == pytest.approx(x.var(), rel=1e-10)
    z = (x - x.mean()) / x.std()
    assert s["skewness"] == pytest.approx((z ** 3).mean(), rel=1e-8, abs=1e-10)
    assert s["kurtosis"] == pytest.approx((z ** 4).mean(), rel=1e-8)
    assert s["min"] == x.min() and s["max"] == x.max()
    np.testing.assert_array_equal(s["channel_max_abs"], np.abs(allrows).max(axis=0))
    srt = np.sort(np.abs(x))
    exact = srt[int(np.ceil(0.99 * x.size - 1e-9)) - 1]
    assert abs(s["abs_p99"] - exact) <= s["abs_quantile_rel_error_bound"] * exact
    assert s["zero_fraction"] == 0 and s["nan_fraction"] == 0


def test_two_dumps_name_the_planted_attention(dumps, tmp_path):
    ref, cand = dumps
    c = L.compare_activation_dumps(ref, cand)
    assert c.mode == "propagated" and c.first_divergent == "model.layers.1.self_attn"
    assert L.compare_activation_dumps(ref, ref).first_divergent is None
    # The CLI on the same dumps: exit 1 (a module left the band), the report files.
    md, js, png = tmp_path / "l.md", tmp_path / "l.json", tmp_path / "l.png"
    assert main(["layers", str(ref), str(cand), "--report", str(md), "--json", str(js), "--plot", str(png)]) == 1
    assert "**first divergent module: `model.layers.1.self_attn`**" in md.read_text()
    assert json.loads(js.read_text())["first_divergent"] == "model.layers.1.self_attn"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["layers", str(ref), str(ref)]) == 0


def test_cli_two_models(tiny_model_dir, tmp_path, capsys):
    floor = tmp_path / "floor.json"
    assert main(["layers", tiny_model_dir, tiny_model_dir, "--limit", "2", "--save-floor", str(floor),
                 "--bisect", "--mode", "both"]) == 0
    out = capsys.readouterr().out
    assert "no module leaves the noise band" in out and "bisect over decoder layers: first bad none" in out
    assert json.loads(floor.read_text())["format"] == "logitparity-layer-floor"
    # The saved floor read back as the band, under compare's name for it (--noise-floor) and the old --floor.
    sources = []
    for flag in ("--noise-floor", "--floor"):
        js = tmp_path / f"{flag.strip('-')}.json"
        assert main(["layers", tiny_model_dir, tiny_model_dir, "--limit", "2", flag, str(floor), "--json", str(js)]) == 0
        sources.append(json.loads(js.read_text())["band_source"])
        note = "logitparity layers: note: --floor is the old spelling of --noise-floor; use --noise-floor"
        assert (note in capsys.readouterr().err) == (flag == "--floor")
    assert sources[0] == sources[1] and str(floor) in sources[0]
    # The candidate's dtype under ppl's name for it (--candidate-dtype) and the old --dtype: the same run.
    docs = []
    for flag in ("--candidate-dtype", "--dtype"):
        js = tmp_path / f"{flag.strip('-')}.json"
        rcs = main(["layers", tiny_model_dir, tiny_model_dir, "--limit", "2", flag, "bf16", "--json", str(js)])
        docs.append((rcs, json.loads(js.read_text())))
        note = "logitparity layers: note: --dtype is the old spelling of --candidate-dtype; use --candidate-dtype"
        assert (note in capsys.readouterr().err) == (flag == "--dtype")
    assert docs[0][1]["ref_dtype"] == "fp32" and docs[0][1]["cand_dtype"] == "bf16"
    assert docs[0][0] == docs[1][0] and docs[0][1]["modules"] == docs[1][1]["modules"]
    assert main(["layers", tiny_model_dir, str(tmp_path)]) == 2  # an empty dir is no model


def test_stats_only_budget_and_aliases(lm, tmp_path):
    d = capture(lm, None, tmp_path / "d", limit=3, max_new_tokens=2, progress=False)
    capture_activations(lm, d, storage="rows", budget_mb=1e-4,
                        aliases={"blk.1.out": "model.layers.1"})  # budget: 100 bytes, smaller than one prompt
    acts = load_activations(d)
    assert acts.manifest["rows_dropped"] and not any(acts.has_rows(r) for r in acts.records)
    assert acts.stats("blk.1.out") == acts.stats("model.layers.1")  # the alias resolves
    pid = next(iter(acts.records))
    with pytest.raises(ValueError, match=r"has no activation rows .*the activations budget ran out"):
        acts.rows(pid, "model.layers.1")
    capture_activations(lm, d, storage="stats")
    with pytest.raises(ValueError, match=r"statistics only were stored"):
        load_activations(d).rows(pid, "model.layers.0")
    with pytest.raises(KeyError, match=r"module 'model.layers.9' is not in"):
        load_activations(d).stats("model.layers.9")


def test_activations_errors(lm, tmp_path):
    d = capture(lm, None, tmp_path / "d", limit=1, max_new_tokens=1, progress=False)
    with pytest.raises(FileNotFoundError, match=r"has no activations part .*recapture with `logitparity dump "
                                                r"--activations`"):
        load_activations(d)
    with pytest.raises(ValueError, match=r"storage must be one of \('stats', 'rows'\)"):
        ActivationWriter(d, ["model.layers.0"], storage="all")
    with pytest.raises(ValueError, match=r"activations budget must be a positive number of MB, got 0"):
        ActivationWriter(d, ["model.layers.0"], budget_mb=0)
    with pytest.raises(ValueError, match=r"alias 'x' points at 'model.layers.7', which is not a recorded module"):
        ActivationWriter(d, ["model.layers.0"], aliases={"x": "model.layers.7"})
    with pytest.raises(FileNotFoundError, match=r"is not a dump directory"):
        ActivationWriter(tmp_path, ["model.layers.0"])
    capture_activations(lm, d)
    m = d / "activations" / "activations.json"
    doc = json.loads(m.read_text())
    m.write_text(json.dumps({**doc, "version": "2.0"}))
    with pytest.raises(ValueError, match=r"activations manifest .* version 2.0 is newer than this logitparity reads \(1.0\); upgrade"):
        load_activations(d)
    m.write_text(json.dumps({**doc, "complete": False}))
    with pytest.raises(ValueError, match=r"the activations capture did not finish"):
        load_activations(d)
    m.write_text(json.dumps({**doc, "format": "x"}))
    with pytest.raises(ValueError, match=r"expected format 'logitparity-activations', found format 'x'; the activations part is damaged"):
        load_activations(d)
    with pytest.raises(ValueError, match=r"generated must be an int >= 0"):
        capture_activations(lm, d, generated=-1)


def test_renderers(lm):
    rt = L.trace_reference(lm, ["hello world", "the fox"])
    with planted(lm, "down_proj_roll", layer=0):
        c = L.compare_layers(rt, lm)
    md = layers_markdown(c)
    assert "| module | isolated rel L2 ↓ |" in md
    assert "**`model.layers.0.mlp`**" in md and "| **yes** |" in md
    assert md == c.to_markdown()
    assert len([line for line in md.splitlines() if line.startswith("| `") or line.startswith("| **`")]) == 10
    assert "first divergent module: none" in layers_markdown(L.compare_layers(rt, lm))


def test_dump_cli_records_activations(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["dump", "--model", tiny_model_dir, "--out", str(out), "--limit", "2", "--max-new-tokens", "3",
                 "--no-progress", "--activations", "rows", "--activations-modules", "default",
                 "--activations-generated", "1", "--activations-budget", "8"]) == 0
    assert "activations: " in capsys.readouterr().out
    acts = load_activations(out)
    assert len(acts.records) == 2 and all(acts.has_rows(r) for r in acts.records)
    assert len(acts.modules) == 10 and acts.manifest["budget_mb"] == 8.0
    from logitparity.dump import VERSION, load_dump

    d = load_dump(out)
    assert d.manifest["version"] == VERSION == "1.1"
    r = d.records[0]
    assert acts.records[r["id"]]["positions"] == len(r["prompt_token_ids"]) + 1


def test_llama_cpp_layer_outputs_go_into_the_dump_and_layers_names_the_first_disagreeing_layer(tmp_path, capsys):
    """The llama.cpp engine's decoder layer outputs (its eval callback) are
    written as the dump's activations part under canonical paths, so
    `logitparity layers HF_DUMP LLAMA_DUMP` compares the two engines layer by
    layer: Q4_1 weights against the de-quantized fp32 ones leave the fp32
    band from the first layer on, and llama.cpp against itself leaves it
    nowhere."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh installs it)")
    from logitparity.capture.hooks import capture_activations
    from logitparity.capture.llamacpp import LlamaCppEngine
    from logitparity.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Name three colours.\n", encoding="utf-8")
    common = ["--prompts", str(prompts), "--max-new-tokens", "2", "--no-progress", "--torch-threads", "1"]
    llama = ["--engine", "llama.cpp", "--engine-opt", "n_ctx=256"]
    assert main(["dump", *common, "--out", str(tmp_path / "hf"), "--activations", "rows"]) == 0
    assert main(["dump", *common, *llama, "--out", str(tmp_path / "llama"), "--activations", "rows"]) == 0
    assert main(["dump", *common, *llama, "--out", str(tmp_path / "llama2")]) == 0
    with LlamaCppEngine(None, n_ctx=256) as e:  # the Python call, on an existing dump
        capture_activations(e, tmp_path / "llama2", storage="rows")
    capsys.readouterr()
    assert main(["layers", str(tmp_path / "hf"), str(tmp_path / "llama")]) == 1
    assert "first divergent module: model.layers.0 (layer 0" in capsys.readouterr().out
    assert main(["layers", str(tmp_path / "llama"), str(tmp_path / "llama2")]) == 0
    assert main(["dump", *common, *llama, "--out", str(tmp_path / "x"), "--activations", "rows",
                 "--activations-modules", "all"]) == 2
    assert "--engine llama.cpp records decoder layer outputs only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="records decoder layer outputs only"):
        with LlamaCppEngine(None, n_ctx=256) as e:
            capture_activations(e, tmp_path / "llama2", modules="all")


def test_activation_writer_errors_undeclared_module_and_changed_width(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    w = ActivationWriter(tmp_path, ["model.layers.0"])
    rows = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match=r"module 'model.layers.1' was not declared to the writer"):
        w.add("p0", {"model.layers.1": (rows, False)})
    w.add("p0", {"model.layers.0": (rows, False)})
    with pytest.raises(ValueError, match=r"module model.layers.0: width 9 differs from the first record's 8"):
        w.add("p1", {"model.layers.0": (np.ones((3, 9), np.float32), False)})
