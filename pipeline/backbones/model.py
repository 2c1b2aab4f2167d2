"""Keras models built from the backbone table: the frozen feature extractor used by stage 1."""

from __future__ import annotations

from pipeline.backbones.table import Backbone, build
from pipeline.errors import UserError


def feature_model(spec: Backbone, weights: str, image_size: int, pooling: str = "avg",
                  layer: str | None = None):
    """The frozen backbone cut at `layer` (default: its last conv output), pooled avg/max or not.

    Input: preprocessed images of image_size x image_size x 3; output: (N, D) or (N, H, W, C).
    """
    import keras

    base = build(spec, weights, image_size)
    base.trainable = False
    out = base.output
    if layer:
        try:
            out = base.get_layer(layer).output
        except ValueError:
            names = [l.name for l in base.layers]
            raise UserError(f"{spec.name} has no layer {layer!r}; `python cli.py backbones {spec.name} "
                            f"--layers` lists all {len(names)} (last ones: {', '.join(names[-3:])})") from None
    if len(out.shape) == 4 and pooling != "none":
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        out = pool(name=f"features_{pooling}_pool")(out)
    return keras.Model(base.input, out, name=f"{spec.name}_features")
