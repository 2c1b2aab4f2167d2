"""`export --run ID --format F`: a trained run as one model file for serving (see pipeline.export)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.backend import BACKENDS, select as select_backend
from pipeline.cli.options import cache_dir_option, trust_pickle_option
from pipeline.export.exporter import FORMATS, check_format, check_target, export_run
from pipeline.inference.apply import load_run
from pipeline.tracking.runs import Registry


@click.command("export")
@click.option("--run", "run_id", required=True, help="A fit-head or finetune run ID (or unique prefix).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="keras", show_default=True,
              help="keras (.keras), onnx (ONNX Runtime), savedmodel (TF Serving), tflite (LiteRT).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write (default: the run's folder/export/FORMAT).")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out.")
@trust_pickle_option
@cache_dir_option
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Keras backend (default: KERAS_BACKEND).")
def export_cmd(run_id: str, fmt: str, out: Path | None, force: bool, trust_pickle: bool, cache_dir: Path,
               backend: str | None) -> None:
    """Export a run as one model: RGB uint8 images of the run's size in, class probabilities out.

    Writes the model, labels.txt (class names in output order) and model_card.json, after checking
    that the written file reproduces the run's probabilities.

    \b
    Examples: python cli.py export --run 20261122-2330 --format onnx
              python cli.py predict --model cache/runs/20261122-2330/export/onnx/model.onnx photos/
    """
    if out is not None:  # a bad --out or run ID fails before the run's model is loaded
        check_target(out, force)
    Registry(cache_dir).get(run_id)
    select_backend(backend)
    check_format(fmt)
    run = load_run(cache_dir, run_id, trust_pickle=trust_pickle)
    folder = out if out is not None else run.record.dir / "export" / fmt
    result = export_run(run, fmt, folder, force=force)
    size = result.card["input"]["shape"][1]
    click.echo(f"exported run {run.record.id} as {fmt}: {result.model_path}")
    click.echo(f"  input uint8 RGB {size}x{size} (resize: {result.card['input']['resize']}), output "
               f"{len(run.class_names)} class probabilities; labels.txt and model_card.json beside it")
    click.echo(f"  checked: max probability difference to the run's model {result.max_abs_diff:.1e}")
