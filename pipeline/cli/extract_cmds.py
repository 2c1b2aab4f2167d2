"""`extract` and `backbones` commands."""

from __future__ import annotations

import click

from pipeline.cli import cli
from pipeline.cli.options import build_request, extract_options
from pipeline import backbones as bb
from pipeline.extract.core import extract


def report_extraction(result) -> None:
    """Print what an extraction did: cache hit or rate, and any skipped files."""
    if result.cache_hit:
        click.echo(f"cache hit: {result.path}")
        return
    click.echo(f"wrote {result.path} ({result.n_rows} rows, {result.images_per_s:.1f} images/s)")
    if result.skipped:
        names = ", ".join(p for p, _ in result.skipped[:5])
        more = f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5 else ""
        click.echo(f"skipped {len(result.skipped)} unreadable file(s): {names}{more} "
                   f"(listed in the file's skipped_paths)", err=True)


@cli.command("extract")
@extract_options
@click.option("--force", is_flag=True, help="Recompute even when the cache has this request.")
def extract_cmd(force: bool, **kw) -> None:
    """Run the frozen backbone once over --data and cache the features in HDF5.

    Example: python cli.py extract --data ../shared/data/hymenoptera --backbone mobilenetv2 --image-size 160
    """
    request, options = build_request(kw)
    options.force = force
    report_extraction(extract(request, options))


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
