"""Stage 3: `finetune --run ID` fine-tunes the top blocks end to end, starting from a fitted head."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from pipeline.backend import BACKENDS, check_recorded, name as backend_name, select as select_backend
from pipeline.cli.interrupts import set_resume_hint
from pipeline.cli.options import SEED, FiniteFloat, cache_dir_option, given_options, mlflow_after, mlflow_check, mlflow_options, parse_augment
from pipeline.errors import UserError
from pipeline.finetune.checkpoints import finished_result, has_checkpointed_epoch
from pipeline.finetune.results import format_comparison
from pipeline.heads.registry import trusting_pickles
from pipeline.heads.schedules import OPTIMIZERS
from pipeline.layout import cache_dir_flags
from pipeline.locking import exclusive_lock
from pipeline.tracking.runs import Registry, Run


_RESUME_KEEPS = {"resume_id", "no_progress", "trust_pickle", "cache_dir", "backend", "mlflow", "mlflow_experiment"}


RESUME_LOCK = ".resume.lock"  # in the run folder, held by the one process resuming it


@click.command("finetune")
@click.option("--run", "run_id", default=None, help="The fit-head run to start from.")
@click.option("--resume", "resume_id", default=None, help="Continue this interrupted finetune run instead.")
@click.option("--unfreeze", multiple=True, help="Top block(s) to train, e.g. block5 (VGG), conv5 (ResNet), "
                                                "block7 (EfficientNet/Lite). Default: the topmost block "
                                                "(EfficientNet-Lite: top, block7, block6).")
@click.option("--unfreeze-last", type=click.IntRange(1), default=None,
              help="Or: train the backbone's last N layers (with --unfreeze: those blocks too).")
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=None,
              help="Default: a tenth of a dense head's LR; 2e-4 after a logistic or svm head.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "exponential", "cosine"]), default="cosine",
              show_default=True, help="cosine: one ramp-up epoch, then down to lr/100.")
@click.option("--epochs", type=click.IntRange(1), default=8, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--early-stopping", type=click.IntRange(1), default=None, metavar="PATIENCE")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None)
@click.option("--augment", default="flip,rotation,zoom,brightness,contrast", show_default=True,
              help="Random views of the training images, each optionally =STRENGTH; 'none' for none.")
@click.option("--trunk-cache/--no-trunk-cache", default=None,
              help="Run the frozen layers once per image and view into the cache and train the unfrozen top on "
                   "those maps (default: whenever whole blocks are unfrozen and the disk has room); "
                   "--no-trunk-cache runs the whole backbone on the images every epoch, with a new view each epoch.")
@click.option("--views", type=click.IntRange(0), default=4, show_default=True,
              help="Trunk cache: augmented views per training image (epochs cycle clean, view 1, ..., view N).")
@click.option("--label-smoothing", type=FiniteFloat(0, 1, max_open=True), default=0.1, show_default=True,
              help="Soften the one-hot targets; 0 measured better on thousands of images, 0.1 on a few hundred "
                   "(docs/quality.md).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No per-step progress bar (one line per epoch instead).")
@click.option("--trust-pickle", is_flag=True, help="Also load an old pickled head.joblib from the fit-head run "
                                                   "(unpickling can run code; only for runs you trust).")
@cache_dir_option
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Keras backend (default: KERAS_BACKEND).")
@mlflow_options
def finetune_cmd(run_id: str | None, resume_id: str | None, unfreeze: tuple[str, ...], unfreeze_last: int | None,
                 lr: float | None, optimizer: str, lr_schedule: str, epochs: int, batch_size: int,
                 early_stopping: int | None, class_weight: str | None, augment: str, trunk_cache: bool | None,
                 views: int, label_smoothing: float, seed: int,
                 no_progress: bool, trust_pickle: bool, cache_dir: Path, backend: str | None, mlflow: bool | None,
                 mlflow_experiment: str | None) -> None:
    """Fine-tune the backbone's top blocks with the fitted head on top, on the raw images.

    \b
    Example: python cli.py finetune --run 20261122-2330 --unfreeze block7 --epochs 3
    """
    from pipeline.finetune.handover import stage2_inputs  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.finetune.tuner import FineTuner  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.heads.training import write_split  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.inference.apply import val_source  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.tracking.plots import plot_run  # noqa: PLC0415 - matplotlib: keeps `--help` fast

    select_backend(backend)
    log_mlflow = mlflow_check(mlflow)
    registry = Registry(cache_dir)
    if resume_id:
        given = given_options(lambda name: name not in _RESUME_KEEPS)
        if given:
            raise UserError(f"--resume continues the run with its own settings; leave out {', '.join(given)} "
                            f"(or start a new run with --run)")
    if resume_id:
        record = registry.get(resume_id)
        if record.stage != "finetune":
            raise UserError(f"--resume takes a finetune run; {record.id} is a run of {record.stage}")
        if record.status == "ok":
            raise UserError(f"finetune run {record.id} already finished; nothing to resume")
        if record.status == "running":
            raise UserError(f"finetune run {record.id} is still running (pid {record.info.get('pid')} on "
                            f"{record.info.get('host')}); resume it once it has stopped")
        # held until the command ends: a second --resume of the run at the same time is refused, not run beside it
        if not click.get_current_context().with_resource(exclusive_lock(record.dir / RESUME_LOCK)):
            raise UserError(f"finetune run {record.id} is being resumed by another process; wait for it to finish")
        # interrupted after its training finished (while plotting or logging): nothing to train, only to record,
        # so its head run is not read again (it may be gone: runs rm --force)
        finished = finished_result(record.dir)
        parent_id = str(record.config.get("parent_run"))
        try:
            parent = registry.get(parent_id) if finished is None else None
        except UserError:
            raise UserError(f"finetune run {record.id} started from head run {parent_id}, which is no longer in "
                            f"{registry.root}, so it cannot be resumed; fit-head and fine-tune again") from None
        tuner = FineTuner.from_checkpoint(record.dir)
        if no_progress:
            tuner.verbose = 2
        check_recorded(record.config, f"finetune run {record.id}")
        run = Run(registry, record.id, "finetune", record.config)  # reopen the same folder
        logged = record.config.get("mlflow")
        if mlflow is None and isinstance(logged, dict):  # started with MLflow logging: the finished run is logged too
            log_mlflow = mlflow_check(True)
            mlflow_experiment = mlflow_experiment or logged.get("experiment")
    else:
        if not run_id:
            raise click.UsageError("give --run ID (a fit-head run) or --resume ID (an interrupted finetune run)")
        finished = None
        parent = registry.get(run_id)
        parent_id = parent.id
        if parent.stage != "fit-head":
            raise UserError(f"finetune starts from a fit-head run; {parent.id} is a run of {parent.stage}")
        tuner = FineTuner(unfreeze=list(unfreeze) or None, unfreeze_last=unfreeze_last, lr=lr, optimizer=optimizer,
                          lr_schedule=lr_schedule, epochs=epochs, batch_size=batch_size,
                          early_stopping=early_stopping, class_weight=class_weight,
                          augment=None if augment.strip().lower() == "none" else parse_augment(augment), seed=seed,
                          trunk_cache=trunk_cache, views=views, label_smoothing=label_smoothing,
                          verbose=2 if no_progress or not sys.stdout.isatty() else 1)  # per-step bar (ETA) or a line per epoch
    if not resume_id:  # options this run would not read: refused, not recorded as if they applied
        given = set(given_options(lambda name: name in {"views", "augment"}))
        without = ("--no-trunk-cache" if trunk_cache is False else
                   f"--unfreeze-last {unfreeze_last}" if unfreeze_last and not trunk_cache else None)
        if "--views" in given and without:
            raise UserError(f"--views sets how many augmented views the trunk cache keeps, and {without} trains "
                            f"without it (each epoch draws a new view of every image); leave --views out")
        makes_views = augment.strip().lower() != "none"
        if "--augment" in given and makes_views and views == 0 and without is None:  # a trunk cache, asked or default
            raise UserError("--augment makes the trunk cache's views, and --views 0 keeps none (the clean images "
                            "only); give --views N or leave --augment out")
    if finished is None:
        with trusting_pickles(trust_pickle):
            inputs = stage2_inputs(parent.dir, progress=not no_progress)
    if not resume_id:  # a typo in --unfreeze fails now, not after a failed run record
        tuner.check_params(inputs.request.backbone)
        config = {"parent_run": parent.id, "backbone": inputs.request.backbone, "data": inputs.request.data,
                  "head_val_source": val_source(parent),  # where its val images came from: evaluate's advice
                  "head": f"finetune({inputs.head.kind})", "cache_file": str(inputs.cache_path),
                  "cache_key": inputs.head.cache_key_,  # the features its head was fitted on (the export's card)
                  "request": inputs.request.to_json(), "class_names": list(inputs.head.class_names_),
                  "params": {"unfreeze": ",".join(unfreeze) or (f"last{unfreeze_last}" if unfreeze_last else "default"),
                             "lr": lr or tuner.default_lr(inputs.head), "epochs": epochs},
                  "finetune_params": tuner.get_params(), "backend": backend_name()}
        if log_mlflow:  # so that --resume logs the run where this command would have
            config["mlflow"] = {"experiment": mlflow_experiment}
        run = registry.start("finetune", config)
        if inputs.split:  # the images its head trained, validated and tested on: fine-tuning's too
            write_split(run, [(path, name) for name, files in inputs.split.items() for path in files])
    if finished is None:
        click.echo(f"run {run.id}: fine-tuning {inputs.request.backbone} from head run {parent.id}", err=True)
    else:
        click.echo(f"run {run.id}: its training had finished before the interruption; recording the results", err=True)
    where = "".join(f" {shlex.quote(w)}" for w in cache_dir_flags(cache_dir))

    def hint() -> str:  # what Ctrl-C leaves depends on when it comes
        if has_checkpointed_epoch(run.dir) or finished_result(run.dir) is not None:
            return f"the last finished epoch is checkpointed; `cli.py finetune --resume {run.id}{where}` continues it"
        return (f"no epoch had finished, so there is nothing to resume; run the same command again "
                f"(`cli.py runs rm {run.id}{where}` removes this run)")

    set_resume_hint(hint)
    with run:
        result = finished or tuner.fit(inputs.request, inputs.head, run.dir, resume=bool(resume_id),
                                       log=lambda m: click.echo(m, err=True), split=inputs.split,
                                       cache_dir=cache_dir, progress=not no_progress)
        run.log_metrics(result.run_metrics())
        plot_run(run.dir, "fine-tuning", history=result.history, reports={"val": result.metrics_after.get("val")})
        run.finish("ok")
    click.echo(f"validated on {result.n_val} images ({result.val_source}); trained on {result.n_train}")
    click.echo(format_comparison(result.comparison))
    held = result.early_stopping_note()
    if held:
        click.echo(held)
    note = result.worse_note(parent_id)
    if note:
        click.echo(note, err=True)
    click.echo(f"{result.epochs_run} epoch(s) in {result.seconds:.1f}s; model {result.model_path}; run {run.id}")
    mlflow_after(log_mlflow, cache_dir, run.id, mlflow_experiment)
