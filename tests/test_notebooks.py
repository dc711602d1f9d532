"""The notebooks run top to bottom (nbclient, kernel python3) on the default
model, offline, and render what they promise: markdown tables and inline
plots. The committed files carry no outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart", "numerics_debugging", "sensitivity"]


def _outputs(nb, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if mime in o.get("data", {})]


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            parts.append(o.get("text", "") if o.get("output_type") == "stream" else
                         o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def check_committed_without_outputs(name: str) -> None:
    """The committed notebook is valid nbformat 4, for kernel python3, with no
    outputs and no execution counts."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


def run_notebook(name: str, tmp_path, monkeypatch):
    """Execute the notebook top to bottom, offline, in ``tmp_path`` (its dumps
    and plots land there); -> the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    return nb


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    check_committed_without_outputs(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = run_notebook(name, tmp_path, monkeypatch)
    text = _text(nb)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    images = _outputs(nb, "image/png")
    if name == "quickstart":
        assert "under policy 'fp16'" in text
        assert "| kl_ref_cand | ↓ |" in markdown  # the summary table
        assert "# logitparity: candidate vs reference" in markdown  # the full report
        assert "| run | generated text |" in markdown or "No divergence" in markdown
        assert len(images) == 2
    elif name == "sensitivity":
        assert "strip, layers 0…29: " in text and "most fragile module: layer " in text
        assert "predicted mean KL " in text and "Spearman vs measured KL: weight×grad " in text
        assert "| rank | layer | module | risk | mean KL ± se ↓ |" in markdown
        assert len(images) == 2
    else:
        assert text.count("FAIL under policy 'fp16'") == 2  # free-running and teacher-forced
        assert "## Perplexity" in markdown and "| ΔPPL |" in markdown
        assert "first decoder layer whose output differs (propagated): 10\n" in text
        assert "first divergent module (isolated): model.layers.10.mlp — relative L2 " in text
        assert "isolated error of every module after layer 10: max 0;" in text
        assert "**first divergent module: `model.layers.10.mlp`**" in markdown
        assert len(images) == 3
