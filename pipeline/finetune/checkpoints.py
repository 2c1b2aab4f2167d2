"""Fine-tuning's run folder: the per-epoch checkpoint (model + optimizer state, and checkpoint.json
with the history and early-stopping state), resuming from it, and the finished run's files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.atomic import save_keras_atomic
from pipeline.errors import UserError
from pipeline.finetune.results import FinetuneResult
from pipeline.layout import FINETUNED_MODEL
from pipeline.tracking.runs import write_json

INFO_FILE = "finetune.json"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FORMAT = "featurecache-finetune"


def _history_from_logs(logs: Mapping[str, Any]) -> dict[str, float]:
    names = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc",
             "learning_rate": "lr"}
    return {new: float(logs[old]) for old, new in names.items() if old in logs}


def make_checkpointer(keras, run_dir: Path, state: dict[str, Any], patience: int | None):
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
            write_state(run_dir, state)
            if previous and previous != name:
                (run_dir / previous).unlink(missing_ok=True)

    return Checkpointer()


def read_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint state of a fine-tuning run folder (epoch, model file, history, ...), or None."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not readable JSON; remove it to start over") from None


def write_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    """checkpoint.json, written atomically (an interrupted write leaves the previous one)."""
    write_json(run_dir / CHECKPOINT_FILE, state)


def write_info(run_dir: Path, info: Mapping[str, Any]) -> None:
    """finetune.json, the finished run's facts (what `FineTuner.load` reads)."""
    write_json(run_dir / INFO_FILE, info)


def resume_state(run_dir: Path, resume: bool, fingerprint: str, say: Callable[[str], None]) -> dict[str, Any] | None:
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
        raise UserError(f"the checkpoint in {run_dir} was made from other settings, data, head or split than it is "
                        f"resumed with (its head run, that run's split.csv or the data changed since the "
                        f"interruption?); start a new fine-tune from the head run")
    if not state.get("model"):
        say("the interrupted run finished no epoch; starting from the first epoch")
        return None
    if not (run_dir / state["model"]).exists():
        raise UserError(f"checkpoint model {run_dir / state['model']} is missing; cannot resume")
    say(f"resuming after epoch {state['epoch']} of {state['epochs']}")
    return state


def has_checkpointed_epoch(run_dir: Path) -> bool:
    """Whether an unfinished run's --resume continues from a saved epoch (one without starts over);
    an unreadable checkpoint.json counts as one (its resume says what is wrong)."""
    try:
        return bool((read_checkpoint(run_dir) or {}).get("model"))
    except UserError:
        return True


def finished_result(run_dir: Path) -> FinetuneResult | None:
    """The result of a run whose training finished (checkpoint complete, model and finetune.json
    written) but whose record did not (interrupted while plotting or logging), else None: what
    `finetune --resume` records instead of refusing a run with nothing left to train."""
    state = read_checkpoint(run_dir)
    if not (state or {}).get("complete") or not (run_dir / FINETUNED_MODEL).is_file():
        return None
    try:
        saved = json.loads((run_dir / INFO_FILE).read_text()).get("result")
    except (OSError, ValueError):
        return None
    return FinetuneResult.from_json(saved, run_dir / FINETUNED_MODEL) if isinstance(saved, dict) else None


def drop_checkpoints(run_dir: Path) -> None:
    """A finished run's epoch checkpoints and best weights (checkpoint.json stays)."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    (run_dir / BEST_WEIGHTS).unlink(missing_ok=True)
