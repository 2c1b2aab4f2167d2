"""`cache ls|info|rm`: list, describe and remove cached feature files."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli import cli
from pipeline.features.cache import describe, find_entries, remove_entry
from pipeline.extract import DEFAULT_CACHE

_cache_dir = click.option("--cache-dir", type=click.Path(path_type=Path), default=DEFAULT_CACHE,
                          help="Cache root (default: ./cache).")


@cli.group("cache")
def cache_group() -> None:
    """List, describe and remove cached feature files."""


@cache_group.command("ls")
@_cache_dir
def cache_ls(cache_dir: Path) -> None:
    """List cache entries: key, backbone, size, pooling, rows, data, state.

    Example: python cli.py cache ls
    """
    from rich.console import Console
    from rich.table import Table

    table = Table("key", "backbone", "size", "pooling/layer", "rows", "MB", "data", "state", box=None)
    for e in find_entries(cache_dir):
        table.add_row(e.key[:16], e.backbone, str(e.image_size), e.pooling, str(e.rows),
                      f"{e.megabytes:.1f}", e.data, e.state)
    Console(width=160).print(table)


@cache_group.command("info")
@click.argument("ref")
@_cache_dir
def cache_info(ref: str, cache_dir: Path) -> None:
    """Describe one entry (key prefix or path): schema, attributes, counts per split and class.

    Example: python cli.py cache info 3b124ac0
    """
    click.echo(describe(ref, cache_dir))


@cache_group.command("rm")
@click.argument("refs", nargs=-1, required=True)
@_cache_dir
def cache_rm(refs: tuple[str, ...], cache_dir: Path) -> None:
    """Remove entries (key prefixes or paths), finished or partial.

    Example: python cli.py cache rm 3b124ac0
    """
    for ref in refs:
        for path in remove_entry(ref, cache_dir):
            click.echo(f"removed {path}")
