"""featurecache: two-stage transfer learning with cached backbone features.

Stage 1 (`pipeline.extract`) runs a frozen backbone once over a data set and stores the features
in HDF5 (`pipeline.features.store`); stage 2 trains heads on those arrays; stage 3 fine-tunes the top blocks.
"""

import os

# TensorFlow reads this once, at import: its oneDNN kernels (fused conv+bias+activation, faster
# depthwise convolutions) are off by default on CPUs without AVX-512, and cut the backbone's CPU time
# by about 1.6x there (bench/extract.py). Features change only by float rounding (~1e-6 relative,
# far below float16 storage). An explicit TF_ENABLE_ONEDNN_OPTS=0 still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
