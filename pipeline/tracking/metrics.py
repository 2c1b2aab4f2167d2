"""Classification metrics as a JSON-ready dict, plus text and rich-table renderings of it.

One dict shape for every stage (fit-head, finetune, sweeps) so runs can be compared and listed:
`n`, `accuracy`, `macro_f1`, `weighted_f1`, `balanced_accuracy`, `log_loss` (the negative
log-likelihood; None without probabilities), `ece` (expected calibration error, 15 equal-width
confidence bins; None without probabilities), `reliability` (those bins: mean confidence, accuracy and
count each, for the reliability diagram), `per_class` {name: precision/recall/f1/support}, `confusion_matrix` (rows = true
class, columns = predicted), `class_names`.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of predictions against integer labels; give `proba` (n, k) and/or `y_pred` (n,)."""
    from sklearn.metrics import (  # noqa: PLC0415 - scikit-learn (1 s): keeps `--help` fast
        confusion_matrix, log_loss, precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=np.int64)
    if proba is None and y_pred is None:
        raise ValueError("give class probabilities or predicted labels")
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
    y_pred = np.asarray(y_pred if y_pred is not None else proba.argmax(axis=1), dtype=np.int64)
    k = len(class_names) if class_names is not None else (
        proba.shape[1] if proba is not None else int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    labels = np.arange(k)
    n = int(y_true.size)
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "weighted_f1": None, "balanced_accuracy": None,
                "log_loss": None, "ece": None, "reliability": None, "per_class": {}, "confusion_matrix": [[0] * k for _ in range(k)],
                "class_names": names}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0  # macro averages over the classes that occur in y_true
    ll = ece = bins = None
    if proba is not None:
        clipped = np.clip(proba, 1e-15, 1.0)
        ll = float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels))
        bins = reliability_bins(y_true, proba)
        ece = expected_calibration_error(bins)
    return {
        "n": n,
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f[present].mean()),
        "weighted_f1": float(np.average(f, weights=s)),
        "balanced_accuracy": float(r[present].mean()),
        "log_loss": ll,
        "ece": ece,
        "reliability": bins,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
        "class_names": names,
    }


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """The top-class confidence of each row sorted into `n_bins` equal-width bins over [0, 1]: each
    bin's mean confidence, accuracy and count (empty bins: None), as a reliability diagram plots them."""
    y_true = np.asarray(y_true, np.int64)
    proba = np.asarray(proba, np.float64)
    conf = proba.max(axis=1)
    right = proba.argmax(axis=1) == y_true
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    right_sum = np.bincount(which, weights=right.astype(np.float64), minlength=n_bins)
    mean = lambda total: [float(t / c) if c else None for t, c in zip(total, count)]  # noqa: E731
    return {"confidence": mean(conf_sum), "accuracy": mean(right_sum), "count": count.astype(int).tolist()}


def expected_calibration_error(bins: Mapping[str, list]) -> float:
    """ECE (Guo et al. 2017): the count-weighted mean |accuracy - confidence| over reliability bins."""
    count = np.asarray(bins["count"], np.float64)
    if count.sum() == 0:
        return 0.0
    gap = [abs(a - c) if n else 0.0 for a, c, n in zip(bins["accuracy"], bins["confidence"], count)]
    return float(np.dot(count, gap) / count.sum())


def summary_line(report: Mapping[str, Any]) -> str:
    """One line: accuracy, macro-F1, log loss and the number of examples."""
    if not report.get("n"):
        return "no labelled examples"
    parts = [f"accuracy {report['accuracy']:.3f}", f"macro-F1 {report['macro_f1']:.3f}"]
    if report.get("log_loss") is not None:
        parts.append(f"log loss {report['log_loss']:.3f}")
    if report.get("ece") is not None:
        parts.append(f"ECE {report['ece']:.3f}")
    return " · ".join(parts) + f" (n={report['n']})"


def metrics_table(report: Mapping[str, Any], title: str | None = None, max_classes: int = 50) -> Table:
    """Per-class precision/recall/F1/support, then the overall numbers, as a rich Table."""
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for col in ("precision", "recall", "F1", "support"):
        table.add_column(col, justify="right")
    per_class = list(report.get("per_class", {}).items())
    for name, m in per_class[:max_classes]:
        table.add_row(str(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    if len(per_class) > max_classes:
        table.add_row(f"... {len(per_class) - max_classes} more", "", "", "", "")
    if report.get("n"):
        table.add_section()
        table.add_row("accuracy", "", "", f"{report['accuracy']:.3f}", str(report["n"]))
        present = sum(1 for _, m in per_class if m["support"])  # the averages leave out classes with no image
        label = "macro avg" if present == len(per_class) else f"macro avg ({present} classes with support)"
        table.add_row(label, "", f"{report['balanced_accuracy']:.3f}", f"{report['macro_f1']:.3f}", "")
        if report.get("log_loss") is not None:
            table.add_row("log loss", "", "", f"{report['log_loss']:.3f}", "")
        if report.get("ece") is not None:
            table.add_row("ECE (15 bins)", "", "", f"{report['ece']:.3f}", "")
    return table


def format_report(report: Mapping[str, Any], title: str | None = None, width: int = 100) -> str:
    """The rich table rendered as plain text (for logs and files)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(metrics_table(report, title))
    return buf.getvalue()
