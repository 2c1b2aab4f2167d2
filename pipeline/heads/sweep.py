"""Hyperparameter sweeps over a head's grid, scored on validation macro-F1, run in parallel.

Features are reduced once (`ReducedFeatures`) and shared with joblib's loky worker processes
(large arrays are memory-mapped, not copied). Dense configurations that share a model structure
(everything but the learning-rate settings and epochs) run in the same worker on one compiled
Keras model, reset between fits, so graph tracing is paid once per structure. Each worker keeps
BLAS and the Keras backend (TensorFlow, JAX or PyTorch) to one thread, so `n_jobs` processes never
oversubscribe the cores, and prints nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from joblib import Parallel, delayed
from rich.table import Table

from pipeline import backend
from pipeline.atomic import write_text_atomic
from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads.base import FeatureSource, Head, ReducedFeatures, fit_meta, jsonable
from pipeline.heads.folds import stratified_holdout
from pipeline.heads.registry import HEAD_KINDS, head_class, make_head
from pipeline.tracking.metrics import classification_report


@dataclass
class SweepResult:
    """One grid point: its parameters, validation metrics, fit time, and (for the best) the fitted head."""

    params: dict[str, Any]
    metrics: dict[str, Any]
    fit_seconds: float
    head: Head | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def val_macro_f1(self) -> float:
        return float(self.metrics.get("macro_f1") or 0.0)

    @property
    def val_accuracy(self) -> float:
        return float(self.metrics.get("accuracy") or 0.0)

    def row(self) -> dict[str, Any]:
        """JSON-ready summary for sweep.json and tables."""
        return {"params": jsonable(self.params), "val_accuracy": self.val_accuracy, "val_macro_f1": self.val_macro_f1,
                "val_log_loss": self.metrics.get("log_loss"), "fit_seconds": round(self.fit_seconds, 3),
                **jsonable(self.extras)}


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of a {param: [values]} grid, in a stable order."""
    keys = list(grid)
    for k in keys:
        if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Sequence) or len(grid[k]) == 0:
            raise UserError(f"grid entry {k!r} must be a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(
    data: FeatureFile | tuple[np.ndarray, np.ndarray],
    head_type: str,
    grid: Mapping[str, Sequence[Any]] | None = None,
    n_jobs: int = 1,
    *,
    base_params: Mapping[str, Any] | None = None,
    val_data: tuple[np.ndarray, np.ndarray] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    use_augmented: bool = True,
    keep_all: bool = False,
) -> list[SweepResult]:
    """Fit one head per grid point, score on validation, return results best first (by macro-F1).

    data: a FeatureFile (split as in `training.split_rows`) or (X, y) arrays with `val_data` or a
    stratified `val_fraction` holdout. The best result keeps its fitted head (`results[0].head`);
    the others only with `keep_all`.
    """
    cls = head_class(head_type) if head_type in HEAD_KINDS else None
    if cls is None or cls.sweep_grid is None:
        kinds = [k for k in HEAD_KINDS if head_class(k).sweep_grid is not None]
        raise UserError(f"a sweep needs one head type ({', '.join(kinds)}), not {head_type!r}")
    configs = expand_grid(grid if grid is not None else cls.sweep_grid)
    base = dict(base_params or {})
    make_head(head_type, **{**base, **configs[0]})  # fail fast on unknown parameter names
    train, y, val, yv, meta = _prepare(data, head_type, base, configs, val_data, val_fraction, seed, use_augmented)
    configs = cls.sweep_fits(configs, int(y.size))
    tasks = _tasks(head_type, base, configs, n_jobs)
    started = time.perf_counter()
    if n_jobs == 1 or len(tasks) == 1:
        outputs = [_run_task(head_type, base, chunk, train, y, val, yv, meta, limit_threads=False) for chunk in tasks]
    else:
        outputs = Parallel(n_jobs=min(n_jobs, len(tasks)), backend="loky", inner_max_num_threads=1, batch_size=1)(
            delayed(_run_task)(head_type, base, chunk, train, y, val, yv, meta, limit_threads=True) for chunk in tasks)
    flat = [item for out in outputs for item in out]
    results = [SweepResult(params=params, metrics=report, fit_seconds=secs, extras=extras)
               for params, report, secs, _, extras in flat]
    blobs = [blob for *_, blob, _ in flat]
    order = sorted(range(len(results)), key=lambda i: (-results[i].val_macro_f1, _loss(results[i]),
                                                       -results[i].val_accuracy))
    results = [results[i] for i in order]
    blobs = [blobs[i] for i in order]
    for i, (res, blob) in enumerate(zip(results, blobs)):
        if i == 0 or keep_all:
            res.head = pickle.loads(blob)
    if results:
        results[0].extras["sweep_seconds"] = round(time.perf_counter() - started, 3)
    return results


def _loss(result: SweepResult) -> float:
    ll = result.metrics.get("log_loss")
    return float(ll) if ll is not None else float("inf")


def _prepare(data, head_type, base, configs, val_data, val_fraction, seed, use_augmented):
    """Reduced train/val features (one per flatten mode in the grid), labels, and head metadata."""
    modes = sorted({c.get("flatten", base.get("flatten", "avg")) for c in configs})
    if isinstance(data, FeatureFile):
        from pipeline.heads.training import split_rows  # noqa: PLC0415 - matplotlib: kept out of the sweep workers

        ff = data
        split = split_rows(ff, val_fraction, seed, use_augmented)
        train = {m: ReducedFeatures.of(FeatureSource(ff, split.train), m) for m in modes}
        val = {m: ReducedFeatures.of(FeatureSource(ff, split.val), m) for m in modes}
        y, yv = ff.labels[split.train].astype(np.int64), ff.labels[split.val].astype(np.int64)
        meta = {**fit_meta(ff), "groups": ff.index[split.train], "paths": [ff.paths[r] for r in split.train]}
        return train, y, val, yv, meta
    X, y = (np.asarray(a) for a in data)
    y = y.astype(np.int64)
    if val_data is not None:
        Xv, yv = np.asarray(val_data[0]), np.asarray(val_data[1]).astype(np.int64)
    else:
        if not 0 < val_fraction < 1:
            raise UserError("give val_data or a val_fraction between 0 and 1")
        idx_tr, idx_va = stratified_holdout(np.arange(y.size), y, val_fraction, seed)
        X, Xv, y, yv = X[idx_tr], X[idx_va], y[idx_tr], y[idx_va]
    train = {m: ReducedFeatures.of(X, m) for m in modes}
    val = {m: ReducedFeatures.of(Xv, m) for m in modes}
    n_classes = int(max(y.max(), yv.max())) + 1
    meta = {"class_names": [str(i) for i in range(n_classes)], "cache_key": None, "feature_info": None}
    return train, y, val, yv, meta


def _tasks(head_type: str, base: Mapping[str, Any], configs: list[dict], n_jobs: int) -> list[list[dict]]:
    """Split configs into worker tasks: grouped by compiled model structure where the head compiles one
    (dense: configs differing only in `sweep_schedule_only` parameters share it), then balanced over jobs."""
    cls = head_class(head_type)
    if cls.sweep_schedule_only is None:
        n = max(1, min(n_jobs, len(configs)))
        return [configs[i::n] for i in range(n)]
    groups: dict[str, list[dict]] = {}
    for c in configs:
        full = {**base, **c}
        key = repr(sorted((k, repr(v)) for k, v in full.items() if k not in cls.sweep_schedule_only))
        groups.setdefault(key, []).append(c)
    tasks = list(groups.values())
    while len(tasks) < n_jobs and max(len(t) for t in tasks) > 1:  # split big groups to use every worker
        tasks.sort(key=len)
        big = tasks.pop()
        tasks += [big[: len(big) // 2], big[len(big) // 2:]]
    # longest first, so workers that finish early pick up the short tasks (LPT scheduling)
    return sorted(tasks, key=lambda t: -sum(cls.sweep_cost({**base, **c}) for c in t))


def _quiet_worker() -> None:
    """Inside a worker process: one BLAS thread and one backend thread (so `n_jobs` workers never
    oversubscribe the cores), and no start-up chatter. Set before Keras loads its backend; the
    worker's stderr goes to /dev/null (its errors still reach the parent as exceptions)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:  # JAX's CPU client: one thread per worker
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    if os.environ.get("PIPELINE_SWEEP_STDERR") != "keep":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    if backend.name() == "tensorflow" and "tensorflow" not in sys.modules:
        import tensorflow as tf  # noqa: PLC0415 - only on TensorFlow, after the thread settings above

        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialized in this (reused) worker
            pass
    elif backend.name() == "torch":
        import torch  # noqa: PLC0415 - only on PyTorch, after the thread settings above

        torch.set_num_threads(1)


def _run_task(head_type, base, configs, train, y, val, yv, meta, limit_threads: bool) -> list[tuple]:
    """Fit each config of one task; returns (params, val report, seconds, pickled head, extras) per config."""
    if limit_threads:
        _quiet_worker()
    reuse: dict = {}
    out = []
    for params in configs:
        full = {**base, **params}
        if "n_jobs" in head_class(head_type).param_names():
            full.setdefault("n_jobs", 1)
        head = make_head(head_type, **full)
        mode = full.get("flatten", "avg")
        t0 = time.perf_counter()
        kwargs = dict(class_names=meta["class_names"], cache_key=meta["cache_key"], feature_info=meta["feature_info"])
        if meta.get("groups") is not None:  # an image's augmented views stay in one CV fold (never vote for it)
            kwargs["groups"] = meta["groups"]
        if head.explains and meta.get("paths") is not None:
            kwargs["paths"] = meta["paths"]
        head.fit_for_sweep(train[mode], y, val[mode], yv, reuse, **kwargs)
        extras = head.sweep_facts()
        secs = time.perf_counter() - t0
        report = classification_report(yv, head.predict_proba(val[mode]), meta["class_names"])
        out.append((params, report, secs, pickle.dumps(head), extras))
    return out


def results_table(results: Sequence[SweepResult], title: str | None = None):
    """Rich table of sweep results, best first: rank, parameters, val accuracy / macro-F1 / log loss, time."""
    table = Table(title=title, title_justify="left")
    for name in ("#", "parameters", "val acc", "val F1", "val log loss", "fit s"):
        table.add_column(name, justify="left" if name == "parameters" else "right")
    for i, r in enumerate(results, 1):
        ll = r.metrics.get("log_loss")
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items())
        table.add_row(str(i), params, f"{r.val_accuracy:.3f}", f"{r.val_macro_f1:.3f}",
                      "-" if ll is None else f"{ll:.3f}", f"{r.fit_seconds:.1f}")
    return table


def save_sweep(results: Sequence[SweepResult], run) -> dict[str, Any]:
    """Write sweep.json (every result) and the best head into a `runs.Run`; returns the metrics logged."""
    write_text_atomic(run.path("sweep.json"), json.dumps([r.row() for r in results], indent=2) + "\n")
    metrics: dict[str, Any] = {"n_configs": len(results)}
    if results:
        best = results[0]
        metrics.update(best_params=jsonable(best.params), val=best.metrics,
                       sweep_seconds=best.extras.get("sweep_seconds"))
        if best.head is not None:
            best.head.save(run.path(best.head.artifact))
        _best_plots(best, run)
    run.log_metrics(metrics)
    return metrics


def _best_plots(best: SweepResult, run) -> None:
    """The best configuration's PNGs, as any fit-head run has them: training curves (dense heads),
    the C curve (logistic heads) and the val confusion matrix."""
    from pipeline.tracking.plots import plot_run  # noqa: PLC0415 - matplotlib: kept out of the sweep workers

    head = best.head
    plot_run(run.dir, f"best {head.kind} head of the sweep", history=head.training_history(), c_curve=head.c_curve(),
             reports={"val": best.metrics})
