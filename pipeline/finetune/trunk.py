"""Fine-tuning on a cached trunk: the frozen part of the backbone runs once per image and view.

Only the top blocks train, so everything below the lowest unfrozen block (the "trunk") computes
the same thing every epoch for the same input. Instead of running it again each epoch, stage 1's
own extraction caches its output (`--layer <cut> --pooling none`, the clean image plus K seeded
augmented views of every training image), and training runs only the top of the model on those
maps: on 2 CPU cores an epoch of flowers drops from about 130 s to about 30 s, and the trunk cache
is an ordinary cache entry (resumable, a hit next time).

    image -> cast -> preprocessing -> trunk (frozen, cut at the block boundary) -> top -> probabilities
                                      `--------- cached once per view ----------'   trains

`plan_trunk` decides whether a run can train this way (whole blocks unfrozen, room on the disk),
`trunk_maps` extracts or finds the trunk cache and maps the split onto its rows, `split_at` builds
both halves from the fine-tune model so they share its layers, and `assemble` puts them back into
one image-in model for `model.keras`, predict and export.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import backbones
from pipeline.backbones.model import backbone_cut, preprocessed_input
from pipeline.data.augment import AugmentConfig
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, plan, release_models
from pipeline.features.store import FeatureFile, chunk_files, is_complete
from pipeline.finetune.model import unfrozen_blocks
from pipeline.heads.streaming import default_memory_budget_mb


def cut_layer(spec: backbones.Backbone, layer_names: list[str], unfreeze: Sequence[str]) -> str | None:
    """The backbone layer whose output feeds the lowest unfrozen block (None: nothing to cut, e.g.
    head-only training)."""
    spans = backbones.block_spans(spec, layer_names)
    starts = [spans[b][0] for b in unfreeze if b in spans]
    if not starts or min(starts) < 1:
        return None
    return layer_names[min(starts) - 1]


def trunk_request(request: ExtractRequest, cut: str, views: int, augment, seed: int) -> ExtractRequest:
    """Stage 1's request for the trunk cache: the same images, backbone, size, resize and storage
    dtype (float32 where stage 1 needed it: random-init maps underflow float16, which extract
    refuses), cut at `cut` without pooling, with `views` augmented copies of every training image."""
    copies = int(views) if augment is not None else 0
    return dataclasses.replace(request, layer=cut, pooling="none", dtype=request.dtype, augment_copies=copies,
                               augment_seed=int(seed), augment=augment if augment is not None else AugmentConfig())


def split_at(model, cut: str) -> tuple[Any, Any]:
    """(trunk, top) of a fine-tune model (`build_finetune_model`): the backbone up to `cut`, and
    `cut`'s output -> rest of the backbone -> pooling -> head. Both share the model's layers."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    backbone = model.get_layer("backbone")
    cut_tensor = backbone.get_layer(cut).output
    trunk = keras.Model(backbone.input, cut_tensor, name="trunk")
    try:
        rest = keras.Model(cut_tensor, backbone.output, name="backbone_top")
    except ValueError as exc:  # a layer above the cut reads from below it (a skip connection)
        raise UserError(f"cannot cut {backbone.name} at {cut}: {str(exc).splitlines()[0][:120]}") from None
    inp = keras.Input(tuple(int(d) for d in cut_tensor.shape[1:]), name="trunk_features")
    x = rest(inp)
    i = [layer.name for layer in model.layers].index("backbone")
    for layer in model.layers[i + 1:]:  # pooling (as the cache), then the head
        x = layer(x)
    return trunk, keras.Model(inp, x, name="top")


def assemble(spec: backbones.Backbone, size: int, trunk, top):
    """One model, uint8 images in, probabilities out: preprocessing -> trunk -> top."""
    import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

    inputs, x = preprocessed_input(spec, size)
    return keras.Model(inputs, top(trunk(x, training=False)), name=f"finetune_{spec.slug}")


def no_trunk_error(why: str) -> UserError:
    """The refusal of an explicit --trunk-cache that cannot be served, and the way out."""
    return UserError(f"no trunk cache: {why}; drop --trunk-cache to train on the images")


def no_trunk_reason(spec: backbones.Backbone, unfreeze_last: int | None) -> str | None:
    """Why no trunk cache can serve these settings whatever the data (None: one may); `FineTuner.check_params`
    refuses an explicit --trunk-cache for it before a run is recorded."""
    if unfreeze_last:
        return "the trunk cache needs whole blocks (--unfreeze), not --unfreeze-last"
    if spec.family == backbones.hub.FAMILY:
        return "a keras-hub preset keeps its blocks inside one layer, so there is no cut to cache below"
    return None


def plan_trunk(request: ExtractRequest, spec: backbones.Backbone, size: int, n_images: int, cache_dir: Path,
               say: Callable[[str], None], *, trunk_cache: bool | None, unfreeze: Sequence[str] | None,
               unfreeze_last: int | None, views: int, augment, seed: int) -> tuple[str, ExtractRequest] | None:
    """(cut layer, the trunk cache's request) when training can run on cached trunk maps
    (this module), else None (then every epoch runs the whole backbone on the images)."""
    def skip(why: str) -> None:
        if trunk_cache:  # asked for explicitly
            raise no_trunk_error(why)
        say(f"{why}: training on the images instead (slower)")

    if trunk_cache is False:
        return None
    why = no_trunk_reason(spec, unfreeze_last)
    if why:
        return skip(why)
    backbone = backbone_cut(spec, "none", size, request.layer)  # layer names and shapes only
    names = [layer.name for layer in backbone.layers]
    cut = cut_layer(spec, names, unfrozen_blocks(spec, names, unfreeze, unfreeze_last))
    if cut is None:
        return None  # head only: nothing below to cache
    treq = trunk_request(request, cut, int(views), augment, int(seed))
    target = plan(treq, cache_dir)
    if is_complete(target.path):
        return cut, treq
    shape = backbone.get_layer(cut).output.shape[1:]
    need = np.dtype(treq.dtype).itemsize * int(np.prod(shape)) * n_images * (1 + int(views))
    need -= sum(f.stat().st_size for f in chunk_files(target.parts))  # what a half-built trunk cache holds
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if need > free // 2:
        return skip(f"the trunk cache would take {need / 1e9:.1f} GB of the {free / 1e9:.1f} GB free in {cache_dir}")
    return cut, treq


def trunk_maps(trunk_req: ExtractRequest, listing, parts: Mapping[str, np.ndarray], cache_dir: Path, progress: bool,
               say: Callable[[str], None], batch_size: int) -> dict[str, Any]:
    """Extract (or find) the trunk cache and map the split onto its rows: {file, data (in memory
    when it fits a quarter of RAM, else the FeatureFile), labels, train_rows(epoch), val_rows,
    train_idx (the training images the cache holds)}."""
    res = extract(trunk_req, RunOptions(cache_dir=cache_dir, progress=progress, batch_size=int(batch_size)),
                  log=say)
    release_models()  # the trunk model is not needed while training: free its memory
    say(("trunk cache hit: " if res.cache_hit else "trunk cache: ") + str(res.path))
    ff = FeatureFile(res.path)
    try:
        ids = np.asarray(listing.ids, dtype=object)
        row_of = {(p, int(v)): r for r, (p, v) in enumerate(zip(ff.paths, ff.views.tolist()))}
        n_views = 1 + int(ff.views.max(initial=0))
        train = [i for i in parts["train"].tolist() if (str(ids[i]), 0) in row_of]
        if len(train) < parts["train"].size:
            say(f"{parts['train'].size - len(train)} training image(s) could not be read; training without them")
        by_view = [np.asarray([row_of.get((str(ids[i]), v), row_of[(str(ids[i]), 0)]) for i in train], np.int64)
                   for v in range(n_views)]
        val_rows = np.asarray([row_of[(str(ids[i]), 0)] for i in parts["val"].tolist()
                               if (str(ids[i]), 0) in row_of], np.int64)
        budget = default_memory_budget_mb() * 1e6
        stored = ff.features.dtype  # float16, or float32 as stage 1 was extracted
        if ff.features.size * stored.itemsize <= budget:
            data = ff.load(None, dtype=stored)
        else:
            say(f"the trunk cache ({ff.features.size * stored.itemsize / 1e9:.1f} GB) exceeds the memory budget; "
                f"reading batches from disk")
            data = ff
        return {"file": ff, "data": data, "labels": np.asarray(ff.labels), "val_rows": val_rows,
                "train_rows": lambda epoch: by_view[int(epoch) % n_views],
                "train_idx": np.asarray(train, np.int64)}
    except BaseException:
        ff.close()
        raise
