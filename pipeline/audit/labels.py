"""Likely label errors: out-of-fold probabilities for every labelled image, then cleanlab's confident
learning ranks the images whose given label the evidence contradicts.

Two sources of out-of-sample evidence, both seconds on cached embeddings, averaged:
- a logistic regression on unit-length features (scaled by sqrt(d): unit RMS per feature),
  cross-validated (stratified K folds): each image is scored by a model that never saw it;
- a weighted vote of its k nearest other images by cosine similarity (DINO's kNN: k=20, weights
  exp(similarity / 0.07)): leave-one-out by construction.
On flowers with 5% of training labels flipped (bench/audit.py, docs/benchmarks.md) unit-length features ranked
flips better than standardized ones (top-N precision 0.84 against 0.68 at seed 0) and the average
with the neighbours flagged fewer images at the same recall.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from pipeline.features.neighbours import Neighbours, vote_shares

KNN_K = 20
KNN_T = 0.07
DEFAULT_C = 0.01  # at unit RMS per feature (logistic_C); measured on flowers and hymenoptera (bench/audit.py)


@dataclass
class LabelEvidence:
    """Out-of-fold class probabilities (n, k) of each source, their average, and how they were made."""

    logistic: np.ndarray
    knn: np.ndarray
    proba: np.ndarray
    folds: int
    C: float


def logistic_C(C: float, dim: int) -> float:
    """The C that, on unit-length rows, fits the same model as `C` on unit-length rows scaled by
    sqrt(d) (unit RMS per feature, the scale `DEFAULT_C` was measured at): scaling the features by s
    is scaling C by s^2, and scaling the rows would copy them (1 GB at 200,000 x 1,280)."""
    return float(C) * float(dim)


def class_images(y: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """The distinct images of each class (index: class number): rows of one class that are copies of
    one image (one `duplicates.copy_groups` group) count once, since copies cannot vouch for each other."""
    if groups is None or not y.size:
        return np.bincount(y)
    distinct = np.unique(np.stack([y, np.asarray(groups)], axis=1), axis=0)
    return np.bincount(distinct[:, 0], minlength=int(y.max()) + 1)


def cv_splits(y: np.ndarray, cv: int, seed: int, groups: np.ndarray | None = None) -> int:
    """The folds a stratified CV of `y` gets: at most `cv`, at most the smallest class of two or more
    distinct images (`class_images`; a class of one image cannot be cross-checked and sits out); 0
    when no two classes can be."""
    counts = class_images(y, groups)
    counts = counts[counts >= 2]
    return min(int(cv), int(counts.min())) if counts.size and len(counts) >= 2 else 0


def oof_folds(y: np.ndarray, folds: int, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """The CV fold of each row; -1 for rows of classes with fewer than two distinct images (they sit
    out). Stratified by class; `groups` (`duplicates.copy_groups`): every copy of one image joins the
    fold of the group's first row that has one, so no copy is scored by a model trained on another."""
    fold = np.full(y.size, -1)
    rows = np.flatnonzero(class_images(y, groups)[y] >= 2)
    if folds < 2 or not rows.size:
        return fold
    for f, (_, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed)
                                  .split(np.zeros((rows.size, 1)), y[rows])):
        fold[rows[test]] = f
    if groups is not None:
        groups = np.asarray(groups)
        placed = np.flatnonzero(fold >= 0)
        first_group, first_at = np.unique(groups[placed], return_index=True)  # rows ascending: the first placed
        group_fold = np.full(int(groups.max()) + 1, -1)
        group_fold[first_group] = fold[placed[first_at]]
        fold = np.where(fold >= 0, group_fold[groups], fold)
    return fold


def fit_logistic(U: np.ndarray, y: np.ndarray, C: float, max_iter: int = 500) -> LogisticRegression:
    """The audit's logistic regression on unit-length rows `U` (`C` as at unit RMS per feature)."""
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=logistic_C(C, U.shape[1]), max_iter=max_iter, tol=1e-3).fit(U, y)


def logistic_oof(U: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int = 0, C: float = DEFAULT_C,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probabilities (n, n_classes) of `fit_logistic` on unit-length rows `U`, over the
    folds of `oof_folds` (copies of one image in one fold); rows that sit out, the rows of a fold
    whose training rows hold a single class, and rows whose class the fold's model never saw (a small
    class whose copies all joined one fold) keep the uniform row: no evidence, not p(given) 0."""
    proba = np.full((y.size, n_classes), 1.0 / n_classes)
    fold = oof_folds(y, folds, seed, groups)
    for f in range(folds):
        train, test = np.flatnonzero((fold >= 0) & (fold != f)), np.flatnonzero(fold == f)
        test = test[np.isin(y[test], y[train])]
        if not test.size or np.unique(y[train]).size < 2:
            continue
        model = fit_logistic(U[train], y[train], C)
        proba[test] = 0.0
        proba[np.ix_(test, model.classes_)] = model.predict_proba(U[test])
    return proba


def knn_oof(neigh: Neighbours, y: np.ndarray, n_classes: int, k: int = KNN_K, T: float = KNN_T,
            groups: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out class probabilities from each row's k nearest other rows (weights exp(sim / T)),
    smoothed towards uniform by one pseudo-vote so no class is ever exactly 0. `groups`: a row's
    copies (`duplicates.copy_groups`) do not vote for it (a copy at cosine 1 would outvote the rest);
    the next listed neighbours stand in where the table has more than k."""
    idx, sim = neigh.index, neigh.similarity
    ok = idx >= 0
    if groups is not None:
        ok &= groups[np.maximum(idx, 0)] != groups[:, None]
    ok &= np.cumsum(ok, axis=1) <= k
    share = vote_shares(np.where(ok, sim, -np.inf), np.where(ok, y[np.maximum(idx, 0)], -1), n_classes, T)
    return (share * k + 1.0 / n_classes) / (k + 1.0)


def label_evidence(U: np.ndarray, y: np.ndarray, n_classes: int, neigh: Neighbours, cv: int = 5, seed: int = 0,
                   C: float = DEFAULT_C, groups: np.ndarray | None = None) -> LabelEvidence:
    """Both out-of-fold probability sources and their average, from unit-length rows `U` and their
    neighbours (UserError-free: callers check classes); `groups`: copies never vouch for each other."""
    folds = cv_splits(y, cv, seed, groups)
    lr = (logistic_oof(U, y, n_classes, folds, seed, C, groups) if folds >= 2
          else np.full((y.size, n_classes), 1 / n_classes))
    kn = knn_oof(neigh, y, n_classes, groups=groups)
    return LabelEvidence(logistic=lr, knn=kn, proba=(lr + kn) / 2.0, folds=folds, C=C)


def rank_issues(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged row numbers ranked most likely wrong first, issue score per row = 1 - p(given label)).

    Flagged: the images whose out-of-fold evidence prefers another class, together with those that
    cleanlab's confident learning (`find_label_issues`, prune by noise rate) finds; ranked by
    self-confidence (cleanlab's documented default). Confident learning alone misses a lone flip
    whose suggested class is less certain than that class's average (its per-class threshold).
    """
    from cleanlab.filter import find_label_issues  # noqa: PLC0415 - imported only by the audit

    present = np.unique(y)
    score = 1.0 - proba[np.arange(y.size), y]
    if present.size < 2:
        return np.zeros(0, np.int64), score
    # cleanlab wants every class of the probability matrix to have a label: drop absent columns
    sub = proba[:, present]
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        confident = find_label_issues(np.searchsorted(present, y), sub, filter_by="prune_by_noise_rate")
    flagged = np.flatnonzero(np.asarray(confident, bool) | (proba.argmax(axis=1) != y))
    return flagged[np.argsort(-score[flagged], kind="stable")], score
