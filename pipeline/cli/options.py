"""Options shared by every command that names an extraction (extract, fit-head, ...)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from pipeline.atomic import file_in_the_way
from pipeline.backbones.table import DEFAULT_BACKBONE
from pipeline.data.sources import BUILTIN_DEFAULT, SplitConfig
from pipeline.errors import UserError
from pipeline.backend import BACKENDS, select as select_backend
from pipeline.extract import MAX_IMAGE_SIZE, DEFAULT_CACHE, DTYPES, POOLINGS, PRECISIONS, ExtractRequest, RunOptions
from pipeline.data.augment import AugmentConfig
from pipeline.data.decode import RESIZE_METHODS
from pipeline.export.mlflow_model import log_model
from pipeline.tracking import mlflow_log


class FiniteFloat(click.FloatRange):
    """A float option (optionally in a range) that also refuses nan and inf, which pass any range check."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        """Nothing for an unbounded one: click's own text read 'x<=None' in --help."""
        return "" if self.min is None and self.max is None else super()._describe_range()


SEED = click.IntRange(0, 2**32 - 1)  # what NumPy, TensorFlow and JAX all accept as a seed

def _absolute(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A folder by its absolute path (links kept as named): what runs record outlives the working folder."""
    return None if value is None else Path(os.path.abspath(os.path.expanduser(value)))


cache_dir_option = click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_CACHE,
                                callback=_absolute,
                                help="Cache root (default: the cache/ folder of this checkout, wherever the command runs).")  # every command's, declared once


def cache_dir_shown(cache_dir: Path) -> str:
    """The cache folder as messages name it, saying so where it does not exist (a mistyped --cache-dir
    reads as an empty cache otherwise)."""
    path = Path(cache_dir).expanduser().resolve()
    return f"{path}" if path.exists() else f"{path} (no such folder)"

trust_pickle_option = click.option(
    "--trust-pickle", is_flag=True,
    help="Also load an old pickled head.joblib (from an older version); unpickling can run code, so only "
         "for runs you trust.")

allow_outside_paths_option = click.option(
    "--allow-outside-paths", is_flag=True, help="Let a CSV manifest name files outside its own folder (refused by default).")

_EXTRACT_OPTIONS = [
    click.option("--data", default=BUILTIN_DEFAULT, show_default=True,
                 help="Image folder (one subfolder per class, optionally under train/val/test), "
                      "CSV manifest path,label[,split], tfds:NAME, or builtin:digits."),
    click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
                 help="Backbone name; `cli.py backbones` lists them. fit-head: several, comma-separated (a,b,c), "
                      "ranks them by cross-validation on the training images and keeps the best. a+b: the pooled "
                      "features of both side by side (each extracted once, then joined). hub:PRESET: a "
                      "keras-hub preset by name or local folder."),
    click.option("--weights", default="imagenet", show_default=True, help="imagenet, none, or a weights file."),
    click.option("--image-size", type=int, default=None, help="Input size (default: the backbone's)."),
    click.option("--resize", type=click.Choice(RESIZE_METHODS), default="stretch", show_default=True,
                 help="stretch to a square, or crop: shorter side to size, then centre crop."),
    click.option("--pooling", type=click.Choice(POOLINGS), default="avg", show_default=True,
                 help="Global pooling of the feature map (a transformer's tokens); cls: the class token "
                      "(keras-hub transformers); none keeps full maps."),
    click.option("--layer", default=None, help="Take features from this intermediate layer."),
    click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
                 help="Stored feature dtype."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
                 help="Compute precision; mixed = bfloat16 where the GPU does it natively, else float16."),
    click.option("--augment-copies", type=int, default=0, show_default=True,
                 help="Also store K augmented views of every training image."),
    click.option("--augment-seed", type=SEED, default=0, show_default=True),
    click.option("--augment-ops", default="flip,rotation,zoom,brightness,contrast", show_default=True,
                 help="Augmentations for --augment-copies, each optionally =STRENGTH (e.g. rotation=0.1)."),
    click.option("--split-names", default="train,val,test", show_default=True,
                 help="Folder names of the train, val and test splits."),
    click.option("--val-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.2, show_default=True,
                 help="Validation share when the data has no split folders."),
    click.option("--test-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.0, show_default=True),
    click.option("--split-seed", type=SEED, default=0, show_default=True),
    allow_outside_paths_option,
    cache_dir_option,
    click.option("--batch-size", type=int, default=32, show_default=True),
    click.option("--chunk-size", type=int, default=512, show_default=True,
                 help="Images per resumable chunk written while extracting."),
    click.option("--compression", type=click.Choice(["none", "gzip", "lzf"]), default="none", show_default=True),
    click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    click.option("--backend", type=click.Choice(BACKENDS), default=None,
                 help="Keras backend (default: KERAS_BACKEND or ~/.keras/keras.json, else tensorflow). "
                      "Part of the cache key."),
    click.option("--workers", type=click.IntRange(1, 256), default=None,
                 help="Decode threads (default: one per CPU core)."),
    click.option("--allow-large", is_flag=True, help=f"Permit --image-size above {MAX_IMAGE_SIZE}."),
]

def extract_options(fn: Callable) -> Callable:
    """Decorate a click command with every option that names an extraction."""
    for opt in reversed(_EXTRACT_OPTIONS):
        fn = opt(fn)
    return fn


def mlflow_options(fn: Callable) -> Callable:
    """`--mlflow/--no-mlflow` (default: on when MLFLOW_TRACKING_URI is set) and `--mlflow-experiment`."""
    fn = click.option("--mlflow-experiment", default=None, metavar="NAME",
                      help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else featurecache).")(fn)
    return click.option("--mlflow/--no-mlflow", "mlflow", default=None,
                        help="Also log the run to MLflow (default: on when MLFLOW_TRACKING_URI is set; "
                             "else the store is cache/mlflow.db).")(fn)


def mlflow_check(flag: bool | None) -> bool:
    """Whether to log to MLflow; refuses before any work when it is wanted but not installed."""
    on = mlflow_log.enabled(flag)
    if on:
        mlflow_log.require()
    return on


def mlflow_after(on: bool, cache_dir: Path, run_id: str | None, experiment: str | None) -> None:
    """Log a recorded run to MLflow and say where (a failure is one warning; the local run stays)."""
    if not on or not run_id:
        return
    mlflow_id = mlflow_log.log_run(cache_dir, run_id, experiment, log_model=log_model)
    if mlflow_id:
        click.echo(f"logged to MLflow run {mlflow_id} ({mlflow_log.tracking_uri(cache_dir)})", err=True)


def parse_augment(spec: str) -> AugmentConfig:
    """'flip,rotation=0.1' -> AugmentConfig with the named ops on (others off)."""
    defaults = AugmentConfig().as_dict()
    chosen: dict[str, Any] = {k: (False if k == "flip" else 0.0) for k in defaults}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in defaults:
            raise UserError(f"unknown augmentation {name!r}; choose from {', '.join(defaults)}")
        if name == "flip":
            if value:
                raise UserError(f"flip takes no strength ({part!r}); name it to turn it on, leave it out to turn it off")
            chosen[name] = True
        else:
            try:
                chosen[name] = float(value) if value else defaults[name]
            except ValueError:
                raise UserError(f"augmentation strength must be a number: {part!r}") from None
    return AugmentConfig(**chosen)


def split_names(spec: str) -> tuple[str, ...]:
    """--split-names 'train,val,test' as the folder names (SplitConfig checks there are three)."""
    return tuple(s.strip() for s in spec.split(","))


def build_request(kw: dict[str, Any]) -> tuple[ExtractRequest, RunOptions]:
    """Turn parsed options into the request (what is hashed) and run options (what is not)."""
    select_backend(kw.get("backend"))
    names = split_names(kw["split_names"])
    if kw["batch_size"] < 1 or kw["chunk_size"] < 1:
        raise UserError("--batch-size and --chunk-size must be at least 1")
    if kw["image_size"] is not None and kw["image_size"] < 1:
        raise UserError("--image-size must be a positive number of pixels")
    request = ExtractRequest(
        data=kw["data"], backbone=kw["backbone"], weights=kw["weights"], image_size=kw["image_size"],
        resize=kw["resize"], pooling=kw["pooling"], layer=kw["layer"], dtype=kw["dtype"],
        precision=kw["precision"], augment_copies=kw["augment_copies"], augment_seed=kw["augment_seed"],
        augment=parse_augment(kw["augment_ops"]),
        split=SplitConfig(names, kw["val_fraction"], kw["test_fraction"], kw["split_seed"],
                          allow_outside_paths=kw.get("allow_outside_paths", False)),
    )
    if request.augment_copies and not request.augment.ops_spec():
        raise UserError(f"--augment-copies {request.augment_copies} makes augmented views, but --augment-ops turns "
                        f"every op off, so each view would copy its image; name an op (e.g. --augment-ops "
                        f"{AugmentConfig().ops_spec()}) or leave out --augment-copies")
    options = RunOptions(cache_dir=kw["cache_dir"], batch_size=kw["batch_size"], chunk_units=kw["chunk_size"],
                         compression=None if kw["compression"] == "none" else kw["compression"],
                         progress=not kw["no_progress"], workers=kw.get("workers"),
                         allow_large=bool(kw.get("allow_large")))
    return request, options


def given_options(wanted: Callable[[str], bool]) -> list[str]:
    """The current command's options typed on the command line (not defaults) whose parameter name
    `wanted` accepts, as their flags (e.g. ['--epochs']): for refusing options a mode would ignore."""
    ctx = click.get_current_context()
    return [p.opts[0] for p in ctx.command.params
            if wanted(p.name) and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]


def check_output_file(path: str | Path, option: str, suffix: str = ".csv") -> None:
    """Refuse an output file path that cannot be written (a folder, or under a file), or that would
    replace a file of another kind (an image being predicted, an exported model), before any work."""
    if str(path) == "-":
        raise UserError(f"{option} - would write a file named '-'; give a file name ending in {suffix}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and path.suffix.lower() != suffix:
        raise UserError(f"{option} {path} exists and is not a {suffix} file, so writing would replace it; give a "
                        f"new file name (an existing {suffix} file is replaced)")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise UserError(f"{option} {path}: {blocked} is a file, not a folder")
    folder = next(p for p in path.absolute().parents if p.is_dir())  # the file's folder, or where it would be made
    try:  # a read-only folder, /proc, /sys: found before the work, not when the result is written
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write in {folder} ({exc.strerror or exc}); give a file in a folder "
                        f"you can write") from None
