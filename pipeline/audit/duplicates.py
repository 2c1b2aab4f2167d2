"""Exact and near duplicates, within and across splits.

Exact: the same bytes (SHA-256 of the file). Near: one embedding threshold cannot tell a 0.6x-resized
copy (cosine as low as 0.7 on pooled CNN features) from another photo of the same flower (often above
0.9), so a pair is found in two steps, as fastdup and perceptual hashing do:
1. candidates: each image's nearest neighbours in embedding space above a loose cosine (`candidate`);
2. confirmation: the two images' small grey thumbnails, each normalized to zero mean and unit
   variance (so brightness and contrast changes vanish), correlate above `pixel`; re-encoded, resized,
   slightly cropped or brightened copies keep their layout, other photos of the same class do not.
Where the images cannot be read (a tfds data set, moved files), a candidate counts when its cosine alone
reaches `embedding_only`. The built-in digits are 8x8 pixels: too coarse to tell a copy from another hand's
same digit (4,375 pairs of different digits images correlate at 0.95 or more), so there a pair needs both,
its cosine at `embedding_only` and its pixels at `pixel` (which drops pairs of two different digits).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.data.decode import load_file, load_libraries, resize
from pipeline.data.sources import SPLITS, builtin_image
from pipeline.features.neighbours import Neighbours

THUMB = 24  # thumbnail side for the layout check
LOAD = 72   # decoded at this size, then the whole image and its centre crops are shrunk to THUMB
CROPS = (1.0, 0.9, 0.8)  # shares of the side kept by the centre crops compared


@dataclass(frozen=True)
class NearSettings:
    """Thresholds of the near-duplicate test (chosen by bench/audit.py, figures in docs/benchmarks.md)."""

    candidate: float = 0.6
    pixel: float = 0.95
    embedding_only: float = 0.97
    neighbours: int = 5


@dataclass
class Pair:
    """Two row numbers of the audited set that hold the same picture."""

    a: int
    b: int
    similarity: float
    kind: str           # "exact" | "near"
    pixel: float | None = None


SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}  # train first: the copy a pair keeps


def exact_pairs(hashes: list[str], splits: list[str] | None = None) -> list[Pair]:
    """Pairs of rows with the same non-empty content hash: each copy paired with its group's first
    member in split order (train, val, test), so every later-split copy is a cross-split pair."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            groups.setdefault(h, []).append(i)
    out = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: (SPLIT_ORDER.get(splits[r], 3) if splits is not None else 0, r))
        out += [Pair(min(rows[0], r), max(rows[0], r), 1.0, "exact", 1.0) for r in rows[1:]]
    return out


def copy_groups(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """A group id per row: rows joined by a chain of duplicate pairs (row numbers a, b) share the
    smallest row number of their group (union-find), every other row is its own group."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for first, second in pairs:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.asarray([root(i) for i in range(n)], dtype=np.int64)


def thumbnail(path: str) -> np.ndarray | None:
    """Grey THUMB x THUMB thumbnails of an image file's (or a built-in image id's) whole image and of its
    centre CROPS, each zero mean and unit length, as rows of one (len(CROPS), THUMB*THUMB) array; None when
    unreadable or flat."""
    import cv2  # noqa: PLC0415 - OpenCV loads on first use

    try:
        builtin = builtin_image(path)
        img = (load_file(path, LOAD) if builtin is None else resize(builtin, LOAD)).astype(np.float32)
    except Exception:  # noqa: BLE001 - any file that cannot be decoded just has no thumbnail
        return None
    grey = img @ np.asarray([0.299, 0.587, 0.114], np.float32)
    out = []
    for share in CROPS:
        m = int(round(LOAD * (1 - share) / 2))
        t = cv2.resize(grey[m:LOAD - m, m:LOAD - m], (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
        t = t - t.mean()
        norm = float(np.linalg.norm(t))
        if norm <= 1e-6:
            return None
        out.append(t / norm)
    return np.stack(out)


def layout_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two images' layouts are: the best correlation of one's whole thumbnail with the other's
    whole or centre-cropped ones (so a centre crop of an image still matches it)."""
    return max(float(np.max(b @ a[0])), float(np.max(a @ b[0])))


def thumbnails(paths: list[str | None], workers: int | None = None) -> list[np.ndarray | None]:
    """`thumbnail` of each path (None for None), on a thread pool (decoding releases the GIL)."""
    load_libraries()  # OpenCV and Pillow imported here, not concurrently by the threads
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: thumbnail(p) if p else None, paths))


def near_pairs(neigh: Neighbours, files: list[str | None], settings: NearSettings = NearSettings(),
               hashes: list[str] | None = None) -> list[Pair]:
    """Near-duplicate pairs among each row's nearest neighbours (see the module docstring), leaving out
    rows with the same content hash (exact duplicates). `files[i]`: a readable image file of row i, or None."""
    k = min(settings.neighbours, neigh.index.shape[1])
    idx, sim = neigh.index[:, :k], neigh.similarity[:, :k]
    cand: dict[tuple[int, int], float] = {}
    for i, j in zip(*np.nonzero((idx >= 0) & (sim >= settings.candidate))):
        a, b = sorted((int(i), int(idx[i, j])))
        if not (hashes is not None and hashes[a] and hashes[a] == hashes[b]):
            cand[(a, b)] = max(cand.get((a, b), -1.0), float(sim[i, j]))
    rows = sorted({r for pair in cand for r in pair})
    thumbs = dict(zip(rows, thumbnails([files[r] for r in rows])))
    coarse = {r for r in rows if files[r] is not None and builtin_image(files[r]) is not None}
    out = []
    for (a, b), s in sorted(cand.items()):
        ta, tb = thumbs.get(a), thumbs.get(b)
        if ta is not None and tb is not None:
            px = layout_similarity(ta, tb)
            if px >= settings.pixel and (s >= settings.embedding_only or not {a, b} & coarse):
                out.append(Pair(a, b, s, "near", px))
        elif s >= settings.embedding_only:
            out.append(Pair(a, b, s, "near", None))
    return out
