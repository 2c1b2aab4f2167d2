"""Nearest neighbours of cached embeddings by cosine similarity: the one seam that the audit (label
agreement, duplicates, outliers) and the kNN head share.

Rows are scaled to unit length, so cosine similarity is a dot product. `CosineIndex` is exact, as
blocked float32 matrix products (BLAS), keeping a running top-k per query, so memory stays at
`block_rows` x `block_rows` similarities whatever the number of rows. Rows sharing a group id (the
same image's augmented views) are never each other's neighbours.

`self_neighbours` (every row's nearest other rows, what the audit needs) is exact up to `EXACT_ROWS`
rows and approximate above, through a faiss HNSW graph (`approximate_self_query`; similarities stay
exact cosines): exact search is quadratic (200,000 x 1,280 rows: ~30 minutes on 2 cores); bench/audit.py
--parts scale measures the graph's time and its recall against exact search.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

EXACT_ROWS = 20_000      # self_neighbours is exact up to this many rows (~10 s at 1,280 features on 2 cores)
HNSW_DIM = 256           # the approximate search walks its graph on this many principal components
PCA_SAMPLE = 50_000      # rows the projection is fitted on
HNSW_M = 16              # graph degree (faiss IndexHNSWFlat)
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64      # at least; 2 x the candidates asked for when more
QUERY_BLOCK = 16_384     # approximate search answers this many queries at a time (bounded result memory)
RESCORE_BLOCK = 1_024    # candidates rescored exactly for this many queries at a time (~100 MB at 1,280 wide)
RESCORE_THREADS = 2      # blocks rescored at once (`exact_cosines`)


def unit_rows(x: np.ndarray, in_place: bool = False, dtype: Any = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 length as `dtype` (float32; the svm head's kernels take float64; all-zero rows
    stay zero); `in_place`: scale the given array of that dtype itself (no second copy of a large matrix)."""
    x = np.asarray(x, dtype)
    norm = np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x), 1e-24))
    if in_place:
        x /= norm[:, None]
        return x
    return x / norm[:, None]


@dataclass
class Neighbours:
    """The k most similar rows of `base` for each query: `index` (m, k) row numbers and `similarity`
    (m, k) cosines, most similar first; -1 and -inf where fewer than k rows qualify."""

    index: np.ndarray
    similarity: np.ndarray


def vote_shares(similarity: np.ndarray, labels: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """(m, n_classes) each row's class vote over its listed neighbours, weights exp(similarity / temperature),
    normalised to sum to 1: the kNN head's prediction and the audit's neighbour label agreement. A neighbour
    with label -1 or similarity -inf does not vote; a row where none votes gets the uniform share."""
    s, lab = np.asarray(similarity, np.float64), np.asarray(labels, np.int64)
    voting = np.isfinite(s) & (lab >= 0)
    s = np.where(voting, s, 0.0)
    top = np.max(np.where(voting, s, -np.inf), axis=1, initial=-np.inf, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # weights relative to the nearest voter: the same share, no underflow
    w = np.where(voting, np.exp((s - top) / temperature), 0.0)
    votes = np.zeros((s.shape[0], n_classes))
    rows = np.repeat(np.arange(s.shape[0]), s.shape[1])
    np.add.at(votes, (rows[voting.ravel()], lab.ravel()[voting.ravel()]), w.ravel()[voting.ravel()])
    total = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, total, out=np.full_like(votes, 1.0 / n_classes), where=total > 0)


class CosineIndex:
    """Exact cosine k-nearest-neighbour search over the rows of `base` (any float array, (n, d))."""

    def __init__(self, base: np.ndarray, groups: np.ndarray | None = None, block_rows: int = 2048,
                 normalized: bool = False) -> None:
        """`normalized`: the rows are unit-length float32 already (a kNN head's memory): used without a copy."""
        self.base = np.asarray(base, np.float32) if normalized else unit_rows(base)
        self.groups = None if groups is None else np.asarray(groups)
        self.block_rows = int(block_rows)

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def query(self, queries: np.ndarray, k: int, query_groups: np.ndarray | None = None) -> Neighbours:
        """Top-k of each query row among the base rows, leaving out base rows of the query's own group."""
        q = unit_rows(queries)
        m, n, k = q.shape[0], len(self), int(k)
        best_i = np.full((m, k), -1, np.int64)
        best_s = np.full((m, k), -np.inf, np.float32)
        if n == 0 or k <= 0:
            return Neighbours(best_i, best_s)
        qg = None if query_groups is None or self.groups is None else np.asarray(query_groups)
        for qa in range(0, m, self.block_rows):
            qb = min(m, qa + self.block_rows)
            cand_i, cand_s = best_i[qa:qb], best_s[qa:qb]
            for ba in range(0, n, self.block_rows):
                bb = min(n, ba + self.block_rows)
                sim = q[qa:qb] @ self.base[ba:bb].T
                if qg is not None:
                    sim[qg[qa:qb, None] == self.groups[None, ba:bb]] = -np.inf
                kk = min(k, bb - ba)
                part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
                s = np.take_along_axis(sim, part, axis=1)
                cand_i = np.concatenate([cand_i, part + ba], axis=1)
                cand_s = np.concatenate([cand_s, s], axis=1)
                top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
                cand_i = np.take_along_axis(cand_i, top, axis=1)
                cand_s = np.take_along_axis(cand_s, top, axis=1)
            cand_i[~np.isfinite(cand_s)] = -1
            best_i[qa:qb], best_s[qa:qb] = cand_i, cand_s
        return Neighbours(best_i, best_s)

    def self_query(self, k: int) -> Neighbours:
        """Each base row's k nearest other rows (never itself, nor rows of its group)."""
        groups = self.groups if self.groups is not None else np.arange(len(self))
        saved, self.groups = self.groups, groups
        try:
            return self.query(self.base, k, query_groups=groups)
        finally:
            self.groups = saved


def self_neighbours(x: np.ndarray, k: int, groups: np.ndarray | None = None, normalized: bool = False,
                    exact_rows: int = EXACT_ROWS, walk: np.ndarray | None = None) -> Neighbours:
    """Each row's k nearest other rows (never itself, nor rows of its group): exact up to `exact_rows`
    rows, an HNSW graph above (the module docstring). `normalized`: `x` is unit-length float32 already.
    `walk`: these rows' `search_space` rows, where the caller made them once for several searches."""
    index = CosineIndex(x, groups, normalized=normalized)
    if len(index) <= exact_rows:
        return index.self_query(k)
    return approximate_self_query(index.base, k, index.groups, walk=walk)


def search_space(base: np.ndarray, seed: int = 0) -> np.ndarray:
    """The rows the approximate search walks its graph on: unit-length rows projected on their top
    `HNSW_DIM` principal components (fitted on a seeded sample of `PCA_SAMPLE`), re-scaled to unit
    length; `base` itself when it is that narrow already. Made once, it serves every search over
    these rows or a subset of them (the audit's global and per-class searches)."""
    import faiss  # noqa: PLC0415 - heavy, and needed only above EXACT_ROWS rows

    base = np.ascontiguousarray(base, np.float32)
    n, d = base.shape
    if d <= HNSW_DIM:
        return base
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    sample = np.random.default_rng(seed).choice(n, min(n, PCA_SAMPLE), replace=False)
    pca = faiss.PCAMatrix(d, HNSW_DIM)
    pca.train(base[np.sort(sample)])
    return unit_rows(pca.apply(base), in_place=True)


def exact_cosines(base: np.ndarray, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(len(rows), c) cosines of unit-length `base[rows]` with their candidate rows `candidates` (row
    numbers into `base`; -1 gives a meaningless value the caller masks): how an approximate search's
    proposals are rescored exactly at full width, a bounded gather at a time on two threads (numpy
    frees the GIL; a gather is memory-bound: 2 threads took 200,000 rows 19 s -> 12 s)."""
    rows = np.asarray(rows)
    sim = np.empty(candidates.shape, np.float32)

    def rescore(r: int) -> None:
        e = min(rows.size, r + RESCORE_BLOCK)
        sim[r:e] = np.einsum("ij,ikj->ik", base[rows[r:e]], base[np.maximum(candidates[r:e], 0)])

    with ThreadPoolExecutor(min(RESCORE_THREADS, os.cpu_count() or 1)) as pool:
        list(pool.map(rescore, range(0, rows.size, RESCORE_BLOCK)))
    return sim


def approximate_self_query(base: np.ndarray, k: int, groups: np.ndarray | None = None, seed: int = 0,
                           walk: np.ndarray | None = None) -> Neighbours:
    """`CosineIndex.self_query` through a faiss HNSW graph, for unit-length float32 rows `base`.

    The graph is built and walked on `walk` (`search_space(base)` unless given: ~5x cheaper than the
    full width); it proposes 2k candidates per row and their exact cosines (full width) pick the k
    returned, so similarities are exact.
    """
    import faiss  # noqa: PLC0415 - heavy, and needed only above EXACT_ROWS rows

    base = np.ascontiguousarray(base, np.float32)
    n = base.shape[0]
    k = int(k)
    g = np.arange(n) if groups is None else np.asarray(groups)
    # a row's own group can take this many of the places asked for: ask for that many more
    want = min(n, 2 * k + int(np.unique(g, return_counts=True)[1].max()))
    walk = search_space(base, seed) if walk is None else np.ascontiguousarray(walk, np.float32)
    if walk.shape[0] != n:
        raise ValueError(f"walk has {walk.shape[0]} rows for {n} base rows")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.IndexHNSWFlat(walk.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(walk)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * want)
    best_i = np.full((n, k), -1, np.int64)
    best_s = np.full((n, k), -np.inf, np.float32)
    for a in range(0, n, QUERY_BLOCK):
        b = min(n, a + QUERY_BLOCK)
        _, idx = index.search(walk[a:b], want)
        bad = (idx < 0) | (g[np.maximum(idx, 0)] == g[a:b, None])
        sim = exact_cosines(base, np.arange(a, b), idx)
        sim[bad] = -np.inf
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(sim, top, axis=1)
        i = np.take_along_axis(idx, top, axis=1)
        i[~np.isfinite(s)] = -1
        best_i[a:b, :s.shape[1]], best_s[a:b, :s.shape[1]] = i, s
    return Neighbours(best_i, best_s)
