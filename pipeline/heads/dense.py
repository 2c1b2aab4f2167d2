"""`DenseHead` (kind "dense"): a small Keras MLP on cached features, trained in memory or streamed from
the cache, with its LR schedules; `balanced_class_weights`, which fine-tuning shares."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import backend
from pipeline.atomic import save_keras_atomic, write_text_atomic
from pipeline.backend import set_random_seed
from pipeline.errors import UserError
from pipeline.heads.base import (
    FeatureSource, Head, ReducedFeatures, jsonable, keras_module, matrix_batches, n_rows, option_budget, params_for,
    raw_shape, reduce_features, to_matrix,
)
from pipeline.heads.calibration import fit_temperature
from pipeline.heads.files import load_keras_file, read_head_json
from pipeline.heads.folds import cv_folds
from pipeline.heads.scaling import feature_scale
from pipeline.heads.schedules import check_optimizer, make_optimizer, make_schedule
from pipeline.heads.streaming import RunningMoments

DENSE_FORMAT = "featurecache-dense-head"


def compile_settings() -> dict[str, Any]:
    """How the small dense stack trains fastest on each backend: TensorFlow runs 32 steps per call
    without XLA (compiling costs more than it saves for a model this small); JAX must be jitted (un-jitted
    it dispatches op by op, ~6x slower); PyTorch takes one step per call and no torch.compile."""
    name = backend.name()
    if name == "jax":
        return {"steps_per_execution": 32, "jit_compile": True}
    if name == "torch":
        return {"steps_per_execution": 1, "jit_compile": False}
    return {"steps_per_execution": 32, "jit_compile": False}


class DenseHead(Head):
    """Small Keras MLP: [pool/flatten] -> (Dense -> BN? -> ReLU -> Dropout?) x hidden -> softmax.

    Inputs are standardized with training-set statistics; the exported `model_` folds that into
    its first Dense layer, so it is plain Keras layers taking raw cache features (stage 3 can stack
    it on the backbone). Fits in memory when train+val fit in `memory_budget_mb`, else streams
    batches from the cache (a keras PyDataset). `history_` has loss/acc/val_loss/val_acc/lr.
    """

    kind = "dense"
    artifact = "head.keras"
    file_format = DENSE_FORMAT
    key_param_names = ("hidden", "dropout", "lr", "lr_schedule", "epochs", "early_stopping", "class_weight")
    uses_validation = True
    tuple_params = ("hidden",)
    sweep_grid = {"lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "dropout": [0.0, 0.3], "hidden": [(128,), (256,)]}
    options = Head.shared_options | {"hidden", "batchnorm", "dropout", "l2", "optimizer", "lr", "lr_schedule", "lr_start",
                                     "lr_min", "lr_max", "rampup_epochs", "sustain_epochs", "exp_decay", "epochs",
                                     "head_batch_size", "early_stopping", "class_weight"}
    sweep_schedule_only = frozenset({"lr", "lr_schedule", "lr_start", "lr_max", "lr_min", "rampup_epochs",
                                     "sustain_epochs", "exp_decay", "epochs", "early_stopping", "memory_budget_mb",
                                     "verbose"})

    def __init__(self, hidden: Sequence[int] = (256,), batchnorm: bool = False, dropout: float = 0.0,
                 l2: float = 0.0, optimizer: str = "adam", lr: float = 1e-3, lr_schedule: str = "constant",
                 lr_start: float | None = None, lr_max: float | None = None, lr_min: float | None = None,
                 rampup_epochs: int | None = None, sustain_epochs: int | None = None,
                 exp_decay: float | None = None, epochs: int = 20, batch_size: int = 64,
                 early_stopping: int | None = None, class_weight: str | None = None, flatten: str = "avg",
                 memory_budget_mb: float = 2048.0, seed: int = 0, verbose: int = 0, calibrate: bool = True,
                 calibration_folds: int = 3) -> None:
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
        self.calibrate = calibrate
        self.calibration_folds = calibration_folds

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "DenseHead":
        asked = tuple(opts.get("hidden") or ())
        if 0 in asked and len(asked) > 1:
            raise UserError(f"--hidden 0 means no hidden layer, so it cannot go with other sizes "
                            f"({' '.join(f'--hidden {h}' for h in asked)}); give --hidden 0 alone or only sizes")
        hidden = tuple(h for h in asked if h > 0) if asked else (256,)
        unused = [flag for flag, on in (("--dropout", float(opts.get("dropout") or 0) > 0),
                                        ("--batchnorm", bool(opts.get("batchnorm")))) if on]
        if not hidden and unused:
            raise UserError(f"{' and '.join(unused)} act on hidden layers, and --hidden 0 has none; leave "
                            f"{'it' if len(unused) == 1 else 'them'} out or give --hidden a size")
        names = ("batchnorm", "dropout", "l2", "optimizer", "lr", "lr_schedule", "lr_start", "lr_min", "lr_max",
                 "rampup_epochs", "sustain_epochs", "exp_decay", "epochs", "early_stopping", "class_weight",
                 "flatten", "seed")
        given = {k: opts[k] for k in names if k in opts}
        if "head_batch_size" in opts:
            given["batch_size"] = opts["head_batch_size"]
        return cls(hidden=hidden, memory_budget_mb=option_budget(opts), **given)

    # -- the tool's hooks
    def training_history(self) -> dict[str, list[float]] | None:
        """loss/acc/val_loss/val_acc/lr per epoch (curves.png)."""
        return getattr(self, "history_", None)

    def facts(self) -> dict[str, Any]:
        streamed = bool(getattr(self, "streamed_", False))
        note = {"stream_note": self.stream_note_} if streamed and getattr(self, "stream_note_", "") else {}
        return {"epochs_run": self.n_epochs_, "best_epoch": self.best_epoch_ + 1, "streamed": streamed,
                "temperature": self.temperature_, "calibration": self.calibration_note_, **note}

    def sweep_facts(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch_ + 1, "epochs_run": self.n_epochs_}

    def after_fit_note(self) -> str:
        """Streaming, and that early stopping read the val split: its figures then chose the epoch."""
        notes = [self.stream_note_] if getattr(self, "stream_note_", "") else []  # "" unless it streamed
        if self.early_stopping is not None:
            notes.append(f"early stopping kept epoch {self.best_epoch_ + 1} of {self.n_epochs_} by the val loss, so "
                         f"the val figures below are not held out")
        return "; ".join(notes)

    def fit_for_sweep(self, X: Any, y: Any, X_val: Any, y_val: Any, reuse: dict, **meta: Any) -> "DenseHead":
        """One fit of a sweep, not calibrated (the out-of-fold refits would multiply a sweep's cost)."""
        return self.fit(X, y, X_val, y_val, reuse=reuse, calibrate_now=False, **meta)

    @classmethod
    def sweep_cost(cls, params: Mapping[str, Any]) -> float:
        """epochs x (hidden units + 1)."""
        hidden = params.get("hidden", (256,))
        return float(params.get("epochs", 20)) * (sum(int(h) for h in hidden) + 1)

    def finetune_lr(self) -> float:
        """A tenth of the learning rate the head was trained with."""
        return float(self.lr) / 10 if self.lr else super().finetune_lr()

    def to_keras(self):
        """A copy of the fitted model (pooling, then the stack with standardization folded in)."""
        source = getattr(self, "model_", None)
        if source is None:
            raise UserError("the head is not fitted; fit it (stage 2) before fine-tuning or export")
        keras = keras_module()
        clone = keras.models.clone_model(source)
        clone.set_weights(source.get_weights())
        return keras.Model(clone.inputs[0], clone.outputs[0], name="head")

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
        check_optimizer(self.optimizer)
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
            reuse: dict | None = None, groups: Any = None, calibrate_now: bool = True) -> "DenseHead":
        """Train on (X, y), validating on (X_val, y_val) each epoch when given (needed for early stopping),
        then (`calibrate`) fit a temperature on out-of-fold predictions of `calibration_folds` refits on
        the training rows (grouped by image), never on the validation rows.

        X / X_val: arrays (n, *feature_shape) or FeatureSource. `reuse` (a dict the caller keeps)
        lets a sweep reuse compiled models between fits of the same structure.
        """
        self._validate()
        schedule = self.schedule()
        keras = keras_module()
        y = np.asarray(y, dtype=np.int64)
        if n_rows(X) != y.size:
            raise ValueError(f"X has {n_rows(X)} rows but y has {y.size}")
        has_val = X_val is not None and n_rows(X_val) > 0
        if self.early_stopping is not None and not has_val:
            raise ValueError("early_stopping monitors the validation loss, so it needs X_val and y_val")
        n_classes = self._set_meta(X, y, class_names, cache_key, feature_info)
        y_val = np.asarray(y_val, dtype=np.int64) if has_val else None
        if has_val and raw_shape(X_val) != self.feature_shape_:
            raise ValueError(f"X_val has feature shape {raw_shape(X_val)}, X has {self.feature_shape_}")
        t0 = time.perf_counter()
        set_random_seed(int(self.seed))
        dim = self.n_features_in_
        need = (n_rows(X) + (n_rows(X_val) if has_val else 0)) * dim * 4 / 2**20
        self.streamed_ = isinstance(X, FeatureSource) and need > self.memory_budget_mb
        self.stream_note_ = (f"dense head streamed from the cache ({n_rows(X)} train + "
                             f"{n_rows(X_val) if has_val else 0} val rows x {dim} features: {need:,.0f} MB > "
                             f"budget {self.memory_budget_mb:,.0f} MB)") if self.streamed_ else ""
        weights = self._sample_weights(y, n_classes)
        if self.streamed_:
            mean, scale = _streamed_stats(X, self.flatten)
            train_rows = _streamed_rows(X, mean, scale, self.flatten)
            val_rows = _streamed_rows(X_val, mean, scale, self.flatten) if has_val else None
        else:
            raw = to_matrix(X, self.flatten)
            mean, scale = _stats(raw)
            Xm = _standardize(raw, mean, scale)
            if not (self.calibrate and calibrate_now):
                raw = None  # only the calibration's refits need the raw rows: hold one matrix, not two
            train_rows = Xm.__getitem__
            val_rows = _standardize(to_matrix(X_val, self.flatten), mean, scale).__getitem__ if has_val else None
        train = _batches(keras, y.size, train_rows, y, weights, int(self.batch_size), True, self.seed)
        val = _batches(keras, y_val.size, val_rows, y_val, None, 1024, False, self.seed) if has_val else None
        reuse = {} if reuse is None else reuse  # the calibration's refits reuse this compiled model
        core = self._compiled_core(keras, n_classes, dim, reuse)
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
        self.temperature_, self.calibration_note_ = 1.0, "not calibrated (calibrate=False)"
        if not calibrate_now:
            self.calibration_note_ = "not calibrated: fitted by a sweep"
        elif self.calibrate and self.streamed_:
            self.calibration_note_ = "not calibrated: streamed from the cache (out-of-fold refits need memory)"
        elif self.calibrate:
            if groups is None and isinstance(X, FeatureSource):
                groups = X.file.index[X.rows]
            self._calibrate(raw, y, groups, reuse)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _calibrate(self, Xm: np.ndarray, y: np.ndarray, groups: Any, reuse: dict) -> None:
        """Temperature scaling on out-of-fold log-probabilities: `calibration_folds` refits with the same
        parameters for the epochs the fit kept, each predicting the rows it did not see."""
        folds, how = cv_folds(y, groups, self.calibration_folds, self.seed)
        if folds is None:
            self.calibration_note_ = f"not calibrated: {how}"
            return
        params = {**self.get_params(), "calibrate": False, "early_stopping": None, "epochs": self.best_epoch_ + 1,
                  "verbose": 0}
        oof = np.zeros((y.size, self.n_classes_))
        for tr, te in folds:
            part = DenseHead(**params).fit(ReducedFeatures(Xm[tr], self.feature_shape_, self.flatten), y[tr],
                                          class_names=self.class_names_, reuse=reuse)
            oof[te] = np.log(np.clip(part.predict_proba(ReducedFeatures(Xm[te], self.feature_shape_, self.flatten)),
                                     1e-12, 1.0))
        self.temperature_ = fit_temperature(oof, y)
        self.calibration_note_ = f"temperature scaling on out-of-fold predictions ({how} refits)"
        last = self.model_.get_layer("stack").get_layer("classes")
        kernel, bias = last.get_weights()
        last.set_weights([kernel / self.temperature_, bias / self.temperature_])

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
            core.compile(optimizer=make_optimizer(keras, self.optimizer, self.lr), loss="sparse_categorical_crossentropy",
                         metrics=["accuracy"], **compile_settings())
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
        keras = keras_module()
        stack = self.model_.get_layer("stack")
        out = np.empty((n_rows(X), self.n_classes_), np.float32)
        for start, xb in matrix_batches(X, self.flatten, batch_size):  # convert_to_numpy: torch tensors carry grad
            out[start:start + xb.shape[0]] = keras.ops.convert_to_numpy(stack(xb, training=False))
        return out

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>` (.keras model) and `<path minus suffix>.json` (metadata, config, history)."""
        path = Path(path)
        if path.suffix != ".keras":
            raise UserError(f"a dense head is saved as a .keras file, not {path.name}")
        meta = {"format": DENSE_FORMAT, "version": 1, **self.metadata(), "history": self.history_,
                "best_epoch": self.best_epoch_, "streamed": self.streamed_, "temperature": self.temperature_,
                "calibration_note": self.calibration_note_}
        save_keras_atomic(self.model_, path)
        write_text_atomic(path.with_suffix(".json"), json.dumps(jsonable(meta), indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DenseHead":
        path = Path(path)
        side = path.with_suffix(".json")
        if not path.exists() or not side.exists():
            raise UserError(f"a dense head needs both {path.name} and {side.name}; one is missing")
        meta = read_head_json(side, DENSE_FORMAT, "a dense head")
        try:
            head = cls(**params_for(cls, meta["params"]))
            head.load_meta(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{side} does not describe a valid dense head ({exc}); re-run fit-head") from None
        head.history_ = meta.get("history", {})
        head.n_epochs_ = len(head.history_.get("loss", []))
        head.best_epoch_ = meta.get("best_epoch", head.n_epochs_ - 1)
        head.streamed_ = meta.get("streamed", False)
        try:
            head.temperature_ = float(meta.get("temperature", 1.0))  # already inside the model's last layer
        except (TypeError, ValueError):
            raise UserError(f"{side} has a temperature that is not a number; re-run fit-head") from None
        head.calibration_note_ = str(meta.get("calibration_note", "not calibrated (saved by an older version)"))
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
            keras = keras_module()
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
    return mean, feature_scale(std)


def _streamed_stats(src: FeatureSource, flatten: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of reduced features in one streamed pass (Chan's parallel update)."""
    moments = RunningMoments()
    for _, x in src.iter_reduced(flatten):
        moments.add(x.astype(np.float64))
    std = np.sqrt(moments.variance)
    return moments.mean, feature_scale(std)


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
