"""`extract` and `backbones` commands."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from pipeline.cli.interrupts import set_resume_hint
from pipeline.cli.options import build_request, extract_options, mlflow_after, mlflow_check, mlflow_options
from pipeline.cli.shared import report_extraction
from pipeline import backbones as bb
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.extract.ray_distributor import extract_ray
from pipeline.features.store import records_hashes


@click.command("extract")
@extract_options
@click.option("--force", is_flag=True, help="Recompute even when the cache has this request.")
@click.option("--content-hash", is_flag=True,
              help="Also store each file's SHA-256: a later extract of changed data (also with --content-hash) "
                   "reuses rows by the bytes, so touched or copied files are not recomputed.")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute only shard I of N (chunks c with c % N == I), e.g. in a Slurm array; the last "
                   "shard to finish, or a plain extract afterwards, assembles the file.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Compute on a Ray cluster: no value starts a local one, 'auto' joins the running one, or "
                   "give its address; --workers then sets the number of Ray workers (default: one per GPU, else one per CPU core up to 4).")
@mlflow_options
def extract_cmd(force: bool, content_hash: bool, shard: str | None, ray_address: str | None, mlflow: bool | None,
                mlflow_experiment: str | None, **kw) -> None:
    """Run the frozen backbone once over --data and cache the features in HDF5.

    \b
    Example: python cli.py extract --data ../shared/data/hymenoptera --backbone mobilenetv2 --image-size 160
    """
    log_mlflow = mlflow_check(mlflow)
    request, options = build_request(kw)
    options.force = force
    if force:  # run again as it was, --force would recompute the kept chunks too
        set_resume_hint("finished chunks are kept; run the same command without --force to resume")
    options.content_hash = content_hash
    options.shard = parse_shard(shard) if shard is not None else None
    if ray_address is not None:
        if shard is not None:
            raise UserError("--ray and --shard are two ways to spread the work; use one")
        n_workers, options.workers = options.workers, None
        result = extract_ray(request, options, ray_address, n_workers)
    else:
        result = extract(request, options)
    report_extraction(result)
    if content_hash and result.cache_hit and not records_hashes(result.path):
        # a hit is the file as it was made: --content-hash adds nothing to it
        click.echo(f"note: {result.path.name} was extracted without --content-hash, so it holds no content "
                   f"hashes; add --force to extract it again with them", err=True)
    mlflow_after(log_mlflow, options.cache_dir, result.run_id, mlflow_experiment)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/4 (shard 0 of 4), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N, e.g. 0/{max(n, 2)} ... {max(n, 2) - 1}/{max(n, 2)}")
    return i, n


@click.command("backbones")
@click.argument("name", required=False)
@click.option("--layers", is_flag=True, help="With NAME: list its layer names (builds the model).")
def backbones_cmd(name: str | None, layers: bool) -> None:
    """List the backbones (name, input size, preprocessing, top blocks), or one backbone's layers.

    \b
    Example: python cli.py backbones mobilenetv2 --layers
    """
    if layers and not name:
        raise click.UsageError("--layers lists one backbone's layer names: give its NAME, e.g. "
                               "`python cli.py backbones mobilenetv2 --layers`")
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
    if not name:
        click.echo("hub:PRESET: a keras-hub preset by name (downloaded by keras-hub) or a local preset folder "
                   "(pip install -e \".[hub]\")")
