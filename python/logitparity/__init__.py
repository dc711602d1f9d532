"""logitparity: prove that an optimized or ported LLM inference path still
produces the same outputs as its reference.

The row kernels live in the compiled module ``logitparity._core`` (Highway
SIMD, dynamic dispatch); this package re-exports the public API. Modules that
import torch or transformers are loaded lazily, on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from logitparity.metrics import (  # noqa: E402
    RowMetrics,
    RowMetricsSummary,
    compare_logits,
    log_softmax,
    logsumexp,
    nll,
    topk,
)
from logitparity.stats import Describe, Rate, describe, rate  # noqa: E402

# Public name -> module that defines it, imported on first use. (The capture
# function itself is `logitparity.capture.capture`: a top-level `capture` name
# would be shadowed by the subpackage of the same name.)
_LAZY = {
    "Dump": "logitparity.dump",
    "DumpWriter": "logitparity.dump",
    "load_dump": "logitparity.dump",
    "Prompt": "logitparity.prompts",
    "load_prompts": "logitparity.prompts",
    "load_model": "logitparity.capture",
    "LoadedModel": "logitparity.capture",
    "compare_dumps": "logitparity.compare",
    "Comparison": "logitparity.compare",
    "IncompatibleRuns": "logitparity.compare",
    "compare_sampled": "logitparity.sampling",
    "SampledComparison": "logitparity.sampling",
    "load_sample_set": "logitparity.sampling",
    "sampling_probs": "logitparity.sampling",
    "Policy": "logitparity.policy",
    "load_policy": "logitparity.policy",
    "NoiseFloor": "logitparity.policy",
    "load_noise_floor": "logitparity.policy",
    "write_report": "logitparity.report",
    "perplexity": "logitparity.ppl",
    "PerplexityResult": "logitparity.ppl",
    "gate": "logitparity.ppl",
    "Floor": "logitparity.floor",
    "load_floor": "logitparity.floor",
    "compare_layers": "logitparity.layers",
    "LayerComparison": "logitparity.layers",
    "stats_of": "logitparity.diagnostics",
    "sensitivity_map": "logitparity.sensitivity",
    "ablate": "logitparity.diagnostics",
    "ModelStats": "logitparity.diagnostics",
    "assert_logits_match": "logitparity.testing",
    "assert_dumps_match": "logitparity.testing",
    "logits_comparison": "logitparity.testing",
    "run_tasks": "logitparity.tasks",
    "compare_tasks": "logitparity.tasks",
    "load_questions": "logitparity.tasks",
    "BaselineCache": "logitparity.baseline_cache",
    "load_baseline_cache": "logitparity.baseline_cache",
}

__all__ = [
    "Describe",
    "Rate",
    "RowMetrics",
    "RowMetricsSummary",
    "compare_logits",
    "describe",
    "log_softmax",
    "logsumexp",
    "nll",
    "rate",
    "topk",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'logitparity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
