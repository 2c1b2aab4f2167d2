"""Run a backbone over arbitrary image files (for `predict` and `evaluate`), with the same decode,
resize and preprocessing as extraction, batched through tf.data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Expand files and folders (recursively, image suffixes only, sorted) into a list of paths."""
    out: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                          and not f.name.startswith("."))
        elif p.is_file():
            out.append(str(p))
        else:
            raise UserError(f"image not found: {item}")
    if not out:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return out


def image_batches(paths: Sequence[str], size: int, resize: str, preprocess: Callable | None,
                  batch_size: int = 32) -> Iterator[tuple[np.ndarray, object]]:
    """Yield (positions into `paths`, preprocessed batch); unreadable files never appear."""
    import tensorflow as tf
    from pipeline.data.imageio import batched, file_images, resize as resize_op

    def work(tag, img):
        x = resize_op(img, size, resize)
        return tag, (preprocess(x) if preprocess is not None else x)

    ds = file_images(list(paths), np.arange(len(paths), dtype=np.int64))
    ds = ds.map(work, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for tags, x in batched(ds, batch_size):
        yield tags.numpy(), x


def run_model(model, paths: Sequence[str], size: int, resize: str, preprocess: Callable | None,
              batch_size: int = 32) -> tuple[np.ndarray, list[int], list[str]]:
    """Model outputs for every readable image: (outputs, kept positions, skipped paths)."""
    import tensorflow as tf
    from pipeline.extract.core import inference_fn

    infer = inference_fn(model, size, jit=bool(tf.config.list_physical_devices("GPU")))
    outs, kept = [], []
    for tags, x in image_batches(paths, size, resize, preprocess, batch_size):
        outs.append(np.asarray(infer(x), np.float32))
        kept += tags.tolist()
    seen = set(kept)
    skipped = [p for i, p in enumerate(paths) if i not in seen]
    if not outs:
        raise UserError(f"none of the {len(paths)} image(s) could be read")
    return np.concatenate(outs), kept, skipped


def imagenet_top_k(backbone: str, weights: str, paths: Sequence[str], k: int = 5, resize: str = "crop",
                   batch_size: int = 16) -> tuple[list[tuple[str, list[tuple[int, str, float]]]], list[str]]:
    """The backbone's own ImageNet top-k for each image: a quick check that weights loaded right."""
    from pipeline import backbones as bb
    from pipeline.backbones.imagenet import decode_top_k

    spec = bb.get(backbone)
    if weights.lower() == "none":
        raise UserError("ImageNet predictions need trained weights: use --weights imagenet or a weights file")
    model = bb.build(spec, weights, spec.default_size, include_top=True)
    if int(model.output.shape[-1]) != 1000:
        raise UserError(f"{spec.name} with these weights has no 1000-class ImageNet top")
    probs, kept, skipped = run_model(model, paths, spec.default_size, resize, spec.preprocess_fn(), batch_size)
    return [(paths[i], top) for i, top in zip(kept, decode_top_k(probs, k))], skipped
