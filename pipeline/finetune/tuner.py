"""Stage 3: fine-tune the backbone end to end, starting from a fitted stage-2 head.

The model is rebuilt exactly as the cache was made (backbone, weights, image size, resize,
preprocessing, layer cut and pooling, all read from the cache's `ExtractRequest`) with the fitted
head on top, so before any training it predicts what the head predicted on cached features:

    image (uint8 0..255, size x size x 3) -> image_to_float
      -> preprocessing (`pipeline.backbones.preprocessing`: the same layers as extraction)
      -> backbone (a nested model named "backbone", called with training=False)
      -> [global avg/max pooling, as the cache]
      -> head (a nested model named "head": the DenseHead's layers, or a LogisticHead as one
         Dense softmax layer with its scaler folded in)

Only built-in Keras layers are used, so `model.keras` loads with plain `keras.models.load_model`
without importing this package.

Batch normalization: in Keras 3 a nested functional model called with `training=False` still
receives the OUTER call's `training=True` during `fit` (the graph replay overrides the stored
argument), so `training=False` alone does not keep BatchNorm in inference mode. What does is that
every BatchNormalization layer is frozen (`trainable=False`; Keras 3 runs a frozen BN layer in
inference mode), which `build_finetune_model` and `set_trainable` always ensure; it is saved with
the model. Dropout layers inside a backbone (EfficientNet's stochastic depth) stay active while
training, as usual.

API:
    build_finetune_model(request, head) -> keras.Model
    set_trainable(model, spec, unfreeze=(), unfreeze_last=None) -> [trainable layer names]
    FineTuner(...).fit(request, head, run_dir, resume=False) -> FinetuneResult
    FineTuner.predict_proba(paths) / FineTuner.load(run_dir) / FineTuner.from_checkpoint(run_dir)
    stage2_inputs(run_dir) -> Stage2Inputs (request, head, cache path) of a fit-head run folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import backbones
from pipeline.atomic import save_keras_atomic, write_text_atomic
from pipeline.data.sources import open_source
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest
from pipeline.data.augment import AugmentConfig
from pipeline.extract import DEFAULT_CACHE
from pipeline.finetune.data import evaluate, make_batches, map_batches
from pipeline.features.store import chunk_files
from pipeline.heads.schedules import check_optimizer, make_optimizer
from pipeline.layout import CacheLayout
from pipeline.tracking.runs import read_object

MODEL_FILE = "model.keras"
INFO_FILE = "finetune.json"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
_FORMAT = "featurecache-finetune"


def _keras():
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    return keras


# -------------------------------------------------------------------------------- model building
def build_finetune_model(request: ExtractRequest, head):
    """The end-to-end model: raw uint8 RGB images in, class probabilities out (the extraction graph
    of `pipeline.backbones.model` with the head added; training augments in the input path).

    The backbone is rebuilt from `request` (the cache's request) and frozen, BatchNorm included;
    the head layers carry the head's fitted weights and are trainable. Its predictions equal
    `head.predict_proba` on features of the same images. Layers
    are created under the current Keras dtype policy (set mixed_float16 around the call for mixed
    precision); augmentation, preprocessing and head always compute in float32/float64.
    """
    from pipeline.backbones.model import image_graph

    keras = _keras()
    spec = backbones.get(request.backbone)
    size = spec.resolve_size(request.image_size)
    inputs, x = image_graph(spec, request.weights, size, request.pooling, request.layer)
    head_model = head.keras_head(tuple(int(d) for d in x.shape[1:]), spec.name)
    out = head_model(x)
    model = keras.Model(inputs, out, name=f"finetune_{spec.slug}")
    _freeze_batchnorm(model)
    return model


# --------------------------------------------------------------------------------- trainability
def _leaves(model) -> list:
    """Every non-container layer of `model`, nested models walked through, in order."""
    keras = _keras()
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_leaves(layer))
        else:
            out.append(layer)
    return out


def _freeze_batchnorm(model) -> None:
    keras = _keras()
    for layer in _leaves(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def trainable_layer_names(model) -> list[str]:
    """Names of the layers whose weights training will change (trainable, with trainable weights)."""
    return [layer.name for layer in _leaves(model) if layer.trainable and layer.trainable_weights]


def check_blocks(spec: backbones.Backbone, unfreeze: Sequence[str], present: Sequence[str] | None = None) -> None:
    """UserError naming the valid blocks when `unfreeze` holds a name that is not one of `spec`'s
    fine-tunable top blocks (`present`: those found in a model, which a trunk cut may have removed)."""
    valid = [name for name, _ in spec.blocks] if present is None else list(present)
    unknown = [b for b in unfreeze if b not in valid]
    if unknown:
        listed = ", ".join(valid) or ("none (the cut removed them)" if present is not None else "none")
        raise UserError(f"{spec.name} has no fine-tunable block {unknown[0]!r}; its top blocks are: {listed} "
                        f"(or unfreeze the last N layers instead)")


def set_trainable(model, spec: backbones.Backbone, unfreeze: Sequence[str] = (),
                  unfreeze_last: int | None = None) -> list[str]:
    """Choose what trains: the head, plus whole top blocks of the backbone and/or its last N layers.

    `unfreeze`: block names from `spec.blocks` (e.g. ['block5'] for VGG16, ['top', 'block7'] for
    EfficientNet); an unknown name raises UserError listing the valid ones. `unfreeze_last`: the
    last N layers of the backbone (in model order, weightless ones counted, as in
    `base.layers[-N:]`). BatchNormalization layers always stay frozen (so they run in inference
    mode), the preprocessing layers too; the head is trainable, except the layers its Keras form built
    frozen (a knn head's stored training matrix and labels). Returns the names of the layers
    training will change. Recompile the model after calling this.
    """
    keras = _keras()
    unfreeze = (unfreeze,) if isinstance(unfreeze, str) else tuple(unfreeze)
    backbone = model.get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in backbone.layers]
    spans = backbones.block_spans(spec, names)
    nested = backbones.nested_blocks(backbone)  # a keras-hub tower's transformer blocks (else none)
    check_blocks(spec, unfreeze, present=list(spans) + list(nested))
    if unfreeze_last is not None and int(unfreeze_last) < 0:
        raise UserError(f"unfreeze_last must be 0 or more, not {unfreeze_last}")
    if unfreeze_last and int(unfreeze_last) > len(layers):
        raise UserError(f"--unfreeze-last {unfreeze_last} is more than the {len(layers)} layers {spec.name}'s backbone "
                        f"has here; give at most {len(layers)} (or name blocks with --unfreeze)")
    chosen: set[int] = set()
    for block in unfreeze:
        if block in spans:
            chosen.update(range(*spans[block]))
    if unfreeze_last:
        chosen.update(names.index(layer.name) for layer in layers[-int(unfreeze_last):])
    heads = [layer for layer in model.layers if layer.name == "head" and isinstance(layer, keras.Model)]
    fixed = [layer for head in heads for layer in _leaves(head) if not layer.trainable]  # e.g. a knn head's memory
    model.trainable = True  # propagates to every layer; then freeze what must not train
    for layer in fixed:
        layer.trainable = False
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i in chosen
    deep = [nested[block] for block in unfreeze if block in nested]
    if deep:
        backbones.train_blocks(backbone, deep + [backbone.layers[i] for i in chosen])
    for layer in model.layers:
        if layer.name.startswith("preprocess_"):
            layer.trainable = False
    _freeze_batchnorm(model)
    return trainable_layer_names(model)


def compare_metrics(before: Mapping[str, Any], after: Mapping[str, Any],
                    keys: Sequence[str] = ("accuracy", "macro_f1", "balanced_accuracy", "log_loss")) -> dict:
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


# ------------------------------------------------------------------------------ checkpointing
def _history_from_logs(logs: Mapping[str, Any]) -> dict[str, float]:
    names = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc",
             "learning_rate": "lr"}
    return {new: float(logs[old]) for old, new in names.items() if old in logs}


def _make_checkpointer(keras, run_dir: Path, state: dict[str, Any], patience: int | None):
    """Callback: after every epoch update history/early-stopping state, save the model and a JSON."""

    class Checkpointer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs=None) -> None:
            logs = dict(logs or {})
            row = _history_from_logs(logs)
            if "lr" not in row:
                row["lr"] = float(np.asarray(self.model.optimizer.learning_rate))
            for k, v in row.items():
                state["history"].setdefault(k, []).append(v)
            if patience is not None and "val_loss" in logs:
                val = float(logs["val_loss"])
                if state["best"] is None or val < state["best"]:
                    state.update(best=val, best_epoch=epoch + 1, wait=0)
                    save_keras_atomic(self.model, run_dir / BEST_WEIGHTS, weights_only=True)
                else:
                    state["wait"] += 1
                    if state["wait"] >= patience:
                        self.model.stop_training = True
                        state["stopped_early"] = True
            name = f"{CHECKPOINT_DIR}/epoch-{epoch + 1:03d}.keras"
            save_keras_atomic(self.model, run_dir / name)
            previous = state.get("model")
            state.update(epoch=epoch + 1, model=name)
            write_text_atomic(run_dir / CHECKPOINT_FILE, json.dumps(state, indent=2, default=_json_default))
            if previous and previous != name:
                (run_dir / previous).unlink(missing_ok=True)

    return Checkpointer()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, tuple, set)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def read_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint state of a fine-tuning run folder (epoch, model file, history, ...), or None."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not readable JSON; remove it to start over") from None


# ----------------------------------------------------------------------------------- results
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

    @property
    def comparison(self) -> dict:
        return compare_metrics(self.metrics_before, self.metrics_after)

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
                   val_source=self.val_source)
        return out


@dataclass
class Stage2Inputs:
    """What fine-tuning needs from a fit-head run: the cache's request, the head and the cache file."""

    request: ExtractRequest
    head: Any
    cache_path: Path
    config: dict[str, Any]
    split: dict[str, list[str]] | None = None  # image ids per split, as the head was trained and validated
    val_source: str = "val split"


def stage2_inputs(run_dir: str | os.PathLike) -> Stage2Inputs:
    """Read a fit-head run folder: its config.json names the cache file, whose `request` says how
    the features were made; the head is loaded from the folder."""
    from pipeline.heads.registry import load_head
    from pipeline.features.store import FeatureFile

    run_dir = Path(run_dir)
    config, problem = read_object(run_dir / "config.json")
    if problem or not config:
        raise UserError(f"{run_dir} has no readable config.json ({problem or 'missing'}); is it a fit-head run "
                        f"folder?")
    cache = config.get("cache_file")
    if not cache:
        raise UserError(f"{run_dir}/config.json names no cache_file; fine-tuning starts from a fit-head run")
    head = load_head(run_dir)
    if not Path(cache).exists() and isinstance(config.get("request"), Mapping):
        cache = _remake_cache(config["request"], Path(cache))
    with FeatureFile(cache) as ff:
        req = ff.attrs.get("request")
        material = ff.attrs.get("key_material") or {}
        key = ff.key
        split, val_source = _stage2_split(ff, config)
    if not isinstance(req, Mapping):
        raise UserError(f"{cache} records no extraction request; extract it again with this version")
    if head.cache_key_ and head.cache_key_ != key:
        raise UserError(f"the head in {run_dir} was fitted on cache {head.cache_key_[:16]}, not {Path(cache).name}")
    request = ExtractRequest.from_json(req)
    spec = (material.get("data") or {}).get("data") if isinstance(material, Mapping) else None
    if spec and not Path(request.data).expanduser().exists() and Path(spec).exists():
        request = dataclasses.replace(request, data=spec)  # a relative --data path, resolved at extraction
    return Stage2Inputs(request, head, Path(cache), config, split, val_source)


def _remake_cache(request: Mapping[str, Any], gone: Path) -> str:
    """The fit-head run's cache file was removed (`cache rm`, eviction): extract the run's recorded
    request again into the same cache folder (unchanged data gives the same key and rows)."""
    from pipeline.extract import RunOptions, extract

    result = extract(ExtractRequest.from_json(dict(request)), RunOptions(cache_dir=CacheLayout.of(gone).root))
    return str(result.path)


def _stage2_split(ff, config: Mapping[str, Any]) -> tuple[dict[str, list[str]], str]:
    """The image ids stage 2 trained, validated and tested on (its 'val' split or its seeded
    holdout of train, recomputed from the run's val_fraction and seed), so fine-tuning validates on
    the same images and its before/after table compares like with like."""
    from pipeline.heads.training import split_rows

    try:
        rows = split_rows(ff, float(config.get("val_fraction", 0.2)), int(config.get("seed", 0)), use_augmented=False)
    except UserError:
        return {}, "none"
    paths = np.asarray(ff.paths, dtype=object)
    return ({name: sorted(set(paths[r].tolist())) for name, r in
             (("train", rows.train), ("val", rows.val), ("test", rows.test))}, rows.val_source)


# ----------------------------------------------------------------------------------- the tuner
class FineTuner:
    """Fine-tune a stage-2 head and its backbone end to end on the raw images (scikit-learn style).

    unfreeze: top blocks to train (names from the backbone table, e.g. ['block5']); None = the
        table's `finetune_blocks` topmost blocks (1; EfficientNet-Lite 3); () = the head only.
        unfreeze_last: also the last N backbone layers.
    trunk_cache: None = train on cached maps of the frozen part (`trunk.py`) whenever whole blocks
        are unfrozen and the disk has room; True / False to insist / never. views: augmented views
        per training image in that cache (epochs cycle through clean + views). Without the trunk
        cache every epoch draws a new augmented view of every image and runs the whole backbone.
    lr: peak learning rate; None = a tenth of a dense head's lr, or 2e-4 for a logistic or svm head.
    optimizer: adam | nadam | rmsprop | sgd (momentum 0.9). lr_schedule: constant | exponential |
        cosine (`pipeline.heads.schedules.make_schedule`; `schedule_params` passes rampup_epochs etc.).
    epochs, batch_size (global batch, split over GPUs). early_stopping: patience in epochs on
        val_loss (None = off); the best epoch's weights are restored at the end.
    class_weight: None | 'balanced' | {class index: weight}. augment: AugmentConfig or None.
    mixed_precision: None = on a GPU only. keep_checkpoint: keep the last epoch's checkpoint model
        after a successful run (it is deleted by default; checkpoint.json stays).
    val_fraction: without a 'val' split (and no stage-2 split given to `fit`), this stratified,
        seeded share of the training images is held out for validation.
    Data parallel: on TensorFlow with several GPUs (or logical CPU devices) a MirroredStrategy; on
        JAX with several devices `keras.distribution.DataParallel`; batches on both are padded to a
        multiple of the replicas with weight-0 rows. The PyTorch backend of Keras has no
        multi-device training.
    """

    def __init__(self, unfreeze: Sequence[str] | None = None, unfreeze_last: int | None = None,
                 lr: float | None = None, optimizer: str = "adam", lr_schedule: str = "cosine",
                 schedule_params: Mapping[str, Any] | None = None, epochs: int = 8, batch_size: int = 32,
                 early_stopping: int | None = None, class_weight: str | Mapping[int, float] | None = None,
                 augment: AugmentConfig | None = AugmentConfig(), seed: int = 0,
                 mixed_precision: bool | None = None, keep_checkpoint: bool = False, val_fraction: float = 0.2,
                 verbose: int = 0, trunk_cache: bool | None = None, views: int = 4,
                 label_smoothing: float = 0.1) -> None:
        self.unfreeze = None if unfreeze is None else ((unfreeze,) if isinstance(unfreeze, str) else tuple(unfreeze))
        self.unfreeze_last = unfreeze_last
        self.lr = lr
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.schedule_params = dict(schedule_params or {})
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.class_weight = class_weight
        self.augment = augment
        self.seed = seed
        self.mixed_precision = mixed_precision
        self.keep_checkpoint = keep_checkpoint
        self.val_fraction = val_fraction
        self.verbose = verbose
        self.trunk_cache = trunk_cache
        self.views = views
        self.label_smoothing = label_smoothing

    # -- parameters
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (augment as a dict)."""
        return {"unfreeze": None if self.unfreeze is None else list(self.unfreeze),
                "unfreeze_last": self.unfreeze_last, "lr": self.lr, "optimizer": self.optimizer,
                "lr_schedule": self.lr_schedule, "schedule_params": dict(self.schedule_params),
                "epochs": int(self.epochs), "batch_size": int(self.batch_size),
                "early_stopping": self.early_stopping,
                "class_weight": ({str(k): float(v) for k, v in self.class_weight.items()}
                                 if isinstance(self.class_weight, Mapping) else self.class_weight),
                "augment": None if self.augment is None else self.augment.as_dict(), "seed": int(self.seed),
                "mixed_precision": self.mixed_precision, "keep_checkpoint": self.keep_checkpoint,
                "val_fraction": float(self.val_fraction), "verbose": self.verbose,
                "trunk_cache": self.trunk_cache, "views": int(self.views),
                "label_smoothing": float(self.label_smoothing)}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "FineTuner":
        p = dict(params)
        if isinstance(p.get("augment"), Mapping):
            p["augment"] = AugmentConfig(**p["augment"])
        if isinstance(p.get("class_weight"), Mapping):
            p["class_weight"] = {int(k): float(v) for k, v in p["class_weight"].items()}
        p.setdefault("trunk_cache", False)  # runs from before the trunk cache trained on images
        p.setdefault("label_smoothing", 0.0)  # and without label smoothing
        return cls(**p)

    @classmethod
    def from_checkpoint(cls, run_dir: str | os.PathLike) -> "FineTuner":
        """A tuner with the settings an interrupted run was started with (to `fit(..., resume=True)`)."""
        state = read_checkpoint(run_dir)
        if state is None:
            raise UserError(f"{run_dir} holds no fine-tuning checkpoint to resume")
        return cls.from_params(state["params"])

    def default_lr(self, head) -> float:
        """The head's own fine-tuning LR (a tenth of a dense head's; 2e-4 under a logistic or svm head)."""
        return head.finetune_lr()

    def check_params(self, backbone: str | None = None) -> "FineTuner":
        """Raise UserError for a bad parameter now, before any work; with `backbone`, also for an
        --unfreeze name that is not one of its blocks (`fit` checks both again)."""
        self._check()
        if backbone is not None:
            spec = backbones.get(backbone)
            if self.unfreeze:
                check_blocks(spec, self.unfreeze)
            self._check_has_blocks(spec)
        return self

    def _check_has_blocks(self, spec: backbones.Backbone) -> None:
        """A backbone with no listed top blocks (a keras-hub preset) fine-tunes only by --unfreeze-last."""
        if not spec.blocks and not self.unfreeze_last:
            raise UserError(f"{spec.name} lists no fine-tunable top blocks (a keras-hub CNN preset); "
                            f"--unfreeze-last 1 trains its whole tower")

    def _check(self) -> None:
        check_optimizer(self.optimizer)
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise UserError("epochs and batch_size must be 1 or more")
        if self.lr is not None and not 0 < float(self.lr) < float("inf"):
            raise UserError(f"the learning rate must be positive, not {self.lr}")
        if not 0 <= float(self.label_smoothing) < 1:
            raise UserError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if int(self.views) < 0:
            raise UserError(f"views must be 0 or more, not {self.views}")
        if self.early_stopping is not None and int(self.early_stopping) < 1:
            raise UserError(f"early_stopping is a patience in epochs (>= 1) or None, not {self.early_stopping}")
        if not (self.class_weight is None or self.class_weight == "balanced" or isinstance(self.class_weight, Mapping)):
            raise UserError(f"class_weight must be None, 'balanced' or a dict, not {self.class_weight!r}")

    def _fingerprint(self, request: ExtractRequest, head, split: Mapping[str, Sequence[int]]) -> str:
        p = self.get_params()
        for k in ("verbose", "keep_checkpoint"):
            p.pop(k)
        if p["trunk_cache"] is False:  # as before these settings existed: checkpoints from then resume
            p.pop("trunk_cache")
            p.pop("views")
        if not p["label_smoothing"]:
            p.pop("label_smoothing")
        material = {"request": request.to_json(), "head": [getattr(head, "kind", "?"), head.cache_key_,
                                                           list(head.class_names_)], "params": p,
                    "split": {k: hashlib.sha256(np.asarray(v, np.int64).tobytes()).hexdigest() for k, v in split.items()}}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _class_weights(self, y: np.ndarray, n_classes: int) -> dict[int, float] | None:
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, Mapping):
            return {int(k): float(v) for k, v in self.class_weight.items()}
        from pipeline.heads.dense import balanced_class_weights

        return {c: float(w) for c, w in enumerate(balanced_class_weights(y, n_classes))}

    def _resume_state(self, run_dir: Path, resume: bool, fingerprint: str, say: Callable[[str], None]):
        """The checkpoint state to continue from, None to start afresh; refuses mismatched ones."""
        state = read_checkpoint(run_dir)
        if state is None:
            if resume:
                say("no checkpoint to resume from; starting from the first epoch")
            return None
        if not resume:
            raise UserError(f"{run_dir} already holds a fine-tuning checkpoint; resume it or use a new run folder")
        if state.get("complete"):
            raise UserError(f"the fine-tuning run in {run_dir} already finished; nothing to resume")
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"the checkpoint in {run_dir} was made with other settings, data or head; resume "
                            f"with the same ones (FineTuner.from_checkpoint) or start a new run")
        if not state.get("model"):
            say("the interrupted run finished no epoch; starting from the first epoch")
            return None
        if not (run_dir / state["model"]).exists():
            raise UserError(f"checkpoint model {run_dir / state['model']} is missing; cannot resume")
        say(f"resuming after epoch {state['epoch']} of {state['epochs']}")
        return state

    def _blocks(self, spec: backbones.Backbone, layer_names: list[str]) -> tuple[str, ...]:
        """The blocks to unfreeze: as given, else the table's default count of topmost blocks."""
        self._check_has_blocks(spec)
        if self.unfreeze is not None:
            return self.unfreeze
        present = [*backbones.block_spans(spec, layer_names), *(n for n, start in spec.blocks if start.startswith(
            backbones.hub.NESTED))]
        return tuple(present[:max(1, int(spec.finetune_blocks))])

    def _plan_trunk(self, request: ExtractRequest, spec: backbones.Backbone, size: int, n_images: int,
                    cache_dir: Path, say: Callable[[str], None]) -> tuple[str, ExtractRequest] | None:
        """(cut layer, the trunk cache's request) when training can run on cached trunk maps
        (`trunk.py`), else None (then every epoch runs the whole backbone on the images)."""
        from pipeline.backbones.model import backbone_cut
        from pipeline.finetune.trunk import cut_layer, trunk_request

        from pipeline.extract import plan
        from pipeline.features.store import is_complete

        def skip(why: str) -> None:
            if self.trunk_cache:  # asked for explicitly
                raise UserError(f"no trunk cache: {why}; drop --trunk-cache to train on the images")
            say(f"{why}: training on the images instead (slower)")

        if self.trunk_cache is False:
            return None
        if self.unfreeze_last:
            return skip("the trunk cache needs whole blocks (--unfreeze), not --unfreeze-last")
        if spec.family == backbones.hub.FAMILY:
            return skip("a keras-hub preset keeps its blocks inside one layer, so there is no cut to cache below")
        backbone = backbone_cut(spec, "none", size, request.layer)  # layer names and shapes only
        names = [layer.name for layer in backbone.layers]
        cut = cut_layer(spec, names, self._blocks(spec, names))
        if cut is None:
            return None  # head only: nothing below to cache
        treq = trunk_request(request, cut, int(self.views), self.augment, int(self.seed))
        target = plan(treq, cache_dir)
        if is_complete(target.path):
            return cut, treq
        shape = backbone.get_layer(cut).output.shape[1:]
        need = np.dtype(treq.dtype).itemsize * int(np.prod(shape)) * n_images * (1 + int(self.views))
        need -= sum(f.stat().st_size for f in chunk_files(target.parts))  # what a half-built trunk cache holds
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if need > free // 2:
            return skip(f"the trunk cache would take {need / 1e9:.1f} GB of the {free / 1e9:.1f} GB free in {cache_dir}")
        return cut, treq

    def _model(self, request: ExtractRequest, head, spec: backbones.Backbone, lr: float,
               checkpoint: Path | None, weighted: bool = False, cut: str | None = None):
        """(model, model to fit, trainable layer names): built fresh, or loaded from a checkpoint.

        `cut`: train on cached trunk maps; the model to fit is then the top half (`trunk.split_at`,
        which is what checkpoints hold) and the model is trunk + top again, images in.

        On TensorFlow inside a MirroredStrategy scope when several GPUs (or logical CPU devices) are
        visible (`_tf_strategy`); under the
        mixed policy (`backend.mixed_policy`: bfloat16 where the GPU does it natively, else float16
        with a loss-scaling optimizer) on a GPU, or when asked.
        """
        import contextlib

        from pipeline.backend import accelerator, mixed_policy, name as backend_name

        keras = _keras()
        gpu = accelerator() == "gpu"
        mixed = gpu if self.mixed_precision is None else bool(self.mixed_precision)
        scope = contextlib.nullcontext()
        if backend_name() == "tensorflow":
            scope = _tf_strategy().scope()
        previous_policy = keras.mixed_precision.global_policy()
        try:
            if mixed:
                keras.mixed_precision.set_global_policy(mixed_policy())
            with scope:
                if checkpoint is not None and cut is None:  # compiled, optimizer state included
                    model = keras.models.load_model(checkpoint)
                    return model, model, trainable_layer_names(model)
                model = build_finetune_model(request, head)
                unfreeze = self._blocks(spec, [layer.name for layer in model.get_layer("backbone").layers])
                trainable = set_trainable(model, spec, unfreeze, self.unfreeze_last)
                fit_model = model
                if cut is not None:
                    from pipeline.finetune.trunk import assemble, split_at

                    trunk, fit_model = split_at(model, cut)
                    if checkpoint is not None:  # the top half, compiled, optimizer state included
                        fit_model = keras.models.load_model(checkpoint)
                    model = assemble(spec, spec.resolve_size(request.image_size), trunk, fit_model)
                    if checkpoint is not None:
                        return model, fit_model, trainable
                # XLA where Keras finds it pays ("auto": on a GPU)
                # weighted: padded data-parallel batches, whose weight-0 rows accuracy must not count
                accuracy = {"weighted_metrics" if weighted else "metrics": ["accuracy"]}
                smooth = float(self.label_smoothing)  # one-hot labels then (`data.finish_batch`)
                loss = (keras.losses.CategoricalCrossentropy(label_smoothing=smooth) if smooth
                        else "sparse_categorical_crossentropy")
                fit_model.compile(optimizer=make_optimizer(keras, self.optimizer, lr), loss=loss, jit_compile="auto", **accuracy)
                return model, fit_model, trainable
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    # -- training
    def fit(self, request: ExtractRequest, head, run_dir: str | os.PathLike, resume: bool = False,
            callbacks: Sequence[Any] = (), log: Callable[[str], None] | None = None,
            split: Mapping[str, Sequence[str]] | None = None, cache_dir: str | os.PathLike | None = None,
            progress: bool = False) -> FinetuneResult:
        """Fine-tune `head` (a fitted svm, logistic or dense head) and its backbone on `request`'s images.

        Trains on the 'train' split, validates on 'val' (clean images; the model's augmentation is
        off in evaluation): `split` (image ids per split, `Stage2Inputs.split`) makes these stage
        2's own rows, so a seeded holdout is validated on again; without it, a data set with no
        'val' split gets a stratified `val_fraction` holdout. reports metrics on val (and test, when present) before and after. Every
        epoch writes `run_dir/checkpoints/epoch-NNN.keras` (model + optimizer state) and
        `run_dir/checkpoint.json`; `resume=True` continues from the last one with the same total
        number of epochs (no checkpoint yet: starts afresh). Writes `run_dir/model.keras` (the whole
        model; loads with plain keras) and `run_dir/finetune.json`. `callbacks` are extra Keras
        callbacks, called after the checkpoint is written.

        Trunk cache (`trunk_cache` None = where it applies, True, False): with whole blocks unfrozen,
        the frozen part below them runs once per image and view through stage 1's extraction into
        `cache_dir` (default ./cache; `progress` shows its bar), and training runs on those maps,
        the view cycling each epoch (clean, then `views` seeded augmented ones); before/after
        metrics still run the whole saved model on the images.
        """
        say = log or (lambda m: None)
        self.check_params(request.backbone)  # an unknown block fails before the trunk cache is made
        t0 = time.perf_counter()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = backbones.get(request.backbone)
        size = spec.resolve_size(request.image_size)
        class_names = list(head.class_names_)

        source = open_source(request.data, request.split)
        listing = source.listing()
        if list(listing.class_names) != class_names:
            raise UserError(f"the head's classes ({', '.join(class_names[:4])}...) differ from the data's "
                            f"({', '.join(listing.class_names[:4])}...); fine-tune on the data the head was fitted on")
        parts, val_source = self._split(request, listing, split)
        train_idx, val_idx, test_idx = parts["train"], parts["val"], parts["test"]
        if train_idx.size == 0:
            raise UserError(f"{request.data} has no labelled images in the 'train' split to fine-tune on")
        if self.early_stopping is not None and val_idx.size == 0:
            raise UserError("early stopping watches the validation loss, but there are no validation images")

        cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        trunk = self._plan_trunk(request, spec, size, len(listing.ids), cache_dir, say)
        fingerprint = self._fingerprint(request, head, parts)
        if resume and spec.family == backbones.hub.FAMILY and (read_checkpoint(run_dir) or {}).get("model"):
            raise UserError(f"resuming a fine-tune of {spec.name} is not supported yet (a saved keras-hub tower "
                            f"does not keep which of its inner layers train); start it again from the head run")
        state = self._resume_state(run_dir, resume, fingerprint, say)
        cut = trunk[0] if trunk else None
        if state is not None and state.get("trunk_cut") != cut:  # e.g. the disk filled up since
            was = f"on the trunk cache (cut at {state['trunk_cut']})" if state.get("trunk_cut") else "on the images"
            raise UserError(f"the interrupted run trained {was}, but this one would not; resume where it can do "
                            f"the same (free disk space for the trunk cache), or start a new run")
        lr = float(self.lr) if self.lr is not None else self.default_lr(head)
        schedule = _schedule(self.lr_schedule, lr, int(self.epochs), self.schedule_params)
        y_train = np.asarray(listing.labels)[train_idx]
        class_weights = self._class_weights(y_train, len(class_names))
        devices = _data_parallel_devices()
        replicas = len(devices) if devices else _tf_replicas()
        pad = batch_multiple(int(self.batch_size), replicas)  # every batch is padded to a multiple of this
        cw = None if class_weights is None else np.asarray([class_weights[c] for c in range(len(class_names))])
        initial_epoch = int(state["epoch"]) if state is not None else 0
        maps = None
        if trunk is not None:
            maps = self._trunk_maps(trunk[1], listing, parts, cache_dir, progress, say)
            train_idx = parts["train"] = maps.pop("train_idx")
        with contextlib.ExitStack() as stack, _distribution(devices):
            if maps is not None:
                stack.callback(maps["file"].close)
            model, fit_model, trainable = self._model(request, head, spec, lr,
                                                      run_dir / state["model"] if state else None,
                                                      weighted=pad > 1, cut=cut)
            from pipeline.backend import set_random_seed
            set_random_seed(int(self.seed))
            batches = dict(size=size, resize=request.resize, batch_size=int(self.batch_size), devices=pad)
            eval_sets = {name: make_batches(source, listing, idx, **batches)
                         for name, idx in (("val", val_idx), ("test", test_idx)) if idx.size}
            one_hot = len(class_names) if float(self.label_smoothing) else None
            fit_val = make_batches(source, listing, val_idx, one_hot=one_hot, **batches) if val_idx.size else None
            if maps is None:
                train_ds = make_batches(source, listing, train_idx, shuffle_seed=int(self.seed),
                                        first_epoch=initial_epoch, class_weights=cw, augment=self.augment,
                                        one_hot=one_hot, **batches)
            else:
                common = dict(batch_size=int(self.batch_size), devices=pad, one_hot=one_hot)
                train_ds = map_batches(maps["data"], maps["train_rows"], maps["labels"], shuffle_seed=int(self.seed),
                                       first_epoch=initial_epoch, class_weights=cw, **common)
                fit_val = (map_batches(maps["data"], lambda epoch: maps["val_rows"], maps["labels"], **common)
                           if maps["val_rows"].size else None)  # never image batches into the top half
            return self._train(model, trainable, train_ds, eval_sets, state, request, head, spec, size, lr, schedule,
                               fingerprint, run_dir, class_names, parts, val_source, callbacks, say, t0,
                               fit_model=fit_model, fit_val=fit_val, trunk_cut=cut)

    def _trunk_maps(self, trunk_req: ExtractRequest, listing, parts: Mapping[str, np.ndarray], cache_dir: Path,
                    progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
        """Extract (or find) the trunk cache and map the split onto its rows: {file, data (in memory
        when it fits a quarter of RAM, else the FeatureFile), labels, train_rows(epoch), val_rows,
        train_idx (the training images the cache holds)}."""
        from pipeline.extract import RunOptions, extract, release_models
        from pipeline.features.store import FeatureFile
        from pipeline.heads.streaming import default_memory_budget_mb

        res = extract(trunk_req, RunOptions(cache_dir=cache_dir, progress=progress, batch_size=int(self.batch_size)),
                      log=say)
        release_models()  # the trunk model is not needed while training: free its memory
        say(("trunk cache hit: " if res.cache_hit else "trunk cache: ") + str(res.path))
        ff = FeatureFile(res.path)
        try:
            ids = np.asarray(listing.ids, dtype=object)
            row_of = {(p, int(v)): r for r, (p, v) in enumerate(zip(ff.paths, ff.views.tolist()))}
            n_views = 1 + int(ff.views.max(initial=0))
            train = [i for i in parts["train"].tolist() if (str(ids[i]), 0) in row_of]
            if len(train) < parts["train"].size:
                say(f"{parts['train'].size - len(train)} training image(s) could not be read; training without them")
            by_view = [np.asarray([row_of.get((str(ids[i]), v), row_of[(str(ids[i]), 0)]) for i in train], np.int64)
                       for v in range(n_views)]
            val_rows = np.asarray([row_of[(str(ids[i]), 0)] for i in parts["val"].tolist()
                                   if (str(ids[i]), 0) in row_of], np.int64)
            budget = default_memory_budget_mb() * 1e6
            stored = ff.features.dtype  # float16, or float32 as stage 1 was extracted
            if ff.features.size * stored.itemsize <= budget:
                data = ff.load(None, dtype=stored)
            else:
                say(f"the trunk cache ({ff.features.size * stored.itemsize / 1e9:.1f} GB) exceeds the memory budget; "
                    f"reading batches from disk")
                data = ff
            return {"file": ff, "data": data, "labels": np.asarray(ff.labels), "val_rows": val_rows,
                    "train_rows": lambda epoch: by_view[int(epoch) % n_views],
                    "train_idx": np.asarray(train, np.int64)}
        except BaseException:
            ff.close()
            raise

    def _split(self, request: ExtractRequest, listing, split: Mapping[str, Sequence[str]] | None):
        """({train, val, test: listing indices}, where val came from): stage 2's split when given
        (image ids), else the data's own splits with a seeded, stratified holdout of train as val
        when it has no 'val' split."""
        labels = np.asarray(listing.labels)
        if split:
            pos = {str(i): n for n, i in enumerate(listing.ids)}
            missing = [i for part in split.values() for i in part if str(i) not in pos]
            if missing:
                raise UserError(f"{len(missing)} image(s) the head was trained or validated on are no longer in "
                                f"{request.data} (e.g. {missing[0]}); fine-tune on the data as it was extracted, "
                                f"or extract and fit the head again")
            parts = {k: np.asarray(sorted(pos[str(i)] for i in split.get(k, ())), np.int64)
                     for k in ("train", "val", "test")}
            return parts, "stage-2 split"
        splits = np.asarray(listing.splits)
        labelled = labels >= 0
        parts = {k: np.flatnonzero((splits == k) & labelled) for k in ("train", "val", "test")}
        if parts["val"].size or not 0 < float(self.val_fraction) < 1 or parts["train"].size < 2:
            return parts, "val split" if parts["val"].size else "none"
        from sklearn.model_selection import train_test_split

        train = parts["train"]
        counts = np.bincount(labels[train])
        strat = labels[train] if counts[counts > 0].min() >= 2 else None
        try:
            keep, held = train_test_split(train, test_size=float(self.val_fraction), random_state=int(self.seed),
                                          stratify=strat)
        except ValueError:  # too few images per class to stratify
            keep, held = train_test_split(train, test_size=float(self.val_fraction), random_state=int(self.seed))
        parts.update(train=np.sort(keep), val=np.sort(held))
        return parts, "holdout"

    def _train(self, model, trainable, train_ds, eval_sets, state, request, head, spec, size, lr, schedule,
               fingerprint, run_dir, class_names, parts, val_source, callbacks, say, t0, fit_model=None,
               fit_val=None, trunk_cut: str | None = None) -> FinetuneResult:
        """The epochs (checkpointed), best-weights restore, final metrics and the saved run files.
        `fit_model` (default `model`) is what trains, on `train_ds`, validated on `fit_val` (default
        the val images); `model` is what is evaluated on the images and saved."""
        fit_model = model if fit_model is None else fit_model
        keras = _keras()
        train_idx, val_idx = parts["train"], parts["val"]
        initial_epoch = int(state["epoch"]) if state is not None else 0
        if state is not None:
            before = state["metrics_before"]
        else:
            say("evaluating the starting model")
            before = {name: evaluate(model, ds, class_names) for name, ds in eval_sets.items()}
            state = {"format": _FORMAT, "fingerprint": fingerprint, "params": self.get_params(),
                     "request": request.to_json(), "lr": lr, "epochs": int(self.epochs), "epoch": 0,
                     "model": None, "history": {}, "best": None, "best_epoch": None, "wait": 0,
                     "stopped_early": False, "metrics_before": before, "trainable_layers": trainable,
                     "complete": False, "trunk_cut": trunk_cut}
            write_text_atomic(run_dir / CHECKPOINT_FILE, json.dumps(state, indent=2, default=_json_default))
        patience = None if self.early_stopping is None else int(self.early_stopping)
        cbs = [keras.callbacks.LearningRateScheduler(schedule),
               _make_checkpointer(keras, run_dir, state, patience), *callbacks]
        if initial_epoch < int(self.epochs) and not state.get("stopped_early"):
            with warnings.catch_warnings():  # the datasets' length is unknown until the first epoch ends
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                fit_model.fit(train_ds, validation_data=fit_val, epochs=int(self.epochs),
                          initial_epoch=initial_epoch, callbacks=cbs, verbose=self.verbose, shuffle=False)
        best_epoch = None
        if patience is not None and state.get("best_epoch") and (run_dir / BEST_WEIGHTS).exists():
            best_epoch = int(state["best_epoch"])
            if best_epoch != state["epoch"]:
                say(f"restoring the weights of epoch {best_epoch} (lowest validation loss)")
                fit_model.load_weights(str(run_dir / BEST_WEIGHTS))
        after = {name: evaluate(model, ds, class_names) for name, ds in eval_sets.items()}
        model_path = save_keras_atomic(model, run_dir / MODEL_FILE)
        result = FinetuneResult(
            model_path=model_path, history={k: list(v) for k, v in state["history"].items()},
            metrics_before=before, metrics_after=after, epochs_run=int(state["epoch"]), best_epoch=best_epoch,
            stopped_early=bool(state.get("stopped_early")), lr=lr, trainable_layers=list(state["trainable_layers"]),
            resumed_from=initial_epoch, seconds=time.perf_counter() - t0, n_train=int(train_idx.size),
            n_val=int(val_idx.size), class_names=class_names, val_source=val_source)
        info = {"format": _FORMAT, "version": 1, "class_names": class_names, "image_size": size,
                "resize": request.resize, "request": request.to_json(), "backbone": spec.name,
                "head": getattr(head, "kind", "?"), "head_cache_key": head.cache_key_, "params": self.get_params(),
                "lr": lr, "epochs_run": result.epochs_run, "best_epoch": best_epoch,
                "trainable_layers": result.trainable_layers, "history": result.history}
        write_text_atomic(run_dir / INFO_FILE, json.dumps(info, indent=2, default=_json_default))
        state["complete"] = True
        write_text_atomic(run_dir / CHECKPOINT_FILE, json.dumps(state, indent=2, default=_json_default))
        if not self.keep_checkpoint:
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            (run_dir / BEST_WEIGHTS).unlink(missing_ok=True)
        self.model_, self.class_names_, self.image_size_, self.resize_ = model, class_names, size, request.resize
        self.result_ = result
        return result

    # -- inference
    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "FineTuner":
        """A fitted tuner from a finished run folder (model.keras + finetune.json), for predict_proba."""
        keras = _keras()
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / INFO_FILE).read_text())
        except (OSError, ValueError):
            raise UserError(f"{run_dir} holds no finished fine-tuning run ({INFO_FILE} missing)") from None
        tuner = cls.from_params(info["params"])
        tuner.model_ = keras.models.load_model(run_dir / MODEL_FILE, compile=False)
        tuner.class_names_ = list(info["class_names"])
        tuner.image_size_, tuner.resize_ = int(info["image_size"]), info["resize"]
        return tuner

    def predict_proba(self, paths: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (n, n_classes) for image files, resized as in training; rows of
        unreadable files are NaN."""
        from pipeline.finetune.data import predict_on_batch
        from pipeline.inference.embed import image_batches

        if not hasattr(self, "model_"):
            raise UserError("fit the tuner (or FineTuner.load a run) before predicting")
        paths = [str(p) for p in paths]
        out = np.full((len(paths), len(self.class_names_)), np.nan, np.float32)
        if not paths:
            return out
        for batch in image_batches(paths, self.image_size_, self.resize_, batch_size or self.batch_size):
            if batch.tags.size:
                out[batch.tags] = np.asarray(predict_on_batch(self.model_, batch.images), np.float32)
        return out

    def predict(self, paths: Sequence[str]) -> np.ndarray:
        """Most probable class index per file (-1 for unreadable files)."""
        p = self.predict_proba(paths)
        return np.where(np.isnan(p).any(axis=1), -1, np.argmax(np.nan_to_num(p, nan=-1.0), axis=1))


def _tf_strategy():
    """TensorFlow's strategy: a MirroredStrategy over the GPUs when there are several, or over the
    CPU's logical devices where the user split it in two or more (as tests do); else the default."""
    import tensorflow as tf

    mirrored = _tf_mirrored()
    return mirrored if mirrored is not None else tf.distribute.get_strategy()


@functools.lru_cache(maxsize=1)
def _tf_mirrored():
    """The MirroredStrategy `_tf_strategy` uses (None: one device), made once per process: the devices
    cannot change once TensorFlow has started."""
    import tensorflow as tf

    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if not tf.config.list_physical_devices("GPU") and len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return None


def batch_multiple(batch_size: int, replicas: int) -> int:
    """What every training and evaluation batch is padded to a multiple of (weight-0 rows): the
    replicas a data-parallel step splits it over, and on JAX the whole batch size, as JAX compiles a
    step per batch shape: on an H200 a short last batch's compile (16 s for Lite0) fell inside the
    first epoch and fine-tuned at 40 img/s against 705 with one shape (bench/gpu/diagnose.sh)."""
    from pipeline.backend import name as backend_name

    if backend_name() == "jax":
        return -(-int(batch_size) // replicas) * replicas
    return int(replicas)


def _tf_replicas() -> int:
    """Replicas of TensorFlow's strategy (1 on other backends): a MirroredStrategy splits each batch
    across them, so batches are padded to a multiple, as for JAX's devices."""
    from pipeline.backend import name as backend_name

    return _tf_strategy().num_replicas_in_sync if backend_name() == "tensorflow" else 1


def _data_parallel_devices() -> list:
    """The devices JAX data parallelism spreads batches over (empty or one: no distribution)."""
    from pipeline.backend import name as backend_name

    if backend_name() != "jax":
        return []
    import jax

    devices = jax.devices()
    return list(devices) if len(devices) > 1 else []


@contextlib.contextmanager
def _distribution(devices: Sequence[Any]):
    """Within the block, Keras' DataParallel distribution over `devices` (when several): variables
    are replicated and each batch is split across them. The previous distribution comes back after."""
    if len(devices) < 2:
        yield
        return
    keras = _keras()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=list(devices)))
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def _schedule(name: str, lr: float, epochs: int, params: Mapping[str, Any]):
    """The per-epoch LR; cosine ramps up over one epoch unless told otherwise (fresh top blocks and a
    fitted head take a full LR badly in their first steps)."""
    from pipeline.heads.schedules import make_schedule

    defaults = {"rampup_epochs": 1 if epochs > 2 else 0} if name == "cosine" else {}
    return make_schedule(name, lr, epochs, **{**defaults, **dict(params)})
