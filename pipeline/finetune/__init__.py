"""Stage 3: fine-tune the backbone's top blocks end to end, starting from a fitted head.

The names below are re-exported lazily (PEP 562), so `import pipeline.finetune.model` (which export
needs, and the CLI imports for `--help`) does not import the trainer and scikit-learn with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"stage2_inputs": "handover", "build_finetune_model": "model", "set_trainable": "model",
            "FineTuner": "tuner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.finetune.{_EXPORTS[name]}"), name)
