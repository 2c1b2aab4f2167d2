"""Optional MLflow tracking (`--mlflow`, extra `.[mlflow]`, imported only when used).

A run is logged after the tool has recorded it in its own registry, from what the run folder holds,
so MLflow can never lose or block the local run: parameters (the flattened config), final metrics
per split, per-epoch metrics (dense heads, fine-tuning), a sweep's configurations as child runs,
the PNGs and JSON files, and the head or model through the `log_model` the caller passes
(`pipeline.export.mlflow_model`: each in MLflow's keras flavour).
Tags carry the backbone, cache key and data fingerprint; the MLflow run id is written back into
the tool's run.json. An active MLflow run is reused. With no MLFLOW_TRACKING_URI the store is
`<cache>/mlflow.db` (SQLite; MLflow's file store is deprecated) with artifacts in
`<cache>/mlflow-artifacts/`. Any failure warns once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pipeline.errors import DataWarning, UserError
from pipeline.features.store import FeatureFile
from pipeline.layout import CacheLayout
from pipeline.tracking.compare import flatten
from pipeline.tracking.runs import Registry, RunRecord, write_json

DEFAULT_EXPERIMENT = "featurecache"
_ARTIFACTS = (".png", ".json", ".csv", ".html")  # .csv and .html: an audit's findings and report
_MAX_PARAM = 6000  # MLflow's limit on one parameter value


def enabled(flag: bool | None) -> bool:
    """`--mlflow/--no-mlflow` when given, else on exactly when MLFLOW_TRACKING_URI is set (the convention)."""
    return flag if flag is not None else bool(os.environ.get("MLFLOW_TRACKING_URI"))


def require() -> None:
    """Refuse `--mlflow` in one line, before any work, when MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise UserError("--mlflow needs MLflow: pip install -e \".[mlflow]\" (or unset MLFLOW_TRACKING_URI)")


def tracking_uri(cache_dir: str | os.PathLike) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite database in the cache folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cache_dir).absolute() / 'mlflow.db'}"


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric figure of metrics.json as one MLflow metric: per split `val_accuracy`,
    `val_log_loss`, ...; a fine-tune's `before_`/`after_` figures; top-level numbers as they are."""
    out: dict[str, float] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                if key in ("per_class", "confusion_matrix", "class_names", "cv_scores", "history"):
                    continue
                walk(value, f"{prefix}{key}_" if prefix or key else prefix)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out[prefix.rstrip("_")] = float(obj)

    walk(metrics, "")
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep MLflow's own log lines, warnings and prints (emoji run links) off the terminal."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def log_run(cache_dir: str | os.PathLike, run_id: str, experiment: str | None = None,
            log_model: Callable[[Any, RunRecord], None] | None = None) -> str | None:
    """Log the recorded run `run_id` to MLflow; returns the MLflow run id, or None after one warning.
    `log_model(mlflow, record)` logs the run's model (the stages above know how; tracking does not)."""
    # An unreachable server should cost seconds, not MLflow's default minutes of retries; and
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: the process's environment is restored after.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                                            "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}  # start_run deletes the last
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    where = CacheLayout(cache_dir).run(run_id)
    try:
        record = Registry(cache_dir).get(run_id)
        where = record.dir
        with _quiet():
            mlflow_id, experiment_id, uri = _log(record, cache_dir, experiment, log_model)
        info = dict(record.info)
        info["mlflow"] = {"run_id": mlflow_id, "experiment_id": experiment_id, "tracking_uri": uri}
        write_json(record.dir / "run.json", info)
    except Exception as exc:  # noqa: BLE001 - tracking must never lose or fail the local run
        text = " ".join(str(exc).split())[:600]  # MLflow puts the fix at the end of its message (a file store refused)
        warnings.warn(f"MLflow logging failed ({type(exc).__name__}: {text}); the run is kept in {where}",
                      DataWarning, stacklevel=2)
        return None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return mlflow_id


def _log(record: RunRecord, cache_dir: str | os.PathLike, experiment: str | None,
         log_model: Callable[[Any, RunRecord], None] | None) -> tuple[str, str, str]:
    import mlflow  # noqa: PLC0415 - optional extra .[mlflow], imported only when logging

    uri = tracking_uri(cache_dir)
    own_store = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports the variable
    mlflow.set_tracking_uri(uri)
    active = mlflow.active_run()
    outer = os.environ.pop("MLFLOW_RUN_ID", None) if active is None else None
    if outer:  # the user's run (a pipeline's, `mlflow run`'s): each command a child run in its experiment, its
        # name and params left alone (logging into it renamed it, and a second command's params clashed)
        parent = mlflow.get_run(outer)
        context = mlflow.start_run(run_name=f"{record.stage} {record.id}", experiment_id=parent.info.experiment_id,
                                   tags={"mlflow.parentRunId": outer})
    elif active is None:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        if own_store and mlflow.get_experiment_by_name(name) is None:
            # our default store keeps its artifacts beside it, not in ./mlruns of whatever folder we run in
            artifacts = (Path(cache_dir).absolute() / "mlflow-artifacts").as_uri()
            try:
                mlflow.create_experiment(name, artifact_location=artifacts)
            except mlflow.exceptions.MlflowException:
                if mlflow.get_experiment_by_name(name) is None:  # not just a concurrent run creating it
                    raise
        mlflow.set_experiment(name)
        context = mlflow.start_run(run_name=f"{record.stage} {record.id}")
    else:  # a run this process started (the library used from a script): logged into
        context = contextlib.nullcontext(active)
    with context as run:
        mlflow.set_tags(_tags(record))
        params = {k: _param_text(v) for k, v in flatten(record.config).items()}
        mlflow.log_params(params)
        metrics = final_metrics(record.metrics)
        if metrics:
            mlflow.log_metrics(metrics)
        _log_history(mlflow, record.history() or {})
        for path in sorted(record.dir.iterdir()):
            if path.is_file() and path.suffix in _ARTIFACTS:
                mlflow.log_artifact(str(path))
        if log_model is not None:
            log_model(mlflow, record)
        _log_sweep(mlflow, record)
        return run.info.run_id, run.info.experiment_id, uri


def _tags(record: RunRecord) -> dict[str, str]:
    cfg = record.config
    tags = {"featurecache.run_id": record.id, "featurecache.stage": record.stage,
            "featurecache.run_dir": str(record.dir)}
    for key in ("backbone", "cache_key", "data", "head", "parent_run"):
        if cfg.get(key) is not None:
            tags[key] = str(cfg[key])
    fingerprint = cfg.get("data_fingerprint") or _fingerprint(cfg.get("cache_file") or cfg.get("cache_path"))
    if fingerprint:
        tags["data_fingerprint"] = str(fingerprint)
    return tags


def _fingerprint(cache_file: str | None) -> str | None:
    """The data fingerprint stored in the cache file the run used (None when it is gone)."""
    if not cache_file or not Path(cache_file).is_file():
        return None
    try:
        with FeatureFile(cache_file) as ff:
            value = ff.attrs.get("data_fingerprint")
    except Exception:  # noqa: BLE001 - a tag is not worth failing over
        return None
    return None if value is None else str(value)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def _log_history(mlflow, history: Mapping[str, list[float]]) -> None:
    """Per-epoch metrics (step = epoch) in one batch call."""
    from mlflow.entities import Metric  # noqa: PLC0415 - optional extra .[mlflow], imported only when logging

    now = int(time.time() * 1000)
    batch = [Metric(key, float(v), now, step) for key, values in history.items() for step, v in enumerate(values)]
    if batch:
        client, run_id = mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id
        for start in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[start:start + 1000])


def requirements(*dists: str) -> list[str]:
    """Pinned requirements of a logged model, given rather than inferred (MLflow's inference loads
    the model in a subprocess: seconds per run). Keras models also need their backend's library."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    names = list(dists)
    if "keras" in names:
        names.append({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[keras.backend.backend()])
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def _log_sweep(mlflow, record: RunRecord) -> None:
    """Each configuration of a sweep as a child run with its parameters and val metrics."""
    path = record.dir / "sweep.json"
    if not path.is_file():
        return
    rows = json.loads(path.read_text())
    for k, row in enumerate(rows if isinstance(rows, list) else []):
        with mlflow.start_run(run_name=f"config {k}", nested=True):
            params = row.get("params") if isinstance(row.get("params"), Mapping) else {}
            mlflow.log_params({key: _param_text(v) for key, v in flatten(params).items()})
            numbers = {key: float(v) for key, v in row.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                mlflow.log_metrics(numbers)
            mlflow.set_tag("featurecache.sweep_rank", str(k))
