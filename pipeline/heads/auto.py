"""`AutoHead` (kind "auto", the default of `fit-head`): fits the logistic, the svm and the knn head and
keeps the one with the lowest cross-validated log loss (each calibrated as it will be used); with
--class-weight the knn head, which cannot weight classes, is left out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.errors import UserError
from pipeline.heads.base import Head, option_budget, option_C, option_seed
from pipeline.heads.knn import KNNHead
from pipeline.heads.logistic import LogisticHead
from pipeline.heads.svm import KernelHead

# The auto head tries the svm up to this many training rows: an SVC fit grows as rows^2.3 (measured on
# flowers features, 2 cores: 0.6 s at 2,000 rows, 2.7 s at 4,000, 14.6 s at 8,000), and the CV fits 21.
AUTO_MAX_ROWS = 6000


class AutoHead(Head):
    """The default head: fits the logistic, the svm and the knn head and keeps the one whose
    cross-validated log loss (probabilities scored out of fold, calibrated as each head will be) is
    lowest. All fit in seconds on cached features; which wins depends on the data (flowers with Lite2:
    svm, 93.1% against 91.4%; hymenoptera: logistic). `best_` is the chosen fitted head (what a run
    saves), `choice_` the scores and why. The svm is skipped, with a note, over `max_rows` training
    rows (6,000: about a minute on 2 cores; `--head svm` alone takes up to 20,000) or the memory
    budget; the knn over the memory budget.
    """

    kind = "auto"
    options = Head.shared_options | {"C", "class_weight", "jobs"}  # --C: refused in from_options

    def __init__(self, class_weight: str | None = None, flatten: str = "avg", n_jobs: int | None = 1,
                 random_state: int = 0, max_rows: int = AUTO_MAX_ROWS, memory_budget_mb: float | None = None) -> None:
        self.class_weight = class_weight
        self.flatten = flatten
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.max_rows = max_rows
        self.memory_budget_mb = memory_budget_mb

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "AutoHead":
        if option_C(opts) != "auto":
            raise UserError("--C sets one head's regularization, but --head auto fits three heads (each picks C "
                            "by CV); add --head svm or --head logistic to use --C")
        return cls(class_weight=opts.get("class_weight"), n_jobs=opts.get("jobs", 1), flatten=opts.get("flatten", "avg"),
                   random_state=option_seed(opts), memory_budget_mb=option_budget(opts))

    def fit_note(self) -> str:
        if self.class_weight:
            return ("head auto: fitting the logistic and the svm head (cross-validated each) to keep the best; the knn "
                    "head takes no --class-weight, so it is left out")
        return "head auto: fitting the logistic, the svm and the knn head (cross-validated each) to keep the best"

    def candidates(self) -> tuple:
        """The heads compared, unfitted: with --class-weight only those that weight classes (a knn head kept over
        them would ignore the weighting the user asked for)."""
        shared = dict(flatten=self.flatten, random_state=self.random_state, memory_budget_mb=self.memory_budget_mb)
        weighted = dict(class_weight=self.class_weight, n_jobs=self.n_jobs, **shared)
        heads = LogisticHead(**weighted), KernelHead(max_rows=self.max_rows, **weighted)
        return heads if self.class_weight else (*heads, KNNHead(**shared))

    def check_params(self) -> "AutoHead":
        for head in self.candidates():
            head.check_params()
        return self

    def fit(self, X: Any, y: Any, **kw: Any) -> "AutoHead":
        """Fit the candidates on (X, y) and keep the best by CV log loss (`kw`: class names, cache key,
        feature info, groups, as the candidates take them). The logistic head always fits (it streams);
        the others are skipped, with a note, where they refuse (too many rows, over the memory budget)."""
        fitted: dict[str, Head] = {}
        scores: dict[str, float | None] = {}
        notes = []
        for head in self.candidates():
            try:
                head.fit(X, y, **kw)
            except UserError as exc:
                if head.kind == "logistic":
                    raise
                notes.append(f"{head.kind} skipped: {exc}")
                scores[head.kind] = None
                continue
            fitted[head.kind] = head
            scores[head.kind] = head.cv_log_loss()
        scored = {k: v for k, v in scores.items() if v is not None}
        if scores.get("logistic") is None:
            chosen = "logistic"
            if len(scored) < len(fitted):
                notes.append("a class has too few training images to cross-validate the logistic head, so the heads "
                             "are not compared: the logistic head is kept, with its default C")
        else:
            chosen = self.choose(scored)
        self.best_ = fitted[chosen]
        self.choice_ = {"chosen": chosen, "cv_log_loss": scores, **({"note": "; ".join(notes)} if notes else {})}
        self.copy_meta(self.best_)
        return self

    @staticmethod
    def choose(scores: Mapping[str, float]) -> str:
        """The head kind with the lowest CV log loss (a tie keeps the logistic head)."""
        return min(scores, key=lambda k: (scores[k], k != "logistic"))

    def cv_log_loss(self) -> float | None:
        """The kept head's (what chose it)."""
        return self.best_.cv_log_loss()

    def cv_accuracy(self) -> float | None:
        return self.best_.cv_accuracy()

    def cross_validates(self) -> bool:
        return True  # the logistic candidate picks C by CV

    def outcome(self) -> tuple[Head, dict[str, Any]]:
        """The chosen head (what a run records and saves) and why it was chosen."""
        return self.best_, {"head_choice": self.choice_}

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.best_.predict_proba(X)

    def save(self, path: str | os.PathLike) -> Path:
        """Saves the chosen head (load_head reads it back as that kind)."""
        return self.best_.save(path)
