"""tltk: transfer learning for image classification, from the command line and from Python.

The main entry points are re-exported here lazily, so ``import tltk`` stays cheap:
``finetune``, ``evaluate``, ``load_run`` (a ``Run``), ``build_model``, ``summarize`` and ``report``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "finetune": "tltk.api",
    "FinetuneConfig": "tltk.train.finetune",
    "TrainConfig": "tltk.train.trainer",
    "DataOptions": "tltk.train.finetune",
    "evaluate": "tltk.run",
    "load_run": "tltk.run",
    "Run": "tltk.run",
    "build_model": "tltk.model",
    "ModelSpec": "tltk.model",
    "summarize": "tltk.summary",
    "load_data": "tltk.data",
    "report": "tltk.reporting",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tltk' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]
