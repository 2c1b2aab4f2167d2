"""Stage 3 as a user runs it: finetune from a fit-head run, resume, then evaluate/predict with it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from conftest import make_folder, run_cli

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--no-progress"]


def _mlflow_args() -> list[str]:
    """--mlflow where MLflow is installed (the test extra has it)."""
    import importlib.util
    return ["--mlflow"] if importlib.util.find_spec("mlflow") else []


def _run_id(stdout: str) -> str:
    return stdout.strip().splitlines()[-1].rsplit("run ", 1)[1].split()[0]


def _logistic_head_run(tmp_path: Path) -> tuple[str, str]:
    """(cache folder, run ID) of a logistic head fitted on 4 images per class."""
    data = make_folder(tmp_path / "d", per_class=4)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1")
    return cache, next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]


def _interrupted(*args, **kwargs):
    """Stands in for what Ctrl-C interrupts."""
    raise KeyboardInterrupt


def _interrupted_finetune(tmp_path: Path, monkeypatch) -> tuple[str, str, Any, str]:
    """(cache folder, head run ID, the finetune command's result, its run ID): a fine-tune of a logistic head
    interrupted by Ctrl-C before its first epoch (exit 130)."""
    from pipeline.finetune.tuner import FineTuner

    cache, head_run = _logistic_head_run(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(FineTuner, "fit", _interrupted)
        ft = run_cli("finetune", "--run", head_run, "--epochs", "1", "--no-progress", "--cache-dir", cache)
    assert ft.returncode == 130, ft.stderr
    return cache, head_run, ft, ft.stderr.split("run ", 1)[1].split(":")[0]


def test_finetune_cli_end_to_end(tmp_path):
    data = make_folder(tmp_path / "d", per_class=8)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1")
    assert fit.returncode == 0, fit.stderr
    head_run = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]

    runs_before = sorted(p.name for p in (Path(cache) / "runs").iterdir())
    bad = run_cli("finetune", "--run", head_run, "--unfreeze", "block5", "--unfreeze", "block9", "--cache-dir", cache)
    assert bad.returncode == 2 and "block5" in bad.stderr and "Traceback" not in bad.stderr
    assert "or --unfreeze-last N to train the last N layers instead" in bad.stderr
    zero = run_cli("finetune", "--run", head_run, "--unfreeze-last", "0", "--cache-dir", cache)
    assert zero.returncode == 2 and "'--unfreeze-last': 0 is not in the range x>=1" in zero.stderr, zero.stderr
    no_trunk = run_cli("finetune", "--run", head_run, "--unfreeze-last", "2", "--trunk-cache", "--cache-dir", cache)
    assert no_trunk.returncode == 2 and "no trunk cache: " in no_trunk.stderr, no_trunk.stderr
    # refused before the trunk cache was made or a run recorded
    assert sorted(p.name for p in (Path(cache) / "runs").iterdir()) == runs_before
    assert not list((Path(cache) / "features").glob("*-block4_pool-*"))

    ft = run_cli("finetune", "--run", head_run, "--unfreeze", "block5", "--epochs", "2", "--batch-size", "8",
                 "--augment", "flip,rotation=0.05", "--views", "1", "--cache-dir", cache, *_mlflow_args(),
                 isolated=bool(_mlflow_args()))  # MLflow keeps its tracking URI in the process that logged
    assert ft.returncode == 0, ft.stderr
    # the default: the frozen layers below block5 ran once per image and view, into the cache
    assert "trunk cache: " in ft.stderr and len(list((Path(cache) / "features").glob("*-block4_pool-*.h5"))) == 1
    assert "val   accuracy" in ft.stdout and "->" in ft.stdout
    ft_run = _run_id(ft.stdout)
    run_dir = Path(cache) / "runs" / ft_run
    for name in ("model.keras", "curves.png", "confusion_val.png", "calibration_val.png", "metrics.json"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "before" in metrics and "after" in metrics and metrics["epochs_run"] == 2
    assert "val   ece" in ft.stdout and f"recalibrated: temperature {metrics['temperature']:.3f}" in ft.stderr
    assert "early stopping kept" not in ft.stdout  # no early stopping: val picked no epoch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = keras.models.load_model(run_dir / "model.keras")
    assert not [str(w.message) for w in seen if "optimizer" in str(w.message)]  # "Skipping variable loading ..."
    assert model.output_shape == (None, 2)
    loss, accuracy = model.evaluate(np.zeros((2, 32, 32, 3), "float32"), np.array([0, 1]), verbose=0)  # compiled
    assert np.isfinite(loss) and accuracy == 0.5

    listing = run_cli("runs", "--stage", "finetune", "--cache-dir", cache)
    assert ft_run in listing.stdout
    ev = run_cli("evaluate", "--run", ft_run, "--data", str(data), "--split", "val", "--cache-dir", cache)
    assert ev.returncode == 0 and "(n=16)" in ev.stdout, ev.stderr
    pred = run_cli("predict", "--run", ft_run, str(data / "val" / "bees"), "--cache-dir", cache)
    assert pred.returncode == 0 and len(pred.stdout.strip().splitlines()) == 8, pred.stderr
    exported = run_cli("export", "--run", ft_run, "--cache-dir", cache)  # default: keras, in the run folder
    assert exported.returncode == 0, exported.stderr
    assert (run_dir / "export" / "keras" / "model.keras").is_file()  # checked against the run when written
    card = json.loads((run_dir / "export" / "keras" / "model_card.json").read_text())
    head_key = json.loads((Path(cache) / "runs" / head_run / "config.json").read_text())["cache_key"]
    assert card["stage"] == "finetune" and card["data"]["cache_key"] == head_key and len(head_key) == 64

    if _mlflow_args():  # logged to the default store, cache/mlflow.db: per-epoch metrics and the keras model
        import mlflow
        mlflow.set_tracking_uri(f"sqlite:///{Path(cache) / 'mlflow.db'}")
        mrun = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`featurecache.run_id` = '{ft_run}'")[0]
        history = mlflow.tracking.MlflowClient().get_metric_history(mrun.info.run_id, "val_loss")
        assert [m.step for m in history] == [0, 1] and "after_val_accuracy" in mrun.data.metrics
        assert mlflow.keras.load_model(f"runs:/{mrun.info.run_id}/model").output_shape == (None, 2)

    done = run_cli("finetune", "--resume", ft_run, "--cache-dir", cache)
    assert done.returncode == 2 and "already finished" in done.stderr
    ignored = run_cli("finetune", "--resume", ft_run, "--epochs", "3", "--lr", "0.1", "--cache-dir", cache)
    assert ignored.returncode == 2 and "leave out --lr, --epochs" in ignored.stderr, ignored.stderr


def test_finetune_killed_then_resumed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    data = make_folder(tmp_path / "d", per_class=8)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *FAST, "--head", "logistic", "--C", "1")
    head_run = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "finetune", "--run", head_run, "--epochs", "6",
                             "--batch-size", "8", "--cache-dir", str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    state = None
    while time.time() < deadline:
        found = [p for p in (cache / "runs").glob("*/checkpoint.json")]
        if found:
            state = json.loads(found[0].read_text())
            if state.get("epoch", 0) >= 1:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ft_dir = found[0].parent
    assert not (ft_dir / "model.keras").exists(), "killed too late"
    listing = run_cli("runs", "--stage", "finetune", "--cache-dir", str(cache))
    assert "incomplete" in listing.stdout
    from pipeline.cli.finetune_cmds import RESUME_LOCK
    from pipeline.locking import exclusive_lock
    with exclusive_lock(ft_dir / RESUME_LOCK) as held:  # another process resuming it: refused, not run beside it
        assert held
        twice = run_cli("finetune", "--resume", ft_dir.name, "--cache-dir", str(cache))
    assert twice.returncode == 2 and "is being resumed by another process" in twice.stderr, twice.stderr
    parent_rm = run_cli("runs", "rm", head_run, "--cache-dir", str(cache))  # the resume reads it again
    assert parent_rm.returncode == 2 and f"unfinished run {ft_dir.name} (finetune, incomplete)" in parent_rm.stderr
    assert (cache / "runs" / head_run).is_dir()
    resumed = run_cli("finetune", "--resume", ft_dir.name, "--cache-dir", str(cache), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((ft_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] >= 1 and metrics["epochs_run"] == 6
    assert (ft_dir / "model.keras").exists()


def test_finetune_interrupted_after_training_is_recorded_by_resume(tmp_path, monkeypatch):
    """Ctrl-C after the last epoch (the model saved, checkpoints dropped) but before the run was recorded:
    --resume trains nothing and records it (it refused 'already finished', leaving a failed run)."""
    import pipeline.tracking.plots as plots

    cache, head_run = _logistic_head_run(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(plots, "plot_history", _interrupted)
        ft = run_cli("finetune", "--run", head_run, "--epochs", "1", "--batch-size", "8", "--no-trunk-cache",
                     "--no-progress", "--cache-dir", cache, "--mlflow", "--mlflow-experiment", "tuned")
    ft_dir = Path(cache) / "runs" / ft.stderr.split("run ", 1)[1].split(":")[0]
    assert ft.returncode == 130 and f"finetune --resume {ft_dir.name} --cache-dir {cache}` continues it" in ft.stderr, ft.stderr
    assert (ft_dir / "model.keras").exists() and json.loads((ft_dir / "run.json").read_text())["status"] == "interrupted"
    model_bytes = (ft_dir / "model.keras").read_bytes()
    gone = run_cli("runs", "rm", head_run, "--force", "--cache-dir", cache)  # nothing left to train: not needed
    assert gone.returncode == 0, gone.stderr
    resumed = run_cli("finetune", "--resume", ft_dir.name, "--cache-dir", cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "training had finished before the interruption" in resumed.stderr and "val   accuracy" in resumed.stdout
    # started with --mlflow: the resumed run is logged as that command would have logged it
    assert "logged to MLflow run" in resumed.stderr, resumed.stderr
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{Path(cache) / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["tuned"])
    assert list(found["tags.featurecache.run_id"]) == [ft_dir.name], found.columns
    assert json.loads((ft_dir / "run.json").read_text())["status"] == "ok"
    metrics = json.loads((ft_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and "after" in metrics and (ft_dir / "curves.png").exists()
    assert (ft_dir / "model.keras").read_bytes() == model_bytes  # not trained again
    again = run_cli("finetune", "--resume", ft_dir.name, "--cache-dir", cache)
    assert again.returncode == 2 and "already finished" in again.stderr


def test_finetune_validates_on_the_fit_head_holdout_when_there_is_no_val_folder(tmp_path):
    """train/ and test/ only: fit-head holds out a seeded 20% of train; finetune validates on exactly
    those images (its 'before' column equals the head's val metrics), and early stopping works."""
    data = make_folder(tmp_path / "d", per_class=10, splits=("train", "test"))
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--dtype", "float32", "--head", "logistic", "--C", "1")
    assert fit.returncode == 0, fit.stderr
    head_run = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    head_metrics = json.loads((Path(cache) / "runs" / head_run / "metrics.json").read_text())
    assert head_metrics["split"]["val_source"] == "holdout"
    ft = run_cli("finetune", "--run", head_run, "--epochs", "3", "--early-stopping", "1", "--batch-size", "8",
                 "--no-progress", "--no-trunk-cache", "--cache-dir", cache)  # on the images every epoch
    assert ft.returncode == 0, ft.stderr
    assert "(stage-2 split)" in ft.stdout and "val   accuracy" in ft.stdout and "trunk cache" not in ft.stderr
    assert "━" not in ft.stdout + ft.stderr  # --no-progress: no per-step bar
    metrics = json.loads((Path(cache) / "runs" / _run_id(ft.stdout) / "metrics.json").read_text())
    assert metrics["val_source"] == "stage-2 split"
    assert metrics["val_images"] == head_metrics["split"]["val_images"] == head_metrics["val"]["n"]
    assert metrics["train_images"] == head_metrics["split"]["train_images"]
    assert metrics["before"]["val"]["accuracy"] == head_metrics["val"]["accuracy"]
    assert metrics["before"]["val"]["log_loss"] == pytest.approx(head_metrics["val"]["log_loss"], abs=1e-3)
    assert metrics["before"]["test"]["n"] == 20 and len(metrics["before"]) >= 2
    assert (f"note: early stopping kept epoch {metrics['best_epoch']} by the val loss, so the val figures are not "
            f"held out") in ft.stdout
    runs = Path(cache) / "runs"  # the fine-tune records the images it trained on, as its head's run does
    assert (runs / _run_id(ft.stdout) / "split.csv").read_text() != ""
    assert sorted((runs / _run_id(ft.stdout) / "split.csv").read_text().splitlines()) == sorted(
        (runs / head_run / "split.csv").read_text().splitlines())
    assert run_cli("runs", "rm", head_run, "--cache-dir", cache).returncode == 0
    own = run_cli("evaluate", "--run", _run_id(ft.stdout), "--data", str(data), "--split", "train", "--cache-dir", cache)
    assert own.returncode == 0 and "of the 20 images scored are run" in own.stderr, own.stderr  # its parent gone
    assert "give --split test, or images the run never trained on (it validated on a holdout" in own.stderr  # no val split
    (runs / _run_id(ft.stdout) / "split.csv").unlink()  # nothing left that says which: said so
    unknown = run_cli("evaluate", "--run", _run_id(ft.stdout), "--data", str(data), "--split", "train", "--cache-dir", cache)
    assert unknown.returncode == 0 and "cannot tell which images run" in unknown.stderr, unknown.stderr



def test_finetune_from_an_svm_run_starts_from_its_kernel_head(tmp_path):
    data = make_folder(tmp_path / "d", per_class=8)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "svm")
    assert fit.returncode == 0, fit.stderr
    head_run = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    ft = run_cli("finetune", "--run", head_run, "--epochs", "1", "--batch-size", "8", "--cache-dir", cache)
    assert ft.returncode == 0, ft.stderr
    run_dir = Path(cache) / "runs" / _run_id(ft.stdout)
    assert json.loads((run_dir / "config.json").read_text())["head"] == "finetune(svm)"
    model = keras.models.load_model(run_dir / "model.keras")

    def names(layer) -> list[str]:
        return [layer.name] + [n for sub in getattr(layer, "layers", []) for n in names(sub)]
    assert {"head", "unit_length", "rbf_kernel", "logits", "probabilities"} <= set(names(model))
    # the before column is the svm run's own val accuracy: the model starts as the fitted head
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit_val = json.loads((Path(cache) / "runs" / head_run / "metrics.json").read_text())["val"]["accuracy"]
    assert abs(metrics["before"]["val"]["accuracy"] - fit_val) < 1e-9


def test_finetune_from_a_knn_run_keeps_its_vote_fixed_and_trains_the_backbone(tmp_path):
    data = make_folder(tmp_path / "d", per_class=8)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "knn", "--k", "3")
    assert fit.returncode == 0, fit.stderr
    head_run = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    ft = run_cli("finetune", "--run", head_run, "--epochs", "1", "--batch-size", "8", "--cache-dir", cache)
    assert ft.returncode == 0, ft.stderr
    run_dir = Path(cache) / "runs" / _run_id(ft.stdout)
    assert json.loads((run_dir / "config.json").read_text())["head"] == "finetune(knn)"
    model = keras.models.load_model(run_dir / "model.keras")  # built-in layers and ops: loads without our code

    def leaves(layer) -> list:
        return [layer] + [x for sub in getattr(layer, "layers", []) for x in leaves(sub)]
    by_name = {layer.name: layer for layer in leaves(model)}
    assert {"similarity", "vote", "probabilities"} <= set(by_name)
    assert not by_name["similarity"].trainable and not by_name["vote"].trainable
    from pipeline.heads import load_head
    head = load_head(Path(cache) / "runs" / head_run)  # the memory did not move: only the backbone trained
    np.testing.assert_array_equal(by_name["similarity"].get_weights()[0], head.memory_.T)
    assert (by_name["vote"].get_weights()[0].argmax(axis=1) == head.memory_labels_).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit_val = json.loads((Path(cache) / "runs" / head_run / "metrics.json").read_text())["val"]["accuracy"]
    assert abs(metrics["before"]["val"]["accuracy"] - fit_val) < 1e-9


def test_ctrl_c_before_the_first_epoch_says_to_start_again_and_names_the_cache_folder(tmp_path, monkeypatch):
    """Interrupted before any epoch was checkpointed, the hint offered a --resume that could not work (no
    checkpoint); it left out --cache-dir, so the printed command looked in the default cache. Ctrl-C
    records the run as interrupted, not failed."""
    cache, head_run, ft, ft_id = _interrupted_finetune(tmp_path, monkeypatch)
    assert "no epoch had finished, so there is nothing to resume; run the same command again" in ft.stderr, ft.stderr
    assert f"cli.py runs rm {ft_id} --cache-dir {cache}" in ft.stderr and "--resume" not in ft.stderr
    assert json.loads((Path(cache) / "runs" / ft_id / "run.json").read_text())["status"] == "interrupted"
    # options this run would not read are refused before anything runs, not recorded as if used
    none = run_cli("finetune", "--run", head_run, "--views", "0", "--augment", "none", "--epochs", "1", "--no-progress",
                   "--cache-dir", cache)  # no augmentation, clean maps only: consistent, so it runs
    assert none.returncode == 0 and "--augment makes" not in none.stderr, none.stderr
    for args, fragment in ((["--no-trunk-cache", "--views", "3"], "and --no-trunk-cache trains without it"),
                           (["--unfreeze-last", "1", "--views", "2"], "and --unfreeze-last 1 trains without it"),
                           (["--trunk-cache", "--views", "0", "--augment", "flip"], "and --views 0 keeps none"),
                           (["--views", "0", "--augment", "flip"], "and --views 0 keeps none")):  # the default cache
        refused = run_cli("finetune", "--run", head_run, *args, "--cache-dir", cache)
        assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr


def test_resume_after_the_head_run_was_removed_and_finetune_after_the_data_moved_say_what_happened(tmp_path, monkeypatch):
    """An interrupted fine-tune whose head run was removed (`runs rm --force`) named only an 'unknown run ID';
    a run whose data folder moved warned that images 'changed' and then failed on a bare 'data path not found'."""
    cache, head_run, ft, ft_id = _interrupted_finetune(tmp_path, monkeypatch)
    (tmp_path / "d").rename(tmp_path / "moved")
    moved = run_cli("finetune", "--run", head_run, "--epochs", "1", "--no-progress", "--cache-dir", cache)
    assert moved.returncode == 2 and f"is no longer at {tmp_path / 'd'} (moved, renamed or removed)" in moved.stderr
    assert "changed or went missing" not in moved.stderr and "Traceback" not in moved.stderr
    assert run_cli("cache", "rm", "--all", "--yes", "--cache-dir", cache).returncode == 0  # its features gone too: the same line
    gone_too = run_cli("finetune", "--run", head_run, "--epochs", "1", "--no-progress", "--cache-dir", cache)
    assert gone_too.returncode == 2 and f"is no longer at {tmp_path / 'd'} (moved" in gone_too.stderr, gone_too.stderr
    assert run_cli("runs", "rm", head_run, "--force", "--cache-dir", cache).returncode == 0
    gone = run_cli("finetune", "--resume", ft_id, "--cache-dir", cache)
    assert gone.returncode == 2 and f"started from head run {head_run}, which is no longer in" in gone.stderr, gone.stderr
