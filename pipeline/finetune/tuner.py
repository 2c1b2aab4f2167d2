"""Stage 3: fine-tune the backbone end to end, starting from a fitted stage-2 head.

`FineTuner` is the public face (scikit-learn style: settings in, `fit`, `predict_proba`, `load`);
each job it runs lives in its own module of this package:

    handover.py     what a fit-head run gives: request, head, cache file, and its train/val/test images
    model.py        the image-in model (extraction graph + the head's Keras form) and what trains
    trunk.py        training on cached maps of the frozen part below the unfrozen blocks
    data.py         the images (or trunk maps) as seeded, padded Keras batches
    devices.py      TensorFlow's MirroredStrategy / JAX's DataParallel, and the batch padding
    checkpoints.py  per-epoch checkpoints, resume, the run folder's files
    loop.py         the epochs, the best epoch's weights, before/after metrics
    calibrate.py    the finished model's temperature, fitted on its val predictions
    results.py      `FinetuneResult` and the before/after comparison

API:
    FineTuner(...).fit(request, head, run_dir, resume=False) -> FinetuneResult
    FineTuner.predict_proba(paths) / FineTuner.load(run_dir) / FineTuner.from_checkpoint(run_dir)
    stage2_inputs(run_dir) -> Stage2Inputs (request, head, cache path) of a fit-head run folder
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import backbones
from pipeline.backend import accelerator, mixed_policy, set_random_seed
from pipeline.backend import name as backend_name
from pipeline.data.augment import AugmentConfig
from pipeline.data.sources import open_source
from pipeline.errors import UserError
from pipeline.extract import DEFAULT_CACHE, ExtractRequest, is_concat, part_names
from pipeline.finetune.checkpoints import INFO_FILE, read_checkpoint, resume_state
from pipeline.finetune.data import make_batches, map_batches, predict_on_batch
from pipeline.finetune.devices import batch_multiple, data_parallel_devices, distribution, tf_replicas, tf_strategy
from pipeline.finetune.handover import split_parts
from pipeline.finetune.loop import TrainContext, train
from pipeline.finetune.model import (
    build_finetune_model, check_blocks, check_has_blocks, keras_module, set_trainable, trainable_layer_names,
    unfrozen_blocks,
)
from pipeline.finetune.results import FinetuneResult
from pipeline.finetune.trunk import assemble, no_trunk_error, no_trunk_reason, plan_trunk, split_at, trunk_maps
from pipeline.heads.base import short_names
from pipeline.heads.dense import balanced_class_weights
from pipeline.heads.schedules import check_optimizer, make_optimizer
from pipeline.inference.embed import image_batches
from pipeline.layout import FINETUNED_MODEL


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
        if backbone is not None and is_concat(backbone):
            raise UserError(f"fine-tuning trains one backbone, and this head was fitted on {backbone.replace('+', ' and ')} "
                            f"joined; fit a head on one of them (--backbone {part_names(backbone)[0]}) and fine-tune that run")
        if backbone is not None:
            spec = backbones.get(backbone)
            if self.unfreeze:
                check_blocks(spec, self.unfreeze)
            check_has_blocks(spec, self.unfreeze_last)
            why = no_trunk_reason(spec, self.unfreeze_last) if self.trunk_cache else None
            if why:
                raise no_trunk_error(why)
        return self

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
        return {c: float(w) for c, w in enumerate(balanced_class_weights(y, n_classes))}


    def _model(self, request: ExtractRequest, head, spec: backbones.Backbone, lr: float,
               checkpoint: Path | None, weighted: bool = False, cut: str | None = None):
        """(model, model to fit, trainable layer names): built fresh, or loaded from a checkpoint.

        `cut`: train on cached trunk maps; the model to fit is then the top half (`trunk.split_at`,
        which is what checkpoints hold) and the model is trunk + top again, images in.

        On TensorFlow inside a MirroredStrategy scope when several GPUs (or logical CPU devices) are
        visible (`devices.tf_strategy`); under the
        mixed policy (`backend.mixed_policy`: bfloat16 where the GPU does it natively, else float16
        with a loss-scaling optimizer) on a GPU, or when asked.
        """
        keras = keras_module()
        gpu = accelerator() == "gpu"
        mixed = gpu if self.mixed_precision is None else bool(self.mixed_precision)
        scope = contextlib.nullcontext()
        if backend_name() == "tensorflow":
            scope = tf_strategy().scope()
        previous_policy = keras.mixed_precision.global_policy()
        try:
            if mixed:
                keras.mixed_precision.set_global_policy(mixed_policy())
            with scope:
                if checkpoint is not None and cut is None:  # compiled, optimizer state included
                    model = keras.models.load_model(checkpoint)
                    return model, model, trainable_layer_names(model)
                model = build_finetune_model(request, head)
                unfreeze = unfrozen_blocks(spec, [layer.name for layer in model.get_layer("backbone").layers],
                                           self.unfreeze, self.unfreeze_last)
                trainable = set_trainable(model, spec, unfreeze, self.unfreeze_last)
                fit_model = model
                if cut is not None:
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
        `cache_dir` (default DEFAULT_CACHE, the checkout's cache/; `progress` shows its bar), and training runs on those maps,
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
            raise UserError(f"the head's classes ({short_names(class_names)}) differ from the data's "
                            f"({short_names(listing.class_names)}); fine-tune on the data the head was fitted on")
        parts, val_source = split_parts(request, listing, split, self.val_fraction, self.seed)
        train_idx, val_idx, test_idx = parts["train"], parts["val"], parts["test"]
        if train_idx.size == 0:
            raise UserError(f"{request.data} has no labelled images in the 'train' split to fine-tune on")
        if self.early_stopping is not None and val_idx.size == 0:
            raise UserError("early stopping watches the validation loss, but there are no validation images")

        cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        trunk = plan_trunk(request, spec, size, len(listing.ids), cache_dir, say, trunk_cache=self.trunk_cache,
                           unfreeze=self.unfreeze, unfreeze_last=self.unfreeze_last, views=int(self.views),
                           augment=self.augment, seed=int(self.seed))
        fingerprint = self._fingerprint(request, head, parts)
        if resume and spec.family == backbones.hub.FAMILY and (read_checkpoint(run_dir) or {}).get("model"):
            raise UserError(f"resuming a fine-tune of {spec.name} is not supported yet (a saved keras-hub tower "
                            f"does not keep which of its inner layers train); start it again from the head run")
        state = resume_state(run_dir, resume, fingerprint, say)
        cut = trunk[0] if trunk else None
        if state is not None and state.get("trunk_cut") != cut:  # e.g. the disk filled up since
            was = f"on the trunk cache (cut at {state['trunk_cut']})" if state.get("trunk_cut") else "on the images"
            raise UserError(f"the interrupted run trained {was}, but this one would not; resume where it can do "
                            f"the same (free disk space for the trunk cache), or start a new run")
        lr = float(self.lr) if self.lr is not None else self.default_lr(head)
        y_train = np.asarray(listing.labels)[train_idx]
        class_weights = self._class_weights(y_train, len(class_names))
        devices = data_parallel_devices()
        replicas = len(devices) if devices else tf_replicas()
        pad = batch_multiple(int(self.batch_size), replicas)  # every batch is padded to a multiple of this
        cw = None if class_weights is None else np.asarray([class_weights[c] for c in range(len(class_names))])
        initial_epoch = int(state["epoch"]) if state is not None else 0
        maps = None
        if trunk is not None:
            maps = trunk_maps(trunk[1], listing, parts, cache_dir, progress, say, int(self.batch_size))
            train_idx = parts["train"] = maps.pop("train_idx")
        with contextlib.ExitStack() as stack, distribution(devices):
            if maps is not None:
                stack.callback(maps["file"].close)
            model, fit_model, trainable = self._model(request, head, spec, lr,
                                                      run_dir / state["model"] if state else None,
                                                      weighted=pad > 1, cut=cut)
            set_random_seed(int(self.seed))
            batches = dict(size=size, resize=request.resize, batch_size=int(self.batch_size), devices=pad)
            eval_sets = {name: make_batches(source, listing, idx, **batches)
                         for name, idx in (("val", val_idx), ("test", test_idx)) if idx.size}
            one_hot = len(class_names) if float(self.label_smoothing) else None
            if maps is None:
                fit_val = make_batches(source, listing, val_idx, one_hot=one_hot, **batches) if val_idx.size else None
                train_ds = make_batches(source, listing, train_idx, shuffle_seed=int(self.seed),
                                        first_epoch=initial_epoch, class_weights=cw, augment=self.augment,
                                        one_hot=one_hot, **batches)
            else:
                common = dict(batch_size=int(self.batch_size), devices=pad, one_hot=one_hot)
                train_ds = map_batches(maps["data"], maps["train_rows"], maps["labels"], shuffle_seed=int(self.seed),
                                       first_epoch=initial_epoch, class_weights=cw, **common)
                fit_val = (map_batches(maps["data"], lambda epoch: maps["val_rows"], maps["labels"], **common)
                           if maps["val_rows"].size else None)  # never image batches into the top half
            for reader in (*eval_sets.values(), fit_val, train_ds):
                if hasattr(reader, "close"):  # image batches read ahead: stop when the run ends, however it ends
                    stack.callback(reader.close)
            ctx = TrainContext(run_dir=run_dir, request=request, head=head, spec=spec, size=size,
                               class_names=class_names, parts=parts, val_source=val_source, params=self.get_params(),
                               fingerprint=fingerprint, lr=lr, state=state, trunk_cut=cut, model=model,
                               fit_model=fit_model, trainable=trainable, train_ds=train_ds, fit_val=fit_val,
                               eval_sets=eval_sets)
            result = train(ctx, callbacks, say, t0)
        # the trained model, recalibrated (`calibrate.py`): what was saved
        self.model_, self.class_names_, self.image_size_, self.resize_ = ctx.model, class_names, size, request.resize
        self.result_ = result
        return result

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "FineTuner":
        """A fitted tuner from a finished run folder (model.keras + finetune.json), for predict_proba."""
        keras = keras_module()
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / INFO_FILE).read_text())
        except (OSError, ValueError):
            raise UserError(f"{run_dir} holds no finished fine-tuning run ({INFO_FILE} missing)") from None
        tuner = cls.from_params(info["params"])
        tuner.model_ = keras.models.load_model(run_dir / FINETUNED_MODEL, compile=False)
        tuner.class_names_ = list(info["class_names"])
        tuner.image_size_, tuner.resize_ = int(info["image_size"]), info["resize"]
        return tuner

    def predict_proba(self, paths: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (n, n_classes) for image files, resized as in training; rows of
        unreadable files are NaN."""
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
