"""notebooks/distributions.ipynb runs top to bottom on the default model
(nbclient, offline) and shows what it promises; committed without outputs.
(Kept apart from test_notebooks.py so that the notebook list there stays as
it is.)"""

from __future__ import annotations

import pytest

from test_notebooks import NOTEBOOKS, _outputs, _text

NAME = "distributions"


def test_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / f"{NAME}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{NAME}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = _text(nb)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "warning: calibration coverage: the prompts used have no " in text
    assert "planted outlier flagged: model.layers.10.mlp:input channel 3: score " in text
    assert "## Outlier channels (activations)" in markdown and "## By category" in markdown
    assert "## Ablation: outlier channels ranked by damage (zero)" in markdown
    assert "`model.layers.10.mlp:input` | 10 | 3 |" in markdown
    assert len(_outputs(nb, "image/png")) == 1
