"""Stage 2 orchestration: split a cache into train/val/test rows, fit a head, evaluate, record a run.

Training uses split 'train' (plus its augmented views, when the cache has them and
`use_augmented`); validation and test use clean views only. Without a 'val' split, a stratified
share of the clean training *images* is held out, and every view of a held-out image (matched by
the `index` dataset) is kept out of training, so augmented copies never leak into validation.
"""

from __future__ import annotations

import csv
import io
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.atomic import write_text_atomic
from pipeline.errors import DataWarning, UserError
from pipeline.features.store import FeatureFile, cache_rm_command
from pipeline.heads.base import FeatureSource, Head, fit_meta
from pipeline.heads.folds import stratified_holdout
from pipeline.layout import CacheLayout
from pipeline.sheets import csv_text
from pipeline.tracking.metrics import classification_report
from pipeline.tracking.plots import plot_run
from pipeline.tracking.runs import Registry, Run


SPLIT_FILE = "split.csv"  # in a fit-head run's folder: path,split of every image it trained, validated and tested on


@dataclass
class SplitRows:
    """Row numbers of a cache for training, validation and test, and where validation came from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str  # "val split" | "holdout"
    n_train_images: int
    n_augmented_rows: int

    def summary(self) -> dict[str, Any]:
        return {"train_rows": int(self.train.size), "train_images": self.n_train_images,
                "augmented_rows": self.n_augmented_rows, "val_images": int(self.val.size),
                "test_images": int(self.test.size), "val_source": self.val_source}


def split_rows(ff: FeatureFile, val_fraction: float = 0.2, seed: int = 0, use_augmented: bool = True) -> SplitRows:
    """Choose the train/val/test rows of a labelled cache (see the module docstring)."""
    labelled = ff.labels >= 0
    if not labelled.any():
        raise UserError(f"{ff.path.name} has no labels (every image is unlabelled); "
                        "fit-head needs a labelled data set, e.g. one sub-folder per class")
    clean = ff.views == 0
    train_mask = (ff.splits == "train") & labelled
    if not (train_mask & clean).any():
        raise UserError(f"{ff.path.name} has no labelled images in the 'train' split, so there is nothing to train on")
    val_clean = np.flatnonzero((ff.splits == "val") & labelled & clean)
    if val_clean.size:
        val, source, held = val_clean, "val split", np.zeros(0, ff.index.dtype)
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"the cache has no 'val' split and a val fraction of {val_fraction} holds out nothing; "
                            "give --val-fraction between 0 and 1")
        val, held = _holdout(ff, np.flatnonzero(train_mask & clean), val_fraction, seed)
        source = "holdout"
    views_ok = np.ones_like(clean) if use_augmented else clean
    train = np.flatnonzero(train_mask & views_ok & ~np.isin(ff.index, held))
    classes = np.unique(ff.labels[train])
    if classes.size < 2:
        name = ff.class_names[classes[0]] if ff.class_names and classes.size else "one class"
        if source == "holdout" and np.unique(ff.labels[train_mask]).size >= 2:
            raise UserError(f"holding out {val_fraction:g} of the training images as val (--val-fraction) leaves "
                            f"only {name!r} images to train on; give a smaller --val-fraction or add a 'val' split")
        raise UserError(f"fit-head needs at least two classes, but every training image is {name!r}")
    untrained = [int(c) for c in np.unique(ff.labels[val]) if c not in set(classes.tolist())]
    if untrained:
        names = ", ".join(repr(ff.class_names[c]) if ff.class_names else str(c) for c in untrained[:5])
        warnings.warn(f"{len(untrained)} class(es) have val images but no training image ({names}"
                      f"{', ...' if len(untrained) > 5 else ''}): the head can never predict them; add training "
                      f"images of them" + (" or give a smaller --val-fraction" if source == "holdout" else ""),
                      DataWarning, stacklevel=1)  # one line however many times the split is made
    absent = sorted(set(range(len(ff.class_names or []))) - set(np.unique(ff.labels[labelled]).tolist()))
    if absent:  # listed, but every image of it was skipped at extraction (unreadable files)
        names = ", ".join(repr(ff.class_names[c]) for c in absent[:5])
        warnings.warn(f"{len(absent)} class(es) have no image in the cache ({names}{', ...' if len(absent) > 5 else ''}):"
                      f" their files were skipped at extraction, or the data lists none (`python cli.py cache info "
                      f"{shlex.quote(str(ff.path))}` lists the skipped ones); the head can never predict them",
                      DataWarning, stacklevel=1)
    test = np.flatnonzero((ff.splits == "test") & labelled & clean)
    return SplitRows(train=train, val=val, test=test, val_source=source,
                     n_train_images=int(np.unique(ff.index[train]).size),
                     n_augmented_rows=int((ff.views[train] > 0).sum()))


def recorded_split(run_dir: Path) -> dict[str, set[str]] | None:
    """The image files of each split a run recorded in its split.csv ({'train': {...}, 'val': ..., 'test': ...}):
    a fit-head run's, or a fine-tune's (its head's images). None for a run made before runs recorded it, and, with
    one DataWarning naming the fault, for a damaged file (callers then recompute the split or say it is unknown)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    out: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
        problem = _split_problem(rows, out)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problem = f"unreadable: {exc}"
    if problem is None:
        return out
    warnings.warn(f"{path} is damaged ({problem}); it records which images run {Path(run_dir).name}'s head trained, "
                  f"validated and tested on, and is not used: the split is worked out again from the run's cache file "
                  f"where that is still there (fit-head again for a new record)", DataWarning, stacklevel=2)
    return None


def _split_problem(rows: list[list[str]], out: dict[str, set[str]]) -> str | None:
    """Fill `out` from split.csv's rows; what is wrong with them (the first fault), or None."""
    if not rows or rows[0] != ["path", "split"]:
        return "its first line is not 'path,split'" if rows else "it is empty"
    seen: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row:  # a blank line (an editor's last newline)
            continue
        if len(row) != 2 or row[1] not in out:
            return f"line {n} is not a path and one of train, val, test: {','.join(row)[:80]!r}"
        if seen.setdefault(row[0], row[1]) != row[1]:
            return f"{row[0]} is listed in both {seen[row[0]]} and {row[1]}"
        out[row[1]].add(row[0])
    return None if out["train"] else "it lists no training image"


def recomputed_split(ff: FeatureFile, config: Mapping[str, Any]) -> dict[str, set[str]] | None:
    """The image files a fit-head run with this config (val fraction, seed) trained, validated and tested on
    in cache `ff` (clean views: the rows its split.csv would list), for runs made before split.csv; None where
    the cache cannot be split so."""
    try:
        rows = split_rows(ff, float(config.get("val_fraction", 0.2)), int(config.get("seed", 0)), use_augmented=False)
    except UserError:
        return None
    parts: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for path, name in split_table(ff, rows):
        parts[name].add(path)
    return parts


def run_split(run_dir: Path, config: Mapping[str, Any], ff: FeatureFile) -> dict[str, set[str]] | None:
    """The image files a fit-head run trained, validated and tested on: its split.csv, or for a run made before
    runs recorded it (or whose file is damaged), recomputed from its cache file `ff`; None where neither works."""
    recorded = recorded_split(run_dir)
    return recorded if recorded is not None else recomputed_split(ff, config)


def check_finite(ff: FeatureFile, batch_rows: int = 8192) -> None:
    """UserError when the cache holds NaN or infinite features, or the same vector for every row
    (all zeros, say): a head would fail or learn nothing."""
    n = len(ff)
    first, varies = None, n < 2
    for start in range(0, n, batch_rows):
        block = np.asarray(ff.features[start:min(n, start + batch_rows)])
        first = block[0] if first is None else first
        varies = varies or bool(np.any(block != first))
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1))[0])
            raise UserError(f"{ff.path.name} holds non-finite features (NaN or inf, first at row {bad}); remove it "
                            f"(`{cache_rm_command(ff.path)}`) and extract again, e.g. with --dtype float32")
    if not varies:
        raise UserError(f"{ff.path.name} holds the same feature vector for every image (e.g. all zeros), so a head "
                        f"cannot learn; remove it (`{cache_rm_command(ff.path)}`) and extract again with "
                        f"trained --weights or --dtype float32")


def _holdout(ff: FeatureFile, clean_rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(val rows, held-out image indices): a stratified share of the clean training images."""
    if clean_rows.size < 2:
        raise UserError("too few training images to hold some out for validation; add a 'val' split or more images")
    val = np.sort(stratified_holdout(clean_rows, ff.labels[clean_rows], fraction, seed)[1])
    return val, np.unique(ff.index[val])


@dataclass
class FitResult:
    """A fitted head, the rows it used, its metrics ('train', 'val', 'test' reports) and timing."""

    head: Head
    split: SplitRows
    metrics: dict[str, Any]
    fit_seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    split_files: list[tuple[str, str]] = field(default_factory=list)  # (image file, split): the run's split.csv

    @property
    def history(self) -> dict[str, list[float]] | None:
        return self.head.training_history()


def fit_head_on_cache(feature_file: FeatureFile, head: Head, val_fraction: float = 0.2, seed: int = 0,
                      use_augmented: bool = True) -> FitResult:
    """Fit `head` on the cache's training rows, then report metrics on train (clean), val and test."""
    ff = feature_file
    split = split_rows(ff, val_fraction, seed, use_augmented)
    t0 = time.perf_counter()
    meta = fit_meta(ff)
    train = (FeatureSource(ff, split.train), ff.labels[split.train])
    if head.uses_validation:  # the dense head watches the val loss (early stopping, curves)
        head.fit(*train, FeatureSource(ff, split.val), ff.labels[split.val], **meta)
    else:
        head.fit(*train, **meta)
    fit_seconds = time.perf_counter() - t0
    head, extras = head.outcome()  # the auto head: what is recorded and saved is the head it chose
    clean_train = split.train[ff.views[split.train] == 0]
    metrics: dict[str, Any] = {"train": evaluate_rows(head, ff, clean_train), "val": evaluate_rows(head, ff, split.val)}
    if split.test.size:
        metrics["test"] = evaluate_rows(head, ff, split.test)
    return FitResult(head=head, split=split, metrics=metrics, fit_seconds=fit_seconds, extras=extras,
                     split_files=split_table(ff, split))


def split_table(ff: FeatureFile, split: SplitRows) -> list[tuple[str, str]]:
    """(image file, split) of the clean images `split` trains, validates and tests on: a run's split.csv."""
    paths = np.asarray(ff.paths, dtype=object)
    clean_train = split.train[ff.views[split.train] == 0]
    return [(str(paths[r]), name) for name, rows in (("train", clean_train), ("val", split.val), ("test", split.test))
            for r in rows]


def write_split(run: Run, table: list[tuple[str, str]]) -> Path:
    """Write a run's split.csv (`split_table`): which images its head trained on, outliving the cache file."""
    path = run.path(SPLIT_FILE)
    write_text_atomic(path, csv_text(table, ("path", "split")))
    return path


def evaluate_rows(head: Head, ff: FeatureFile, rows: np.ndarray) -> dict[str, Any]:
    """Metrics report of `head` on some labelled rows of the cache it was trained for."""
    rows = np.asarray(rows)
    proba = head.predict_proba(FeatureSource(ff, rows)) if rows.size else np.zeros((0, head.n_classes_))
    return classification_report(ff.labels[rows], proba, head.class_names_)


def evaluate_on_cache(head: Head, ff: FeatureFile, split: str | None = "test") -> dict[str, Any]:
    """Check the head fits this cache, then report metrics on the labelled clean rows of `split`
    (None: every split). The cache may hold a subset of the head's classes: its labels are mapped
    to the head's class indices (macro averages cover the classes present)."""
    rows, labels = evaluation_rows(head, ff, split)
    proba = head.predict_proba(FeatureSource(ff, rows))
    return classification_report(labels, proba, head.class_names_)


def evaluation_rows(head: Head, ff: FeatureFile, split: str | None = "test") -> tuple[np.ndarray, np.ndarray]:
    """(the labelled clean rows of `split`, their labels as the head's class indices), after checking
    the head fits this cache (which may hold a subset of its classes)."""
    head.check_matches(ff, class_subset=True)
    rows = ff.rows(split, "clean")
    rows = rows[ff.labels[rows] >= 0]
    if rows.size == 0:
        where = f" in split {split!r}" if split is not None else ""
        raise UserError(f"{ff.path.name} has no labelled images{where}")
    names = list(ff.class_names) or list(head.class_names_)
    to_head = np.asarray([list(head.class_names_).index(c) for c in names], np.int64)
    return rows, to_head[ff.labels[rows]]


def predict_on_cache(head: Head, ff: FeatureFile, rows: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities for rows of a cache (default: every clean row), after checking compatibility."""
    head.check_matches(ff)
    rows = ff.rows(None, "clean") if rows is None else np.asarray(rows)
    return head.predict_proba(FeatureSource(ff, rows))


def save_fit(result: FitResult, run: Run) -> dict[str, Path]:
    """Write the head, metrics.json and plots (curves, confusion matrices, C curve, the val reliability
    diagram calibration_val.png) into the run."""
    head = result.head
    files: dict[str, Path] = {"head": head.save(run.path(head.artifact))}
    if result.split_files:  # which images the head trained on, outliving the cache file (held-out checks)
        files["split"] = write_split(run, result.split_files)
    run.log_metrics({**result.metrics, "split": result.split.summary(), "fit_seconds": round(result.fit_seconds, 3),
                     **head.facts(), **result.extras})
    files.update(plot_run(run.dir, f"{head.kind} head", history=result.history, c_curve=head.c_curve(),
                          reports={part: result.metrics.get(part) for part in ("val", "test")}))
    return files


def run_config(ff: FeatureFile, head: Head, **extra: Any) -> dict[str, Any]:
    """The config.json of a fit-head run: cache, backbone, data, head kind and its parameters."""
    req = ff.request
    data = ff.data or req.get("data") or ff.path.stem
    config = {"cache_file": str(ff.path), "cache_key": ff.key, "backbone": ff.attrs.get("backbone"),
              "data": data, "head": head.kind, "params": head.key_params(), "head_params": head.get_params(),
              "backend": ff.attrs.get("backend"), **extra}  # the features' backend: random weights differ by backend
    if req:  # how the features were made, so the run outlives its cache file (`cache rm`, eviction)
        config["request"] = {**req, **({"data": ff.data} if ff.data else {})}  # the resolved data path: the same key
        if ff.asked_weights is not None:  # a weights file moved since the cache was made: where it is now
            config["request"]["weights"] = ff.asked_weights
    return config


def fit_head_run(feature_file: FeatureFile, head: Head, registry: Registry | None = None,
                 config: Mapping[str, Any] | None = None, val_fraction: float = 0.2, seed: int = 0,
                 use_augmented: bool = True) -> tuple[FitResult, Run]:
    """Fit and evaluate as a recorded 'fit-head' run (default registry: the cache's folder)."""
    ff = feature_file
    registry = registry or Registry(CacheLayout.of(ff.path).root)
    split_rows(ff, val_fraction, seed, use_augmented)  # data that cannot be split fails before a run is recorded
    cfg = run_config(ff, head, val_fraction=val_fraction, seed=seed, use_augmented=use_augmented, **(config or {}))
    run = registry.start("fit-head", cfg)
    with run:
        result = fit_head_on_cache(ff, head, val_fraction=val_fraction, seed=seed, use_augmented=use_augmented)
        if result.head is not head:  # auto: the config names the head that was kept, and the choice
            run.update_config(run_config(ff, result.head, val_fraction=val_fraction, seed=seed,
                                         use_augmented=use_augmented, head_choice=result.extras["head_choice"],
                                         **(config or {})))
        elif result.head.key_params() != cfg["params"]:  # what the fit chose (knn: k and T) for the runs table
            run.update_config({**cfg, "params": result.head.key_params()})
        save_fit(result, run)
    return result, run
