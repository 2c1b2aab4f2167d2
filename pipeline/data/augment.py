"""Seeded augmentation of resized uint8 images, in numpy/OpenCV (no TensorFlow).

Each view is drawn from a generator seeded by (seed, view, image index), so the same view of the
same image is identical in every run, after a resume, and in any worker process or machine.
Extraction's cached views use `name_index(id)` as the index: a view then follows its image, not its
position in the listing, and an incremental cache can copy it (`features/reuse.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from pipeline.errors import UserError

AUGMENT_OPS = ("flip", "rotation", "zoom", "brightness", "contrast")
# the largest strength each op can take and what it is measured in: a rotation past half a turn
# repeats, a zoom range of 1 reaches a zero-size view, brightness and contrast past 1 only clip
_LIMITS = {"rotation": (0.5, "a fraction of a full turn: 0.05 is +-18 degrees"),
           "zoom": (0.9, "a relative range: 0.1 is 90% to 110%"),
           "brightness": (1.0, "a relative range"), "contrast": (1.0, "a relative range")}


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the random view changes: rotation in fractions of a full turn, zoom and
    brightness/contrast as relative ranges; 0 turns an op off."""

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        for name, (top, unit) in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= float(value) <= top:  # NaN fails too
                raise UserError(f"augmentation {name} must be between 0 and {top} ({unit}), not {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def ops_spec(self) -> str:
        """The `--augment-ops` value that asks for this config ('flip,rotation=0.05,...'; ops at 0 left out)."""
        return ",".join(name if name == "flip" else f"{name}={value:g}"
                        for name, value in self.as_dict().items() if value)


def augment(image: np.ndarray, cfg: AugmentConfig, seed: int, view: int, index: int) -> np.ndarray:
    """One random view of a uint8 (H, W, 3) image: flip, rotation + zoom (reflected borders),
    brightness, contrast; returns uint8. Deterministic in (seed, view, index)."""
    import cv2  # noqa: PLC0415 - OpenCV loads on first use: a cache hit never augments

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(view), int(index)])
    draws = rng.random(5)  # always five draws, so turning one op off does not move the others
    x = image.astype(np.float32)
    if cfg.flip and draws[0] < 0.5:
        x = x[:, ::-1]
    if cfg.rotation or cfg.zoom:
        angle = (draws[1] * 2 - 1) * cfg.rotation * 360.0
        zoom = 1 + (draws[2] * 2 - 1) * cfg.zoom
        h, w = x.shape[:2]
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
        x = cv2.warpAffine(np.ascontiguousarray(x), m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
    if cfg.brightness:
        x = x + (draws[3] * 2 - 1) * cfg.brightness * 255.0
    if cfg.contrast:
        factor = 1 + (draws[4] * 2 - 1) * cfg.contrast
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * factor + mean
    return np.clip(np.round(x), 0, 255).astype(np.uint8)



def name_index(item_id: str) -> int:
    """A stable 64-bit index for an image's id (its path in the listing): the seed of its cached views."""
    return int.from_bytes(hashlib.blake2b(str(item_id).encode(), digest_size=8).digest(), "little")


def augmented_view(job: Callable[[], np.ndarray], cfg: AugmentConfig, seed: int, view: int, index: int) -> np.ndarray:
    """Run a loader job (read + decode + resize), then `augment` its image: how extraction's
    augmented copies and fine-tuning's per-epoch views (view = epoch + 1) are made."""
    return augment(job(), cfg, seed, view, index)
