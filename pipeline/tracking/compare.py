"""Side-by-side comparison of recorded runs: the parameters that differ, metrics per split, one PNG.

What a config holds (see `runs.py`): identity keys `backbone`, `data`, `head`; a short `params`
summary that repeats entries of the full parameter dicts (`head_params`, `finetune_params`,
`request`); and the feature file's absolute path (`cache_file`, `cache_path`) beside its `cache_key`.
The comparison flattens configs into dotted keys, keeps those whose values differ between runs,
shows the identity keys once at the top, drops the absolute paths (the key says the same, and a
path differs with the cache folder alone) and shows a repeated value only once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from rich.markup import escape
from rich.table import Table

from pipeline.data.sources import SPLITS
from pipeline.errors import UserError
from pipeline.tracking.runs import Registry, RunRecord, format_duration

IDENTITY_KEYS = ("backbone", "data", "head")
"""Config keys shown in the identity rows at the top, so left out of the parameter rows."""

NOISE_KEYS = frozenset({"cache_file", "cache_path", "id", "run_id", "run_dir", "dir", "started", "ended",
                        "timestamp", "created", "pid", "host"})
"""Config keys (last dotted part) that identify a run or a location rather than what it was asked to do."""

REPORT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "log_loss", "n")
"""Scalar fields of a `metrics.classification_report`, in the order the table lists them."""

HIGHER_BETTER = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"})
LOWER_BETTER = frozenset({"log_loss"})
_REPORT_SKIP = frozenset({"per_class", "confusion_matrix", "class_names"})
_FACT_SKIP = frozenset({"cv_scores", "cv_accuracies", "comparison", "after"})  # curve data (plotted) and repeats of the splits


class _Missing:
    """Marks a key a run does not have (shown as `-`, left out of the JSON)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass
class Comparison:
    """What `runs compare` shows: the runs, their differing parameters and their metrics."""

    runs: list[RunRecord]
    params: dict[str, list[Any]]   # dotted config key -> one value per run (MISSING where absent)
    metrics: dict[str, list[Any]]  # `split.metric` (all) or dotted fact key (where it differs) -> value per run

    def identity(self, r: RunRecord) -> dict[str, Any]:
        """The identity fields of one run (stage, status, backbone, data, head, duration)."""
        return {"stage": r.stage, "status": r.status, **{k: r.config.get(k) for k in IDENTITY_KEYS},
                "duration_s": r.duration_s}


# -------------------------------------------------------------------------------- parameters
def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`head_params.C`), so nested configs compare key by key."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _json_text(value: Any) -> str:
    """A value's JSON text, the form values are compared in (lists and numbers alike)."""
    if value is MISSING:
        return "\0missing"
    return json.dumps(value, sort_keys=True, default=str)


def differing_params(records: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """Config keys whose values are not the same in every run (absent counts as a value), in config order."""
    flat = [{k: v for k, v in flatten(r.config).items()
             if k not in IDENTITY_KEYS and k.rsplit(".", 1)[-1] not in NOISE_KEYS} for r in records]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    keys = [k for k in keys if not (k.startswith("params.") and all(_summarized(k, f) for f in flat))]
    rows = {k: [f.get(k, MISSING) for f in flat] for k in keys}
    rows = {k: v for k, v in rows.items() if len({_json_text(x) for x in v}) > 1}
    return _drop_repeats(rows, records)


def _summarized(key: str, flat: Mapping[str, Any]) -> bool:
    """Whether `params.X` says nothing new in this run: absent, or equal to a fuller key `....X` there.

    `params` is the runs table's short summary of the full parameter dicts, so a key it leaves out
    is no difference, and one it repeats is compared once, under its full name.
    """
    if key not in flat:
        return True
    name, text = key.split(".", 1)[1], _json_text(flat[key])
    return any(k != key and (k == name or k.endswith("." + name)) and _json_text(v) == text
               for k, v in flat.items())


def _drop_repeats(rows: dict[str, list[Any]], records: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """One row per repeated fact: `request.data` repeats the identity row `data`, and so on.

    Rows with the same last key part and the same values in every run are one fact; the identity
    rows claim theirs first, then the first key in config order.
    """
    seen = {(k, tuple(_json_text(r.config.get(k, MISSING)) for r in records)) for k in IDENTITY_KEYS}
    kept: dict[str, list[Any]] = {}
    for key, values in rows.items():
        fact = (key.rsplit(".", 1)[-1], tuple(_json_text(v) for v in values))
        if fact not in seen:
            seen.add(fact)
            kept[key] = values
    return kept


# -------------------------------------------------------------------------------- metrics
def _is_report(value: Any) -> bool:
    return isinstance(value, Mapping) and "accuracy" in value and ("n" in value or "macro_f1" in value)


def _reports(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The classification reports in a metrics.json by split name (`val`, `before.val`, ...)."""
    found: dict[str, Mapping[str, Any]] = {}
    for key, value in metrics.items():
        if _is_report(value):
            found[key] = value
        elif isinstance(value, Mapping) and key not in _FACT_SKIP:
            found.update({f"{key}.{k}": v for k, v in value.items() if _is_report(v)})
    return found


def _facts(metrics: Mapping[str, Any], reports: Mapping[str, Any]) -> dict[str, Any]:
    """The other scalar measurements (fit time, chosen C, epochs run, rows extracted, ...), dotted."""
    top = {k: v for k, v in metrics.items() if k not in _FACT_SKIP and k not in reports
           and not (isinstance(v, Mapping) and any(f"{k}.{s}" in reports for s in v))}
    return {k: v for k, v in flatten(top).items() if not isinstance(v, (list, Mapping))}


def _split_key(split: str) -> tuple[int, str]:
    base = split.rsplit(".", 1)[-1]
    rank = SPLITS.index(base) if base in SPLITS else len(SPLITS)
    return (split.count("."), f"{rank}{split}")


def metric_rows(records: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """Every `split.metric` row (train, val, test, then others), then the other scalar facts that differ."""
    reports = [_reports(r.metrics) for r in records]
    splits = sorted({s for rep in reports for s in rep}, key=_split_key)
    rows: dict[str, list[Any]] = {}
    for split in splits:
        names = list(REPORT_METRICS)
        for rep in reports:
            extra = rep.get(split, {})
            names.extend(k for k, v in extra.items() if k not in names and k not in _REPORT_SKIP
                         and not isinstance(v, (list, Mapping)))
        for name in names:
            values = [rep[split].get(name, MISSING) if split in rep else MISSING for rep in reports]
            if any(v is not MISSING and v is not None for v in values):
                rows[f"{split}.{name}"] = values
    facts = [_facts(r.metrics, rep) for r, rep in zip(records, reports)]
    keys: list[str] = []
    for f in facts:
        keys.extend(k for k in f if k not in keys)
    for key in keys:
        values = [f.get(key, MISSING) for f in facts]
        if len({_json_text(v) for v in values}) > 1:
            rows[key] = values
    return rows


def compare(records: Sequence[RunRecord]) -> Comparison:
    """Differing parameters and all metrics of two or more runs (UserError for fewer)."""
    unique = list({r.id: r for r in records}.values())
    if len(unique) < 2:
        raise UserError("runs compare needs at least two different runs; `python cli.py runs` lists them")
    return Comparison(runs=unique, params=differing_params(unique), metrics=metric_rows(unique))


def resolve(registry: Registry, run_ids: Sequence[str]) -> list[RunRecord]:
    """The runs named by IDs or unique prefixes, in the order given, each once; all checked first."""
    if len(run_ids) < 2:
        raise UserError(f"runs compare takes at least two run IDs (got {len(run_ids)}); "
                        f"`python cli.py runs` lists them")
    records = list({r.id: r for r in (registry.get(i) for i in run_ids)}.values())
    if len(records) < 2:
        raise UserError(f"{', '.join(run_ids)} name{'s' if len(run_ids) == 1 else ''} only one run ({records[0].id}); "
                        f"give at least two different runs")
    return records


# -------------------------------------------------------------------------------- rendering
def format_value(value: Any, metric: str | None = None) -> str:
    """A cell: `-` when absent, 3 decimals for report metrics, short JSON for the rest."""
    if value is MISSING:
        return "-"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if metric is not None and metric in REPORT_METRICS and math.isfinite(value):
            return f"{value:.3f}"
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if len(value) <= 40 else "..." + value[-37:]
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _best(values: Sequence[Any], metric: str) -> set[int]:
    """Indexes of the best values of a report metric row (none when all are equal or it has no direction)."""
    nums = [(i, float(v)) for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if metric not in HIGHER_BETTER | LOWER_BETTER or len(nums) < 2 or len({v for _, v in nums}) < 2:
        return set()
    best = (max if metric in HIGHER_BETTER else min)(v for _, v in nums)
    return {i for i, v in nums if v == best}


def comparison_table(cmp: Comparison, title: str | None = None) -> Table:
    """Rich table, one column per run: identity rows, then the differing parameters, then metrics."""
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    for r in cmp.runs:
        table.add_column(r.id, no_wrap=True)
    ident = [cmp.identity(r) for r in cmp.runs]
    for key in ("stage", "status", *IDENTITY_KEYS):
        table.add_row(key, *(escape(format_value(i[key] if i[key] is not None else MISSING)) for i in ident))
    table.add_row("duration", *(format_duration(i["duration_s"]) for i in ident))
    table.add_section()
    if cmp.params:
        table.add_row("[bold]parameters that differ[/bold]", *([""] * len(cmp.runs)))
        for key, values in cmp.params.items():
            table.add_row(escape(key), *(escape(format_value(v)) for v in values))
    else:
        table.add_row("[bold]no parameter differs[/bold]", *([""] * len(cmp.runs)))
    table.add_section()
    table.add_row("[bold]metrics[/bold]", *([""] * len(cmp.runs)))
    for key, values in cmp.metrics.items():
        metric = key.rsplit(".", 1)[-1] if "." in key else None
        best = _best(values, metric or "")
        cells = [escape(format_value(v, metric)) for v in values]
        table.add_row(escape(key), *(f"[bold]{c}[/bold]" if i in best else c for i, c in enumerate(cells)))
    return table


def comparison_json(cmp: Comparison, plot: Path | None = None) -> dict[str, Any]:
    """The table's content as JSON: runs, then {key: {run id: value}} (absent values left out)."""
    def by_run(rows: Mapping[str, list[Any]]) -> dict[str, dict[str, Any]]:
        return {k: {r.id: v for r, v in zip(cmp.runs, values) if v is not MISSING} for k, values in rows.items()}

    return {"runs": [{"id": r.id, **cmp.identity(r), "dir": str(r.dir)} for r in cmp.runs],
            "params": by_run(cmp.params), "metrics": by_run(cmp.metrics),
            "plot": None if plot is None else str(plot)}


# -------------------------------------------------------------------------------- plot
def confusion_of(record: RunRecord, split: str = "val") -> tuple[list[list[int]], list[str]] | None:
    """The run's confusion matrix and class names for `split` from metrics.json, None when not stored."""
    report = record.metrics.get(split)
    if not _is_report(report) or not report.get("n") or not report.get("confusion_matrix"):
        return None
    cm = report["confusion_matrix"]
    try:  # square and numeric, or not shown (a hand-edited metrics.json made a raw numpy error)
        counts = np.asarray(cm, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        return None
    names = report.get("class_names") or [str(i) for i in range(len(cm))]
    return cm, [str(n) for n in names][:len(cm)] + [str(i) for i in range(len(names), len(cm))]


def _cv_scores(record: RunRecord) -> dict[float, float]:
    scores = record.metrics.get("cv_scores")
    if not isinstance(scores, Mapping):
        return {}
    try:
        return {float(c): float(v) for c, v in scores.items()}
    except (TypeError, ValueError):
        return {}


def default_plot_path(registry: Registry, records: Sequence[RunRecord]) -> Path:
    """`<cache>/runs/compare-<id1>-<id2>...png` (a hash replaces the IDs past four), beside the runs."""
    ids = [r.id for r in records]
    if len(ids) <= 4:
        stem = "-".join(ids)
    else:
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]
        stem = f"{ids[0]}-and-{len(ids) - 1}-more-{digest}"
    return registry.root / f"compare-{stem}.png"


def plot_comparison(records: Sequence[RunRecord], path: str | os.PathLike, split: str = "val",
                    dpi: int = 100) -> Path:
    """Training curves overlaid (train solid, val dashed, a colour per run; C curves of logistic
    heads) above the runs' row-normalized confusion matrices of `split`; written atomically."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib (0.3 s): keeps `--help` fast
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib (0.3 s): keeps `--help` fast
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - matplotlib (0.3 s): keeps `--help` fast

    from pipeline.tracking.plots import save_figure  # noqa: PLC0415 - matplotlib (0.3 s): keeps `--help` fast

    n = len(records)
    colours = [f"C{i % 10}" for i in range(n)]
    histories = [r.history() for r in records]
    cv = [_cv_scores(r) for r in records]
    labels = [f"{r.id} {r.config.get('head') or r.stage}" for r in records]
    cols = min(n, 4)
    cm_rows = math.ceil(n / cols)
    panels = [("loss", "loss"), ("accuracy", "acc")] + ([("logistic CV score vs C", "cv")] if any(cv) else [])
    fig = Figure(figsize=(max(12.0, 3.8 * cols), 4.2 + 3.6 * cm_rows), dpi=dpi, layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.2, 3.6 * cm_rows])
    axes = top.subplots(1, len(panels))
    for ax, (title, key) in zip(axes, panels):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "cv":
            for r, scores, colour in zip(records, cv, colours):
                if scores:
                    pts = sorted(scores.items())
                    ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", markersize=3, color=colour)
                    chosen = r.metrics.get("C")
                    if isinstance(chosen, (int, float)) and chosen > 0:
                        ax.axvline(float(chosen), color=colour, linestyle=":", alpha=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("C (dotted: chosen)")
            continue
        for history, colour in zip(histories, colours):
            if not history:
                continue
            for hkey, style in ((key, "-"), (f"val_{key}", "--")):
                values = [float(v) for v in history.get(hkey, [])]
                if values:
                    ax.plot(np.arange(1, len(values) + 1), values, linestyle=style, color=colour, marker="o",
                            markersize=2.5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not any(histories):
            ax.text(0.5, 0.5, "no run has per-epoch curves", ha="center", va="center", transform=ax.transAxes)
    handles = [Line2D([], [], color=c, label=label + ("" if h else " (no curve)"))
               for c, label, h in zip(colours, labels, histories)]
    handles += [Line2D([], [], color="black", linestyle="-", label="train"),
                Line2D([], [], color="black", linestyle="--", label="val")]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    cm_axes = np.atleast_1d(bottom.subplots(cm_rows, cols)).ravel()
    for ax, r, colour in zip(cm_axes, records, colours):
        found = confusion_of(r, split)
        ax.set_title(f"{r.id}\n{r.config.get('head') or r.stage}: {split}", fontsize=9, color=colour)
        if found is None:
            ax.text(0.5, 0.5, f"no {split} confusion matrix\nstored in this run", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
            continue
        cm, names = found
        counts = np.asarray(cm, dtype=np.float64)
        rows = counts.sum(axis=1, keepdims=True)
        norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        k = norm.shape[0]
        ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        if k <= 30:
            ax.set_xticks(range(k), labels=names, fontsize=7, rotation=45 if k > 3 else 0,
                          ha="right" if k > 3 else "center")
            ax.set_yticks(range(k), labels=names, fontsize=7)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
        acc = r.metrics[split].get("accuracy")
        ax.set_xlabel("predicted" + (f" (accuracy {acc:.3f})" if isinstance(acc, (int, float)) else ""), fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    for ax in cm_axes[n:]:
        ax.set_axis_off()
    bottom.suptitle(f"confusion matrices ({split}, rows normalized)", fontsize=10)
    return save_figure(fig, path)
