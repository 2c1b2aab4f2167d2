"""Fine-tuning's model: the extraction graph rebuilt with the fitted head on top, and what trains.

The model is rebuilt exactly as the cache was made (backbone, weights, image size, resize,
preprocessing, layer cut and pooling, all read from the cache's `ExtractRequest`) with the fitted
head on top, so before any training it predicts what the head predicted on cached features:

    image (uint8 0..255, size x size x 3) -> image_to_float
      -> preprocessing (`pipeline.backbones.preprocessing`: the same layers as extraction)
      -> backbone (a nested model named "backbone", called with training=False)
      -> [global avg/max pooling, as the cache]
      -> head (a nested model named "head": the head's own Keras form, `head.keras_head`)

Only built-in Keras layers are used, so `model.keras` loads with plain `keras.models.load_model`
without importing this package.

Batch normalization: in Keras 3 a nested functional model called with `training=False` still
receives the OUTER call's `training=True` during `fit` (the graph replay overrides the stored
argument), so `training=False` alone does not keep BatchNorm in inference mode. What does is that
every BatchNormalization layer is frozen (`trainable=False`; Keras 3 runs a frozen BN layer in
inference mode), which `build_finetune_model` and `set_trainable` always ensure; it is saved with
the model. Dropout layers inside a backbone (EfficientNet's stochastic depth) stay active while
training, as usual.
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline import backbones
from pipeline.backbones.model import image_graph
from pipeline.backend import keras_module
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, is_concat, part_requests


def build_finetune_model(request: ExtractRequest, head):
    """The end-to-end model: raw uint8 RGB images in, class probabilities out (the extraction graph
    of `pipeline.backbones.model` with the head added; training augments in the input path).

    The backbone is rebuilt from `request` (the cache's request) and frozen, BatchNorm included;
    the head layers carry the head's fitted weights and are trainable. Its predictions equal
    `head.predict_proba` on features of the same images. Layers
    are created under the current Keras dtype policy (set mixed_float16 around the call for mixed
    precision); augmentation, preprocessing and head always compute in float32/float64.
    """
    keras = keras_module()
    spec = backbones.get(request.backbone)
    size = spec.resolve_size(request.image_size)
    inputs, x = image_graph(spec, request.weights, size, request.pooling, request.layer)
    head_model = head.keras_head(tuple(int(d) for d in x.shape[1:]), spec.name)
    out = head_model(x)
    model = keras.Model(inputs, out, name=f"finetune_{spec.slug}")
    _freeze_batchnorm(model)
    return model


def build_inference_model(request: ExtractRequest, head):
    """A fit-head run as one image-in model: `build_finetune_model`, or for a concatenation 'a+b'
    every backbone's extraction graph on the same uint8 input, their pooled features joined in the
    cache's order, then the head (one input size: the parts must resize to the same pixels)."""
    if not is_concat(request.backbone):
        return build_finetune_model(request, head)
    keras = keras_module()
    parts = part_requests(request)
    specs = [backbones.get(r.backbone) for r in parts]
    sizes = [spec.resolve_size(r.image_size) for spec, r in zip(specs, parts)]
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{spec.name} {size}" for spec, size in zip(specs, sizes))
        raise UserError(f"one model takes one image size, but these backbones take different ones ({shown} "
                        f"pixels); fit the head on caches extracted with one --image-size to export it")
    image = keras.Input((sizes[0], sizes[0], 3), dtype="uint8", name="image")
    joined = []
    for spec, r in zip(specs, parts):
        tower_in, x = image_graph(spec, r.weights, sizes[0], r.pooling, r.layer)
        joined.append(keras.Model(tower_in, x, name=f"tower_{spec.slug}")(image))
    x = keras.layers.Concatenate(name="joined_features")(joined)
    out = head.keras_head((int(x.shape[-1]),), "+".join(spec.name for spec in specs))(x)
    model = keras.Model(image, out, name="joined_" + "_".join(spec.slug for spec in specs))
    _freeze_batchnorm(model)
    return model


# --------------------------------------------------------------------------------- trainability
def leaf_layers(model: Any) -> list:
    """Every non-container layer of `model`, nested models walked through, in order."""
    keras = keras_module()
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _freeze_batchnorm(model) -> None:
    keras = keras_module()
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def trainable_layer_names(model) -> list[str]:
    """Names of the layers whose weights training will change (trainable, with trainable weights)."""
    return [layer.name for layer in leaf_layers(model) if layer.trainable and layer.trainable_weights]


def check_blocks(spec: backbones.Backbone, unfreeze: Sequence[str], present: Sequence[str] | None = None) -> None:
    """UserError naming the valid blocks when `unfreeze` holds a name that is not one of `spec`'s
    fine-tunable top blocks (`present`: those found in a model, which a trunk cut may have removed)."""
    valid = [name for name, _ in spec.blocks] if present is None else list(present)
    unknown = [b for b in unfreeze if b not in valid]
    if unknown:
        listed = ", ".join(valid) or ("none (the cut removed them)" if present is not None else "none")
        raise UserError(f"{spec.name} has no fine-tunable block {unknown[0]!r}; its top blocks are: {listed} "
                        f"(or --unfreeze-last N to train the last N layers instead)")


def set_trainable(model, spec: backbones.Backbone, unfreeze: Sequence[str] = (),
                  unfreeze_last: int | None = None) -> list[str]:
    """Choose what trains: the head, plus whole top blocks of the backbone and/or its last N layers.

    `unfreeze`: block names from `spec.blocks` (e.g. ['block5'] for VGG16, ['top', 'block7'] for
    EfficientNet); an unknown name raises UserError listing the valid ones. `unfreeze_last`: the
    last N layers of the backbone (in model order, weightless ones counted, as in
    `base.layers[-N:]`). BatchNormalization layers always stay frozen (so they run in inference
    mode), the preprocessing layers too; the head is trainable, except the layers its Keras form built
    frozen (a knn head's stored training matrix and labels). Returns the names of the layers
    training will change. Recompile the model after calling this.
    """
    keras = keras_module()
    unfreeze = (unfreeze,) if isinstance(unfreeze, str) else tuple(unfreeze)
    backbone = model.get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in backbone.layers]
    spans = backbones.block_spans(spec, names)
    nested = backbones.nested_blocks(backbone)  # a keras-hub tower's transformer blocks (else none)
    check_blocks(spec, unfreeze, present=list(spans) + list(nested))
    if unfreeze_last is not None and int(unfreeze_last) < 0:
        raise UserError(f"unfreeze_last must be 0 or more, not {unfreeze_last}")
    if unfreeze_last and int(unfreeze_last) > len(layers):
        raise UserError(f"--unfreeze-last {unfreeze_last} is more than the {len(layers)} layers {spec.name}'s backbone "
                        f"has here; give at most {len(layers)} (or name blocks with --unfreeze)")
    chosen: set[int] = set()
    for block in unfreeze:
        if block in spans:
            chosen.update(range(*spans[block]))
    if unfreeze_last:
        chosen.update(names.index(layer.name) for layer in layers[-int(unfreeze_last):])
    heads = [layer for layer in model.layers if layer.name == "head" and isinstance(layer, keras.Model)]
    fixed = [layer for head in heads for layer in leaf_layers(head) if not layer.trainable]  # e.g. a knn head's memory
    model.trainable = True  # propagates to every layer; then freeze what must not train
    for layer in fixed:
        layer.trainable = False
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i in chosen
    deep = [nested[block] for block in unfreeze if block in nested]
    if deep:
        backbones.train_blocks(backbone, deep + [backbone.layers[i] for i in chosen])
    for layer in model.layers:
        if layer.name.startswith("preprocess_"):
            layer.trainable = False
    _freeze_batchnorm(model)
    if unfreeze_last and not unfreeze and not any(backbone.layers[i].trainable_weights for i in chosen):
        # the last N were weightless or BatchNormalization: nothing of the backbone would train, silently
        with_weights = [n for n, layer in enumerate(reversed(layers), 1)
                        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
        least = with_weights[0] if with_weights else len(layers)
        raise UserError(f"--unfreeze-last {unfreeze_last} takes {spec.name}'s last {unfreeze_last} layer(s), which "
                        f"have no weights that train (pooling, activations, BatchNormalization stays frozen); give "
                        f"--unfreeze-last {least} or more, or name a block with --unfreeze")
    return trainable_layer_names(model)


def check_has_blocks(spec: backbones.Backbone, unfreeze_last: int | None) -> None:
    """A backbone with no listed top blocks (a keras-hub preset) fine-tunes only by --unfreeze-last."""
    if not spec.blocks and not unfreeze_last:
        raise UserError(f"{spec.name} lists no fine-tunable top blocks (a keras-hub CNN preset); "
                        f"--unfreeze-last 1 trains its whole tower")


def unfrozen_blocks(spec: backbones.Backbone, layer_names: list[str], unfreeze: Sequence[str] | None,
                    unfreeze_last: int | None) -> tuple[str, ...]:
    """The blocks to unfreeze: `unfreeze` as given; none where only `unfreeze_last` is (the last N layers
    alone: with the default top block beside them, a small N changed nothing); else the table's
    `finetune_blocks` topmost blocks."""
    check_has_blocks(spec, unfreeze_last)
    if unfreeze is not None:
        return tuple(unfreeze)
    if unfreeze_last:
        return ()
    present = [*backbones.block_spans(spec, layer_names), *(n for n, start in spec.blocks if start.startswith(
        backbones.hub.NESTED))]
    return tuple(present[:max(1, int(spec.finetune_blocks))])
