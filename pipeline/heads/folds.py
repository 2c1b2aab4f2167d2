"""Cross-validation folds shared by the heads: stratified by class and grouped by image when rows repeat
one (augmented views), so an image's copies never score each other. The logistic and svm heads use the
same folds (the auto head compares their CV log losses), the streamed logistic head its first fold.
The seeded validation holdout lives here too: fit-head, its sweep and fine-tuning's hand-over make the same one."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split


def is_grouped(groups: Any) -> bool:
    """True when `groups` (one id per row, or None) repeats an id: folds must then keep groups whole."""
    return groups is not None and np.unique(groups).size < len(groups)


def cv_folds(y: np.ndarray, groups: Any, cv: int, random_state: int) -> tuple[list | None, str]:
    """Stratified folds (grouped by image when rows repeat one): ([(train, test), ...], description);
    (None, why) when a class has too few examples (images) to cross-validate."""
    grouped = is_grouped(groups)
    if grouped:  # images per class, not rows, bound the number of folds
        groups = np.asarray(groups)
        per_class = min(np.unique(groups[y == c]).size for c in np.unique(y))
    else:
        per_class = int(np.bincount(y)[np.unique(y)].min())
    n_splits = min(int(cv), per_class)
    if n_splits < 2:
        return None, "a class has a single example, too few to cross-validate"
    splitter = (StratifiedGroupKFold(n_splits, shuffle=True, random_state=random_state) if grouped
                else StratifiedKFold(n_splits, shuffle=True, random_state=random_state))
    folds = list(splitter.split(np.zeros(len(y)), y, groups if grouped else None))
    return folds, f"{n_splits}-fold {'grouped ' if grouped else ''}CV"


def stratified_holdout(items: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of `items`: a seeded share `fraction` held out for validation, stratified by `labels`
    where every class has two items and the share can hold one of each class (else not stratified)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        kept, held = train_test_split(items, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few items per class for a stratified split of this size
        kept, held = train_test_split(items, test_size=fraction, random_state=seed)
    return kept, held
