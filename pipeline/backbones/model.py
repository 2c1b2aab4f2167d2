"""The one model graph, shared by extract, predict, evaluate and finetune:

    uint8 RGB image (size x size x 3)
      -> image_to_float (float32 0..255)
      -> the backbone's preprocessing (built-in Keras layers, `preprocessing`)
      -> backbone (a frozen nested model named "backbone", cut at --layer)
      -> [global avg/max pooling of a map or tokens, or a transformer's class token]
      -> [a head: fine-tuning and export]

Augmentation is not in the graph: it runs in the input path (`pipeline.data.augment`, seeded by
(seed, view, image)), one implementation for cached views and fine-tuning alike, so the saved and
exported models are pure inference graphs. Batches cross to the device as uint8 (4x fewer bytes than float32) and every backend runs the
same preprocessing, so features agree across TensorFlow, JAX and PyTorch.
"""

from __future__ import annotations

from pipeline.backbones.preprocessing import cast_layer, preprocessing_layers
from pipeline.backbones.table import Backbone, build
from pipeline.errors import UserError


def backbone_cut(spec: Backbone, weights: str, image_size: int, layer: str | None = None,
                 include_top: bool = False):
    """The frozen backbone (preprocessed float input) cut at `layer`, as a model named 'backbone'."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    base = build(spec, weights, image_size, include_top=include_top)
    out = base.output
    if layer:
        try:
            out = base.get_layer(layer).output
        except ValueError:
            names = [l.name for l in base.layers]
            raise UserError(f"{spec.name} has no layer {layer!r}; `python cli.py backbones {spec.name} "
                            f"--layers` lists all {len(names)} (last ones: {', '.join(names[-3:])})") from None
    model = keras.Model(base.input, out, name="backbone")
    model.trainable = False
    return model


def preprocessed_input(spec: Backbone, image_size: int):
    """(uint8 image input, the backbone's preprocessed float input): the graph's first half."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = cast_layer()(inputs)
    for prep in preprocessing_layers(spec.preprocess):
        x = prep(x)
    return inputs, x


def image_graph(spec: Backbone, weights: str, image_size: int, pooling: str = "avg", layer: str | None = None,
                include_top: bool = False):
    """(uint8 input tensor, output tensor) of the graph above, without a head."""
    inputs, x = preprocessed_input(spec, image_size)
    x = backbone_cut(spec, weights, image_size, layer, include_top)(x, training=False)
    return inputs, pooled(x, pooling, spec.name)


def pooled(x, pooling: str, name: str):
    """Global pooling of a feature map (N, H, W, C) or a token sequence (N, T, C); `cls` takes a
    sequence's first token (built-in layers only, so saved models load with plain Keras)."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    L = keras.layers
    if pooling == "none":
        return x
    if pooling == "cls":
        if len(x.shape) == 2:
            raise UserError(f"--pooling cls takes a transformer's class token; {name} gives one pooled vector "
                            f"per image already: use --pooling avg")
        if len(x.shape) != 3:
            raise UserError(f"--pooling cls takes a transformer's class token; {name} gives feature maps of shape "
                            f"{tuple(x.shape[1:])}: use --pooling avg or max")
        first = L.Cropping1D((0, int(x.shape[1]) - 1), name="features_cls_token")(x)
        return L.Flatten(name="features_cls_pool")(first)
    if len(x.shape) == 2:
        return x
    if len(x.shape) == 3:
        pool = L.GlobalAveragePooling1D if pooling == "avg" else L.GlobalMaxPooling1D
    else:
        pool = L.GlobalAveragePooling2D if pooling == "avg" else L.GlobalMaxPooling2D
    return pool(name=f"features_{pooling}_pool")(x)


def feature_model(spec: Backbone, weights: str, image_size: int, pooling: str = "avg", layer: str | None = None):
    """Stage 1's frozen feature extractor: uint8 images in, (N, D) or (N, H, W, C) features out."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    inputs, out = image_graph(spec, weights, image_size, pooling, layer)
    return keras.Model(inputs, out, name=f"{spec.slug}_features")


def classifier_model(spec: Backbone, weights: str):
    """The backbone with its own ImageNet top at its default size: uint8 images in, 1000 probabilities out."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    inputs, out = image_graph(spec, weights, spec.default_size, pooling="none", include_top=True)
    return keras.Model(inputs, out, name=f"{spec.slug}_imagenet")
