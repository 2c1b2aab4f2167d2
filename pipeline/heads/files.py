"""How heads are stored: a .npz of arrays beside a head.json description (no pickle, nothing executed
on load), Keras files loaded in safe mode, and the old pickled heads, read only when trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.errors import UserError


def jsonable(obj: Any) -> Any:
    """Parameters/metadata as plain JSON types (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_joblib(path: str | os.PathLike) -> dict[str, Any]:
    """An old pickled head's state; only called once the user trusted it (unpickling can run code)."""
    import joblib  # noqa: PLC0415 - only for old pickled heads (--trust-pickle), and 40 ms to import

    try:
        state = joblib.load(path)
    except FileNotFoundError:
        raise UserError(f"no head file at {path}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling can raise almost anything
        raise UserError(f"{path} is not a readable head file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a head file written by this tool")
    return state


def read_head_json(side: Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON description of a saved head; UserError when unreadable or of another format."""
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{side} is not a readable head description ({exc}); re-run fit-head") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise UserError(f"{side} does not describe {what}")
    return meta


def npz_head_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, refused unless it ends in .npz (where `what`, e.g. "an svm head", is saved)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{what} is saved as a .npz file, not {path.name}")
    return path


def write_npz_head(path: Path, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write a head's arrays to `path` (.npz) and its description beside it (.json), each atomically."""
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    write_text_atomic(path.with_suffix(".json"), json.dumps(jsonable(meta), indent=2))
    return path


def read_npz_head(path: Path, fmt: str, what: str, keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(description, arrays) of a head saved by `write_npz_head`, without pickle; UserError when either
    file is missing, unreadable, of another format, or lacks one of `keys`."""
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise UserError(f"{what} needs both {path.name} and {side.name} in {path.parent}; one is missing")
    meta = read_head_json(side, fmt, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
    except Exception as exc:  # noqa: BLE001 - a damaged zip raises zipfile, OS or value errors
        raise UserError(f"{path} is not a readable head file ({type(exc).__name__}: {exc}); re-run fit-head") \
            from None
    return meta, arrays


def load_keras_file(path: str | os.PathLike):
    """A .keras model loaded with Keras' safe_mode on (no deserialized Python code); a refused,
    truncated or corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for damaged files
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "unsafe" in text.lower():
            raise UserError(f"{path} contains Python code (e.g. a Lambda layer), which is not loaded for safety; "
                            f"re-create the model from a trusted run") from None
        raise UserError(f"{path} is truncated or not a readable Keras model ({type(exc).__name__}: {text[:160]}); "
                        f"re-run the command that wrote it") from None
