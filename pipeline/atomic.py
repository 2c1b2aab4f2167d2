"""Crash-safe file writes: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def umask_mode(folder: bool = False) -> int:
    """The mode a plain open() (or mkdir) creates under this process's umask: tempfile makes its
    files 0600 and folders 0700, and a cache shared between users and machines must not be."""
    try:  # Linux says it without changing it (os.umask can only be read by setting it)
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("Umask:"))
        mask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing folder above `path` where it is a file (so `path` cannot be created), else None."""
    above = next((p for p in Path(path).parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` only on success.

    A crash or exception leaves the target untouched (or absent), never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, umask_mode())
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write a small text file (JSON, config) atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")  # what every reader here decodes, whatever the locale


def save_keras_atomic(model, target: str | os.PathLike, weights_only: bool = False) -> Path:
    """`model.save` (or `save_weights` when `weights_only`) to `target` atomically. Keras insists on
    the file suffix (.keras / .weights.h5), so it writes to a suffixed temporary name first."""
    target = Path(target)
    suffix = ".weights.h5" if weights_only else ".keras"
    with atomic_path(target) as tmp:
        named = tmp.with_name(tmp.name + suffix)
        try:
            (model.save_weights if weights_only else model.save)(named)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)
    return target
