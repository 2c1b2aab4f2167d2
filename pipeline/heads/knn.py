"""`KNNHead` (kind "knn"): a temperature-weighted vote of the k most similar training images (cosine
similarity of unit-length features; DINO's `eval_knn` rule, k=20, T=0.07 there), that can show its
reasons: the nearest training images of each prediction (`neighbours`, `predict --explain K`).

The head *is* the training matrix: fitting stores the unit-length training rows and their labels and
needs no training, so a cache that grew by incremental extraction is a new head in seconds. k and the
vote temperature are chosen (unless given) by leave-one-image-out cross-validation on the training
rows: each row's neighbours come from the shared cosine search (`features.neighbours`), never from
its own image's augmented views. The vote v (per class, summing exp((s - 1) / T) over the k
neighbours, normalized; computed relative to the nearest neighbour's similarity, which leaves the
normalized vote as it is and never underflows) becomes logits log(v + VOTE_FLOOR), and temperature scaling on the same
out-of-fold votes calibrates them (`calibration`). The CV log loss it reports, which the auto head
compares with the logistic and svm heads' figures, is the chosen vote's on *their* folds (`cv_folds`,
the same seed): each row voted on by the other folds' rows only, the temperature fitted without the
fold it scores. Leave-one-out lets every other row vote, so it ran ahead of the others' 5-fold
figures: on flowers cleaned by `audit` the knn led the svm by 0.0025 on a fold where it trailed by
0.012 on the svm's folds, and was kept, scoring 9 images fewer (bench/audit.py --parts clean-cv).

Its Keras form is the same arithmetic in built-in layers and `keras.ops` (so it loads in safe mode):
UnitNormalization, a Dense layer whose kernel is the training matrix (similarities), top-k, the
weights, an Embedding of one-hot labels gathered by the top-k indices (the vote), log and softmax; export and fine-tuning use it
(fine-tuning keeps the stored training matrix fixed and moves the backbone's top blocks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.features.neighbours import CosineIndex, Neighbours, unit_rows, vote_shares
from pipeline.heads.base import (
    FeatureSource, Head, given_positive, keras_module, keras_reduction, matrix_batches, n_rows, option_budget, option_seed, params_for, softmax,
    to_matrix,
)
from pipeline.heads.calibration import fit_temperature, nll
from pipeline.heads.folds import cv_folds, is_grouped
from pipeline.heads.files import npz_head_path, read_npz_head, write_npz_head

KNN_FORMAT = "featurecache-knn-head"
DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
DEFAULT_VOTE_TEMPERATURES: tuple[float, ...] = (0.02, 0.05, 0.07, 0.1, 0.2)
VOTE_FLOOR = 1e-3  # added to each class's normalized vote before the log: a class no neighbour has is not -inf
CV_ROWS = 5000     # training rows (a stratified sample) that score the (k, T) grid and fit the calibration
FOLD_SPARE = 2     # neighbours listed per k of the grid: k of them from the other folds are then all but sure
LARGE_MB = 200     # a head file above this size gets a one-line note


def vote_logits(similarity: np.ndarray, labels: np.ndarray, n_classes: int, k: int, temperature: float) -> np.ndarray:
    """Logits log(v + VOTE_FLOOR) of the weighted vote v over the first k neighbours (most similar
    first; missing neighbours have similarity -inf and label -1)."""
    return np.log(vote_shares(similarity[:, :k], labels[:, :k], n_classes, temperature) + VOTE_FLOOR)


class KNNHead(Head):
    """Weighted k-nearest-neighbour vote on unit-length features; k and T ("auto") by leave-one-image-out
    CV on (at most `cv_rows` of) the training rows, then temperature scaling of the vote on the same
    out-of-fold rows (`calibrate`). Its memory, the (n_train, d) float32 matrix, must fit
    `memory_budget_mb` (None: a quarter of physical memory)."""

    kind = "knn"
    file_format = KNN_FORMAT
    key_param_names = ("k", "vote_temperature", "flatten")
    tuple_params = ("ks", "vote_temperatures")
    sweep_grid = {"k": [5, 10, 20, 50], "vote_temperature": [0.03, 0.07, 0.1]}
    options = Head.shared_options | {"k", "vote_temperature"}
    scoring = "CV log loss"
    explains = True

    def __init__(self, k: int | str = "auto", vote_temperature: float | str = "auto", ks: Sequence[int] = DEFAULT_KS,
                 vote_temperatures: Sequence[float] = DEFAULT_VOTE_TEMPERATURES, flatten: str = "avg",
                 calibrate: bool = True, cv_rows: int = CV_ROWS, random_state: int = 0,
                 memory_budget_mb: float | None = None, cv: int = 5) -> None:
        self.k = k
        self.vote_temperature = vote_temperature
        self.ks = ks
        self.vote_temperatures = vote_temperatures
        self.flatten = flatten
        self.calibrate = calibrate
        self.cv_rows = cv_rows
        self.random_state = random_state
        self.memory_budget_mb = memory_budget_mb
        self.cv = cv

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "KNNHead":
        return cls(k=opts.get("k") or "auto", vote_temperature=opts.get("vote_temperature") or "auto",
                   flatten=opts.get("flatten", "avg"), random_state=option_seed(opts),
                   memory_budget_mb=option_budget(opts))

    @classmethod
    def sweep_fits(cls, configs: list[dict[str, Any]], n_train: int) -> list[dict[str, Any]]:
        """The grid's k values a vote can take on `n_train` rows (more than k others), as a fit's auto
        grid is trimmed; UserError where none can."""
        fits = [c for c in configs if "k" not in c or int(c["k"]) <= n_train - 1]
        if not fits:
            smallest = min(int(c["k"]) for c in configs)
            raise UserError(f"the knn sweep's smallest k, {smallest}, needs more than {smallest} training rows, and "
                            f"there are {n_train}; fit --head knn without --sweep (its k is chosen by CV)")
        return fits

    # ------------------------------------------------------------------------------ parameters
    def check_params(self) -> "KNNHead":
        given_positive(self.k, "k", whole=True)
        given_positive(self.vote_temperature, "the vote temperature", finite=True)
        for k in self.ks:
            given_positive(k, "each k of the grid", whole=True)
        for t in self.vote_temperatures:
            given_positive(t, "each vote temperature of the grid", finite=True)
        if not (isinstance(self.cv_rows, (int, np.integer)) and self.cv_rows >= 2):
            raise UserError(f"cv_rows must be a whole number >= 2, not {self.cv_rows!r}")
        if self.memory_budget_mb is not None and not float(self.memory_budget_mb) > 0:
            raise UserError(f"the memory budget must be a positive number of MB, not {self.memory_budget_mb!r}")
        return self

    def _grid(self) -> tuple[list[int], list[float]]:
        k = given_positive(self.k, "k", whole=True)
        t = given_positive(self.vote_temperature, "the vote temperature", finite=True)
        ks = [k] if k is not None else sorted({int(v) for v in self.ks})
        ts = [t] if t is not None else sorted({float(v) for v in self.vote_temperatures})
        if not ks or not ts:
            raise UserError("the kNN head's k and vote temperature grids must not be empty")
        return ks, ts

    # ------------------------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any, *, class_names: Sequence[str] | None = None, cache_key: str | None = None,
            feature_info: Mapping[str, Any] | None = None, groups: Any = None,
            paths: Sequence[str] | None = None) -> "KNNHead":
        """Store the unit-length training rows (X: arrays, a FeatureSource or ReducedFeatures) and their
        labels, and choose k and T by CV. groups: one id per row (default for a FeatureSource: the image
        index), so an image's views never vote for it; paths: each row's image (default for a
        FeatureSource: the cache's paths), shown by `neighbours`."""
        self.check_params()
        y = np.asarray(y, dtype=np.int64)
        if n_rows(X) != y.size:
            raise ValueError(f"X has {n_rows(X)} rows but y has {y.size}")
        n_classes = self._set_meta(X, y, class_names, cache_key, feature_info)
        budget = option_budget({"memory_budget": self.memory_budget_mb})
        self.memory_mb_ = y.size * self.n_features_in_ * 4 / 2**20
        if self.memory_mb_ > budget:
            raise UserError(f"the knn head keeps its {y.size:,} x {self.n_features_in_:,} training matrix in memory "
                            f"and in its file (~{self.memory_mb_:,.0f} MB > budget {budget:,.0f} MB); use --head "
                            f"logistic, which streams from the cache, or raise --memory-budget")
        ks, ts = self._grid()
        per_class = np.bincount(y, minlength=n_classes)
        smallest = int(per_class[per_class > 0].min())
        if given_positive(self.k, "k", whole=True) is not None and ks[0] > y.size - 1:
            raise UserError(f"k={ks[0]} needs more than {ks[0]} training rows, and there are {y.size}; "
                            f"give a smaller --k")
        ks = [k for k in ks if k <= y.size - 1] or [y.size - 1]  # the auto grid, trimmed to the rows there are
        if isinstance(X, FeatureSource):
            groups = X.file.index[X.rows] if groups is None else groups
            paths = [X.file.paths[r] for r in X.rows] if paths is None else paths
        t0 = time.perf_counter()
        self.memory_ = unit_rows(to_matrix(X, self.flatten))
        self.memory_labels_ = y
        self.memory_paths_ = np.asarray(list(paths) if paths is not None else [], dtype=str)
        if self.memory_paths_.size not in (0, y.size):
            raise ValueError(f"{self.memory_paths_.size} paths for {y.size} rows")
        groups = np.arange(y.size) if groups is None else np.asarray(groups)
        self.k_, self.vote_temperature_ = ks[0], ts[0]
        self.cv_scores_: dict[str, float] = {}
        self.cv_log_loss_ = self.cv_accuracy_ = None
        self.cv_how_ = "leave-one-image-out"
        self.temperature_, self.calibration_note_ = 1.0, "not calibrated (calibrate=False)"
        self.note_ = ""
        cv = self._cross_validate(y, groups, ks, ts)
        if cv is not None:
            self._choose(cv, y, ks, ts)
            self._score_on_folds(cv, y, groups)
        if smallest < self.k_:
            self.note_ = (self.note_ + "; " if self.note_ else "") + (
                f"a class has {smallest} training row(s), fewer than k={self.k_}: its vote is outweighed "
                f"(--k {max(1, smallest)} lets it count fully)")
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _cross_validate(self, y: np.ndarray, groups: np.ndarray, ks: list[int], ts: list[float]):
        """(query rows, their neighbours' similarities, labels and rows) for leave-one-image-out CV on a
        stratified sample of at most `cv_rows` training rows; None when nothing can be scored. FOLD_SPARE
        times the largest k are listed, so that the rows of other folds alone still fill it."""
        if len(ks) * len(ts) == 1 and not self.calibrate:
            return None  # nothing to choose or fit: no search
        rng = np.random.default_rng(self.random_state)
        if y.size > self.cv_rows:  # a sample stratified by class, in row order
            take = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max(1, round(self.cv_rows * (y == c).mean()))]
                                   for c in np.unique(y)])
            queries = np.sort(take)
        else:
            queries = np.arange(y.size)
        index = CosineIndex(self.memory_, groups=groups, normalized=True)
        nb = index.query(self.memory_[queries], min(FOLD_SPARE * ks[-1], y.size - 1), query_groups=groups[queries])
        labels = np.where(nb.index >= 0, y[np.maximum(nb.index, 0)], -1)
        return queries, nb.similarity, labels, nb.index

    def _choose(self, cv, y: np.ndarray, ks: list[int], ts: list[float]) -> None:
        queries, sim, labels, _ = cv
        yq = y[queries]
        best = None
        for k in ks:
            for t in ts:  # scored calibrated either way, so `calibrate` changes the probabilities, not k or T
                z = vote_logits(sim, labels, self.n_classes_, k, t)
                temp = fit_temperature(z, yq)
                loss = nll(z, yq, temp)
                acc = float((z.argmax(axis=1) == yq).mean())
                self.cv_scores_[f"k={k} T={t:g}"] = loss
                key = (loss, -acc, k, t)
                if best is None or key < best[0]:
                    best = (key, k, t, temp, loss)
        (_, neg_acc, *_), self.k_, self.vote_temperature_, temp, self.cv_log_loss_ = best
        self.cv_accuracy_ = -neg_acc
        if not self.calibrate:
            self.cv_log_loss_ = nll(vote_logits(sim, labels, self.n_classes_, self.k_, self.vote_temperature_), yq)
        else:
            self.temperature_ = temp
            self.calibration_note_ = (f"temperature scaling on leave-one-image-out votes of {queries.size:,} "
                                      f"training rows")

    def _score_on_folds(self, cv, y: np.ndarray, groups: np.ndarray) -> None:
        """The chosen vote's CV log loss and accuracy on the folds the logistic and svm heads use (the
        module docstring): each query row's first k neighbours among the other folds' rows, the
        temperature fitted on the other folds' query rows. Where those folds cannot be made (a class of
        one image) the leave-one-out figures stay, as the other heads then have none to compare."""
        folds, how = cv_folds(y, groups if is_grouped(groups) else None, self.cv, self.random_state)
        if folds is None:
            return
        fold = np.empty(y.size, np.int64)
        for f, (_, test) in enumerate(folds):
            fold[test] = f
        queries, sim, labels, idx = cv
        other = (idx >= 0) & (fold[np.maximum(idx, 0)] != fold[queries][:, None])
        order = np.argsort(~other, axis=1, kind="stable")  # the other folds' neighbours first, most similar first
        z = vote_logits(np.take_along_axis(np.where(other, sim, -np.inf), order, axis=1),
                        np.take_along_axis(np.where(other, labels, -1), order, axis=1),
                        self.n_classes_, self.k_, self.vote_temperature_)
        yq, fq = y[queries], fold[queries]
        loss = 0.0
        for f in np.unique(fq):
            test, train = fq == f, fq != f
            temp = fit_temperature(z[train], yq[train]) if self.calibrate else 1.0
            loss += nll(z[test], yq[test], temp) * int(test.sum())
        self.cv_log_loss_ = loss / yq.size
        self.cv_accuracy_ = float((z.argmax(axis=1) == yq).mean())
        self.cv_how_ = f"{how} (the other heads' folds)"

    # --------------------------------------------------------------------------------- predict
    def neighbours(self, X: Any, k: int | None = None, batch_size: int = 2048) -> Neighbours:
        """The k (default: the head's k) most similar training rows of each row of X: indices into the
        head's memory (`memory_paths_` names their images) and cosine similarities, most similar first."""
        self._check_input(X)
        k = min(int(self.k_ if k is None else k), self.memory_.shape[0])
        index = CosineIndex(self.memory_, normalized=True)
        parts = [index.query(xb, k) for _, xb in matrix_batches(X, self.flatten, batch_size)]
        if not parts:
            return Neighbours(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        return Neighbours(np.concatenate([p.index for p in parts]), np.concatenate([p.similarity for p in parts]))

    def neighbour_paths(self, nb: Neighbours) -> list[list[str]]:
        """The image path (or, without stored paths, 'row N') of each neighbour in `nb`."""
        names = self.memory_paths_
        return [[(str(names[i]) if names.size else f"row {i}") for i in row if i >= 0] for row in nb.index]

    def decision_function(self, X: Any) -> np.ndarray:
        """Calibrated logits (n, n_classes) whose softmax is `predict_proba`."""
        nb = self.neighbours(X, self.k_)
        labels = np.where(nb.index >= 0, self.memory_labels_[np.maximum(nb.index, 0)], -1)
        return vote_logits(nb.similarity, labels, self.n_classes_, self.k_, self.vote_temperature_) / self.temperature_

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes) of the calibrated vote."""
        return softmax(self.decision_function(X))

    # --------------------------------------------------------------------------- the tool's hooks
    def facts(self) -> dict[str, Any]:
        return {"k": self.k_, "vote_temperature": self.vote_temperature_, "temperature": self.temperature_,
                "calibration": self.calibration_note_, "cv_log_loss": self.cv_log_loss_,
                "cv_log_loss_on": self.cv_how_, "cv_scores": self.cv_scores_,
                "memory_rows": int(self.memory_.shape[0]), "memory_mb": round(self.memory_mb_, 1),
                **({"note": self.note_} if self.note_ else {})}

    def key_params(self) -> dict[str, Any]:
        """k and T as chosen once fitted (the runs table shows `k=20 vote_temperature=0.07`, not auto)."""
        params = super().key_params()
        if hasattr(self, "k_"):
            params.update(k=self.k_, vote_temperature=self.vote_temperature_)
        return params

    def sweep_facts(self) -> dict[str, Any]:
        return {"k": self.k_, "T": self.vote_temperature_}

    def after_fit_note(self) -> str:
        notes = [self.note_] if self.note_ else []
        if self.memory_mb_ > LARGE_MB:
            notes.append(f"the knn head stores its {self.memory_.shape[0]:,} training rows: its file is "
                         f"~{self.memory_mb_:,.0f} MB, and predict holds it in memory")
        return "; ".join(notes)

    def cv_log_loss(self) -> float | None:
        """Log loss of the calibrated vote at the chosen k and T on the other heads' CV folds (`cv_how_`
        says; leave-one-image-out where those cannot be made; None without CV)."""
        return self.cv_log_loss_

    def cross_validates(self) -> bool:
        ks, ts = self._grid()
        return bool(self.calibrate) or len(ks) * len(ts) > 1

    def cv_accuracy(self) -> float | None:
        """Accuracy of the vote at the chosen k and T, scored as `cv_log_loss` is (None without CV)."""
        return getattr(self, "cv_accuracy_", None)

    def to_keras(self):
        """Reduce, unit length, similarities to the stored rows (a fixed Dense kernel), top-k, weights
        exp((s - s_nearest) / T), each neighbour's one-hot label (a fixed Embedding), the weighted sum,
        then the calibrated log-vote softmax: built-in layers and keras.ops only."""
        keras = keras_module()
        L, ops = keras.layers, keras.ops
        inp, x = keras_reduction(self.feature_shape_, self.flatten)
        x = L.UnitNormalization(name="unit_length", dtype="float32")(x)
        memory = L.Dense(self.memory_.shape[0], use_bias=False, name="similarity", dtype="float32", trainable=False)
        s = memory(x)
        memory.set_weights([np.ascontiguousarray(self.memory_.T, np.float32)])
        top, idx = ops.top_k(s, self.k_, sorted=True)               # exactly k neighbours, ties or not
        w = ops.exp((top - top[:, :1]) / self.vote_temperature_)    # relative to the nearest: no underflow
        onehot = np.zeros((self.memory_.shape[0], self.n_classes_), np.float32)
        onehot[np.arange(self.memory_.shape[0]), self.memory_labels_] = 1.0
        vote = L.Embedding(self.memory_.shape[0], self.n_classes_, name="vote", dtype="float32", trainable=False)
        labels = vote(idx)                                          # (batch, k, classes): each neighbour's label
        vote.set_weights([onehot])
        v = ops.sum(labels * w[:, :, None], axis=1)
        v = v / ops.maximum(ops.sum(v, axis=1, keepdims=True), 1e-30)
        logits = ops.log(v + VOTE_FLOOR) / self.temperature_
        out = L.Activation("softmax", name="probabilities", dtype="float32")(logits)
        return keras.Model(inp, out, name="head")

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.npz: the training matrix, labels and paths) and its .json, atomically; no pickle."""
        path = npz_head_path(path, "a knn head")
        arrays = {"memory": self.memory_, "labels": self.memory_labels_, "paths": self.memory_paths_}
        meta = {"format": KNN_FORMAT, "version": 1, **self.metadata(), "k_": self.k_,
                "vote_temperature_": self.vote_temperature_, "temperature": self.temperature_,
                "calibration_note": self.calibration_note_, "cv_scores": self.cv_scores_,
                "cv_log_loss": self.cv_log_loss_, "cv_log_loss_on": self.cv_how_, "note": self.note_}
        return write_npz_head(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KNNHead":
        """Load `head.npz` + `head.json` written by `save`."""
        path = Path(path)
        side = path.with_suffix(".json")
        meta, arrays = read_npz_head(path, KNN_FORMAT, "a knn head", ("memory", "labels", "paths"))
        try:
            head = cls(**params_for(cls, meta["params"]))
            head.load_meta(meta)
            memory, labels, paths = arrays["memory"], arrays["labels"], arrays["paths"]
            if (memory.ndim != 2 or memory.shape[1] != head.n_features_in_ or labels.shape != (memory.shape[0],)
                    or labels.dtype.kind not in "iu" or (labels.size and not 0 <= labels.min() <= labels.max()
                                                         < head.n_classes_)
                    or paths.size not in (0, labels.size) or not np.isfinite(memory).all()):
                raise ValueError("arrays do not match the head's feature shape or classes")
            head.memory_, head.memory_labels_ = memory.astype(np.float32), labels.astype(np.int64)
            head.memory_paths_ = paths.astype(str)
            head.k_, head.vote_temperature_ = int(meta["k_"]), float(meta["vote_temperature_"])
            head.temperature_ = float(meta["temperature"])
            if not (1 <= head.k_ <= memory.shape[0] and head.vote_temperature_ > 0 and head.temperature_ > 0):
                raise ValueError("k or a temperature is out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} and {side.name} do not describe a valid knn head ({exc}); re-run fit-head") \
                from None
        head.calibration_note_ = str(meta.get("calibration_note", ""))
        head.cv_scores_ = dict(meta.get("cv_scores") or {})
        head.cv_log_loss_ = meta.get("cv_log_loss")
        head.cv_how_ = meta.get("cv_log_loss_on", "leave-one-image-out")  # a file from before the fold scoring
        head.note_ = str(meta.get("note", ""))
        head.memory_mb_ = head.memory_.nbytes / 2**20
        return head
