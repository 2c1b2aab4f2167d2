"""Stage 2: heads fitted on cached features, one module per kind (`logistic`, `dense`, `svm`, `knn`,
`auto`) behind one table (`registry`), what they share (`base`, `files`, `folds`, `calibration`,
`streaming`, `schedules`), training on a cache (`training`) and parallel sweeps (`sweep`). To add a
kind, see docs/heads.md (Adding a head kind).

The names below are re-exported lazily (PEP 562), so `import pipeline.heads.registry` (the CLI's list
of kinds) does not import scikit-learn or Keras.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoHead": "auto", "DenseHead": "dense", "balanced_class_weights": "dense", "KernelHead": "svm", "KNNHead": "knn",
    "LogisticHead": "logistic", "FeatureSource": "base", "Head": "base", "ReducedFeatures": "base",
    "check_class_subset": "base", "feature_info_of": "base", "given_positive": "base", "jsonable": "files",
    "load_keras_file": "files", "HEAD_KINDS": "registry", "head_class": "registry", "head_filename": "registry",
    "load_head": "registry", "make_head": "registry", "trusting_pickles": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.heads' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.heads.{_EXPORTS[name]}"), name)
