"""`KernelHead` (kind "svm"): an RBF-kernel SVM on L2-normalized features (the `auto` head weighs it
against the logistic head).

Why: on pooled CNN embeddings a kernel SVM on unit vectors beats a linear head where classes are not
linearly separable (flowers, EfficientNet-Lite0: 93.6% against the logistic head's 92.5%) and ties or
loses where they are (hymenoptera), hence the auto choice. Probabilities come from a softmax over the
SVM's one-vs-one decision values, fitted on out-of-fold decisions of the same cross-validation that
picks C (Platt's method for many classes; `calibration.PairCalibrator`, which keeps each pair's decision
on the side of the class it votes for), so `predict` is the argmax of calibrated `predict_proba`.

The whole head is `softmax(A @ k(x) + a)` with k(x)_j = exp(-gamma * |z - s_j|^2), z = x/|x| and
s_j the support vectors, so it is three built-in Keras layers (`as_kernel_layers`): UnitNormalization,
Dense(n_support, "exponential") and Dense(n_classes); export and fine-tuning use that stack. Kernel
methods grow with rows squared, so the head refuses more than `max_rows` training rows, or features
over the memory budget (the auto head then keeps the logistic one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from pipeline.errors import UserError
from pipeline.features.neighbours import unit_rows
from pipeline.heads.base import (
    PAD_LOGIT, FeatureSource, Head, given_positive, keras_logits_head, keras_module, keras_reduction, matrix_batches,
    n_rows, option_budget, option_C, option_seed, params_for, softmax, to_matrix,
)
from pipeline.heads.calibration import (
    calibrated_log_loss, cross_fitted_log_loss, fit_pair_calibrator, pair_calibrator_weights, pair_signs,
)
from pipeline.heads.files import npz_head_path, read_npz_head, write_npz_head
from pipeline.heads.folds import cv_folds

KERNEL_FORMAT = "featurecache-svm-head"
DEFAULT_SVM_CS: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
MAX_ROWS = 20000


def _finite(value: float | None, name: str) -> float | None:
    """libsvm needs finite C and gamma (the logistic head takes C=inf: no penalty)."""
    if value is not None and not np.isfinite(value):
        raise UserError(f"{name} must be a finite positive number, not {value}")
    return value


def _fit_fold(Z: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, C: float, gamma: float,
              class_weight: str | None) -> np.ndarray:
    svc = SVC(C=C, kernel="rbf", gamma=gamma, class_weight=class_weight, decision_function_shape="ovo")
    svc.fit(Z[train], y[train])
    return _ovo_all(svc, Z[test], np.unique(y))


def _ovo_all(svc: SVC, Z: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One-vs-one decisions for every pair of `classes` (a fold may miss a class: its pairs get 0)."""
    dec = svc.decision_function(Z)
    dec = dec.reshape(len(Z), -1)
    k = len(classes)
    if len(svc.classes_) == k:
        return dec
    out = np.zeros((len(Z), k * (k - 1) // 2))
    fold_pairs = [(int(a), int(b)) for i, a in enumerate(svc.classes_) for b in svc.classes_[i + 1:]]
    all_pairs = {(int(a), int(b)): j for j, (a, b) in enumerate(
        (classes[i], classes[jj]) for i in range(k) for jj in range(i + 1, k))}
    for col, pair in enumerate(fold_pairs):
        if pair in all_pairs:
            out[:, all_pairs[pair]] = dec[:, col]
    return out


def _pair_coefficients(svc: SVC) -> tuple[np.ndarray, np.ndarray]:
    """(P, p0) with decision_function(Z) == K(Z, support vectors) @ P.T + p0 ('ovo' columns), from
    libsvm's packed dual coefficients."""
    n_cls = len(svc.classes_)
    counts = svc.n_support_
    starts = np.concatenate([[0], np.cumsum(counts)])
    pairs = [(i, j) for i in range(n_cls) for j in range(i + 1, n_cls)]
    P = np.zeros((len(pairs), int(starts[-1])))
    for p, (i, j) in enumerate(pairs):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        P[p, si] = svc.dual_coef_[j - 1, si]
        P[p, sj] = svc.dual_coef_[i, sj]
    return P, np.asarray(svc.intercept_, np.float64)  # (binary: sklearn's public attributes are already flipped)


class KernelHead(Head):
    """RBF-kernel SVM on unit-length features; C="auto" picks C from `Cs` by the stratified CV's log
    loss of the calibrated out-of-fold decisions (what the auto head compares; CV accuracy differs by a
    few images between Cs, so it picked C 1, 3 or 10 as 1% of flowers' rows changed).

    gamma "scale" is 1 / (n_features * variance of the normalized training features), scikit-learn's
    rule. The CV's out-of-fold one-vs-one decisions (at the chosen C) fit the pair calibrator (a softmax
    over sign-kept linear maps of the decisions); the final SVM refits on all rows. Folds run in parallel threads (`n_jobs`).
    """

    kind = "svm"
    file_format = KERNEL_FORMAT
    key_param_names = ("C", "class_weight", "flatten")
    tuple_params = ("Cs",)
    sweep_grid = {"C": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]}
    options = Head.shared_options | {"C", "class_weight", "jobs"}
    scoring = "CV log loss (calibrated)"  # what picks C, lower is better: the c_curve.png label

    def __init__(self, C: float | str = "auto", Cs: Sequence[float] = DEFAULT_SVM_CS, gamma: float | str = "scale",
                 cv: int = 5, class_weight: str | None = None, flatten: str = "avg", n_jobs: int | None = 1,
                 random_state: int = 0, max_rows: int = MAX_ROWS, memory_budget_mb: float | None = None) -> None:
        self.C = C
        self.Cs = Cs
        self.gamma = gamma
        self.cv = cv
        self.class_weight = class_weight
        self.flatten = flatten
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.max_rows = max_rows
        self.memory_budget_mb = memory_budget_mb

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "KernelHead":
        return cls(C=option_C(opts), class_weight=opts.get("class_weight"), n_jobs=opts.get("jobs", 1),
                   flatten=opts.get("flatten", "avg"), random_state=option_seed(opts),
                   memory_budget_mb=option_budget(opts))

    # ------------------------------------------------------------------------------ parameters
    def check_params(self) -> "KernelHead":
        self._given_C()
        self._given_gamma()
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        if not (isinstance(self.max_rows, (int, np.integer)) and self.max_rows >= 2):
            raise UserError(f"max_rows must be an integer >= 2, not {self.max_rows!r}")
        return self

    def _given_C(self) -> float | None:
        return _finite(given_positive(self.C, "C"), "C")

    def _given_gamma(self) -> float | None:
        return _finite(given_positive(self.gamma, "gamma", auto="scale"), "gamma")

    # ------------------------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any, *, class_names: Sequence[str] | None = None, cache_key: str | None = None,
            feature_info: Mapping[str, Any] | None = None, groups: Any = None) -> "KernelHead":
        """Fit on (X, y): arrays (n, *feature_shape), a FeatureSource or ReducedFeatures.

        groups: rows sharing a value stay in one CV fold (default for a FeatureSource: the image
        index, so augmented views of an image never score their own copies).
        """
        self.check_params()
        y = np.asarray(y, dtype=np.int64)
        if n_rows(X) != y.size:
            raise ValueError(f"X has {n_rows(X)} rows but y has {y.size}")
        if y.size > self.max_rows:
            raise UserError(f"the svm head fits at most {self.max_rows:,} training rows here (its cost grows with "
                            f"rows squared), and there are {y.size:,}; use --head logistic")
        self._set_meta(X, y, class_names, cache_key, feature_info)
        need_mb = 2 * y.size * self.n_features_in_ * 8 / 2**20  # float64 features, normalized copy included
        if self.memory_budget_mb is not None and need_mb > self.memory_budget_mb:
            raise UserError(f"the svm head needs the training features in memory (~{need_mb:,.3g} MB > budget "
                            f"{self.memory_budget_mb:,.3g} MB); use --head logistic, which streams from the cache")
        if groups is None and isinstance(X, FeatureSource):
            groups = X.file.index[X.rows]
        t0 = time.perf_counter()
        Z = unit_rows(to_matrix(X, self.flatten), dtype=np.float64)
        present = np.unique(y)
        gamma = self._given_gamma()
        self.gamma_ = float(gamma if gamma is not None else 1.0 / (Z.shape[1] * max(Z.var(), 1e-12)))
        given = self._given_C()
        Cs = [given] if given is not None else sorted(float(c) for c in self.Cs)
        if not Cs or Cs[0] <= 0:
            raise UserError("the C grid must hold positive numbers")
        folds, how = cv_folds(y, groups, self.cv, self.random_state)
        with threadpool_limits(1, user_api="blas"):
            if folds is None:
                self.C_, self.cv_scores_, self.cv_accuracies_ = Cs[0] if given is None else given, {}, {}
                self.C_note_ = f"{'given' if given is not None else 'default'}: {how}"
                self.cv_how_ = ""
            else:
                jobs = [(C, tr, te) for C in Cs for tr, te in folds]
                decs = Parallel(n_jobs=self.n_jobs, backend="threading")(
                    delayed(_fit_fold)(Z, y, tr, te, C, self.gamma_, self.class_weight) for C, tr, te in jobs)
                oof_by_C = {C: np.zeros((y.size, len(present) * (len(present) - 1) // 2)) for C in Cs}
                for (C, _, te), dec in zip(jobs, decs):
                    oof_by_C[C][te] = dec
                self.cv_accuracies_ = {C: float(np.mean([(self._vote(oof_by_C[C][te], present) == y[te]).mean()
                                                         for _, te in folds])) for C in Cs}
                weights = pair_calibrator_weights(present.size)
                if y.size > weights:  # scored on the rows it was fitted on, as the logistic's temperature is
                    cals = {C: fit_pair_calibrator(oof_by_C[C], y, present) for C in Cs}
                    self.cv_scores_ = {C: calibrated_log_loss(cals[C], oof_by_C[C], y) for C in Cs}
                    self.cv_how_ = "calibrator scored on the out-of-fold decisions it was fitted on"
                else:  # it has as many weights as rows: fitted again without each fold
                    cals = {}
                    self.cv_scores_ = {C: cross_fitted_log_loss(oof_by_C[C], y, folds) for C in Cs}
                    self.cv_how_ = (f"calibrator cross-fitted: {y.size} rows are too few to score its {weights} weights "
                                    f"on the rows it was fitted on")
                best = min(Cs, key=lambda c: (self.cv_scores_[c], c))  # ties (large Cs often fit alike): the smaller
                self.C_ = best if given is None else given
                self.C_note_ = "given" if given is not None else f"{how} (calibrated log loss)"
                cal = cals[self.C_] if self.C_ in cals else fit_pair_calibrator(oof_by_C[self.C_], y, present)
            svc = SVC(C=self.C_, kernel="rbf", gamma=self.gamma_, class_weight=self.class_weight,
                      decision_function_shape="ovo").fit(Z, y)
            P, p0 = _pair_coefficients(svc)
            if folds is None:  # too few examples to cross-validate: calibrate on the training decisions
                cal = fit_pair_calibrator(svc.decision_function(Z).reshape(y.size, -1), y, present)
            self.cv_log_loss_ = self.cv_scores_[self.C_] if folds is not None else None
        self.calibrator_converged_ = cal.converged_
        coef, inter = cal.coef_, cal.intercept_
        A = np.zeros((self.n_classes_, P.shape[1]))
        a = np.full(self.n_classes_, PAD_LOGIT)
        A[cal.classes_] = coef @ P
        a[cal.classes_] = coef @ p0 + inter
        self.support_vectors_ = Z[svc.support_].astype(np.float32)
        self.coef_, self.intercept_ = A, a
        self.n_support_ = int(svc.support_.size)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    @staticmethod
    def _vote(dec: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """libsvm's one-vs-one vote -> class labels: each pair's decision is one vote for the class it favours
        (`pair_signs`: positive for the first class of the pair; scikit-learn's binary decision, the second)."""
        signs = pair_signs(len(classes))
        votes = (dec > 0).astype(np.int64) @ (signs > 0).T.astype(np.int64) + \
            (dec <= 0).astype(np.int64) @ (signs < 0).T.astype(np.int64)
        return classes[votes.argmax(axis=1)]

    # --------------------------------------------------------------------------------- predict
    def decision_function(self, X: Any, batch_size: int = 2048) -> np.ndarray:
        """Calibrated logits (n, n_classes) whose softmax is `predict_proba`; rows go in batches."""
        self._check_input(X)
        sv = self.support_vectors_.astype(np.float64)
        sv_sq = (sv * sv).sum(axis=1)
        out = np.empty((n_rows(X), self.n_classes_))
        for start, xb in matrix_batches(X, self.flatten, batch_size):
            z = unit_rows(xb, dtype=np.float64)
            d2 = np.maximum((z * z).sum(axis=1, keepdims=True) + sv_sq - 2.0 * z @ sv.T, 0.0)
            out[start:start + z.shape[0]] = np.exp(-self.gamma_ * d2) @ self.coef_.T + self.intercept_
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes); classes absent from training get ~0."""
        return softmax(self.decision_function(X))

    def as_kernel_layers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(W1, b1, W2, b2): Dense(n_support, 'exponential') then Dense(n_classes) on unit-normalized
        features give the logits: exp(2g z.s - 2g) = exp(-g |z - s|^2) for unit z and s."""
        sv = self.support_vectors_.astype(np.float64)
        g = self.gamma_
        return 2.0 * g * sv.T, -g * (1.0 + (sv * sv).sum(axis=1)), self.coef_.T, self.intercept_

    # --------------------------------------------------------------------------- the tool's hooks
    def facts(self) -> dict[str, Any]:
        return {"C": self.C_, "C_choice": self.C_note_, "gamma": self.gamma_, "n_support": self.n_support_,
                "cv_scores": {f"{c:g}": s for c, s in self.cv_scores_.items()},
                "cv_accuracies": {f"{c:g}": s for c, s in self.cv_accuracies_.items()}, "cv_log_loss": self.cv_log_loss_,
                "cv_log_loss_on": getattr(self, "cv_how_", ""), "calibrator_converged": getattr(self, "calibrator_converged_", None)}

    def c_curve(self) -> tuple[dict[float, float], float, str] | None:
        return (self.cv_scores_, self.C_, self.scoring) if getattr(self, "cv_scores_", None) else None

    def key_params(self) -> dict[str, Any]:
        """C as chosen once fitted (the runs table shows `C=10`, not auto)."""
        params = super().key_params()
        if getattr(self, "C_", None) is not None:
            params["C"] = self.C_
        return params

    def sweep_facts(self) -> dict[str, Any]:
        return {"n_support": self.n_support_}

    def after_fit_note(self) -> str:
        if getattr(self, "calibrator_converged_", None) is not False:
            return ""
        return ("svm head: the fit of its probability calibrator stopped before converging; its best point is kept, "
                "so the probabilities may be less well calibrated (the run's ECE and reliability diagram say how much)")

    def cv_log_loss(self) -> float | None:
        """The log loss of the out-of-fold decisions, calibrated (None without CV; `cv_how_` says how)."""
        return self.cv_log_loss_

    def cross_validates(self) -> bool:
        return True  # C given or not, the calibrator is fitted on out-of-fold decisions

    def cv_accuracy(self) -> float | None:
        """The out-of-fold vote's accuracy at the C used, mean over folds (None without CV)."""
        return self.cv_accuracies_.get(self.C_) if self.cv_log_loss_ is not None else None

    def to_keras(self):
        """Reduce, unit length, Dense(n_support, exponential) = the RBF kernel against the support
        vectors, then Dense logits and softmax: three built-in layers."""
        L = keras_module().layers
        inp, x = keras_reduction(self.feature_shape_, self.flatten)
        W1, b1, W, b = self.as_kernel_layers()
        x = L.UnitNormalization(name="unit_length", dtype="float32")(x)
        kernel = L.Dense(W1.shape[1], activation="exponential", name="rbf_kernel", dtype="float32")
        x = kernel(x)
        kernel.set_weights([np.asarray(W1, np.float32), np.asarray(b1, np.float32)])
        return keras_logits_head(inp, x, W, b)

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.npz arrays) and `<path minus suffix>.json` atomically; no pickle."""
        path = npz_head_path(path, "an svm head")
        arrays = {"support_vectors": self.support_vectors_, "coef": self.coef_, "intercept": self.intercept_}
        meta = {"format": KERNEL_FORMAT, "version": 2, **self.metadata(), "C_": self.C_, "gamma_": self.gamma_,
                "n_support": self.n_support_, "cv_scores": [[c, s] for c, s in self.cv_scores_.items()],
                "cv_accuracies": [[c, s] for c, s in self.cv_accuracies_.items()],
                "C_note": self.C_note_, "cv_log_loss": self.cv_log_loss_}
        return write_npz_head(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KernelHead":
        """Load `head.npz` + `head.json` written by `save`."""
        path = Path(path)
        side = path.with_suffix(".json")
        meta, arrays = read_npz_head(path, KERNEL_FORMAT, "an svm head", ("support_vectors", "coef", "intercept"))
        try:
            head = cls(**params_for(cls, meta["params"]))
            head.load_meta(meta)
            sv, coef, inter = arrays["support_vectors"], arrays["coef"], arrays["intercept"]
            if (sv.ndim != 2 or sv.shape[1] != head.n_features_in_ or coef.shape != (head.n_classes_, sv.shape[0])
                    or inter.shape != (head.n_classes_,)):
                raise ValueError("arrays do not match the head's feature shape or classes")
            head.support_vectors_, head.coef_, head.intercept_ = sv, coef, inter
            head.C_, head.gamma_ = float(meta["C_"]), float(meta["gamma_"])
            head.n_support_ = int(meta.get("n_support", sv.shape[0]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} and {side.name} do not describe a valid svm head ({exc}); re-run fit-head") \
                from None
        scores = {float(c): float(v) for c, v in meta.get("cv_scores") or []}
        if meta.get("version", 1) < 2:  # version 1 picked C by CV accuracy and kept only those scores
            head.cv_scores_, head.cv_accuracies_ = {}, scores
        else:
            head.cv_scores_ = scores
            head.cv_accuracies_ = {float(c): float(v) for c, v in meta.get("cv_accuracies") or []}
        head.C_note_ = meta.get("C_note", "")
        head.cv_log_loss_ = meta.get("cv_log_loss")
        return head
