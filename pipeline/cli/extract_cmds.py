"""`extract` and `backbones` commands."""

from __future__ import annotations

import click

from pipeline.cli import cli
from pipeline.cli.options import build_request, extract_options, mlflow_after, mlflow_check, mlflow_options
from pipeline import backbones as bb
from pipeline.extract import extract


def report_extraction(result) -> None:
    """Print what an extraction did: cache hit or rate, and any skipped files."""
    if result.cache_hit:
        click.echo(f"cache hit: {result.path}")
        return
    if result.computed:
        click.echo(f"wrote {result.path} ({result.n_rows} rows, {result.computed} images computed at "
                   f"{result.images_per_s:.1f} images/s)")
    else:
        click.echo(f"wrote {result.path} ({result.n_rows} rows, assembled from finished chunks)")
    if result.skipped:
        click.echo(skipped_message(result.skipped, "(listed in the file's skipped_paths and skipped_reasons)"),
                   err=True)


def skipped_message(skipped: list[tuple[str, str]], tail: str = "") -> str:
    """One line: how many files were skipped, the first few with their reasons."""
    shown = ", ".join(f"{p} ({reason})" for p, reason in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"skipped {len(skipped)} file(s) that could not be used as images: {shown}{more} {tail}".rstrip()


@cli.command("extract")
@extract_options
@click.option("--force", is_flag=True, help="Recompute even when the cache has this request.")
@mlflow_options
def extract_cmd(force: bool, mlflow: bool | None, mlflow_experiment: str | None, **kw) -> None:
    """Run the frozen backbone once over --data and cache the features in HDF5.

    Example: python cli.py extract --data ../shared/data/hymenoptera --backbone mobilenetv2 --image-size 160
    """
    log_mlflow = mlflow_check(mlflow)
    request, options = build_request(kw)
    options.force = force
    result = extract(request, options)
    report_extraction(result)
    mlflow_after(log_mlflow, options.cache_dir, result.run_id, mlflow_experiment)


@cli.command("backbones")
@click.argument("name", required=False)
@click.option("--layers", is_flag=True, help="With NAME: list its layer names (builds the model).")
def backbones_cmd(name: str | None, layers: bool) -> None:
    """List the backbones (name, input size, preprocessing, top blocks), or one backbone's layers.

    Example: python cli.py backbones mobilenetv2 --layers
    """
    from rich.console import Console
    from rich.table import Table

    if name:
        spec = bb.get(name)
        if layers:
            model = bb.build(spec, "none", spec.default_size)
            for layer in model.layers:
                click.echo(layer.name)
            return
        specs = [spec]
    else:
        specs = list(bb.TABLE.values())
    table = Table("name", "size", "preprocess", "top blocks (fine-tuning)", box=None)
    for s in specs:
        table.add_row(s.name, str(s.default_size), s.preprocess, ", ".join(n for n, _ in s.blocks))
    Console(width=120).print(table)
