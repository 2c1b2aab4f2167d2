"""Use a recorded run on new images: `evaluate` (labelled data) and `predict` (any image files).

Raw images go through the same decode, resize, preprocessing and backbone as the cache the head
was trained on (rebuilt from the cache file's stored request), then through the head.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import backbones as bb
from pipeline.atomic import atomic_path
from pipeline.backbones import model as backbone_model
from pipeline.backend import check_recorded, require
from pipeline.data.sources import open_source
from pipeline.errors import DataWarning, UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, is_concat, part_requests
from pipeline.features.store import FeatureFile
from pipeline.heads.files import load_keras_file
from pipeline.heads.registry import load_head
from pipeline.inference.embed import OnBatch, run_model
from pipeline.layout import FINETUNED_MODEL, CacheLayout
from pipeline.sheets import csv_line
from pipeline.tracking.metrics import classification_report
from pipeline.tracking.runs import Registry, RunRecord


@dataclass
class LoadedRun:
    """A run's record plus what is needed to apply it: the stored extract request and a predictor."""

    record: RunRecord
    request: ExtractRequest
    class_names: list[str]
    head: Any = None  # stage-2 head (LogisticHead / DenseHead)
    model_path: Path | None = None  # stage-3 whole model (.keras), raw images in


def load_run(cache_dir: Path, run_id: str, trust_pickle: bool = False, backbone: bool = True) -> LoadedRun:
    """Find a fit-head or finetune run and load its head or model; one-line errors otherwise.
    `trust_pickle` allows an old pickled head.joblib (unpickling can run code); `backbone`: the caller
    builds the run's backbone, so its weights file must be the one the head was fitted on
    (`check_head_weights`; an audit of the run's own cache reads only the cache)."""
    record = Registry(cache_dir).get(run_id)
    if record.damaged:
        raise UserError(f"run {record.id} is damaged: {'; '.join(record.damaged)} in {record.dir}; run the command "
                        f"that made it again, or remove it (python cli.py runs rm {record.id})")
    if record.stage not in ("fit-head", "finetune"):
        raise UserError(f"run {record.id} was made by {record.stage}; --run takes a fit-head or finetune run, whose head "
                        f"or model evaluate, predict and audit use (`python cli.py runs --stage fit-head` lists them)")
    if record.status != "ok":
        raise UserError(f"run {record.id} did not finish (status {record.status}); pick a finished run")
    request = _request_of(record)
    check_recorded(record.config, f"run {record.id}")
    if record.stage == "finetune":
        model = record.dir / FINETUNED_MODEL
        if not model.exists():
            raise UserError(f"run {record.id} has no {FINETUNED_MODEL}; it may have been cleaned up")
        names = record.config.get("class_names") or []
        return LoadedRun(record, request, list(names), model_path=model)
    head = load_head(record.dir, trust_pickle=trust_pickle)
    run = LoadedRun(record, request, list(head.class_names_), head=head)
    if backbone:
        check_head_weights(head, request, f"run {record.id}")
    return run


def check_head_weights(head: Any, request: ExtractRequest, where: str) -> None:
    """One line, before a head's backbone is built, where the weights file `request` names is gone or is
    not the file the head was fitted on (same path, other content): the head would read other features
    and answer with confidence. ImageNet and random weights have no file that can change."""
    if is_concat(request.backbone):
        return
    recorded = str(head.feature_info_.get("weights_id") or "")
    bb.check_weights_file(bb.get(request.backbone), request.weights, recorded, where)


def _request_of(record: RunRecord) -> ExtractRequest:
    req = record.config.get("request")
    if req is None:
        cache_file = record.config.get("cache_file")
        if not cache_file or not Path(cache_file).exists():
            raise UserError(f"run {record.id}: its cache file {cache_file} is gone, so the backbone settings are "
                            f"unknown; re-run fit-head")
        with FeatureFile(cache_file) as ff:
            req = ff.request
    try:
        return ExtractRequest.from_json(req if isinstance(req, dict) else json.loads(req))
    except (UserError, ValueError, TypeError) as exc:
        raise UserError(f"run {record.id}: {record.dir / 'config.json'} holds an extraction request this version "
                        f"cannot read ({exc}); re-run fit-head") from None


@dataclass
class Evaluated:
    """What `evaluate_run` scored: the report, and per image its path, label (the run's class index),
    probabilities and, with `explain`, its nearest training images [(path, similarity), ...]."""

    report: dict[str, Any]
    paths: list[str]
    labels: np.ndarray
    proba: np.ndarray
    neighbours: list[list[tuple[str, float]]] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files that could not be read


def check_explain(run: LoadedRun, explain: int) -> None:
    """UserError, before any work, when `--explain` asks a run whose head keeps no training images."""
    if explain and run.head is None:
        raise UserError(f"run {run.record.id} is a fine-tuned model; --explain needs a fit-head run with a knn head "
                        f"(fit-head --head knn)")
    if explain and not run.head.explains:
        run.head.neighbours(np.zeros((0, *run.head.feature_shape_), np.float32), 1)  # raises its one-line reason


def explained(head: Any, features: Any, k: int) -> list[list[tuple[str, float]]]:
    """Each row's k nearest training images as [(path, similarity), ...], most similar first."""
    nb = head.neighbours(features, k)
    names = head.neighbour_paths(nb)
    return [[(p, float(s)) for p, s in zip(row, sims)] for row, sims in zip(names, nb.similarity)]


def evaluate_run(run: LoadedRun, data: str, cache_dir: Path, split: str | None = None,
                 batch_size: int = 32, progress: bool = True, explain: int = 0) -> Evaluated:
    """Metrics of a run on a labelled data set (features cached like any extraction), with the
    per-image predictions (and, with `explain`, each image's nearest training images)."""
    check_explain(run, explain)
    paths, labels, names = _labelled_images(run, data, split)  # classes checked before any extraction
    if run.head is None:
        proba, kept, skipped = predict_paths(run, paths, batch_size)
        report = classification_report(labels[kept], proba, run.class_names)
        warn_own_training_images(run, [paths[i] for i in kept])
        return Evaluated(report, [paths[i] for i in kept], labels[kept], proba, skipped=list(skipped))
    request = replace(run.request, data=data, augment_copies=0)
    result = extract(request, RunOptions(cache_dir=cache_dir, batch_size=batch_size, progress=progress,
                                         warn_moved=False))  # evaluate scores any split; own images: below
    from pipeline.heads.base import FeatureSource  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.heads.training import evaluation_rows  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    with FeatureFile(result.path) as ff:
        rows, row_labels = evaluation_rows(run.head, ff, split)
        source = FeatureSource(ff, rows)
        proba = run.head.predict_proba(source)
        report = classification_report(row_labels, proba, run.head.class_names_)
        near = explained(run.head, source, explain) if explain else None
        wanted = set(paths)  # the split's files (every file of the data where the source lists none)
        skipped = [(path, why) for path, why in ff.skipped if not wanted or path in wanted]
        scored = [ff.paths[r] for r in rows]
    warn_own_training_images(run, scored)
    return Evaluated(report, scored, row_labels, proba, near, skipped)


def training_split(record: RunRecord, among: set[str] | None = None) -> dict[str, set[str]] | None:
    """The image files a run's head trained, validated and tested on ({'train': ..., 'val': ..., 'test': ...}):
    from the run's split.csv (a fine-tune's lists its parent's images), else its parent's, else, for a fit-head
    run made before runs recorded it, recomputed from its cache file, val fraction and seed (`recomputed_split`);
    empty where none of `among` is in that cache (the split is not made then); None where it cannot be known
    (no split.csv, and the cache file or the parent run is gone)."""
    from pipeline.heads.training import recomputed_split, recorded_split  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    split = recorded_split(record.dir)
    if split is not None:
        return split
    cfg = record.config
    if cfg.get("parent_run"):
        try:
            return training_split(Registry(CacheLayout.of(record.dir).root).get(str(cfg["parent_run"])), among)
        except UserError:
            return None
    cache_file = cfg.get("cache_file")
    if not cache_file or not Path(cache_file).is_file():
        return None
    try:
        with warnings.catch_warnings(), FeatureFile(cache_file) as ff:
            warnings.simplefilter("ignore", DataWarning)  # said when the run was fitted
            if among is not None and among.isdisjoint(ff.paths):  # a folder the run never saw: nothing to split
                return {"train": set(), "val": set(), "test": set()}
            return recomputed_split(ff, cfg)
    except UserError:
        return None


def training_paths(record: RunRecord, among: set[str] | None = None) -> set[str] | None:
    """The image files a run's head trained on (`training_split`'s train images); None where unknown."""
    split = training_split(record, among)
    return split["train"] if split is not None else None


def val_source(record: RunRecord) -> str | None:
    """Where a run's head took its val images from ('val split' or 'holdout' of train), as its fit-head run
    recorded it (a fine-tune records its head run's); None where unknown."""
    split = record.metrics.get("split")
    if isinstance(split, dict) and split.get("val_source"):
        return str(split["val_source"])
    given = record.config.get("head_val_source")
    return str(given) if given else None


def warn_own_training_images(run: LoadedRun, scored: Sequence[str]) -> None:
    """One warning where images scored are ones the run trained on: their figures are not held out."""
    if not scored:
        return
    split = training_split(run.record, set(scored))
    if split is None:
        warnings.warn(f"cannot tell which images run {run.record.id} trained on (its split.csv is gone or damaged, "
                      f"and so is its parent run or its cache file): the figures may count its own training images",
                      DataWarning, stacklevel=2)
        return
    own = [p for p in scored if p in split["train"]]
    if own:
        held = ("--split test, or images the run never trained on (it validated on a holdout of these images' "
                "split: its split.csv lists which)" if split["val"].intersection(scored)
                and val_source(run.record) == "holdout" else
                "--split val or --split test, or images the run never trained on")
        warnings.warn(f"{len(own)} of the {len(scored)} images scored are run {run.record.id}'s own training images "
                      f"(e.g. {own[0]}): their figures are not held out; give {held}", DataWarning, stacklevel=2)


def _labelled_images(run: LoadedRun, data: str, split: str | None) -> tuple[list[str], np.ndarray, list[str]]:
    """Paths, labels (as the run's class indices) and class names of the data to evaluate, from the
    listing alone: a class the run never saw or an empty split is refused before anything is extracted."""
    from pipeline.heads.base import check_class_subset  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    source = open_source(data, run.request.split)
    listing = source.listing()
    check_class_subset(listing.class_names, run.class_names, data)
    keep = [i for i, s in enumerate(listing.splits) if (split is None or s == split) and listing.labels[i] >= 0]
    if not keep:
        held = sorted({s for s, label in zip(listing.splits, listing.labels) if label >= 0})
        if split and held:
            raise UserError(f"{data} has no labelled images in split {split!r}; its labelled images are in "
                            f"{', '.join(held)}: give --split {' or --split '.join(held)}, or --split all")
        raise UserError(f"{data} has no labelled images" + (f" in split {split!r}" if split else "")
                        + "; evaluate needs labels (a folder per class, or a manifest's label column)")
    if split and listing.split_origin.startswith("hash") and source.spec != run.request.data:
        fraction = {"val": "--val-fraction", "test": "--test-fraction"}.get(split, "--val-fraction and --test-fraction")
        warnings.warn(f"{data} has no split folders, so --split {split} scores the {len(keep)} image(s) a hash of "
                      f"their names puts in {split} (by the run's {fraction}), a subset of them; --split all scores "
                      f"every image", DataWarning, stacklevel=3)
    if listing.paths is None:
        if run.head is None:
            raise UserError("evaluating a fine-tuned model needs image files (a folder or CSV manifest)")
        return [], np.zeros(0, np.int64), listing.class_names
    to_run = np.asarray([list(run.class_names).index(c) for c in listing.class_names], np.int64)
    return [listing.paths[i] for i in keep], to_run[np.asarray(listing.labels)[keep]], listing.class_names


def predict_paths(run: LoadedRun, paths: Sequence[str], batch_size: int = 32, on_batch: OnBatch | None = None
                  ) -> tuple[np.ndarray, list[int], list[str]]:
    """Class probabilities for image files: (probabilities, positions kept, [(skipped path, reason)]);
    `on_batch` as in `map_files` (a join of backbones calls it once, at the end)."""
    if run.model_path is not None:
        spec = bb.get(run.request.backbone)
        size = spec.resolve_size(run.request.image_size)
        model = load_keras_file(run.model_path)
        return run_model(model, paths, size, run.request.resize, batch_size, on_batch=on_batch)
    if not is_concat(run.request.backbone):  # the head batch by batch on the backbone's features
        return run_features(run, paths, batch_size, then=run.head.predict_proba, on_batch=on_batch)
    feats, kept, skipped = run_features(run, paths, batch_size)
    proba = run.head.predict_proba(feats)
    if on_batch is not None:
        on_batch(list(kept), proba)
    return proba, kept, skipped


def run_features(run: LoadedRun, paths: Sequence[str], batch_size: int = 32,
                 then: Callable[[np.ndarray], np.ndarray] | None = None, on_batch: OnBatch | None = None
                 ) -> tuple[np.ndarray, list[int], list[str]]:
    """A fit-head run's backbone features of image files: (features, positions kept, skipped); for a
    concatenation 'a+b', each backbone's features of the images every one of them read, side by side.
    One backbone only: `then` and `on_batch` as in `run_model` (the head applied batch by batch)."""
    require()
    parts = part_requests(run.request) if is_concat(run.request.backbone) else [run.request]
    if (then is not None or on_batch is not None) and len(parts) > 1:
        raise ValueError("then/on_batch need one backbone: a join's features are complete only at the end")
    outs = []
    for request in parts:
        spec = bb.get(request.backbone)
        size = spec.resolve_size(request.image_size)
        model = backbone_model.feature_model(spec, request.weights, size, request.pooling, request.layer)
        outs.append(run_model(model, paths, size, request.resize, batch_size, then=then, on_batch=on_batch))
    if len(outs) == 1:
        return outs[0]
    kept = sorted(set.intersection(*(set(k) for _, k, _ in outs)))
    columns = []
    for f, k, _ in outs:
        row_of = {i: r for r, i in enumerate(k)}
        columns.append(f[[row_of[i] for i in kept]])
    feats = np.hstack(columns)
    skipped = list(outs[0][2])
    for _, _, more in outs[1:]:
        skipped += [s for s in more if s not in skipped]
    return feats, kept, skipped


def write_predictions_csv(path: Path, paths: Sequence[str], proba: np.ndarray, class_names: Sequence[str],
                          neighbours: Sequence[Sequence[tuple[str, float]]] | None = None,
                          labels: Sequence[int] | None = None) -> None:
    """path, (label, when given), predicted class, its probability, one probability column per class,
    then (with `neighbours`) neighbour_1, similarity_1, ... for the nearest training images; text a
    spreadsheet would run as a formula gets a leading apostrophe (`sheets.formula_safe`)."""
    k = max((len(n) for n in neighbours), default=0) if neighbours is not None else 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        def write(cells: list) -> None:  # as the audit's CSVs: "\n" lines, every cell inert in a spreadsheet
            fh.write(csv_line(cells, spreadsheet=True))
        fixed = ["path", *(["label"] if labels is not None else []), "prediction", "probability"]
        near_columns = [f"{c}_{i + 1}" for i in range(k) for c in ("neighbour", "similarity")]
        write([*fixed, *probability_columns(class_names, {*fixed, *near_columns}), *near_columns])
        for j, (p, row) in enumerate(zip(paths, proba)):
            best = int(np.argmax(row))
            near = [x for n, s in (neighbours[j] if neighbours is not None else []) for x in (n, f"{s:.4f}")]
            write([p, *([class_names[int(labels[j])]] if labels is not None else []), class_names[best],
                   f"{row[best]:.6f}", *(f"{v:.6f}" for v in row), *near, *[""] * (2 * k - len(near))])


def probability_columns(class_names: Sequence[str], taken: set[str]) -> list[str]:
    """A column name per class for its probability: the class name, or where that is one of the other
    columns (`taken`: a class named 'path' or 'prediction') or another class's, 'p_' before it: a
    CSV reader keys columns by name, and a second 'path' column shadowed the first."""
    out: list[str] = []
    for name in class_names:
        column = name
        while column in taken or column in out:
            column = "p_" + column
        out.append(column)
    return out


def write_top_k_csv(path: Path, results: Sequence[tuple[str, Sequence[tuple[int, str, float]]]], k: int) -> None:
    """A backbone's own ImageNet top-k per image: path, then class_i, index_i, probability_i for
    i = 1..k, most probable first (inert in a spreadsheet, as `write_predictions_csv`)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write(csv_line(["path", *(f"{c}_{i + 1}" for i in range(k) for c in ("class", "index", "probability"))],
                          spreadsheet=True))
        for p, top in results:
            cells = [x for idx, name, prob in top for x in (name, idx, f"{prob:.6f}")]
            fh.write(csv_line([p, *cells, *[""] * (3 * k - len(cells))], spreadsheet=True))
