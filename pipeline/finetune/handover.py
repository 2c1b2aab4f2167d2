"""The hand-over from stage 2: what a fit-head run folder gives fine-tuning (the cache's request,
the fitted head, the cache file), and the train/val/test images, so fine-tuning validates on the
same images the head was validated on and its before/after table compares like with like."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.backend import check_recorded
from pipeline.data.sources import names_files
from pipeline.errors import DataWarning, UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, is_concat, plan
from pipeline.features.reuse import changed_files
from pipeline.features.store import FeatureFile
from pipeline.heads.folds import stratified_holdout
from pipeline.heads.registry import load_head
from pipeline.heads.training import run_split
from pipeline.inference.apply import check_head_weights
from pipeline.layout import CacheLayout
from pipeline.tracking.runs import read_object


@dataclass
class Stage2Inputs:
    """What fine-tuning needs from a fit-head run: the cache's request, the head and the cache file."""

    request: ExtractRequest
    head: Any
    cache_path: Path
    config: dict[str, Any]
    split: dict[str, list[str]] | None = None  # image ids per split, as the head was trained and validated


def stage2_inputs(run_dir: str | os.PathLike, progress: bool = True) -> Stage2Inputs:
    """Read a fit-head run folder: its config.json names the cache file, whose `request` says how
    the features were made; the head is loaded from the folder."""
    run_dir = Path(run_dir)
    config, problem = read_object(run_dir / "config.json")
    if problem or not config:
        raise UserError(f"{run_dir} has no readable config.json ({problem or 'missing'}); is it a fit-head run "
                        f"folder?")
    cache = config.get("cache_file")
    if not cache:
        raise UserError(f"{run_dir}/config.json names no cache_file; fine-tuning starts from a fit-head run")
    check_recorded(config, f"head run {run_dir.name}")
    head = load_head(run_dir)
    if not Path(cache).exists() and isinstance(config.get("request"), Mapping):
        cache = _remake_cache(config["request"], Path(cache), head.cache_key_, run_dir, progress)
    with FeatureFile(cache) as ff:
        req, spec, key = ff.request, ff.data, ff.key
        parts = run_split(run_dir, config, ff)
        changed = changed_files(ff, ff.rows(views="clean"))
    if not req:
        raise UserError(f"{cache} records no extraction request; extract it again with this version")
    if head.cache_key_ and head.cache_key_ != key:
        raise UserError(_other_features(run_dir, head.cache_key_, Path(cache).name))
    request = ExtractRequest.from_json(req)
    given = config.get("request") if isinstance(config.get("request"), Mapping) else {}
    if given.get("weights") and not is_concat(request.backbone):  # where the run found its weights file
        request = dataclasses.replace(request, weights=str(given["weights"]))
        check_head_weights(head, request, f"head run {run_dir.name}")
    if spec and not Path(request.data).expanduser().exists() and Path(spec).exists():
        request = dataclasses.replace(request, data=spec)  # a relative --data path, resolved at extraction
    _check_data_there(request.data, run_dir, shown=spec or request.data)
    if changed:
        path, how = changed[0]
        warnings.warn(f"{len(changed)} of the images changed or went missing since the head's features were "
                      f"extracted (e.g. {path}: {how}): fine-tuning reads them as they are now, and the head learnt "
                      f"the old ones; fit-head on the data again for a head of the same pixels", DataWarning,
                      stacklevel=2)
    split = {name: sorted(files) for name, files in parts.items()} if parts else None
    return Stage2Inputs(request, head, Path(cache), config, split)


def _check_data_there(data: str, run_dir: Path, shown: str | None = None) -> None:
    """One line where the image folder or manifest a head run was fitted on is gone (moved, renamed)."""
    if names_files(data) and not Path(data).expanduser().exists():
        raise UserError(f"the data head run {run_dir.name} was fitted on is no longer at {shown or data} (moved, "
                        f"renamed or removed); put it back there, or fit-head on it where it is now and fine-tune "
                        f"that run")


def _other_features(run_dir: Path, head_key: str, now: str) -> str:
    return (f"the head in {run_dir} was fitted on features {head_key[:16]}, but the run's data now gives {now} "
            f"(images added, removed or changed since); fit-head on the data again and fine-tune that run")


def _remake_cache(request: Mapping[str, Any], gone: Path, head_key: str | None, run_dir: Path,
                  progress: bool = True) -> str:
    """The fit-head run's cache file was removed (`cache rm`, eviction): extract the run's recorded
    request again into the same cache folder (unchanged data gives the same key and rows). Data that
    changed since plans another key: refused before extracting features the head cannot read."""
    req, root = ExtractRequest.from_json(dict(request)), CacheLayout.of(gone).root
    _check_data_there(req.data, run_dir)
    if head_key and not is_concat(req.backbone):
        planned = plan(req, root)
        if planned.key != head_key:
            raise UserError(_other_features(run_dir, head_key, planned.path.name))
    warnings.warn(f"the features head run {run_dir.name} was fitted on ({gone.name}) were removed; extracting them "
                  f"again (unchanged data gives the same rows)", DataWarning, stacklevel=2)
    return str(extract(req, RunOptions(cache_dir=root, progress=progress)).path)


def split_parts(request: ExtractRequest, listing, split: Mapping[str, Sequence[str]] | None,
                val_fraction: float, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """({train, val, test: listing indices}, where val came from): stage 2's split when given
    (image ids), else the data's own splits with a seeded, stratified holdout of train as val
    when it has no 'val' split."""
    labels = np.asarray(listing.labels)
    if split:
        pos = {str(i): n for n, i in enumerate(listing.ids)}
        missing = [i for part in split.values() for i in part if str(i) not in pos]
        if missing:
            raise UserError(f"{len(missing)} image(s) the head was trained or validated on are no longer in "
                            f"{request.data} (e.g. {missing[0]}); fine-tune on the data as it was extracted, "
                            f"or extract and fit the head again")
        parts = {k: np.asarray(sorted(pos[str(i)] for i in split.get(k, ())), np.int64)
                 for k in ("train", "val", "test")}
        return parts, "stage-2 split"
    splits = np.asarray(listing.splits)
    labelled = labels >= 0
    parts = {k: np.flatnonzero((splits == k) & labelled) for k in ("train", "val", "test")}
    if parts["val"].size or not 0 < float(val_fraction) < 1 or parts["train"].size < 2:
        return parts, "val split" if parts["val"].size else "none"
    train = parts["train"]
    keep, held = stratified_holdout(train, labels[train], float(val_fraction), int(seed))
    parts.update(train=np.sort(keep), val=np.sort(held))
    return parts, "holdout"
