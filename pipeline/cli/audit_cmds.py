"""`audit`: what is wrong with the data (label issues, duplicates and leakage, outliers) and with the
model (top losses, confused classes), from the cached features, as a recorded run with a report."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path

import click

from pipeline.audit.rules import DROP_BELOW, RELABEL_CONFIDENCE
from pipeline.cli.interrupts import set_resume_hint
from pipeline.cli.options import (SEED, FiniteFloat, extract_options, given_options, mlflow_after, mlflow_check, mlflow_options,
                                  trust_pickle_option)
from pipeline.cli.shared import FEATURE_OPTIONS, open_cache
from pipeline.errors import DataWarning, UserError
from pipeline.extract import ExtractRequest
from pipeline.features.reuse import changed_files
from pipeline.features.store import FeatureFile
from pipeline.inference.apply import load_run, training_paths
from pipeline.layout import CacheLayout, cache_dir_flags
from pipeline.tracking.runs import Registry

# what decides the audited images' features and split: the extract options, and --val-fraction (fit-head also
# reads it at fit time, on a cache without a val split; the audit scores the cache's own split)
AUDITED_OPTIONS = FEATURE_OPTIONS | {"val_fraction"}


@click.command("audit")
@click.option("--cache", default=None, help="Cache file path or key prefix (else: found/made from the "
                                            "extract options below).")
@click.option("--run", "run_id", default=None,
              help="A fit-head run of this cache: its head scores val/test (leakage, top losses) instead of a "
                   "logistic regression fitted on the train split here.")
@click.option("--cv", type=click.IntRange(2), default=5, show_default=True,
              help="Folds of the out-of-fold probabilities.")
@click.option("--relabel", is_flag=True,
              help="cleaned.csv keeps a label issue with its suggested label where that has an out-of-fold "
                   f"probability of {RELABEL_CONFIDENCE:g} or more (before --drop-below applies to the rest).")
@click.option("--drop-below", type=FiniteFloat(0.0, 1.0), default=DROP_BELOW, show_default=True,
              help="cleaned.csv drops a label issue whose given label has an out-of-fold probability under this; "
                   "the others stay in with their labels (mostly hard images, not wrong ones). "
                   "1 drops every listed issue that --relabel does not relabel.")
@click.option("--no-map", is_flag=True, help="Skip the 2-D embedding map (t-SNE: the slowest part).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Draws the out-of-fold CV folds, the map's t-SNE and, on large caches, the images it shows.")
@trust_pickle_option
@extract_options
@mlflow_options
def audit_cmd(cache: str | None, run_id: str | None, cv: int, relabel: bool, drop_below: float, no_map: bool,
              seed: int, trust_pickle: bool, mlflow: bool | None, mlflow_experiment: str | None, **kw) -> None:
    """Find likely label errors, duplicates and train/val leakage, outliers and model errors in a
    cached data set; writes audit.json, CSVs, cleaned.csv and report.html into a new run folder
    (in report.html, review each finding and download the manifest with your choices).

    \b
    Example: python cli.py audit --data ../shared/data/hymenoptera
    """
    from pipeline.audit.runner import (  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
        AuditOptions, audit_cache, write_audit)
    from pipeline.audit.report import cleaned_use  # noqa: PLC0415 - as the runner above
    from pipeline.heads.training import check_finite  # noqa: PLC0415 - scikit-learn: keeps `--help` fast

    log_mlflow = mlflow_check(mlflow)
    head, loaded, request = None, None, None
    if run_id is not None:
        new_data = cache is None and bool(given_options("data".__eq__))  # extracted with the run's backbone
        loaded = load_run(kw["cache_dir"], run_id, trust_pickle=trust_pickle, backbone=new_data)
        if loaded.head is None:
            raise UserError(f"run {loaded.record.id} is a fine-tune; audit --run takes a fit-head run, whose head "
                            f"reads the cached features (a fine-tuned model would need the images again)")
        head = loaded.head
        request = run_request(loaded, cache, kw)
    ff = open_cache(cache, kw, command="audit", splits=None, request=request, chosen_by=AUDITED_OPTIONS)
    set_resume_hint("the features are cached; run the same command again (the audit takes seconds from them)")
    options = AuditOptions(cv=cv, seed=seed, draw_map=not no_map)
    with ff:
        check_finite(ff)
        if cache is not None:  # --data and --run extract what changed first; --cache reads the file as it is
            warn_changed_images(ff)
        if head is not None:  # a head of other features or classes: one line, before a run is recorded
            head.check_matches(ff)
            check_held_out(loaded, ff)
        registry = Registry(CacheLayout.of(ff.path).root)  # open_cache: a file in a cache's features/
        config = {"cache_file": str(ff.path), "cache_key": ff.key, "backbone": ff.attrs.get("backbone"),
                  "data": ff.data or ff.path.stem, "cv": cv, "seed": seed, "relabel": relabel,
                  "drop_below": drop_below, "map": not no_map, **({"parent_run": loaded.record.id} if loaded else {})}
        run = registry.start("audit", config)
        with run:
            result = audit_cache(ff, options, head, say=lambda line: click.echo(line, err=True))
            files = write_audit(result, run, relabel, drop_below)
            run.log_metrics({"counts": result["counts"], "leakage": result["leakage"]["accuracy"],
                             "out_of_fold": result["out_of_fold"], "seconds": result["seconds"]})
    counts = result["counts"]
    click.echo(f"{counts['images']:,} images: {counts['label_issues']} likely label errors, "
               f"{counts['exact_duplicates']} exact and {counts['near_duplicates']} near duplicate pairs "
               f"({counts['leakage_pairs']} across splits), {counts['outliers']} outliers")
    for split, acc in result["leakage"]["accuracy"].items():
        if acc["removed"]:
            after = f"{acc['after']:.4f}" if acc["after"] is not None else "nothing left to score"
            click.echo(f"{split}: accuracy {acc['before']:.4f} with its {acc['removed']} leaked images, {after} without")
    cleaned = result["cleaned"]
    review = (" (review the findings there: drop, keep or relabel each image, and download the manifest)"
              if result["review_menus"] else "")
    click.echo(f"audit {run.id} in {result['seconds']['total']:.1f}s: {files['report']}{review}")
    relabelled = f", relabels {cleaned['relabelled']}" if cleaned["relabel"] else ""
    use = cleaned_use(cleaned)
    click.echo(f"cleaned.csv leaves out {cleaned['removed']} images (label issues under --drop-below "
               f"{cleaned['label_issues_dropped_below']:g}, outliers, duplicate copies; train, val and test "
               f"alike){relabelled}; {use}", err=True)
    gone = cleaned["classes_left_out"]
    if gone:
        which = "that class" if len(gone) == 1 else "those classes"
        click.echo(f"cleaned.csv keeps no training image of {', '.join(map(repr, gone))}, so none of its val or "
                   f"test images either: a head fitted on it will not know {which}; look at its images in "
                   f"report.html (--drop-below 0 keeps every label issue in)", err=True)
    if "val" in cleaned["splits_emptied"]:
        click.echo("cleaned.csv keeps no val image: fit-head on it holds out part of the training images as val "
                   "instead", err=True)
    mlflow_after(log_mlflow, CacheLayout.of(run.dir).root, run.id, mlflow_experiment)


def warn_changed_images(ff: FeatureFile) -> None:
    """One warning where image files of the cache changed or went missing since they were extracted:
    the findings describe the cached features, while the report shows the files as they are now."""
    changed = changed_files(ff, ff.rows(views="clean"))
    if changed:
        path, how = changed[0]
        data = ff.data  # with the cache's own extraction options: the advice reads the same features
        flags = ["--data", str(data), *ExtractRequest.recorded_flags(ff.request),
                 *cache_dir_flags(CacheLayout.of(ff.path).root)]  # the cache this file is in, not the default
        again = f"audit with {shlex.join(flags)}" if data else "extract them again"
        warnings.warn(f"{len(changed)} of the audited images changed or went missing since they were extracted (e.g. "
                      f"{path}: {how}): the findings describe the cached features, and cleaned.csv still lists them; "
                      f"{again} to extract those again first", DataWarning, stacklevel=2)


def run_request(loaded, cache: str | None, kw: dict):
    """The extraction request an audit with --run reads: the run's own (its backbone and options), on
    --data where given, else on the run's data; None where --cache names the features. Other extract
    options would ask for features the head cannot read: refused before anything is extracted."""
    from dataclasses import replace  # noqa: PLC0415 - only with --run

    if cache is not None:
        return None
    given = given_options(AUDITED_OPTIONS.__contains__)
    others = [flag for flag in given if flag != "--data"]
    if others:
        raise UserError(f"--run {loaded.record.id} sets the features (its backbone and extraction options), so "
                        f"{', '.join(others)} would be ignored or unreadable by its head; leave them out")
    split = replace(loaded.request.split, allow_outside_paths=bool(kw.get("allow_outside_paths"))
                    or loaded.request.split.allow_outside_paths)  # an audit's cleaned.csv lists files outside its folder
    return replace(loaded.request, data=kw["data"] if "--data" in given else loaded.request.data, split=split)


def check_held_out(loaded, ff) -> None:
    """Refuse a run whose head trained on images this audit scores as val or test: its accuracy there,
    and the leakage figures from it, would not be held out (a head fitted on another split of them).
    Where the run's training images cannot be known any more, say so."""
    cache_file = loaded.record.config.get("cache_file")
    if cache_file and Path(cache_file).resolve() == Path(ff.path).resolve():
        return  # the same cache: its val and test were never trained on
    held = [p for p, s in zip(ff.paths, ff.splits.astype(str)) if s in ("val", "test")]
    seen = training_paths(loaded.record, set(held)) if held else set()
    if seen is None:
        warnings.warn(f"run {loaded.record.id}'s training images are unknown (its split.csv is missing or damaged, "
                      f"and its cache file {cache_file} is gone), so its accuracy on this cache's val/test images may not be held "
                      f"out; fit the head again, or audit without --run", DataWarning, stacklevel=2)
        return
    scored = [p for p in held if p in seen]
    if scored:
        raise UserError(f"run {loaded.record.id}'s head trained on {len(set(scored))} of the val/test images this "
                        f"audit scores (e.g. {scored[0]}), so its accuracy there would not be held out; audit the data "
                        f"that run was fitted on, split as it was (leave out --data and --cache), or without --run")
