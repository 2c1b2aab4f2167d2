"""Learning-rate schedules, as picklable `epoch -> lr` callables, and the optimizers by name: what the
dense head and fine-tuning train with (one list, checked in one place).

Used through `keras.callbacks.LearningRateScheduler(schedule)`; plain objects (not closures) so a
head holding one can be sent to joblib worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import UserError

SCHEDULES = ("constant", "exponential", "cosine")
OPTIMIZERS = ("adam", "nadam", "rmsprop", "sgd")


def check_optimizer(name: str) -> None:
    """UserError unless `name` is one of OPTIMIZERS."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(keras, name: str, lr: float):
    """The Keras optimizer `name` (one of OPTIMIZERS; sgd with momentum 0.9) at learning rate `lr`."""
    check_optimizer(name)
    opts = keras.optimizers
    if name == "sgd":
        return opts.SGD(learning_rate=lr, momentum=0.9)
    return {"adam": opts.Adam, "nadam": opts.Nadam, "rmsprop": opts.RMSprop}[name](learning_rate=lr)

# The parameters each schedule accepts (None = derived from `lr`, see `make_schedule`).
_PARAMS: dict[str, dict[str, Any]] = {
    "constant": {},
    "exponential": dict(lr_start=None, lr_max=None, lr_min=None, rampup_epochs=3, sustain_epochs=0, exp_decay=0.8),
    "cosine": dict(lr_start=None, lr_max=None, lr_min=None, rampup_epochs=0, sustain_epochs=0),
}


@dataclass(frozen=True)
class Schedule:
    """Piecewise schedule: linear ramp-up from lr_start to lr_max, sustain, then decay to lr_min."""

    kind: str
    lr_start: float
    lr_max: float
    lr_min: float
    rampup_epochs: int = 0
    sustain_epochs: int = 0
    exp_decay: float = 0.8
    epochs: int = 1

    def __call__(self, epoch: int, lr: float | None = None) -> float:
        """Learning rate for 0-based `epoch` (`lr`, the current rate Keras passes, is ignored)."""
        if self.kind == "constant":
            return float(self.lr_max)
        if epoch < self.rampup_epochs:
            return float(self.lr_start + (self.lr_max - self.lr_start) * epoch / self.rampup_epochs)
        if epoch < self.rampup_epochs + self.sustain_epochs:
            return float(self.lr_max)
        t = epoch - self.rampup_epochs - self.sustain_epochs
        if self.kind == "exponential":  # the Kaggle `lrfn`
            return float((self.lr_max - self.lr_min) * self.exp_decay ** t + self.lr_min)
        span = max(1, self.epochs - self.rampup_epochs - self.sustain_epochs - 1)
        return float(self.lr_min + (self.lr_max - self.lr_min) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span)))

    def curve(self, epochs: int | None = None) -> list[float]:
        """The rate for every epoch, e.g. to plot or log the schedule up front."""
        return [self(e) for e in range(self.epochs if epochs is None else epochs)]


def make_schedule(name: str, lr: float, epochs: int, **params: Any) -> Callable[[int], float]:
    """Build schedule `name` peaking at `lr` over `epochs`; unset params get defaults derived from lr.

    exponential: lr_start (lr/10) -> ramp `rampup_epochs` (3) -> lr_max (lr) for `sustain_epochs` (0)
    -> (lr_max - lr_min) * exp_decay**t + lr_min, lr_min (lr/100), exp_decay (0.8).
    cosine: optional ramp-up/sustain as above, then half a cosine from lr_max down to lr_min (lr/100)
    at the last epoch. constant: lr. Parameters given as None keep their default.
    """
    if name not in _PARAMS:
        raise UserError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    allowed = _PARAMS[name]
    unknown = sorted(k for k, v in params.items() if k not in allowed and v is not None)
    if unknown:
        raise UserError(f"schedule {name!r} takes no parameter {', '.join(unknown)}; "
                        f"it takes {', '.join(allowed) or 'none'}")
    if not 0 < lr < float("inf"):
        raise UserError(f"the learning rate lr (--lr) must be a positive number, not {lr}")
    p = {**allowed, **{k: v for k, v in params.items() if v is not None and k in allowed}}
    lr_max = float(lr if p.get("lr_max") is None else p["lr_max"])
    lr_start = float(lr_max / 10 if p.get("lr_start") is None else p["lr_start"])
    lr_min = float(lr_max / 100 if p.get("lr_min") is None else p["lr_min"])
    ramp, sustain = int(p.get("rampup_epochs", 0)), int(p.get("sustain_epochs", 0))
    decay = float(p.get("exp_decay", 0.8))
    if ramp < 0 or sustain < 0:
        raise UserError("rampup_epochs and sustain_epochs (--rampup-epochs, --sustain-epochs) must be 0 or more")
    if not 0 < decay <= 1:
        raise UserError(f"exp_decay (--exp-decay) must be in (0, 1], not {decay}")
    for param, value in (("lr_max", lr_max), ("lr_start", lr_start), ("lr_min", lr_min)):
        if not 0 <= value < float("inf") or (param == "lr_max" and value == 0):
            raise UserError(f"{param} (--{param.replace('_', '-')}) must be a "
                            f"{'positive' if param == 'lr_max' else 'non-negative'} number, not {value}")
    if lr_min > lr_max:
        peak = "--lr-max" if p.get("lr_max") is not None else "--lr, the peak without --lr-max"
        raise UserError(f"lr_min (--lr-min, {lr_min}) must not exceed lr_max ({peak}, {lr_max})")
    return Schedule(name, lr_start, lr_max, lr_min, ramp, sustain, decay, max(1, int(epochs)))
