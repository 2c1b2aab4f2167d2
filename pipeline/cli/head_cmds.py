"""Stage 2's command: `fit-head` (one head, a sweep, or backbones ranked)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from pipeline.backbones.table import check_weights_size, get
from pipeline.cli.interrupts import set_resume_hint
from pipeline.cli.options import (SEED, FiniteFloat, build_request, extract_options, given_options,
                                  mlflow_after, mlflow_check, mlflow_options)
from pipeline.cli.shared import open_cache
from pipeline.errors import UserError
from pipeline.extract import is_concat, part_names, part_requests
from pipeline.extract.plan import check_size, plan
from pipeline.features.store import FeatureFile
from pipeline.heads.registry import DEFAULT_KIND, HEAD_KINDS, head_class
from pipeline.heads.schedules import OPTIMIZERS
from pipeline.layout import CacheLayout
from pipeline.tracking.metrics import metrics_table, summary_line
from pipeline.tracking.runs import Registry


def _make_head(head: str, opts: dict):
    """The head `--head` names, built by its own class from the options it takes."""
    return head_class(head).from_options(opts)


HEAD_OPTIONS = ("C", "class_weight", "jobs", "flatten", "hidden", "batchnorm", "dropout", "l2", "optimizer", "lr",
                "lr_schedule", "lr_start", "lr_min", "lr_max", "rampup_epochs", "sustain_epochs", "exp_decay",
                "epochs", "head_batch_size", "early_stopping", "seed", "memory_budget", "k", "vote_temperature")


@click.command("fit-head")
@click.option("--cache", default=None, help="Cache file path or key prefix (else: found/made from the "
                                            "extract options below).")
@click.option("--head", type=click.Choice(list(HEAD_KINDS)), default=DEFAULT_KIND, show_default=True,
              help="; ".join(f"{kind}: {summary}" for kind, (_, summary) in HEAD_KINDS.items()) + ".")
@click.option("--C", "C", default="auto", show_default=True, help="svm/logistic: inverse regularization, or auto (CV).")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None, help="Weight classes by 1/frequency.")
@click.option("--jobs", type=click.IntRange(1), default=2, show_default=True, help="Parallel CV folds / sweep jobs.")
@click.option("--flatten", type=click.Choice(["avg", "max", "flatten"]), default="avg", show_default=True,
              help="How full feature maps become vectors.")
@click.option("--hidden", type=click.IntRange(0), multiple=True, help="Dense: hidden units (repeat for more "
                                                                     "layers; 0 for none). Default 256.")
@click.option("--batchnorm", is_flag=True, help="Dense: BatchNormalization after each hidden layer.")
@click.option("--dropout", type=FiniteFloat(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--l2", type=FiniteFloat(0), default=0.0, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "exponential", "cosine"]), default="constant",
              show_default=True)
@click.option("--lr-start", type=FiniteFloat(), default=None, help="exponential: LR at epoch 0.")
@click.option("--lr-min", type=FiniteFloat(), default=None, help="exponential/cosine: floor.")
@click.option("--lr-max", type=FiniteFloat(), default=None,
              help="exponential/cosine: peak after ramp-up (default: --lr).")
@click.option("--rampup-epochs", type=int, default=None)
@click.option("--sustain-epochs", type=int, default=None)
@click.option("--exp-decay", type=FiniteFloat(), default=None)
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--head-batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--early-stopping", type=click.IntRange(1), default=None, metavar="PATIENCE",
              help="Stop after PATIENCE epochs without val-loss gain; keep the best weights.")
@click.option("--k", "k", default="auto", show_default=True, help="knn: neighbours that vote, or auto (CV).")
@click.option("--vote-temperature", default="auto", show_default=True,
              help="knn: T of the vote weights exp((similarity - 1) / T), or auto (CV).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Draws the heads' CV folds, the dense head's weights and batches, and the val split "
                   "carved from train where the data has none.")
@click.option("--memory-budget", type=FiniteFloat(0, min_open=True), default=None, metavar="MB",
              help="Train from memory while the training features fit in MB, else stream them from the "
                   "cache file (default: a quarter of physical memory).")
@click.option("--no-augmented", is_flag=True, help="Ignore augmented views in the cache.")
@click.option("--sweep", is_flag=True, help="Grid search over the head's own grid (C for svm and logistic; lr x "
                                            "dropout x hidden for dense; k x T for knn) in parallel; the best "
                                            "is saved.")
@extract_options
@mlflow_options
def fit_head_cmd(cache: str | None, head: str, sweep: bool, no_augmented: bool, mlflow: bool | None,
                 mlflow_experiment: str | None, **kw) -> None:
    """Train a classifier head on cached features and record the run.

    \b
    Example: python cli.py fit-head --data ../shared/data/hymenoptera
    """
    log_mlflow = mlflow_check(mlflow)
    head_opts = {k: kw.pop(k) for k in list(kw) if k in HEAD_OPTIONS}
    estimator = _make_head(head, head_opts).check_params()  # a bad option fails before any extraction
    backbones = backbone_list(kw["backbone"])
    if sweep and len(backbones) > 1:  # first: the --head advice below would lead into this refusal
        raise UserError("--sweep searches one backbone's head grid; rank the backbones first (without --sweep), "
                        "then sweep with --backbone set to the one kept")
    if sweep and estimator.sweep_grid is None:
        kinds = [f"--head {k}" for k in HEAD_KINDS if head_class(k).sweep_grid is not None]
        raise UserError(f"--sweep searches one head's grid, and --head {head} has none; add {' or '.join(kinds)}")
    refuse_unread_options(head, sweep)
    ranking = None
    if len(backbones) > 1:
        _check_ranking_options(backbones, kw, cache, estimator)
        ff, ranking = rank_backbones(backbones, kw, lambda: _make_head(head, head_opts), head_opts["seed"],
                                     not no_augmented)
    else:
        ff = open_cache(cache, {**kw, "backbone": backbones[0]})
    set_resume_hint("the features are cached; run the same command again (the head is fitted anew, in seconds "
                    "to minutes)")
    with ff:
        if len(ff.feature_shape) == 1 and given_options(lambda name: name == "flatten"):
            raise UserError(f"--flatten turns feature maps into vectors, but {ff.path.name} holds pooled vectors "
                            f"(pooling {ff.attrs.get('pooling')}); leave --flatten out, or extract with "
                            f"--pooling none for maps")
        from pipeline.heads.training import (  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
            check_finite, fit_head_run, split_rows)
        check_finite(ff)
        split_rows(ff, kw["val_fraction"], head_opts["seed"], not no_augmented)  # before the fit's note and run record
        if sweep:
            run_id = _run_sweep(ff, head, estimator, head_opts, kw["val_fraction"], not no_augmented)
            mlflow_after(log_mlflow, CacheLayout.of(ff.path).root, run_id, mlflow_experiment)
            return
        if estimator.fit_note():  # no bar for the CV fits: say what the next seconds (up to a minute) are
            click.echo(estimator.fit_note(), err=True)
        result, run = fit_head_run(ff, estimator, val_fraction=kw["val_fraction"], seed=head_opts["seed"],
                                   use_augmented=not no_augmented,
                                   config={"backbone_ranking": [r.as_json() for r in ranking]} if ranking else None)
    if result.head.after_fit_note():
        click.echo(result.head.after_fit_note())
    choice = result.extras.get("head_choice")
    if choice:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in choice["cv_log_loss"].items() if v is not None)
        click.echo(f"head auto: kept {choice['chosen']} (CV log loss {losses})"
                   + (f"; {choice['note']}" if choice.get("note") else ""))
    for part in ("train", "val", "test"):
        if result.metrics.get(part, {}).get("n"):
            click.echo(f"{part:5s} {summary_line(result.metrics[part])}")
    click.echo(f"fit in {result.fit_seconds:.2f}s; run {run.id} saved in {run.dir}")
    if result.metrics.get("val", {}).get("n"):
        Console(width=110).print(metrics_table(result.metrics["val"], title="val"))
    mlflow_after(log_mlflow, CacheLayout.of(run.dir).root, run.id, mlflow_experiment)


def refuse_unread_options(kind: str, sweep: bool) -> None:
    """Head options typed for a head kind that does not read them (each kind names its own in
    `options`), or that `--sweep` searches over its grid, are refused by name: ignored, they would
    change nothing, and the run would not say so."""
    cls = head_class(kind)
    unread = [name for name in HEAD_OPTIONS if name not in cls.options and not (sweep and name == "jobs")]
    names = [name for name in unread if given_options(name.__eq__)]
    flags = given_options(names.__contains__)
    if flags:
        readers = [f"--head {k}" for k in HEAD_KINDS if k != kind and set(names) <= head_class(k).options]
        them = "it" if len(flags) == 1 else "them"
        raise UserError(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} not read by --head {kind}; leave "
                        f"{them} out" + (f", or use {' or '.join(readers)}" if readers else ""))
    searched = given_options(lambda name: sweep and name in (cls.sweep_grid or {}))
    if searched:
        grid = "; ".join(f"{name} {values}" for name, values in cls.sweep_grid.items())
        raise UserError(f"--sweep searches {', '.join(searched)} over its own grid ({grid}); leave "
                        f"{'it' if len(searched) == 1 else 'them'} out, or fit one value without --sweep")


def backbone_list(spec: str) -> list[str]:
    """`--backbone a,b,c` as names (one name: a list of one; 'a+b' a concatenation), each checked
    against the backbone table before anything is extracted."""
    names = [b.strip() for b in spec.split(",")]
    if not all(names):
        raise UserError(f"--backbone {spec!r} has an empty name; give names separated by commas, e.g. "
                        f"efficientnet_lite0,efficientnet_lite2")
    # unknown names: one line, before the first extraction
    rows = ["+".join(get(n).name for n in part_names(name)) if is_concat(name) else get(name).name for name in names]
    dupes = sorted({n for n in rows if rows.count(n) > 1})
    if dupes:
        raise UserError(f"--backbone names {', '.join(dupes)} twice; name each backbone once")
    return names


def _check_ranking_options(backbones: list[str], kw: dict, cache: str | None, estimator) -> None:
    """Options that describe one backbone cannot apply to several, and each backbone must take the
    request: refuse before the first extraction, not after it."""
    if estimator.uses_validation:
        raise UserError(f"--head {estimator.kind} is scored on the val split, which would then not be held out; "
                        f"rank the backbones with the default head, then fit --head {estimator.kind} on the one kept")
    if cache is not None:
        raise UserError("--cache names one backbone's features; leave it out to rank several --backbone values")
    if kw["layer"]:
        raise UserError(f"--layer {kw['layer']} names a layer of one backbone; leave it out to rank "
                        f"{', '.join(backbones)} on their pooled features")
    if kw["weights"].lower() not in ("imagenet", "none"):
        raise UserError("--weights FILE holds one backbone's weights; rank backbones with --weights imagenet (or none)")
    if not estimator.cross_validates():
        raise UserError(f"--head {estimator.kind} with these options is not cross-validated (a given --C, say), "
                        f"so backbones cannot be ranked by it; leave --C at auto or use the default --head auto")
    for name in backbones:  # sizes, weights packages, data: what each extraction would refuse
        request, options = build_request({**kw, "backbone": name})
        for part in part_requests(request) if is_concat(name) else [request]:
            p = plan(part, options.cache_dir)
            check_size(p.size, options.allow_large)
            check_weights_size(p.spec, part.weights, p.size)


def rank_backbones(backbones: list[str], kw: dict, make_head, seed: int, use_augmented: bool):
    """Extract (or find) each backbone's features, fit the head on each training set, print the
    ranking by cross-validated log loss and return the best cache (open) and the ranking, best first."""
    from pipeline.heads.ranking import ranked, score_cache  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
    from pipeline.heads.training import check_finite  # noqa: PLC0415 - scikit-learn: keeps `--help` fast

    scores, paths = [], {}
    for i, name in enumerate(backbones, 1):
        click.echo(f"backbone {i}/{len(backbones)}: {name}", err=True)
        with open_cache(None, {**kw, "backbone": name}) as ff:
            check_finite(ff)
            scores.append(score_cache(ff, name, make_head, kw["val_fraction"], seed, use_augmented))
            paths[name] = ff.path
    order = ranked(scores)
    table = Table(title="backbones ranked by the head's cross-validated log loss on the training images")
    for col in ("rank", "backbone", "head", "CV log loss", "CV accuracy", "width", "extract img/s"):
        table.add_column(col, justify="left" if col in ("backbone", "head") else "right",
                         overflow="fold" if col == "backbone" else "ellipsis")
    for rank, s in enumerate(order, 1):
        table.add_row(str(rank), s.backbone, s.head, f"{s.cv_log_loss:.4f}",
                      "-" if s.cv_accuracy is None else f"{s.cv_accuracy:.4f}", str(s.width),
                      "-" if s.images_per_s is None else f"{s.images_per_s:.1f}")
    Console(width=110).print(table)
    click.echo(f"backbone ranking: kept {order[0].backbone}")
    return FeatureFile(paths[order[0].backbone]), order


def _run_sweep(ff, head: str, estimator, head_opts: dict, val_fraction: float, use_augmented: bool) -> str:
    from pipeline.heads.sweep import (  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
        results_table, save_sweep, sweep)
    from pipeline.heads.training import (  # noqa: PLC0415 - scikit-learn: keeps `--help` fast
        run_config, split_rows, split_table, write_split)

    registry = Registry(CacheLayout.of(ff.path).root)
    run = registry.start("fit-head", run_config(ff, estimator, sweep=True, val_fraction=val_fraction,
                                                 seed=head_opts["seed"], use_augmented=use_augmented))
    with run:
        base = {k: v for k, v in estimator.get_params().items() if k not in estimator.sweep_grid}
        results = sweep(ff, head, n_jobs=head_opts["jobs"], base_params=base, val_fraction=val_fraction,
                        seed=head_opts["seed"], use_augmented=use_augmented)
        save_sweep(results, run)
        write_split(run, split_table(ff, split_rows(ff, val_fraction, head_opts["seed"], use_augmented)))
        if results and results[0].head is not None:  # the config names the saved head's values, not the grid's base
            run.update_config(run_config(ff, results[0].head, sweep=True, val_fraction=val_fraction,
                                         seed=head_opts["seed"], use_augmented=use_augmented))
    Console(width=120).print(results_table(results, title=f"sweep ({len(results)} configs, best first)"))
    click.echo(f"best saved in run {run.id} ({run.dir})")
    return run.id
