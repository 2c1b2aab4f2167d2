"""Stage-2 classifier heads trained on cached backbone features, in scikit-learn estimator style.

`LogisticHead`: StandardScaler + LogisticRegression, C picked by stratified CV. `DenseHead`: a small
Keras MLP. Both train in memory, or stream from the HDF5 cache when the features exceed a memory
budget (the logistic head through `streaming.fit_streamed_logistic`, the same objective). Both take
an array or a `FeatureSource` (rows of a `FeatureFile`), reduce feature maps
(N, H, W, C) with `flatten` ("flatten" | "avg" | "max"), and save/load with their metadata (class
names, cache key, feature shape, feature extractor) so a head is never used on the wrong features.
Keras is imported lazily: the logistic head and the CLI stay fast without TensorFlow.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import joblib  # only for old pickled heads, loaded with --trust-pickle
import numpy as np
from joblib import parallel_config
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.atomic import atomic_path, save_keras_atomic, write_text_atomic
from pipeline.errors import UserError
from pipeline.heads.folds import cv_folds
from pipeline.heads.schedules import make_schedule
from pipeline.heads.streaming import (
    as_float32, default_memory_budget_mb, fit_streamed_logistic, read_rows, read_sorted, row_spans,
)
from pipeline.features.store import FeatureFile

FLATTEN_MODES = ("flatten", "avg", "max")
OPTIMIZERS = ("adam", "nadam", "rmsprop", "sgd")
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 6))
# Cache attributes that identify the feature extractor; a head refuses features from another one.
FEATURE_INFO_KEYS = ("backbone", "weights_id", "image_size", "pooling", "layer")
_PAD_LOGIT = -30.0  # logit of a class absent from the training labels (probability ~1e-13)
_LOGISTIC_FORMAT = "featurecache-logistic-head"
_DENSE_FORMAT = "featurecache-dense-head"


# ---------------------------------------------------------------------------------- feature input
@dataclass
class FeatureSource:
    """Rows of a cache file, read lazily in batches: lets heads train on data larger than memory."""

    file: FeatureFile
    rows: np.ndarray

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.file.feature_shape

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Raw float32 features of `positions` (indices into `rows`), in that order."""
        return read_rows(self.file.features, self.rows[np.asarray(positions, np.int64)])

    def iter_reduced(self, flatten: str, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions, reduced float32 features) in disk order, at most `batch_size` rows spanning
        at most 4x that many rows of the file each, read as contiguous slices where rows are dense."""
        order = np.argsort(self.rows, kind="stable")
        srt = self.rows[order]
        for a, b in row_spans(srt, batch_size, 4 * batch_size):
            yield order[a:b], reduce_features(read_sorted(self.file.features, srt[a:b]), flatten)

    def load_reduced(self, flatten: str, batch_size: int = 1024) -> np.ndarray:
        """All rows as an in-memory (n, d) float32 array, reduced batch by batch to save memory."""
        out = np.empty((len(self), reduced_dim(self.feature_shape, flatten)), np.float32)
        for pos, x in self.iter_reduced(flatten, batch_size):
            out[pos] = x
        return out


@dataclass
class ReducedFeatures:
    """Features already reduced to an (n, d) matrix, remembering the raw feature shape they came from.

    Sweeps reduce a cache once and fit many heads on it; the heads still record (and check) the
    cache's raw feature shape.
    """

    matrix: np.ndarray
    feature_shape: tuple[int, ...]
    flatten: str

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, np.float32)
        self.feature_shape = tuple(int(s) for s in self.feature_shape)
        if self.matrix.ndim != 2 or self.matrix.shape[1] != reduced_dim(self.feature_shape, self.flatten):
            raise ValueError(f"a {self.matrix.shape} matrix cannot be {self.feature_shape} features "
                             f"reduced by {self.flatten!r}")

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def of(cls, X: Any, flatten: str) -> "ReducedFeatures":
        """Reduce an array or FeatureSource once (a ReducedFeatures passes through if it matches)."""
        if isinstance(X, ReducedFeatures) and _same_reduction(X, flatten):
            return X
        return cls(_to_matrix(X, flatten), _raw_shape(X), flatten)


def _same_reduction(X: "ReducedFeatures", flatten: str) -> bool:
    return X.flatten == flatten or len(X.feature_shape) == 1


def reduced_dim(feature_shape: Sequence[int], flatten: str) -> int:
    """Length of one feature vector after `reduce_features`."""
    _check_flatten(flatten, feature_shape)
    if len(feature_shape) <= 1 or flatten == "flatten":
        return int(np.prod(feature_shape))
    return int(feature_shape[-1])


def reduce_features(x: np.ndarray, flatten: str) -> np.ndarray:
    """(N, ...) features -> (N, D) float32: vectors pass through; maps are flattened or pooled over space."""
    x = np.asarray(x)
    _check_flatten(flatten, x.shape[1:])
    if x.ndim == 2:
        return as_float32(x)
    if flatten == "flatten" or x.ndim == 1:
        return as_float32(x.reshape(x.shape[0], -1))
    axes = tuple(range(1, x.ndim - 1))
    out = x.mean(axis=axes, dtype=np.float32) if flatten == "avg" else x.max(axis=axes)
    return out.astype(np.float32, copy=False)


def _check_flatten(flatten: str, feature_shape: Sequence[int]) -> None:
    if flatten not in FLATTEN_MODES:
        raise UserError(f"unknown flatten mode {flatten!r}; choose one of {', '.join(FLATTEN_MODES)}")
    if len(feature_shape) > 3 and flatten != "flatten":
        raise UserError(f"features of shape {tuple(feature_shape)} can only be used with flatten='flatten'")


def _n_rows(X: Any) -> int:
    return len(X) if isinstance(X, (FeatureSource, ReducedFeatures)) else int(np.shape(X)[0])


def _raw_shape(X: Any) -> tuple[int, ...]:
    if isinstance(X, (FeatureSource, ReducedFeatures)):
        return tuple(X.feature_shape)
    return tuple(np.shape(X)[1:])


def _to_matrix(X: Any, flatten: str) -> np.ndarray:
    """Any accepted feature input (array, FeatureSource, ReducedFeatures) as an (n, d) float32 matrix."""
    if isinstance(X, ReducedFeatures):
        if not _same_reduction(X, flatten):
            raise ValueError(f"features were reduced with {X.flatten!r}, the head uses {flatten!r}")
        return X.matrix
    if isinstance(X, FeatureSource):
        return X.load_reduced(flatten)
    return reduce_features(np.asarray(X), flatten)


def _matrix_batches(X: Any, flatten: str, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, reduced batch) over any accepted input, without loading a FeatureSource whole."""
    n = _n_rows(X)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if isinstance(X, ReducedFeatures):
            yield start, _to_matrix(X, flatten)[start:stop]
        elif isinstance(X, FeatureSource):
            yield start, reduce_features(X.read(np.arange(start, stop)), flatten)
        else:
            yield start, reduce_features(np.asarray(X[start:stop]), flatten)


def given_positive(value: Any, name: str, auto: str = "auto") -> float | None:
    """None for the word `auto`, else `value` as a positive float; UserError naming `name` otherwise."""
    if value == auto:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be '{auto}' or a positive number, not {value!r}") from None
    if not number > 0:
        raise UserError(f"{name} must be positive, not {number}")
    return number


def feature_info_of(ff: FeatureFile) -> dict[str, Any]:
    """The cache attributes that identify how its features were made (backbone, weights, ...)."""
    return {k: ff.attrs[k] for k in FEATURE_INFO_KEYS if k in ff.attrs}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------- shared base
class _Head(ClassifierMixin, BaseEstimator):
    """Metadata handling and prediction helpers shared by both heads."""

    kind = "head"

    def check_params(self) -> "_Head":
        """Raise UserError for a bad parameter now, before any work (fit checks them again)."""
        return self

    def _set_meta(self, X: Any, y: np.ndarray, class_names: Sequence[str] | None,
                  cache_key: str | None, feature_info: Mapping[str, Any] | None) -> int:
        y = np.asarray(y)
        if y.size == 0:
            raise UserError("there are no training examples")
        if y.min() < 0:
            raise UserError("training labels must be >= 0 (-1 marks unlabelled images; leave those out)")
        n_classes = len(class_names) if class_names is not None else int(y.max()) + 1
        if y.max() >= n_classes:
            raise UserError(f"label {int(y.max())} is out of range for {n_classes} class names")
        if np.unique(y).size < 2:
            raise UserError("training needs at least two classes with examples; found one")
        self.class_names_ = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.classes_ = np.arange(n_classes)
        self.n_classes_ = n_classes
        self.cache_key_ = cache_key
        self.feature_info_ = dict(feature_info or {})
        self.feature_shape_ = tuple(int(s) for s in _raw_shape(X))
        self.n_features_in_ = reduced_dim(self.feature_shape_, self.flatten)
        return n_classes

    def _check_input(self, X: Any) -> None:
        shape = tuple(_raw_shape(X))
        if shape != self.feature_shape_:
            raise UserError(f"this head was trained on features of shape {self.feature_shape_}, "
                            f"not {shape}; fit a head on features from the same backbone and layer")

    def check_matches(self, ff: FeatureFile, class_subset: bool = False) -> None:
        """Raise UserError unless `ff` holds features this head can read (shape, classes, extractor);
        with `class_subset`, the cache may hold only some of the head's classes (evaluation)."""
        if tuple(ff.feature_shape) != tuple(self.feature_shape_):
            raise UserError(f"the head expects features of shape {tuple(self.feature_shape_)} but {ff.path.name} "
                            f"holds {tuple(ff.feature_shape)}; fit a head on this cache instead")
        if class_subset:
            check_class_subset(ff.class_names, self.class_names_, ff.path.name)
        elif ff.class_names and list(ff.class_names) != list(self.class_names_):
            raise UserError(f"the head's classes ({_short(self.class_names_)}) differ from {ff.path.name}'s "
                            f"({_short(ff.class_names)}); use a cache of the same data set or fit a new head")
        info = feature_info_of(ff)
        diff = [k for k in info if k in self.feature_info_ and str(info[k]) != str(self.feature_info_[k])]
        if diff:
            k = diff[0]
            raise UserError(f"the head was trained on {k}={self.feature_info_[k]!r} features but {ff.path.name} "
                            f"has {k}={info[k]!r}; use a cache made the same way or fit a new head")

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class index for each row."""
        return np.argmax(self.predict_proba(X), axis=1)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description: kind, parameters, classes, cache key, feature shape and extractor."""
        return {
            "kind": self.kind, "params": jsonable(self.get_params()), "class_names": self.class_names_,
            "cache_key": self.cache_key_, "feature_shape": list(self.feature_shape_),
            "feature_info": jsonable(self.feature_info_),
        }

    def _load_meta(self, meta: Mapping[str, Any]) -> None:
        self.class_names_ = list(meta["class_names"])
        self.n_classes_ = len(self.class_names_)
        self.classes_ = np.arange(self.n_classes_)
        self.cache_key_ = meta.get("cache_key")
        self.feature_info_ = dict(meta.get("feature_info") or {})
        self.feature_shape_ = tuple(int(s) for s in meta["feature_shape"])
        self.n_features_in_ = reduced_dim(self.feature_shape_, self.flatten)


def check_class_subset(data_classes: Sequence[str], head_classes: Sequence[str], where: str) -> None:
    """UserError naming the classes of `where` that the head was never trained on."""
    unknown = [c for c in data_classes if c not in set(head_classes)]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise UserError(f"{where} has classes the run was never trained on: {shown} (the run's classes: "
                        f"{_short(head_classes)}); evaluate on data of those classes only")


def _short(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    head = ", ".join(map(str, names[:n]))
    return f"{len(names)} classes: {head}{', ...' if len(names) > n else ''}"


def jsonable(obj: Any) -> Any:
    """Parameters/metadata as plain JSON types (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ------------------------------------------------------------------------------------- logistic
class LogisticHead(_Head):
    """Multinomial logistic regression on standardized features; C="auto" picks C by stratified CV.

    The CV runs along a warm-started path over `Cs` (LogisticRegressionCV, folds in parallel with
    `n_jobs`) at the looser tolerance `cv_tol`; the final model refits on all rows at `tol`. Folds
    are grouped by image when rows repeat an image (augmented views), so copies never score each other.
    `blas_threads` caps BLAS threads while fitting: with only a handful of classes the matrix
    products are too thin to gain from threads, and idle-spinning BLAS threads slow them down.
    `backend` is the joblib backend for the folds: threads (the default) start instantly and the
    solver's heavy parts release the GIL; "loky" processes take seconds to start.

    Given a FeatureSource whose training rows would not fit `memory_budget_mb` (None: a quarter of
    physical memory) as the two float32 matrices the in-memory fit holds (raw and standardized),
    the head streams from the cache instead (`streaming.fit_streamed_logistic`: the same objective,
    C="auto" scored on a held-out subsample) and reports `streamed_` and `stream_note_`.
    """

    kind = "logistic"

    def __init__(self, C: float | str = "auto", Cs: Sequence[float] = DEFAULT_CS, cv: int = 5,
                 class_weight: str | None = None, scoring: str = "neg_log_loss", max_iter: int = 300,
                 tol: float = 1e-4, cv_tol: float = 1e-3, flatten: str = "avg", n_jobs: int | None = 1,
                 random_state: int = 0, blas_threads: int | None = 1, backend: str = "threading",
                 memory_budget_mb: float | None = None) -> None:
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.class_weight = class_weight
        self.scoring = scoring
        self.max_iter = max_iter
        self.tol = tol
        self.cv_tol = cv_tol
        self.flatten = flatten
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.blas_threads = blas_threads
        self.backend = backend
        self.memory_budget_mb = memory_budget_mb

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, *, class_names: Sequence[str] | None = None,
            cache_key: str | None = None, feature_info: Mapping[str, Any] | None = None,
            groups: Any = None) -> "LogisticHead":
        """Fit on (X, y); X_val/y_val are accepted for a uniform head interface and not used.

        groups: rows sharing a value stay in one CV fold (default for a FeatureSource: the image
        index, so augmented views of an image never validate their own copies while picking C).
        """
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        y = np.asarray(y, dtype=np.int64)
        if _n_rows(X) != y.size:
            raise ValueError(f"X has {_n_rows(X)} rows but y has {y.size}")
        self._set_meta(X, y, class_names, cache_key, feature_info)
        if groups is None and isinstance(X, FeatureSource):
            groups = X.file.index[X.rows]
        t0 = time.perf_counter()
        budget = self.budget_mb()
        need = 2 * y.size * self.n_features_in_ * 4 / 2**20   # the raw and the standardized float32 matrix
        self.streamed_ = isinstance(X, FeatureSource) and need > budget
        self.stream_note_ = ""
        self._dense_cache = None
        if self.streamed_:
            self._fit_streamed(X, y, groups, need, budget)
            self.fit_seconds_ = time.perf_counter() - t0
            return self
        with threadpool_limits(self.blas_threads, user_api="blas"):
            Xm = _to_matrix(X, self.flatten)
            scaler = StandardScaler().fit(Xm)
            Xs = scaler.transform(Xm)
            del Xm
            self.C_, self.cv_scores_, self.C_note_ = self._choose_C(Xs, y, groups)
            model = LogisticRegression(C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter,
                                       tol=self.tol, random_state=self.random_state)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(Xs, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.pipeline_ = Pipeline([("scaler", scaler), ("logreg", model)])
        self._dense_cache = None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def budget_mb(self) -> float:
        """The memory budget in MB: `memory_budget_mb`, or a quarter of physical memory when None."""
        if self.memory_budget_mb is None:
            return default_memory_budget_mb()
        budget = float(self.memory_budget_mb)
        if not budget > 0:
            raise UserError(f"the memory budget must be a positive number of MB, not {self.memory_budget_mb!r}")
        return budget

    def check_params(self) -> "LogisticHead":
        self._given_C()
        self.budget_mb()
        return self

    def _given_C(self) -> float | None:
        """The fixed C, or None for 'auto'; UserError for anything else."""
        return given_positive(self.C, "C")

    def _fit_streamed(self, X: FeatureSource, y: np.ndarray, groups: Any, need_mb: float, budget_mb: float) -> None:
        """Fit from the cache in blocks (features over the budget), leaving the in-memory head's arrays."""
        dim = self.n_features_in_
        raw_row_bytes = int(np.prod(X.feature_shape)) * X.file.features.dtype.itemsize
        with threadpool_limits(self.blas_threads, user_api="blas"):
            fit = fit_streamed_logistic(
                lambda rows: X.iter_reduced(self.flatten, rows), len(X), dim, y, C=self._given_C(),
                Cs=self.Cs, scoring=self.scoring, class_weight=self.class_weight, groups=groups, tol=self.tol,
                cv_tol=self.cv_tol, max_iter=int(self.max_iter), random_state=self.random_state,
                budget_mb=budget_mb, raw_row_bytes=raw_row_bytes)
        scaler = StandardScaler()
        scaler.mean_, scaler.var_, scaler.scale_ = fit.mean, fit.var, fit.scale
        scaler.n_samples_seen_, scaler.n_features_in_ = np.int64(len(X)), dim
        model = LogisticRegression(C=fit.C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol,
                                   random_state=self.random_state)
        model.coef_, model.intercept_, model.classes_ = fit.coef, fit.intercept, fit.classes
        model.n_iter_, model.n_features_in_ = np.asarray([fit.n_iter], np.int32), dim
        self.pipeline_ = Pipeline([("scaler", scaler), ("logreg", model)])
        self.C_, self.cv_scores_, self.C_note_, self.converged_ = fit.C, fit.cv_scores, fit.C_note, fit.converged
        self.stream_info_ = {"passes": fit.passes, "solver": fit.solver, "iterations": fit.n_iter,
                             "sample_rows": fit.sample_rows, "block_rows": fit.block_rows,
                             "seconds": {k: round(v, 3) for k, v in fit.seconds.items()}}
        self.stream_note_ = (f"logistic head streamed from the cache ({len(X)} rows x {dim} features: "
                             f"{need_mb:,.0f} MB in memory > budget {budget_mb:,.0f} MB; {fit.passes} passes)")

    def _choose_C(self, Xs: np.ndarray, y: np.ndarray, groups: Any) -> tuple[float, dict[float, float], str]:
        """(C, {C: mean CV score}, how C was chosen)."""
        C = self._given_C()
        if C is not None:
            return C, {}, "given"
        Cs = sorted(float(c) for c in self.Cs)
        if not Cs or Cs[0] <= 0:
            raise UserError("the C grid must hold positive numbers")
        cv, how = cv_folds(y, groups, self.cv, self.random_state)
        if cv is None:
            return 1.0, {}, f"default: {how}"
        search = LogisticRegressionCV(
            Cs=Cs, cv=cv, scoring=self.scoring, l1_ratios=(0.0,), use_legacy_attributes=False, refit=False,
            class_weight=self.class_weight, max_iter=self.max_iter, tol=self.cv_tol, n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        with warnings.catch_warnings(), parallel_config(backend=self.backend):
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(Xs, y)
        mean = np.asarray(search.scores_).reshape(-1, len(Cs)).mean(axis=0)
        best = int(np.argmax(mean))
        return Cs[best], {c: float(s) for c, s in zip(Cs, mean)}, f"{how} ({self.scoring})"

    def decision_function(self, X: Any, batch_size: int = 8192) -> np.ndarray:
        """Logits (n, n_classes) whose softmax is `predict_proba`, one column per class name; rows go
        through in batches, so a FeatureSource is never loaded whole."""
        self._check_input(X)
        if getattr(self, "_dense_cache", None) is None:
            self._dense_cache = self.as_dense_weights()
        W, b = self._dense_cache
        out = np.empty((_n_rows(X), W.shape[1]))
        for start, xb in _matrix_batches(X, self.flatten, batch_size):
            out[start:start + xb.shape[0]] = xb.astype(np.float64) @ W + b
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes); classes absent from training get ~0."""
        return softmax(self.decision_function(X).astype(np.float64))

    def as_dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of one linear layer equal to scaler + model: logits = x @ W + b on reduced features.

        Stage 3 turns the head into `Dense(n_classes, softmax)` with these weights. Binary models
        (one coefficient row) become logits [0, z], whose softmax is the logistic probability.
        """
        scaler, model = self.pipeline_.named_steps["scaler"], self.pipeline_.named_steps["logreg"]
        scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_) if scaler.scale_ is not None else 1.0
        coef = np.asarray(model.coef_, np.float64) / scale          # (k', d)
        inter = np.asarray(model.intercept_, np.float64) - coef @ scaler.mean_
        if coef.shape[0] == 1:                                     # binary: [0, z]
            coef = np.vstack([np.zeros_like(coef), coef])
            inter = np.array([0.0, inter[0]])
        W = np.zeros((coef.shape[1], self.n_classes_))
        b = np.full(self.n_classes_, _PAD_LOGIT)
        W[:, model.classes_] = coef.T
        b[model.classes_] = inter
        return W, b

    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.npz: scaler and model arrays) and `<path minus suffix>.json` (parameters,
        classes, metadata), atomically; both load without executing code (no pickle)."""
        path = npz_head_path(path, "a logistic head")
        scaler, model = self.pipeline_.named_steps["scaler"], self.pipeline_.named_steps["logreg"]
        arrays = {"scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_, "scaler_var": scaler.var_,
                  "scaler_n_samples_seen": np.asarray(scaler.n_samples_seen_),
                  "coef": model.coef_, "intercept": model.intercept_, "model_classes": model.classes_,
                  "n_iter": np.asarray(getattr(model, "n_iter_", [0]))}
        meta = {"format": _LOGISTIC_FORMAT, "version": 2, **self.metadata(), "C_": self.C_,
                "cv_scores": [[c, s] for c, s in self.cv_scores_.items()], "C_note": self.C_note_,
                "converged": self.converged_, "streamed": getattr(self, "streamed_", False),
                "stream_note": getattr(self, "stream_note_", "")}
        return write_npz_head(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, trust_pickle: bool = False) -> "LogisticHead":
        """Load `head.npz` + `head.json`; an old pickled `head.joblib` only with `trust_pickle`."""
        path = Path(path)
        if path.suffix == ".joblib":
            return cls._load_pickle(path, trust_pickle)
        side = path.with_suffix(".json")
        meta, arrays = read_npz_head(path, _LOGISTIC_FORMAT, "a logistic head", (
            "scaler_mean", "scaler_scale", "scaler_var", "scaler_n_samples_seen", "coef", "intercept", "model_classes",
            "n_iter"))
        try:
            head = cls(**_params_for(cls, meta["params"]))
            head._load_meta(meta)
            scaler = StandardScaler()
            scaler.mean_, scaler.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
            scaler.var_, scaler.n_samples_seen_ = arrays["scaler_var"], arrays["scaler_n_samples_seen"]
            scaler.n_features_in_ = int(arrays["scaler_mean"].shape[0])
            model = LogisticRegression(C=float(meta["C_"]), class_weight=head.class_weight, max_iter=head.max_iter,
                                       tol=head.tol, random_state=head.random_state)
            model.coef_, model.intercept_ = arrays["coef"], arrays["intercept"]
            model.classes_, model.n_iter_ = arrays["model_classes"], arrays["n_iter"]
            model.n_features_in_ = int(arrays["coef"].shape[1])
            if (scaler.n_features_in_ != head.n_features_in_ or model.n_features_in_ != head.n_features_in_
                    or model.classes_.max(initial=0) >= head.n_classes_):
                raise ValueError("arrays do not match the head's feature shape or classes")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UserError(f"{path} and {side.name} do not describe a valid logistic head ({exc}); "
                            f"re-run fit-head") from None
        head.pipeline_ = Pipeline([("scaler", scaler), ("logreg", model)])
        head.C_ = float(meta["C_"])
        head.cv_scores_ = {float(c): float(v) for c, v in meta.get("cv_scores") or []}
        head.C_note_, head.converged_ = meta.get("C_note", ""), meta.get("converged", True)
        head.streamed_, head.stream_note_ = bool(meta.get("streamed", False)), str(meta.get("stream_note", ""))
        return head

    @classmethod
    def _load_pickle(cls, path: Path, trust_pickle: bool) -> "LogisticHead":
        """An old (pre-npz) pickled head: unpickling can run code, so only when the user trusts it."""
        if not path.exists():
            raise UserError(f"no head file at {path}")
        if not trust_pickle:
            raise UserError(f"{path} is a pickled head from an older version of this tool, and loading a pickle "
                            f"can run code; pass --trust-pickle only if you trust where it came from, or re-run "
                            f"fit-head to save the head in the safe format")
        state = _load_joblib(path)
        if state.get("format") != _LOGISTIC_FORMAT:
            raise UserError(f"{path} is not a logistic head file")
        head = cls(**_params_for(cls, state["params"]))
        head._load_meta(state)
        head.pipeline_ = state["pipeline"]
        head.C_, head.cv_scores_ = state["C_"], state.get("cv_scores", {})
        head.C_note_, head.converged_ = state.get("C_note", ""), state.get("converged", True)
        return head

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_dense_cache", None)
        return state


def _load_joblib(path: str | os.PathLike) -> dict[str, Any]:
    try:
        state = joblib.load(path)
    except FileNotFoundError:
        raise UserError(f"no head file at {path}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling can raise almost anything
        raise UserError(f"{path} is not a readable head file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a head file written by this tool")
    return state


def _read_head_json(side: Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON description of a saved head; UserError when unreadable or of another format."""
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{side} is not a readable head description ({exc}); re-run fit-head") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise UserError(f"{side} does not describe {what}")
    return meta


def npz_head_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, refused unless it ends in .npz (where `what`, e.g. "an svm head", is saved)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{what} is saved as a .npz file, not {path.name}")
    return path


def write_npz_head(path: Path, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write a head's arrays to `path` (.npz) and its description beside it (.json), each atomically."""
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    write_text_atomic(path.with_suffix(".json"), json.dumps(jsonable(meta), indent=2))
    return path


def read_npz_head(path: Path, fmt: str, what: str, keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(description, arrays) of a head saved by `write_npz_head`, without pickle; UserError when either
    file is missing, unreadable, of another format, or lacks one of `keys`."""
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise UserError(f"{what} needs both {path.name} and {side.name} in {path.parent}; one is missing")
    meta = _read_head_json(side, fmt, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
    except Exception as exc:  # noqa: BLE001 - a damaged zip raises zipfile, OS or value errors
        raise UserError(f"{path} is not a readable head file ({type(exc).__name__}: {exc}); re-run fit-head") \
            from None
    return meta, arrays


def _params_for(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved params, dropping unknown ones and restoring tuples."""
    names = cls._get_param_names()
    out = {k: v for k, v in params.items() if k in names}
    for k in ("hidden", "Cs"):
        if isinstance(out.get(k), list):
            out[k] = tuple(out[k])
    return out


# ---------------------------------------------------------------------------------------- dense
def _keras():
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import; only dense heads need it

    return keras


def _compile_settings() -> dict[str, Any]:
    """How the small dense stack trains fastest on each backend: TensorFlow runs 32 steps per call
    without XLA (compiling costs more than it saves for a model this small); JAX must be jitted (un-jitted
    it dispatches op by op, ~6x slower); PyTorch takes one step per call and no torch.compile."""
    from pipeline.backend import name as backend_name

    backend = backend_name()
    if backend == "jax":
        return {"steps_per_execution": 32, "jit_compile": True}
    if backend == "torch":
        return {"steps_per_execution": 1, "jit_compile": False}
    return {"steps_per_execution": 32, "jit_compile": False}


class DenseHead(_Head):
    """Small Keras MLP: [pool/flatten] -> (Dense -> BN? -> ReLU -> Dropout?) x hidden -> softmax.

    Inputs are standardized with training-set statistics; the exported `model_` folds that into
    its first Dense layer, so it is plain Keras layers taking raw cache features (stage 3 can stack
    it on the backbone). Fits in memory when train+val fit in `memory_budget_mb`, else streams
    batches from the cache (a keras PyDataset). `history_` has loss/acc/val_loss/val_acc/lr.
    """

    kind = "dense"

    def __init__(self, hidden: Sequence[int] = (256,), batchnorm: bool = False, dropout: float = 0.0,
                 l2: float = 0.0, optimizer: str = "adam", lr: float = 1e-3, lr_schedule: str = "constant",
                 lr_start: float | None = None, lr_max: float | None = None, lr_min: float | None = None,
                 rampup_epochs: int | None = None, sustain_epochs: int | None = None,
                 exp_decay: float | None = None, epochs: int = 20, batch_size: int = 64,
                 early_stopping: int | None = None, class_weight: str | None = None, flatten: str = "avg",
                 memory_budget_mb: float = 2048.0, seed: int = 0, verbose: int = 0) -> None:
        self.hidden = hidden
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.l2 = l2
        self.optimizer = optimizer
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.lr_start = lr_start
        self.lr_max = lr_max
        self.lr_min = lr_min
        self.rampup_epochs = rampup_epochs
        self.sustain_epochs = sustain_epochs
        self.exp_decay = exp_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.class_weight = class_weight
        self.flatten = flatten
        self.memory_budget_mb = memory_budget_mb
        self.seed = seed
        self.verbose = verbose

    # -- configuration checks
    def schedule(self):
        """The learning-rate schedule these parameters describe (epoch -> lr)."""
        return make_schedule(self.lr_schedule, self.lr, self.epochs, lr_start=self.lr_start, lr_max=self.lr_max,
                             lr_min=self.lr_min, rampup_epochs=self.rampup_epochs,
                             sustain_epochs=self.sustain_epochs, exp_decay=self.exp_decay)

    def check_params(self) -> "DenseHead":
        self._validate()
        self.schedule()
        return self

    def _validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.l2 < 0 or int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise UserError("l2 must be >= 0, and epochs and batch_size >= 1")
        if any(int(h) < 1 for h in self.hidden):
            raise UserError(f"hidden layer sizes must be >= 1, not {tuple(self.hidden)}")
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        if self.early_stopping is not None and int(self.early_stopping) < 1:
            raise UserError(f"early_stopping is a patience in epochs (>= 1) or None, not {self.early_stopping}")

    def _structure(self, n_classes: int, dim: int) -> tuple:
        """What a compiled training model depends on (sweeps reuse one model per structure)."""
        return (tuple(int(h) for h in self.hidden), bool(self.batchnorm), float(self.dropout), float(self.l2),
                self.optimizer, int(n_classes), int(dim), int(self.batch_size), self.class_weight is not None,
                int(self.seed))

    # -- fitting
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, *, class_names: Sequence[str] | None = None,
            cache_key: str | None = None, feature_info: Mapping[str, Any] | None = None,
            _reuse: dict | None = None) -> "DenseHead":
        """Train on (X, y), validating on (X_val, y_val) each epoch when given (needed for early stopping).

        X / X_val: arrays (n, *feature_shape) or FeatureSource. `_reuse` (a dict the caller keeps)
        lets a sweep reuse compiled models between fits of the same structure.
        """
        self._validate()
        schedule = self.schedule()
        keras = _keras()
        y = np.asarray(y, dtype=np.int64)
        if _n_rows(X) != y.size:
            raise ValueError(f"X has {_n_rows(X)} rows but y has {y.size}")
        has_val = X_val is not None and _n_rows(X_val) > 0
        if self.early_stopping is not None and not has_val:
            raise ValueError("early_stopping monitors the validation loss, so it needs X_val and y_val")
        n_classes = self._set_meta(X, y, class_names, cache_key, feature_info)
        y_val = np.asarray(y_val, dtype=np.int64) if has_val else None
        if has_val and _raw_shape(X_val) != self.feature_shape_:
            raise ValueError(f"X_val has feature shape {_raw_shape(X_val)}, X has {self.feature_shape_}")
        t0 = time.perf_counter()
        from pipeline.backend import set_random_seed
        set_random_seed(int(self.seed))
        dim = self.n_features_in_
        need = (_n_rows(X) + (_n_rows(X_val) if has_val else 0)) * dim * 4 / 2**20
        self.streamed_ = isinstance(X, FeatureSource) and need > self.memory_budget_mb
        self.stream_note_ = (f"dense head streamed from the cache ({_n_rows(X)} train + "
                             f"{_n_rows(X_val) if has_val else 0} val rows x {dim} features: {need:,.0f} MB > "
                             f"budget {self.memory_budget_mb:,.0f} MB)") if self.streamed_ else ""
        weights = self._sample_weights(y, n_classes)
        if self.streamed_:
            mean, scale = _streamed_stats(X, self.flatten)
            train_rows = _streamed_rows(X, mean, scale, self.flatten)
            val_rows = _streamed_rows(X_val, mean, scale, self.flatten) if has_val else None
        else:
            Xm = _to_matrix(X, self.flatten)
            mean, scale = _stats(Xm)
            Xm = _standardize(Xm, mean, scale)
            train_rows = Xm.__getitem__
            val_rows = _standardize(_to_matrix(X_val, self.flatten), mean, scale).__getitem__ if has_val else None
        train = _batches(keras, y.size, train_rows, y, weights, int(self.batch_size), True, self.seed)
        val = _batches(keras, y_val.size, val_rows, y_val, None, 1024, False, self.seed) if has_val else None
        core = self._compiled_core(keras, n_classes, dim, _reuse)
        callbacks: list[Any] = [keras.callbacks.LearningRateScheduler(schedule)]
        stopper = None
        if self.early_stopping is not None:
            stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(self.early_stopping),
                                                    restore_best_weights=True)
            callbacks.append(stopper)
        hist = core.fit(train, validation_data=val, epochs=int(self.epochs), callbacks=callbacks,
                        verbose=self.verbose, shuffle=False)  # the datasets shuffle themselves
        self.history_ = _history(hist.history)
        self.n_epochs_ = len(self.history_["loss"])
        self.best_epoch_ = (int(stopper.best_epoch) if stopper is not None and stopper.best_weights is not None
                            else self.n_epochs_ - 1)
        self.model_ = self._export(keras, core, mean, scale)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _sample_weights(self, y: np.ndarray, n_classes: int) -> np.ndarray | None:
        if self.class_weight != "balanced":
            return None
        return balanced_class_weights(y, n_classes)[y].astype(np.float32)

    def _compiled_core(self, keras, n_classes: int, dim: int, reuse: dict | None):
        """A compiled training model on standardized (n, dim) inputs, fresh or reset from `reuse`."""
        key = self._structure(n_classes, dim)
        if reuse is not None and key in reuse:
            core, init = reuse[key]
            for v in core.variables:  # weights, seed states (and metrics) back to their first values
                if v.path in init:
                    v.assign(init[v.path])
            for v in core.optimizer.variables:
                v.assign(np.zeros(v.shape, v.dtype))
        else:
            core = _build_stack(keras, dim, n_classes, self, train=True)
            core.compile(optimizer=_optimizer(keras, self.optimizer, self.lr), loss="sparse_categorical_crossentropy",
                         metrics=["accuracy"], **_compile_settings())
            if reuse is not None:
                reuse[key] = (core, {v.path: np.array(v.numpy()) for v in core.variables})
        core.optimizer.learning_rate = float(self.lr)
        return core

    def _export(self, keras, core, mean: np.ndarray, scale: np.ndarray):
        """Inference model on raw features: pooling + the trained stack with standardization folded in."""
        model = _export_model(keras, self)
        stack = model.get_layer("stack")
        for layer in core.layers:
            if layer.weights:
                stack.get_layer(layer.name).set_weights(layer.get_weights())
        first = next(layer for layer in stack.layers if isinstance(layer, keras.layers.Dense))
        kernel, bias = first.get_weights()                        # (dim, units), (units,)
        first.set_weights([(kernel / scale[:, None]).astype(np.float32),
                           (bias - (mean / scale) @ kernel).astype(np.float32)])
        return model

    # -- prediction
    def predict_proba(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities (n, n_classes), computed eagerly in batches (no graph tracing)."""
        self._check_input(X)
        keras = _keras()
        stack = self.model_.get_layer("stack")
        out = np.empty((_n_rows(X), self.n_classes_), np.float32)
        for start, xb in _matrix_batches(X, self.flatten, batch_size):  # convert_to_numpy: torch tensors carry grad
            out[start:start + xb.shape[0]] = keras.ops.convert_to_numpy(stack(xb, training=False))
        return out

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.keras model) and `<path minus suffix>.json` (metadata, config, history)."""
        path = Path(path)
        if path.suffix != ".keras":
            raise UserError(f"a dense head is saved as a .keras file, not {path.name}")
        meta = {"format": _DENSE_FORMAT, "version": 1, **self.metadata(), "history": self.history_,
                "best_epoch": self.best_epoch_, "streamed": self.streamed_}
        save_keras_atomic(self.model_, path)
        write_text_atomic(path.with_suffix(".json"), json.dumps(jsonable(meta), indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DenseHead":
        path = Path(path)
        side = path.with_suffix(".json")
        if not path.exists() or not side.exists():
            raise UserError(f"a dense head needs both {path.name} and {side.name}; one is missing")
        meta = _read_head_json(side, _DENSE_FORMAT, "a dense head")
        try:
            head = cls(**_params_for(cls, meta["params"]))
            head._load_meta(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{side} does not describe a valid dense head ({exc}); re-run fit-head") from None
        head.history_ = meta.get("history", {})
        head.n_epochs_ = len(head.history_.get("loss", []))
        head.best_epoch_ = meta.get("best_epoch", head.n_epochs_ - 1)
        head.streamed_ = meta.get("streamed", False)
        head.model_ = load_keras_file(path)
        return head

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (joblib workers): the Keras model travels as its weight list."""
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = [np.asarray(w) for w in self.model_.get_weights()]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        weights = state.get("model_")
        self.__dict__.update(state)
        if isinstance(weights, list):
            keras = _keras()
            self.model_ = _export_model(keras, self)
            self.model_.set_weights(weights)


# -------------------------------------------------------------------------------- Keras helpers
def _export_model(keras, head: DenseHead):
    """Raw cache features -> [pool/flatten] -> the `stack` sub-model (its weights are set by the caller)."""
    L = keras.layers
    shape = tuple(head.feature_shape_)
    inp = keras.Input(shape, name="backbone_features")
    x = inp
    if len(shape) > 1:
        rank, pool = len(shape), head.flatten
        if pool == "flatten":
            x = L.Flatten(name="flatten")(x)
        elif pool == "avg":
            x = (L.GlobalAveragePooling2D if rank == 3 else L.GlobalAveragePooling1D)(name="avg_pool")(x)
        else:
            x = (L.GlobalMaxPooling2D if rank == 3 else L.GlobalMaxPooling1D)(name="max_pool")(x)
    stack = _build_stack(keras, head.n_features_in_, head.n_classes_, head, train=False, name="stack")
    return keras.Model(inp, stack(x), name="dense_head")


def _build_stack(keras, dim: int, n_classes: int, head: DenseHead, train: bool, name: str = "dense_stack"):
    """(n, dim) standardized or raw vectors -> (Dense -> BN? -> ReLU -> Dropout?)* -> Dense(softmax)."""
    L = keras.layers
    reg = keras.regularizers.L2(head.l2) if head.l2 and train else None
    inp = keras.Input((int(dim),), name="vectors")
    x = inp
    for i, units in enumerate(head.hidden):
        x = L.Dense(int(units), kernel_regularizer=reg, name=f"dense_{i}")(x)
        if head.batchnorm:
            x = L.BatchNormalization(name=f"bn_{i}")(x)
        x = L.Activation("relu", name=f"relu_{i}")(x)
        if head.dropout:
            x = L.Dropout(float(head.dropout), name=f"dropout_{i}")(x)
    out = L.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="classes")(x)
    return keras.Model(inp, out, name=name)


def _optimizer(keras, name: str, lr: float):
    opts = keras.optimizers
    if name == "sgd":
        return opts.SGD(learning_rate=lr, momentum=0.9)
    return {"adam": opts.Adam, "nadam": opts.Nadam, "rmsprop": opts.RMSprop}[name](learning_rate=lr)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class weights n / (k * count) (scikit-learn's 'balanced'; 0 for absent classes): the one
    implementation, used by the dense head and by fine-tuning."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    return mean, np.where(std > 1e-12, std, 1.0)


def _streamed_stats(src: FeatureSource, flatten: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of reduced features in one streamed pass (Chan's parallel update)."""
    n, mean, m2 = 0, None, None
    for _, x in src.iter_reduced(flatten):
        x = x.astype(np.float64)
        k, bm = x.shape[0], x.mean(axis=0)
        bm2 = ((x - bm) ** 2).sum(axis=0)
        if mean is None:
            n, mean, m2 = k, bm, bm2
            continue
        delta = bm - mean
        tot = n + k
        mean = mean + delta * k / tot
        m2 = m2 + bm2 + delta ** 2 * n * k / tot
        n = tot
    std = np.sqrt(m2 / max(n, 1))
    return mean, np.where(std > 1e-12, std, 1.0)


def _standardize(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return ((X - mean.astype(np.float32)) / scale.astype(np.float32)).astype(np.float32, copy=False)


def _batches(keras, n: int, rows: Callable[[np.ndarray], np.ndarray], y: np.ndarray, w: np.ndarray | None,
             batch_size: int, shuffle: bool, seed: int):
    """The one batching seam of the dense head: a Keras PyDataset (any backend, no tf.data) whose
    batch i is `rows(positions)` with their labels (and weights), reshuffled each epoch by a
    permutation seeded with (seed, epoch). `rows` indexes an in-memory matrix or reads the cache."""

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)  # iterated inline: no thread hop
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if not shuffle:
                return np.arange(n)
            return np.random.default_rng([int(seed), self.epoch]).permutation(n)

        def __len__(self) -> int:
            return math.ceil(n / batch_size)

        def __getitem__(self, i: int):
            pos = self.order[i * batch_size:(i + 1) * batch_size]
            x = rows(pos)
            return (x, y[pos]) if w is None else (x, y[pos], w[pos])

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return Batches()


def _streamed_rows(src: FeatureSource, mean: np.ndarray, scale: np.ndarray, flatten: str):
    """positions -> standardized, reduced features read from the cache (sorted reads, original order)."""
    def rows(pos: np.ndarray) -> np.ndarray:
        return _standardize(reduce_features(src.read(pos), flatten), mean, scale)
    return rows


def _history(h: Mapping[str, list]) -> dict[str, list[float]]:
    names = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc",
             "learning_rate": "lr"}
    return {new: [float(v) for v in h[old]] for old, new in names.items() if old in h}


# --------------------------------------------------------------------------------------- factory
# The head registry: kind -> class. `pipeline.heads.kernel` adds "svm" and "auto" when it is imported
# (which `pipeline.heads` does), so no file branches on kind names to build a head.
HEAD_TYPES: dict[str, type] = {"logistic": LogisticHead, "dense": DenseHead}


def make_head(kind: str, **params: Any) -> _Head:
    """A head by name (a key of HEAD_TYPES: 'auto', 'svm', 'logistic', 'dense') with these constructor parameters."""
    if kind not in HEAD_TYPES:
        raise UserError(f"unknown head type {kind!r}; choose one of {', '.join(HEAD_TYPES)}")
    cls = HEAD_TYPES[kind]
    unknown = sorted(set(params) - set(cls._get_param_names()))
    if unknown:
        raise UserError(f"the {kind} head has no parameter {', '.join(unknown)}")
    return cls(**params)


def head_filename(kind: str) -> str:
    """The artifact file name a head of this kind is saved under inside a run folder (beside it: head.json)."""
    return "head.keras" if kind == "dense" else "head.npz"


_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_pickle", default=False)


@contextlib.contextmanager
def trusting_pickles(trust: bool = True) -> Iterator[None]:
    """Within this block, `load_head` (called with no `trust_pickle`) also loads old pickled heads:
    how `--trust-pickle` reaches head loads deep inside a command (e.g. fine-tuning's stage-2 inputs)."""
    token = _TRUST_PICKLE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def load_head(path: str | os.PathLike, trust_pickle: bool | None = None) -> _Head:
    """Load a saved head of any kind (.keras = dense; .npz = logistic or svm, by its JSON); a run folder
    works too. An old pickled head.joblib loads only when trusted (`trust_pickle`, else the
    `trusting_pickles` block around the call), since unpickling can run code."""
    path = Path(path)
    trust_pickle = _TRUST_PICKLE.get() if trust_pickle is None else trust_pickle
    if path.is_dir():
        for name in ("head.keras", "head.npz", "head.joblib"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise UserError(f"{path} holds no head file (head.npz or head.keras); is it a fit-head run folder?")
    if path.suffix == ".keras":
        return DenseHead.load(path)
    if path.suffix == ".npz":  # logistic or svm: the JSON beside it says which
        from pipeline.heads.kernel import KERNEL_FORMAT, KernelHead  # noqa: PLC0415 - kernel imports this module
        try:
            fmt = json.loads(path.with_suffix(".json").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None  # LogisticHead.load says what is wrong
        if fmt == KERNEL_FORMAT:
            return KernelHead.load(path)
    return LogisticHead.load(path, trust_pickle=trust_pickle)


def load_keras_file(path: str | os.PathLike):
    """A .keras model loaded with Keras' safe_mode on (no deserialized Python code); a refused,
    truncated or corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        return _keras().saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for damaged files
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "unsafe" in text.lower():
            raise UserError(f"{path} contains Python code (e.g. a Lambda layer), which is not loaded for safety; "
                            f"re-create the model from a trusted run") from None
        raise UserError(f"{path} is truncated or not a readable Keras model ({type(exc).__name__}: {text[:160]}); "
                        f"re-run the command that wrote it") from None
