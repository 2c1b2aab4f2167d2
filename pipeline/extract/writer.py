"""The writer thread: gathers feature rows into chunks and writes each chunk atomically as soon as
every unit in it has been seen (computed or skipped), while the next batches compute.

It also refuses features that would make junk caches: NaN or inf from the backbone, and float16
storage that would overflow or flush most values to zero (random-init weights do that).
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from pipeline.errors import UserError
from pipeline.features.store import ChunkDir

UNREADABLE = "unreadable: corrupt, truncated or not an image"


def check_features(feats: np.ndarray, dtype: np.dtype, first_tag: int) -> None:
    """Raise UserError when `feats` (float32) hold NaN/inf, or would not survive `dtype` storage."""
    if not np.all(np.isfinite(feats)):
        bad = int(np.sum(~np.isfinite(feats).reshape(len(feats), -1).all(axis=1)))
        raise UserError(f"the backbone produced NaN or inf features for {bad} image(s) near unit {first_tag}; "
                        f"with --precision mixed use float32, with --weights none use imagenet or a weights file")
    if dtype == np.float16 and feats.size:
        big = np.abs(feats) > np.finfo(np.float16).max
        if big.any():
            raise UserError(f"features up to {float(np.abs(feats).max()):.3g} overflow float16 storage; "
                            f"extract again with --dtype float32")
        nonzero = feats != 0
        if nonzero.any():
            lost = np.abs(feats[nonzero]) < np.finfo(np.float16).smallest_subnormal
            if lost.mean() > 0.5:
                raise UserError(f"{lost.mean():.0%} of the features are too small for float16 storage (they would "
                                f"be stored as 0; random-init weights do this): extract again with --dtype float32 "
                                f"or use trained --weights")


class ChunkWriter(threading.Thread):
    """Receives (tags, features, skipped) batches in tag order; writes chunk after chunk."""

    def __init__(self, chunks: ChunkDir, unit_index: np.ndarray, unit_view: np.ndarray, todo: list[int],
                 total: int, feat_shape: tuple[int, ...], dtype: np.dtype, reuse=None) -> None:
        """`todo`: the chunk numbers to write, ascending (the missing ones, or one shard's share)."""
        super().__init__(daemon=True)
        self.chunks, self.unit_index, self.unit_view = chunks, unit_index, unit_view
        self.total, self.feat_shape, self.dtype = total, feat_shape, np.dtype(dtype)
        self.todo, self.pos = list(todo), 0
        self.reuse = reuse  # features.reuse.Reuse: units copied from an older cache, never put here
        u = chunks.chunk_units
        need = np.ones(total, bool)
        if reuse is not None:
            need[reuse.tags] = False
        # a chunk is complete once the last unit it needs computed has been seen (-1: none needed)
        self.need_last = [int(c * u + np.flatnonzero(need[c * u:(c + 1) * u])[-1])
                          if need[c * u:(c + 1) * u].any() else -1 for c in self.todo]
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.tags: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.reasons: dict[int, str] = {}
        self.error: BaseException | None = None

    def put(self, tags: np.ndarray, feats: np.ndarray, skipped: list[tuple[int, str]] = ()) -> None:
        if self.error:
            raise self.error
        self.q.put((tags, feats, list(skipped)))

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error

    def stop(self) -> None:
        if self.is_alive():
            self.q.put(("stop", None, None))

    def run(self) -> None:
        try:
            last = len(self.todo)
            while True:
                item = self.q.get()
                if item is None:
                    while self.pos < last:
                        self._flush()
                    return
                tags, feats, skipped = item
                if isinstance(tags, str):
                    return
                self.reasons.update(skipped)
                seen = -1
                if tags.size:
                    check_features(np.asarray(feats, np.float32), self.dtype, int(tags[0]))
                    self.tags.append(tags)
                    self.feats.append(feats)
                    seen = int(tags[-1])
                if skipped:
                    seen = max(seen, max(t for t, _ in skipped))
                while self.pos < last and seen >= self.need_last[self.pos]:
                    self._flush()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the main thread on its next put/finish
            self.error = exc

    def _flush(self) -> None:
        """Write the current chunk from the pending rows whose tags fall inside it."""
        u, current = self.chunks.chunk_units, self.todo[self.pos]
        lo, hi = current * u, min((current + 1) * u, self.total)
        tags = np.concatenate(self.tags) if self.tags else np.empty(0, np.int64)
        feats = np.concatenate(self.feats) if self.feats else np.empty((0, *self.feat_shape), np.float32)
        inside = tags < hi
        keep_tags, keep_feats = tags[inside], feats[inside]
        self.tags, self.feats = ([tags[~inside]], [feats[~inside]]) if (~inside).any() else ([], [])
        if self.reuse is not None:
            old_tags, old_feats = self.reuse.read(lo, hi)
            if old_tags.size:
                keep_tags = np.concatenate([keep_tags, old_tags])
                keep_feats = np.concatenate([keep_feats.reshape((-1, *self.feat_shape)), old_feats])
                order = np.argsort(keep_tags, kind="stable")
                keep_tags, keep_feats = keep_tags[order], keep_feats[order]
        missing = np.setdiff1d(np.arange(lo, hi), keep_tags)
        self.chunks.write(current, {
            "features": keep_feats.astype(self.dtype, copy=False).reshape((-1, *self.feat_shape)),
            "index": self.unit_index[keep_tags].astype(np.int32),
            "views": self.unit_view[keep_tags],
            "tags": keep_tags,
            "skipped_index": self.unit_index[missing].astype(np.int32),
            "skipped_reason": np.array([self.reasons.pop(int(t), UNREADABLE) for t in missing], dtype=str),
        })
        self.pos += 1
