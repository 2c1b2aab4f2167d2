"""Test helper: write small synthetic but real cache files with the store's own writer.

Features are Gaussian blobs (one mean per class) so heads can separate them; augmented views are
their image's clean features plus a little noise, as a backbone on a flipped/cropped image gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.features.store import ChunkDir, ItemTable, assemble


def blobs(n: int, dim: int, n_classes: int, seed: int = 0, sep: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 features and int labels; `sep` scales the distance between class means."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, dim)) * sep / np.sqrt(dim) * 2
    y = rng.integers(0, n_classes, n)
    x = means[y] + rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def write_cache(
    folder: str | Path,
    *,
    n_images: int = 300,
    dim: int = 64,
    n_classes: int = 3,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    views: int = 0,
    labels: np.ndarray | None = None,
    feature_shape: tuple[int, ...] | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    sep: float = 3.0,
    name: str = "synthetic",
    key: str = "k0000000000001",
    attrs: dict[str, Any] | None = None,
    chunk_images: int = 64,
    view_noise: float = 0.3,
) -> Path:
    """Write `<folder>/features/<name>-<key>.h5` and return its path.

    split_fractions: (train, val, test); a 0 leaves that split out. views: augmented copies per
    training image (view 1..views). labels: per-image labels (use -1 for unlabelled).
    feature_shape: e.g. (2, 2, dim) stores feature maps whose spatial mean is the blob vector.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed + 1)
    x, y = blobs(n_images, dim, n_classes, seed=seed, sep=sep)
    if labels is not None:
        y = np.asarray(labels, np.int64)
    fr = np.asarray(split_fractions, float) / sum(split_fractions)
    splits = np.array(["train", "val", "test"])[rng.choice(3, n_images, p=fr)]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n_classes)]
    items = ItemTable(ids=[f"img/{i:05d}.jpg" for i in range(n_images)], labels=y, splits=list(splits),
                      class_names=names)

    def as_stored(v: np.ndarray) -> np.ndarray:
        if feature_shape is None:
            return v
        spatial = feature_shape[:-1]
        noise = rng.standard_normal((v.shape[0], *spatial, v.shape[1])).astype(np.float32) * 0.5
        noise -= noise.mean(axis=tuple(range(1, 1 + len(spatial))), keepdims=True)  # keep the spatial mean
        return v.reshape(v.shape[0], *([1] * len(spatial)), v.shape[1]) + noise

    stem = f"{name}-{key}"
    chunks = ChunkDir(folder / "features" / f"{stem}.parts", chunk_units=chunk_images)
    for c, start in enumerate(range(0, n_images, chunk_images)):
        idx = np.arange(start, min(n_images, start + chunk_images))
        rows_x, rows_i, rows_v = [x[idx]], [idx], [np.zeros(idx.size, np.int8)]
        train_idx = idx[splits[idx] == "train"]
        for k in range(1, views + 1):
            rows_x.append(x[train_idx] + view_noise * rng.standard_normal((train_idx.size, dim)).astype(np.float32))
            rows_i.append(train_idx)
            rows_v.append(np.full(train_idx.size, k, np.int8))
        chunks.write(c, {
            "features": as_stored(np.concatenate(rows_x)).astype(np.float32),
            "index": np.concatenate(rows_i).astype(np.int32),
            "views": np.concatenate(rows_v),
            "skipped_index": np.zeros(0, np.int32),
            "skipped_reason": np.zeros(0, dtype="<U1"),
        })
    meta = {"key": key, "backbone": "synthetic", "weights_id": "none", "image_size": 32, "pooling": "avg",
            "layer": "top", "dtype": "float16", "request": {"data": name}}
    meta.update(attrs or {})
    target = folder / "features" / f"{stem}.h5"
    assemble(chunks, target, items, meta)
    chunks.remove()
    return target
