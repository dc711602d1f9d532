"""Capture engines: the only modules that import torch and transformers.

``load_model`` loads a local Hugging Face directory or a GGUF file (the
embedded default when None); ``capture`` runs it over a prompt set in greedy,
sample or score mode and streams the raw logits into a dump.
"""

from logitparity.capture.hf import LoadedModel, load_model
from logitparity.capture.run import MODES, capture

__all__ = ["MODES", "LoadedModel", "capture", "load_model"]
