"""PNG plots for runs: training curves, confusion matrix, the C curve and the reliability diagram.

Uses `matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so no global figure
state leaks between calls or threads; files are written atomically. Image size in pixels is
exactly figsize * dpi (no tight bounding box), so callers can rely on it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.atomic import atomic_path


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG atomically (no half-written plot in a run folder) and return its path. A
    class name in a script the font lacks (CJK under DejaVu Sans) draws as boxes, without matplotlib's
    warning per glyph (with its source line) on the terminal: the name is right in every other file."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=fig.dpi)
    return path


def plot_history(history: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                 figsize: tuple[float, float] = (12.0, 3.6), dpi: int = 100) -> Path:
    """Loss, accuracy (train and val) and learning rate per epoch, side by side."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    panels = [("loss", ("loss", "val_loss")), ("accuracy", ("acc", "val_acc")), ("learning rate", ("lr",))]
    axes = fig.subplots(1, len(panels))
    n_epochs = max((len(history.get(k, [])) for k in ("loss", "acc", "lr")), default=0)
    epochs = np.arange(1, n_epochs + 1)
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            values = list(history.get(key, []))
            if values:
                ax.plot(epochs[:len(values)], values, marker="o", markersize=3,
                        label="val" if key.startswith("val") else ("train" if key != "lr" else "lr"))
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if label == "learning rate":
            lr = [v for v in history.get("lr", []) if v > 0]
            if lr and max(lr) / min(lr) > 20:
                ax.set_yscale("log")
        elif ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                          path: str | os.PathLike, title: str | None = None,
                          figsize: tuple[float, float] | None = None, dpi: int = 100) -> Path:
    """Counts annotated in each cell, colour = row-normalized (recall), class names on both axes.

    With many classes the annotations (over 30) and tick labels (over 60) are left out to stay legible.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    if figsize is None:
        side = float(np.clip(1.2 + 0.45 * k, 4.0, 24.0))
        figsize = (side + 1.5, side)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 60:
        names, size = [str(c) for c in class_names], 8 if k > 15 else 10
        ax.set_xticks(range(k), labels=names, fontsize=size, rotation=45 if k > 4 else 0,
                      ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), labels=names, fontsize=size)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7 if k > 15 else 9,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_c_curve(cv_scores: Mapping[float, float], path: str | os.PathLike, chosen: float | None = None,
                 scoring: str = "CV score", figsize: tuple[float, float] = (5.0, 3.6), dpi: int = 100) -> Path:
    """The logistic head's mean cross-validation score against C (log axis), the chosen C marked."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.subplots()
    points = sorted((float(c), float(v)) for c, v in cv_scores.items())
    ax.plot([c for c, _ in points], [v for _, v in points], marker="o")
    if chosen is not None:
        ax.axvline(float(chosen), color="tab:red", linestyle="--", label=f"C = {chosen:.3g}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse regularization)")
    ax.set_ylabel(scoring)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_reliability(report: Mapping, path: str | os.PathLike, title: str | None = None,
                     figsize: tuple[float, float] = (5.0, 4.2), dpi: int = 100) -> Path:
    """A reliability diagram from a metrics report's `reliability` bins: accuracy against confidence
    per bin (bars; the diagonal is perfect calibration), with the ECE in the title."""
    bins = report["reliability"]
    n_bins = len(bins["count"])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([a if a is not None else 0.0 for a in bins["accuracy"]])
    conf = np.array([c if c is not None else m for c, m in zip(bins["confidence"], centres)])
    filled = np.asarray(bins["count"]) > 0
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.bar(centres[filled], acc[filled], width=1.0 / n_bins, edgecolor="black", color="tab:blue", alpha=0.8,
           label="accuracy")
    ax.bar(centres[filled], (conf - acc)[filled], bottom=acc[filled], width=1.0 / n_bins, color="tab:red",
           alpha=0.3, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ece = report.get("ece")
    ax.set_title((f"{title}: " if title else "") + (f"ECE {ece:.3f}" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_run(folder: str | os.PathLike, what: str, *, history: Mapping[str, Sequence[float]] | None = None,
             c_curve: tuple[Mapping[float, float], float, str] | None = None,
             reports: Mapping[str, Mapping] | None = None) -> dict[str, Path]:
    """A run's standard PNGs in `folder`, as fit-head, its sweeps and finetune write them: curves.png
    (a training history with losses), c_curve.png ((scores per C, chosen C, what the score is)), and per
    report of `reports` ('val', 'test') confusion_<part>.png, and calibration_val.png where the val report
    has reliability bins. `what` names the model in the titles ("logistic head", "fine-tuning")."""
    folder = Path(folder)
    files: dict[str, Path] = {}
    if history and history.get("loss"):
        files["curves"] = plot_history(history, folder / "curves.png", title=what)
    if c_curve:
        scores, chosen, scoring = c_curve
        files["c_curve"] = plot_c_curve(scores, folder / "c_curve.png", chosen=chosen, scoring=scoring)
    for part, report in (reports or {}).items():
        if not (report and report.get("n") and report.get("confusion_matrix") is not None):
            continue
        files[f"confusion_{part}"] = plot_confusion_matrix(
            report["confusion_matrix"], report["class_names"], folder / f"confusion_{part}.png",
            title=f"{part}: accuracy {report['accuracy']:.3f} ({what})")
        if part == "val" and report.get("reliability"):
            files["calibration_val"] = plot_reliability(report, folder / "calibration_val.png", title=f"{what}, val")
    return files
