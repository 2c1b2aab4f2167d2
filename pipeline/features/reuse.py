"""Incremental caches: a request that differs from a cached one only in its data listing (images
added, removed or changed) copies the rows of unchanged images from the old file and computes only
the rest, then writes a complete file under its own key. The old cache may come from another data
source (a folder, then a manifest of some of its files): rows match by the file's own path. An image is unchanged when its id, file
size and modification time (stored per row as `sizes` / `mtimes_ns`) are the same, or, where both
caches were made with `--content-hash`, when its id and the SHA-256 of its bytes (`hashes`) are: then
a touched or copied file with the same bytes is still reused, and a rewritten one with the same size
and time is not.

Augmented views (`--augment-copies`) are seeded by the image's name, so view k of an unchanged
image is reused too when both caches used the same augmentation and seed (any number of copies:
`--augment-copies 4` after 2 computes views 3 and 4 only). Caches from before views were seeded by
name (no `"seeding": "name"` in their key) lend their clean rows only.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.atomic import write_text_atomic
from pipeline.data.loader import default_workers
from pipeline.errors import DataWarning, UserError
from pipeline.features.store import FeatureFile, not_damaged, structure_problem

# key material that may differ between a cache and the one it reuses rows from
_FREE = ("data", "augment")


@dataclass
class Reuse:
    """Rows to copy: our unit `tags` (sorted) come from `rows` of the cache file `base`."""

    base: Path
    tags: np.ndarray
    rows: np.ndarray
    feature_shape: tuple[int, ...]
    splits: np.ndarray | None = None  # the base file's split of each of `rows`

    def moved(self, ids: list[str], splits: list[str], unit_index: np.ndarray,
              unit_view: np.ndarray) -> list[tuple[str, str, str]]:
        """(image id, its split in the base file, its split now) of reused images whose split differs:
        a head fitted on the old cache may have scored an image that is now a training image."""
        if self.splits is None:
            return []
        out = []
        for tag, old in zip(self.tags.tolist(), self.splits.tolist()):
            index = int(unit_index[tag])
            if unit_view[tag] == 0 and splits[index] != old:
                out.append((ids[index], old, splits[index]))
        return out

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(tags, features) of the reused units with lo <= tag < hi, read from the base file."""
        a, b = np.searchsorted(self.tags, [lo, hi])
        tags, rows = self.tags[a:b], self.rows[a:b]
        if not tags.size:
            return tags, np.empty((0, *self.feature_shape), np.float32)
        order = np.argsort(rows)
        feats = np.empty((rows.size, *self.feature_shape), np.float32)
        try:
            with h5py.File(self.base, "r") as f:
                feats[order] = f["features"][rows[order]]
        except (OSError, KeyError) as exc:
            raise UserError(f"the cache this extraction copies unchanged rows from ({self.base.name}) vanished or "
                            f"changed during the run ({type(exc).__name__}); run the same command again: finished "
                            f"chunks are kept") from None
        return tags, feats


def moved_message(moved: list[tuple[str, str, str]], base: str, split_origin: str) -> str:
    """One line naming the reused images that changed split since `base` was made, and why they can."""
    shown = ", ".join(f"{i} ({a} -> {b})" for i, a, b in moved[:3])
    more = f" and {len(moved) - 3} more" if len(moved) > 3 else ""
    why = (" (the hash split lends a class none of whose images hash into val its lowest-hash training image, "
           "and one with none hashing into train its highest-hash image; it goes back once one does: "
           "docs/extract.md)" if split_origin.startswith("hash") else "")
    return (f"{len(moved)} image(s) are in another split than in {base}, whose rows this cache reuses: "
            f"{shown}{more}{why}; a head fitted on the older cache scored or trained on them there")


def item_stats(paths: list[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(size, mtime_ns, None) of each file (-1 where it cannot be read), or None for in-memory
    sources; with --content-hash the third slot is filled by `file_hashes`."""
    if paths is None:
        return None
    sizes = np.full(len(paths), -1, np.int64)
    mtimes = np.full(len(paths), -1, np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes, None


def changed_files(ff: FeatureFile, rows: np.ndarray) -> list[tuple[str, str]]:
    """(path, "missing" or "changed") of the image files of `rows` that are gone, or whose size or
    modification time differs from what `ff` recorded when it extracted them: its features of them
    describe other pixels. Where the cache holds content hashes (--content-hash), a file with other
    size or time but the same bytes (a copy made without `cp -p`) is not changed. Empty where the
    cache records no files."""
    recorded = ff.file_stats()
    if recorded is None:
        return []
    rows = np.asarray(rows, np.int64)
    paths = [ff.paths[int(r)] for r in rows]
    sizes, mtimes, _ = item_stats(paths)
    then_sizes, then_mtimes = recorded[0][rows], recorded[1][rows]
    then_hashes = ff.file_hashes()
    out = []
    for i, path in enumerate(paths):
        if sizes[i] < 0 and then_sizes[i] >= 0:
            out.append((path, "missing"))
        elif sizes[i] != then_sizes[i] or mtimes[i] != then_mtimes[i]:
            then = then_hashes[int(rows[i])] if then_hashes is not None else ""
            if not then or _sha256(path) != then:
                out.append((path, "changed"))
    return out


def file_hashes(paths: list[str], parts: Path, want: np.ndarray | None = None) -> np.ndarray:
    """SHA-256 hex of the files where `want` (None: all): from the notes shards left in `parts`
    where they hold it, else read now; "" where neither (outside `want`, or unreadable)."""
    hashes = read_hash_notes(parts, len(paths))
    return fill_hashes(hashes, paths, (True if want is None else want) & (hashes == ""))


def read_hash_notes(parts: Path, n: int) -> np.ndarray:
    """SHA-256 hex per listing position that shards of this request already took ("" elsewhere),
    from their `hashes-*.json` notes in the cache's `.parts` folder."""
    hashes = np.full(n, "", dtype=object)
    for note in sorted(Path(parts).glob("hashes-*.json")) if Path(parts).is_dir() else []:
        try:
            for index, digest in json.loads(note.read_text()).items():
                if 0 <= int(index) < n and isinstance(digest, str) and len(digest) == 64:
                    hashes[int(index)] = digest
        except (OSError, ValueError, AttributeError):
            continue  # a note that cannot be read: those files are hashed again
    return hashes


def write_hash_note(parts: Path, name: str, hashes: np.ndarray, mask: np.ndarray) -> None:
    """Leave the hashes a shard took (where `mask`) for the shard or extract that assembles."""
    write_text_atomic(Path(parts) / f"hashes-{name}.json",
                      json.dumps({str(i): hashes[i] for i in np.flatnonzero(mask) if hashes[i]}))


def fill_hashes(hashes: np.ndarray, paths: list[str], mask: np.ndarray) -> np.ndarray:
    """`hashes` with the SHA-256 of paths[i] written where mask[i] (on the decode threads' count)."""
    where = np.flatnonzero(mask)
    with ThreadPoolExecutor(default_workers()) as pool:  # hashlib releases the GIL on large buffers
        hashes[where] = list(pool.map(_sha256, [paths[i] for i in where]))
    return hashes


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed since the listing
        return 0.0


def _comparable(material: dict[str, Any]) -> str:
    rest = {k: v for k, v in material.items() if k not in _FREE}
    return json.dumps(rest, sort_keys=True)


def _views_of(material: dict[str, Any]) -> str | None:
    """What decides a cache's augmented views apart from their number (None: no name-seeded views)."""
    aug = material.get("augment")
    if not aug or aug.get("seeding") != "name":
        return None
    return json.dumps({k: v for k, v in aug.items() if k != "copies"}, sort_keys=True)


def find_reuse(target: Path, material: dict[str, Any], ids: list[str],
               stats: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
               unit_index: np.ndarray | None = None, unit_view: np.ndarray | None = None) -> Reuse | None:
    """The finished cache beside `target` with the same request but another data listing that
    shares the most unchanged rows with ours; None when there is none. Our units are
    (listing position `unit_index`, view `unit_view`); without them, the clean views only."""
    if stats is None:
        return None
    if unit_index is None or unit_view is None:
        unit_index = np.arange(len(ids))
        unit_view = np.zeros(len(ids), np.int8)
    want = _comparable(material)
    our_views = _views_of(material)
    best: Reuse | None = None
    for path in sorted(Path(target).parent.glob("*.h5"), key=_mtime, reverse=True):
        if path == target or path.name.startswith(".") or not path.is_file():  # no folder, no FIFO (it would wait)
            continue
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                if not a.get("complete", False) or "sizes" not in f or "mtimes_ns" not in f:
                    continue
                problem = structure_problem(f, path)
                if problem:
                    warnings.warn(f"{path.name} is not used to reuse rows from: it is damaged ({problem})",
                                  DataWarning, stacklevel=2)
                    continue
                theirs = json.loads(a["key_material"])
                # any data source: rows match by file path and size+time (or bytes), so a manifest of the
                # same files (audit's cleaned.csv) reuses a folder's rows
                if _comparable(theirs) != want:
                    continue
                views = f["views"][:].astype(np.int64)
                # their augmented views are ours when both seed them by name with the same settings
                usable = np.flatnonzero((views == 0) | ((views > 0) & (our_views is not None)
                                                        & (_views_of(theirs) == our_views)))
                old_ids = f["paths"].asstr()[:][usable]
                old_splits = f["splits"].asstr()[:]
                by_hash = stats[2] is not None and "hashes" in f
                if by_hash:  # both sides hashed: the bytes decide, not the file's size and time
                    old = {(i, h, int(v)): int(r) for i, h, v, r in
                           zip(old_ids, f["hashes"].asstr()[:][usable], views[usable], usable) if h}
                else:
                    old = {(i, int(s), int(m), int(v)): int(r) for i, s, m, v, r in
                           zip(old_ids, f["sizes"][:][usable], f["mtimes_ns"][:][usable], views[usable], usable)}
                shape = tuple(f["features"].shape[1:])
        except OSError as exc:
            if not not_damaged(path, exc):  # a file of this cache HDF5 cannot read: said, as for damage found above
                warnings.warn(f"{path.name} is not used to reuse rows from: it is damaged (not readable as HDF5)",
                              DataWarning, stacklevel=2)
            continue
        except (KeyError, ValueError, TypeError, AttributeError):
            continue
        sizes, mtimes, hashes = stats
        tags, rows = [], []
        for tag, (index, view) in enumerate(zip(unit_index.tolist(), unit_view.tolist())):
            item, s, m = ids[index], int(sizes[index]), int(mtimes[index])
            if s < 0:
                continue
            if by_hash:
                row = old.get((item, hashes[index], view)) if hashes[index] else None
            else:
                row = old.get((item, s, m, view))
            if row is not None:
                tags.append(tag)
                rows.append(row)
        if tags and (best is None or len(tags) > best.tags.size):
            rows_arr = np.asarray(rows, np.int64)
            best = Reuse(path, np.asarray(tags, np.int64), rows_arr, shape, old_splits[rows_arr])
    return best
