"""The head registry: every kind's name, one-line summary and class, in one table. Adding a kind is a
row here and a module of its own. Classes are imported when first asked for, so listing the kinds (the
CLI's `--head` choices) costs nothing, and importing a module registers nothing."""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.heads.base import Head

# kind -> (module:class, what it is). The first is fit-head's default.
HEAD_KINDS: dict[str, tuple[str, str]] = {
    "auto": ("pipeline.heads.auto:AutoHead",
             "fits svm, logistic and knn and keeps the lowest cross-validated log loss"),
    "svm": ("pipeline.heads.svm:KernelHead", "RBF kernel on unit-length features"),
    "logistic": ("pipeline.heads.logistic:LogisticHead", "linear"),
    "dense": ("pipeline.heads.dense:DenseHead", "a Keras MLP"),
    "knn": ("pipeline.heads.knn:KNNHead", "weighted vote of the nearest training images (explains itself)"),
}
DEFAULT_KIND = next(iter(HEAD_KINDS))
LEGACY_PICKLE = "head.joblib"  # an old pickled logistic head, loaded only when trusted


def head_class(kind: str) -> "type[Head]":
    """The class of a head kind; UserError naming the kinds for an unknown one."""
    if kind not in HEAD_KINDS:
        raise UserError(f"unknown head type {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    module, _, name = HEAD_KINDS[kind][0].partition(":")
    return getattr(importlib.import_module(module), name)


def head_classes() -> "list[type[Head]]":
    """Every registered head class, in the table's order."""
    return [head_class(kind) for kind in HEAD_KINDS]


def make_head(kind: str, **params: Any) -> "Head":
    """A head by name (a key of HEAD_KINDS) with these constructor parameters."""
    cls = head_class(kind)
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        raise UserError(f"the {kind} head has no parameter {', '.join(unknown)}")
    return cls(**params)


def head_filename(kind: str) -> str:
    """The artifact file name a head of this kind is saved under inside a run folder (beside it: head.json)."""
    return head_class(kind).artifact


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


def load_head(path: str | os.PathLike, trust_pickle: bool | None = None) -> "Head":
    """Load a saved head of any kind (the class whose artifact suffix and head.json format match); a run
    folder works too. An old pickled head.joblib loads only when trusted (`trust_pickle`, else the
    `trusting_pickles` block around the call), since unpickling can run code."""
    path = Path(path)
    trust_pickle = _TRUST_PICKLE.get() if trust_pickle is None else trust_pickle
    classes = head_classes()
    if path.is_dir():
        names = list(dict.fromkeys(cls.artifact for cls in classes)) + [LEGACY_PICKLE]
        for name in names:
            if (path / name).exists():
                path = path / name
                break
        else:
            raise UserError(f"{path} holds no head file ({' or '.join(names[:-1])}); is it a fit-head run folder?")
    if path.name.endswith(".joblib"):
        return head_class("logistic").load(path, trust_pickle=trust_pickle)
    candidates = [cls for cls in classes if cls.file_format and Path(cls.artifact).suffix == path.suffix]
    if not candidates:
        raise UserError(f"{path.name} is not a head file (expected one of: "
                        f"{', '.join(sorted({cls.artifact for cls in classes}))})")
    if not path.exists():
        raise UserError(f"no head file at {path}; is it a fit-head run folder?")
    if not path.with_suffix(".json").exists():
        raise UserError(f"{path.name} needs {path.with_suffix('.json').name} beside it in {path.parent}, which is "
                        f"missing; re-run fit-head")
    try:
        fmt, readable = json.loads(path.with_suffix(".json").read_text()).get("format"), True
    except (OSError, ValueError, AttributeError):
        fmt, readable = None, False  # the first candidate's load says what is wrong
    chosen = [cls for cls in candidates if cls.file_format == fmt]
    if readable and not chosen and len(candidates) > 1:  # which kind it was cannot be told: naming one misleads
        found = f"format {fmt!r}" if fmt is not None else "no format"
        raise UserError(f"{path.with_suffix('.json')} is damaged or not written by this tool ({found}, where a head "
                        f"of this tool names one of {', '.join(sorted(c.file_format for c in candidates))}); re-run "
                        f"fit-head")
    if fmt is not None and not chosen:
        raise UserError(f"{path.with_suffix('.json')} names no head format this tool knows ({fmt!r}); re-run fit-head")
    return (chosen or candidates)[0].load(path)  # no readable description: that load says what is missing
