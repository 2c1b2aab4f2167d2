"""Cache inventory: find, describe and remove feature files and unfinished extractions."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.errors import UserError
from pipeline.features.store import FeatureFile


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


def _features_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "features"


def _name_parts(path: Path) -> tuple[str, str, str, str]:
    """backbone, size, pooling/layer and key prefix from `<backbone>-<size>-<pool>-<key16>`."""
    stem = path.name.split(".")[0]
    head, _, key = stem.rpartition("-")
    backbone, size, pool = (head.split("-", 2) + ["", "", ""])[:3]
    return backbone, size, pool, key


def find_entries(cache_dir: Path) -> list[Entry]:
    """Every finished `.h5` file and every unfinished `.parts` folder under the cache."""
    out: list[Entry] = []
    root = _features_dir(cache_dir)
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                out.append(Entry(path, str(a["key"]), str(a["backbone"]), int(a["image_size"]),
                                 str(a["layer"] or a["pooling"]), int(a["n_rows"]), path.stat().st_size / 1e6,
                                 str(a["data"]), "complete" if a.get("complete") else "incomplete"))
        except (OSError, KeyError):
            b, s, p, k = _name_parts(path)
            out.append(Entry(path, k, b, s, p, "?", path.stat().st_size / 1e6, "?", "unreadable"))
    for parts in sorted(root.glob("*.parts")):
        b, s, p, k = _name_parts(parts)
        chunks = list(parts.glob("chunk-*.npz"))
        size = sum(c.stat().st_size for c in chunks) / 1e6
        out.append(Entry(parts, k, b, s, p, "?", size, "?", f"partial ({len(chunks)} chunks)"))
    return out


def resolve(ref: str, cache_dir: Path) -> list[Path]:
    """Paths matching a key prefix (or a path itself); an unknown ref is a UserError."""
    p = Path(ref)
    if p.exists():
        return [p]
    hits = [e.path for e in find_entries(cache_dir) if e.key.startswith(ref) or e.path.stem.endswith(ref)]
    if not hits:
        raise UserError(f"no cache entry matches {ref!r}; `python cli.py cache ls` lists them")
    return hits


def describe(ref: str, cache_dir: Path) -> str:
    """A readable summary of one finished cache file."""
    paths = [p for p in resolve(ref, cache_dir) if p.suffix == ".h5"]
    if len(paths) != 1:
        raise UserError(f"{ref!r} matches {len(paths)} finished files; give a longer key prefix")
    with FeatureFile(paths[0]) as ff:
        lines = [f"path: {ff.path}", f"rows: {len(ff)}  feature shape: {ff.feature_shape}  "
                 f"dtype: {ff.features.dtype}"]
        for k in ("key", "backbone", "weights", "weights_id", "image_size", "resize", "preprocessing", "pooling",
                  "layer", "data", "data_fingerprint", "split_origin", "augment_copies", "augment_seed",
                  "versions", "created", "extract_seconds"):
            v = ff.attrs.get(k)
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


def remove_entry(ref: str, cache_dir: Path) -> list[Path]:
    """Delete the matching file(s) or partial folder(s) and their lock files."""
    removed = []
    for path in resolve(ref, cache_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        lock = path.with_suffix(".lock")
        if lock.exists():
            lock.unlink()
        removed.append(path)
    return removed
