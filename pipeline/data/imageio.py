"""Image decoding, resizing and seeded augmentation as tf.data-friendly TensorFlow ops.

Decoding runs in parallel inside tf.data; an unreadable file is dropped there (never fatal) and the
extractor records it as skipped. Augmentation uses stateless random ops seeded by (seed, view, image)
so an interrupted extraction that resumes produces exactly the same augmented views.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

RESIZE_METHODS = ("stretch", "crop")
AUGMENT_OPS = ("flip", "rotation", "zoom", "brightness", "contrast")


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the random view changes: rotation in fractions of a full turn, zoom and
    brightness/contrast as relative ranges; 0 turns an op off."""

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    def as_dict(self) -> dict:
        return asdict(self)


def file_images(paths: Sequence[str], tags: np.ndarray):
    """tf.data pipeline of (tag, uint8 HxWx3 image) read and decoded in parallel, in order.

    JPEG, PNG, BMP and GIF (first frame); grayscale and RGBA become RGB, CMYK JPEGs too.
    Files that cannot be read or decoded are dropped; the caller notices their missing tags.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(tags, np.int64), list(paths)))
    ds = ds.map(decode_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors()


def batched(ds, batch_size: int):
    """Batch and prefetch a tf.data pipeline; parallel maps keep one call per core, but the
    autotuner is off: with it, tearing an iterator down after its last batch stalled 3-6 s
    (bench/extract.py), for no throughput gain on this kind of pipeline."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE).with_options(options)


def decode_file(tag, path):
    """tf.data map function: (tag, path) -> (tag, uint8 HxWx3 image); raises on unreadable files."""
    import tensorflow as tf

    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return tag, img


def resize(image, size: int, method: str = "stretch"):
    """Resize a uint8 image to size x size float32 (0..255): 'stretch' ignores aspect ratio,
    'crop' scales the shorter side to `size` then takes the centre square."""
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    if method == "stretch":
        out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    elif method == "crop":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_min(shape)
        new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        out = tf.image.resize(image, new, method="bilinear", antialias=True)
        out = tf.image.resize_with_crop_or_pad(out, size, size)
    else:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}")
    return tf.clip_by_value(out, 0.0, 255.0)


def augment(image, seed, cfg: AugmentConfig):
    """Apply one random view (flip, rotation+zoom, brightness, contrast) to a float 0..255 image.

    `seed` is an int32/int64 tensor of shape [2]; the same seed always gives the same view.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    if cfg.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    if cfg.rotation or cfg.zoom:
        angle = tf.random.stateless_uniform([], seeds[1], -cfg.rotation, cfg.rotation) * 2 * math.pi
        zoom = tf.random.stateless_uniform([], seeds[2], 1 - cfg.zoom, 1 + cfg.zoom)
        h = tf.cast(tf.shape(image)[0], tf.float32)
        w = tf.cast(tf.shape(image)[1], tf.float32)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        c, s = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        transform = tf.stack([c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy, 0.0, 0.0])[None]
        image = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
            fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0]
    if cfg.brightness:
        delta = tf.random.stateless_uniform([], seeds[3], -cfg.brightness, cfg.brightness) * 255.0
        image = image + delta
    if cfg.contrast:
        factor = tf.random.stateless_uniform([], seeds[4], 1 - cfg.contrast, 1 + cfg.contrast)
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        image = (image - mean) * factor + mean
    return tf.clip_by_value(image, 0.0, 255.0)
