"""keras-hub backbones by preset: `--backbone hub:PRESET`, where PRESET is a keras-hub preset name or
handle (kaggle://..., hf://...; keras-hub downloads it on first use) or a local preset folder
(`Backbone.save_to_preset` writes config.json and model.weights.h5 there, and
`ImageConverter.save_to_preset` the image_converter.json that says how to scale pixels).

The table's rows are data written here; a hub row is read from the preset's own files instead: its
input size and pixel scaling (image_converter.json) and its identity for the cache key (a hash of a
folder's files, or a named preset's Kaggle handle and keras-hub's version). A local folder is read
without importing Keras; a named preset needs keras-hub to fetch its files. The model is the
preset's image tower (a CLIP/SigLIP backbone's vision encoder) behind its own scaling, taking
float 0..255 pixels like every row with in-model preprocessing; its output is a token sequence
(ViT, DINOv2, CLIP: pooled by `avg`, `max` or `cls`), a feature map (CNNs) or a pooled vector
(SigLIP's attention pooling).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError, first_reason
from pipeline.versions import version

PREFIX = "hub:"
NESTED = "nested:"  # a block's start in a hub row: the I-th of the tower's own transformer blocks
FAMILY = "keras-hub"
CONFIG = "config.json"
CONVERTER = "image_converter.json"


@dataclass(frozen=True)
class Preset:
    """A resolved preset: `handle` is what keras-hub loads (a name, or a folder's absolute path)."""

    handle: str
    image_size: int | None
    scale: Any  # the image converter's scale and offset: pixels * scale + offset (scalars or per channel)
    offset: Any
    n_blocks: int = 0  # transformer blocks (config's num_layers; 0 for CNNs and unknown towers)


def is_hub(name: str) -> bool:
    """Whether a --backbone value names a keras-hub preset."""
    return name.strip().lower().startswith(PREFIX)


def _handle(name: str) -> str:
    handle = name.strip()[len(PREFIX):].strip()
    if not handle:
        raise UserError("--backbone hub: needs a keras-hub preset name or a local preset folder, "
                        "e.g. hub:dinov2_small or hub:./my_preset")
    return handle


def _is_folder(handle: str) -> bool:
    if "://" in handle:  # kaggle://, hf://, gs://: keras-hub's own handles
        return False
    return "/" in handle or handle.startswith(".") or Path(handle).expanduser().is_dir()


def qualified(name: str) -> str:
    """A --backbone value as runs record it: a hub folder by its absolute path (so a run made in one
    directory is used from another); every other value unchanged."""
    if not is_hub(name):
        return name
    handle = _handle(name)
    return PREFIX + str(Path(handle).expanduser().resolve()) if _is_folder(handle) else PREFIX + handle


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read keras-hub preset file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise UserError(f"{path} is not a keras-hub preset file (no \"config\" object); save the preset again")
    return data


def _converter_facts(config: dict, where: str) -> tuple[int | None, Any, Any]:
    inner = config["config"]
    size, scale, offset = inner.get("image_size"), inner.get("scale"), inner.get("offset")
    try:
        size = None if size is None else int(size[0] if isinstance(size, (list, tuple)) else size)
        for value in (scale, offset):
            if value is not None:
                [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError, IndexError):
        raise UserError(f"{where}: image_size, scale or offset is not a number or a list of numbers; "
                        f"save the image converter again") from None
    return size, scale, offset


def open_preset(name: str) -> Preset:
    """Resolve `hub:PRESET` into its facts; one-line errors for a missing folder or an offline name."""
    handle = _handle(name)
    if _is_folder(handle):
        folder = Path(handle).expanduser().resolve()
        if not (folder / CONFIG).is_file():
            raise UserError(f"{folder} is not a keras-hub preset folder (no {CONFIG}); save one with "
                            f"keras_hub.models.Backbone.from_preset(NAME).save_to_preset(FOLDER)")
        if not (folder / CONVERTER).is_file():  # without it the pixels' scaling is unknown: refuse, not guess
            raise UserError(f"{folder} has no {CONVERTER}, which says how the preset scales pixels; save it "
                            f"beside the model: keras_hub.layers.ImageConverter.from_preset(NAME)"
                            f".save_to_preset(FOLDER)")
        config = _read_json(folder / CONFIG)
        size, scale, offset = _converter_facts(_read_json(folder / CONVERTER), str(folder / CONVERTER))
        if size is None:
            shape = config["config"].get("image_shape")
            size = int(shape[0]) if isinstance(shape, (list, tuple)) and shape and shape[0] else None
        return Preset(str(folder), size, scale, offset, _n_blocks(config))
    keras_hub = _keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(handle)
    except Exception as exc:  # noqa: BLE001 - keras-hub raises ValueError, FileNotFoundError or network errors
        raise UserError(fetch_error(handle, exc)) from None
    if converter.scale is None and converter.offset is None:
        raise UserError(f"keras-hub preset {handle!r} has no image converter scaling; it cannot be used here")
    size = converter.image_size[0] if converter.image_size else None
    try:
        # the config alone, without the weights:
        from keras_hub.src.utils.preset_utils import load_json  # noqa: PLC0415 - keras-hub: heavy and optional
        config = load_json(handle)
    except Exception:  # noqa: BLE001 - an older or newer keras-hub: no blocks listed, --unfreeze-last still works
        config = {}
    return Preset(handle, size, converter.scale, converter.offset, _n_blocks(config))


def _n_blocks(config: dict) -> int:
    """Transformer blocks of a preset's tower, from its config (a CLIP/SigLIP's vision encoder's)."""
    inner = config["config"] if isinstance(config.get("config"), dict) else {}
    vision = inner.get("vision_encoder", {})
    if isinstance(vision, dict) and "config" in vision:
        inner = vision["config"]
    n = inner.get("num_layers")
    return int(n) if isinstance(n, int) and n > 0 and "patch_size" in inner else 0


_OFFLINE = ("NameResolutionError", "Max retries exceeded", "ConnectionError", "Temporary failure in name resolution",
            "Failed to establish a new connection", "Network is unreachable")


def fetch_error(handle: str, exc: Exception) -> str:
    """The one line for a preset keras-hub could not load: no network, or its reason, and the way out."""
    text = str(exc)
    if any(sign in text for sign in _OFFLINE):
        first = "no network: the preset's files could not be downloaded"
    else:
        first = first_reason(exc, 200)
    return (f"could not load keras-hub preset {handle!r} ({first}); check the name (keras_hub.models.Backbone."
            f"presets lists them) or, offline, save the preset to a folder on a machine with internet "
            f"(keras_hub.models.Backbone.from_preset(NAME).save_to_preset(DIR), and the same for "
            f"keras_hub.layers.ImageConverter) and pass --backbone hub:DIR")


def _keras_hub():
    try:
        import keras_hub  # noqa: PLC0415 - heavy and optional (.[hub]): imported only for hub backbones
    except ImportError:
        raise UserError("keras-hub backbones need keras-hub: pip install -e \".[hub]\"") from None
    return keras_hub


def row_fields(name: str) -> dict[str, Any]:
    """The fields of a table row (`table.Backbone`) for `hub:PRESET`: its transformer blocks, topmost
    first, as `nested:I` (the I-th of the tower's blocks, which keras-hub keeps inside one layer)."""
    preset = open_preset(name)
    blocks = tuple((f"block{i}", f"{NESTED}{i}") for i in reversed(range(preset.n_blocks)))
    return dict(name=PREFIX + preset.handle, builder="pipeline.backbones.hub:build", preprocess="in-model",
                default_size=preset.image_size or 224, blocks=blocks, family=FAMILY,
                builder_kwargs={"preset": preset.handle, "image_size": preset.image_size, "scale": preset.scale,
                                "offset": preset.offset})


def _tower_blocks(model) -> list:
    """A keras-hub image tower's transformer blocks, bottom first: its `encoder_layers` (ViT, CLIP,
    SigLIP), or the list of layers of its encoder layer (DINOv2); [] for a CNN."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    candidates = [model, *getattr(model, "layers", [])]
    for layer in candidates:
        blocks = getattr(layer, "encoder_layers", None)
        if isinstance(blocks, (list, tuple)) and blocks:
            return list(blocks)
    for layer in candidates[1:]:
        blocks = getattr(layer, "layers", None)
        if not isinstance(layer, keras.Model) and isinstance(blocks, (list, tuple)) and blocks \
                and all(isinstance(b, keras.layers.Layer) for b in blocks):
            return list(blocks)
    return []


def nested_blocks(backbone) -> dict[str, Any]:
    """{block name: layer} of the transformer blocks inside a hub backbone model (the fine-tune
    model's "backbone"), topmost first, named as `row_fields` names them."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    for tower in [backbone, *backbone.layers]:
        if isinstance(tower, keras.Model):
            blocks = _tower_blocks(tower)
            if blocks:
                return {f"block{i}": blocks[i] for i in reversed(range(len(blocks)))}
    return {}


def train_blocks(backbone, blocks: list) -> None:
    """Make `blocks` (layers deep inside `backbone`) trainable and nothing else of it: every layer
    that holds none of them is frozen; the containers that do stay trainable (they own no weights)."""
    keep = {id(b) for b in blocks}

    def holds(layer) -> bool:
        return any(id(sub) in keep for sub in layer._flatten_layers(include_self=True, recursive=True))

    def walk(layer) -> None:
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            if id(sub) in keep:
                sub.trainable = True
            elif holds(sub):
                sub.trainable = True
                walk(sub)
            else:
                sub.trainable = False

    if blocks:
        backbone.trainable = True
        walk(backbone)


def identity(preset_handle: str, weights: str) -> str:
    """What the cache key holds for a preset: a hash of a folder's files (config and weights alike),
    or a named preset's Kaggle handle; with keras-hub's version (its code builds the model from the
    config); `none` weights are seeded random."""
    kind = "none:seed=0" if weights.lower() == "none" else "preset"
    hub_version = version("keras-hub")
    folder = Path(preset_handle)
    if folder.is_absolute() and folder.is_dir():
        return f"{kind}:folder:{folder_hash(folder)}:keras-hub-{hub_version}"
    kaggle = _keras_hub().models.Backbone.presets.get(preset_handle, {}).get("kaggle_handle", preset_handle)
    return f"{kind}:{kaggle}:keras-hub-{hub_version}"


_HASHES: dict[tuple, str] = {}  # one hash per folder state in a process: a ViT-L preset is 1.2 GB


def folder_hash(folder: Path) -> str:
    """sha256 over a folder's file names and contents (remembered while names, sizes and mtimes stay)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    state = (str(folder), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if state not in _HASHES:
        h = hashlib.sha256()
        for path in files:
            h.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _HASHES[state] = h.hexdigest()[:32]
    return _HASHES[state]


def check_weights(weights: str) -> None:
    """Hub backbones take the preset's weights (`imagenet`, the default) or seeded random ones."""
    if weights.lower() not in ("imagenet", "none"):
        raise UserError("--weights for a keras-hub backbone is imagenet (the preset's own weights) or none; "
                        "to use other weights, save them as a preset folder and pass --backbone hub:FOLDER")


def scaling_layer(scale: Any, offset: Any):
    """pixels * scale + offset per channel, as a built-in Normalization layer (float32)."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    s = np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64), (3,))
    o = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float64), (3,))
    if np.any(s <= 0):
        raise UserError(f"the preset's image converter scale {scale} is not positive; cannot express it")
    return keras.layers.Normalization(mean=list(-o / s), variance=list(1.0 / (s * s)), name="preprocess_preset",
                                      dtype="float32")


def build(preset: str, include_top: bool, weights: str | None, input_shape: tuple[int, int, int] | None = None,
          image_size: int | None = None, scale: Any = None, offset: Any = None):
    """The preset's image tower behind its pixel scaling: float 0..255 (size, size, 3) in. The
    preset's size, scale and offset come from its row (`row_fields`), read once from its files."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    if include_top:
        raise UserError("keras-hub backbones have no ImageNet classifier here; predict with --run RUN "
                        "(a head fitted on their features)")
    check_weights(weights or "none")
    keras_hub = _keras_hub()
    size = input_shape[0] if input_shape else image_size
    kwargs = {"image_shape": (size, size, 3)} if size and size != image_size else {}
    try:
        model = keras_hub.models.Backbone.from_preset(preset, load_weights=weights == "imagenet", **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build becomes one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if kwargs:
            raise UserError(f"keras-hub preset {preset} cannot take --image-size {size} ({first}); its size is "
                            f"{image_size}") from None
        if Path(preset).is_dir():
            raise UserError(f"could not load the keras-hub preset folder {preset} ({first}); save it again") from None
        raise UserError(fetch_error(preset, exc)) from None
    tower = getattr(model, "vision_encoder", None) or model
    pixels = keras.Input((size, size, 3), name="pixels", dtype="float32")
    x = scaling_layer(scale, offset)(pixels)
    out = tower({"images": x} if isinstance(tower.input, dict) else x)
    if isinstance(out, dict):  # towers with several outputs: the last hidden state is the feature
        out = out.get("sequence_output", next(iter(out.values())))
    return keras.Model(pixels, out, name="hub_" + Path(preset).name.replace("-", "_"))
