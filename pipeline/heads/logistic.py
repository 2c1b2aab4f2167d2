"""`LogisticHead` (kind "logistic"): multinomial logistic regression on standardized features, C by
stratified CV; it streams from the cache past the memory budget (`streaming.fit_streamed_logistic`)."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from joblib import parallel_config
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.errors import UserError
from pipeline.heads.base import (
    PAD_LOGIT, FeatureSource, Head, given_positive, keras_logits_head, keras_reduction, matrix_batches, n_rows,
    option_budget, option_C, option_seed, params_for, softmax, to_matrix,
)
from pipeline.heads.calibration import fit_temperature, nll
from pipeline.heads.files import load_joblib, npz_head_path, read_npz_head, write_npz_head
from pipeline.heads.folds import cv_folds
from pipeline.heads.scaling import feature_scale
from pipeline.heads.streaming import default_memory_budget_mb, fit_streamed_logistic

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 6))
LOGISTIC_FORMAT = "featurecache-logistic-head"


class LogisticHead(Head):
    """Multinomial logistic regression on standardized features (each divided by its std, floored at
    the median std: `scaling.feature_scale`); C="auto" picks C by stratified CV.

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
    file_format = LOGISTIC_FORMAT
    key_param_names = ("C", "class_weight", "flatten")
    tuple_params = ("Cs",)
    sweep_grid = {"C": [float(c) for c in np.logspace(-4, 1, 11)]}
    options = Head.shared_options | {"C", "class_weight", "jobs"}

    def __init__(self, C: float | str = "auto", Cs: Sequence[float] = DEFAULT_CS, cv: int = 5,
                 class_weight: str | None = None, scoring: str = "neg_log_loss", max_iter: int = 300,
                 tol: float = 1e-4, cv_tol: float = 1e-3, flatten: str = "avg", n_jobs: int | None = 1,
                 random_state: int = 0, blas_threads: int | None = 1, backend: str = "threading",
                 memory_budget_mb: float | None = None, calibrate: bool = True) -> None:
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
        self.calibrate = calibrate

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "LogisticHead":
        return cls(C=option_C(opts), class_weight=opts.get("class_weight"), n_jobs=opts.get("jobs", 1),
                   flatten=opts.get("flatten", "avg"), random_state=option_seed(opts),
                   memory_budget_mb=option_budget(opts))

    def fit(self, X: Any, y: Any, *, class_names: Sequence[str] | None = None, cache_key: str | None = None,
            feature_info: Mapping[str, Any] | None = None, groups: Any = None) -> "LogisticHead":
        """Fit on (X, y): arrays (n, *feature_shape), a FeatureSource or ReducedFeatures.

        groups: rows sharing a value stay in one CV fold (default for a FeatureSource: the image
        index, so augmented views of an image never validate their own copies while picking C).
        """
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        y = np.asarray(y, dtype=np.int64)
        if n_rows(X) != y.size:
            raise ValueError(f"X has {n_rows(X)} rows but y has {y.size}")
        self._set_meta(X, y, class_names, cache_key, feature_info)
        if groups is None and isinstance(X, FeatureSource):
            groups = X.file.index[X.rows]
        t0 = time.perf_counter()
        budget = self.budget_mb()
        need = 2 * y.size * self.n_features_in_ * 4 / 2**20   # the raw and the standardized float32 matrix
        self.streamed_ = isinstance(X, FeatureSource) and need > budget
        self.stream_note_ = ""
        self._dense_cache = None
        self.temperature_, self.calibration_note_ = 1.0, "not calibrated (calibrate=False)"
        self._oof_logits = None
        self.cv_log_loss_calibrated_ = None
        self.cv_accuracy_ = None
        if self.streamed_:
            self.calibration_note_ = "not calibrated: streamed from the cache (no out-of-fold predictions)"
            self._fit_streamed(X, y, groups, need, budget)
            self.fit_seconds_ = time.perf_counter() - t0
            return self
        with threadpool_limits(self.blas_threads, user_api="blas"):
            Xm = to_matrix(X, self.flatten)
            scaler = StandardScaler().fit(Xm)
            scaler.scale_ = feature_scale(np.sqrt(scaler.var_))  # no near-constant feature blown up
            Xs = scaler.transform(Xm)
            del Xm
            self.C_, self.cv_scores_, self.C_note_ = self._choose_C(Xs, y, groups)
            if self._oof_logits is not None:
                self.cv_accuracy_ = float(np.mean(self._oof_logits.argmax(axis=1) == y))
            model = LogisticRegression(C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter,
                                       tol=self.tol, random_state=self.random_state)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(Xs, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.pipeline_ = Pipeline([("scaler", scaler), ("logreg", model)])
        self._dense_cache = None
        if self.calibrate:
            self._calibrate(y)
        self._oof_logits = None
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
            self.calibration_note_ = "not calibrated: C was given (temperature scaling uses the CV of C='auto')"
            return C, {}, "given"
        Cs = sorted(float(c) for c in self.Cs)
        if not Cs or Cs[0] <= 0:
            raise UserError("the C grid must hold positive numbers")
        cv, how = cv_folds(y, groups, self.cv, self.random_state)
        if cv is None:
            self.calibration_note_ = f"not calibrated: {how}"
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
        self._oof_logits = _oof_logits(search, Xs, cv, best, self.n_classes_, np.unique(y))
        return Cs[best], {c: float(s) for c, s in zip(Cs, mean)}, f"{how} ({self.scoring})"

    def decision_function(self, X: Any, batch_size: int = 8192) -> np.ndarray:
        """Logits (n, n_classes) whose softmax is `predict_proba`, one column per class name; rows go
        through in batches, so a FeatureSource is never loaded whole."""
        self._check_input(X)
        if getattr(self, "_dense_cache", None) is None:
            self._dense_cache = self.as_dense_weights()
        W, b = self._dense_cache
        out = np.empty((n_rows(X), W.shape[1]))
        for start, xb in matrix_batches(X, self.flatten, batch_size):
            out[start:start + xb.shape[0]] = xb.astype(np.float64) @ W + b
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes); classes absent from training get ~0."""
        return softmax(self.decision_function(X).astype(np.float64))

    def as_dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of one linear layer equal to scaler + model: logits = x @ W + b on reduced features,
        divided by the fitted temperature (so every Keras form and export carries the calibration).

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
        b = np.full(self.n_classes_, PAD_LOGIT)
        T = float(getattr(self, "temperature_", 1.0))
        W[:, model.classes_] = coef.T / T
        b[model.classes_] = inter / T
        return W, b

    def _calibrate(self, y: np.ndarray) -> None:
        """Temperature scaling on the out-of-fold logits of the CV that chose C (at that C)."""
        if self._oof_logits is None:
            return
        self.temperature_ = fit_temperature(self._oof_logits, y)
        self.cv_log_loss_calibrated_ = nll(self._oof_logits, y, self.temperature_)
        self.calibration_note_ = "temperature scaling on out-of-fold logits of the C search"
        self._oof_logits = None

    # -------------------------------------------------------------------------- the tool's hooks
    def facts(self) -> dict[str, Any]:
        streamed = bool(getattr(self, "streamed_", False))
        extra: dict[str, Any] = {}
        if streamed:
            extra = {"stream_note": self.stream_note_} if getattr(self, "stream_note_", "") else {}
            if hasattr(self, "stream_info_"):
                extra["stream"] = self.stream_info_
        return {"C": self.C_, "C_choice": self.C_note_, "converged": self.converged_,
                "temperature": float(getattr(self, "temperature_", 1.0)),
                "calibration": getattr(self, "calibration_note_", ""),
                "cv_scores": {f"{c:g}": s for c, s in self.cv_scores_.items()}, "streamed": streamed, **extra}

    def c_curve(self) -> tuple[dict[float, float], float, str] | None:
        return (self.cv_scores_, self.C_, self.scoring) if getattr(self, "cv_scores_", None) else None

    def key_params(self) -> dict[str, Any]:
        """C as chosen once fitted (the runs table shows `C=10`, not auto)."""
        params = super().key_params()
        if getattr(self, "C_", None) is not None:
            params["C"] = self.C_
        return params

    def sweep_facts(self) -> dict[str, Any]:
        return {"converged": self.converged_}

    def after_fit_note(self) -> str:
        return self.stream_note_ if getattr(self, "streamed_", False) else ""

    def cv_log_loss(self) -> float | None:
        """The CV log loss at the chosen C, after temperature scaling when calibrated (None when C was
        given or too few rows to cross-validate)."""
        if self.scoring != "neg_log_loss" or not self.cv_scores_:
            return None
        calibrated = getattr(self, "cv_log_loss_calibrated_", None)
        return calibrated if calibrated is not None else -self.cv_scores_[self.C_]

    def cross_validates(self) -> bool:
        return self._given_C() is None

    def cv_accuracy(self) -> float | None:
        """Accuracy of the out-of-fold predictions at the chosen C (None where `cv_log_loss` is, and when
        streamed: its C search scores a sample and keeps no out-of-fold predictions)."""
        return getattr(self, "cv_accuracy_", None) if self.cv_log_loss() is not None else None

    def to_keras(self):
        """Reduce as the head does, then one Dense layer equal to scaler + model, then softmax."""
        inp, x = keras_reduction(self.feature_shape_, self.flatten)
        return keras_logits_head(inp, x, *self.as_dense_weights())

    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.npz: scaler and model arrays) and `<path minus suffix>.json` (parameters,
        classes, metadata), atomically; both load without executing code (no pickle)."""
        path = npz_head_path(path, "a logistic head")
        scaler, model = self.pipeline_.named_steps["scaler"], self.pipeline_.named_steps["logreg"]
        arrays = {"scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_, "scaler_var": scaler.var_,
                  "scaler_n_samples_seen": np.asarray(scaler.n_samples_seen_),
                  "coef": model.coef_, "intercept": model.intercept_, "model_classes": model.classes_,
                  "n_iter": np.asarray(getattr(model, "n_iter_", [0]))}
        meta = {"format": LOGISTIC_FORMAT, "version": 2, **self.metadata(), "C_": self.C_,
                "cv_scores": [[c, s] for c, s in self.cv_scores_.items()], "C_note": self.C_note_,
                "converged": self.converged_, "streamed": getattr(self, "streamed_", False),
                "stream_note": getattr(self, "stream_note_", ""),
                "temperature": float(getattr(self, "temperature_", 1.0)),
                "calibration_note": getattr(self, "calibration_note_", "")}
        return write_npz_head(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, trust_pickle: bool = False) -> "LogisticHead":
        """Load `head.npz` + `head.json`; an old pickled `head.joblib` only with `trust_pickle`."""
        path = Path(path)
        if path.suffix == ".joblib":
            return cls._load_pickle(path, trust_pickle)
        side = path.with_suffix(".json")
        meta, arrays = read_npz_head(path, LOGISTIC_FORMAT, "a logistic head", (
            "scaler_mean", "scaler_scale", "scaler_var", "scaler_n_samples_seen", "coef", "intercept", "model_classes",
            "n_iter"))
        try:
            head = cls(**params_for(cls, meta["params"]))
            head.load_meta(meta)
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
        head.temperature_ = _temperature(meta.get("temperature", 1.0), side)
        head.calibration_note_ = str(meta.get("calibration_note", "not calibrated (saved by an older version)"))
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
        state = load_joblib(path)
        if state.get("format") != LOGISTIC_FORMAT:
            raise UserError(f"{path} is not a logistic head file")
        head = cls(**params_for(cls, state["params"]))
        head.load_meta(state)
        head.pipeline_ = state["pipeline"]
        head.C_, head.cv_scores_ = state["C_"], state.get("cv_scores", {})
        head.C_note_, head.converged_ = state.get("C_note", ""), state.get("converged", True)
        return head

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_dense_cache", None)
        return state


def _oof_logits(search: LogisticRegressionCV, Xs: np.ndarray, folds: list, best: int, n_classes: int,
                classes: np.ndarray) -> np.ndarray | None:
    """Out-of-fold logits (n, n_classes) of the CV's fits at the C it chose, from its coefficient
    paths (no extra fit); None when the paths have an unexpected shape."""
    paths = np.asarray(search.coefs_paths_)
    if paths.ndim != 5 or paths.shape[0] != len(folds):  # (folds, l1 ratios, Cs, classes, features + 1)
        return None
    out = np.full((Xs.shape[0], n_classes), PAD_LOGIT)
    for f, (_, te) in enumerate(folds):
        coef = paths[f, 0, best]
        z = Xs[te] @ coef[:, :-1].T + coef[:, -1]
        if coef.shape[0] == 1:  # binary: logits [0, z]
            out[np.ix_(te, classes)] = np.hstack([np.zeros_like(z), z])
        else:
            out[np.ix_(te, classes)] = z
    return out


def _temperature(value: Any, side: Path) -> float:
    """A saved temperature, refused in one line unless a finite positive number."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (np.isfinite(t) and t > 0):
        raise UserError(f"{side} has temperature {value!r}, which is not a positive number; re-run fit-head")
    return t
