"""Images that do not belong: far from the other images of their class, among images that are far
from theirs too.

First, the mean cosine distance to the image's k nearest neighbours *of its own class*, as a robust
z-score within that class (median and MAD), so a spread-out class does not fill the ranking.
Measuring within the class matters: photos of another data set dropped into several classes form a
cluster of their own, so each is near the others and a plain kNN distance over all images misses
them (bench/audit.py); within one class they are few, and far from the rest.

Then the neighbourhood: half the mean of that z over the image's 10 nearest images overall is added,
and the sum is a robust z within the class again. An unusual but real photo of a class sits among
ordinary images (of its class or another) and loses ground; a foreign photo sits among other foreign
photos, each far from its own class, and gains. On flowers with 20 hymenoptera photos planted (40
fresh plant seeds, docs/benchmarks.md) the top 40 held 27.2 images that do not belong before and 30.3
after; 20 ants planted together: 11.7 of them in the top 40 before, 15.2 after.

Each robust z pools a small class's spread with the median large class's (`class_z`): three distances in
a class of four make a narrow spread by chance, and its ordinary images were listed 7x as often as a
large class's.

The audit has every image's nearest neighbours over all classes already: an image with k of its own
class among them takes those (they are its class's k nearest), and only the others are searched
within their class, so the outliers cost a fraction of a search of their own; the neighbourhood
reads the same neighbours.
"""

from __future__ import annotations

import numpy as np

from pipeline.features.neighbours import (EXACT_ROWS, CosineIndex, Neighbours, exact_cosines, search_space,
                                         self_neighbours)

CLASS_K = 10
AROUND_K = 10           # the nearest images overall whose class z-scores make an image's neighbourhood
AROUND_WEIGHT = 0.5     # measured on flowers with planted photos (bench/audit.py): 0.5 and 1 tie, 0.5 lists fewer
CANDIDATES = 2          # a large class's missing rows are found among this many x k candidates on the projection
PRIOR_IMAGES = 20      # a class's spread is pooled with the median large class's as if that were 20 more images
WHOLE_CLASS_SHARE = 0.25  # above this share of a large class missing, its own graph is cheaper than the searches


def _from_global(y: np.ndarray, sizes: np.ndarray, neigh: Neighbours, k: int) -> np.ndarray:
    """Each row's mean cosine distance to the first k(row) rows of its own class in `neigh` (the
    global neighbours, most similar first); NaN where fewer are listed. k(row) = min(k, class - 1)."""
    idx, sim = neigh.index, neigh.similarity
    same = (idx >= 0) & (y[np.maximum(idx, 0)] == y[:, None])
    want = np.minimum(k, sizes[y] - 1)
    take = same & (np.cumsum(same, axis=1) <= want[:, None])
    got = take.sum(axis=1)
    total = np.where(take, sim, 0.0).sum(axis=1)
    return np.where((got == want) & (want > 0), 1.0 - total / np.maximum(want, 1), np.nan)


def _search_rows(X: np.ndarray, rows: np.ndarray, ask: np.ndarray, kk: int, walk: np.ndarray | None) -> np.ndarray:
    """Mean cosine distance of rows `ask` to their kk nearest other rows among `rows` (one class):
    exact for a small class; for a large one, 2kk candidates from exact search on the projection
    `walk`, rescored at full width (as the approximate search does)."""
    if walk is None:
        got = CosineIndex(X[rows], groups=rows, normalized=True).query(X[ask], kk, query_groups=ask)
        return 1.0 - got.similarity.mean(axis=1)
    cand = CosineIndex(walk[rows], groups=rows, normalized=True).query(walk[ask], min(rows.size - 1, CANDIDATES * kk),
                                                                       query_groups=ask).index
    sim = exact_cosines(X, ask, np.where(cand >= 0, rows[np.maximum(cand, 0)], -1))
    sim[cand < 0] = -np.inf
    return 1.0 - np.sort(sim, axis=1)[:, ::-1][:, :kk].mean(axis=1)


def class_knn_distance(X: np.ndarray, y: np.ndarray, k: int = CLASS_K, walk: np.ndarray | None = None,
                       neigh: Neighbours | None = None) -> np.ndarray:
    """Mean cosine distance of each unit-length row to its k nearest other rows of the same label (NaN
    for a class of one). `neigh`: every row's nearest rows over all labels, where the caller has them
    (the module docstring); `walk`: the rows' `search_space`, shared by classes too large for exact
    search (made here when needed and not given)."""
    sizes = np.bincount(y)
    out = np.full(y.size, np.nan) if neigh is None else _from_global(y, sizes, neigh, k)
    if walk is None and sizes.max() > EXACT_ROWS and np.isnan(out).any():
        walk = search_space(X)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        ask = rows[np.isnan(out[rows])]
        if rows.size < 2 or ask.size == 0:
            continue
        kk = min(k, rows.size - 1)
        if rows.size <= EXACT_ROWS or ask.size <= WHOLE_CLASS_SHARE * rows.size:
            out[ask] = _search_rows(X, rows, ask, kk, None if rows.size <= EXACT_ROWS else walk)
        else:
            whole = self_neighbours(X[rows], kk, normalized=True, exact_rows=EXACT_ROWS, walk=walk[rows])
            d = 1.0 - whole.similarity.mean(axis=1)
            out[ask] = d[np.isnan(out[rows])]
    return out


def outlier_scores(X: np.ndarray, y: np.ndarray, k: int = CLASS_K, walk: np.ndarray | None = None,
                   neigh: Neighbours | None = None) -> np.ndarray:
    """Robust z-score within each class of: the `class_knn_distance` z plus AROUND_WEIGHT times the
    mean of that z over the row's AROUND_K nearest rows overall (the module docstring); 0 for
    classes too small to tell. `neigh`: every row's nearest rows, where the caller has them."""
    fresh = neigh is None or neigh.index.shape[1] < AROUND_K
    if fresh and walk is None and X.shape[0] > EXACT_ROWS:
        walk = search_space(X)  # once, for the class distances and the neighbourhood alike
    z = class_z(class_knn_distance(X, y, k, walk, neigh), y)
    if fresh:
        neigh = self_neighbours(X, AROUND_K, normalized=True, walk=walk)
    idx = neigh.index[:, :AROUND_K]
    listed = idx >= 0
    around = np.where(listed, z[np.maximum(idx, 0)], 0.0).sum(axis=1) / np.maximum(listed.sum(axis=1), 1)
    return class_z(z + AROUND_WEIGHT * around, y)


def class_z(d: np.ndarray, y: np.ndarray, prior: float = PRIOR_IMAGES) -> np.ndarray:
    """Robust z-score of `d` within each class: the deviation from the class's median over its spread
    (MAD); 0 for classes of under 3 finite values. Where half a class or more shares the median
    (duplicates), the MAD is 0 and the mean absolute deviation stands in for it. A small class's spread
    is a noisy estimate, so it is pooled with the median spread of the classes of `prior` images or
    more (of all, each made unbiased for its few values, where none is that large) as if that were
    `prior` more images (variances weighted n : prior): a class of four no longer lists its own members
    for a spread that three distances happened to make narrow, and a large class keeps its own scale."""
    z = np.zeros(y.size)
    spreads = []
    for c in np.unique(y):
        rows = np.flatnonzero((y == c) & np.isfinite(d))
        if rows.size < 3:
            continue
        dev = d[rows] - np.median(d[rows])
        spread = np.median(np.abs(dev)) * 1.4826
        if spread < 1e-6:
            spread = np.mean(np.abs(dev)) * 1.2533
        spreads.append((rows, dev, spread))
    known = [(rows.size, s) for rows, _, s in spreads if s >= 1e-6]
    # where no class is that large, the small classes' spreads, each made unbiased for its few values: one
    # deviation from a median of three is 0, so 1.4826 x MAD runs low and ordinary images were listed ~8x as often
    large = [s for size, s in known if size >= prior] or [s * mad_correction(size) for size, s in known]
    typical = float(np.median(large)) if large else 0.0
    for rows, dev, spread in spreads:
        pooled = np.sqrt((rows.size * spread ** 2 + prior * typical ** 2) / (rows.size + prior))
        if pooled >= 1e-6:
            z[rows] = dev / pooled
    return z


# Croux & Rousseeuw (1992), "Time-efficient algorithms for two highly robust estimators of scale": the
# factor that makes 1.4826 x MAD of n normal values unbiased (n / (n - 0.8) from 10 on).
_MAD_SMALL_N = {2: 1.196, 3: 1.495, 4: 1.363, 5: 1.206, 6: 1.200, 7: 1.140, 8: 1.129, 9: 1.107}


def mad_correction(n: int) -> float:
    """The small-sample factor for 1.4826 x MAD of `n` values."""
    return _MAD_SMALL_N.get(n, n / (n - 0.8) if n > 9 else 1.0)
