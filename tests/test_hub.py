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


@pytest.mark.parametrize("damage, fragment", [
    ({"image_converter.json": None}, "has no image_converter.json, which says how the preset scales pixels"),
    ({"config.json": '{"config": null}'}, "is not a keras-hub preset file"),
    ({"config.json": "{not json"}, "cannot read keras-hub preset file"),
    ({"image_converter.json": '{"config": {"image_size": [32, 32], "scale": "x"}}'}, "is not a number"),
])
def test_a_damaged_preset_folder_is_one_line(preset, tmp_path, damage, fragment):
    folder = tmp_path / "p"
    folder.mkdir()
    for f in preset.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    for name, text in damage.items():
        (folder / name).unlink() if text is None else (folder / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        backbones.get(f"hub:{folder}")


def test_keras_hub_handles_are_names_not_folders_and_long_paths_make_short_file_names(tmp_path):
    assert hub.qualified("hub:kaggle://keras/vit/keras/vit_base_patch16_224_imagenet/3") == \
        "hub:kaggle://keras/vit/keras/vit_base_patch16_224_imagenet/3"
    assert hub.qualified("hub:hf://google/siglip") == "hub:hf://google/siglip"
    from pipeline.extract import ExtractRequest
    assert ExtractRequest(backbone="hub:./x").backbone == f"hub:{Path('x').resolve()}"  # the API records it too
    row = backbones.Backbone("hub:" + "/very_long_folder_name" * 20, "m:f", "in-model", 32, ())
    assert len(row.slug) <= 80 and row.slug != backbones.Backbone("hub:/other" + row.name[10:], "m:f", "in-model",
                                                                   32, ()).slug


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
    refused = run_cli("finetune", "--run", run_id, "--unfreeze", "block7", "--cache-dir", cache)
    assert refused.returncode == 2 and "its top blocks are: block1, block0" in refused.stderr, refused.stderr
    # the default: the topmost transformer block trains, nothing else of the tower
    ft = run_cli("finetune", "--run", run_id, "--epochs", "1", "--batch-size", "8", "--no-progress",
                 "--cache-dir", cache)
    assert ft.returncode == 0 and "1 epoch(s)" in ft.stdout, ft.stderr
    import keras
    tuned = keras.models.load_model(Path(cache) / "runs" / re.search(r"; run (\S+)", ft.stdout).group(1) /
                                    "model.keras").get_layer("backbone").layers[-1]
    changed = {w.path.split("/")[1] for w, v in zip(keras_hub.models.Backbone.from_preset(str(preset)).weights,
                                                    tuned.weights)
               if np.abs(np.asarray(w) - np.asarray(v)).max() > 0}
    assert changed == {"transformer_block_2"}, changed  # keras-hub numbers the blocks from 1
    # a saved keras-hub tower does not keep which inner blocks train: resuming is refused, not wrong
    state_file = Path(cache) / "runs" / re.search(r"; run (\S+)", ft.stdout).group(1) / "checkpoint.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "complete": False}))  # as if killed after its last epoch
    info_file = state_file.parent / "run.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "status": "incomplete"}))
    resumed = run_cli("finetune", "--resume", state_file.parent.name, "--cache-dir", cache)
    assert resumed.returncode == 2 and "resuming a fine-tune of hub:" in resumed.stderr, resumed.stderr


def test_transformer_blocks_are_found_inside_dinov2_and_siglip_towers():
    """ViT and SigLIP keep `encoder_layers`, DINOv2 its encoder layer's `layers`: one finder for all,
    and `train_blocks` leaves exactly the chosen block's weights trainable."""
    dino = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=3, hidden_dim=16, num_heads=2, intermediate_dim=32, layer_scale_init_value=1.0,
        num_register_tokens=0, use_mask_token=False, use_swiglu_ffn=False, image_shape=(28, 28, 3),
        position_embedding_shape=(28, 28))
    siglip = keras_hub.models.SigLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=2, num_heads=2,
                                                  intermediate_dim=32, image_shape=(32, 32, 3))
    assert list(hub.nested_blocks(dino)) == ["block2", "block1", "block0"]
    assert list(hub.nested_blocks(siglip)) == ["block1", "block0"]
    hub.train_blocks(dino, [hub.nested_blocks(dino)["block2"]])
    assert {w.path.split("/")[1] for w in dino.trainable_weights} == {"layers_2"}
    assert hub.nested_blocks(backbones.build(backbones.get("vgg16"), "none", 32)) == {}


def test_a_preset_that_cannot_be_fetched_says_why_plainly():
    """Offline, the reason was urllib3's text cut at 200 characters ("...HTTPSConnection(host='api.k");
    an unknown name's reason ended at "A preset must be a one of:", its list on the next line."""
    from pipeline.backbones.hub import fetch_error

    offline = ConnectionError("HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded with url: "
                              "/api/v1/models (Caused by NameResolutionError(\"HTTPSConnection(host='api.kaggle.com')\"))")
    assert "(no network: the preset's files could not be downloaded)" in fetch_error("dinov2_small", offline)
    unknown = ValueError("Unknown preset identifier. A preset must be a one of:\n\n'dinov2_small', 'vit_base'")
    assert "A preset must be a one of: 'dinov2_small', 'vit_base'" in fetch_error("notapreset", unknown)
