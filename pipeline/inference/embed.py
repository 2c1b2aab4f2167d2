"""Run a model over arbitrary image files (for `predict` and `evaluate`), through the same loader,
decode, resize and model graph as extraction, on any Keras backend."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline import backbones as bb
from pipeline.backbones.imagenet import decode_top_k
from pipeline.backbones.model import classifier_model
from pipeline.backend import require
from pipeline.data.decode import load_file
from pipeline.data.loader import batches
from pipeline.data.folders import visible_files
from pipeline.errors import UserError
from pipeline.extract import make_runner


OnBatch = Callable[[list[int], np.ndarray], None]  # (positions of the images, their outputs): called per batch done


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Expand files and folders into a sorted list of files. Folders contribute every file that is
    not hidden (at any depth): the decoder decides what is an image and says why it skips the rest,
    exactly as `extract` does."""
    out: list[str] = []
    for item in inputs:
        if not str(item).strip():  # an unset $DIR would otherwise read the whole working folder
            raise UserError("an image argument is empty; give image files or folders")
        p = Path(item).expanduser()
        if p.is_dir():
            out += sorted(map(str, visible_files(p)))  # as extract lists a class folder: links followed
        elif p.is_file():
            if p.suffix.lower() in (".txt", ".lst", ".csv", ".tsv"):  # a list of images, most likely
                raise UserError(f"{item} looks like a list of images, but predict takes image files and folders; "
                                f"pass the paths themselves, e.g. xargs -d '\\n' python cli.py predict --run ID < {item}")
            out.append(str(p))
        elif p.exists():  # a FIFO or device would block or never end; a socket cannot be read
            raise UserError(f"{item} is not a regular file (a pipe, device or socket); give image files or folders")
        elif p.is_symlink():
            raise UserError(f"{item} is a symbolic link that leads nowhere (a loop, or its target is gone)")
        else:
            raise UserError(f"image not found: {item}")
    if not out:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return out


def image_batches(paths: Sequence[str], size: int, resize: str, batch_size: int = 32,
                  workers: int | None = None) -> Iterator:
    """`loader.Batch`es of uint8 images (tags = positions in `paths`), decoded in parallel, in order."""
    jobs = ((i, functools.partial(load_file, p, size, resize)) for i, p in enumerate(paths))
    return batches(jobs, batch_size, (size, size, 3), workers)


def map_files(fn: Callable[[np.ndarray], np.ndarray], paths: Sequence[str], size: int, resize: str,
              batch_size: int = 32, on_batch: OnBatch | None = None) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """`fn` (uint8 image batches -> output rows) over every readable image, decoded and resized as
    extraction does: (outputs, kept positions, [(skipped path, reason)]); UserError when none reads.
    `on_batch(positions, outputs)` as each batch is done (predict prints as it goes). The one loop
    behind `predict`/`evaluate` of a run and `predict --model` of an export."""
    outs, kept, skipped = [], [], []
    for batch in image_batches(paths, size, resize, batch_size):
        skipped += [(paths[t], reason) for t, reason in batch.skipped]
        if batch.tags.size:
            outs.append(np.asarray(fn(batch.images)))
            kept += batch.tags.tolist()
            if on_batch is not None:
                on_batch(batch.tags.tolist(), outs[-1])
    if not outs:
        raise UserError(f"none of the {len(paths)} file(s) could be read as an image"
                        + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    return np.concatenate(outs), kept, skipped


def run_model(model, paths: Sequence[str], size: int, resize: str, batch_size: int = 32,
              then: Callable[[np.ndarray], np.ndarray] | None = None, on_batch: OnBatch | None = None
              ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """A Keras model's outputs for every readable image (`map_files` through extraction's runner),
    passed through `then` batch by batch where given (a head on the backbone's features)."""
    runner = make_runner(model, size, batch_size)
    fn = runner if then is None else (lambda images: then(runner(images)))
    return map_files(fn, paths, size, resize, batch_size, on_batch)


def imagenet_top_k(backbone: str, weights: str, paths: Sequence[str], k: int = 5, resize: str = "crop",
                   batch_size: int = 16) -> tuple[list[tuple[str, list[tuple[int, str, float]]]], list[tuple[str, str]]]:
    """The backbone's own ImageNet top-k for each image: a quick check that weights loaded right."""
    spec = bb.get(backbone)
    if weights.lower() == "none":
        raise UserError("ImageNet predictions need trained weights: use --weights imagenet or a weights file")
    require()
    model = classifier_model(spec, weights)
    if int(model.output.shape[-1]) != 1000:
        raise UserError(f"{spec.name} with these weights has no 1000-class ImageNet top")
    probs, kept, skipped = run_model(model, paths, spec.default_size, resize, batch_size)
    return [(paths[i], top) for i, top in zip(kept, decode_top_k(probs, k))], skipped
