"""HDF5 feature store: crash-safe chunked writing during extraction, and the reader later stages use.

Layout of one finished cache file (`<cache>/features/<name>-<key>.h5`), one row per stored view:

- `features`  (N, D) or (N, H, W, C), float16 by default, chunked along N
- `labels`    (N,) int32, index into the `class_names` attribute (-1 = unlabelled)
- `paths`     (N,) str, the image's path (or `builtin:`/`tfds:` id)
- `splits`    (N,) str, `train` / `val` / `test`
- `views`     (N,) int8, 0 = the clean image, k = augmented copy k (training images only)
- `index`     (N,) int32, position of the image in the data set listing
- `skipped_paths`, `skipped_reasons` (M,) str: images that could not be read
- attributes: `key`, `complete`, `schema`, `request` (JSON of everything hashed into the key),
  `class_names` (JSON), `backbone`, `weights_id`, `image_size`, `pooling`, `layer`, `dtype`, ...

While extracting, finished chunks live as `.npz` files in `<name>-<key>.parts/`, each written
atomically, so a killed run resumes from its last complete chunk; the HDF5 file is assembled at the
end under a temporary name and renamed, so a file named `*.h5` is always complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.errors import UncleanFileError, UserError, filesystem_message
from pipeline.layout import CacheLayout, cache_dir_flags

SCHEMA_VERSION = 1
_CHUNK_RE = re.compile(r"^chunk-(\d{6})\.npz$")
_STR = h5py.string_dtype()


# ----------------------------------------------------------------------------------------- writing
def chunk_file(folder: str | os.PathLike, number: int) -> Path:
    """The file of chunk `number` in an extraction's parts folder (the one place chunk files are named)."""
    return Path(folder) / f"chunk-{int(number):06d}.npz"


def chunk_files(folder: str | os.PathLike) -> list[Path]:
    """The finished chunk files in a parts folder, by number (none when it is missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHUNK_RE.match(p.name))


PARTS_SUFFIX = ".parts"  # an unfinished extraction's chunk folder, beside the cache file it assembles into


def parts_folder(features: str | os.PathLike) -> Path:
    """The chunk folder an extraction of the cache file `features` writes before it assembles the file."""
    return Path(features).with_suffix(PARTS_SUFFIX)


class ChunkDir:
    """The folder of finished extraction chunks for one cache key; each chunk file is atomic."""

    def __init__(self, path: str | os.PathLike, chunk_units: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        if meta_file.exists():
            chunk_units = read_parts_json(meta_file, {"chunk_units": int})["chunk_units"]
        else:
            write_text_atomic(meta_file, json.dumps({"chunk_units": chunk_units}))
        self.chunk_units = chunk_units

    def done(self) -> list[int]:
        """Numbers of the chunks already written completely."""
        return [int(_CHUNK_RE.match(p.name).group(1)) for p in chunk_files(self.path)]

    def write(self, number: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk `number` atomically: it either exists whole or not at all."""
        with atomic_path(chunk_file(self.path, number), suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    def read(self, number: int) -> dict[str, np.ndarray]:
        """A chunk's arrays (no pickle); UserError naming the chunk and the way out when it is damaged."""
        path = chunk_file(self.path, number)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            missing = [k for k in CHUNK_ARRAYS if k not in arrays]
            if missing:
                raise ValueError(f"no {missing[0]!r} array")
            n = arrays["index"].shape[0]
            if arrays["features"].shape[:1] != (n,) or arrays["views"].shape != (n,):
                raise ValueError("its arrays disagree on the number of rows")
        except Exception as exc:  # numpy and zipfile raise many types for a damaged file
            if filesystem_message(exc):  # unreadable for another reason (permissions, I/O): not damage
                raise
            raise UserError(_parts_damage(path, f"{type(exc).__name__}: {exc}")) from None
        return arrays

    def remove(self) -> None:
        self.remove_path(self.path)

    @staticmethod
    def remove_path(path: Path) -> None:
        """Delete a chunk folder (only ever one named `*.parts` that this module made)."""
        path = Path(path)
        if path.suffix == PARTS_SUFFIX and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


CHUNK_ARRAYS = ("features", "index", "views", "skipped_index", "skipped_reason")


def _parts_damage(path: Path, problem: str) -> str:
    """The one line for a damaged file of an unfinished extraction: a chunk alone can go (the next run
    computes its images again and keeps every other chunk); a note of the whole folder takes the folder."""
    folder, problem = path.parent, " ".join(problem.split())
    whole = f"remove the unfinished extraction (`{cache_rm_command(folder)}`)"
    if _CHUNK_RE.match(path.name):
        return (f"{path} is damaged ({problem}); delete that chunk (`rm {shlex.quote(str(path))}`) and run the same "
                f"extract again: only its images are computed again, the other chunks are kept (or {whole})")
    return f"{path} is damaged ({problem}); {whole} or run the same extract with --force to start it over"


def read_parts_json(path: Path, fields: dict[str, type]) -> dict[str, Any]:
    """A small JSON note of an unfinished extraction (meta.json, shards.json) with these typed fields;
    UserError naming the file and the way out when it is unreadable or malformed."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {k: t(data[k]) for k, t in fields.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if filesystem_message(exc):
            raise
        raise UserError(_parts_damage(Path(path), f"{type(exc).__name__}: {exc}")) from None


class DegenerateFeatures(UserError):
    """The chunks hold nothing worth storing: no rows, or the same vector for every image."""


class NoImageRead(DegenerateFeatures):
    """Every listed image was skipped: the data, not the backbone, is what to fix."""


class OneImage(DegenerateFeatures):
    """The same vector for every image because every file holds the same bytes: the data is one picture."""


@dataclass
class ItemTable:
    """Per-image metadata of a data set listing, in listing order."""

    ids: Sequence[str]
    labels: np.ndarray
    splits: Sequence[str]
    class_names: Sequence[str]
    sizes: np.ndarray | None = None  # file size and mtime per image: what incremental caches compare
    mtimes_ns: np.ndarray | None = None
    hashes: np.ndarray | None = None  # SHA-256 hex per image, with --content-hash


def assemble(
    chunks: ChunkDir,
    target: Path,
    items: ItemTable,
    attrs: dict[str, Any],
    dtype: str = "float16",
    compression: str | None = None,
) -> Path:
    """Stream all chunks, in order, into one HDF5 file written under a temporary name then renamed."""
    numbers = chunks.done()
    n_rows = 0
    feat_shape: tuple[int, ...] | None = None
    first_skip: tuple[int, str] | None = None
    for n in numbers:
        z = chunks.read(n)
        n_rows += z["index"].shape[0]
        if feat_shape is None and z["features"].shape[0]:
            feat_shape = tuple(z["features"].shape[1:])
        elif z["features"].shape[0] and tuple(z["features"].shape[1:]) != feat_shape:
            raise UserError(_parts_damage(chunk_file(chunks.path, n),
                                          f"features of shape {z['features'].shape[1:]}, others {feat_shape}"))
        if first_skip is None and len(z["skipped_index"]):
            first_skip = (int(z["skipped_index"][0]), str(z["skipped_reason"][0]))
    if feat_shape is None:
        example = (f"; e.g. {items.ids[first_skip[0]]}: {first_skip[1]}" if first_skip is not None
                   and first_skip[0] < len(items.ids) else "")
        windows = (" (a path written with \\ is a Windows path: write it with /)"
                   if first_skip is not None and "\\" in example else "")
        raise NoImageRead(f"no image could be read ({len(items.ids)} listed), so there is nothing to store; "
                          f"check the data path{example}{windows}")
    row_bytes = int(np.prod(feat_shape)) * np.dtype(dtype).itemsize
    chunk_rows = max(1, min(max(n_rows, 1), (1 << 20) // max(row_bytes, 1)))
    comp = {"gzip": dict(compression="gzip", compression_opts=4), "lzf": dict(compression="lzf")}
    if not compression:  # a compressed file's size is unknown before it is written
        check_space(target, n_rows * row_bytes + sum(len(i) + 80 for i in items.ids) + (1 << 20))
    with atomic_path(target, suffix=".h5") as tmp:
        try:
            _write_h5(tmp, chunks, numbers, items, attrs, n_rows, feat_shape, dtype, chunk_rows,
                      comp.get(compression or "", {}))
        except (OSError, RuntimeError) as e:
            if isinstance(e, UserError) or not _out_of_space(e):
                raise
            raise UncleanFileError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from None
    return target


def check_space(target: Path, need: int) -> None:
    """OSError(ENOSPC) naming `target` when its folder has less than `need` bytes free: a disk that fills
    up inside HDF5 leaves the library unable to close the file (the process would crash on exit)."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(folder)
    free = usage.free
    if usage.total and free < need:  # some network and FUSE file systems report no sizes at all
        raise OSError(errno.ENOSPC, f"writing needs about {need / 2**20:,.0f} MB, {free / 2**20:,.0f} MB free",
                      str(target))


def _out_of_space(e: BaseException) -> bool:
    """Whether an HDF5 error comes from a full disk or quota (h5py gives OSError or RuntimeError, the
    errno in the text)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "errno = 28" in text or "errno = 122" in text or "No space left" in text


def _one_file(items: ItemTable, index: np.ndarray) -> int:
    """How many files the rows hold where every one has the same bytes (0 where not, or not files): asked
    only when every row's features are the same, which random weights and underflow also cause."""
    rows = np.unique(index)
    if rows.size < 2 or items.sizes is None or np.unique(np.asarray(items.sizes)[rows]).size != 1:
        return 0
    first = None
    for i in rows:
        try:
            data = Path(items.ids[int(i)]).read_bytes()
        except OSError:
            return 0
        if first is None:
            first = data
        elif data != first:
            return 0
    return int(rows.size)


def _write_h5(tmp: Path, chunks: ChunkDir, numbers: list[int], items: ItemTable, attrs: dict[str, Any], n_rows: int,
              feat_shape: tuple[int, ...], dtype: str, chunk_rows: int, comp: dict[str, Any]) -> None:
    """The body of `assemble`: every chunk's rows and the item tables into a new HDF5 file at `tmp`."""
    with h5py.File(tmp, "w") as f:
        feats = f.create_dataset(
            "features", shape=(n_rows, *feat_shape), dtype=dtype,
            chunks=(chunk_rows, *feat_shape), **comp,
        )
        index = np.empty(n_rows, np.int32)
        views = np.empty(n_rows, np.int8)
        skipped: dict[int, str] = {}
        pos = 0
        first: np.ndarray | None = None
        varies = False
        for n in numbers:
            c = chunks.read(n)
            k = c["index"].shape[0]
            if k:
                rows = c["features"].astype(dtype, copy=False)
                first = rows[0] if first is None else first
                varies = varies or bool(np.any(rows != first))
            feats[pos:pos + k] = c["features"].astype(dtype, copy=False)
            index[pos:pos + k] = c["index"]
            views[pos:pos + k] = c["views"]
            for i, r in zip(c["skipped_index"], c["skipped_reason"]):
                skipped.setdefault(int(i), str(r))
            pos += k
        if n_rows > 1 and not varies:
            copies = _one_file(items, index)
            if copies:
                raise OneImage(f"every image is a copy of one file ({copies} files with the same bytes, e.g. "
                               f"{items.ids[int(index[0])]}), so they all gave the same features; give a data set of "
                               f"different pictures")
            raise DegenerateFeatures(
                "every image gave the same feature vector (e.g. all zeros), so a head could not learn anything")
        f["index"] = index
        f["views"] = views
        f["labels"] = np.asarray(items.labels, np.int32)[index]
        f.create_dataset("paths", data=[items.ids[i] for i in index], dtype=_STR)
        f.create_dataset("splits", data=[items.splits[i] for i in index], dtype=_STR)
        if items.sizes is not None and items.mtimes_ns is not None:
            f["sizes"] = np.asarray(items.sizes, np.int64)[index]
            f["mtimes_ns"] = np.asarray(items.mtimes_ns, np.int64)[index]
        if items.hashes is not None:
            f.create_dataset("hashes", data=[items.hashes[i] for i in index], dtype=_STR)
        order = sorted(skipped)
        _finish(f, {items.ids[i]: skipped[i] for i in order}, attrs, items.class_names, n_rows, feat_shape)


def _finish(f: h5py.File, skipped: dict[str, str], attrs: dict[str, Any], class_names: Sequence[str], n_rows: int,
            feat_shape: Sequence[int]) -> None:
    """The last of a cache file: the skipped images, the attributes, the schema and, last, `complete`."""
    f.create_dataset("skipped_paths", data=list(skipped), dtype=_STR)
    f.create_dataset("skipped_reasons", data=list(skipped.values()), dtype=_STR)
    for name, value in attrs.items():
        f.attrs[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    f.attrs["class_names"] = json.dumps(list(class_names))
    f.attrs["schema"] = SCHEMA_VERSION
    f.attrs["n_rows"] = n_rows
    f.attrs["feature_shape"] = json.dumps(list(feat_shape))
    f.attrs["complete"] = True


def concatenate(sources: Sequence[str | os.PathLike], target: Path, attrs: dict[str, Any],
                dtype: str = "float16", block_rows: int = 4096) -> int:
    """Write `target`, one cache file whose rows are the rows of `sources` side by side (`--backbone
    a+b`): the same images and views in every source, pooled vectors joined in source order. A row one
    source skipped is skipped here too. Written under a temporary name, then renamed; `attrs` describe
    it. Returns its number of rows."""
    files = [FeatureFile(s) for s in sources]
    try:
        first = files[0]
        for ff in files:
            if len(ff.feature_shape) != 1:
                raise UserError(f"{ff.path} holds feature maps of shape {ff.feature_shape}; concatenating "
                                f"backbones takes pooled vectors (leave --pooling at avg or max)")
            if ff.class_names != first.class_names:
                raise UserError(f"{ff.path} and {first.path} list different classes; extract both from the same data")
        keys = [dict(zip(zip(ff.paths, ff.views.tolist()), range(len(ff)))) for ff in files]
        rows = [r for r, key in enumerate(zip(first.paths, first.views.tolist())) if all(key in k for k in keys)]
        sel = np.asarray(rows, np.int64)
        where = [np.asarray([k[(first.paths[r], int(first.views[r]))] for r in rows], np.int64) for k in keys]
        widths = [ff.feature_shape[0] for ff in files]
        n_rows, width = sel.size, sum(widths)
        if n_rows == 0:
            raise UserError(f"{', '.join(str(ff.path) for ff in files)} share no image; extract them from the same data")
        skipped = dict(first.skipped)
        for ff in files[1:]:
            for path, reason in ff.skipped:
                skipped.setdefault(path, reason)
        check_space(target, n_rows * width * np.dtype(dtype).itemsize + (1 << 20))
        with atomic_path(target, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(n_rows, width), dtype=dtype,
                                     chunks=(max(1, min(n_rows, (1 << 20) // (width * np.dtype(dtype).itemsize))),
                                             width))
            for start in range(0, n_rows, block_rows):
                block = [ff.features[np.sort(w[start:start + block_rows])] for ff, w in zip(files, where)]
                orders = [np.argsort(np.argsort(w[start:start + block_rows])) for w in where]
                feats[start:start + block_rows] = np.hstack([b[o] for b, o in zip(block, orders)]).astype(dtype)
            src = first._f
            for name in ("index", "views", "labels", "sizes", "mtimes_ns"):
                if name in src:
                    f[name] = src[name][:][sel]
            for name in ("paths", "splits", "hashes"):
                if name in src:
                    f.create_dataset(name, data=src[name].asstr()[:][sel].tolist(), dtype=_STR)
            _finish(f, skipped, attrs, first.class_names, n_rows, (width,))
    finally:
        for ff in files:
            ff.close()
    return n_rows


# ----------------------------------------------------------------------------------------- reading
def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` is a finished cache file (cheap: reads one attribute)."""
    if not Path(path).is_file():  # a folder, or a FIFO whose open would wait for a writer forever
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except (OSError, KeyError):
        return False


def read_skipped(f: h5py.File) -> list[tuple[str, str]]:
    """(path, reason) of the images an open cache file skipped."""
    return list(zip(f["skipped_paths"].asstr()[:], f["skipped_reasons"].asstr()[:]))


def skipped_files(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, reason) of the images a cache file skipped, read from its two small datasets alone
    (a cache hit says them without loading the per-row arrays); empty where there is no such file."""
    if not Path(path).is_file():
        return []
    try:
        with h5py.File(path, "r") as f:
            return read_skipped(f)
    except (OSError, KeyError, TypeError):
        return []


def records_hashes(path: str | os.PathLike) -> bool:
    """True when a cache file keeps each image's SHA-256 (extracted with --content-hash); cheap."""
    if not Path(path).is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "hashes" in f
    except OSError:
        return False


def refuse_damaged(path: str | os.PathLike) -> None:
    """Raise the one-line damage error (what is wrong, the way out) for a file at `path` that is not a
    finished cache file; nothing where there is none. A key's file is renamed into place finished,
    so one that is there unfinished is damaged: a command must say so, not extract over it as if the
    cache were empty."""
    if Path(path).exists() and not is_complete(path):
        FeatureFile(path).close()


class FeatureFile:
    """Read access to one finished cache file; arrays other than `features` are loaded eagerly.

    `features` stays on disk (an h5py dataset) so heads can stream batches larger than memory.
    `asked_weights`: the --weights a command asked for where they differ from the file's recorded
    request only in the path (the key hashes a weights file's content: a file moved or renamed since
    is a cache hit), so a run records where the weights are now.
    """

    asked_weights: str | None = None

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"no cache file at {self.path}; run `python cli.py extract` first or check the path")
        if not self.path.is_file():  # HDF5 would call a folder damaged, and wait on a FIFO forever
            what = "a folder" if self.path.is_dir() else "not a regular file"
            raise UserError(f"{self.path} is {what}, not a cache file; give a .h5 file from a cache's features/ folder "
                            f"(`python cli.py cache ls` lists them) or its key prefix")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(open_failure(self.path, exc)) from None
        try:
            self._read()
        except UserError:
            self._f.close()
            raise
        except Exception as exc:  # noqa: BLE001 - h5py and numpy raise many types for a damaged file
            self._f.close()
            raise UserError(damaged_message(self.path, f"{type(exc).__name__}: {exc}")) from None

    def _read(self) -> None:
        """Check the file's structure (cheap: attributes and shapes, no rows read), then load the small
        per-row arrays and check their values; one UserError naming the file and the first problem."""
        a = self._f.attrs
        if "key" in a and not a.get("complete", False):
            raise UserError(damaged_message(self.path, "it is marked incomplete, which a finished .h5 never is"))
        problem = structure_problem(self._f, self.path)
        if problem:
            raise UserError(damaged_message(self.path, problem))
        self.attrs: dict[str, Any] = {k: decode_attr(v) for k, v in a.items()}
        self.class_names: list[str] = list(self.attrs["class_names"])
        self.features = self._f["features"]
        self.labels: np.ndarray = self._f["labels"][:]
        self.splits: np.ndarray = self._f["splits"].asstr()[:]
        self.views: np.ndarray = self._f["views"][:]
        self.index: np.ndarray = self._f["index"][:]
        self.paths: list[str] = list(self._f["paths"].asstr()[:])
        self.skipped: list[tuple[str, str]] = read_skipped(self._f)
        problem = content_problem(self.labels, self.views, self.index, len(self.class_names))
        if problem:
            raise UserError(damaged_message(self.path, problem))

    @property
    def key(self) -> str:
        return str(self.attrs["key"])

    @property
    def request(self) -> dict[str, Any]:
        """The extraction request the cache recorded (`ExtractRequest.to_json`, its data as given); {} where it
        records none (a cache of an older version, or written by hand)."""
        req = self.attrs.get("request")
        return dict(req) if isinstance(req, dict) else {}

    @property
    def data(self) -> str:
        """The data the cache was extracted from, as its key resolved it (a folder or manifest by its
        absolute path, so advice and runs name it from any working folder); "" where none is recorded."""
        material = self.attrs.get("key_material")
        spec = (material.get("data") or {}).get("data") if isinstance(material, dict) else None
        return str(spec or self.attrs.get("data") or "")

    def file_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(size, mtime_ns) per row of each image file as it was when extracted (-1 where it could not
        be read then); None where the cache records none (built-in and tfds: images)."""
        if "sizes" not in self._f or "mtimes_ns" not in self._f:
            return None
        return self._f["sizes"][:], self._f["mtimes_ns"][:]

    def file_hashes(self) -> np.ndarray | None:
        """SHA-256 hex per row of each image file as extracted ("" where not taken); None where the
        cache was made without --content-hash."""
        if "hashes" not in self._f:
            return None
        return self._f["hashes"].asstr()[:]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def rows(self, split: str | None = None, views: str = "clean") -> np.ndarray:
        """Row numbers of one split (None = all); views 'clean' (view 0 only) or 'all'."""
        if split is not None and split not in ("train", "val", "test"):  # a typo would select nothing, silently
            raise ValueError(f"split must be 'train', 'val', 'test' or None, not {split!r}")
        mask = np.ones(len(self), bool)
        if split is not None:
            mask &= self.splits == split
        if views == "clean":
            mask &= self.views == 0
        elif views != "all":
            raise ValueError(f"views must be 'clean' or 'all', not {views!r}")
        return np.flatnonzero(mask)

    def load(self, rows: np.ndarray | None = None, dtype: str = "float32") -> np.ndarray:
        """Features of `rows` as an in-memory array, in the order given (row numbers in any order,
        repeats allowed, or a boolean mask over the rows; None = all), so they line up with
        `ff.labels[rows]`. Read from disk in increasing order, as HDF5 requires."""
        if rows is None:
            return self.features[:].astype(dtype, copy=False)
        rows = self._row_numbers(rows)
        if rows.size == 0:
            return np.empty((0, *self.feature_shape), dtype)
        if rows.size == 1 or np.all(rows[1:] > rows[:-1]):
            return self.features[rows].astype(dtype, copy=False)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.features[unique].astype(dtype, copy=False)[inverse]

    def _row_numbers(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Integer row numbers from row numbers or a boolean mask; IndexError for a row not in the file."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"a boolean mask over the rows has {len(self)} entries, not {rows.shape}")
            return np.flatnonzero(rows)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise TypeError(f"rows must be integer row numbers or a boolean mask, not {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row numbers go from 0 to {len(self) - 1}; got {rows.min()}..{rows.max()}")
        return rows

    def iter_batches(self, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Stream features of `rows` (in the given order, as `load` takes them) in batches, reading
        sorted runs from disk."""
        rows = self._row_numbers(rows)
        for start in range(0, rows.size, batch_size):
            yield self.load(rows[start:start + batch_size])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------- validation
# datasets with one entry per row, and their kinds: integer (i/u), string, float (features only)
_ROW_DATASETS = {"labels": "int", "paths": "str", "splits": "str", "views": "int", "index": "int"}
_OPTIONAL_ROW_DATASETS = {"sizes": "int", "mtimes_ns": "int", "hashes": "str"}
_SKIP_DATASETS = ("skipped_paths", "skipped_reasons")
MAX_INFLATION = 100  # declared rows may take at most this many times the file's bytes (compression)


def not_damaged(path: Path, exc: OSError) -> str:
    """Why HDF5 could not open a file that need not be damaged ("" where it is damaged): no read
    permission, or a file system without locks."""
    text = str(exc)
    if "Permission denied" in text or "errno = 13" in text or not os.access(path, os.R_OK):
        return "permission denied"
    if "unable to lock file" in text.lower() or "file locking" in text.lower():
        return "HDF5 cannot lock it (another process may be writing it, or its file system has no locks)"
    return ""


def open_failure(path: Path, exc: OSError) -> str:
    """The one line for a cache file HDF5 cannot open: a good file this process may not read, or one
    on a file system without locks, must not be called damaged (whose way out is removing it)."""
    text = str(exc)
    why = not_damaged(path, exc)
    if why == "permission denied":
        return f"{path} cannot be read: permission denied; ask for read access to it, or copy it into a cache of your own"
    if why:
        return (f"{path} cannot be opened: HDF5 could not lock it ({text}); another process may be writing "
                f"it, or its file system has no locks: then set HDF5_USE_FILE_LOCKING=FALSE, or copy it to a local disk")
    return damaged_message(path, f"not readable as HDF5: {text}")


def cache_rm_command(entry: Path) -> str:
    """`python cli.py cache rm NAME [--cache-dir ROOT]` for an entry of a cache's features/ folder (a
    file or a .parts folder): the command that removes it, from any working folder."""
    layout = CacheLayout.holding(entry)
    return shlex.join(["python", "cli.py", "cache", "rm", entry.name, *(cache_dir_flags(layout.root) if layout else [])])


def damaged_message(path: Path, problem: str) -> str:
    """The one line for a cache file that is not what this tool writes: what is wrong, and the way out
    (`cache rm` with the cache folder it sits in; a file outside any cache folder, which `cache rm`
    cannot name, the user deletes)."""
    remove = (f"remove it (`{cache_rm_command(path)}`) and extract again" if CacheLayout.holding(path) is not None
              else "delete it (it is in no cache's features/ folder)")
    return (f"{path} is damaged or not a cache file written by this tool ({problem}); {remove}, or copy it again "
            f"from its source")


def _kind_ok(ds: h5py.Dataset, kind: str) -> bool:
    if kind == "str":
        return h5py.check_string_dtype(ds.dtype) is not None
    if kind == "int":
        return ds.dtype.kind in "iu"
    return ds.dtype.kind == "f"


def structure_problem(f: h5py.File, path: Path) -> str:
    """What is wrong with a cache file's attributes, datasets, dtypes and shapes ("" if nothing), from
    metadata alone: no row is read, so a file declaring 10^9 rows is answered at once."""
    a = f.attrs
    if "key" not in a:
        return "its attributes (key, class_names, request, ...) are missing"
    if not a.get("complete", False):
        return "it is marked incomplete, which a finished .h5 never is"
    schema = a.get("schema")
    if schema is not None and decode_attr(schema) != SCHEMA_VERSION:
        return f"schema {decode_attr(schema)!r}, this tool reads schema {SCHEMA_VERSION}"
    names = decode_attr(a.get("class_names"))
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        return "the class_names attribute is not a JSON list of names"
    for attr in ("request", "key_material"):
        if attr in a and not isinstance(decode_attr(a[attr]), dict):
            return f"the {attr} attribute is not a JSON object"
    needed = ["features", *_ROW_DATASETS, *_SKIP_DATASETS]
    for name in needed + [n for n in _OPTIONAL_ROW_DATASETS if n in f]:
        if not isinstance(f.get(name), h5py.Dataset):
            return f"the {name!r} dataset is missing"
    feats = f["features"]
    if feats.ndim not in (2, 3, 4) or not _kind_ok(feats, "float"):
        return f"features are {feats.dtype} of shape {feats.shape}, not floating-point vectors or maps"
    n = int(feats.shape[0])
    for name, kind in {**_ROW_DATASETS, **{k: v for k, v in _OPTIONAL_ROW_DATASETS.items() if k in f}}.items():
        ds = f[name]
        if ds.shape != (n,):
            return f"{name!r} has shape {ds.shape} but there are {n} feature rows"
        if not _kind_ok(ds, kind):
            return f"{name!r} holds {ds.dtype}, not {'integers' if kind == 'int' else 'strings'}"
    a_len, b_len = (f[name].shape for name in _SKIP_DATASETS)
    if len(a_len) != 1 or a_len != b_len or not all(_kind_ok(f[x], "str") for x in _SKIP_DATASETS):
        return "the skipped-image lists disagree"
    declared = feats.size * feats.dtype.itemsize
    size = path.stat().st_size
    if declared > MAX_INFLATION * max(size, 1) and declared > 2**20:
        return (f"its features declare {n:,} rows ({declared / 1e9:,.1f} GB) but the file holds "
                f"{size / 1e6:,.1f} MB")
    return ""


def content_problem(labels: np.ndarray, views: np.ndarray, index: np.ndarray, n_classes: int) -> str:
    """What is wrong with the per-row values ("" if nothing): labels index class_names (-1 unlabelled)."""
    if labels.size and (labels.min() < -1 or labels.max() >= n_classes):
        return f"labels run from {int(labels.min())} to {int(labels.max())} but there are {n_classes} class names"
    if views.size and views.min() < 0:
        return "a view number is negative"
    if index.size and index.min() < 0:
        return "an image index is negative"
    return ""


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute as written: JSON lists and objects parsed, bytes decoded, NumPy scalars as Python."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
