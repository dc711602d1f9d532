"""Renderers: each formats what a result object already holds, computing no
figure of its own (the figures belong to Comparison, LayerComparison,
SensitivityMap, ModelStats, TaskComparison).

- ``comparison``: the comparison report, markdown for people and JSON with
  every number (``write_report``, ``render_markdown``, ``comparison_dict``),
  and the sampled comparison's;
- ``plots``: the comparison's PNG plots (matplotlib, Agg);
- ``layers``, ``sensitivity``, ``stats``, ``tasks``: the layer table, the
  sensitivity map, the distribution report, the task-accuracy section.
"""

from __future__ import annotations

from logitparity.report.comparison import (
    comparison_dict,
    describe_run,
    histogram_bars,
    jsonable,
    render_markdown,
    render_sampled_markdown,
    sampled_dict,
    write_json,
    write_report,
)

__all__ = ["comparison_dict", "describe_run", "histogram_bars", "jsonable", "render_markdown",
           "render_sampled_markdown", "sampled_dict", "write_json", "write_report"]
