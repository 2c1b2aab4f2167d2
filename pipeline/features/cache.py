"""Cache inventory: find, describe and remove feature files and unfinished extractions."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.errors import UserError
from pipeline.features.store import (PARTS_SUFFIX, FeatureFile, chunk_files, decode_attr, not_damaged,
                                     structure_problem)
from pipeline.layout import CacheLayout
from pipeline.locking import KEY_LOCK_SUFFIX, is_locked, key_lock, shard_locks


@dataclass
class Entry:
    path: Path
    key: str
    backbone: str
    image_size: int | str
    pooling: str
    rows: int | str
    megabytes: float
    data: str
    state: str  # 'complete', 'partial (N chunks)' or 'unreadable'


def _name_parts(path: Path) -> tuple[str, str, str, str]:
    """backbone, size, pooling/layer and key prefix from `<backbone>-<size>-<pool>-<key16>`."""
    stem = path.name.split(".")[0]
    head, _, key = stem.rpartition("-")
    backbone, size, pool = (head.split("-", 2) + ["", "", ""])[:3]
    return backbone, size, pool, key


def _megabytes(path: Path) -> float:
    """A file's size in MB; 0 where it is gone (a link that leads nowhere, removed since the listing)."""
    try:
        return path.stat().st_size / 1e6
    except OSError:
        return 0.0


def find_entries(cache_dir: Path) -> list[Entry]:
    """Every finished `.h5` file and every unfinished `.parts` folder under the cache."""
    out: list[Entry] = []
    root = CacheLayout(cache_dir).features
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.h5")):
        if not path.exists():  # a symbolic link whose target is gone (a store moved elsewhere)
            b, s, p, k = _name_parts(path)
            out.append(Entry(path, k, b, s, p, "?", 0.0, "?", "missing: a symbolic link that leads nowhere"))
            continue
        if not path.is_file():  # a folder or a FIFO named like a cache file: opening a FIFO would wait forever
            b, s, p, k = _name_parts(path)
            what = "a folder" if path.is_dir() else "not a regular file"
            out.append(Entry(path, k, b, s, p, "?", 0.0, "?", f"damaged: {what}, not a cache file"))
            continue
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                problem = structure_problem(f, path)
                if problem:
                    raise ValueError(problem)
                # a join of backbones of other input sizes records 0, and each part's size
                size = int(a["image_size"]) or "+".join(map(str, decode_attr(a.get("image_sizes")) or [])) or 0
                out.append(Entry(path, str(a["key"]), str(a["backbone"]), size,
                                 f"{a['layer']}/{a['pooling']}" if a["layer"] else str(a["pooling"]),
                                 int(f["features"].shape[0]),
                                 _megabytes(path), str(a["data"]), "complete"))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            b, s, p, k = _name_parts(path)
            why = not_damaged(path, exc) if isinstance(exc, OSError) else ""
            state = f"unreadable: {why}" if why else f"damaged: {'not readable as HDF5' if isinstance(exc, OSError) else exc}"
            out.append(Entry(path, k, b, s, p, "?", _megabytes(path), "?", state))
    for parts in sorted(root.glob(f"*{PARTS_SUFFIX}")):
        b, s, p, k = _name_parts(parts)
        chunks = chunk_files(parts)
        size = sum(_megabytes(c) for c in chunks)
        running = ", being written now" if being_written(parts) else ""
        out.append(Entry(parts, k, b, s, p, "?", size, "?", f"partial ({len(chunks)} chunks{running})"))
    for tmp in sorted(root.glob(".*.h5.*.tmp")):  # left by an assembly that was killed
        b, s, p, k = _name_parts(tmp.with_name(tmp.name.lstrip(".")))
        out.append(Entry(tmp, k, b, s, p, "?", _megabytes(tmp), "?",
                         "temporary (interrupted assembly; removed by the next extract of this key)"))
    taken = {key_lock(e.path) for e in out}
    for lock in sorted(root.glob(f"*{KEY_LOCK_SUFFIX}")):  # left alone by an extraction refused before its first chunk
        if ".shard-" in lock.name or lock in taken:
            continue
        b, s, p, k = _name_parts(lock)
        out.append(Entry(lock, k, b, s, p, "?", 0.0, "?", "extracting (no chunk yet)" if is_locked(lock) else
                         "lock file only (an extraction stopped or refused before its first chunk; nothing cached)"))
    return out


def resolve(ref: str, cache_dir: Path) -> list[Path]:
    """Paths matching a key prefix, an entry's file name, or an existing path (for reading only);
    an empty or unknown ref is a UserError."""
    ref = _check_ref(ref)
    p = Path(ref).expanduser()
    if p.exists() and not _is_entry_name(ref, cache_dir):
        return [p]
    hits = [e.path for e in match_entries(ref, cache_dir)]
    if not hits:
        raise UserError(f"no cache entry matches {ref!r}; `python cli.py cache ls` lists them")
    return hits


def finished_file(ref: str, cache_dir: Path, name: str) -> Path:
    """The one finished cache file (.h5) `ref` names (a key prefix, an entry's name or a path), else a
    UserError that says why (`name` says what was given, e.g. "--cache 'ab12'"): only an extraction that
    has not finished (a longer key cannot help), a folder, nothing, or several files, named."""
    hits = resolve(ref, cache_dir)
    paths = [p for p in hits if p.suffix == ".h5" and not p.is_dir()]
    if len(paths) == 1:
        return paths[0]
    if not paths and hits and all(p.suffix in (PARTS_SUFFIX, ".tmp") for p in hits):
        raise UserError(f"{name} names only an extraction that has not finished ({hits[0].name}); wait for the one "
                        f"running, or run the same extract again to finish it")
    if len(hits) == 1 and hits[0].is_dir():
        raise UserError(f"{name} is a folder; give a cache file (.h5) in it or a key prefix (`python cli.py cache ls`)")
    if not paths:
        raise UserError(f"{name} names no finished cache file ({hits[0].name}); `python cli.py cache ls` lists them")
    shown = ", ".join(p.name for p in paths[:3]) + (" and more" if len(paths) > 3 else "")
    raise UserError(f"{name} matches {len(paths)} finished cache files ({shown}); give a longer key prefix or a path")


def _check_ref(ref: str) -> str:
    if not ref or not ref.strip():
        raise UserError("an empty cache entry name was given; give a key prefix from `python cli.py cache ls`")
    return ref.strip()


def _is_entry_name(ref: str, cache_dir: Path) -> bool:
    return "/" not in ref and any(_names_entry(e, ref) for e in find_entries(cache_dir))


def _names_entry(e: Entry, ref: str) -> bool:
    """Whether `ref` is this entry's key (or a prefix of it) or its file name; never a name's end."""
    if ref in (e.path.name, e.path.stem):
        return True
    key = str(e.key)
    if not key or key == "?":
        return False
    if len(key) <= 16 and len(ref) > len(key):  # partial or unreadable: only 16 key characters are known
        return ref.startswith(key)
    return key.startswith(ref)


def match_entries(ref: str, cache_dir: Path) -> list[Entry]:
    """Entries of the cache under `cache_dir` named by `ref`: a key prefix, a file name, or a path
    that is one of those entries. Never anything outside `<cache_dir>/features/`."""
    ref = _check_ref(ref)
    entries = find_entries(cache_dir)
    if "/" in ref or ref in (".", ".."):
        target = os.path.realpath(Path(ref).expanduser())
        return [e for e in entries if os.path.realpath(e.path) == target]
    return [e for e in entries if _names_entry(e, ref)]


def _group_key(e: Entry) -> str:
    return str(e.key)[:16] or e.path.name


def select_for_removal(ref: str, cache_dir: Path) -> list[Entry]:
    """The entries `cache rm REF` removes: those of exactly one key (its file and its unfinished
    parts); UserError when nothing or entries of several keys match."""
    ref = _check_ref(ref)
    hits = match_entries(ref, cache_dir)
    if not hits:
        where = CacheLayout(cache_dir).features
        if "/" in ref:
            raise UserError(f"{ref} is not an entry of the cache in {where}; cache rm removes only cache entries "
                            f"(by key prefix, see `python cli.py cache ls`), never other paths")
        raise UserError(f"no cache entry matches {ref!r} in {where}; `python cli.py cache ls` lists them")
    keys = sorted({_group_key(e) for e in hits})
    if len(keys) > 1:
        names = ", ".join(e.path.name for e in hits)
        raise UserError(f"{ref!r} matches {len(keys)} cache entries ({names}); nothing removed; give a longer "
                        f"key prefix")
    return hits


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "", re.IGNORECASE)
    if not m:
        raise UserError(f"--older-than takes a number and a unit s, m, h, d or w (e.g. 7d, 12h), not {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> float:
    """'500MB', '2G', '100KiB', '1234' (bytes) -> bytes (MB = 10^6 bytes, as `cache ls` shows)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text or "", re.IGNORECASE)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UserError(f"--larger-than takes a size such as 500MB, 2GB or 100KiB, not {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def entry_mtime(e: Entry) -> float:
    """When an entry last changed: the file's mtime, or the newest chunk of an unfinished extraction."""
    try:
        times = [e.path.stat().st_mtime if e.path.exists() else e.path.lstat().st_mtime]  # a dangling link: its own
        if e.path.is_dir():
            times += [c.stat().st_mtime for c in chunk_files(e.path)]
    except OSError:
        return time.time()
    return max(times)


def select_for_eviction(cache_dir: Path, everything: bool = False, older_than: str | None = None,
                        larger_than: str | None = None, now: float | None = None) -> list[Entry]:
    """Entries matching every given criterion: all, last changed more than `older_than` ago, larger
    than `larger_than`."""
    entries = find_entries(cache_dir)
    now = time.time() if now is None else now
    if older_than is not None:
        age = parse_duration(older_than)
        entries = [e for e in entries if now - entry_mtime(e) > age]
    if larger_than is not None:
        size = parse_size(larger_than)
        entries = [e for e in entries if e.megabytes * 1e6 > size]
    if not (everything or older_than is not None or larger_than is not None):
        return []
    return entries


def describe(ref: str, cache_dir: Path) -> str:
    """A readable summary of one finished cache file."""
    with FeatureFile(finished_file(ref, cache_dir, repr(ref))) as ff:
        lines = [f"path: {ff.path}", f"rows: {len(ff)}  feature shape: {ff.feature_shape}  "
                 f"dtype: {ff.features.dtype}"]
        for k in ("key", "backbone", "weights", "weights_id", "image_size", "resize", "preprocessing", "pooling",
                  "layer", "data", "data_fingerprint", "split_origin", "augment_copies", "augment_seed",
                  "versions", "created", "extract_seconds", "parts"):
            v = ff.attrs.get(k)
            if v is None:  # not recorded for this kind of file (a join keeps its own in its parts)
                continue
            if k == "parts" and isinstance(v, list):  # a join's own rows stay readable when a part is removed
                v = [f"{part}{'' if Path(str(part)).exists() else ' (removed)'}" for part in v]
            lines.append(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        lines.append(f"classes ({len(ff.class_names)}): {', '.join(ff.class_names)}")
        clean = ff.views == 0
        for split in ("train", "val", "test"):
            sel = clean & (ff.splits == split)
            if sel.any():
                counts = Counter(ff.labels[sel].tolist())
                per = ", ".join(f"{ff.class_names[c]}={n}" for c, n in sorted(counts.items()))
                lines.append(f"{split}: {int(sel.sum())} images ({per})")
        if (ff.views > 0).any():
            lines.append(f"augmented rows: {int((ff.views > 0).sum())}")
        lines.append(f"skipped: {len(ff.skipped)}" + (f" ({', '.join(p for p, _ in ff.skipped[:5])})"
                                                        if ff.skipped else ""))
    return "\n".join(lines)


def being_written(path: Path) -> bool:
    """Whether an extraction holds this entry's lock (or one of its shards') right now."""
    return is_locked(key_lock(path)) or any(is_locked(lock) for lock in shard_locks(path).values())


def remove_entries(entries: list[Entry], cache_dir: Path) -> list[Path]:
    """Delete these entries (files or partial folders) and their lock files; refuses, before deleting
    anything, an entry outside the cache or one an extraction is writing right now."""
    root = os.path.realpath(CacheLayout(cache_dir).features)
    for e in entries:
        parent = os.path.realpath(e.path.parent)
        if parent != root:
            raise UserError(f"{e.path} is not inside the cache folder {root}; nothing removed")
        if being_written(e.path):
            raise UserError(f"an extraction is writing {e.path.name} right now; nothing removed; wait for it "
                            f"to finish or stop it first")
    removing = {e.path for e in entries}
    staying = [o for o in find_entries(cache_dir) if o.path not in removing]  # read once, not per entry
    removed = []
    for e in entries:
        path = e.path
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
        lock = key_lock(path)  # the key's lock (and its shards'), unless another entry of the key stays
        if not any(o.path != lock and key_lock(o.path) == lock for o in staying):
            lock.unlink(missing_ok=True)
            for shard_lock in shard_locks(path).values():
                shard_lock.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_entry(ref: str, cache_dir: Path) -> list[Path]:
    """Delete the entries of the one key `ref` names (see `select_for_removal`) and their lock files."""
    return remove_entries(select_for_removal(ref, cache_dir), cache_dir)
