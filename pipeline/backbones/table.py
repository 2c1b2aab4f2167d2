"""The backbone table: every supported CNN by a lower-case name, with its builder, preprocessing,
default input size and top blocks for fine-tuning. One row per model, no per-model branches.

Nothing here imports TensorFlow until a model is built, so listing backbones and computing cache
keys stay fast.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backbones import hub
from pipeline.backbones.lite_weights import weights_path
from pipeline.backbones.preprocessing import STYLES
from pipeline.backend import set_random_seed
from pipeline.errors import UserError, first_reason

# Preprocessing styles (implemented once, as Keras layers, in `preprocessing`).
PREPROCESS = STYLES


@dataclass(frozen=True)
class Backbone:
    """One row of the table. `blocks` lists fine-tunable top blocks, topmost first, each as
    (name, start) where start is a regex for the block's first layer or `after:LAYER`."""

    name: str
    builder: str  # "module:attribute"
    preprocess: str  # a key of PREPROCESS
    default_size: int
    blocks: tuple[tuple[str, str], ...]
    min_size: int = 32
    family: str = ""
    imagenet_sizes: tuple[int, ...] = ()  # sizes ImageNet weights exist for, where Keras restricts them
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    finetune_blocks: int = 1  # how many of `blocks` `finetune` unfreezes by default (measured where > 1)

    @property
    def slug(self) -> str:
        """The name as Keras and file names take it (a hub preset's folder path has slashes; a long
        one keeps its end and a hash of the whole, so file names stay under 255 bytes)."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_")
        if len(slug) > 80:
            slug = f"{slug[:12]}_{hashlib.sha256(self.name.encode()).hexdigest()[:8]}_{slug[-50:].lstrip('_')}"
        return slug

    def resolve_size(self, image_size: int | None) -> int:
        """The input size to use, checked against what the backbone can take."""
        size = image_size or self.default_size
        if size < self.min_size:
            raise UserError(f"--image-size {size} is too small for {self.name}: the smallest it takes is "
                            f"{self.min_size}")
        return size


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _after(layer: str) -> str:
    return f"after:{layer}"


def _stages(prefix_fmt: str, numbers: range, top: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """Blocks named by a numbered prefix, topmost first: e.g. block7, block6, ... for EfficientNet."""
    return top + tuple((prefix_fmt.format(n).rstrip("_"), "^" + prefix_fmt.format(n)) for n in numbers)


_RESNET = (("conv5", "^conv5_"), ("conv4", "^conv4_"), ("conv3", "^conv3_"))
_VGG = (("block5", "^block5_"), ("block4", "^block4_"), ("block3", "^block3_"))
_INCEPTION = tuple((f"mixed{n}", _after(f"mixed{n - 1}")) for n in (10, 9, 8, 7))
_XCEPTION = _stages("block{}_", range(14, 10, -1))
_INCRES = (("conv_7b", "^conv_7b$"), ("block8_10", _after("block8_9_ac")), ("block8", _after("mixed_7a")))
_DENSENET = (("conv5", "^conv5_"), ("conv4", "^conv4_"))
_MOBILENET = tuple((f"block{n}", f"^conv_(pad|dw)_{n}$") for n in range(13, 9, -1))
_MOBILENETV2 = _stages("block_{}_", range(16, 12, -1), top=(("top", "^Conv_1$"),))
_EFFNET = _stages("block{}", range(7, 4, -1), top=(("top", "^top_"),))
_EFFNETV2_6 = _stages("block{}", range(6, 3, -1), top=(("top", "^top_"),))
_CONVNEXT = tuple((f"stage_{n}", rf"_downsampling_block_{n - 1}$|_stage_{n}_") for n in (3, 2, 1))

_A = "keras.applications:"
_ROWS: list[Backbone] = [
    Backbone("vgg16", _A + "VGG16", "caffe", 224, _VGG, family="vgg"),
    Backbone("vgg19", _A + "VGG19", "caffe", 224, _VGG, family="vgg"),
    Backbone("resnet50", _A + "ResNet50", "caffe", 224, _RESNET, family="resnet"),
    Backbone("resnet101", _A + "ResNet101", "caffe", 224, _RESNET, family="resnet"),
    Backbone("resnet152", _A + "ResNet152", "caffe", 224, _RESNET, family="resnet"),
    Backbone("resnet50v2", _A + "ResNet50V2", "tf", 224, _RESNET, family="resnetv2"),
    Backbone("resnet101v2", _A + "ResNet101V2", "tf", 224, _RESNET, family="resnetv2"),
    Backbone("resnet152v2", _A + "ResNet152V2", "tf", 224, _RESNET, family="resnetv2"),
    Backbone("inceptionv3", _A + "InceptionV3", "tf", 299, _INCEPTION, min_size=75, family="inception"),
    Backbone("xception", _A + "Xception", "tf", 299, _XCEPTION, min_size=71, family="xception"),
    Backbone("inceptionresnetv2", _A + "InceptionResNetV2", "tf", 299, _INCRES, min_size=75,
             family="inceptionresnet"),
    Backbone("densenet121", _A + "DenseNet121", "torch", 224, _DENSENET, family="densenet"),
    Backbone("densenet169", _A + "DenseNet169", "torch", 224, _DENSENET, family="densenet"),
    Backbone("densenet201", _A + "DenseNet201", "torch", 224, _DENSENET, family="densenet"),
    Backbone("mobilenet", _A + "MobileNet", "tf", 224, _MOBILENET, family="mobilenet",
             imagenet_sizes=(128, 160, 192, 224)),
    Backbone("mobilenetv2", _A + "MobileNetV2", "tf", 224, _MOBILENETV2, family="mobilenetv2",
             imagenet_sizes=(96, 128, 160, 192, 224)),
    Backbone("mobilenetv3small", _A + "MobileNetV3Small", "in-model", 224,
             _stages("expanded_conv_{}_", range(10, 7, -1), top=(("top", "^conv_1$"),)), family="mobilenetv3"),
    Backbone("mobilenetv3large", _A + "MobileNetV3Large", "in-model", 224,
             _stages("expanded_conv_{}_", range(14, 11, -1), top=(("top", "^conv_1$"),)), family="mobilenetv3"),
    *[Backbone(f"efficientnetb{i}", _A + f"EfficientNetB{i}", "in-model", size, _EFFNET, family="efficientnet")
      for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))],
    *[Backbone(f"efficientnetv2{v.lower()}", _A + f"EfficientNetV2{v}", "in-model", size,
               _EFFNETV2_6 if v in ("B0", "B1", "B2", "B3", "S") else _EFFNET, family="efficientnetv2")
      for v, size in (("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384), ("M", 480), ("L", 480))],
    *[Backbone(f"convnext{v.lower()}", _A + f"ConvNeXt{v}", "in-model", 224, _CONVNEXT, family="convnext")
      for v in ("Tiny", "Small", "Base", "Large", "XLarge")],
    *[Backbone(f"efficientnet_lite{i}", "pipeline.backbones.lite:build_lite", "lite", size,
               _stages("block{}", range(7, 4, -1), top=(("top", "^top_"),)), family="efficientnet_lite",
               builder_kwargs={"name": f"efficientnet_lite{i}"}, finetune_blocks=3)
      for i, size in enumerate((224, 240, 224))],  # Lite2 at 224, not its native 260: see DEFAULT_BACKBONE
]
TABLE: dict[str, Backbone] = {b.name: b for b in _ROWS}
# The backbone `extract`, `fit-head` and `predict` use unless told. Lite2 at 224 (its native size is
# 260) gave the best head-only accuracy measured with cli.py on flowers_224, hymenoptera and a
# held-out flowers split, ahead of Lite0 at 224 and of Lite2 at 260 (docs/quality.md).
DEFAULT_BACKBONE = "efficientnet_lite2"


def get(name: str) -> Backbone:
    """The table row for `name` (case-insensitive; `hub:PRESET` for a keras-hub preset, read from the
    preset's files), or a one-line error listing the choices."""
    if hub.is_hub(name):
        return Backbone(**hub.row_fields(name))
    key = name.lower().replace("-", "_")
    if key not in TABLE:
        key = key.replace("_", "") if key.replace("_", "") in TABLE else key
    if key not in TABLE:
        raise UserError(f"unknown backbone {name!r}; `python cli.py backbones` lists them "
                        f"({', '.join(sorted(TABLE)[:6])}, ...), or hub:PRESET for a keras-hub preset")
    return TABLE[key]


def weights_identity(spec: Backbone, weights: str) -> str:
    """A short string that changes whenever the weights would: hashed into the cache key."""
    w = weights.lower()
    if spec.family == hub.FAMILY:
        hub.check_weights(weights)
        return hub.identity(spec.builder_kwargs["preset"], weights)
    if w == "none":
        return "none:seed=0"
    if w == "imagenet":
        if spec.family == "efficientnet_lite":
            p = weights_path(spec.name)
            return f"imagenet:{p.name}:{p.stat().st_size}"
        return f"imagenet:keras-{importlib.metadata.version('keras')}:{spec.builder.split(':')[1]}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights must be imagenet, none or a weights file; {weights!r} is none of these")
    st = path.stat()
    return f"file:{_file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)}"


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 (32 hex digits) of a weights file, once per (path, size, mtime) in a process: a
    command checks a run's file and then plans its extraction from it."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def check_weights_file(spec: Backbone, weights: str, recorded: str, who: str) -> None:
    """One line where the weights file a head was fitted on (`recorded`: its weights identity) is gone
    or holds other content now: the head would read other features and answer with confidence.
    ImageNet, random and keras-hub weights have no file of the user's that can change."""
    if not str(recorded).startswith("file:"):
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"{who} reads its backbone's weights from {path}, which is gone; put the file back, or fit "
                        f"a head again with --weights naming where it is now")
    if weights_identity(spec, weights) != recorded:
        raise UserError(f"{path} is not the weights file {who} was fitted on (its content changed since): its head "
                        f"would read other features; put the original back, or fit a head again")


def check_weights_size(spec: Backbone, weights: str, image_size: int) -> None:
    """One line when Keras has no ImageNet weights for this backbone at this input size (MobileNets)."""
    if weights.lower() == "imagenet" and spec.imagenet_sizes and image_size not in spec.imagenet_sizes:
        raise UserError(f"{spec.name} ImageNet weights exist for sizes {', '.join(map(str, spec.imagenet_sizes))}"
                        f"; pick one with --image-size or use --weights none")


def check_output(spec: Backbone, pooling: str, layer: str | None) -> None:
    """One line for an output a backbone cannot give: `--pooling cls` (a transformer's class token)
    from a CNN, or `--layer` from a keras-hub preset (its intermediate layers are not reachable yet)."""
    if spec.family == hub.FAMILY:
        if layer:
            raise UserError(f"--layer is not supported for keras-hub backbones yet: {spec.name} gives its last "
                            f"layer's features (pooled with --pooling avg, max or cls)")
    elif pooling == "cls":
        raise UserError(f"--pooling cls takes a transformer's class token; {spec.name} gives feature maps: use "
                        f"--pooling avg or max (or a keras-hub transformer, --backbone hub:PRESET)")


def build(spec: Backbone, weights: str, image_size: int, include_top: bool = False):
    """Build the backbone (a keras.Model on preprocessed input); errors become one-line UserErrors."""
    set_random_seed(0)  # weights=none must give the same features every time
    w: str | None = None if weights.lower() == "none" else ("imagenet" if weights.lower() == "imagenet" else
                                                            str(Path(weights).expanduser()))
    if not include_top:
        check_weights_size(spec, weights, image_size)
    fn = _resolve(spec.builder)
    kwargs = dict(spec.builder_kwargs, include_top=include_top, weights=w)
    if not include_top:
        kwargs["input_shape"] = (image_size, image_size, 3)
    try:
        # Keras warns per layer before a failed load fails: held back (the filters in force still
        # decide what is held), then shown only where the model built
        with warnings.catch_warnings(record=True) as said:
            model = fn(**kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - keras raises ValueError/Exception for downloads, sizes and bad files
        raise UserError(_explain_build_error(spec, w, image_size, exc, include_top)) from None
    for shown in said:
        warnings.showwarning(shown.message, shown.category, shown.filename, shown.lineno)
    return model


def _explain_build_error(spec: Backbone, weights: str | None, size: int, exc: Exception,
                         include_top: bool = False) -> str:
    msg = first_reason(exc)
    url = re.search(r"https?://\S+?\.h5", str(exc))
    if weights == "imagenet" and (url or "URL fetch failure" in str(exc) or "fetch" in str(exc).lower()):
        fname = url.group(0).rsplit("/", 1)[1] if url else "the weights .h5 file"
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        return (f"could not download ImageNet weights for {spec.name} (offline?); place {fname} in {cache}/ "
                f"or pass --weights PATH" + ("" if include_top else " (or --weights none)"))
    if "input" in msg.lower() and ("size" in msg.lower() or "shape" in msg.lower()):
        return f"{spec.name} cannot take --image-size {size}: {msg}"
    if weights not in (None, "imagenet"):
        return f"could not load weights file {weights} into {spec.name}: {msg}"
    return f"could not build {spec.name}: {msg}"


def block_spans(spec: Backbone, layer_names: list[str]) -> dict[str, tuple[int, int]]:
    """Map each top block to its [start, end) range of layer indices in `layer_names` (model order);
    a keras-hub preset's transformer blocks are not layers of the model but inside one (`hub`)."""
    starts: list[tuple[str, int]] = []
    for name, start in spec.blocks:
        if start.startswith(hub.NESTED):  # inside one layer: `hub.nested_blocks` finds them
            continue
        if start.startswith("after:"):
            anchor = start[6:]
            if anchor not in layer_names:
                continue
            idx = layer_names.index(anchor) + 1
        else:
            hits = [i for i, n in enumerate(layer_names) if re.search(start, n)]
            if not hits:
                continue
            idx = hits[0]
        starts.append((name, idx))
    spans: dict[str, tuple[int, int]] = {}
    end = len(layer_names)
    for name, idx in starts:  # topmost first: each block ends where the one above it starts
        spans[name] = (idx, end)
        end = idx
    return spans
