"""Open an exported model with its own runtime, without this tool's cache or runs: `.onnx` with
ONNX Runtime, `.keras` with Keras (safe mode), a SavedModel folder or `.tflite` with TensorFlow.
Used by `predict --model FILE` and by `export` to check what it wrote.

Class names come from `labels.txt` beside the file or the model's own metadata; the input size and
resize rule from `model_card.json` beside it, else from the card the model file carries (every format
`export` writes keeps one: ONNX metadata, a member of the .keras zip, TFLite metadata, the SavedModel's
`assets.extra/`), else the model's input shape and the default rule.
"""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.backend import require
from pipeline.data.decode import RESIZE_METHODS
from pipeline.errors import DataWarning, UserError
from pipeline.heads.files import load_keras_file
from pipeline.inference.embed import OnBatch, map_files

SAVEDMODEL_EXTRA = "assets.extra"  # TF Serving's place for files beside a SavedModel: the export's labels and card
CARD_FILE = "model_card.json"  # an export's model card: beside the model, in a .keras zip, in a SavedModel's assets.extra
LABELS_FILE = "labels.txt"     # its class names, one per line, in the model's output order
CARD_LIMIT = 1 << 20           # a card is a few kB; a bigger file or member is not read (a zip bomb)


@dataclass
class ExportedModel:
    """A loaded export: `predict(uint8 NHWC batch) -> probabilities (n, k)` plus what feeds it."""

    path: Path
    kind: str
    size: int
    class_names: list[str]
    resize: str = "stretch"
    card: dict[str, Any] = field(default_factory=dict)
    _call: Callable[[np.ndarray], np.ndarray] | None = None
    names_from: str = LABELS_FILE  # where class_names came from, for the message when they do not fit

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise UserError(f"{self.path.name} takes (n, {self.size}, {self.size}, 3) uint8 images, got {images.shape}")
        return np.asarray(self._call(images), np.float64)


def open_model(path: str | Path, cpu_only: bool = False, trust_savedmodel: bool = False) -> ExportedModel:
    """Load `path` (.onnx, .keras, .tflite or a SavedModel folder); one-line errors for anything else.
    `cpu_only`: ONNX Runtime on its CPU provider (export's check), else every provider it has.
    `trust_savedmodel`: a SavedModel runs whatever TensorFlow ops it holds (file I/O included), like
    unpickling, so it is opened only when the caller says it is trusted."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UserError(f"{path} is a folder but not a SavedModel (no saved_model.pb); give the model file")
        if not trust_savedmodel:
            raise UserError(f"{path} is a SavedModel, which runs whatever TensorFlow ops it holds (reading and "
                            f"writing files included), like unpickling: add --trust-model if you trust where it "
                            f"came from, or use the same export as model.onnx or model.keras (safe to open)")
        kind, (call, size, names, embedded) = "savedmodel", _savedmodel(path)
    elif path.suffix.lower() == ".onnx":
        kind, (call, size, names, embedded) = "onnx", _onnx(path, cpu_only)
    elif path.suffix.lower() == ".keras":
        if path.suffix != ".keras":
            raise UserError(f"{path.name}: Keras opens only files whose name ends in .keras, in lower case; rename it")
        kind, (call, size, names, embedded) = "keras", _keras(path)
    elif path.suffix.lower() == ".tflite":
        kind, (call, size, names, embedded) = "tflite", _tflite(path)
    else:
        raise UserError(f"{path.name}: unknown model type; --model takes .onnx, .keras, .tflite or a SavedModel folder")
    card = _read_card(path) or embedded  # the model file carries its card too (a file copied without its folder)
    labels = _read_labels(_beside(path, LABELS_FILE))
    names = _class_names(names, f"{path.name}'s metadata")
    card_names = _class_names(card.get("class_names"), f"the model card of {path.name}")
    names_from = ("labels.txt beside it" if labels else "its metadata" if names
                  else "model_card.json beside it" if card_names and _beside(path, CARD_FILE).is_file()
                  else "the card it carries" if card_names else "")
    own = names or _class_names(embedded.get("class_names"), f"the card inside {path.name}")
    if labels and own and labels != own:  # a model copied into another export's folder, or labels.txt edited
        warnings.warn(f"labels.txt beside {path.name} names the classes {_few(labels)} but the model itself names "
                      f"{_few(own)}; the predictions use labels.txt: keep an export's files together, or re-export",
                      DataWarning, stacklevel=2)
    names = labels or names or card_names
    if not card:
        warnings.warn(f"no model_card.json beside {path.name} and no card inside it: assuming the images are resized by 'stretch'"
                      + ("" if names else " and numbering the classes")
                      + "; keep the export folder's files together (a model exported with --resize crop "
                        "predicts otherwise)", DataWarning, stacklevel=2)
    card_input = card.get("input")
    resize = card_input.get("resize", "stretch") if isinstance(card_input, dict) else "stretch"
    if resize not in RESIZE_METHODS:
        raise UserError(f"{_beside(path, 'model_card.json')} names an unknown resize rule {resize!r} (known: "
                        f"{', '.join(RESIZE_METHODS)}); re-export the model or fix input.resize in the card")
    return ExportedModel(path, kind, size, list(names), resize, card, call, names_from)


def write_card_files(folder: Path, card: dict[str, Any], class_names: Sequence[str]) -> None:
    """An export's labels.txt and model_card.json in `folder` (beside the model, or a SavedModel's assets.extra)."""
    (folder / LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    write_card(folder, card)


def write_card(folder: Path, card: dict[str, Any]) -> None:
    """An export's model_card.json in `folder` (rewritten once the export is verified)."""
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def _beside(path: Path, name: str) -> Path:
    """labels.txt and model_card.json sit in the export folder, beside the model file or SavedModel folder."""
    return path.parent / name


def _read_card(path: Path) -> dict[str, Any]:
    card = _beside(path, CARD_FILE)
    if not card.is_file():
        return {}
    if card.stat().st_size > CARD_LIMIT:  # a card is a few kB, as the one inside the model is bounded
        raise UserError(f"{card} is {card.stat().st_size:,} bytes, not a model card; re-export the model or remove it")
    try:
        data = json.loads(card.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        raise UserError(f"{card} is not valid JSON; re-export the model or remove the file") from None
    return data if isinstance(data, dict) else {}


def _read_labels(labels: Path) -> list[str]:
    """A labels.txt (beside the model, or in a SavedModel's assets.extra): one class per line, UTF-8 (a
    byte-order mark and Windows line ends, as Notepad saves it, are not part of the names)."""
    if not labels.is_file():
        return []
    if labels.stat().st_size > CARD_LIMIT * 16:
        raise UserError(f"{labels} is {labels.stat().st_size:,} bytes, not a list of class names; re-export the model")
    try:
        text = labels.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{labels} is not UTF-8 text; save it as UTF-8 (one class per line) or re-export the model") from None
    return _class_names([line.rstrip("\r") for line in text.split("\n") if line.strip()], str(labels))


def _class_names(value: Any, where: str) -> list[str]:
    """Class names read from an export (labels.txt, a card, metadata): a list of text without tabs or
    line breaks (predict prints tab-separated lines); [] where none are given."""
    if value is None or value == []:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v and not any(c in v for c in "\t\r\n")
                                               for v in value):
        raise UserError(f"{where} does not name the classes as a list of text without tabs or line breaks; "
                        f"re-export the model")
    return list(value)


def _few(names: list[str]) -> str:
    return ", ".join(map(repr, names[:4])) + (", ..." if len(names) > 4 else "")


def _square_size(shape, path: Path) -> int:
    dims = [d if isinstance(d, int) else None for d in list(shape)]
    if len(dims) != 4 or dims[1] is None or dims[1] != dims[2] or dims[3] != 3:
        raise UserError(f"{path.name} does not take square RGB images (input shape {list(shape)}); "
                        f"predict --model takes models written by `cli.py export`")
    return int(dims[1])


def _onnx(path: Path, cpu_only: bool = False):
    try:
        import onnxruntime as ort  # noqa: PLC0415 - optional, and only for .onnx models
    except ImportError:
        raise UserError("running an .onnx model needs onnxruntime: pip install onnxruntime") from None
    try:
        providers = ["CPUExecutionProvider"] if cpu_only else ort.get_available_providers()
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        raise UserError(f"{path} is not a readable ONNX model ({' '.join(str(exc).split())[:160]})") from None
    inp = session.get_inputs()[0]
    if inp.type != "tensor(uint8)":
        raise UserError(f"{path.name} takes {inp.type}, not uint8 images; predict --model takes models written "
                        f"by `cli.py export`")
    meta = session.get_modelmeta().custom_metadata_map
    try:
        names = json.loads(meta["class_names"]) if "class_names" in meta else []
        card = json.loads(meta["model_card"]) if "model_card" in meta else {}
    except ValueError:
        raise UserError(f"{path.name}'s metadata (class_names, model_card) is not valid JSON; re-export the model") from None
    return ((lambda x: session.run(None, {inp.name: x})[0]), _square_size(inp.shape, path), names,
            card if isinstance(card, dict) else {})


def _parse_card(text: bytes | str, where: str) -> dict[str, Any]:
    try:
        card = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"the model card inside {where} is not valid JSON; re-export the model") from None
    return card if isinstance(card, dict) else {}


def _keras_card(path: Path) -> dict[str, Any]:
    """The model_card.json member `export` adds to a .keras zip ({} where there is none)."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(CARD_FILE)
            if info.file_size > CARD_LIMIT:
                return {}
            return _parse_card(z.read(info), path.name)
    except (KeyError, zipfile.BadZipFile, OSError):
        return {}


def _keras(path: Path):
    require()
    model = load_keras_file(path)
    return ((lambda x: model.predict(x, verbose=0, batch_size=len(x))), _square_size(model.input.shape, path), [],
            _keras_card(path))


def _tensorflow(what: str):
    try:
        import tensorflow as tf  # noqa: PLC0415 - optional here, and takes seconds to import
    except ImportError:
        raise UserError(f"running a {what} needs TensorFlow (pip install tensorflow); .onnx and .keras "
                        f"exports run without it") from None
    return tf


def _savedmodel(path: Path):
    tf = _tensorflow("SavedModel")
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures.get("serving_default")
    if fn is None:
        raise UserError(f"{path} has no serving_default signature")
    spec = list(fn.structured_input_signature[1].values())[0]
    key = list(fn.structured_outputs)[0]
    extra = path / SAVEDMODEL_EXTRA
    names = _read_labels(extra / LABELS_FILE)
    card_file = extra / CARD_FILE
    card = (_parse_card(card_file.read_bytes(), f"{path.name}/assets.extra")
            if card_file.is_file() and card_file.stat().st_size <= CARD_LIMIT else {})
    return (lambda x: fn(tf.constant(x))[key].numpy()), _square_size(spec.shape.as_list(), path), names, card


def _tflite(path: Path):
    tf = _tensorflow(".tflite model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter announces its move to ai-edge-litert
        try:
            custom, card = _tflite_inspect(path)
            if custom:  # select-TF ("Flex") ops can do what a SavedModel can (read, write files); others need code
                raise UserError(f"{path.name} uses operations outside TFLite's built-in set ({', '.join(custom[:4])}"
                                f"{', ...' if len(custom) > 4 else ''}), which this tool does not run: TensorFlow ops "
                                f"inside a .tflite can read and write files like a SavedModel; export with cli.py "
                                f"export --format tflite (built-in ops only) or give the model's .onnx or .keras")
            interpreter = tf.lite.Interpreter(model_path=str(path))
            inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        except (ValueError, RuntimeError, UnicodeDecodeError, IndexError, struct.error) as e:  # TFLite's error text can be undecodable bytes
            raise UserError(f"{path.name} is not a readable TFLite model ({type(e).__name__}); export the run again "
                            f"(cli.py export --format tflite) or give its .onnx or .keras") from None

    def call(x: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return call, _square_size(inp["shape"].tolist(), path), [], card


def _tflite_inspect(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The custom operator names a .tflite file declares ("FlexWriteFile", ...) and the card in its
    `model_card` metadata ({} where none), read from its flatbuffer before any interpreter is built;
    ValueError when the file is not a TFLite flatbuffer."""
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("no TFL3 identifier")
    # TFLite's generated flatbuffer reader:
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415 - TensorFlow, optional and slow

    model = schema.Model.GetRootAsModel(data, 0)
    names = (model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength()))
    card: dict[str, Any] = {}
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() == b"model_card" and 0 <= meta.Buffer() < model.BuffersLength():
            raw = model.Buffers(meta.Buffer()).DataAsNumpy()
            if isinstance(raw, np.ndarray) and raw.size <= CARD_LIMIT:
                card = _parse_card(raw.tobytes(), path.name)
    return sorted({name.decode(errors="replace") for name in names if name}), card


def predict_files(model: ExportedModel, paths: list[str], batch_size: int = 32, on_batch: OnBatch | None = None
                  ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Probabilities of an exported model for image files, decoded and resized exactly as the
    run's cache was (the card's size and resize rule): (probabilities, kept positions, skipped);
    `on_batch` as in `map_files`. Class names that do not match the outputs stop it at the first batch."""
    def checked(kept: list[int], proba: np.ndarray) -> None:
        if model.class_names and len(model.class_names) != proba.shape[1]:
            raise UserError(f"{model.path.name}'s class names ({model.names_from}) are {len(model.class_names)} but "
                            f"the model outputs {proba.shape[1]}; re-export the model")
        if on_batch is not None:
            on_batch(kept, proba)

    return map_files(model.predict, paths, model.size, model.resize, batch_size, checked)
