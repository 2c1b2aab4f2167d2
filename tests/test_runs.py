"""Training on a cache (row selection, holdout, errors, recorded runs) and the runs registry."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn
from rich.console import Console

from pipeline.errors import UserError
from pipeline.heads import DenseHead, FeatureSource, LogisticHead, load_head
from pipeline.tracking.runs import Registry, format_duration
from pipeline.features.store import FeatureFile
from pipeline.heads.training import evaluate_on_cache, fit_head_on_cache, fit_head_run, predict_on_cache, split_rows

from helpers_features import write_cache

ROOT = Path(__file__).resolve().parents[1]


class RecordingHead(LogisticHead):
    """A logistic head that remembers which cache rows it was given for training and validation."""

    uses_validation = True  # so fit-head hands it the validation rows too

    def fit(self, X, y, X_val=None, y_val=None, **kw):
        self.seen_train_, self.seen_val_ = np.array(X.rows), np.array(X_val.rows)
        return super().fit(X, y, **kw)


@pytest.fixture(scope="module")
def aug_cache(tmp_path_factory):
    """train/val/test splits, two augmented views per training image."""
    return write_cache(tmp_path_factory.mktemp("aug"), n_images=240, dim=16, views=2, sep=2.0)


@pytest.fixture(scope="module")
def noval_cache(tmp_path_factory):
    """No 'val' split (train/test only), two augmented views per training image."""
    return write_cache(tmp_path_factory.mktemp("noval"), n_images=240, dim=16, views=2, sep=2.0,
                       split_fractions=(0.8, 0, 0.2))


def test_augmented_views_train_but_never_validate(aug_cache):
    with FeatureFile(aug_cache) as ff:
        head = RecordingHead(C=1.0)
        result = fit_head_on_cache(ff, head)
        train, val = head.seen_train_, head.seen_val_
        assert set(ff.splits[train]) == {"train"} and set(ff.views[train]) == {0, 1, 2}
        assert set(ff.splits[val]) == {"val"} and set(ff.views[val]) == {0}
        assert result.split.val_source == "val split" and result.split.n_augmented_rows == (ff.views > 0).sum()
        assert set(result.metrics) == {"train", "val", "test"}
        assert result.metrics["val"]["n"] == val.size and result.metrics["test"]["n"] == ff.rows("test").size
        assert result.metrics["val"]["accuracy"] > 0.8
        head2 = RecordingHead(C=1.0)
        fit_head_on_cache(ff, head2, use_augmented=False)
        assert set(ff.views[head2.seen_train_]) == {0} and head2.seen_train_.size == ff.rows("train").size


def test_holdout_is_stratified_and_excludes_every_view_of_held_out_images(noval_cache):
    with FeatureFile(noval_cache) as ff:
        head = RecordingHead(C=1.0)
        result = fit_head_on_cache(ff, head, val_fraction=0.25, seed=3)
        train, val = head.seen_train_, head.seen_val_
        assert result.split.val_source == "holdout"
        assert set(ff.views[val]) == {0} and set(ff.splits[val]) == {"train"}
        held = set(ff.index[val])
        assert held.isdisjoint(ff.index[train])                      # no view of a held-out image trains
        n_clean = ff.rows("train").size
        assert val.size == pytest.approx(0.25 * n_clean, abs=1)
        assert train.size == (n_clean - val.size) * 3                 # the rest, with both augmented views
        share = np.bincount(ff.labels[val], minlength=3) / val.size   # stratified: class shares kept
        whole = np.bincount(ff.labels[ff.rows("train")], minlength=3) / n_clean
        assert np.abs(share - whole).max() < 0.05
        again = split_rows(ff, 0.25, seed=3)
        np.testing.assert_array_equal(again.val, val)                # reproducible for a seed
        assert not np.array_equal(split_rows(ff, 0.25, seed=4).val, val)


def test_unlabelled_or_single_class_caches_are_user_errors(tmp_path):
    unlabelled = write_cache(tmp_path / "u", n_images=30, labels=np.full(30, -1))
    with FeatureFile(unlabelled) as ff, pytest.raises(UserError, match="no labels") as err:
        fit_head_on_cache(ff, LogisticHead(C=1.0))
    assert "\n" not in str(err.value)
    one = write_cache(tmp_path / "o", n_images=30, labels=np.zeros(30, int), class_names=["cat", "dog", "emu"])
    with FeatureFile(one) as ff, pytest.raises(UserError, match="at least two classes.*'cat'"):
        fit_head_on_cache(ff, LogisticHead(C=1.0))


def test_head_used_on_a_different_cache_is_refused(tmp_path, aug_cache):
    with FeatureFile(aug_cache) as ff:
        head = fit_head_on_cache(ff, LogisticHead(C=1.0)).head
        assert evaluate_on_cache(head, ff)["n"] > 0 and predict_on_cache(head, ff).shape[1] == 3
    other_dim = write_cache(tmp_path / "d", n_images=40, dim=8)
    renamed = write_cache(tmp_path / "c", n_images=40, dim=16, class_names=["x", "y", "z"])
    other_net = write_cache(tmp_path / "b", n_images=40, dim=16, attrs={"backbone": "resnet50"})
    for path, match in [(other_dim, "shape"), (renamed, "classes"), (other_net, "backbone")]:
        with FeatureFile(path) as ff, pytest.raises(UserError, match=match):
            evaluate_on_cache(head, ff)


def test_fit_head_run_records_config_metrics_artifacts(aug_cache, tmp_path):
    registry = Registry(tmp_path / "cache")
    with FeatureFile(aug_cache) as ff:
        result, run = fit_head_run(ff, LogisticHead(Cs=(0.1, 1.0)), registry=registry)
    files = {p.name for p in run.dir.iterdir()}
    assert {"config.json", "metrics.json", "run.json", "head.npz", "head.json", "c_curve.png", "confusion_val.png",
            "confusion_test.png"} <= files
    config = json.loads((run.dir / "config.json").read_text())
    assert config["head"] == "logistic" and config["cache_file"] == str(aug_cache) and config["backbone"] == "synthetic"
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == result.metrics["val"]["accuracy"] and metrics["split"]["augmented_rows"] > 0
    rec = registry.get(run.id[:17])
    assert rec.status == "ok" and rec.stage == "fit-head" and rec.duration_s >= 0 and rec.val_accuracy > 0.8
    assert isinstance(load_head(run.dir), LogisticHead)
    env = json.loads((run.dir / "run.json").read_text())["environment"]  # what can move a trained figure
    assert env["python"] == platform.python_version() and env["cpu_count"] == len(os.sched_getaffinity(0)) and env["cpu"]
    assert env["keras_backend"] in ("tensorflow", "jax", "torch") and isinstance(env["gpus"], list)
    assert env["packages"]["numpy"] == np.__version__ and env["packages"]["scikit-learn"] == sklearn.__version__


def test_dense_fit_head_run_writes_keras_head_and_training_curves(aug_cache, tmp_path):
    registry = Registry(tmp_path / "cache")
    with FeatureFile(aug_cache) as ff:
        result, run = fit_head_run(ff, DenseHead(hidden=(8,), epochs=3, batch_size=32), registry=registry)
        assert {"head.keras", "head.json", "curves.png", "confusion_val.png"} <= {p.name for p in run.dir.iterdir()}
        metrics = json.loads((run.dir / "metrics.json").read_text())
        assert metrics["epochs_run"] == 3 and metrics["streamed"] is False and len(result.history["loss"]) == 3
        back = load_head(run.dir)
        val = ff.rows("val")
        np.testing.assert_allclose(back.predict_proba(FeatureSource(ff, val)),
                                   result.head.predict_proba(FeatureSource(ff, val)), atol=1e-6)
    rec = registry.get(run.id)
    assert rec.config["params"]["hidden"] == [8] and rec.config["head_params"]["epochs"] == 3


def test_failed_run_is_marked_failed(tmp_path, monkeypatch):
    """Data that cannot be split is refused before a run is recorded; a fit that fails once the run
    has started leaves it marked failed, with the error."""
    registry = Registry(tmp_path)
    unlabelled = write_cache(tmp_path / "u", n_images=20, labels=np.full(20, -1))
    with FeatureFile(unlabelled) as ff, pytest.raises(UserError, match="no labels"):
        fit_head_run(ff, LogisticHead(C=1.0), registry=registry)
    assert registry.list() == []

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LogisticHead, "fit", boom)
    with FeatureFile(write_cache(tmp_path / "l", n_images=40)) as ff, pytest.raises(RuntimeError):
        fit_head_run(ff, LogisticHead(C=1.0), registry=registry)
    (rec,) = registry.list()
    assert rec.status == "failed" and "boom" in rec.info["error"]


# ------------------------------------------------------------------------------ registry
def test_runs_rm_keeps_the_run_an_unfinished_finetune_resumes_from_and_only_that(tmp_path):
    """A finetune's --resume reads its parent run again; an audit of a run (parent_run too) does not."""
    reg = Registry(tmp_path)
    fit = reg.start("fit-head", {})
    fit.finish()
    audit = reg.start("audit", {"parent_run": fit.id})
    audit.finish("failed", error="KeyboardInterrupt")
    tune = reg.start("finetune", {"parent_run": fit.id})
    tune.finish("failed", error="KeyboardInterrupt")
    with pytest.raises(UserError, match=f"unfinished run {tune.id} .finetune, failed.*finetune --resume {tune.id}"):
        reg.remove([fit.id])
    assert reg.remove([fit.id, tune.id]) and [r.id for r in reg.list()] == [audit.id]  # the audit did not block it



def test_runs_rm_keeps_an_audit_whose_cleaned_csv_other_runs_were_made_on(tmp_path):
    """Removing an audit deleted the cleaned.csv a fit-head run was made on: finetune and audit --run of
    that run then failed on a missing manifest, and runs rm had said nothing."""
    reg = Registry(tmp_path)
    audit = reg.start("audit", {"data": str(tmp_path / "photos")})
    audit.finish()
    cleaned = str(audit.dir / "cleaned.csv")
    fit = reg.start("fit-head", {"data": cleaned, "request": {"data": cleaned}})
    fit.finish()
    other = reg.start("fit-head", {"data": str(tmp_path / "photos")})
    other.finish()
    with pytest.raises(UserError, match=rf"run {fit.id} \(fit-head\) was made on .*cleaned.csv, which removing "
                                        rf"run {audit.id} deletes.*nothing removed.*--force"):
        reg.remove([audit.id])
    assert reg.remove([other.id]) and reg.remove([audit.id, fit.id]) and reg.list() == []
    again = reg.start("audit", {})
    again.finish()
    reg.start("fit-head", {"data": str(again.dir / "cleaned.csv")}).finish()
    assert reg.remove([again.id], force=True) and [r.stage for r in reg.list()] == ["fit-head"]


def test_runs_rm_does_not_keep_a_parent_for_a_finetune_with_no_epoch_to_resume(tmp_path):
    """A finetune that failed before its first checkpointed epoch starts over on --resume: its parent
    can go (runs rm refused it, and the advice to resume first was refused too)."""
    from conftest import run_cli
    from pipeline.finetune.checkpoints import write_state

    reg = Registry(tmp_path)
    fit = reg.start("fit-head", {})
    fit.finish()
    early, late = (reg.start("finetune", {"parent_run": fit.id}) for _ in range(2))
    early.finish("failed", error="UserError: no trunk cache")
    write_state(late.dir, {"epoch": 1, "model": "checkpoints/epoch-001.keras", "complete": False})
    late.finish("failed", error="KeyboardInterrupt")
    kept = run_cli("runs", "rm", fit.id, "--cache-dir", str(tmp_path))
    assert kept.returncode == 2 and f"unfinished run {late.id}" in kept.stderr, kept.stderr
    gone = run_cli("runs", "rm", fit.id, late.id, "--cache-dir", str(tmp_path))
    assert gone.returncode == 0 and [r.id for r in reg.list()] == [early.id], gone.stderr


def test_registry_start_finish_list_filter_sort(tmp_path):
    reg = Registry(tmp_path)
    a = reg.start("extract", {"backbone": "efficientnetb0", "data": "flowers"})
    a.finish(metrics={"images": 10})
    b = reg.start("fit-head", {"backbone": "efficientnetb0", "data": "flowers", "head": "dense",
                               "params": {"lr": 0.001, "hidden": [256]}})
    b.log_metrics({"val": {"accuracy": 0.9, "macro_f1": 0.88}})
    b.finish("ok")
    with reg.start("fit-head", {"backbone": "mobilenetv2", "head": "logistic"}) as c:
        c.log_metrics({"val_accuracy": 0.95, "val_macro_f1": 0.94})
    assert len(a.id) == 20 and a.id[8] == "-" and a.id[15] == "-"
    assert [r.id for r in reg.list(descending=False)] == [a.id, b.id, c.id]
    assert [r.id for r in reg.list()] == [c.id, b.id, a.id]
    assert [r.id for r in reg.list(stage="fit-head")] == [c.id, b.id]
    assert [r.id for r in reg.list(filters={"backbone": "efficient*"})] == [b.id, a.id]
    assert [r.id for r in reg.list(filters={"head": "dense", "status": "ok"})] == [b.id]
    with pytest.raises(UserError, match="no run listed has a value for 'backbon' to filter on"):
        reg.list(filters={"backbon": "efficient*"})  # a typo said "no runs", exit 0
    assert reg.list(filters={"backbone": "resnet*"}) == []  # a key some run has: simply no match
    assert [r.id for r in reg.list(sort="val.accuracy")] == [c.id, b.id, a.id]   # missing values last
    assert [r.id for r in reg.list(sort="val_f1", descending=False)] == [b.id, c.id, a.id]
    assert [r.id for r in reg.list(sort="params.lr")] == [b.id, c.id, a.id]
    with pytest.raises(UserError, match="no run listed has a value for 'nosuch'"):
        reg.list(sort="nosuch")  # a key no run has is a typo, not an order
    assert reg.get(c.id).val_accuracy == 0.95 and reg.get(b.id).val_f1 == 0.88
    info = json.loads((b.dir / "run.json").read_text())
    assert info["status"] == "ok" and info["ended"] and info["duration_s"] >= 0
    text = _render(reg.table(reg.list()))
    for needle in ("fit-head", "extract", "efficientnetb0", "dense", "lr=0.001", "hidden=256", "0.900", "0.880",
                   "0.950", "flowers"):
        assert needle in text


def test_get_by_prefix_and_unknown_ids(tmp_path):
    reg = Registry(tmp_path)
    r1, r2 = reg.start("extract", {}), reg.start("extract", {})
    assert reg.get(r1.id).id == r1.id and reg.get(r2.id).id == r2.id
    shortest = next(r1.id[:k] for k in range(1, 21) if not r2.id.startswith(r1.id[:k]))
    assert reg.get(shortest).id == r1.id
    with pytest.raises(UserError, match=r"unknown run ID 'nope'; `python cli.py runs` lists them"):
        reg.get("nope")
    with pytest.raises(UserError, match="matches 2 runs"):
        reg.get(r1.id[:8])
    assert Registry(tmp_path / "empty").list() == []


def test_crashed_run_shows_incomplete_and_live_one_running(tmp_path):
    reg = Registry(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from pipeline.tracking.runs import Registry; "
            "r = Registry(sys.argv[1]).start('finetune', {}); print(r.id)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         check=True)
    crashed = out.stdout.strip()
    live = reg.start("finetune", {})
    assert reg.get(crashed).status == "incomplete"
    assert reg.get(live.id).status == "running"
    assert "incomplete" in _render(reg.table(reg.list()))


def test_format_duration():
    assert [format_duration(s) for s in (None, 3.21, 65, 7384)] == ["-", "3.2s", "1m05s", "2h03m"]


def _render(table) -> str:
    console = Console(width=250, record=True, color_system=None)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("name, text, problem", [
    ("run.json", "[1, 2]", "run.json holds a list, not a JSON object"),
    ("config.json", "{not json", "config.json is not readable JSON"),
    ("metrics.json", '"x"', "metrics.json holds a str, not a JSON object"),
])
def test_a_damaged_run_file_is_listed_as_damaged_and_named_when_the_run_is_used(tmp_path, name, text, problem):
    """Run folders are read through one check: `runs` still lists the others (a list in run.json was
    an AttributeError for the whole listing), and using the run names the file."""
    from pipeline.inference.apply import load_run

    reg = Registry(tmp_path)
    for stage in ("fit-head", "fit-head"):
        with reg.start(stage, {"data": "d"}) as run:
            run.log_metrics({"val": {"accuracy": 0.5}})
    bad = reg.ids()[0]
    (tmp_path / "runs" / bad / name).write_text(text)
    listed = {r.id: r for r in reg.list()}
    assert set(listed) == set(reg.ids()) and listed[bad].status == "damaged"
    assert [d for d in listed[bad].damaged if d.startswith(problem)] == listed[bad].damaged
    assert next(r for i, r in listed.items() if i != bad).status == "ok"
    with pytest.raises(UserError, match=f"run {bad} is damaged: {problem}"):
        load_run(tmp_path, bad)


def test_runs_rm_names_the_exports_it_removes_with_a_run(tmp_path):
    """The exported models kept in a run folder went with it, unnamed."""
    from conftest import run_cli

    reg = Registry(tmp_path)
    run = reg.start("fit-head", {})
    run.finish()
    for fmt in ("onnx", "tflite"):
        (run.dir / "export" / fmt).mkdir(parents=True)
    dry = run_cli("runs", "rm", run.id, "--dry-run", "--cache-dir", str(tmp_path))
    assert dry.returncode == 0 and f"would remove {run.dir} (with its exports: onnx, tflite)" in dry.stdout, dry.stdout
    gone = run_cli("runs", "rm", run.id, "--cache-dir", str(tmp_path))
    assert gone.returncode == 0 and "(with its exports: onnx, tflite)" in gone.stdout and not run.dir.exists()


def test_a_metric_that_is_no_number_does_not_stop_runs_and_show_says_what_is_damaged(tmp_path):
    """'accuracy': 'high' in one hand-edited metrics.json was a ValueError for every `runs`; `runs show`
    of a damaged run printed 'duration Nones' and not what was wrong."""
    from conftest import run_cli

    reg = Registry(tmp_path)
    for value in ("high", [1], 0.5):
        with reg.start("fit-head", {"data": "d"}) as run:
            run.log_metrics({"val": {"accuracy": value}})
    listed = run_cli("runs", "--cache-dir", str(tmp_path))
    assert listed.returncode == 0 and len(reg.list()) == 3 and "0.500" in listed.stdout, listed.stdout + listed.stderr
    bad = reg.ids()[0]
    (tmp_path / "runs" / bad / "run.json").write_text('{"status": "ok"')
    shown = run_cli("runs", "show", bad, "--cache-dir", str(tmp_path))
    assert shown.returncode == 0 and "Nones" not in shown.stdout and "damaged: run.json is not readable JSON" in shown.stdout


def test_runs_filter_and_sort_by_value_as_the_table_shows_them(tmp_path):
    """--filter C=1 found no run whose C is 1.0, sweep=true none whose sweep is True; --sort params.C put
    C=auto, 3, 10, 1 in that order (as text), and a NaN anywhere."""
    reg = Registry(tmp_path)
    for c in (1.0, 3, 10, "auto", float("nan")):
        reg.start("fit-head", {"params": {"C": c}, "sweep": c == "auto"}).finish()
    assert [r.value("params.C") for r in reg.list(filters={"params.C": "1"})] == [1.0]
    assert [r.value("params.C") for r in reg.list(filters={"sweep": "true"})] == ["auto"]
    assert [r.value("params.C") for r in reg.list(filters={"params.C": "1e+1"})] == [10]
    assert [r.value("params.C") for r in reg.list(sort="params.C")][:3] == [10, 3, 1.0]
    assert [r.value("params.C") for r in reg.list(sort="params.C", descending=False)][:3] == [1.0, 3, 10]


def test_a_run_whose_folder_was_removed_while_it_ran_does_not_make_it_again(tmp_path):
    """runs rm --force of a live sweep: the sweep wrote on, made the folder again without config.json,
    and `runs` listed it as ok."""
    import shutil

    reg = Registry(tmp_path)
    with pytest.raises(UserError, match=r"folder .* was removed while it ran \(runs rm --force\)"):
        with reg.start("fit-head", {"data": "d"}) as run:
            shutil.rmtree(run.dir)
            run.log_metrics({"val": {"accuracy": 0.5}})
    assert not run.dir.exists() and reg.list() == []
    run = reg.start("fit-head", {})
    shutil.rmtree(run.dir)
    with pytest.raises(UserError, match="was removed while it ran"):
        run.finish()
    assert not run.dir.exists()


def test_runs_are_recorded_only_under_the_stages_runs_lists(tmp_path):
    """`runs --stage` offers tracking's STAGES; a run of any other stage could never be listed by it."""
    from pipeline.tracking.runs import STAGES
    assert Registry(tmp_path).start("fit-head", {}).stage in STAGES
    with pytest.raises(ValueError, match="unknown stage 'sweep'"):
        Registry(tmp_path).start("sweep", {})


def test_a_runs_history_is_read_in_one_place_and_a_hand_edited_one_is_left_out(tmp_path):
    """RunRecord.history: what runs compare plots and MLflow logs (each read the files itself; MLflow's
    reader failed on a curve that is not numbers)."""
    reg = Registry(tmp_path)
    run = reg.start("finetune", {})
    run.finish()
    record = reg.get(run.id)
    assert record.history() is None
    (record.dir / "checkpoint.json").write_text(json.dumps({"history": {"loss": [2, 1.5], "val_loss": [2.5, 2]}}))
    assert record.history() == {"loss": [2.0, 1.5], "val_loss": [2.5, 2.0]}  # an interrupted fine-tune's epochs
    (record.dir / "finetune.json").write_text(json.dumps({"history": {"loss": ["x"]}}))
    assert record.history() is None


def test_removing_the_head_run_of_a_resumable_fine_tune_is_refused_with_a_command_for_this_cache(tmp_path):
    reg = Registry(tmp_path / "c")
    head = reg.start("fit-head", {})
    head.finish()
    tune = reg.start("finetune", {"parent_run": head.id})
    tune.finish(status="interrupted")
    with pytest.raises(UserError) as err:
        reg.remove([head.id], resumable=lambda folder: True)
    assert f"(python cli.py finetune --resume {tune.id} --cache-dir {(tmp_path / 'c').resolve()})" in str(err.value)
    assert reg.get(head.id).id == head.id  # nothing removed
