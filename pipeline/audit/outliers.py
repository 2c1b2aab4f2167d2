"""Images that do not belong: far from the other images of their class.

The score is the mean cosine distance to the image's k nearest neighbours *of its own class*, as a
robust z-score within that class (median and MAD), so a spread-out class does not fill the ranking.
Measuring within the class matters: photos of another data set dropped into several classes form a
cluster of their own, so each is near the others and a plain kNN distance over all images misses
them (bench/audit.py); within one class they are few, and far from the rest.
"""

from __future__ import annotations

import numpy as np

from pipeline.features.neighbours import EXACT_ROWS, search_space, self_neighbours

CLASS_K = 10


def class_knn_distance(X: np.ndarray, y: np.ndarray, k: int = CLASS_K, walk: np.ndarray | None = None) -> np.ndarray:
    """Mean cosine distance of each row to its k nearest other rows of the same label (NaN for a
    class of one). `walk`: the rows' `search_space`, shared by classes too large for exact search
    (made here when needed and not given)."""
    out = np.full(y.size, np.nan)
    if walk is None and np.bincount(y).max() > EXACT_ROWS:
        walk = search_space(X)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if rows.size < 2:
            continue
        kk = min(k, rows.size - 1)
        neigh = self_neighbours(X[rows], kk, exact_rows=EXACT_ROWS,
                                walk=None if walk is None or rows.size <= EXACT_ROWS else walk[rows])
        out[rows] = 1.0 - neigh.similarity.mean(axis=1)
    return out


def outlier_scores(X: np.ndarray, y: np.ndarray, k: int = CLASS_K, walk: np.ndarray | None = None) -> np.ndarray:
    """Robust z-score of `class_knn_distance` within each class (0 for classes too small to tell)."""
    d = class_knn_distance(X, y, k, walk)
    z = np.zeros(y.size)
    for c in np.unique(y):
        rows = np.flatnonzero((y == c) & np.isfinite(d))
        if rows.size < 3:
            continue
        med = np.median(d[rows])
        mad = np.median(np.abs(d[rows] - med)) * 1.4826
        z[rows] = (d[rows] - med) / max(mad, 1e-6)
    return z
