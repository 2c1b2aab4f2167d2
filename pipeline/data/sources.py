"""Data sources (`--data`): image folders, CSV manifests, `tfds:NAME` and the built-in digits set.

Listing a source (ids, labels, splits, class names, a fingerprint) needs no TensorFlow, so a cache
hit is decided in well under a second. `raw_images()` yields one job per image that decodes and
resizes it to a uint8 RGB square in numpy (`pipeline.data.decode`); the loader runs the jobs.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import UserError

SPLITS = ("train", "val", "test")
BUILTIN_DEFAULT = "builtin:digits"


@dataclass(frozen=True)
class SplitConfig:
    """How splits are found or made: folder names for train/val/test, and the seeded fallback split."""

    folder_names: tuple[str, str, str] = SPLITS
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.val_fraction < 1 and 0.0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise UserError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
        if len(self.folder_names) != 3 or len(set(self.folder_names)) != 3:
            raise UserError("--split-names takes three distinct folder names, e.g. train,val,test")


@dataclass
class Listing:
    """Everything known about a data set before any pixel is read, in a fixed order (never shuffled)."""

    ids: list[str]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    paths: list[str] | None = None  # files to read, parallel to ids (None for in-memory sources)
    split_origin: str = "folders"  # 'folders', 'manifest', 'source' or 'hash(seed=N)'
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def hash_split(keys: Sequence[str], labels: np.ndarray, cfg: SplitConfig) -> list[str]:
    """Assign train/val/test by a seeded hash of each image's name, per class.

    A file's split depends only on its own name and the seed, so adding images never moves
    existing ones between splits (the lesson of retrain.py). Each class with two or more images
    keeps at least one validation image when a validation fraction is asked for.
    """
    u = np.array([int.from_bytes(hashlib.sha1(f"{cfg.seed}:{k}".encode()).digest()[:8], "big") / 2**64
                  for k in keys])
    out = np.where(u < cfg.test_fraction, "test",
                   np.where(u < cfg.test_fraction + cfg.val_fraction, "val", "train")).astype(object)
    if cfg.val_fraction > 0:
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if members.size >= 2 and not np.any(out[members] == "val"):
                pool = members[out[members] == "train"]
                if pool.size >= 2:
                    out[pool[np.argmin(u[pool])]] = "val"
    return [str(s) for s in out]


def _split_dict(cfg: SplitConfig) -> dict[str, Any]:
    return {"folder_names": list(cfg.folder_names), "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "seed": cfg.seed}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


class Source:
    """A data set: `spec` names it; `listing()` lists it cheaply; `raw_images()` reads it."""

    spec: str

    split: SplitConfig

    def listing(self) -> Listing:
        """The listing, computed once per source object."""
        if getattr(self, "_listing", None) is None:
            self._listing = self._list()
        return self._listing

    def _list(self) -> Listing:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What of the data goes into the cache key: spec, content fingerprint, class map, split rule."""
        listing = self.listing()
        return {"data": self.spec, "fingerprint": self.fingerprint(listing),
                "class_names": listing.class_names, "split_origin": listing.split_origin,
                "split": _split_dict(self.split)}

    def fingerprint(self, listing: Listing) -> str:
        """A hash of what identifies the data's content (names, sizes, mtimes, labels, splits)."""
        raise NotImplementedError

    def raw_images(self, listing: Listing, indices: Sequence[int], size: int, method: str
                   ) -> Iterator[Callable[[], np.ndarray]]:
        """One job per index, in the order given: calling it returns the image as uint8
        (size, size, 3), resized by `method`, or raises DecodeError with the reason."""
        raise NotImplementedError


class FileSource(Source):
    """Shared logic of sources whose items are image files on disk."""

    def fingerprint(self, listing: Listing) -> str:
        h = hashlib.sha256()
        for path, label, split in zip(listing.paths or [], listing.labels, listing.splits):
            try:
                st = os.stat(path)
                meta = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                meta = "missing"
            h.update(f"{path}\0{meta}\0{label}\0{split}\n".encode())
        return h.hexdigest()

    def raw_images(self, listing: Listing, indices: Sequence[int], size: int, method: str
                   ) -> Iterator[Callable[[], np.ndarray]]:
        from pipeline.data.decode import load_file
        paths = listing.paths or []
        for i in indices:
            yield functools.partial(load_file, paths[i], size, method)


class FolderSource(FileSource):
    """An image folder with one subfolder per class, optionally under train/val/test folders."""

    def __init__(self, root: str | os.PathLike, split: SplitConfig = SplitConfig()) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.spec = str(self.root.resolve())
        if not self.root.is_dir():
            raise UserError(f"data folder not found: {self.root} (give an image folder, a CSV manifest, "
                            f"tfds:NAME or {BUILTIN_DEFAULT})")

    def _list(self) -> Listing:
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        role_of = {name: role for name, role in zip(self.split.folder_names, SPLITS)}
        split_dirs = [d for d in subdirs if d.name in role_of]
        if split_dirs:
            groups = [(role_of[d.name], d) for d in split_dirs]
        else:
            groups = [(None, self.root)]
        per_class: list[tuple[str | None, str, Path]] = []
        for role, base in groups:
            classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise UserError(f"{base} has no class subfolders; expected one subfolder per class "
                                f"(e.g. {base}/cats/*.jpg)")
            per_class += [(role, c.name, c) for c in classes]
        class_names = sorted({name for _, name, _ in per_class})
        index = {n: i for i, n in enumerate(class_names)}
        paths, labels, splits, rel = [], [], [], []
        for role, name, folder in per_class:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"class folder {folder} is empty; add images or remove the folder")
            for f in files:
                paths.append(str(f))
                labels.append(index[name])
                splits.append(role)
                rel.append(str(f.relative_to(folder)))
        labels_arr = np.asarray(labels, np.int32)
        origin = "folders"
        if not split_dirs:
            splits = hash_split([f"{class_names[l]}/{r}" for l, r in zip(labels, rel)], labels_arr, self.split)
            origin = f"hash(seed={self.split.seed})"
        return Listing(ids=paths, labels=labels_arr, splits=splits, class_names=class_names,
                       paths=paths, split_origin=origin)


class CsvSource(FileSource):
    """A CSV manifest of `path,label[,split]` rows; relative paths are relative to the CSV's folder."""

    def __init__(self, path: str | os.PathLike, split: SplitConfig = SplitConfig()) -> None:
        self.path = Path(path).expanduser()
        self.split = split
        self.spec = str(self.path.resolve())
        if not self.path.is_file():
            raise UserError(f"manifest not found: {self.path}")

    def _list(self) -> Listing:
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        if not rows:
            raise UserError(f"{self.path} lists no images; expected rows of path,label[,split]")
        base = self.path.parent
        paths, names, splits = [], [], []
        for n, r in enumerate(rows, 1):
            if len(r) < 2 or len(r) > 3:
                raise UserError(f"{self.path} line {n}: expected path,label[,split], got {len(r)} fields")
            p = Path(r[0].strip()).expanduser()
            paths.append(str(p if p.is_absolute() else base / p))
            names.append(r[1].strip())
            s = r[2].strip().lower() if len(r) == 3 else ""
            if s and s not in SPLITS:
                raise UserError(f"{self.path} line {n}: split must be train, val or test, not {s!r}")
            splits.append(s or None)
        class_names = sorted(set(names))
        labels = np.asarray([class_names.index(c) for c in names], np.int32)
        origin = "manifest"
        if any(s is None for s in splits):
            hashed = hash_split(paths, labels, self.split)
            splits = [s or h for s, h in zip(splits, hashed)]
            origin = f"manifest+hash(seed={self.split.seed})"
        return Listing(ids=paths, labels=labels, splits=splits, class_names=class_names,
                       paths=paths, split_origin=origin)


class DigitsSource(Source):
    """Built-in set: scikit-learn's 8x8 handwritten digits as RGB images; ships with sklearn, no network."""

    spec = BUILTIN_DEFAULT

    def __init__(self, split: SplitConfig = SplitConfig()) -> None:
        self.split = split

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits
        d = load_digits()
        gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), d.target.astype(np.int32)

    def _list(self) -> Listing:
        _, labels = self._arrays()
        ids = [f"builtin:digits/{i:04d}" for i in range(labels.size)]
        splits = hash_split(ids, labels, self.split)
        return Listing(ids=ids, labels=labels, splits=splits, class_names=[str(i) for i in range(10)],
                       split_origin=f"hash(seed={self.split.seed})")

    def identity(self) -> dict[str, Any]:
        """Constant for a given scikit-learn, so a cache hit needs no sklearn import."""
        return {"data": self.spec, "fingerprint": self.fingerprint(None),
                "class_names": [str(i) for i in range(10)], "split_origin": f"hash(seed={self.split.seed})",
                "split": _split_dict(self.split)}

    def fingerprint(self, listing: Listing | None = None) -> str:
        return f"sklearn-digits:{_version('scikit-learn')}"

    def raw_images(self, listing: Listing, indices: Sequence[int], size: int, method: str
                   ) -> Iterator[Callable[[], np.ndarray]]:
        from pipeline.data.decode import resize
        pixels, _ = self._arrays()
        for i in indices:
            yield functools.partial(resize, pixels[i], size, method)


class TfdsSource(Source):
    """`tfds:NAME` through tensorflow-datasets (optional extra); reads only data already prepared."""

    _SPLIT_ALIASES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
    random_access = False  # streamed in order; fine-tuning reads it into memory once

    def __init__(self, name: str, split: SplitConfig = SplitConfig()) -> None:
        self.name = name
        self.split = split
        self.spec = f"tfds:{name}"
        try:
            import tensorflow_datasets as tfds  # noqa: F401
        except ImportError:
            raise UserError("tfds: sources need tensorflow-datasets: pip install tensorflow-datasets "
                            "(or pip install -e .[tfds])") from None

    def _builder(self):
        import tensorflow_datasets as tfds
        try:
            builder = tfds.builder(self.name)
        except Exception as exc:  # tfds raises its own not-found errors
            raise UserError(f"tfds data set {self.name!r} not found: {str(exc).splitlines()[0]}") from None
        if not builder.is_prepared():
            raise UserError(f"tfds data set {self.name!r} is not downloaded and this machine may be offline; "
                            f"run `tfds build {self.name}` where there is network, or use an image folder")
        return builder

    def _split_names(self, builder) -> list[str]:
        return [s for s in builder.info.splits.keys() if s in self._SPLIT_ALIASES]

    def _list(self) -> Listing:
        builder = self._builder()
        names = builder.info.features["label"].names
        ids, labels, splits = [], [], []
        for s in self._split_names(builder):
            ds = builder.as_dataset(split=s, as_supervised=True, shuffle_files=False)
            for i, (_, y) in enumerate(ds.map(lambda x, y: (0, y)).as_numpy_iterator()):
                ids.append(f"tfds:{self.name}/{s}/{i}")
                labels.append(int(y))
                splits.append(self._SPLIT_ALIASES[s])
        labels_arr = np.asarray(labels, np.int32)
        origin = "source"
        if set(splits) == {"train"}:
            splits = hash_split(ids, labels_arr, self.split)
            origin = f"hash(seed={self.split.seed})"
        return Listing(ids=ids, labels=labels_arr, splits=splits, class_names=list(names),
                       split_origin=origin, extra={"tfds_splits": self._split_names(builder)})

    def fingerprint(self, listing: Listing) -> str:
        builder = self._builder()
        return f"tfds:{self.name}:{builder.info.version}:{len(listing)}"

    def raw_images(self, listing: Listing, indices: Sequence[int], size: int, method: str
                   ) -> Iterator[Callable[[], np.ndarray]]:
        """Streams the prepared splits in order (tensorflow-datasets needs TensorFlow); `indices`
        must be ascending (one pass). Decoding happens in tfds; resizing in the job."""
        from pipeline.data.decode import resize, to_rgb
        builder = self._builder()
        wanted = np.zeros(len(listing), bool)
        wanted[np.asarray(indices, np.int64)] = True
        offset = 0
        for s in listing.extra["tfds_splits"]:
            ds = builder.as_dataset(split=s, as_supervised=True, shuffle_files=False)
            n = builder.info.splits[s].num_examples
            for i, (img, _) in enumerate(ds.as_numpy_iterator()):
                if wanted[offset + i]:
                    yield functools.partial(resize, to_rgb(img), size, method)
            offset += n


def open_source(data: str, split: SplitConfig = SplitConfig()) -> Source:
    """Pick the source for a `--data` value: builtin:NAME, tfds:NAME, *.csv, or a folder."""
    if data.startswith("builtin:"):
        if data != BUILTIN_DEFAULT:
            raise UserError(f"unknown built-in data set {data!r}; the built-in one is {BUILTIN_DEFAULT}")
        return DigitsSource(split)
    if data.startswith("tfds:"):
        return TfdsSource(data[5:], split)
    p = Path(data).expanduser()
    if p.suffix.lower() in (".csv", ".tsv") or p.is_file():
        return CsvSource(p, split)
    if not p.exists():
        raise UserError(f"data path not found: {data} (give an image folder, a CSV manifest, tfds:NAME "
                        f"or {BUILTIN_DEFAULT})")
    return FolderSource(p, split)


