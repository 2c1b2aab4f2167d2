"""The one batching seam: run per-image jobs on a thread pool, in order, with bounded prefetch,
and hand out uint8 batches with the positions of the images that could be used.

OpenCV and libjpeg release the GIL, so threads decode in parallel without copying images
between processes; `bench/extract.py --loader-only` measures it. A job that raises
`DecodeError` is skipped and reported with its reason; any other exception stops the run.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.data.decode import DecodeError, load_libraries

Job = Callable[[], np.ndarray]


def default_workers() -> int:
    """Decode threads: every core (the accelerator, or the backbone's own threads, use the rest)."""
    return max(1, min(32, os.cpu_count() or 1))


@dataclass
class Batch:
    """`images[i]` is the image of `tags[i]`; `skipped` lists (tag, reason) of unusable ones."""

    tags: np.ndarray
    images: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)


def ordered_map(jobs: Iterable[tuple[int, Job]], workers: int, prefetch: int) -> Iterator[tuple[int, np.ndarray | DecodeError]]:
    """Run (tag, job) pairs on `workers` threads; yield (tag, result or DecodeError) in input order,
    keeping at most `prefetch` jobs in flight."""
    load_libraries()  # before any thread starts (see there)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    pending: deque[tuple[int, Future]] = deque()
    it = iter(jobs)
    try:
        for tag, job in it:
            pending.append((tag, pool.submit(_guarded, job)))
            if len(pending) >= prefetch:
                t, fut = pending.popleft()
                yield t, fut.result()
        while pending:
            t, fut = pending.popleft()
            yield t, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _guarded(job: Job) -> np.ndarray | DecodeError:
    try:
        return job()
    except DecodeError as exc:
        return exc


def batches(jobs: Iterable[tuple[int, Job]], batch_size: int, shape: tuple[int, ...],
            workers: int | None = None, prefetch_batches: int = 4) -> Iterator[Batch]:
    """Group the ordered results into uint8 batches of `batch_size` usable images (the last may be
    smaller); skipped images are reported in the batch where they would have been."""
    workers = workers or default_workers()
    prefetch = max(2 * workers, prefetch_batches * batch_size)
    buf = np.empty((batch_size, *shape), np.uint8)
    tags: list[int] = []
    skipped: list[tuple[int, str]] = []
    for tag, result in ordered_map(jobs, workers, prefetch):
        if isinstance(result, DecodeError):
            skipped.append((tag, str(result)))
            continue
        if result.shape != shape:
            raise ValueError(f"image {tag} has shape {result.shape}, expected {shape}")
        buf[len(tags)] = result
        tags.append(tag)
        if len(tags) == batch_size:
            yield Batch(np.asarray(tags, np.int64), buf.copy(), skipped)
            tags, skipped = [], []
    if tags or skipped:
        yield Batch(np.asarray(tags, np.int64), buf[:len(tags)].copy(), skipped)


class Prefetcher:
    """Iterate `source` on a background thread, `depth` items ahead (for feeding a device while the
    previous batch computes). Exceptions are raised in the consumer."""

    _END = object()

    def __init__(self, source: Iterable, depth: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        load_libraries()  # in the caller's thread, before the decode threads start (see there)
        self._thread = threading.Thread(target=self._run, args=(iter(source),), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    break
            self._q.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the consumer
            self._q.put(exc)

    def __iter__(self) -> Iterator:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
