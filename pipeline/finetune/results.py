"""What a fine-tuning run produced, and its before/after comparison as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


def compare_metrics(before: Mapping[str, Any], after: Mapping[str, Any],
                    keys: Sequence[str] = ("accuracy", "macro_f1", "balanced_accuracy", "log_loss", "ece")) -> dict:
    """{split: {metric: {before, after, change}}} for the splits in both, for a side-by-side table."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for split in after:
        if split not in before:
            continue
        rows = {}
        for k in keys:
            b, a = before[split].get(k), after[split].get(k)
            rows[k] = {"before": b, "after": a, "change": None if a is None or b is None else a - b}
        out[split] = rows
    return out


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The comparison as plain-text lines: `val accuracy  0.812 -> 0.874 (+0.062)`."""
    lines = []
    for split, rows in comparison.items():
        for k, r in rows.items():
            if r["before"] is None or r["after"] is None:
                continue
            lines.append(f"{split:<5} {k:<18} {r['before']:.3f} -> {r['after']:.3f} ({r['change']:+.3f})")
    return "\n".join(lines)



@dataclass
class FinetuneResult:
    """What a fine-tuning run produced. Epoch numbers are 1-based."""

    model_path: Path
    history: dict[str, list[float]]  # loss, acc, val_loss, val_acc, lr per epoch (plot_history format)
    metrics_before: dict[str, dict]  # {"val": report[, "test": report]} of the starting model
    metrics_after: dict[str, dict]  # the same for the final model
    epochs_run: int
    best_epoch: int | None  # epoch whose weights were kept (early stopping), else None
    stopped_early: bool
    lr: float
    trainable_layers: list[str]
    resumed_from: int  # epochs already done when this call started (0 = fresh)
    seconds: float
    n_train: int
    n_val: int
    class_names: list[str] = field(default_factory=list)
    val_source: str = "val split"  # 'stage-2 split' | 'val split' | 'holdout' | 'none'
    temperature: float = 1.0  # fitted on val after training and folded into the saved model (`calibrate.py`)
    calibration: str = ""  # how, or why not

    def to_json(self) -> dict[str, Any]:
        """Plain values, kept in the run folder so a run interrupted after training records it on --resume."""
        return {**asdict(self), "model_path": str(self.model_path)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], model_path: Path) -> "FinetuneResult":
        """The result `to_json` kept; `model_path`: where the run folder is now."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "model_path": model_path})

    @property
    def comparison(self) -> dict:
        return compare_metrics(self.metrics_before, self.metrics_after)

    def early_stopping_note(self) -> str | None:
        """One line when early stopping kept an epoch by the val loss: the val figures then chose it."""
        if self.best_epoch is None or not self.n_val:
            return None
        return (f"note: early stopping kept epoch {self.best_epoch} by the val loss, so the val figures are not "
                f"held out")

    def worse_note(self, parent_run: str) -> str | None:
        """One line when fine-tuning lowered val accuracy (the head-only run is then the better
        model), with what to try; None otherwise or without val."""
        a, b = self.metrics_before.get("val") or {}, self.metrics_after.get("val") or {}
        if not a.get("n") or not b.get("n") or not b["accuracy"] < a["accuracy"]:
            return None
        small = (f" With {self.n_train} training images a head on cached features is often the best an "
                 f"ImageNet backbone gives;" if self.n_train < 1000 else "")
        return (f"note: fine-tuning lowered val accuracy ({a['accuracy']:.3f} -> {b['accuracy']:.3f}), so head run "
                f"{parent_run} stays the better model.{small} try fewer unfrozen blocks (--unfreeze), "
                f"--label-smoothing 0 or a lower --lr")

    def run_metrics(self) -> dict[str, Any]:
        """A metrics.json for the runs registry: `val`/`test` are the final reports (the table's
        columns), plus before/after, the comparison and the training facts."""
        out: dict[str, Any] = dict(self.metrics_after)
        out.update(before=self.metrics_before, after=self.metrics_after, comparison=self.comparison,
                   epochs_run=self.epochs_run, best_epoch=self.best_epoch, stopped_early=self.stopped_early,
                   lr=self.lr, trainable_layers=len(self.trainable_layers), resumed_from=self.resumed_from,
                   fit_seconds=round(self.seconds, 3), train_images=self.n_train, val_images=self.n_val,
                   val_source=self.val_source, temperature=self.temperature, calibration=self.calibration)
        return out

