"""notebooks/distributions.ipynb runs top to bottom on the default model
(nbclient, offline) and shows what it promises; committed without outputs.
(Kept apart from test_notebooks.py so that the notebook list there stays as
it is.)"""

from __future__ import annotations

import pytest

from test_notebooks import _outputs, _text, check_committed_without_outputs, run_notebook

NAME = "distributions"


def test_committed_without_outputs():
    check_committed_without_outputs(NAME)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    nb = run_notebook(NAME, tmp_path, monkeypatch)
    text = _text(nb)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "warning: calibration coverage: the prompts used have no " in text
    assert "planted outlier flagged: model.layers.10.mlp:input channel 3: score " in text
    assert "## Outlier channels (activations)" in markdown and "## By category" in markdown
    assert "## Ablation: outlier channels ranked by damage (zero)" in markdown
    assert "`model.layers.10.mlp:input` | 10 | 3 |" in markdown
    assert len(_outputs(nb, "image/png")) == 1
