"""Stage 3: the fine-tuning model (preprocessing, head carry-over, trainable layers), training with
checkpoints, resume, and a saved model that loads with plain Keras."""

from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipeline import backbones  # noqa: E402
from pipeline.data.sources import open_source  # noqa: E402
from pipeline.errors import DataWarning, UserError  # noqa: E402
from pipeline.extract import ExtractRequest  # noqa: E402
from pipeline.finetune.checkpoints import CHECKPOINT_FILE, read_checkpoint  # noqa: E402
from pipeline.finetune.handover import split_parts  # noqa: E402
from pipeline.finetune.model import build_finetune_model, set_trainable, unfrozen_blocks  # noqa: E402
from pipeline.finetune.tuner import FineTuner  # noqa: E402
from pipeline.heads import DenseHead, LogisticHead  # noqa: E402
from pipeline.backbones.preprocessing import preprocessing_layers  # noqa: E402
from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.data.decode import load_file  # noqa: E402
from pipeline.backbones.model import feature_model  # noqa: E402

from conftest import make_folder  # noqa: E402

VGG = backbones.get("vgg16")
LITE = backbones.get("efficientnet_lite0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 2-class colour-separable folder (train/val, 6 images each per class), its resized images,
    float32 features from `feature_model` and a logistic head fitted on the training features."""
    root = make_folder(tmp_path_factory.mktemp("finetune") / "data", per_class=6)
    req = ExtractRequest(data=str(root), backbone="vgg16", weights="none", image_size=32)
    listing = open_source(req.data, req.split).listing()
    images = np.stack([load_file(p, 32) for p in listing.paths])
    feats = np.asarray(feature_model(VGG, "none", 32)(images, training=False))
    splits = np.asarray(listing.splits)
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    y = np.asarray(listing.labels, np.int64)
    logistic = LogisticHead(C=1.0).fit(feats[train], y[train], class_names=listing.class_names)
    return SimpleNamespace(root=root, req=req, listing=listing, images=images, feats=feats, y=y, train=train,
                           val=val, logistic=logistic, paths=list(listing.paths))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-epoch fine-tuning run of block5 with augmentation, noting the checkpoints after each epoch."""
    run = tmp_path_factory.mktemp("run") / "ft"
    seen = []

    class Watch(keras.callbacks.Callback):  # runs after the checkpoint of the epoch is written
        def on_epoch_end(self, epoch, logs=None):
            seen.append((read_checkpoint(run)["epoch"], sorted(p.name for p in (run / "checkpoints").iterdir())))

    tuner = FineTuner(unfreeze=["block5"], epochs=2, batch_size=8, lr=1e-4, augment=AugmentConfig(), seed=1,
                      trunk_cache=False)
    result = tuner.fit(data.req, data.logistic, run, callbacks=[Watch()])
    return SimpleNamespace(run=run, tuner=tuner, result=result, seen=seen)


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return np.asarray(x)


REFERENCE = {"caffe": keras.applications.vgg16.preprocess_input,
             "tf": keras.applications.mobilenet_v2.preprocess_input,
             "torch": keras.applications.densenet.preprocess_input,
             "lite": lambda x: (x - 127.0) / 128.0}


@pytest.mark.parametrize("style", ["caffe", "tf", "torch", "lite"])
def test_preprocessing_layers_match_reference_functions(style):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    want = np.asarray(REFERENCE[style](x.copy()))
    got = _apply(preprocessing_layers(style), keras.ops.convert_to_tensor(x))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4 if style == "caffe" else 1e-6)
    assert preprocessing_layers("in-model") == []


def test_vgg_block5_trainable_and_unknown_block_lists_names(data):
    model = build_finetune_model(data.req, data.logistic)
    assert set(model.get_layer("preprocess_rgb_to_bgr").get_weights()[0].ravel()) == {0.0, 1.0}
    assert trainable_layer_set(model) == {"logits"}  # built frozen: only the head trains
    names = set_trainable(model, VGG, ["block5"])
    assert names == ["block5_conv1", "block5_conv2", "block5_conv3", "logits"]
    assert not model.get_layer("preprocess_rgb_to_bgr").trainable
    assert set_trainable(model, VGG, (), unfreeze_last=2) == ["block5_conv3", "logits"]  # + weightless pool
    # --unfreeze-last alone trains those layers alone: the default top block beside them hid a small N
    layer_names = [layer.name for layer in model.get_layer("backbone").layers]
    assert unfrozen_blocks(VGG, layer_names, None, 2) == () and unfrozen_blocks(VGG, layer_names, None, None) == ("block5",)
    assert unfrozen_blocks(VGG, layer_names, ["block4"], 2) == ("block4",)
    with pytest.raises(UserError, match="more than the .* layers"):
        set_trainable(model, VGG, (), unfreeze_last=100000)
    with pytest.raises(UserError, match=r"--unfreeze-last 1 takes vgg16's last 1 layer\(s\), which have no weights "
                                        r"that train .* give --unfreeze-last 2 or more"):
        set_trainable(model, VGG, (), unfreeze_last=1)  # the weightless pool alone: nothing would train
    with pytest.raises(UserError) as err:
        set_trainable(model, VGG, ["block9"])
    assert "block9" in str(err.value) and all(b in str(err.value) for b in ("block5", "block4", "block3"))


def trainable_layer_set(model):
    from pipeline.finetune.model import trainable_layer_names
    return set(trainable_layer_names(model))


def test_lite_block7_trainable_bn_frozen_and_in_inference_mode(data, tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 1280)).astype(np.float32), np.arange(20) % 2
    head = LogisticHead(C=1.0).fit(X, y, class_names=["ants", "bees"])
    req = ExtractRequest(data=str(data.root), backbone="efficientnet_lite0", weights="none", image_size=32)
    model = build_finetune_model(req, head)
    assert isinstance(model.get_layer("preprocess_scale"), keras.layers.Rescaling)
    names = set_trainable(model, LITE, ["block7"])
    assert set(names) == {"block7a_expand_conv", "block7a_dwconv", "block7a_project_conv", "logits"}
    bns = [l for l in model.get_layer("backbone").layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and not any(l.trainable for l in bns)
    assert {"block7a_expand_bn", "block7a_bn", "block7a_project_bn"} <= {l.name for l in bns}
    # Frozen BN runs in inference mode even when the whole model is called in training mode.
    x = data.images[:4]
    np.testing.assert_allclose(np.asarray(model(x, training=True)), np.asarray(model(x, training=False)),
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["logistic", "dense"])
def test_first_forward_pass_equals_head_only_predictions(data, kind):
    if kind == "logistic":
        head = data.logistic
    else:
        head = DenseHead(hidden=(16,), batchnorm=True, dropout=0.2, epochs=3, batch_size=8, seed=0).fit(
            data.feats[data.train], data.y[data.train], class_names=data.listing.class_names)
    model = build_finetune_model(data.req, head)
    got = model.predict(data.images, verbose=0)
    want = head.predict_proba(data.feats)
    assert got.shape == want.shape == (data.y.size, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert FineTuner().default_lr(head) == (pytest.approx(head.lr / 10) if kind == "dense" else 2e-4)


def test_training_two_epochs_writes_checkpoints_and_metrics(data, trained):
    r, run = trained.result, trained.run
    assert r.epochs_run == 2 and r.resumed_from == 0 and r.best_epoch is None
    assert {k: len(v) for k, v in r.history.items()} == {"loss": 2, "acc": 2, "val_loss": 2, "val_acc": 2, "lr": 2}
    assert trained.seen == [(1, ["epoch-001.keras"]), (2, ["epoch-002.keras"])]  # the last one is kept
    state = read_checkpoint(run)
    assert state["epoch"] == 2 and state["complete"] and state["model"] == "checkpoints/epoch-002.keras"
    assert not (run / "checkpoints").exists()  # removed after success (keep_checkpoint=False)
    assert (run / "model.keras").exists() and (run / "finetune.json").exists()
    for part in (r.metrics_before, r.metrics_after):
        assert part["val"]["n"] == data.val.size and "confusion_matrix" in part["val"]
    assert set(r.run_metrics()) >= {"val", "before", "after", "comparison"}
    assert r.trainable_layers == ["block5_conv1", "block5_conv2", "block5_conv3", "logits"]
    # recalibrated on val (calibrate.py): recorded, and the saved model predicts what the figures say
    info = json.loads((run / "finetune.json").read_text())
    assert info["temperature"] == r.temperature == r.run_metrics()["temperature"] and "ece" in r.comparison["val"]
    assert r.calibration.startswith(f"temperature {r.temperature:.3f} fitted on the {data.val.size} val images")
    pred = trained.tuner.model_.predict(data.images[data.val], verbose=0).argmax(axis=1)
    assert np.mean(pred == data.y[data.val]) == pytest.approx(r.metrics_after["val"]["accuracy"])
    # Only block5 (and the head) moved; the rest of the backbone is as built.
    fresh = backbones.build(VGG, "none", 32)
    tuned = trained.tuner.model_.get_layer("backbone")
    np.testing.assert_array_equal(tuned.get_layer("block4_conv3").get_weights()[0],
                                  fresh.get_layer("block4_conv3").get_weights()[0])
    assert not np.allclose(tuned.get_layer("block5_conv3").get_weights()[0],
                           fresh.get_layer("block5_conv3").get_weights()[0])


def test_saved_model_loads_with_plain_keras_in_a_fresh_process(data, trained, tmp_path):
    x = data.images[data.val]
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras\n"
        f"m = keras.models.load_model({str(trained.run / 'model.keras')!r})\n"
        f"np.save({str(tmp_path / 'p.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))\n"
        "assert not any(k == 'pipeline' or k.startswith('pipeline.') for k in sys.modules), 'imported pipeline'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = trained.tuner.model_.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, atol=1e-5)
    # The tuner's own file pipeline (decode + resize) gives the same predictions.
    paths = [data.paths[i] for i in data.val]
    np.testing.assert_allclose(trained.tuner.predict_proba(paths), want, atol=1e-5)
    loaded = FineTuner.load(trained.run)
    np.testing.assert_allclose(loaded.predict_proba(paths[:3]), want[:3], atol=1e-5)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_continues_from_epoch_two(data, tmp_path):
    run = tmp_path / "run"

    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _Interrupt

    class Seen(keras.callbacks.Callback):
        epochs: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)

    class StopAtStart(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise _Interrupt

    tuner = FineTuner(unfreeze=["block5"], epochs=2, batch_size=8, lr=1e-4, augment=None, early_stopping=3,
                      trunk_cache=False)
    with pytest.raises(_Interrupt):  # killed before any epoch ended: resume starts afresh
        tuner.fit(data.req, data.logistic, run, callbacks=[StopAtStart()])
    assert read_checkpoint(run)["epoch"] == 0 and read_checkpoint(run)["model"] is None
    with pytest.raises(_Interrupt):
        tuner.fit(data.req, data.logistic, run, resume=True, callbacks=[StopAfterFirst()])
    state = read_checkpoint(run)
    assert state["epoch"] == 1 and not state["complete"] and (run / state["model"]).exists()
    with pytest.raises(UserError, match="resume"):
        tuner.fit(data.req, data.logistic, run)  # a fresh start would overwrite the checkpoint
    with pytest.raises(UserError, match="other settings"):
        FineTuner(unfreeze=["block4"], epochs=2, batch_size=8, lr=1e-4, augment=None,
                  early_stopping=3, trunk_cache=False).fit(data.req, data.logistic, run, resume=True)
    seen = Seen()
    result = FineTuner.from_checkpoint(run).fit(data.req, data.logistic, run, resume=True, callbacks=[seen])
    assert seen.epochs == [1] and result.resumed_from == 1 and result.epochs_run == 2
    assert len(result.history["loss"]) == 2 and len(result.history["val_loss"]) == 2
    assert result.metrics_before == state["metrics_before"]
    assert result.best_epoch in (1, 2)
    assert json.loads((run / CHECKPOINT_FILE).read_text())["complete"]
    assert not (run / "checkpoints").exists()  # removed after success unless keep_checkpoint


def test_stage2_inputs_from_a_fit_head_run_folder(data, tmp_path):
    """A cache made by `extract` + a head saved in a run folder whose config.json names the cache:
    the rebuilt model reproduces the head's predictions on the cached (float32) features."""
    from pipeline.extract import RunOptions, extract
    from pipeline.finetune.handover import stage2_inputs
    from pipeline.features.store import FeatureFile
    from pipeline.heads.training import SPLIT_FILE, recomputed_split

    req = ExtractRequest(data=str(data.root), backbone="vgg16", weights="none", image_size=32, dtype="float32")
    res = extract(req, RunOptions(cache_dir=tmp_path / "cache", progress=False))
    run = tmp_path / "runs" / "fit"
    run.mkdir(parents=True)
    with FeatureFile(res.path) as ff:
        rows = ff.rows("train")
        head = LogisticHead(C=1.0).fit(ff.load(rows), ff.labels[rows], class_names=ff.class_names,
                                       cache_key=ff.key, feature_info={"backbone": "vgg16"})
        feats, paths = ff.load(), list(ff.paths)
    head.save(run / "head.npz")
    (run / "config.json").write_text(json.dumps({"cache_file": str(res.path), "cache_key": res.key}))
    inputs = stage2_inputs(run)
    assert inputs.request == req and inputs.cache_path == res.path
    with FeatureFile(res.path) as ff:  # a run from before split.csv: its split is recomputed as fit-head made it
        assert inputs.split == {k: sorted(v) for k, v in recomputed_split(ff, {}).items()} and inputs.split["val"]
    val = inputs.split["val"][:2]  # the run's split.csv is what the head trained on, however the split is made now
    (run / SPLIT_FILE).write_text("path,split\n" + "".join(f"{p},val\n" for p in val) +
                                  "".join(f"{p},train\n" for p in paths if p not in val))
    assert stage2_inputs(run).split == {"train": sorted(set(paths) - set(val)), "val": sorted(val), "test": []}
    recomputed = inputs.split
    good = (run / SPLIT_FILE).read_text()
    for damage, said in [(good.replace(",val\n", ",validation\n", 1), "line 2 is not a path and one of train"),
                         (good + f"{val[0]},train\n", f"{val[0]} is listed in both val and train"),
                         ("path,split\n", "it lists no training image"), ("", "it is empty"),
                         (good.replace("path,split", "file,split"), "first line is not 'path,split'")]:
        (run / SPLIT_FILE).write_text(damage)  # a damaged record is said, and the split worked out without it
        with pytest.warns(DataWarning, match=f"{SPLIT_FILE} is damaged \\(.*{re.escape(said)}"):
            assert stage2_inputs(run).split == recomputed
    (run / SPLIT_FILE).write_text(good.replace("\n", "\r\n") + "\r\n\n")  # Windows line ends, blank lines: not damage
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert stage2_inputs(run).split == {"train": sorted(set(paths) - set(val)), "val": sorted(val), "test": []}
    model = build_finetune_model(inputs.request, inputs.head)
    images = np.stack([data.images[data.paths.index(p)] for p in paths])
    np.testing.assert_allclose(model.predict(images, verbose=0), head.predict_proba(feats), atol=1e-4)
    wrong = ExtractRequest(data=str(data.root), backbone="vgg19", weights="none", image_size=32)
    with pytest.raises(UserError, match="vgg16 features"):
        build_finetune_model(wrong, inputs.head)


def test_stage2_inputs_warns_of_changed_images_and_refuses_a_head_of_other_features(data, tmp_path):
    """An image replaced since extraction: one DataWarning (fine-tuning reads the new pixels, the head
    learnt the old). With the cache removed too, the run's data is extracted again to other features:
    refused with what to do (it named two cache keys)."""
    import shutil
    import warnings

    from pipeline.errors import DataWarning
    from pipeline.extract import RunOptions, extract
    from pipeline.finetune.handover import stage2_inputs
    from pipeline.features.store import FeatureFile

    root = Path(shutil.copytree(data.root, tmp_path / "data"))
    req = ExtractRequest(data=str(root), backbone="vgg16", weights="none", image_size=32, dtype="float32")
    res = extract(req, RunOptions(cache_dir=tmp_path / "cache", progress=False))
    run = tmp_path / "runs" / "fit"
    run.mkdir(parents=True)
    with FeatureFile(res.path) as ff:
        rows = ff.rows("train")
        LogisticHead(C=1.0).fit(ff.load(rows), ff.labels[rows], class_names=ff.class_names, cache_key=ff.key,
                                feature_info={"backbone": "vgg16"}).save(run / "head.npz")
    (run / "config.json").write_text(json.dumps({"cache_file": str(res.path), "cache_key": res.key,
                                                 "request": req.to_json()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        stage2_inputs(run)  # nothing changed: no warning
    image = next(root.rglob("*.jpg"))
    original, stat = image.read_bytes(), image.stat()
    image.write_bytes(next(p for p in root.rglob("*.jpg") if p != image).read_bytes())
    os.utime(image, (1_000_000_000, 1_000_000_000))
    with pytest.warns(DataWarning, match=f"1 of the images changed .*{image.name}: changed.*fit-head on the data again"):
        stage2_inputs(run)
    res.path.unlink()
    with pytest.raises(UserError, match="now gives .*changed since\\); fit-head on the data again"):
        stage2_inputs(run)
    assert not list((tmp_path / "cache" / "features").glob("*.h5")), "extracted before refusing"
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.warns(DataWarning, match="were removed; extracting them again"):  # said, not a bar alone
        again = stage2_inputs(run, progress=False)
    assert again.cache_path == res.path and res.path.exists()  # unchanged data: extracted again, the same key


@pytest.mark.parametrize("AUG", [None, AugmentConfig(flip=True, rotation=0.0, zoom=0.0, brightness=0.1, contrast=0.0)],
                         ids=["plain", "augmented"])
@pytest.mark.parametrize("TRUNK", [False, True], ids=["images", "trunk-cache"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path, AUG, TRUNK):
    """Killed after epoch 1 and resumed: the same shuffle order, augmentation (views) and optimizer
    state, so the final weights equal those of a run that was never interrupted; on images and on
    the trunk cache (whose checkpoints hold the top half only)."""
    def tuner():
        return FineTuner(unfreeze=["block5"], epochs=3, batch_size=4, lr=1e-4, seed=3,
                         augment=AUG, trunk_cache=TRUNK, views=2)

    cache = {"cache_dir": tmp_path / "cache"}
    whole = tuner()
    whole.fit(data.req, data.logistic, tmp_path / "whole", **cache)

    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        tuner().fit(data.req, data.logistic, tmp_path / "cut", callbacks=[StopAfterFirst()], **cache)
    resumed = FineTuner.from_checkpoint(tmp_path / "cut")
    result = resumed.fit(data.req, data.logistic, tmp_path / "cut", resume=True, **cache)
    assert result.resumed_from == 1 and result.epochs_run == 3
    assert bool(read_checkpoint(tmp_path / "cut")["trunk_cut"]) == TRUNK  # block4_pool on the trunk path
    for a, b in zip(whole.model_.get_weights(), resumed.model_.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert whole.result_.history["loss"] == pytest.approx(result.history["loss"], rel=1e-5)


def test_without_a_val_split_a_seeded_holdout_is_validated_and_early_stopping_works(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10, splits=("train", "test"))
    req = ExtractRequest(data=str(root), backbone="vgg16", weights="none", image_size=32)
    listing = open_source(req.data, req.split).listing()
    assert "val" not in listing.splits
    images = np.stack([load_file(p, 32) for p in listing.paths])
    feats = np.asarray(feature_model(VGG, "none", 32)(images, training=False))
    train = np.flatnonzero(np.asarray(listing.splits) == "train")
    head = LogisticHead(C=1.0).fit(feats[train], np.asarray(listing.labels)[train], class_names=listing.class_names)
    result = FineTuner(unfreeze=["block5"], epochs=4, batch_size=8, lr=1e-4, augment=None, early_stopping=1,
                       seed=1, trunk_cache=False).fit(req, head, tmp_path / "run")
    assert result.val_source == "holdout" and result.n_val == 4 and result.n_train == 16
    assert result.metrics_before["val"]["n"] == 4 and result.metrics_after["test"]["n"] == 20
    assert len(result.history["val_loss"]) == result.epochs_run
    assert result.best_epoch is not None and 1 <= result.best_epoch <= result.epochs_run
    again = FineTuner(unfreeze=["block5"], epochs=1, batch_size=8, lr=1e-4, augment=None, seed=1)
    assert split_parts(req, listing, None, again.val_fraction, again.seed)[0]["val"].tolist() == split_parts(
        req, listing, None, FineTuner(seed=1).val_fraction, 1)[0]["val"].tolist()  # seeded: the same images every time


def test_a_stage2_split_that_names_missing_images_is_refused(data, tmp_path):
    split = {"train": [data.listing.ids[i] for i in data.train], "val": ["/nowhere/gone.jpg"], "test": []}
    with pytest.raises(UserError, match="no longer in"):
        FineTuner(epochs=1, augment=None).fit(data.req, data.logistic, tmp_path / "run", split=split)


# A fine-tune on several devices in a fresh process. Each test's script is its backend's prelude
# (device set-up, `TUNER` options, a `placement(kernel)` report) followed by this shared body.
DATA_PARALLEL_FIT = r"""
import json, sys
import numpy as np
from pipeline.data.sources import open_source
from pipeline.extract import ExtractRequest
from pipeline.finetune.tuner import FineTuner
from pipeline.heads import LogisticHead
from pipeline.backbones.model import feature_model
from pipeline.data.decode import load_file
from pipeline import backbones
root, run, trunk = sys.argv[1], sys.argv[2], {"1": True, "0": False}.get(sys.argv[3])
req = ExtractRequest(data=root, backbone="vgg16", weights="none", image_size=32)
listing = open_source(req.data, req.split).listing()
images = np.stack([load_file(p, 32) for p in listing.paths])
feats = np.asarray(feature_model(backbones.get("vgg16"), "none", 32)(images, training=False))
train = np.flatnonzero(np.asarray(listing.splits) == "train")
head = LogisticHead(C=1.0).fit(feats[train], np.asarray(listing.labels)[train], class_names=listing.class_names)
tuner = FineTuner(unfreeze=["block5"], epochs=2, batch_size=5, lr=1e-4, augment=None, trunk_cache=trunk, **TUNER)
result = tuner.fit(req, head, run, cache_dir=run + "-cache")
kernel = next(v for v in tuner.model_.trainable_variables if "kernel" in v.path)
proba = tuner.predict_proba(list(listing.paths)[:3])
json.dump({**placement(kernel), "val_n": result.metrics_after["val"]["n"], "epochs": result.epochs_run,
           "val_loss": result.history.get("val_loss"), "proba_ok": bool(np.allclose(proba.sum(1), 1, atol=1e-4))},
          open(run + ".json", "w"))
"""

JAX_DATA_PARALLEL = r"""
import jax
TUNER = {"class_weight": "balanced"}
def placement(kernel):
    return {"devices": len(jax.devices()), "placed_on": len(kernel.value.sharding.device_set)}
""" + DATA_PARALLEL_FIT


def test_jax_data_parallel_over_two_virtual_devices(tmp_path):
    """`keras.distribution.DataParallel` on 2 CPU devices: odd batch sizes are padded with weight-0
    rows, every val image counts once, and the variables live on both devices."""
    pytest.importorskip("jax", reason="JAX is not installed: pip install -e '.[jax]'")
    from conftest import ROOT

    root = make_folder(tmp_path / "d", per_class=7)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    run = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", JAX_DATA_PARALLEL, str(root), run, "auto"], env=env,
                          capture_output=True, text=True, timeout=600)  # the trunk cache path (the default)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(Path(run + ".json").read_text())
    assert out["devices"] == 2 and out["placed_on"] == 2
    assert out["val_n"] == 14 and out["epochs"] == 2 and len(out["val_loss"]) == 2 and out["proba_ok"]


TF_MIRRORED = r"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.finetune.devices import tf_strategy
TUNER = {}
def placement(kernel):
    return {"replicas": tf_strategy().num_replicas_in_sync, "variable": type(kernel.value).__name__}
""" + DATA_PARALLEL_FIT


@pytest.mark.parametrize("trunk", [True, False], ids=["trunk-cache", "images"])
def test_tensorflow_mirrored_strategy_over_two_virtual_cpus(tmp_path, trunk):
    """TensorFlow's MirroredStrategy, as on several GPUs, over 2 logical CPU devices: the variables
    are mirrored, odd batches split across the replicas, every val image counts once."""
    from conftest import ROOT

    root = make_folder(tmp_path / "d", per_class=7)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    run = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", TF_MIRRORED, str(root), run, "1" if trunk else "0"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(Path(run + ".json").read_text())
    assert out["replicas"] == 2 and out["variable"] == "MirroredVariable", out
    assert out["val_n"] == 14 and out["epochs"] == 2 and len(out["val_loss"]) == 2 and out["proba_ok"]


def test_trunk_cache_trains_the_top_on_cached_maps_and_saves_an_image_model(data, tmp_path):
    """The default path: the frozen part below block5 is extracted once (clean + 2 seeded views of
    every training image) into the cache, only the top trains, on those maps, and the saved model
    takes images: it predicts what its top predicts on the cached clean maps, only block5 and the
    head moved, and the next run with the same settings finds the trunk cache."""
    from pipeline.features.store import FeatureFile
    from pipeline.heads.calibration import temperature_scaled

    cache, said = tmp_path / "cache", []
    tuner = FineTuner(unfreeze=["block5"], epochs=3, batch_size=8, lr=1e-3, augment=AugmentConfig(), views=2, seed=1)
    result = tuner.fit(data.req, data.logistic, tmp_path / "run", cache_dir=cache, log=said.append)
    assert any(m.startswith("trunk cache: ") for m in said), said
    assert result.n_train == data.train.size and result.metrics_after["val"]["n"] == data.val.size
    assert result.trainable_layers == ["block5_conv1", "block5_conv2", "block5_conv3", "logits"]
    assert len(result.history["val_loss"]) == 3
    (h5,) = (cache / "features").glob("vgg16-32-block4_pool-*.h5")
    with FeatureFile(h5) as ff:
        assert ff.feature_shape == (2, 2, 512)  # block4_pool at 32 px
        assert sorted(set(ff.views.tolist())) == [0, 1, 2] and (ff.views > 0).sum() == 2 * data.train.size
        clean = {p: r for r, (p, v) in enumerate(zip(ff.paths, ff.views)) if v == 0}
        maps = ff.load(np.asarray(sorted(clean[data.paths[i]] for i in data.val)))
        order = np.argsort(np.argsort([clean[data.paths[i]] for i in data.val]))
        maps = maps[order]  # back to data.val's order
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    by_image = np.asarray(model.predict(data.images[data.val], verbose=0))
    by_map = np.asarray(model.get_layer("top").predict(maps, verbose=0), np.float64)
    by_map = temperature_scaled(np.log(np.maximum(by_map, 1e-12)), result.temperature)  # recalibrated on top
    np.testing.assert_allclose(by_image, by_map, atol=2e-2)  # the maps are stored as float16
    np.testing.assert_allclose(by_image, tuner.predict_proba([data.paths[i] for i in data.val]), atol=1e-5)
    fresh = backbones.build(VGG, "none", 32)
    trunk, top = model.get_layer("trunk"), model.get_layer("top").get_layer("backbone_top")
    np.testing.assert_array_equal(trunk.get_layer("block4_conv3").get_weights()[0],
                                  fresh.get_layer("block4_conv3").get_weights()[0])
    assert not np.allclose(top.get_layer("block5_conv3").get_weights()[0], fresh.get_layer("block5_conv3").get_weights()[0])
    said.clear()
    FineTuner(unfreeze=["block5"], epochs=1, batch_size=8, augment=AugmentConfig(), views=2, seed=1).fit(
        data.req, data.logistic, tmp_path / "again", cache_dir=cache, log=said.append)
    assert any(m.startswith("trunk cache hit: ") for m in said), said
    with pytest.raises(UserError, match="views must be 0 or more"):
        FineTuner(views=-1).fit(data.req, data.logistic, tmp_path / "bad", cache_dir=cache)
    with pytest.raises(UserError, match="whole blocks"):  # asked for, and impossible: one line, no fallback
        FineTuner(unfreeze_last=3, trunk_cache=True).fit(data.req, data.logistic, tmp_path / "bad2", cache_dir=cache)
    legacy = FineTuner(trunk_cache=False, label_smoothing=0.0, views=7)  # as checkpoints from before these options
    assert legacy._fingerprint(data.req, data.logistic, {}) == FineTuner(trunk_cache=False, label_smoothing=0.0)._fingerprint(
        data.req, data.logistic, {})


def test_a_padded_batch_has_the_loss_of_the_unpadded_one(monkeypatch):
    """Padding (to the replicas, and on JAX to the whole batch: one compiled step) adds weight-0 rows
    and weighs the real ones padded/real, so Keras' mean loss over all rows is the real rows' mean,
    class weights included; on JAX the multiple is the batch size, rounded up to the replicas."""
    import keras

    import pipeline.backend
    from pipeline.finetune.data import finish_batch
    from pipeline.finetune.devices import batch_multiple

    rng = np.random.default_rng(0)
    x = rng.random((5, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0], np.int32)
    proba = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy()
    cw = np.array([1.0, 2.0, 0.5], np.float32)
    for multiple in (2, 8):
        px, py, w = finish_batch(x, y, multiple, None, None)
        assert px.shape[0] == py.size == w.size == 5 + (-5) % multiple and (w[5:] == 0).all()
        padded_proba = np.concatenate([proba, np.repeat(proba[:1], py.size - 5, axis=0)])
        np.testing.assert_allclose(float(loss(py, padded_proba, sample_weight=w)), float(loss(y, proba)), rtol=1e-5)
        _, _, wc = finish_batch(x, y, multiple, cw, None)
        np.testing.assert_allclose(float(loss(py, padded_proba, sample_weight=wc)),
                                   float(loss(y, proba, sample_weight=cw[y])), rtol=1e-5)
    monkeypatch.setattr(pipeline.backend, "name", lambda: "jax")
    assert batch_multiple(32, 1) == 32 and batch_multiple(30, 4) == 32
    monkeypatch.setattr(pipeline.backend, "name", lambda: "tensorflow")
    assert batch_multiple(32, 1) == 1 and batch_multiple(30, 2) == 2


def test_a_fine_tune_that_lowers_val_accuracy_says_so():
    """When val accuracy drops, the result says the head-only run stays the better model (and why,
    on small data); no note when it rises or without val."""
    from pipeline.finetune.results import FinetuneResult

    def note(before, after, n_train=244, n_val=153):
        r = SimpleNamespace(metrics_before={"val": {"n": n_val, "accuracy": before}},
                            metrics_after={"val": {"n": n_val, "accuracy": after}}, n_train=n_train)
        return FinetuneResult.worse_note(r, "HEAD")

    worse = note(0.954, 0.928)
    assert "0.954 -> 0.928" in worse and "head run HEAD" in worse and "244 training images" in worse
    assert "--unfreeze" in worse and "\n" not in worse
    assert "training images" not in note(0.9, 0.8, n_train=5000)
    assert note(0.925, 0.960) is None and note(0.9, 0.8, n_val=0) is None


def test_the_trunk_cache_keeps_the_extractions_dtype(data):
    """A run extracted with --dtype float32 (random-init maps underflow float16, which extract refuses)
    gets a float32 trunk cache; it was always float16, then refused, with advice to pass a --dtype that
    finetune does not have."""
    import dataclasses

    from pipeline.finetune.trunk import trunk_request

    assert trunk_request(data.req, "block4_pool", 2, AugmentConfig(), 1).dtype == data.req.dtype == "float16"
    wide = trunk_request(dataclasses.replace(data.req, dtype="float32"), "block4_pool", 2, AugmentConfig(), 1)
    assert wide.dtype == "float32" and wide.layer == "block4_pool" and wide.pooling == "none"


def test_fine_tuning_batches_read_ahead_until_closed(data):
    """The loader reads the next batches of the epoch ahead; close (the tuner calls it when a run ends,
    however it ends) drops them and stops its threads, and a closed loader still serves batches."""
    from pipeline.finetune.data import PREFETCH, make_batches

    source = open_source(data.req.data, data.req.split)
    batches = make_batches(source, data.listing, data.train, 32, data.req.resize, batch_size=2, shuffle_seed=7)
    first = batches[0]
    assert sorted(batches.ahead) == [(0, j) for j in range(1, 1 + PREFETCH)]
    batches.close()
    assert not batches.ahead and batches.pool is None
    again = batches[0]
    np.testing.assert_array_equal(first[0], again[0])
    assert sorted(batches.ahead) == [(0, j) for j in range(1, 1 + PREFETCH)]
    batches.on_epoch_end()  # what was read ahead for epoch 0 is never served in epoch 1
    assert not batches.ahead
    batches[0]
    assert sorted(batches.ahead) == [(1, j) for j in range(1, 1 + PREFETCH)]
    batches.close()


def test_fine_tuning_batches_show_each_image_once_per_epoch_and_a_resumed_fit_sees_the_same(data):
    """Keras calls a PyDataset's on_epoch_end once more before the first epoch (`EpochIterator.reset`),
    and Keras-JAX and -PyTorch pull one batch before it to build the compiled loss; whatever Keras
    does, every epoch must show each training image once, the order must turn over, and a fit resumed at epoch 1 (`first_epoch`, as
    `finetune --resume` builds it) must see the batches the uninterrupted fit saw from epoch 1 on."""
    from pipeline.finetune.data import make_batches

    def shown(first_epoch: int) -> list[list[int]]:
        seen = []

        class Record(keras.layers.Layer):
            def call(self, x):
                try:  # a batch; not a symbolic tensor or a JAX tracer while the model is built
                    seen.append(np.asarray(keras.ops.convert_to_numpy(x)))
                except Exception:  # noqa: BLE001 - whichever error each backend raises for a symbolic input
                    pass
                return keras.ops.mean(keras.ops.cast(x, "float32"), axis=(1, 2))

            def compute_output_shape(self, shape):
                return (shape[0], shape[-1])

        source = open_source(data.req.data, data.req.split)
        batches = make_batches(source, data.listing, data.train, 32, data.req.resize, batch_size=4, shuffle_seed=7,
                               first_epoch=first_epoch)
        model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), Record(), keras.layers.Dense(2)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
        model.fit(batches, epochs=3, initial_epoch=first_epoch, verbose=0, shuffle=False)  # as the loop calls it
        images = np.concatenate(seen).astype(np.float32)
        gap = np.abs(images[:, None] - data.images[None].astype(np.float32)).mean(axis=(2, 3, 4))
        assert (gap.min(axis=1) < 1.0).all()  # each image shown is one of the listing's
        rows, n = gap.argmin(axis=1), data.train.size
        return [rows[e * n:(e + 1) * n].tolist() for e in range(rows.size // n)]

    whole = shown(0)
    assert len(whole) == 3 and all(sorted(epoch) == sorted(data.train.tolist()) for epoch in whole)
    assert whole[0] != whole[1] != whole[2]
    assert shown(1) == whole[1:]


def test_trunk_map_epochs_start_with_the_clean_images():
    """Keras calls on_epoch_end once before the first epoch, so the first epoch read view 1 and the clean
    images came last (never, with no more epochs than views): epochs cycle clean, view 1, ..., view N."""
    import keras

    from pipeline.finetune.data import map_batches

    n, views = 8, 3  # row v * n + i: view v of image i; feature 0 holds the view
    served: list[set] = []

    class Recorded(np.ndarray):
        def __getitem__(self, rows):
            out = np.asarray(super().__getitem__(rows))
            served.append({int(v) for v in np.atleast_2d(out)[:, 0]})
            return out

    data = np.zeros((n * views, 4), np.float32)
    data[:, 0] = np.repeat(np.arange(views), n)
    ds = map_batches(data.view(Recorded), lambda epoch: np.arange(n) + (epoch % views) * n, np.zeros(n * views, int),
                     batch_size=4, shuffle_seed=0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds, epochs=4, verbose=0)
    per_epoch = [set().union(*served[k:k + 2]) for k in range(len(served) - 8, len(served), 2)]  # 2 batches each
    assert per_epoch == [{0}, {1}, {2}, {0}], served
