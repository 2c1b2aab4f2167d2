"""Backbones: the table of supported CNNs (`table`), their preprocessing (`preprocessing`), the
frozen feature graph (`model`), EfficientNet-Lite with offline weights (`lite`, `lite_weights`,
`torchfile`), keras-hub presets (`hub`) and ImageNet class names (`imagenet`)."""

from pipeline.backbones.table import (DEFAULT_BACKBONE, PREPROCESS, TABLE, Backbone,  # noqa: F401
                                      block_spans, build, check_output, check_weights_file, get,
                                      weights_identity)
from pipeline.backbones.hub import nested_blocks, train_blocks  # noqa: F401
