"""How the logistic and dense heads standardize features: one divisor per feature, never below the
typical feature's spread.

A plain standard scaler divides each feature by its training std. Pooled CNN features hold many channels
that are nearly constant on a small training set (zero on all but one image, or zero up to rounding): their
std is tiny, and an image outside the training set that lights such a channel gets a standardized value of
thousands. On 10 images per class of the built-in digits half the other images had one beyond 20 (up to
400,000); the logistic head was confident and wrong on them (held-out log loss 1.36, its CV figure 0.67,
since the scaler had seen every fold) and the dense head too. Flooring each std at the median std keeps
what standardizing is for (features on one scale) without that: `docs/heads.md` has the measurements.
"""

from __future__ import annotations

import numpy as np

SCALE_FLOOR = 1.0  # x the median std of the features that vary; chosen on held-out images (docs/heads.md)


def feature_scale(std: np.ndarray) -> np.ndarray:
    """Per-feature divisors for standardizing: each std, floored at SCALE_FLOOR x the median std of the
    features that vary (above 1e-9 of the largest; constant ones get the floor too); ones where none varies."""
    std = np.nan_to_num(np.asarray(std, np.float64), nan=0.0, posinf=0.0)
    varying = std[std > std.max(initial=0.0) * 1e-9]  # relative: random-init features are ~1e-11 throughout
    if not varying.size:
        return np.ones_like(std)
    return np.maximum(std, SCALE_FLOOR * float(np.median(varying)))
