"""ImageNet-1k class names (shipped offline in imagenet_classes.txt) and top-k decoding."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

__all__ = ["class_names", "decode_top_k"]


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    text = resources.files("pipeline.backbones").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def class_names() -> list[str]:
    """The 1000 ImageNet class names in model output order (0 'tench' ... 999 'toilet tissue')."""
    return list(_names())


def decode_top_k(probs: np.ndarray, k: int = 5) -> list[list[tuple[int, str, float]]]:
    """Turn (N, 1000) scores into, per row, the k best (index, name, score), best first."""
    probs = np.asarray(probs)
    if probs.ndim == 1:
        probs = probs[None]
    if probs.ndim != 2 or probs.shape[1] != 1000:
        raise ValueError(f"decode_top_k expects scores of shape (N, 1000), got {probs.shape}")
    names = _names()
    k = max(1, min(int(k), 1000))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), names[i], float(row[i])) for i in idx] for row, idx in zip(probs, top)]
