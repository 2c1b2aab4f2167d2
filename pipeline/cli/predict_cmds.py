"""`predict`: a trained run's classes, or a backbone's own ImageNet top-k, for image files; `evaluate`: a
trained run's metrics on labelled images."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.backend import BACKENDS, select as select_backend
from pipeline.cli.options import (allow_outside_paths_option, cache_dir_option, check_output_file, given_options,
                                  split_names as parse_split_names, trust_pickle_option)
from pipeline.cli.shared import shown_path, skipped_message
from pipeline.errors import UserError
from pipeline.export.runtime import open_model, predict_files
from pipeline.extract import is_concat
from pipeline.inference.apply import (check_explain, evaluate_run, explained, load_run, predict_paths, run_features,
                                      write_predictions_csv, write_top_k_csv)
from pipeline.inference.embed import image_paths, imagenet_top_k
from pipeline.tracking.metrics import metrics_table, summary_line


@click.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--run", "run_id", default=None, help="A fit-head or finetune run ID (or unique prefix).")
@click.option("--model", "model_file", type=click.Path(path_type=Path), default=None,
              help="Or: an exported model (.onnx, .keras, .tflite, SavedModel folder) from `cli.py export`.")
@click.option("--backbone", default=None, help="Without --run: print this backbone's ImageNet top-k.")
@click.option("--weights", default="imagenet", show_default=True, help="With --backbone: imagenet or a file.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None,
              help="Also write a CSV here: with --run or --model path, prediction, probability and per-class "
                   "columns; with --backbone path and each of the top-k's class, index and probability.")
@click.option("--explain", type=click.IntRange(0), default=0, metavar="K",
              help="With --run of a knn head: also show each image's K nearest training images (and in --csv).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@trust_pickle_option
@click.option("--trust-model", is_flag=True,
              help="With --model: also open a SavedModel folder (it runs the TensorFlow ops it holds, file I/O "
                   "included); only for models you trust.")
@cache_dir_option
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Keras backend (default: KERAS_BACKEND).")
def predict_cmd(images: tuple[str, ...], run_id: str | None, model_file: Path | None, backbone: str | None, weights: str, top_k: int,
                csv_out: Path | None, explain: int, batch_size: int, trust_pickle: bool, trust_model: bool,
                cache_dir: Path, backend: str | None) -> None:
    """Predict classes for IMAGES (files or folders).

    \b
    Examples: python cli.py predict --run 20261122-2330 photos/ --csv preds.csv
              python cli.py predict --run 20261203-1510 photo.jpg --explain 5   (a knn head)
              python cli.py predict --model export/model.onnx photos/
              python cli.py predict --backbone efficientnet_lite0 photo.jpg
    """
    if sum(x is not None for x in (run_id, model_file, backbone)) > 1:
        raise click.UsageError("give one of --run, --model and --backbone")
    mode = "--run" if run_id else "--model" if model_file is not None else "--backbone" if backbone else None
    reads = {"--run": {"csv_out", "explain", "trust_pickle"}, "--model": {"csv_out", "trust_model"},
             "--backbone": {"weights", "csv_out"}}.get(mode, set())
    unread = given_options(lambda name: name in {"weights", "csv_out", "explain", "trust_pickle", "trust_model"} - reads)
    if mode and unread:  # ignored, they would change nothing and say nothing (a --csv never written)
        raise click.UsageError(f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} nothing with {mode}; "
                               f"leave {'it' if len(unread) == 1 else 'them'} out")
    if csv_out is not None:
        check_output_file(csv_out, "--csv")
    if explain and not run_id:
        raise click.UsageError("--explain shows the training images behind a run's predictions: add --run ID "
                               "(a fit-head run with --head knn)")
    select_backend(backend)
    paths = image_paths(images)
    if model_file is not None:
        model = open_model(model_file, trust_savedmodel=trust_model)
        shown = Shown(paths, model.class_names, top_k, csv_out)
        with shown.keeping():
            _, _, skipped = predict_files(model, paths, batch_size, on_batch=shown)
        shown.finish(skipped)
        return
    if run_id:
        predict_with_run(run_id, paths, top_k, csv_out, cache_dir, batch_size, trust_pickle, explain)
        return
    if not backbone:
        raise click.UsageError("give --run ID (a trained run), --model FILE (an export) or --backbone NAME "
                               "(ImageNet top-k)")
    if is_concat(backbone) or "," in backbone:
        raise UserError(f"predict --backbone takes one backbone, whose own ImageNet classes it prints; {backbone!r} "
                        f"names several (a join has no classifier: fit a head on it and give --run)")
    results, skipped = imagenet_top_k(backbone, weights, paths, top_k, batch_size=batch_size)
    for path, top in results:
        click.echo(shown_path(path))
        for idx, name, p in top:
            click.echo(f"  {p:6.1%}  {idx:4d}  {name}")
    if csv_out is not None:
        write_top_k_csv(csv_out, results, top_k)
        click.echo(f"wrote {csv_out}", err=True)
    if skipped:
        click.echo(skipped_message(skipped), err=True)


@click.command("evaluate")
@click.option("--run", "run_id", required=True, help="A fit-head or finetune run ID (or unique prefix).")
@click.option("--data", required=True, help="Labelled data: folder, CSV manifest, tfds:NAME or builtin:digits.")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all", show_default=True)
@click.option("--explain", type=click.IntRange(0), default=0, metavar="K",
              help="knn head: list each misclassified image's K nearest training images (and in --csv, every image's).")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None,
              help="Also write path, label, prediction, probabilities (and --explain's neighbours) per image here.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--split-names", default=None, metavar="TRAIN,VAL,TEST",
              help="Folder names of the data's train, val and test splits (default: the run's).")
@allow_outside_paths_option
@trust_pickle_option
@cache_dir_option
def evaluate_cmd(run_id: str, data: str, split: str, explain: int, csv_out: Path | None, batch_size: int,
                 split_names: str | None, allow_outside_paths: bool, trust_pickle: bool, cache_dir: Path) -> None:
    """Score a trained run on labelled images, through the same backbone and preprocessing.

    \b
    Example: python cli.py evaluate --run 20261122-2330 --data ../shared/data/hymenoptera --split val
    """
    if csv_out is not None:
        check_output_file(csv_out, "--csv")
    run = load_run(cache_dir, run_id, trust_pickle=trust_pickle)
    splits = replace(run.request.split, allow_outside_paths=allow_outside_paths or run.request.split.allow_outside_paths,
                     **({"folder_names": parse_split_names(split_names)} if split_names else {}))
    result = evaluate_run(replace(run, request=replace(run.request, split=splits)), data, cache_dir,
                          None if split == "all" else split, batch_size, explain=explain)
    report = result.report
    click.echo(summary_line(report))
    Console(width=110).print(metrics_table(report, title=f"{data} ({split})"))
    if result.neighbours is not None:
        Console(width=160).print(_explained_table(result, run.class_names))
    if csv_out is not None:
        write_predictions_csv(csv_out, result.paths, result.proba, run.class_names, result.neighbours, result.labels)
        click.echo(f"wrote {csv_out}", err=True)
    if result.skipped:  # not scored: the report's n leaves them out
        click.echo(skipped_message(result.skipped), err=True)


def _explained_table(result, class_names: list[str], limit: int = 20):
    """The misclassified images (most confident first) beside their nearest training images."""
    pred = result.proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != result.labels)
    wrong = wrong[np.argsort(-result.proba[wrong, pred[wrong]], kind="stable")]
    table = Table(title=f"misclassified: {wrong.size} (first {min(limit, wrong.size)}), with their nearest "
                        f"training images", title_justify="left")
    for col in ("image", "label", "predicted", "nearest training images (similarity)"):
        table.add_column(col)
    for i in wrong[:limit]:
        near = "\n".join(f"{p} ({s:.3f})" for p, s in result.neighbours[i])
        table.add_row(result.paths[i], class_names[int(result.labels[i])],
                      f"{class_names[int(pred[i])]} {result.proba[i, pred[i]]:.3f}", near)
    return table


def predict_with_run(run_id: str, paths: list[str], top_k: int, csv_out: Path | None, cache_dir: Path,
                     batch_size: int, trust_pickle: bool = False, explain: int = 0) -> None:
    """`predict --run`: top-k classes of a trained run for each image (and optionally a CSV); with
    `explain`, each image's nearest training images too (a knn head)."""
    run = load_run(cache_dir, run_id, trust_pickle=trust_pickle)
    check_explain(run, explain)
    if not explain:
        shown = Shown(paths, run.class_names, top_k, csv_out)
        with shown.keeping():
            _, _, skipped = predict_paths(run, paths, batch_size, on_batch=shown)
        shown.finish(skipped)
        return
    feats, kept, skipped = run_features(run, paths, batch_size)
    shown = Shown(paths, run.class_names, top_k, csv_out)
    shown(kept, run.head.predict_proba(feats), explained(run.head, feats, explain))
    shown.finish(skipped)


class Shown:
    """Predictions printed as each batch is done (a line per image with its top-k classes), kept for
    the CSV; on Ctrl-C the CSV holds those made so far, and says so. Class names default to the
    output's positions (an exported model without a card)."""

    def __init__(self, paths: list[str], class_names: list[str], top_k: int, csv_out: Path | None) -> None:
        self.paths, self.names, self.top_k, self.csv_out = paths, list(class_names), top_k, csv_out
        self.kept: list[int] = []
        self.rows: list[np.ndarray] = []
        self.neighbours: list | None = None  # --explain: shown in one call, for every image

    def __call__(self, kept: list[int], proba: np.ndarray, neighbours: list | None = None) -> None:
        """Show a batch; `neighbours`: each image's nearest training images (an indented line each)."""
        names = self.names = self.names or [str(i) for i in range(proba.shape[1])]
        k = min(self.top_k, len(names))
        for j, (i, row) in enumerate(zip(kept, proba)):
            top = np.argsort(-row)[:k]
            click.echo(f"{shown_path(self.paths[i])}\t" + "  ".join(f"{names[c]} {row[c]:.3f}" for c in top))
            for path, sim in (neighbours[j] if neighbours is not None else []):
                click.echo(f"    near {sim:.3f}  {shown_path(path)}")
        self.kept += kept
        self.rows.append(np.asarray(proba))
        self.neighbours = neighbours

    @contextlib.contextmanager
    def keeping(self) -> Iterator[None]:
        """Ctrl-C: write the predictions made so far to the CSV, say how many, and stop as interrupted."""
        try:
            yield
        except KeyboardInterrupt:
            if self.csv_out is not None and self.kept:
                self._write_csv()
                click.echo(f"wrote the {len(self.kept)} of {len(self.paths)} predictions made before the interrupt "
                           f"to {self.csv_out}", err=True)
            raise

    def finish(self, skipped: list) -> None:
        """The CSV of every prediction, and the skipped files (stderr)."""
        if self.csv_out:
            self._write_csv()
            click.echo(f"wrote {self.csv_out}", err=True)
        if skipped:
            click.echo(skipped_message(skipped), err=True)

    def _write_csv(self) -> None:
        write_predictions_csv(self.csv_out, [self.paths[i] for i in self.kept], np.concatenate(self.rows),
                              self.names, self.neighbours)
