"""Where things live in a cache folder, named once: `<root>/features/` (each key's HDF5 file, with
its chunk folder and lock beside it) and `<root>/runs/<id>/` (one folder per run). Every module that
finds a cache's features or runs, or the cache a features file or run folder belongs to, asks here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FEATURES = "features"
RUNS = "runs"
FINETUNED_MODEL = "model.keras"  # a finetune run's model in its run folder: what predict, evaluate and export load
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "cache"  # the repository's cache/ folder


def cache_dir_flags(cache_dir: str | os.PathLike) -> list[str]:
    """`--cache-dir <folder>` (absolute) for a printed command, or nothing where it is the default."""
    root = Path(cache_dir).expanduser().resolve()
    return [] if root == DEFAULT_CACHE.resolve() else ["--cache-dir", str(root)]


@dataclass(frozen=True)
class CacheLayout:
    """The folders of the cache at `root`."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, path: str | os.PathLike) -> "CacheLayout":
        """The cache a features file (`<root>/features/<name>.h5`) or a run folder (`<root>/runs/<id>`)
        sits in."""
        return cls(Path(path).parent.parent)

    @classmethod
    def holding(cls, features_file: str | os.PathLike) -> "CacheLayout | None":
        """The cache a features file sits in, or None when it is not in a cache's `features/` folder
        (a copy elsewhere: runs recorded beside it would land in an arbitrary folder)."""
        path = Path(features_file).resolve()
        return cls(path.parent.parent) if path.parent.name == FEATURES else None

    @property
    def features(self) -> Path:
        return self.root / FEATURES

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    def run(self, run_id: str) -> Path:
        """The folder of run `run_id`."""
        return self.runs / run_id
