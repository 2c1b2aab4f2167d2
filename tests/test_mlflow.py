"""MLflow tracking (`--mlflow`): a real SQLite store, searched and loaded with MLflow's own API."""

from __future__ import annotations

import json

import numpy as np
import pytest

# each command in a process of its own, as a user's: MLflow keeps its tracking URI and logging handlers
# in the process that set them
from conftest import make_folder, run_cli_isolated as run_cli

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install -e '.[mlflow]')")

LITE = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--no-progress"]


def _run_id(stdout: str) -> str:
    return next(l for l in stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]


def _mlflow_run(uri: str, run_id: str):
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`featurecache.run_id` = '{run_id}'",
                               output_format="list")
    assert len(found) == 1, found
    return found[0]


def test_fit_head_logs_params_metrics_pngs_and_a_loadable_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # on by itself when the URI is set
    data = make_folder(tmp_path / "d", per_class=12)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "logistic", "--C", "1.0",
                  "--mlflow-experiment", "ants-vs-bees", cwd=tmp_path)  # a user's sqlite store: ./mlruns artifacts
    assert fit.returncode == 0, fit.stderr
    assert "logged to MLflow run" in fit.stderr and "WARNING" not in fit.stderr
    run_id = _run_id(fit.stdout)
    run_dir = cache / "runs" / run_id
    mrun = _mlflow_run(uri, run_id)

    assert mlflow.get_experiment(mrun.info.experiment_id).name == "ants-vs-bees"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mlflow"]["run_id"] == mrun.info.run_id                       # linked both ways
    show = run_cli("runs", "show", run_id, "--cache-dir", str(cache))
    assert f"mlflow: run {mrun.info.run_id} (experiment {mrun.info.experiment_id})" in show.stdout, show.stdout
    assert mrun.data.tags["backbone"] == "efficientnet_lite0" and len(mrun.data.tags["cache_key"]) == 64
    assert mrun.data.tags.get("data_fingerprint")
    assert mrun.data.params["head"] == "logistic" and mrun.data.params["head_params.C"] == "1.0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("train", "val"):
        for name in ("accuracy", "log_loss", "macro_f1", "n"):
            assert mrun.data.metrics[f"{split}_{name}"] == pytest.approx(metrics[split][name], abs=1e-12)

    client = mlflow.tracking.MlflowClient()
    files = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"confusion_val.png", "metrics.json", "config.json", "head.json"} <= files

    from pipeline.backbones import get
    from pipeline.backbones.model import feature_model
    from pipeline.inference.apply import load_run, predict_paths
    from pipeline.inference.embed import run_model
    run = load_run(cache, run_id)
    paths = [str(p) for p in sorted((data / "val").rglob("*.jpg"))[:10]]
    expected, _, _ = predict_paths(run, paths)                                  # what predict --run prints
    feats, _, _ = run_model(feature_model(get("efficientnet_lite0"), "imagenet", 64), paths, 64, "stretch")
    model = mlflow.pyfunc.load_model(f"runs:/{mrun.info.run_id}/model")
    got = np.asarray(model.predict(feats))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_dense_sweep_and_default_store(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI, --mlflow writes cache/mlflow.db; a dense head logs its epochs and
    a keras model; a sweep logs one child run per configuration."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_folder(tmp_path / "d", per_class=8)
    cache = tmp_path / "c"
    dense = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "dense",
                    "--epochs", "3", "--mlflow")
    assert dense.returncode == 0, dense.stderr
    sweep = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "logistic", "--sweep",
                    "--jobs", "1", "--mlflow")
    assert sweep.returncode == 0, sweep.stderr
    uri = f"sqlite:///{cache / 'mlflow.db'}"
    assert (cache / "mlflow.db").is_file()
    mrun = _mlflow_run(uri, _run_id(dense.stdout))
    assert mrun.info.artifact_uri.startswith((cache / "mlflow-artifacts").as_uri())  # not ./mlruns
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "loss")] == [0, 1, 2]
    assert len(client.get_metric_history(mrun.info.run_id, "val_loss")) == 3
    assert "curves.png" in {a.path for a in client.list_artifacts(mrun.info.run_id)}
    keras_model = mlflow.keras.load_model(f"runs:/{mrun.info.run_id}/model")
    assert keras_model.output_shape[-1] == 2

    sweep_id = next(l for l in sweep.stdout.splitlines() if "best saved in run" in l).split("run ")[1].split()[0]
    parent = _mlflow_run(uri, sweep_id)
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    n_configs = len(json.loads((cache / "runs" / sweep_id / "sweep.json").read_text()))
    assert len(children) == n_configs > 1
    assert all("val_accuracy" in c.data.metrics and c.data.params for c in children)


def test_an_unreachable_server_warns_once_and_keeps_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    data = make_folder(tmp_path / "d", per_class=6)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    warnings = [l for l in fit.stderr.splitlines() if "MLflow logging failed" in l]
    assert len(warnings) == 1 and "Traceback" not in fit.stderr
    run_dir = cache / "runs" / _run_id(fit.stdout)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok" and (run_dir / "head.npz").exists()
    off = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "logistic", "--C", "1.0", "--no-mlflow")
    assert off.returncode == 0 and "MLflow" not in off.stderr


def test_mlflow_wanted_but_missing_is_one_line(monkeypatch):
    import importlib.util

    from pipeline.errors import UserError
    from pipeline.tracking import mlflow_log
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install -e \"\.\[mlflow\]\""):
        mlflow_log.require()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_log.enabled(None) is False and mlflow_log.enabled(True) is True
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert mlflow_log.enabled(None) is True and mlflow_log.enabled(False) is False


@pytest.mark.parametrize("kind", ["svm", "knn"])
def test_an_svm_or_knn_head_is_logged_as_keras_layers_that_predict_like_the_head(tmp_path, monkeypatch, kind):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = make_folder(tmp_path / "d", per_class=10)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", kind, cwd=tmp_path)
    assert fit.returncode == 0 and "logged to MLflow run" in fit.stderr, fit.stderr
    run_id = _run_id(fit.stdout)
    mrun = _mlflow_run(uri, run_id)
    assert mrun.data.params["head"] == kind
    from pipeline.features.store import FeatureFile
    from pipeline.heads import load_head
    head = load_head(cache / "runs" / run_id)
    with FeatureFile(json.loads((cache / "runs" / run_id / "config.json").read_text())["cache_file"]) as ff:
        feats = ff.load(ff.rows("val"))
    got = np.asarray(mlflow.pyfunc.load_model(f"runs:/{mrun.info.run_id}/model").predict(feats))
    np.testing.assert_allclose(got, head.predict_proba(feats), atol=1e-4)


def test_an_audit_is_logged_with_its_counts_report_and_cleaned_manifest(tmp_path, monkeypatch):
    import re

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = make_folder(tmp_path / "d", per_class=6)
    fast = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--dtype", "float32", "--no-progress"]
    proc = run_cli("audit", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *fast, "--no-map", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "logged to MLflow run" in proc.stderr
    run_id = re.search(r"audit (\S+) in", proc.stdout).group(1)
    mrun = _mlflow_run(uri, run_id)
    assert mrun.data.tags["featurecache.stage"] == "audit"
    audit = json.loads((tmp_path / "c" / "runs" / run_id / "audit.json").read_text())
    assert mrun.data.metrics["counts_images"] == audit["counts"]["images"] == 24
    files = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(mrun.info.run_id)}
    assert {"audit.json", "report.html", "cleaned.csv", "label_issues.csv"} <= files


def test_a_run_named_by_mlflow_run_id_gets_each_command_as_a_child_run(tmp_path, monkeypatch):
    """MLFLOW_RUN_ID (docs: an active run is reused): logging failed on the experiment, or renamed the
    user's run 'my pipeline', and a second command's params clashed with the first's."""
    from pipeline.tracking.mlflow_log import log_run
    from pipeline.tracking.runs import Registry

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("outer")
    with mlflow.start_run(experiment_id=experiment, run_name="my pipeline") as outer:
        pass
    reg = Registry(tmp_path / "c")
    for c in (1.0, 3.0):
        with reg.start("fit-head", {"head": "logistic", "params": {"C": c}}) as run:
            run.log_metrics({"val": {"accuracy": 0.5}})
        monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
        assert log_run(tmp_path / "c", run.id) is not None
    assert mlflow.get_run(outer.info.run_id).info.run_name == "my pipeline"
    children = mlflow.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{outer.info.run_id}'",
                                  output_format="list")
    assert sorted(r.data.params["params.C"] for r in children) == ["1.0", "3.0"]
