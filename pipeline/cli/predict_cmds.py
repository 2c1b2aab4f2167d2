"""`predict`: a trained run's classes, or a backbone's own ImageNet top-k, for image files."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.backend import BACKENDS, select as select_backend
from pipeline.cli import cli
from pipeline.cli.extract_cmds import skipped_message
from pipeline.cli.options import cache_dir_option, check_output_file
from pipeline.cli.head_cmds import predict_with_run, print_predictions, trust_pickle_option
from pipeline.inference.embed import image_paths, imagenet_top_k


@cli.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--run", "run_id", default=None, help="A fit-head or finetune run ID (or unique prefix).")
@click.option("--model", "model_file", type=click.Path(path_type=Path), default=None,
              help="Or: an exported model (.onnx, .keras, .tflite, SavedModel folder) from `cli.py export`.")
@click.option("--backbone", default=None, help="Without --run: print this backbone's ImageNet top-k.")
@click.option("--weights", default="imagenet", show_default=True, help="With --backbone: imagenet or a file.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None,
              help="With --run or --model: also write path, prediction, probability and per-class columns here.")
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

    Examples: python cli.py predict --run 20261122-2330 photos/ --csv preds.csv
              python cli.py predict --run 20261203-1510 photo.jpg --explain 5   (a knn head)
              python cli.py predict --model export/model.onnx photos/
              python cli.py predict --backbone efficientnet_lite0 photo.jpg
    """
    if sum(x is not None for x in (run_id, model_file, backbone)) > 1:
        raise click.UsageError("give one of --run, --model and --backbone")
    if csv_out is not None:
        check_output_file(csv_out, "--csv")
    if explain and not run_id:
        raise click.UsageError("--explain shows the training images behind a run's predictions: add --run ID "
                               "(a fit-head run with --head knn)")
    select_backend(backend)
    paths = image_paths(images)
    if model_file is not None:
        from pipeline.export.runtime import open_model, predict_files
        model = open_model(model_file, trust_savedmodel=trust_model)
        proba, kept, skipped = predict_files(model, paths, batch_size)
        names = model.class_names or [str(i) for i in range(proba.shape[1])]
        print_predictions(paths, proba, kept, skipped, names, top_k, csv_out)
        return
    if run_id:
        predict_with_run(run_id, paths, top_k, csv_out, cache_dir, batch_size, trust_pickle, explain)
        return
    if not backbone:
        raise click.UsageError("give --run ID (a trained run), --model FILE (an export) or --backbone NAME "
                               "(ImageNet top-k)")
    results, skipped = imagenet_top_k(backbone, weights, paths, top_k, batch_size=batch_size)
    for path, top in results:
        click.echo(path)
        for idx, name, p in top:
            click.echo(f"  {p:6.1%}  {idx:4d}  {name}")
    if skipped:
        click.echo(skipped_message(skipped), err=True)
