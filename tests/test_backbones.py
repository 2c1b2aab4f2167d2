"""The backbone table: names, sizes, preprocessing and fine-tuning blocks resolve on real models."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline import backbones as bb
from pipeline.errors import UserError


def test_table_rows_are_complete():
    assert len(bb.TABLE) >= 40
    sizes = [bb.get(f"efficientnetb{i}").default_size for i in range(8)]
    assert sizes == [224, 240, 260, 300, 380, 456, 528, 600]
    for spec in bb.TABLE.values():
        assert spec.blocks and spec.preprocess in bb.PREPROCESS and spec.min_size <= spec.default_size
    assert bb.get("VGG16").name == "vgg16" and bb.get("efficientnet-lite0").name == "efficientnet_lite0"
    with pytest.raises(UserError, match="unknown backbone"):
        bb.get("alexnet")


@pytest.mark.parametrize("name, size, top, must_contain", [
    ("vgg16", 32, "block5", "block5_conv1"),
    ("resnet50", 32, "conv5", "conv5_block3_out"),
    ("inceptionv3", 75, "mixed10", "mixed10"),
    ("mobilenetv2", 32, "block_16", "block_16_project"),
    ("efficientnetb0", 32, "block7", "block7a_project_conv"),
    ("densenet121", 32, "conv5", "conv5_block16_concat"),
    ("convnexttiny", 32, "stage_3", "convnext_tiny_stage_3_block_2_depthwise_conv"),
    ("efficientnet_lite0", 32, "block6", "block6d_project_conv"),
])
def test_top_blocks_resolve_to_the_right_layers(name, size, top, must_contain):
    spec = bb.get(name)
    model = bb.build(spec, "none", size)
    names = [l.name for l in model.layers]
    spans = bb.block_spans(spec, names)
    assert [n for n, _ in spec.blocks][: len(spans)] == list(spans)  # every block found, in order
    lo, hi = spans[top]
    assert must_contain in names[lo:hi]
    ordered = list(spans.values())
    assert ordered[0][1] == len(names)  # the topmost block runs to the end of the model
    for upper, lower in zip(ordered, ordered[1:]):
        assert lower[1] == upper[0] and lower[0] < lower[1]  # blocks tile the top without gaps
    keras.backend.clear_session()


def _prep(name: str, x: np.ndarray) -> np.ndarray:
    from pipeline.backbones.preprocessing import cast_layer, preprocessing_layers
    y = cast_layer()(x)
    for layer in preprocessing_layers(bb.get(name).preprocess):
        y = layer(y)
    return np.asarray(y)


def test_preprocessing_styles_differ_as_documented():
    x = np.full((1, 4, 4, 3), 255, np.uint8)  # the graphs take uint8 pixels
    assert np.allclose(_prep("mobilenetv2", x), 1.0)  # 'tf': [-1, 1]
    caffe = _prep("vgg16", x)
    assert np.allclose(caffe[..., 0], 255 - 103.939, atol=1e-3)  # 'caffe': BGR minus the mean
    assert np.allclose(_prep("efficientnetb0", x), 255.0)  # 'in-model': the model rescales itself
    assert np.allclose(_prep("efficientnet_lite0", x), 1.0)  # 'lite': (x - 127) / 128


def test_a_run_on_a_weights_file_records_where_it_is_now_and_refuses_other_content(tmp_path):
    """A weights file moved since its cache was made is a cache hit (the key hashes its content): the
    run recorded the old path, so predict and evaluate failed. A file overwritten with other weights
    made predict answer with confidence from other features, silently."""
    import os
    import re
    import shutil

    from conftest import make_folder, run_cli

    def save(path, seed):
        keras.utils.set_random_seed(seed)
        keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)

    data = make_folder(tmp_path / "d", per_class=4)
    first, moved = tmp_path / "w" / "a.weights.h5", tmp_path / "w" / "b.weights.h5"
    first.parent.mkdir()
    save(first, 0)
    args = ["fit-head", "--data", str(data), "--backbone", "mobilenetv2", "--image-size", "32", "--dtype", "float32",
            "--head", "logistic", "--C", "1", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert run_cli(*args, "--weights", str(first)).returncode == 0
    shutil.move(first, moved)
    from pipeline.extract import ExtractRequest  # a relative path is recorded absolute, as run from anywhere
    assert ExtractRequest(data=str(data), backbone="mobilenetv2", weights=os.path.relpath(moved)).weights == str(moved)
    hit = run_cli(*args, "--weights", str(moved))
    assert hit.returncode == 0 and "cache hit" in hit.stdout, hit.stderr
    run_id = re.search(r"run (\S+) saved in", hit.stdout).group(1)
    image = str(next(data.rglob("*.jpg")))
    ok = run_cli("predict", "--run", run_id, image, "--cache-dir", str(tmp_path / "c"))
    assert ok.returncode == 0, ok.stderr
    save(moved, 1)  # same path, other weights
    for command in (["predict", "--run", run_id, image], ["evaluate", "--run", run_id, "--data", str(data)],
                    ["finetune", "--run", run_id, "--epochs", "1"]):
        refused = run_cli(*command, "--cache-dir", str(tmp_path / "c"))
        assert refused.returncode == 2 and f"is not the weights file {'head ' * (command[0] == 'finetune')}run " \
            f"{run_id} was fitted on" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    moved.unlink()
    gone = run_cli("predict", "--run", run_id, image, "--cache-dir", str(tmp_path / "c"))
    assert gone.returncode == 2 and "which is gone; put the file back" in gone.stderr, gone.stderr


def test_a_weights_file_of_another_model_says_why_in_one_line_without_keras_warnings(tmp_path):
    """Keras' reason comes on the line after 'Example error message for object <Conv2D ...>:', which
    the error ended with; its per-layer UserWarnings printed before it."""
    import warnings

    other = tmp_path / "alpha05.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.5).save_weights(other)
    with warnings.catch_warnings(record=True) as said, pytest.raises(UserError) as err:
        warnings.simplefilter("always")
        bb.build(bb.get("mobilenetv2"), str(other), 32)
    text = str(err.value)
    assert text.startswith(f"could not load weights file {other} into mobilenetv2") and "shape" in text, text
    assert not text.endswith(":") and "\n" not in text and not said, [str(w.message) for w in said]
