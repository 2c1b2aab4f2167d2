"""keras-hub backbones (`--backbone hub:PRESET`), tested offline with a tiny ViT preset saved to a
local folder with random weights (keras-hub's named presets download their weights, which this
machine cannot)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder, run_cli
from pipeline import backbones
from pipeline.backbones import hub
from pipeline.errors import UserError

keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is not installed: pip install -e '.[hub]'")


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    """A 2-layer ViT on 32x32 inputs (17 tokens: the class token and 4x4 patches), scaled to [-1, 1]."""
    folder = tmp_path_factory.mktemp("hub") / "tiny_vit"
    import keras
    keras.utils.set_random_seed(1)
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                 mlp_dim=32).save_to_preset(str(folder))
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0).save_to_preset(str(folder))
    return folder


def test_a_preset_folder_is_a_row_read_from_its_files(preset, tmp_path, monkeypatch):
    spec = backbones.get(f"hub:{preset}")
    assert spec.family == "keras-hub" and spec.default_size == 32 and spec.preprocess == "in-model"
    assert spec.slug.startswith("hub_") and "/" not in spec.slug
    monkeypatch.chdir(preset.parent)
    assert hub.qualified("hub:./tiny_vit") == f"hub:{preset}"  # runs record the absolute path
    assert hub.qualified("vgg16") == "vgg16"
    # the cache key follows the preset's files: another folder with other weights is another key
    before = backbones.weights_identity(spec, "imagenet")
    assert before != backbones.weights_identity(spec, "none")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in preset.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert backbones.weights_identity(backbones.get(f"hub:{copy}"), "imagenet") == before
    weights = copy / "model.weights.h5"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert backbones.weights_identity(backbones.get(f"hub:{copy}"), "imagenet") != before


@pytest.mark.parametrize("name, fragment", [
    ("hub:", "needs a keras-hub preset name or a local preset folder"),
    ("hub:./no_such_folder", "is not a keras-hub preset folder"),
])
def test_bad_preset_names_are_one_line(name, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(fragment)):
        backbones.get(name)


def test_outputs_a_backbone_cannot_give_are_refused(preset, tmp_path):
    vit = backbones.get(f"hub:{preset}")
    with pytest.raises(UserError, match="--layer is not supported for keras-hub"):
        backbones.check_output(vit, "avg", "vit_encoder")
    with pytest.raises(UserError, match="--pooling cls takes a transformer's class token; vgg16"):
        backbones.check_output(backbones.get("vgg16"), "cls", None)
    backbones.check_output(vit, "cls", None)
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    with pytest.raises(UserError, match="imagenet .the preset's own weights. or none"):
        backbones.weights_identity(vit, str(weights))


def test_the_graph_scales_pixels_as_the_preset_says_and_pools_tokens(preset):
    """uint8 in, the converter's scale and offset inside, then cls = token 0, avg = the tokens' mean."""
    import keras

    from pipeline.backbones.model import feature_model
    spec = backbones.get(f"hub:{preset}")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tower = keras_hub.models.Backbone.from_preset(str(preset))
    tokens = keras.ops.convert_to_numpy(tower(images.astype("float32") / 127.5 - 1.0))
    assert tokens.shape == (3, 17, 16)
    cls = keras.ops.convert_to_numpy(feature_model(spec, "imagenet", 32, pooling="cls")(images))
    avg = keras.ops.convert_to_numpy(feature_model(spec, "imagenet", 32, pooling="avg")(images))
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-5)
    np.testing.assert_allclose(avg, tokens.mean(axis=1), atol=1e-5)
    none = keras.ops.convert_to_numpy(feature_model(spec, "none", 32, pooling="cls")(images))
    assert np.abs(none - cls).max() > 1e-3  # --weights none: seeded random weights, not the preset's


def test_a_hub_preset_through_every_stage(preset, tmp_path):
    data = make_folder(tmp_path / "d", per_class=8)
    cache = str(tmp_path / "c")
    common = ("--data", str(data), "--backbone", f"hub:{preset}", "--dtype", "float32", "--cache-dir", cache)
    fit = run_cli("fit-head", *common, "--pooling", "cls", "--head", "logistic", "--C", "1", "--no-progress")
    assert fit.returncode == 0, fit.stderr
    run_id = re.search(r"run (\S+) saved", fit.stdout).group(1)
    run_dir = Path(cache) / "runs" / run_id
    assert json.loads((run_dir / "config.json").read_text())["request"]["backbone"] == f"hub:{preset}"
    hit = run_cli("extract", *common, "--pooling", "cls", "--no-progress")
    assert hit.returncode == 0 and "cache hit" in hit.stdout, hit.stderr
    pred = run_cli("predict", "--run", run_id, str(data / "val" / "bees"), "--cache-dir", cache)
    assert pred.returncode == 0 and len(pred.stdout.strip().splitlines()) == 8, pred.stderr
    out = tmp_path / "export"
    exported = run_cli("export", "--run", run_id, "--out", str(out), "--cache-dir", cache)
    assert exported.returncode == 0 and "max probability difference" in exported.stdout, exported.stderr
    by_model = run_cli("predict", "--model", str(out / "model.keras"), str(data / "val" / "bees"))
    assert by_model.stdout == pred.stdout, by_model.stderr
    onnx = run_cli("export", "--run", run_id, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--cache-dir", cache)
    assert onnx.returncode == 2 and "tf2onnx" in onnx.stderr and "Traceback" not in onnx.stderr
    refused = run_cli("finetune", "--run", run_id, "--epochs", "1", "--cache-dir", cache)
    assert refused.returncode == 2 and "--unfreeze-last 1 trains its whole tower" in refused.stderr, refused.stderr
    ft = run_cli("finetune", "--run", run_id, "--epochs", "1", "--unfreeze-last", "1", "--batch-size", "8",
                 "--no-progress", "--cache-dir", cache)
    assert ft.returncode == 0 and "1 epoch(s)" in ft.stdout, ft.stderr
