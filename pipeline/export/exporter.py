"""`export --run ID --format keras|onnx|savedmodel|tflite`: a fit-head or finetune run as one model
a serving stack takes: raw RGB uint8 images of the run's size in, class probabilities out, the
backbone's preprocessing inside (the graph of `pipeline.backbones.model` plus the head).

Beside the model: `labels.txt` (class names in output order) and `model_card.json` (backbone,
weights identity, input size and resize rule, data, metrics, run id). The model file carries the card
too (ONNX and TFLite metadata, a member of the .keras zip, a SavedModel's assets.extra/). The export is checked before it is kept: the written file is
loaded back with its own runtime and must give the Keras model's probabilities on a few images.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline import backbones as bb
from pipeline.atomic import file_in_the_way, save_keras_atomic, umask_mode
from pipeline.backbones import hub
from pipeline.backbones.table import weights_identity
from pipeline.backend import require
from pipeline.data import decode
from pipeline.errors import UserError
from pipeline.extract import is_concat, part_requests
from pipeline.export.runtime import (
    CARD_FILE, CARD_LIMIT, LABELS_FILE, SAVEDMODEL_EXTRA, open_model, write_card, write_card_files,
)
from pipeline.finetune.model import build_inference_model, leaf_layers
from pipeline.heads.files import load_keras_file
from pipeline.versions import version

# format -> the model's name inside the export folder
FORMATS: dict[str, str] = {"keras": "model.keras", "onnx": "model.onnx", "savedmodel": "saved_model",
                           "tflite": "model.tflite"}
_KERAS_FORMAT = {"onnx": "onnx", "savedmodel": "tf_saved_model", "tflite": "litert"}
STAGING_PREFIX = ".export-"  # the folder an export is built in before it is moved into place
_STAGING = re.compile(r"\.export-[A-Za-z0-9_]{8}\.tmp(\.old)?")  # exactly what mkdtemp makes of it (and its backup)
_OURS = {*FORMATS.values(), LABELS_FILE, CARD_FILE}  # what an earlier export folder may hold
VERIFY_TOLERANCE = 1e-4  # max |probability difference| between the export and the Keras model


@dataclass
class ExportResult:
    folder: Path
    model_path: Path
    card: dict[str, Any]
    max_abs_diff: float


def inference_model(run):
    """The run as one Keras model (uint8 image -> probabilities) in float32: a finetune run's saved
    model, or a fit-head run's backbone rebuilt from its cache request with the head on top."""
    if run.model_path is not None:
        return float32_model(load_keras_file(run.model_path))
    require()
    return build_inference_model(run.request, run.head)


def float32_model(model):
    """`model` unchanged when it computes in float32, else a float32 copy with the same weights
    (a fine-tune saved under mixed precision): ONNX and LiteRT converters need float32 graphs."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    policies = {getattr(getattr(l, "dtype_policy", None), "name", "float32") for l in leaf_layers(model)}
    if policies <= {"float32"}:
        return model
    config = _float32_config(model.get_config())
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    keras.config.set_dtype_policy(keras.config.dtype_policy())  # from_config leaves the global policy alone
    return copy


def _float32_config(obj: Any, key: str = "") -> Any:
    """A model config with every mixed dtype policy replaced by float32 (only policies: a layer may
    well be *named* mixed_5b, as in InceptionResNetV2)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and str(obj.get("config", {}).get("name", "")).startswith("mixed"):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _float32_config(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v, key) for v in obj]
    if key in ("dtype", "dtype_policy") and isinstance(obj, str) and obj.startswith("mixed_"):
        return "float32"
    return obj


def check_format(fmt: str) -> None:
    """Refuse, in one line, a format this installation or backend cannot write (before any work)."""
    require()  # a backend that is not installed: said as such, before Keras fails to import it
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    backend = keras.backend.backend()
    if fmt in ("savedmodel", "tflite"):
        try:
            import tensorflow  # noqa: F401, PLC0415 - these formats are TensorFlow's (optional, and slow to import)
        except ImportError:
            raise UserError(f"--format {fmt} needs TensorFlow (pip install tensorflow); keras and onnx "
                            f"export work without it") from None
        if backend != "tensorflow":
            raise UserError(f"--format {fmt} is written from the TensorFlow backend: add --backend tensorflow")
    if fmt == "onnx":
        need = {"tensorflow": "tf2onnx", "jax": "jax2onnx"}.get(backend)
        if need is None:
            raise UserError("ONNX export from the PyTorch backend has a fixed batch size; use --backend jax "
                            "or --backend tensorflow")
        missing = [m for m in (need, "onnx", "onnxruntime") if not _importable(m)]
        if missing:
            raise UserError(f"--format onnx on {backend} needs {' and '.join(missing)}: "
                            f"pip install -e \".[export]\"")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def export_run(run, fmt: str, out: Path, force: bool = False) -> ExportResult:
    """Write the run's model in `fmt` with labels.txt and model_card.json to the folder `out`.

    The folder is built beside a new `out` (inside an existing empty one or earlier export: a mount
    point, or a folder whose parent the user may not write) and moved into place once verified, so a
    failed export leaves nothing half-written. An existing `out` is replaced only when it holds nothing but an
    earlier export and `force` is given; any other existing folder is refused.
    """
    check_format(fmt)
    if fmt == "onnx" and hub.is_hub(run.request.backbone):
        raise UserError("ONNX export of a keras-hub backbone fails in both converters (tf2onnx has no Erfc, which "
                        "their exact GELU uses; jax2onnx cannot trace their patch embedding); export --format "
                        "keras, savedmodel or tflite")
    out = Path(out).expanduser().absolute()
    check_target(out, force)
    model = inference_model(run)
    size = int(model.input.shape[1])
    if int(model.output.shape[-1]) != len(run.class_names):
        raise UserError(f"run {run.record.id} names {len(run.class_names)} classes but its model has "
                        f"{int(model.output.shape[-1])} outputs; the run folder is inconsistent, re-run it")
    card = model_card(run, fmt, size, int(model.output.shape[-1]))
    inside = out.is_dir()  # an empty folder or an earlier export: built in it (a mount point cannot be renamed over)
    where = out if inside else out.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=where))
    except OSError as exc:  # /proc, a read-only mount, no permission: not the staging folder's name
        raise UserError(f"cannot write the export into {where} ({exc.strerror or exc}); give --out a folder "
                        f"you can write") from None
    os.chmod(staging, umask_mode(folder=True))  # renamed to --out: mkdtemp's 0700 would keep others out
    try:
        target = staging / FORMATS[fmt]
        _write_model(model, fmt, target, card)
        write_card_files(staging, card, run.class_names)  # read by open_model below
        probe = probe_images(size)
        expected = np.asarray(model.predict(probe, verbose=0), np.float64)
        got = open_model(target, cpu_only=True, trust_savedmodel=True).predict(probe)  # just written here
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= VERIFY_TOLERANCE:
            raise UserError(f"the {fmt} export does not reproduce the model (max probability difference "
                            f"{diff:.2g} > {VERIFY_TOLERANCE:g}); nothing was written. Run it again as python cli.py --debug export ... and report it")
        card["verified_max_abs_diff"] = diff  # the cards a reader opens as files say it (those inside a model cannot)
        write_card(staging, card)
        if fmt == "savedmodel":
            write_card(target / SAVEDMODEL_EXTRA, card)
        check_target(out, force)  # again: the folder may have changed during the export
        if inside:
            _move_in(staging, out)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, out / FORMATS[fmt], card, diff)


def _move_in(staging: Path, out: Path) -> None:
    """Move a verified export from `staging` (a folder inside `out`) into `out`, the earlier export's
    entries (all `check_target` let through) first set aside beside it, then deleted: a crash never
    loses both. Ctrl-C waits for the moves (microseconds), so `out` is never left half-moved by it."""
    backup = staging.with_name(staging.name + ".old")
    with _deferred_interrupt():
        backup.mkdir()
        for entry in out.iterdir():
            if entry.name in _OURS:
                os.replace(entry, backup / entry.name)
        for entry in staging.iterdir():
            os.replace(entry, out / entry.name)
    shutil.rmtree(backup, ignore_errors=True)  # this export's own: another's staging in the folder is left alone


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends (in the main thread; elsewhere the block just runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _earlier_export(out: Path, entries: set[str]) -> bool:
    """Whether `out` holds nothing but an export this tool wrote: its own entries only, and a model card
    naming a format whose model file is there (a folder of the user's that happens to hold a
    model_card.json is not one, and --force must not delete it)."""
    if not entries <= _OURS:
        return False
    try:
        with open(out / CARD_FILE, encoding="utf-8") as fh:
            card = json.loads(fh.read(CARD_LIMIT))  # a card is a few kB: a larger file is not one, nor read whole
    except (OSError, ValueError):
        return False
    return (isinstance(card, dict) and isinstance(card.get("run_id"), str) and card.get("format") in FORMATS
            and card.get("file") == FORMATS[card["format"]] and card["file"] in entries)


def check_target(out: Path, force: bool) -> None:
    """Refuse any --out but a new folder, an empty one, or (with --force) an earlier export."""
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; give --out a real folder")
    if not out.exists():
        blocked = file_in_the_way(out)
        if blocked is not None:
            raise UserError(f"--out {out}: {blocked} is a file, not a folder; give --out a new folder")
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give --out a new folder")
    entries = {p.name for p in out.iterdir() if not _STAGING.fullmatch(p.name)}  # an export's own staging (or a killed one's)
    if not entries:
        return
    if _earlier_export(out, entries):
        if force:
            return
        raise UserError(f"{out} already holds an export; add --force to replace it or give another --out")
    raise UserError(f"{out} is not empty and not an earlier export; give --out a new or empty folder")


def _write_model(model, fmt: str, target: Path, card: dict[str, Any]) -> None:
    """One format, with the converters' own chatter kept off the terminal."""
    if fmt == "keras":
        save_keras_atomic(model, target)
        with zipfile.ZipFile(target, "a") as z:  # Keras reads its own members only; open_model reads this one
            z.writestr(CARD_FILE, json.dumps(card))
        return
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import
    spec = [keras.InputSpec(shape=(None, *model.input.shape[1:]), dtype="uint8")]
    with _quiet():
        try:
            model.export(str(target), format=_KERAS_FORMAT[fmt], verbose=False, input_signature=spec)
        except (ImportError, ModuleNotFoundError) as exc:
            raise UserError(f"--format {fmt} needs a package that is missing ({exc}); pip install -e \".[export]\"") from None
    if fmt == "onnx":
        _onnx_metadata(target, card)
    elif fmt == "tflite":
        _tflite_metadata(target, card)
    elif fmt == "savedmodel":
        extra = target / SAVEDMODEL_EXTRA
        extra.mkdir(exist_ok=True)
        write_card_files(extra, card, card["class_names"])


def _onnx_metadata(path: Path, card: dict[str, Any]) -> None:
    """Class names (JSON list, output order) and the model card as ONNX metadata_props."""
    import onnx  # noqa: PLC0415 - optional extra .[export], only for --format onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"class_names": json.dumps(card["class_names"]),
                                        "model_card": json.dumps(card)})
    onnx.save(proto, str(path))


def _tflite_metadata(path: Path, card: dict[str, Any]) -> None:
    """The model card as the .tflite file's `model_card` metadata (a buffer of its JSON), so a file
    copied without its folder still knows its resize rule and class names."""
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415 - TensorFlow, slow
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(path.read_bytes()))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(card).encode(), np.uint8)
    model.buffers.append(buffer)
    meta = schema.MetadataT()
    meta.name, meta.buffer = "model_card", len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), meta]
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


@contextlib.contextmanager
def _quiet():
    """Silence Python-level prints of the converters (they print signatures and 'Saved artifact'), and
    the FutureWarning that Keras' own numpy-2 shim for tf2onnx sets off (`hasattr(np, "object")`)."""
    # tf2onnx logs an optimizer pass it skips with a whole traceback (MobileNetV3's transposes), then
    # writes a model that the export's check verifies: a user reads a traceback as the failure
    converter = logging.getLogger("tf2onnx")
    level = converter.level
    converter.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"In the future `np\.object` will be defined", category=FutureWarning)
            yield
    finally:
        converter.setLevel(level)


def probe_images(size: int, n: int = 4) -> np.ndarray:
    """A few deterministic uint8 images (smooth gradients plus noise) to check an export against."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([xx, yy, 1 - xx], -1) * 255
    return np.stack([np.clip(base * (0.3 + 0.2 * k) + rng.normal(0, 40, base.shape), 0, 255)
                     for k in range(n)]).astype(np.uint8)


def model_card(run, fmt: str, size: int, n_outputs: int) -> dict[str, Any]:
    """What a serving stack (or a person) needs to feed the model and trust its output."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    record, request = run.record, run.request
    parts = part_requests(request) if is_concat(request.backbone) else [request]
    described = [{"name": spec.name, "weights": r.weights, "weights_identity": weights_identity(spec, r.weights),
                  "pooling": r.pooling, "layer": r.layer} for r, spec in ((r, bb.get(r.backbone)) for r in parts)]
    return {
        "run_id": record.id, "stage": record.stage, "format": fmt, "file": FORMATS[fmt],
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "input": {"name": "image", "shape": [None, size, size, 3], "dtype": "uint8", "color": "RGB",
                  "layout": "NHWC", "resize": request.resize, "decoder": decode.identity(),
                  "preprocessing": "inside the model"},
        "output": {"shape": [None, n_outputs], "meaning": "class probabilities (softmax)",
                   "labels": "labels.txt, one class per line in output order"},
        "class_names": list(run.class_names),
        # a concatenation 'a+b': one entry per backbone, features joined in this order
        "backbone": described[0] if len(described) == 1 else described,
        "head": record.config.get("head"),
        "data": {"source": record.config.get("data", request.data), "cache_key": record.config.get("cache_key")},
        "metrics": _metric_summary(record.metrics),
        "tool": {"name": "featurecache", "version": version("featurecache", default=None),
                 "keras": keras.__version__, "keras_backend": keras.backend.backend()},
    }


def _metric_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per split: accuracy, macro F1, log loss and n where the run recorded them (a fine-tune's
    figures after training)."""
    out = {}
    metrics = metrics or {}
    for split, rep in (metrics.get("after") if isinstance(metrics.get("after"), dict) else metrics).items():
        if isinstance(rep, dict) and "accuracy" in rep:
            out[split] = {k: rep[k] for k in ("accuracy", "macro_f1", "log_loss", "n") if k in rep}
    return out


