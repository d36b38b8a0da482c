"""The shared library of the SemLA registry: formats on disk, trust, the model, retrieval,
exact LoRA fusion and the inference node.

Importing ``semla.registry`` (and its torch-free modules ``keys``, ``bundle``, ``retrieval``,
``synth``, ``data``, ``http``) never imports torch, so the registry server can use them on a
host with no GPU stack. The torch parts (``model``, ``fusion``, ``train``, ``node``) are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Node", "Segmenter", "Prediction", "train_adapter"]

_LAZY = {
    "Node": "semla.registry.node",
    "Prediction": "semla.registry.node",
    "Segmenter": "semla.registry.node",
    "train_adapter": "semla.registry.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semla.registry' has no attribute {name!r}")
