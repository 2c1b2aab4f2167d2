"""Nearest neighbours of cached embeddings by cosine similarity: the one seam that the audit (label
agreement, duplicates, outliers) and the kNN head share.

Rows are scaled to unit length, so cosine similarity is a dot product; the search is exact, as blocked
float32 matrix products (BLAS), keeping a running top-k per query, so memory stays at
`block_rows` x `block_rows` similarities whatever the number of rows. Rows sharing a group id (the
same image's augmented views) are never each other's neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norm = np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x), 1e-24))
    return x / norm[:, None]


@dataclass
class Neighbours:
    """The k most similar rows of `base` for each query: `index` (m, k) row numbers and `similarity`
    (m, k) cosines, most similar first; -1 and -inf where fewer than k rows qualify."""

    index: np.ndarray
    similarity: np.ndarray


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
