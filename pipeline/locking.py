"""The one file lock of the cache: an exclusive `flock` on a `.lock` file beside what a process
writes (a key's features, a shard), released by the OS even after kill -9, so a crashed writer never
leaves a stale lock. Extraction holds it; `cache rm`/`gc` ask whether someone does."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (made if missing); yields whether it is held. When another
    process holds it: call `on_wait` and wait for it, or without one, yield False at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is None:
                yield False
                return
            on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock file `path` (False when there is no such file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


KEY_LOCK_SUFFIX = ".lock"


def key_lock(entry: str | os.PathLike) -> Path:
    """The lock an extraction of one key holds while it runs, beside its cache file (or chunk folder) `entry`;
    `cache rm`/`gc` ask whether someone holds it."""
    return Path(entry).with_suffix(KEY_LOCK_SUFFIX)


def shard_lock(features: str | os.PathLike, i: int, n: int) -> Path:
    """The lock an extraction's `--shard I/N` holds while it runs, beside the cache file `features`
    (shards run side by side, each under its own)."""
    return Path(features).with_suffix(f".shard-{i}-of-{n}{KEY_LOCK_SUFFIX}")


def shard_locks(entry: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """The shard lock files there are of a cache entry (its .h5, .parts or .lock), by (I, N)."""
    stem = Path(entry).with_suffix("")
    found = {}
    for lock in stem.parent.glob(f"{stem.name}.shard-*-of-*.lock"):
        named = re.fullmatch(rf"{re.escape(stem.name)}\.shard-(\d+)-of-(\d+)\.lock", lock.name)
        if named:
            found[int(named[1]), int(named[2])] = lock
    return found
