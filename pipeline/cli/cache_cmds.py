"""`cache ls|info|rm`: list, describe and remove (or evict) cached feature files."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pipeline.cli.options import cache_dir_option, cache_dir_shown
from pipeline.errors import UserError
from pipeline.features.cache import (being_written, describe, find_entries, remove_entries, select_for_eviction,
                                     select_for_removal)



@click.group("cache")
def cache_group() -> None:
    """List, describe and remove cached feature files."""


@cache_group.command("ls")
@cache_dir_option
def cache_ls(cache_dir: Path) -> None:
    """List cache entries: key, backbone, size, pooling, rows, data, state.

    \b
    Example: python cli.py cache ls
    """
    entries = find_entries(cache_dir)
    if not entries:
        click.echo(f"no cache entries in {cache_dir_shown(cache_dir)}")
        return
    table = Table("key", "backbone", "size", "pooling/layer", "rows", "MB", "data", "state", box=None)
    for e in entries:
        table.add_row(e.key[:16], e.backbone, str(e.image_size), e.pooling, str(e.rows),
                      f"{e.megabytes:.1f}", e.data, e.state)
    Console(width=160).print(table)


@cache_group.command("info")
@click.argument("ref")
@cache_dir_option
def cache_info(ref: str, cache_dir: Path) -> None:
    """Describe one entry (key prefix or path): schema, attributes, counts per split and class.

    \b
    Example: python cli.py cache info 3b124ac0
    """
    click.echo(describe(ref, cache_dir))


@cache_group.command("rm")
@click.argument("refs", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry of the cache (asks first unless --yes).")
@click.option("--older-than", metavar="DURATION", default=None,
              help="Entries last changed more than DURATION ago, e.g. 7d, 12h, 30m.")
@click.option("--larger-than", metavar="SIZE", default=None, help="Entries larger than SIZE, e.g. 500MB, 2GB.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--yes", "-y", is_flag=True, help="Remove --all/--older-than/--larger-than matches without asking.")
@cache_dir_option
def cache_rm(refs: tuple[str, ...], everything: bool, older_than: str | None, larger_than: str | None,
             dry_run: bool, yes: bool, cache_dir: Path) -> None:
    """Remove cache entries, finished or partial: by key prefix (as `cache ls` shows), or evict by rule.

    Only entries of the cache under --cache-dir are ever removed; a prefix matching several keys
    removes nothing.

    \b
    Examples: python cli.py cache rm 3b124ac0
              python cli.py cache rm --older-than 30d --larger-than 500MB --dry-run
    """
    bulk = everything or older_than is not None or larger_than is not None
    if refs and bulk:
        raise UserError("give entry keys or --all/--older-than/--larger-than, not both")
    if not refs and not bulk:
        raise UserError("give the key prefix of an entry to remove (`python cli.py cache ls` lists them), "
                        "or --all/--older-than/--larger-than")
    if bulk:
        entries = select_for_eviction(cache_dir, everything, older_than, larger_than)
        for e in [e for e in entries if being_written(e.path)]:  # an extraction's own: kept, the rest removed
            click.echo(f"{'would skip' if dry_run else 'skipping'} {e.path}: an extraction is writing it now")
            entries.remove(e)
    else:
        entries = []
        for ref in refs:  # every ref is checked before anything is removed
            entries += [e for e in select_for_removal(ref, cache_dir) if e.path not in {x.path for x in entries}]
    if not entries:
        click.echo(f"nothing to remove in {cache_dir_shown(cache_dir)}")
        return
    if dry_run or (bulk and not yes):
        total = sum(e.megabytes for e in entries)
        for e in entries:
            click.echo(f"{'would remove' if dry_run else 'to remove'} {e.path} ({e.megabytes:.1f} MB, {e.state})")
        click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total:.1f} MB")
        if dry_run:
            return
        if not sys.stdin.isatty():
            raise UserError(f"not removing {len(entries)} cache entries without confirmation; pass --yes to remove "
                            f"them (or --dry-run to only list them)")
        if not click.confirm(f"remove these {len(entries)} entries?", default=False):
            click.echo("nothing removed")
            return
    for path in remove_entries(entries, cache_dir):
        click.echo(f"removed {path}")
