"""Sweeps: grid expansion, results sorted by validation macro-F1, the best head kept, parallel workers."""

from __future__ import annotations

import json

import numpy as np

import pytest
from rich.console import Console

from pipeline.errors import UserError
from pipeline.heads import DenseHead, FeatureSource, LogisticHead
from pipeline.tracking.runs import Registry
from pipeline.features.store import FeatureFile
from pipeline.heads.sweep import _tasks, expand_grid, results_table, save_sweep, sweep

from helpers_features import blobs, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("sweep"), n_images=240, dim=16, views=1, sep=1.2)


def test_expand_grid_and_task_grouping():
    grid = {"lr": [1e-3, 1e-2], "dropout": [0.0, 0.5], "hidden": [(8,)]}
    configs = expand_grid(grid)
    assert len(configs) == 4 and configs[0] == {"lr": 1e-3, "dropout": 0.0, "hidden": (8,)}
    tasks = _tasks("dense", {}, configs, n_jobs=1)                 # grouped by structure (dropout), not lr
    assert sorted(len(t) for t in tasks) == [2, 2] and all(len({c["dropout"] for c in t}) == 1 for t in tasks)
    assert len(_tasks("dense", {}, configs, n_jobs=4)) == 4        # big groups split to feed every worker
    assert len(_tasks("logistic", {}, expand_grid({"C": [1, 2, 3]}), n_jobs=2)) == 2
    with pytest.raises(UserError, match="non-empty list"):
        expand_grid({"lr": 0.1})


def test_logistic_sweep_on_a_cache_sorted_best_kept(cache):
    with FeatureFile(cache) as ff:
        results = sweep(ff, "logistic", {"C": [1e-4, 1e-2, 1.0]})
        assert len(results) == 3 and {r.params["C"] for r in results} == {1e-4, 1e-2, 1.0}
        f1 = [r.val_macro_f1 for r in results]
        assert f1 == sorted(f1, reverse=True) and results[0].val_macro_f1 > 0.7
        best = results[0].head
        assert isinstance(best, LogisticHead) and best.C_ == results[0].params["C"]
        assert all(r.head is None for r in results[1:])
        assert best.feature_shape_ == ff.feature_shape and best.cache_key_ == ff.key
        best.check_matches(ff)
        val = ff.rows("val")
        acc = (best.predict(FeatureSource(ff, val)) == ff.labels[val]).mean()
        assert acc == pytest.approx(results[0].val_accuracy)


def test_dense_sweep_on_arrays_in_process_and_saved_into_a_run(tmp_path):
    X, y = blobs(300, 12, 3, seed=2, sep=1.2)
    grid = {"lr": [1e-3, 3e-2], "hidden": [(16,)]}
    results = sweep((X, y), "dense", grid, base_params={"epochs": 4, "batch_size": 32}, keep_all=True)
    assert len(results) == 2 and all(isinstance(r.head, DenseHead) for r in results)
    assert results[0].val_macro_f1 >= results[1].val_macro_f1
    assert results[0].head.history_["lr"][0] == pytest.approx(results[0].params["lr"])
    assert results[0].extras["epochs_run"] == 4 and results[0].extras["sweep_seconds"] > 0
    run = Registry(tmp_path).start("fit-head", {"head": "dense", "params": {"configs": 2}})
    metrics = save_sweep(results, run)
    run.finish()
    rows = json.loads(run.path("sweep.json").read_text())
    assert len(rows) == 2 and rows[0]["params"]["hidden"] == [16]
    assert metrics["best_params"]["lr"] == results[0].params["lr"]
    assert run.path("head.keras").exists() and run.path("head.json").exists()
    console = Console(width=160, record=True, color_system=None)
    console.print(results_table(results))
    assert "lr=0.03" in console.export_text()


def test_parallel_logistic_sweep_in_worker_processes_matches_serial(cache):
    with FeatureFile(cache) as ff:
        grid = {"C": [1e-3, 1e-1, 10.0]}
        serial = sweep(ff, "logistic", grid, n_jobs=1)
        parallel = sweep(ff, "logistic", grid, n_jobs=2)
    assert [r.params for r in parallel] == [r.params for r in serial]
    assert [r.val_macro_f1 for r in parallel] == pytest.approx([r.val_macro_f1 for r in serial])


def test_sweep_rejects_unknown_parameters_and_heads(cache):
    with FeatureFile(cache) as ff:
        with pytest.raises(UserError, match="no parameter"):
            sweep(ff, "dense", {"learning_rate": [0.1]})
        with pytest.raises(UserError, match="a sweep needs one head type"):
            sweep(ff, "auto", {"C": [1.0]})
        with pytest.raises(UserError, match="a sweep needs one head type"):
            sweep(ff, "nosuch", {"C": [1.0]})


def test_parallel_dense_sweep_uses_worker_processes_without_deadlock():
    """Keras in loky workers (one thread each) with the parent's TensorFlow already running."""
    X, y = blobs(200, 8, 2, seed=4, sep=1.5)
    DenseHead(hidden=(4,), epochs=1).fit(X, y)                      # TensorFlow initialized in this process
    grid = {"lr": [1e-3, 1e-2], "dropout": [0.0, 0.2]}
    base = {"hidden": (8,), "epochs": 2, "batch_size": 32}
    parallel = sweep((X, y), "dense", grid, n_jobs=2, base_params=base)
    serial = sweep((X, y), "dense", grid, n_jobs=1, base_params=base)
    assert sorted(map(str, (r.params for r in parallel))) == sorted(map(str, (r.params for r in serial)))
    by_params = {str(r.params): r.val_macro_f1 for r in serial}
    assert all(r.val_macro_f1 == pytest.approx(by_params[str(r.params)], abs=0.02) for r in parallel)
    assert isinstance(parallel[0].head, DenseHead) and parallel[0].head.predict(X).shape == (200,)


def test_an_array_sweep_holds_out_val_as_fit_head_does_even_when_too_few_to_stratify():
    """(X, y) with a val_fraction too small to hold one image of each class: the holdout falls back to an
    unstratified one (as fit-head's own does) rather than failing in scikit-learn."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 6)
    X = rng.normal(size=(18, 5)).astype(np.float32) + y[:, None]
    results = sweep((X, y), "logistic", {"C": [0.1, 1.0]}, val_fraction=0.1)
    assert len(results) == 2 and all(r.val_accuracy == r.val_accuracy for r in results)
