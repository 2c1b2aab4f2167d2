"""`runs`: list, show, remove and compare the recorded runs of every stage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from pipeline.cli.options import cache_dir_option, cache_dir_shown, check_output_file
from pipeline.errors import UserError
from pipeline.finetune.checkpoints import has_checkpointed_epoch
from pipeline.tracking.compare import (comparison_json, comparison_table, compare, default_plot_path, plot_comparison,
                                       resolve)
from pipeline.tracking.runs import STAGES, Registry


@click.group("runs", invoke_without_command=True)
@click.option("--stage", type=click.Choice(STAGES), default=None,
              help="Runs of one stage (a sweep is a fit-head run: --filter sweep=true).")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="e.g. backbone=efficientnet* or head=logistic (repeatable).")
@click.option("--sort", default="started", show_default=True, help="started, duration, val_accuracy, val_f1, ...")
@click.option("--asc", is_flag=True, help="Ascending order.")
@cache_dir_option
@click.pass_context
def runs_group(ctx: click.Context, stage: str | None, filters: tuple[str, ...], sort: str, asc: bool,
               cache_dir: Path) -> None:
    """List recorded runs of every stage as a table.

    \b
    Example: python cli.py runs --stage fit-head --sort val_accuracy
    """
    if ctx.invoked_subcommand is not None:
        return
    parsed = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise UserError(f"--filter takes KEY=VALUE, not {f!r}")
        parsed[key] = value
    registry = Registry(cache_dir)
    records = registry.list(stage=stage, filters=parsed, sort=sort, descending=not asc)
    if not records:
        click.echo("no runs recorded yet" + (" matching those filters" if stage or filters else "")
                   + f" in {cache_dir_shown(cache_dir)}")
        return
    Console(width=160).print(registry.table(records))


@runs_group.command("show")
@click.argument("run_id")
@cache_dir_option
def runs_show(run_id: str, cache_dir: Path) -> None:
    """Print one run: config, metrics and files.

    \b
    Example: python cli.py runs show 20261122-2330
    """
    r = Registry(cache_dir).get(run_id)
    took = f"{r.duration_s}s" if r.duration_s is not None else "?"
    click.echo(f"run {r.id}  stage {r.stage}  status {r.status}  started {r.started or '?'}  duration {took}")
    if r.damaged:  # what `runs` lists as damaged, and why
        click.echo(f"damaged: {'; '.join(r.damaged)}")
    click.echo("config: " + json.dumps(r.config, indent=2, default=str))
    click.echo("metrics: " + json.dumps(r.metrics, indent=2, default=str))
    logged = r.info.get("mlflow")
    if isinstance(logged, dict) and logged.get("run_id"):
        click.echo(f"mlflow: run {logged['run_id']} (experiment {logged.get('experiment_id')}) in "
                   f"{logged.get('tracking_uri')}")
    click.echo("files: " + ", ".join(sorted(p.name for p in r.dir.iterdir())))


@runs_group.command("rm")
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also remove a run that is still running, the run an unfinished "
                                           "finetune would resume from, or an audit whose cleaned.csv other runs "
                                           "were made on.")
@click.option("--dry-run", is_flag=True, help="List the run folders that would be removed.")
@cache_dir_option
def runs_rm(run_ids: tuple[str, ...], force: bool, dry_run: bool, cache_dir: Path) -> None:
    """Remove run folders under <cache-dir>/runs/ by full ID or unambiguous prefix.

    \b
    Example: python cli.py runs rm 20261122-2330
    """
    registry = Registry(cache_dir)
    exports = {}  # what a user may serve from (README: predict --model cache/runs/<id>/export/...): named as it goes
    for run_id in run_ids:
        folder = registry.match(run_id).dir / "export"
        exports[folder.parent.name] = (sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
                                       if folder.is_dir() else [])  # not an export's staging left by a crash
    for folder in registry.remove(run_ids, force=force, dry_run=dry_run, resumable=has_checkpointed_epoch):
        held = exports.get(folder.name)
        click.echo(f"{'would remove' if dry_run else 'removed'} {folder}"
                   + (f" (with its export{'s' if len(held) > 1 else ''}: {', '.join(held)})" if held else ""))


@runs_group.command("compare")
@click.argument("run_ids", nargs=-1)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the PNG (default: <cache-dir>/runs/compare-<id>-<id>.png).")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="val", show_default=True,
              help="Split whose confusion matrices are plotted.")
@click.option("--no-plot", is_flag=True, help="Only print the table; write no PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of a table.")
@cache_dir_option
def runs_compare(run_ids: tuple[str, ...], out: Path | None, split: str, no_plot: bool, as_json: bool,
                 cache_dir: Path) -> None:
    """Compare two or more runs: differing parameters, metrics per split, curves and confusion matrices.

    \b
    Example: python cli.py runs compare 20261123-0002 20261123-0105
    """
    if out is not None:
        check_output_file(out, "--out", suffix=".png")
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out} does not end in .png; the plot is a PNG")
    registry = Registry(cache_dir)
    cmp = compare(resolve(registry, run_ids))
    plot = None
    if not no_plot:
        plot = plot_comparison(cmp.runs, out or default_plot_path(registry, cmp.runs), split=split)
    if as_json:
        click.echo(json.dumps(_finite(comparison_json(cmp, plot)), indent=2, default=str, allow_nan=False))
    else:
        Console(width=max(160, 34 + 23 * len(cmp.runs))).print(comparison_table(cmp))
    if plot is not None:
        click.echo(f"wrote {plot}", err=as_json)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinite numbers as None: JSON has no NaN, and parsers refuse a bare one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
