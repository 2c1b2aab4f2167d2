"""Backbones: the table of supported CNNs (`table`), their preprocessing (`preprocessing`), the
frozen feature graph (`model`), EfficientNet-Lite with offline weights (`lite`, `lite_weights`,
`torchfile`) and ImageNet class names (`imagenet`)."""

from pipeline.backbones.table import (PREPROCESS, TABLE, Backbone, _resolve, block_spans, build,  # noqa: F401
                                      get, weights_identity)
