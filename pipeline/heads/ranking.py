"""Backbones ranked on the user's own data (`fit-head --backbone a,b,c`): the head asked for is fitted
on each backbone's training rows and the backbones are ranked by its cross-validated log loss, the rule
the auto head already uses between heads. Only training rows are scored (the validation share a run
holds out stays out), so the kept backbone's val and test figures remain held-out figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads.base import FeatureSource, Head, fit_meta
from pipeline.heads.training import split_rows


@dataclass(frozen=True)
class BackboneScore:
    """How the head did on one backbone's training rows, scored out of fold."""

    backbone: str
    cache_key: str
    head: str            # the head kind that was scored (auto: the one it kept)
    cv_log_loss: float
    cv_accuracy: float | None
    width: int
    train_rows: int
    images_per_s: float | None  # the extraction's recorded rate (None where the file does not say)

    def as_json(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "cache_key": self.cache_key, "head": self.head,
                "cv_log_loss": round(self.cv_log_loss, 6),
                "cv_accuracy": None if self.cv_accuracy is None else round(self.cv_accuracy, 6),
                "width": self.width, "train_rows": self.train_rows,
                "extract_images_per_s": None if self.images_per_s is None else round(self.images_per_s, 1)}


def score_cache(ff: FeatureFile, backbone: str, make_head: Callable[[], Head], val_fraction: float = 0.2,
                seed: int = 0, use_augmented: bool = True) -> BackboneScore:
    """Fit a fresh head from `make_head` on the rows `fit-head` trains on and read its CV scores;
    UserError when the head gives none (it does not cross-validate, or there are too few images)."""
    rows = split_rows(ff, val_fraction, seed, use_augmented).train
    head = make_head()
    head.fit(FeatureSource(ff, rows), ff.labels[rows], **fit_meta(ff))
    kept, _ = head.outcome()
    loss = head.cv_log_loss()
    if loss is None:
        raise UserError(f"the {kept.kind} head gave no cross-validated score on {backbone} (a given C, streamed "
                        f"features or too few images per class), so backbones cannot be ranked by it; use the "
                        f"default --head auto, or name one --backbone")
    rate = ff.attrs.get("images_per_s")  # the extraction's images/s, the backbone build left out
    if not isinstance(rate, (int, float)):  # a cache from before 2026-12-06: its rows over its seconds, build included
        seconds = ff.attrs.get("extract_seconds")
        rate = len(ff) / float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None
    return BackboneScore(backbone, ff.key, kept.kind, float(loss), head.cv_accuracy(), int(kept.n_features_in_),
                         int(rows.size), rate)


def ranked(scores: list[BackboneScore]) -> list[BackboneScore]:
    """Best first: lowest CV log loss, then highest CV accuracy, then the order given (a stable sort)."""
    return sorted(scores, key=lambda s: (s.cv_log_loss, -(s.cv_accuracy or 0.0)))
