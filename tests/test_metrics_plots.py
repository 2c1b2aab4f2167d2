"""Metrics reports (values, JSON, rendering) and PNG plots (written, valid, the promised size)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, log_loss

from pipeline.tracking.metrics import classification_report, format_report, metrics_table, summary_line
from pipeline.tracking.plots import plot_c_curve, plot_confusion_matrix, plot_history, plot_run


def test_report_values_match_sklearn_and_are_json():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    p = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.1, .1, .8], [.3, .3, .4],
                  [.5, .2, .3], [.9, .05, .05]])
    r = classification_report(y, p, ["cat", "dog", "emu"])
    pred = p.argmax(1)
    assert r["n"] == 8 and r["accuracy"] == pytest.approx(np.mean(pred == y))
    assert r["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert r["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert r["log_loss"] == pytest.approx(log_loss(y, p))
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert r["per_class"]["emu"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                     "support": 3}
    assert json.loads(json.dumps(r)) == r
    # predictions only: no log loss; a class absent from y_true does not drag macro-F1 down
    r2 = classification_report([0, 0, 1], y_pred=[0, 0, 1], class_names=["a", "b", "c"])
    assert r2["log_loss"] is None and r2["macro_f1"] == 1.0 and r2["per_class"]["c"]["support"] == 0
    assert classification_report([], np.zeros((0, 2)), ["a", "b"])["n"] == 0


def test_rendering_mentions_classes_and_numbers():
    r = classification_report([0, 1, 1, 0], np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]), ["ants", "bees"])
    text = format_report(r, title="val")
    for needle in ("ants", "bees", "precision", "0.750", "accuracy", "log loss", "val"):
        assert needle in text
    assert summary_line(r).startswith("accuracy 0.750 · macro-F1 ") and "(n=4)" in summary_line(r)
    assert metrics_table(r).row_count == 2 + 4  # classes; accuracy, macro avg, log loss, ECE
    assert "ECE (15 bins)" in text and "ECE " in summary_line(r) and "with support" not in text
    # a class with no image in the data: listed at 0, left out of the averages, which the row says
    partial = classification_report([0, 0, 1], y_pred=[0, 0, 1], class_names=["a", "b", "c"])
    assert "macro avg (2 classes with support)" in format_report(partial, width=140)


def _png(path, size):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size


def test_plots_write_valid_pngs_of_the_requested_size(tmp_path):
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7], "acc": [0.5, 0.7, 0.8],
               "val_acc": [0.4, 0.6, 0.7], "lr": [1e-3, 1e-3, 1e-4]}
    _png(plot_history(history, tmp_path / "curves.png", title="dense", figsize=(9, 3), dpi=50), (450, 150))
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
    _png(plot_confusion_matrix(cm, ["cat", "dog", "emu"], tmp_path / "sub" / "cm.png", figsize=(5, 4), dpi=60),
         (300, 240))
    big = np.random.default_rng(0).integers(0, 5, (80, 80))          # many classes: no labels, still valid
    _png(plot_confusion_matrix(big, [f"c{i}" for i in range(80)], tmp_path / "big.png", dpi=20), (510, 480))
    _png(plot_c_curve({0.01: -0.9, 0.1: -0.5, "1.0": -0.6}, tmp_path / "c.png", chosen=0.1, dpi=40), (200, 144))
    assert not list(tmp_path.glob(".*tmp"))                          # atomic writes leave no temp files


def test_plot_run_draws_what_each_run_has_and_nothing_else(tmp_path):
    """One drawer of a run's PNGs (fit-head, its sweeps and finetune each wrote them)."""
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    val, test = classification_report(y, p, ["a", "b", "c"]), classification_report(y, p, ["a", "b", "c"])
    files = plot_run(tmp_path / "r1", "dense head", history={"loss": [1.0, 0.5], "lr": [1e-3, 1e-3]},
                     c_curve=({0.1: 0.9, 1.0: 0.7}, 1.0, "CV log loss"), reports={"val": val, "test": test})
    assert set(files) == {"curves", "c_curve", "confusion_val", "calibration_val", "confusion_test"}
    assert all(f.parent == tmp_path / "r1" and f.stat().st_size > 1000 for f in files.values())
    assert plot_run(tmp_path / "r2", "fine-tuning", history={"loss": []},  # no epoch, no val images: nothing
                    reports={"val": classification_report([], np.zeros((0, 3)), ["a", "b", "c"]), "test": None}) == {}
    no_bins = {k: v for k, v in val.items() if k != "reliability"}  # a sweep's report: no reliability diagram
    assert set(plot_run(tmp_path / "r3", "best", reports={"val": no_bins})) == {"confusion_val"}


def test_plots_do_not_touch_pyplot_state(tmp_path):
    plot_history({"loss": [1, 0.5]}, tmp_path / "h.png")
    if "matplotlib.pyplot" in sys.modules:                           # another test may have imported it
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_a_class_name_the_font_cannot_draw_warns_nobody(tmp_path):
    """CJK names under DejaVu Sans: matplotlib warned once per glyph, with its source line, on the
    user's terminal (fit-head prints nothing else there); the PNG is still written."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _png(plot_confusion_matrix([[3, 1], [0, 4]], ["日本", "桜"], tmp_path / "cjk.png", figsize=(4, 4), dpi=50),
             (200, 200))
    assert not [w for w in seen if "Glyph" in str(w.message)], [str(w.message) for w in seen]
