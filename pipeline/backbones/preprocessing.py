"""The backbones' input preprocessing, once, as built-in Keras layers (so it runs through
`keras.ops` on TensorFlow, JAX and PyTorch, and a saved model loads without this package).

Every graph starts with `image_to_float` (uint8 0..255 -> float32), then optional augmentation,
then the style's layers below, then the backbone.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # 'torch' style, on 0..1 pixels
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # 'caffe' style, on 0..255 pixels

# style -> what it does (the table's `preprocess` column names one of these)
STYLES = {
    "caffe": "RGB -> BGR, ImageNet mean subtracted (VGG, ResNet v1)",
    "tf": "scaled to [-1, 1] (Inception, Xception, MobileNet, ResNet v2)",
    "torch": "[0, 1], then ImageNet mean/std (DenseNet)",
    "in-model": "none: the backbone rescales 0..255 itself (EfficientNet, ConvNeXt, MobileNetV3)",
    "lite": "(x - 127) / 128 (EfficientNet-Lite)",
}


def cast_layer():
    """uint8 (or any) pixels -> float32 0..255; the first layer of every graph."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    return keras.layers.Rescaling(1.0, name="image_to_float", dtype="float32")


def preprocessing_layers(style: str) -> list:
    """Built-in Keras layers mapping float 0..255 RGB to a backbone's input, for a style.

    'tf': x/127.5 - 1. 'lite': (x - 127)/128. 'torch': x/255, then ImageNet mean/std.
    'caffe': RGB -> BGR and ImageNet mean subtracted, as a frozen Dense(3) (a permutation kernel,
    bias -mean): exact for integer pixels even where matmuls run in TF32. 'in-model': none.
    They compute in float32 whatever the global dtype policy.
    """
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    L = keras.layers
    if style == "in-model":
        return []
    if style == "tf":
        return [L.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_scale", dtype="float32")]
    if style == "lite":
        return [L.Rescaling(1 / 128, offset=-127 / 128, name="preprocess_scale", dtype="float32")]
    if style == "torch":
        return [L.Rescaling(1 / 255, name="preprocess_scale", dtype="float32"),
                L.Normalization(mean=list(IMAGENET_MEAN_RGB), variance=[s * s for s in IMAGENET_STD_RGB],
                                name="preprocess_normalize", dtype="float32")]
    if style == "caffe":
        dense = L.Dense(3, name="preprocess_rgb_to_bgr", dtype="float32", trainable=False)
        dense.build((None, 3))
        kernel = np.zeros((3, 3), np.float32)
        kernel[[2, 1, 0], [0, 1, 2]] = 1.0  # out[..., j] = in[..., 2 - j]
        dense.set_weights([kernel, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
        return [dense]
    raise ValueError(f"unknown preprocessing style {style!r}; known: {', '.join(STYLES)}")
