"""`predict`: a backbone's own ImageNet top-k, or a trained run's classes, for image files."""

from __future__ import annotations

import click

from . import cli
from ..embed import image_paths, imagenet_top_k


@cli.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--backbone", default=None, help="Without --run: print this backbone's ImageNet top-k.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet or a weights file.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
def predict_cmd(images: tuple[str, ...], backbone: str | None, weights: str, top_k: int, batch_size: int) -> None:
    """Predict classes for IMAGES (files or folders).

    Example: python cli.py predict --backbone efficientnet_lite0 photo.jpg
    """
    paths = image_paths(images)
    if not backbone:
        raise click.UsageError("give --backbone NAME (ImageNet top-k) or --run ID")
    results, skipped = imagenet_top_k(backbone, weights, paths, top_k, batch_size=batch_size)
    for path, top in results:
        click.echo(path)
        for idx, name, p in top:
            click.echo(f"  {p:6.1%}  {idx:4d}  {name}")
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:5])}", err=True)
