"""Fine-tuning's training loop: the epochs (checkpointed each), the best epoch's weights restored,
the before/after metrics and the finished run's files. `FineTuner.fit` gathers one `TrainContext`."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import backbones
from pipeline.atomic import save_keras_atomic
from pipeline.backend import keras_module
from pipeline.extract import ExtractRequest
from pipeline.finetune.checkpoints import (
    BEST_WEIGHTS, FORMAT, drop_checkpoints, make_checkpointer, write_info, write_state,
)
from pipeline.finetune.calibrate import recalibrate, with_temperature
from pipeline.finetune.data import evaluate, predict_batches, report
from pipeline.finetune.results import FinetuneResult
from pipeline.heads.schedules import make_schedule
from pipeline.layout import FINETUNED_MODEL


@dataclass
class TrainContext:
    """One fine-tuning run as its epochs see it."""

    # what the run is
    run_dir: Path
    request: ExtractRequest  # the cache's request: how the images become model inputs
    head: Any  # the fitted stage-2 head it started from
    spec: backbones.Backbone
    size: int
    class_names: list[str]
    parts: Mapping[str, np.ndarray]  # listing indices per split ('train' as it trains)
    val_source: str  # 'stage-2 split' | 'val split' | 'holdout' | 'none'
    params: dict[str, Any]  # the tuner's settings (`FineTuner.get_params`), recorded in the run files
    fingerprint: str  # of request, head, settings and split: a checkpoint resumes only under the same
    lr: float
    state: dict[str, Any] | None  # the checkpoint resumed from; None for a fresh run
    trunk_cut: str | None  # training on cached trunk maps below this layer, else on the images
    # what trains, and on what
    model: Any  # images in: evaluated before and after, and saved
    fit_model: Any  # what trains: `model`, or its top half on the trunk cache
    trainable: list[str]
    train_ds: Any
    fit_val: Any  # validation batches `fit_model` reads (None: no validation images)
    eval_sets: dict[str, Any]  # image batches per split for the before/after metrics


def schedule(name: str, lr: float, epochs: int, params: Mapping[str, Any]):
    """The per-epoch LR; cosine ramps up over one epoch unless told otherwise (fresh top blocks and a
    fitted head take a full LR badly in their first steps)."""
    defaults = {"rampup_epochs": 1 if epochs > 2 else 0} if name == "cosine" else {}
    return make_schedule(name, lr, epochs, **{**defaults, **dict(params)})


def train(ctx: TrainContext, callbacks: Sequence[Any], say: Callable[[str], None], t0: float) -> FinetuneResult:
    """The epochs (checkpointed), best-weights restore, final metrics and the saved run files.
    `ctx.fit_model` trains on `ctx.train_ds`, validated on `ctx.fit_val`; `ctx.model` is what is
    evaluated on the images and saved."""
    keras = keras_module()
    p = ctx.params
    epochs = int(p["epochs"])
    model, fit_model, run_dir, state = ctx.model, ctx.fit_model, ctx.run_dir, ctx.state
    initial_epoch = int(state["epoch"]) if state is not None else 0
    if state is not None:
        before = state["metrics_before"]
    else:
        say("evaluating the starting model")
        before = {name: evaluate(model, ds, ctx.class_names) for name, ds in ctx.eval_sets.items()}
        state = {"format": FORMAT, "fingerprint": ctx.fingerprint, "params": p,
                 "request": ctx.request.to_json(), "lr": ctx.lr, "epochs": epochs, "epoch": 0,
                 "model": None, "history": {}, "best": None, "best_epoch": None, "wait": 0,
                 "stopped_early": False, "metrics_before": before, "trainable_layers": ctx.trainable,
                 "complete": False, "trunk_cut": ctx.trunk_cut}
        write_state(run_dir, state)
    patience = None if p["early_stopping"] is None else int(p["early_stopping"])
    cbs = [keras.callbacks.LearningRateScheduler(schedule(p["lr_schedule"], ctx.lr, epochs, p["schedule_params"])),
           make_checkpointer(keras, run_dir, state, patience), *callbacks]
    if initial_epoch < epochs and not state.get("stopped_early"):
        with warnings.catch_warnings():  # the datasets' length is unknown until the first epoch ends
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            fit_model.fit(ctx.train_ds, validation_data=ctx.fit_val, epochs=epochs,
                          initial_epoch=initial_epoch, callbacks=cbs, verbose=p["verbose"], shuffle=False)
    best_epoch = None
    if patience is not None and state.get("best_epoch") and (run_dir / BEST_WEIGHTS).exists():
        best_epoch = int(state["best_epoch"])
        if best_epoch != state["epoch"]:
            say(f"restoring the weights of epoch {best_epoch} (lowest validation loss)")
            fit_model.load_weights(str(run_dir / BEST_WEIGHTS))
    preds = {name: predict_batches(model, ds) for name, ds in ctx.eval_sets.items()}
    cal = recalibrate(preds, int(p["seed"]))
    if cal.temperature != 1.0:
        say(f"recalibrated: {cal.note}")
    after = {name: report(preds[name][0], cal.proba[name], ctx.class_names) for name in preds}
    model = ctx.model = with_temperature(model, cal.temperature)
    # saved compiled as a user evaluates it, with integer labels: training's loss (label smoothing, one-hot)
    # is not the model's, and the trunk-cache and recalibrated models are new Keras models, uncompiled. Plain
    # SGD keeps no state per weight: with RMSprop's default, loading warned that the saved optimizer's 2
    # variables did not match the slots it builds for the trainable weights
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model_path = save_keras_atomic(model, run_dir / FINETUNED_MODEL)
    result = FinetuneResult(
        model_path=model_path, history={k: list(v) for k, v in state["history"].items()},
        metrics_before=before, metrics_after=after, epochs_run=int(state["epoch"]), best_epoch=best_epoch,
        stopped_early=bool(state.get("stopped_early")), lr=ctx.lr, trainable_layers=list(state["trainable_layers"]),
        resumed_from=initial_epoch, seconds=time.perf_counter() - t0, n_train=int(ctx.parts["train"].size),
        n_val=int(ctx.parts["val"].size), class_names=ctx.class_names, val_source=ctx.val_source,
        temperature=cal.temperature, calibration=cal.note)
    write_info(run_dir, {"format": FORMAT, "version": 1, "class_names": ctx.class_names, "image_size": ctx.size,
                         "resize": ctx.request.resize, "request": ctx.request.to_json(), "backbone": ctx.spec.name,
                         "head": getattr(ctx.head, "kind", "?"), "head_cache_key": ctx.head.cache_key_,
                         "params": p, "lr": ctx.lr, "epochs_run": result.epochs_run, "best_epoch": best_epoch,
                         "trainable_layers": result.trainable_layers, "history": result.history,
                         "temperature": cal.temperature, "calibration": cal.note, "result": result.to_json()})
    state["complete"] = True
    write_state(run_dir, state)
    if not p["keep_checkpoint"]:
        drop_checkpoints(run_dir)
    return result
