"""``logitparity stats``: the report, JSON and plot on the tiny model, and one
test per argument error (argument, expected, got, fix)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from logitparity.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"id": "a", "category": "code", "text": "def add(a, b):\\n    return a + b\\n"}\n'
                 '{"id": "b", "category": "math", "text": "What is 12 times 7?"}\n', encoding="utf-8")
    return str(p)


def test_stats_writes_report_json_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    rc = main(["stats", "--model", tiny_model_dir, "--prompts", _prompts(tmp_path), "--ablate", "2",
               "--outlier-factor", "3", "--report", str(out / "s.md"), "--json", str(out / "s.json"),
               "--plot", str(out / "s.png"), "--torch-threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "warning: calibration coverage: the prompts used have no context_limit, creative" in text
    assert "2 prompts, " in text and " activation sites, 21 weights: " in text
    d = json.loads((out / "s.json").read_text())
    assert d["rules"]["outlier_factor"] == 3.0 and [p["id"] for p in d["prompts"]] == ["a", "b"]
    md = (out / "s.md").read_text()
    assert md.startswith("# logitparity stats: weight and activation distributions")
    assert len(d["outliers"]) >= 2  # factor 3 on the random model: a few channels
    assert "## Ablation: outlier channels ranked by damage (zero)" in md
    assert [r["key"] for r in d["ablation"]["ranking"]] != [] and len(d["ablation"]["ranking"]) == 2
    assert "most damaging ablation (zero): " in text
    assert (out / "s.png").read_bytes()[:4] == b"\x89PNG"


def _planted_copy(model_dir, tmp_path):
    """The tiny model with channel OUTLIER_CHANNEL of layer 1's MLP input x50 (the
    mlp_input_outlier plant, through post_attention_layernorm's weight), saved as a model directory."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from logitparity.capture.plants import OUTLIER_CHANNEL, OUTLIER_SCALE

    out = tmp_path / "planted"
    shutil.copytree(model_dir, out)
    (f,) = out.glob("*.safetensors")
    w = load_file(str(f))
    w["model.layers.1.post_attention_layernorm.weight"][OUTLIER_CHANNEL] *= OUTLIER_SCALE
    save_file(w, str(f), metadata={"format": "pt"})
    return str(out), OUTLIER_CHANNEL


def test_stats_against_a_reference_names_and_ablates_the_grown_channel(tiny_model_dir, tmp_path, capsys):
    cand, ch = _planted_copy(tiny_model_dir, tmp_path)
    rc = main(["stats", "--model", cand, "--against", tiny_model_dir, "--prompts", _prompts(tmp_path),
               "--ablate", "2", "--no-weights", "--json", str(tmp_path / "s.json"), "--report", str(tmp_path / "s.md"),
               "--torch-threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"channels grew past the factor; the most: model.layers.1.mlp:input channel {ch}," in text
    d = json.loads((tmp_path / "s.json").read_text())
    assert (d["shifts"][0]["key"], d["shifts"][0]["channel"]) == ("model.layers.1.mlp:input", ch)
    assert d["shifts"][0]["ratio"] == pytest.approx(50.0, rel=1e-5)
    assert (d["ablation"]["ranking"][0]["key"], d["ablation"]["ranking"][0]["channel"]) == ("model.layers.1.mlp:input", ch)
    md = (tmp_path / "s.md").read_text()
    assert "## Channels that grew against the reference (> 4× its max |x|)" in md
    assert f"| 1 | `model.layers.1.mlp:input` | 1 | {ch} |" in md


@pytest.mark.parametrize("argv,message", [
    (["--shift-factor", "3"], "--shift-factor 3 applies to a comparison with --against REF; add --against or drop it"),
    (["--against", "default", "--shift-factor", "1"], "--shift-factor must be a number > 1 (how many times a "
                                                      "channel's max |x| must grow against the reference), got 1; "
                                                      "the default is 4"),
    (["--against", "default", "--ablate-systematic"], "--ablate-systematic picks the candidate's own systematic "
                                                      "outliers; with --against, --ablate ablates the channels that "
                                                      "grew: drop one of the two"),
    (["--limit", "0"], "--limit must be an integer >= 1 (the first N prompts), got 0; omit it to use every prompt"),
    (["--ablate", "-1"], "--ablate must be an integer >= 0 (the number of top outlier channels to ablate), got -1; "
                         "use 0 to skip the ablation"),
    (["--outlier-factor", "0.5"], "--outlier-factor must be a number > 1 (a channel's max |x| over the median "
                                  "channel's), got 0.5; the default is 10"),
    (["--outlier-factor", "nan"], "--outlier-factor must be a number > 1"),
])
def test_argument_errors(argv, message, capsys):
    assert main(["stats", *argv]) == 2
    assert f"logitparity stats: error: {message}" in capsys.readouterr().err


def test_missing_prompts_file(tiny_model_dir, tmp_path, capsys):
    assert main(["stats", "--model", tiny_model_dir, "--prompts", str(tmp_path / "nope.jsonl"),
                 "--torch-threads", "1"]) == 2
    assert f"prompts file {tmp_path / 'nope.jsonl'} does not exist" in capsys.readouterr().err


def test_missing_model(tmp_path, capsys):
    assert main(["stats", "--model", str(tmp_path / "no-model"), "--torch-threads", "1"]) == 2
    assert "logitparity stats: error: " in capsys.readouterr().err
