"""keras-hub backbones by preset: `--backbone hub:PRESET`, where PRESET is a keras-hub preset name
(keras-hub downloads it on first use, from Kaggle or Hugging Face) or a local preset folder (what
`Backbone.save_to_preset` writes: config.json, model.weights.h5, image_converter.json).

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
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

PREFIX = "hub:"
FAMILY = "keras-hub"
CONFIG = "config.json"
CONVERTER = "image_converter.json"


@dataclass(frozen=True)
class Preset:
    """A resolved preset: `handle` is what keras-hub loads (a name, or a folder's absolute path)."""

    handle: str
    folder: Path | None
    image_size: int | None
    scale: Any  # the image converter's scale and offset: pixels * scale + offset (scalars or per channel)
    offset: Any


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
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read keras-hub preset file {path}: {exc}") from None


def _converter_facts(config: dict | None) -> tuple[int | None, Any, Any]:
    inner = (config or {}).get("config", {})
    size = inner.get("image_size")
    return (int(size[0]) if size else None), inner.get("scale"), inner.get("offset")


def open_preset(name: str) -> Preset:
    """Resolve `hub:PRESET` into its facts; one-line errors for a missing folder or an offline name."""
    handle = _handle(name)
    if _is_folder(handle):
        folder = Path(handle).expanduser().resolve()
        if not (folder / CONFIG).is_file():
            raise UserError(f"{folder} is not a keras-hub preset folder (no {CONFIG}); save one with "
                            f"keras_hub.models.Backbone.from_preset(NAME).save_to_preset(FOLDER)")
        config = _read_json(folder / CONFIG)
        converter = _read_json(folder / CONVERTER) if (folder / CONVERTER).is_file() else None
        size, scale, offset = _converter_facts(converter)
        if size is None:
            shape = config.get("config", {}).get("image_shape") or [None]
            size = int(shape[0]) if shape[0] else None
        return Preset(str(folder), folder, size, scale, offset)
    keras_hub = _keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(handle)
    except Exception as exc:  # keras-hub raises ValueError, FileNotFoundError or network errors
        raise UserError(_fetch_error(handle, exc)) from None
    size = converter.image_size[0] if converter.image_size else None
    return Preset(handle, None, size, converter.scale, converter.offset)


def _fetch_error(handle: str, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"could not load keras-hub preset {handle!r} ({first}); check the name (keras_hub.models.Backbone."
            f"presets lists them) or, offline, save the preset to a folder on a machine with internet "
            f"(keras_hub.models.Backbone.from_preset(NAME).save_to_preset(DIR), and the same for "
            f"keras_hub.layers.ImageConverter) and pass --backbone hub:DIR")


def _keras_hub():
    try:
        import keras_hub  # heavy and optional: imported only for hub backbones
    except ImportError:
        raise UserError("keras-hub backbones need keras-hub: pip install -e \".[hub]\"") from None
    return keras_hub


def row_fields(name: str) -> dict[str, Any]:
    """The fields of a table row (`table.Backbone`) for `hub:PRESET`."""
    preset = open_preset(name)
    return dict(name=PREFIX + preset.handle, builder="pipeline.backbones.hub:build", preprocess="in-model",
                default_size=preset.image_size or 224, blocks=(), family=FAMILY,
                builder_kwargs={"preset": preset.handle})


def identity(preset_handle: str, weights: str) -> str:
    """What the cache key holds for a preset: a hash of a folder's files (config and weights alike),
    or a named preset's Kaggle handle and keras-hub's version; `none` weights are seeded random."""
    kind = "none:seed=0" if weights.lower() == "none" else "preset"
    folder = Path(preset_handle)
    if folder.is_absolute() and folder.is_dir():
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return f"{kind}:folder:{h.hexdigest()[:32]}"
    try:
        version = importlib.metadata.version("keras-hub")
    except importlib.metadata.PackageNotFoundError:
        version = "absent"
    kaggle = _keras_hub().models.Backbone.presets.get(preset_handle, {}).get("kaggle_handle", preset_handle)
    return f"{kind}:{kaggle}:keras-hub-{version}"


def check_weights(weights: str) -> None:
    """Hub backbones take the preset's weights (`imagenet`, the default) or seeded random ones."""
    if weights.lower() not in ("imagenet", "none"):
        raise UserError("--weights for a keras-hub backbone is imagenet (the preset's own weights) or none; "
                        "to use other weights, save them as a preset folder and pass --backbone hub:FOLDER")


def scaling_layer(scale: Any, offset: Any):
    """pixels * scale + offset per channel, as a built-in Normalization layer (float32)."""
    import keras
    import numpy as np

    s = np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64), (3,))
    o = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float64), (3,))
    if np.any(s <= 0):
        raise UserError(f"the preset's image converter scale {scale} is not positive; cannot express it")
    return keras.layers.Normalization(mean=list(-o / s), variance=list(1.0 / (s * s)), name="preprocess_preset",
                                      dtype="float32")


def build(preset: str, include_top: bool, weights: str | None, input_shape: tuple[int, int, int] | None = None):
    """The preset's image tower behind its pixel scaling: float 0..255 (size, size, 3) in."""
    import keras

    if include_top:
        raise UserError("keras-hub backbones have no ImageNet classifier here; predict with --run RUN "
                        "(a head fitted on their features)")
    check_weights(weights or "none")
    keras_hub = _keras_hub()
    facts = open_preset(PREFIX + preset)
    size = input_shape[0] if input_shape else facts.image_size
    kwargs = {"image_shape": (size, size, 3)} if size and size != facts.image_size else {}
    try:
        model = keras_hub.models.Backbone.from_preset(preset, load_weights=weights == "imagenet", **kwargs)
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if kwargs:
            raise UserError(f"keras-hub preset {preset} cannot take --image-size {size} ({first}); its size is "
                            f"{facts.image_size}") from None
        raise UserError(_fetch_error(preset, exc)) from None
    tower = getattr(model, "vision_encoder", None) or model
    pixels = keras.Input((size, size, 3), name="pixels", dtype="float32")
    x = scaling_layer(facts.scale, facts.offset)(pixels)
    out = tower({"images": x} if isinstance(tower.input, dict) else x)
    if isinstance(out, dict):  # towers with several outputs: the last hidden state is the feature
        out = out.get("sequence_output", next(iter(out.values())))
    return keras.Model(pixels, out, name="hub_" + Path(preset).name.replace("-", "_"))
