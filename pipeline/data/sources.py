"""Data sources (`--data`): image folders, CSV manifests, `tfds:NAME` and the built-in digits set.

Listing a source (ids, labels, splits, class names, a fingerprint) needs no TensorFlow, so a cache
hit is decided in well under a second. `raw_images()` yields one job per image that decodes and
resizes it to a uint8 RGB square in numpy (`pipeline.data.decode`); the loader runs the jobs.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.data.decode import claimed_format, load_file, resize, to_rgb
from pipeline.data.folders import IMAGE_NAME_SUFFIXES, is_hidden, loose_images, utf8_named, visible_files
from pipeline.errors import DataWarning, UserError
from pipeline.versions import version

SPLITS = ("train", "val", "test")
# Folder names (lower case) that users give splits; one not in --split-names is refused, not taken for a class.
_SPLIT_ALIASES = {"train": "train", "training": "train", "trn": "train",
                  "val": "val", "valid": "val", "validation": "val", "dev": "val",
                  "test": "test", "testing": "test", "tst": "test"}
BUILTIN_DEFAULT = "builtin:digits"
# Column names a manifest header may use (lower case); positional path,label[,split] without a header.
PATH_COLUMNS = ("path", "filename", "file", "image")
LABEL_COLUMNS = ("label", "class", "category")
SPLIT_COLUMNS = ("split",)


@dataclass(frozen=True)
class SplitConfig:
    """How splits are found or made: folder names for train/val/test, and the seeded fallback split."""

    folder_names: tuple[str, str, str] = SPLITS
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    # Manifest rows may name files outside the manifest's folder (--allow-outside-paths). Not part of
    # the cache key: it only decides whether such a listing is refused, and the listing is hashed.
    allow_outside_paths: bool = False

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
    existing ones between splits (the lesson of retrain.py), with two exceptions for small classes:
    a class none of whose images hash into train gets its highest-hash image as a training image (a
    class with no training image cannot be learnt), and each class with two or more images keeps at
    least one validation image when a validation fraction is asked for (its lowest-hash training image).
    """
    u = np.array([int.from_bytes(hashlib.sha1(f"{cfg.seed}:{k}".encode()).digest()[:8], "big") / 2**64
                  for k in keys])
    out = np.where(u < cfg.test_fraction, "test",
                   np.where(u < cfg.test_fraction + cfg.val_fraction, "val", "train")).astype(object)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if not np.any(out[members] == "train"):
            out[members[np.argmax(u[members])]] = "train"
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


class Source:
    """A data set: `spec` names it; `listing()` lists it cheaply; `raw_images()` reads it."""

    spec: str

    split: SplitConfig

    def listing(self) -> Listing:
        """The listing, computed once per source object; refuses a class that has val/test images
        but no training images (a misspelt folder or label)."""
        if getattr(self, "_listing", None) is None:
            listing = self._list()
            check_train_classes(listing, self._where)
            self._listing = listing
        return self._listing

    def _list(self) -> Listing:
        raise NotImplementedError

    def _where(self, listing: Listing, rows: np.ndarray) -> str:
        """Where some rows of the listing come from, for messages (folder, manifest lines)."""
        return f"{self.spec}, split {listing.splits[int(rows[0])]}"

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


def check_train_classes(listing: Listing, where=None) -> None:
    """UserError when a class has images in val/test but none in train (if there is a train split);
    rows whose split was assigned by hash (`extra['split_given']` False) are not checked."""
    if listing.split_origin.startswith("hash") or not len(listing):
        return
    splits = np.asarray(listing.splits, dtype=object)
    labels = np.asarray(listing.labels)
    train = splits == "train"
    if not train.any():
        return
    given = np.asarray(listing.extra.get("split_given", np.ones(len(listing), bool)), bool)
    seen = set(labels[train].tolist())
    orphan = ~train & given & (labels >= 0) & ~np.isin(labels, list(seen))
    if orphan.any():
        c = int(labels[orphan][0])
        rows = np.flatnonzero(orphan & (labels == c))
        name = listing.class_names[c] if c < len(listing.class_names) else str(c)
        place = where(listing, rows) if where else f"split {splits[rows[0]]}"
        others = sorted({listing.class_names[int(k)] for k in labels[orphan]} - {name})
        more = f" (also: {', '.join(map(repr, others))})" if others else ""
        raise UserError(f"class {name!r} has {splits[rows[0]]} images ({place}) but no training images{more}; "
                        f"check the name for a typo or add training images of that class")


CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a line break, tab or other control character
CONTROL_NOTE = ("holds a line break, tab or other control character, which a class name cannot carry (labels.txt "
                "holds one per line, predict prints them tab-separated); rename the class")


def class_name(folder: Path) -> str:
    """A class folder's class name: its name without spaces at the ends, as a manifest's labels are read
    (so cleaned.csv and exported labels name the same classes); UserError for a name of spaces alone."""
    name = utf8_named(folder).name.strip()
    if not name:
        raise UserError(f"class folder {str(folder)!r} has a name of spaces alone; rename it to the class's name")
    if CONTROL.search(name):
        raise UserError(f"class folder {str(folder)!r} has a name that {CONTROL_NOTE}")
    return name


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
        paths = listing.paths or []
        for i in indices:
            yield functools.partial(load_file, paths[i], size, method)


class FolderSource(FileSource):
    """An image folder with one subfolder per class, optionally under train/val/test folders."""

    def __init__(self, root: str | os.PathLike, split: SplitConfig = SplitConfig()) -> None:
        self.root = Path(os.path.realpath(Path(root).expanduser()))  # one key however the path is spelt
        self.split = split
        self.spec = str(self.root)
        if not self.root.is_dir():
            raise UserError(f"data folder not found: {self.root} (give an image folder, a CSV manifest, "
                            f"tfds:NAME or {BUILTIN_DEFAULT})")

    def _check_split_names(self, subdirs: list[Path], split_dirs: list[Path]) -> None:
        """Folders that look like splits but are not named by --split-names would silently become classes
        (or be ignored beside real split folders): refuse them, saying which --split-names reads them."""
        lookalike = [d for d in subdirs if d not in split_dirs and d.name.lower() in _SPLIT_ALIASES]
        if lookalike and tuple(self.split.folder_names) == SPLITS:  # names given on purpose are taken as given
            names = dict(zip(SPLITS, self.split.folder_names))
            for d in subdirs:
                if d.name.lower() in _SPLIT_ALIASES:
                    names[_SPLIT_ALIASES[d.name.lower()]] = d.name
            raise UserError(f"{self.root} has folder(s) {', '.join(d.name for d in lookalike)} that look like "
                            f"splits but --split-names is {','.join(self.split.folder_names)}; pass --split-names "
                            f"{','.join(names[r] for r in SPLITS)} (the train,val,test folder names; any other names if these "
                            f"are classes)")
        others = [d.name for d in subdirs if d not in split_dirs]
        if split_dirs and others:
            warnings.warn(f"{self.root}: ignoring folder(s) {', '.join(others)}: only the split folders "
                          f"{', '.join(self.split.folder_names)} are read", DataWarning, stacklevel=3)

    def _list(self) -> Listing:
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not is_hidden(p.name))
        role_of = {name: role for name, role in zip(self.split.folder_names, SPLITS)}
        split_dirs = [d for d in subdirs if d.name in role_of]
        self._check_split_names(subdirs, split_dirs)
        if split_dirs:
            groups = [(role_of[d.name], d) for d in split_dirs]
        else:
            groups = [(None, self.root)]
        per_class: list[tuple[str | None, str, Path]] = []
        for role, base in ([(None, self.root)] if split_dirs else []) + groups:
            loose = loose_images(base)
            if loose:
                warnings.warn(f"{len(loose)} image file(s) directly in {base} are in no class folder and are left "
                              f"out ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); move them into "
                              f"one", DataWarning, stacklevel=3)
        for role, base in groups:
            classes = sorted(p for p in base.iterdir() if p.is_dir() and not is_hidden(p.name))
            if not classes:
                raise UserError(f"{base} has no class subfolders; expected one subfolder per class "
                                f"(e.g. {base}/cats/*.jpg)")
            named: dict[str, Path] = {}
            for folder in classes:
                real = Path(os.path.realpath(folder))
                if self.root == real or real in self.root.parents:
                    raise UserError(f"class folder {folder} links to {real}, which holds the data folder itself, so "
                                    f"every image would be in it too; remove the link")
                name = class_name(folder)
                if named.setdefault(name, folder) != folder:
                    raise UserError(f"class folders {named[name].name!r} and {folder.name!r} in {base} differ only in "
                                    f"spaces at their ends, which class names leave out (as a manifest's labels do); "
                                    f"rename one")
                per_class.append((role, name, folder))
        class_names = sorted({name for _, name, _ in per_class})
        index = {n: i for i, n in enumerate(class_names)}
        paths, labels, splits, rel = [], [], [], []
        for role, name, folder in per_class:
            files = sorted(visible_files(folder))
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

    def _where(self, listing: Listing, rows: np.ndarray) -> str:
        role = listing.splits[int(rows[0])]
        base = self.root / self.split.folder_names[SPLITS.index(role)]
        folder = base / Path(listing.paths[int(rows[0])]).relative_to(base).parts[0]  # as spelt on disk
        return f"folder {folder}"


class CsvSource(FileSource):
    """A CSV/TSV manifest of `path,label[,split]` rows (or a header naming those columns in any
    order); relative paths are relative to the manifest's folder, which the files must lie in
    unless `split.allow_outside_paths`."""

    def __init__(self, path: str | os.PathLike, split: SplitConfig = SplitConfig()) -> None:
        self.path = Path(os.path.realpath(Path(path).expanduser()))
        self.split = split
        self.spec = str(self.path)
        if not self.path.is_file():
            raise UserError(f"manifest not found: {path}")

    def _text(self) -> str:
        """The manifest as text: UTF-8 (a BOM is dropped) or UTF-16 with a BOM; else a one-line refusal."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read manifest {self.path}: {exc.strerror or exc}") from None
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            encoding = "utf-16"
        else:
            encoding = "utf-8-sig"
            if b"\x00" in raw:
                raise UserError(f"{self.path} is not a text manifest (it holds NUL bytes); give a CSV of "
                                f"path,label[,split] rows or an image folder")
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise UserError(f"{self.path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); re-save "
                            f"it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or iconv -f latin1 -t utf-8)") from None

    def _delimiter(self, text: str) -> str:
        if self.path.suffix.lower() == ".tsv":
            return "\t"
        lines = [l for l in text.splitlines()[:50] if l.strip()]
        try:
            return csv.Sniffer().sniff("\n".join(lines), delimiters=",;\t|").delimiter
        except csv.Error:  # rows of uneven length: the candidate found on most lines (',' on a tie)
            counts = {d: sum(d in l for l in lines) for d in ",;\t|"}
            return max(counts, key=lambda d: (counts[d], d == ","))

    def _rows(self) -> list[tuple[int, list[str]]]:
        """(line number, stripped cells) of every non-blank row."""
        text = self._text()
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self._delimiter(text))
        rows, line = [], 1
        self._padded: dict[int, list[str]] = {}  # a row's cells before stripping, where one had spaces around it
        try:
            for r in reader:
                if r and any(c.strip() for c in r):
                    rows.append((line, [c.strip() for c in r]))
                    if rows[-1][1] != r:
                        self._padded[line] = r
                line = reader.line_num + 1
        except csv.Error as exc:
            raise UserError(f"{self.path} line {reader.line_num}: not a readable CSV row ({exc}); expected "
                            f"path,label[,split]") from None
        return rows

    def _columns(self, rows: list[tuple[int, list[str]]]) -> tuple[dict[str, int], list[tuple[int, list[str]]], bool]:
        """Column positions {'path', 'label', 'split'} from a header (then dropped) or by position,
        the data rows, and whether there was a header."""
        accepted = (f"path column: {'/'.join(PATH_COLUMNS)}; label column: {'/'.join(LABEL_COLUMNS)}; "
                    f"optional: split")
        first = [c.lower() for c in rows[0][1]]
        role_of = {**{n: "path" for n in PATH_COLUMNS}, **{n: "label" for n in LABEL_COLUMNS},
                   **{n: "split" for n in SPLIT_COLUMNS}}
        known = [c in role_of for c in first]
        if (any(known) and not _pathy(rows[0][1][0])) or _looks_like_header(rows):
            unknown = [c for c, k in zip(rows[0][1], known) if not k]
            if unknown:
                raise UserError(f"{self.path} line {rows[0][0]}: unknown column name(s) {', '.join(map(repr, unknown))} "
                                f"in the header; accepted names are {accepted} (or no header: path,label[,split])")
            cols: dict[str, int] = {}
            for i, c in enumerate(first):
                if role_of[c] in cols:
                    raise UserError(f"{self.path} line {rows[0][0]}: the header has two {role_of[c]} columns")
                cols[role_of[c]] = i
            if "path" not in cols or "label" not in cols:
                missing = "path" if "path" not in cols else "label"
                raise UserError(f"{self.path}: the header has no {missing} column; accepted names are {accepted}")
            return cols, rows[1:], True
        return {"path": 0, "label": 1, "split": 2}, rows, False

    def _list(self) -> Listing:
        rows = self._rows()
        if not rows:
            raise UserError(f"{self.path} lists no images; expected rows of path,label[,split]")
        cols, rows, header = self._columns(rows)
        if not rows:
            raise UserError(f"{self.path} has a header but lists no images")
        self._check_swapped(rows, cols, self.path.parent)  # before the rows' checks, which it explains
        width = len(cols) if header else None
        base = self.path.parent
        entries: dict[str, tuple[int, str, str | None]] = {}
        order, empty, outside, dup_lines = [], [], [], []
        for line, r in rows:
            if width is not None and len(r) != width or width is None and not 2 <= len(r) <= 3:
                want = f"{width} fields as in the header" if width is not None else "path,label[,split]"
                raise UserError(f"{self.path} line {line}: expected {want}, got {len(r)} field(s)")
            raw_path, label = r[cols["path"]], r[cols["label"]]
            s = r[cols["split"]].lower() if "split" in cols and cols["split"] < len(r) else ""
            if not raw_path:
                raise UserError(f"{self.path} line {line}: the path is empty")
            if not label:
                empty.append(line)
                continue
            if CONTROL.search(label):
                raise UserError(f"{self.path} line {line}: the label {label!r} {CONTROL_NOTE}")
            if s and s not in SPLITS:
                raise UserError(f"{self.path} line {line}: split must be train, val or test, not {s!r} "
                                f"(--split-names renames split folders only; rename the manifest's splits)")
            p = Path(os.path.expanduser(raw_path))
            full = os.path.normpath(p if p.is_absolute() else base / p)
            if line in self._padded:  # "a.jpg, cat" is a.jpg; a file whose name ends in a space keeps it
                full, raw_path = _padded_path(full, self._padded[line][cols["path"]], base, raw_path)
            if not self.split.allow_outside_paths and os.path.commonpath([full, str(base)]) != str(base):
                outside.append((line, raw_path))
            split = s or None
            if full in entries:
                first_line, first_label, first_split = entries[full]
                if (first_label, first_split) != (label, split):
                    raise UserError(f"{self.path} lines {first_line} and {line} list {raw_path} twice with different "
                                    f"labels or splits ({first_label}/{first_split or '-'} vs {label}/{split or '-'}); "
                                    f"keep one of them")
                dup_lines.append((line, first_line))
                continue
            entries[full] = (line, label, split)
            order.append(full)
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            raise UserError(f"{self.path}: empty label on line(s) {shown}; give every image a label or remove "
                            f"those rows")
        if outside:
            line, raw = outside[0]
            raise UserError(f"{self.path} line {line}: {raw} lies outside the manifest's folder {base} "
                            f"({len(outside)} such row(s)); move the files or the manifest, or pass "
                            f"--allow-outside-paths if that is intended")
        if dup_lines:
            shown = ", ".join(f"{a} (= line {b})" for a, b in dup_lines[:5]) + (", ..." if len(dup_lines) > 5 else "")
            warnings.warn(f"{self.path}: {len(dup_lines)} duplicate row(s) kept once: line(s) {shown}",
                          DataWarning, stacklevel=2)
        paths = order
        names = [entries[f][1] for f in order]
        lines = [entries[f][0] for f in order]
        splits = [entries[f][2] for f in order]
        by_fold: dict[str, set[str]] = {}
        for n in names:
            by_fold.setdefault(n.casefold(), set()).add(n)
        for spellings in by_fold.values():
            if len(spellings) > 1:
                shown = " and ".join(repr(x) for x in sorted(spellings))
                warnings.warn(f"{self.path}: labels {shown} differ only in case and are kept as separate classes; "
                              f"use one spelling if they are the same class", DataWarning, stacklevel=2)
        class_names = sorted(set(names))
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.asarray([index[c] for c in names], np.int32)
        origin = "manifest"
        given = [sp is not None for sp in splits]
        if not all(given):
            hashed = hash_split(paths, labels, self.split)
            splits = [sp or h for sp, h in zip(splits, hashed)]
            origin = f"manifest+hash(seed={self.split.seed})"
        return Listing(ids=paths, labels=labels, splits=splits, class_names=class_names, paths=paths,
                       split_origin=origin, extra={"lines": lines, "split_given": given})

    def _check_swapped(self, rows: list[tuple[int, list[str]]], cols: dict[str, int], base: Path) -> None:
        """Refuse a manifest whose label column holds file paths and whose path column holds names."""
        sample = rows[:200]

        def exists(v: str) -> bool:
            p = Path(os.path.expanduser(v))
            return bool(v) and os.path.isfile(p if p.is_absolute() else base / p)

        path_ok = sum(exists(r[cols["path"]]) for _, r in sample)
        label_files = sum(exists(r[cols["label"]]) or Path(r[cols["label"]]).suffix.lower() in IMAGE_NAME_SUFFIXES
                          for _, r in sample if cols["label"] < len(r))
        if path_ok == 0 and label_files >= max(1, len(sample) // 2):
            line, r = sample[0]
            raise UserError(f"{self.path}: the columns look swapped: the label column holds file paths (line {line}: "
                            f"{r[cols['label']]!r}) and the path column holds {r[cols['path']]!r}; put the path "
                            f"first (path,label[,split]) or add a header row naming the columns")

    def _where(self, listing: Listing, rows: np.ndarray) -> str:
        lines = listing.extra.get("lines") or []
        shown = [str(lines[int(i)]) for i in rows[:5] if int(i) < len(lines)]
        return f"{self.path} line(s) {', '.join(shown)}{', ...' if len(rows) > 5 else ''}"


def _pathy(v: str) -> bool:
    """Whether a cell looks like a file path (a folder separator or a suffix)."""
    return "/" in v or "\\" in v or Path(v).suffix != ""


def _padded_path(full: str, cell: str, base: Path, raw_path: str) -> tuple[str, str]:
    """(full path, path as written) of a manifest's path cell that had spaces around it: stripped,
    unless only the file named with them exists (the audit's cleaned.csv lists such files verbatim)."""
    p = Path(os.path.expanduser(cell))
    padded = os.path.normpath(p if p.is_absolute() else base / p)
    if padded != full and os.path.lexists(padded) and not os.path.lexists(full):
        return padded, cell
    return full, raw_path


def _looks_like_header(rows: list[tuple[int, list[str]]]) -> bool:
    """A first row of names (no path-like first cell) above rows whose first cell looks like a file."""
    if len(rows) < 2:
        return False
    return not _pathy(rows[0][1][0]) and all(_pathy(r[0]) for _, r in rows[1:6])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as RGB uint8 images and their labels, loaded once per process."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - scikit-learn (1 s): not on a cache hit
    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), d.target.astype(np.int32)


def builtin_image(image_id: str) -> np.ndarray | None:
    """The RGB pixels of a built-in image by its listed id ('builtin:digits/0832'), to show it (the
    audit's thumbnails); None for any other id."""
    prefix = BUILTIN_DEFAULT + "/"
    number = image_id[len(prefix):] if image_id.startswith(prefix) else ""
    pixels = _digits()[0] if number.isdigit() else None
    return pixels[int(number)] if pixels is not None and int(number) < len(pixels) else None


class DigitsSource(Source):
    """Built-in set: scikit-learn's 8x8 handwritten digits as RGB images; ships with sklearn, no network."""

    spec = BUILTIN_DEFAULT

    def __init__(self, split: SplitConfig = SplitConfig()) -> None:
        self.split = split

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _digits()

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
        return f"sklearn-digits:{version('scikit-learn')}"

    def raw_images(self, listing: Listing, indices: Sequence[int], size: int, method: str
                   ) -> Iterator[Callable[[], np.ndarray]]:
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
            import tensorflow_datasets as tfds  # noqa: F401, PLC0415 - optional extra .[tfds] (imports TensorFlow)
        except ImportError:
            raise UserError("tfds: sources need tensorflow-datasets: pip install tensorflow-datasets "
                            "(or pip install -e .[tfds])") from None

    def _builder(self):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional extra .[tfds] (imports TensorFlow)

        try:
            builder = tfds.builder(self.name)
        except Exception as exc:  # noqa: BLE001 - tfds raises its own not-found errors
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


NAMED_SOURCES = ("builtin", "tfds")  # `--data KIND:NAME`: images by name, not files


def named_source(data: str) -> str | None:
    """'builtin' or 'tfds' where a `--data` value names a data set by prefix (images a manifest cannot
    load), else None (a folder or a manifest of files): the one owner of those prefixes."""
    return next((kind for kind in NAMED_SOURCES if data.startswith(f"{kind}:")), None)


def names_files(data: str) -> bool:
    """Whether a `--data` value lists image files (a folder or a manifest), not built-in or tfds: images
    (whose names a manifest cannot load)."""
    return named_source(data) is None


def open_source(data: str, split: SplitConfig = SplitConfig()) -> Source:
    """Pick the source for a `--data` value: builtin:NAME, tfds:NAME, a CSV/TSV manifest, or a folder."""
    if not data or not data.strip():
        raise UserError(f"--data is empty; give an image folder, a CSV manifest, tfds:NAME or {BUILTIN_DEFAULT}")
    kind = named_source(data)
    if kind == "builtin":
        if data != BUILTIN_DEFAULT:
            raise UserError(f"unknown built-in data set {data!r}; the built-in one is {BUILTIN_DEFAULT}")
        return DigitsSource(split)
    if kind == "tfds":
        return TfdsSource(data[len("tfds:"):], split)
    p = Path(os.path.expanduser(data))
    if p.is_file() and _is_image_file(p):
        raise UserError(f"--data {data} is a single image; give a folder with one subfolder per class, or a CSV "
                        f"manifest of path,label rows (to classify one image, use `predict`)")
    if p.suffix.lower() in (".csv", ".tsv") or p.is_file():
        return CsvSource(p, split)
    if not p.exists():
        raise UserError(f"data path not found: {data} (give an image folder, a CSV manifest, tfds:NAME "
                        f"or {BUILTIN_DEFAULT})")
    return FolderSource(p, split)


def _is_image_file(path: Path) -> bool:
    """By suffix or by the first bytes (JPEG, PNG, GIF, BMP, TIFF, WebP)."""
    if path.suffix.lower() in IMAGE_NAME_SUFFIXES:
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return claimed_format(head) is not None
