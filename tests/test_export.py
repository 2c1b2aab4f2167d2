"""`export` and `predict --model`: a run leaves the tool as one model (raw uint8 in, probabilities
out) that its own runtime loads, and that gives the run's predictions."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import make_folder, run_cli

LITE = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--no-progress"]  # real ImageNet weights
BACKEND = keras.backend.backend()


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


FORMAT_NEEDS = {"keras": (), "onnx": ("onnx", "onnxruntime", "tf2onnx" if BACKEND == "tensorflow" else "jax2onnx"),
                "savedmodel": ("tensorflow",), "tflite": ("tensorflow",)}
TF_ONLY = {"savedmodel", "tflite"}


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A logistic fit-head run on real Lite0 features of 12 small images per class."""
    root = tmp_path_factory.mktemp("export")
    data = make_folder(root / "d", per_class=12)
    cache = root / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    run_id = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    return run_id, data, cache


def _probabilities(csv_path: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(csv_path.open()))
    return {r["path"]: np.array([float(r["ants"]), float(r["bees"])]) for r in rows}


def test_onnx_export_predicts_like_the_run(head_run, tmp_path):
    """The issue's round trip as a user runs it: export, then predict --model on 10 images equals
    predict --run to 1e-4, with the same class names."""
    if not _has(*FORMAT_NEEDS["onnx"]):
        pytest.skip(f"ONNX export on {BACKEND} needs {FORMAT_NEEDS['onnx']} (pip install -e '.[export]')")
    run_id, data, cache = head_run
    out = tmp_path / "onnx"
    # in a process of its own: the converters' warnings come once per process (the first export's)
    exp = run_cli("export", "--run", run_id, "--format", "onnx", "--out", str(out), "--cache-dir", str(cache),
                  isolated=True)
    assert exp.returncode == 0, exp.stderr
    assert "max probability difference" in exp.stdout and not exp.stderr.strip(), exp.stderr
    assert (out / "labels.txt").read_text() == "ants\nbees\n"
    card = json.loads((out / "model_card.json").read_text())
    assert card["run_id"] == run_id and card["input"]["shape"] == [None, 64, 64, 3] and card["input"]["dtype"] == "uint8"
    assert card["class_names"] == ["ants", "bees"] and card["backbone"]["name"] == "efficientnet_lite0"
    assert 0 <= card["metrics"]["val"]["accuracy"] <= 1

    images = sorted((data / "val" / "ants").iterdir())[:5] + sorted((data / "val" / "bees").iterdir())[:5]
    ours, theirs = tmp_path / "run.csv", tmp_path / "model.csv"
    a = run_cli("predict", "--run", run_id, *map(str, images), "--csv", str(ours), "--cache-dir", str(cache))
    b = run_cli("predict", "--model", str(out / "model.onnx"), *map(str, images), "--csv", str(theirs))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, pb = _probabilities(ours), _probabilities(theirs)
    assert len(pa) == 10 and pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_allclose(pb[path], pa[path], atol=1e-4)
    labels_a = [l.split("\t")[1].split()[0] for l in a.stdout.splitlines()]
    labels_b = [l.split("\t")[1].split()[0] for l in b.stdout.splitlines()]
    assert labels_a == labels_b and set(labels_a) <= {"ants", "bees"}


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "tflite"])
def test_every_format_round_trips_in_process(head_run, tmp_path, fmt):
    """Each other format, through the library: the loaded export's probabilities on 10 images equal
    the run's own (`predict_paths`) to 1e-4."""
    if fmt in TF_ONLY and BACKEND != "tensorflow":
        pytest.skip(f"{fmt} is written from the TensorFlow backend (this run: {BACKEND})")
    if not _has(*FORMAT_NEEDS[fmt]):
        pytest.skip(f"{fmt} export needs {FORMAT_NEEDS[fmt]}")
    from pipeline.export import export_run, open_model
    from pipeline.export.runtime import predict_files
    from pipeline.inference.apply import load_run, predict_paths

    run_id, data, cache = head_run
    run = load_run(cache, run_id)
    result = export_run(run, fmt, tmp_path / fmt)
    assert result.max_abs_diff <= 1e-4 and (tmp_path / fmt / "labels.txt").exists()
    paths = [str(p) for p in sorted((data / "val").rglob("*.jpg"))[:10]]
    expected, kept, _ = predict_paths(run, paths)
    if fmt == "savedmodel":  # it runs the ops it holds: opened only when trusted
        from pipeline.errors import UserError
        with pytest.raises(UserError, match="--trust-model"):
            open_model(result.model_path)
    model = open_model(result.model_path, trust_savedmodel=fmt == "savedmodel")
    assert model.class_names == ["ants", "bees"] and model.size == 64 and model.kind == fmt
    got, kept2, _ = predict_files(model, paths)
    assert kept == kept2
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # the file (folder) copied on its own still carries its card: resize rule, classes, run, no warning
    import shutil
    import warnings

    from pipeline.errors import DataWarning
    alone = tmp_path / "alone" / result.model_path.name
    alone.parent.mkdir()
    (shutil.copytree if result.model_path.is_dir() else shutil.copy)(result.model_path, alone)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        lone = open_model(alone, trust_savedmodel=fmt == "savedmodel")
    assert lone.card["run_id"] == run_id and lone.class_names == ["ants", "bees"]
    assert lone.resize == result.card["input"]["resize"] and lone.size == 64
    if fmt == "savedmodel":  # its card is a file inside the folder: rewritten once verified, as the one beside
        assert lone.card["verified_max_abs_diff"] == result.max_abs_diff == model.card["verified_max_abs_diff"]


def test_export_refuses_to_touch_what_is_not_an_earlier_export(head_run, tmp_path):
    run_id, _, cache = head_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    bad = run_cli("export", "--run", run_id, "--out", str(mine), "--cache-dir", str(cache))
    assert bad.returncode == 2 and "not empty" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    under_file = run_cli("export", "--run", run_id, "--out", str(mine / "notes.txt" / "m"), "--cache-dir", str(cache))
    assert under_file.returncode == 2 and "notes.txt is a file, not a folder" in under_file.stderr, under_file.stderr
    if Path("/proc/self").is_dir():  # a folder no one can create anything in (root included)
        proc = run_cli("export", "--run", run_id, "--out", "/proc/featurecache-export", "--cache-dir", str(cache))
        assert proc.returncode == 2 and "cannot write the export into /proc (" in proc.stderr, proc.stderr

    from pipeline.errors import UserError
    from pipeline.export import export_run
    from pipeline.inference.apply import load_run
    run = load_run(cache, run_id)
    out = tmp_path / "exp"
    export_run(run, "keras", out)
    with pytest.raises(UserError, match="--force"):
        export_run(run, "keras", out)
    inode = out.stat().st_ino
    export_run(run, "onnx" if _has("tf2onnx") else "keras", out, force=True)
    assert out.stat().st_ino == inode  # replaced in place: a mount point (a container's volume) cannot be renamed over
    assert sorted(p.name for p in out.iterdir()) in (["labels.txt", "model.keras", "model_card.json"],
                                                     ["labels.txt", "model.onnx", "model_card.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left
    empty = tmp_path / "volume"                                        # an empty folder given: written into
    empty.mkdir()
    inode = empty.stat().st_ino
    export_run(run, "keras", empty)
    assert empty.stat().st_ino == inode and sorted(p.name for p in empty.iterdir()) == [
        "labels.txt", "model.keras", "model_card.json"]
    theirs = tmp_path / "theirs"                                       # export-like names, a card of their own
    (theirs / "saved_model" / "variables").mkdir(parents=True)
    (theirs / "saved_model" / "variables" / "mydata.txt").write_text("important")
    (theirs / "model_card.json").write_text('{"my": "notes"}')
    with pytest.raises(UserError, match="not empty and not an earlier export"):
        export_run(run, "keras", theirs, force=True)
    assert (theirs / "saved_model" / "variables" / "mydata.txt").read_text() == "important"
    dotted = tmp_path / "dotted"                                       # a folder of theirs named like staging
    (dotted / ".export-notes").mkdir(parents=True)
    with pytest.raises(UserError, match="not empty and not an earlier export"):
        export_run(run, "keras", dotted, force=True)
    assert (dotted / ".export-notes").is_dir()
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UserError, match="symbolic link"):
        export_run(run, "keras", link)
    assert (mine / "notes.txt").exists()


@pytest.mark.parametrize("args, fragment", [
    (["export", "--run", "nope"], "unknown run ID"),
    (["predict", "--model", "{tmp}/missing.onnx", "{img}"], "model not found"),
    (["predict", "--model", "{tmp}/bad.onnx", "{img}"], "not a readable ONNX model"),
    (["predict", "--model", "{tmp}/x.pkl", "{img}"], "unknown model type"),
    (["predict", "--model", "{tmp}/sm", "{img}"], "add --trust-model if you trust"),
    (["predict", "--model", "{tmp}/bad.tflite", "{img}"], "not a readable TFLite model"),
    (["predict", "--model", "{tmp}/bad.onnx", "--run", "x", "{img}"], "one of --run, --model"),
])
def test_export_and_predict_model_errors_are_one_line(args, fragment, tmp_path):
    make_folder(tmp_path / "d", per_class=1, splits=())
    (tmp_path / "bad.onnx").write_bytes(b"not onnx at all")
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04.")
    (tmp_path / "bad.tflite").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"a SavedModel from elsewhere")
    img = str(next((tmp_path / "d").rglob("*.jpg")))
    args = [a.format(tmp=tmp_path, img=img) for a in args]
    res = run_cli(*args, "--cache-dir", str(tmp_path / "c")) if args[0] == "export" else run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr


def test_tflite_on_another_backend_says_how_in_one_line(head_run, tmp_path):
    import os
    import subprocess
    import sys
    run_id, _, cache = head_run
    other = "jax" if BACKEND != "jax" else "tensorflow"
    if other == "tensorflow":
        pytest.skip("runs from a non-TensorFlow backend")
    env = dict(os.environ, KERAS_BACKEND=other)
    res = subprocess.run([sys.executable, "cli.py", "export", "--run", run_id, "--format", "tflite", "--out",
                          str(tmp_path / "t"), "--cache-dir", str(cache)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2 and "--backend tensorflow" in res.stderr and not (tmp_path / "t").exists()


def test_a_mixed_precision_model_exports_as_float32():
    from pipeline.export.exporter import float32_model

    keras.config.set_dtype_policy("mixed_float16")
    try:
        inp = keras.Input((4,))
        hidden = keras.layers.Dense(5, name="mixed_5b")(inp)  # InceptionResNetV2 names layers like this
        model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", dtype="float32")(hidden))
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.layers[1].dtype_policy.name == "mixed_float16"
    copy = float32_model(model)
    assert {l.dtype_policy.name for l in copy.layers[1:]} == {"float32"}
    assert [l.name for l in copy.layers] == [l.name for l in model.layers]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(model(x)), atol=2e-3)
    assert keras.config.dtype_policy().name == "float32"


def test_a_trunk_cache_finetune_exports(head_run, tmp_path):
    """A fine-tune trained on the trunk cache saves preprocessing -> `trunk` -> `top` (nested
    models); its ONNX and TFLite exports give the run's own probabilities (one fine-tune for both)."""
    formats = [f for f in ("onnx", "tflite") if (f not in TF_ONLY or BACKEND == "tensorflow") and _has(*FORMAT_NEEDS[f])]
    if not formats:
        pytest.skip(f"neither ONNX ({FORMAT_NEEDS['onnx']}) nor, on TensorFlow, TFLite export is available here")
    from pipeline.export import export_run, open_model
    from pipeline.export.runtime import predict_files
    from pipeline.inference.apply import load_run, predict_paths

    run_id, data, cache = head_run
    ft = run_cli("finetune", "--run", run_id, "--epochs", "1", "--batch-size", "8", "--views", "1",
                 "--no-progress", "--cache-dir", str(cache))
    assert ft.returncode == 0 and "trunk cache" in ft.stderr, ft.stderr
    ft_id = ft.stdout.strip().splitlines()[-1].rsplit("run ", 1)[1].split()[0]
    run = load_run(cache, ft_id)
    paths = [str(p) for p in sorted((data / "val").rglob("*.jpg"))[:6]]
    expected, _, _ = predict_paths(run, paths)
    for fmt in formats:
        result = export_run(run, fmt, tmp_path / fmt)
        assert result.max_abs_diff <= 1e-4, fmt
        got, _, _ = predict_files(open_model(result.model_path), paths)
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=fmt)


@pytest.mark.parametrize("kind,fmt", [("svm", "keras"), ("svm", "onnx"), ("knn", "onnx")])
def test_an_svm_or_knn_head_run_exports_and_predicts_like_the_run(head_run, tmp_path, kind, fmt):
    """The svm head becomes UnitNormalization + Dense(exponential) kernel + Dense logits on top of the
    backbone, the knn head UnitNormalization + Dense similarities + top-k + the one-hot vote (ONNX
    TopK): the export's probabilities equal the run's own."""
    if not _has(*FORMAT_NEEDS[fmt]):
        pytest.skip(f"{fmt} export needs {FORMAT_NEEDS[fmt]}")
    from pipeline.export import export_run, open_model
    from pipeline.export.runtime import predict_files
    from pipeline.inference.apply import load_run, predict_paths

    _, data, cache = head_run
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *LITE, "--head", kind)
    assert fit.returncode == 0 and "cache hit" in fit.stdout, fit.stderr
    run_id = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    run = load_run(cache, run_id)
    assert run.head.kind == kind
    result = export_run(run, fmt, tmp_path / fmt)
    assert result.max_abs_diff <= 1e-4
    paths = [str(p) for p in sorted((data / "val").rglob("*.jpg"))[:10]]
    expected, kept, _ = predict_paths(run, paths)
    got, kept2, _ = predict_files(open_model(result.model_path), paths)
    assert kept == kept2
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_model_card_with_an_unknown_resize_rule_is_one_line(tmp_path):
    """The card says how images were resized for the cache; a rule this version does not know would
    give other inputs than the run saw (it reached the decoder as a KeyError)."""
    import json

    from pipeline.errors import DataWarning, UserError
    from pipeline.export.runtime import open_model

    inp = keras.Input((8, 8, 3), dtype="uint8")
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(
        keras.layers.Rescaling(1 / 255)(inp))))
    model.save(tmp_path / "model.keras")
    (tmp_path / "model_card.json").write_text(json.dumps({"input": {"resize": "squash"}}))
    with pytest.raises(UserError, match="unknown resize rule 'squash'"):
        open_model(tmp_path / "model.keras")
    (tmp_path / "model_card.json").write_text(json.dumps({"input": {"resize": "crop"}}))
    assert open_model(tmp_path / "model.keras").resize == "crop"
    (tmp_path / "model_card.json").unlink()  # a model file copied on its own: said, not silently 'stretch'
    with pytest.warns(DataWarning, match="no model_card.json beside model.keras and no card inside it: assuming .*'stretch' and numbering"):
        assert open_model(tmp_path / "model.keras").resize == "stretch"
    from PIL import Image

    from pipeline.export.runtime import predict_files
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "model_card.json").write_text(json.dumps({"class_names": ["x"]}))
    with pytest.raises(UserError, match=r"model.keras's class names \(model_card.json beside it\) are 1 but the model "
                                        r"outputs 2"):
        predict_files(open_model(tmp_path / "model.keras"), [str(tmp_path / "a.png")])


def test_an_onnx_file_on_its_own_reads_the_card_it_carries(head_run, tmp_path):
    """model.onnx copied without its folder: the card in its metadata gives the resize rule and classes
    (it fell back to 'stretch' without a word, and a crop export predicted other classes)."""
    if not _has(*FORMAT_NEEDS["onnx"]):
        pytest.skip(f"onnx export needs {FORMAT_NEEDS['onnx']}")
    import json
    import shutil
    import warnings

    import onnx

    from pipeline.errors import DataWarning
    from pipeline.export import export_run, open_model
    from pipeline.inference.apply import load_run

    run_id, _, cache = head_run
    result = export_run(load_run(cache, run_id), "onnx", tmp_path / "onnx")
    proto = onnx.load(str(result.model_path))
    for prop in proto.metadata_props:
        if prop.key == "model_card":
            card = json.loads(prop.value)
            card["input"]["resize"] = "crop"
            prop.value = json.dumps(card)
    alone = tmp_path / "alone"
    alone.mkdir()
    onnx.save(proto, str(alone / "model.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        model = open_model(alone / "model.onnx")
    assert model.resize == "crop" and model.class_names == ["ants", "bees"] and model.card["run_id"] == run_id
    shutil.copy(result.model_path.parent / "model_card.json", alone)  # the file beside it still wins
    assert open_model(alone / "model.onnx").resize == "stretch"


@pytest.mark.skipif(not _has("tensorflow"), reason="TFLite conversion needs TensorFlow")
def test_a_tflite_holding_tensorflow_ops_is_refused_before_anything_runs(tmp_path):
    """Select-TF ("Flex") ops inside a .tflite can write files like a SavedModel: refused in one line."""
    import tensorflow as tf

    written = tmp_path / "written.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.uint8)])
        def serve(self, x):
            tf.io.write_file(str(written), tf.strings.as_string(tf.reduce_sum(tf.cast(x, tf.int32))))
            return tf.nn.softmax(tf.reshape(tf.cast(x, tf.float32), [1, -1])[:, :2])

    module = Writer()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    (tmp_path / "flex.tflite").write_bytes(converter.convert())
    make_folder(tmp_path / "d", per_class=1, splits=())
    img = str(next((tmp_path / "d").rglob("*.jpg")))
    res = run_cli("predict", "--model", str(tmp_path / "flex.tflite"), img)
    assert res.returncode == 2 and "FlexWriteFile" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not written.exists()


def test_written_files_and_folders_follow_the_umask(head_run, tmp_path):
    """Atomic writes and the export's staging folder were made by tempfile (files 0600, folders 0700)
    and kept those modes: a cache or export shared with other users could not be read by them."""
    import os
    import stat

    from pipeline.atomic import write_text_atomic

    run_id, _, cache = head_run
    old = os.umask(0o022)
    try:
        out = tmp_path / "ship"
        exp = run_cli("export", "--run", run_id, "--out", str(out), "--cache-dir", str(cache))
        write_text_atomic(tmp_path / "run.json", "{}")
    finally:
        os.umask(old)
    assert exp.returncode == 0, exp.stderr
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o755 and {p.name: mode(p) for p in out.iterdir()} == {
        "labels.txt": 0o644, "model.keras": 0o644, "model_card.json": 0o644}
    assert mode(tmp_path / "run.json") == 0o644


def test_predict_shows_each_batch_as_it_is_done_and_ctrl_c_keeps_the_csv_so_far(head_run, tmp_path, monkeypatch):
    """predict printed nothing until every image was done, and Ctrl-C lost all of it, CSV included."""
    import dataclasses

    from click.testing import CliRunner

    import pipeline.cli.predict_cmds as predict_cmds
    from pipeline.cli import cli
    from pipeline.export import export_run
    from pipeline.inference.apply import load_run

    run_id, data, cache = head_run
    export_run(load_run(cache, run_id), "keras", tmp_path / "k")
    images = [str(p) for p in sorted((data / "val" / "ants").iterdir())[:6]]
    real, calls = predict_cmds.open_model, []

    def second_batch_interrupted(path, **kw):
        model = real(path, **kw)

        def call(x):
            calls.append(len(x))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return model._call(x)
        return dataclasses.replace(model, _call=call)

    monkeypatch.setattr(predict_cmds, "open_model", second_batch_interrupted)
    out = tmp_path / "p.csv"
    got = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "k" / "model.keras"), *images, "--batch-size",
                                   "2", "--csv", str(out)])
    assert got.exit_code == 130, got.output
    assert [line.split("\t")[0] for line in got.output.splitlines() if "\t" in line] == images[:2], got.output
    assert "the 2 of 6 predictions made before the interrupt" in got.output
    assert [r["path"] for r in csv.DictReader(out.open())] == images[:2]


def test_the_converters_tracebacks_and_a_missing_backend_stay_off_the_terminal(head_run, tmp_path):
    """tf2onnx logged two whole tracebacks for an optimizer pass it skips on MobileNetV3 (the export
    succeeded); export --backend torch without torch was a bare ModuleNotFoundError."""
    import importlib.util
    import logging

    from pipeline.export.exporter import _quiet

    with _quiet():
        assert not logging.getLogger("tf2onnx.optimizer.transpose_optimizer").isEnabledFor(logging.WARNING)
    assert logging.getLogger("tf2onnx").isEnabledFor(logging.WARNING)  # as it was, after the export
    if importlib.util.find_spec("torch") is None:
        run_id, _, cache = head_run
        got = run_cli("export", "--run", run_id, "--backend", "torch", "--out", str(tmp_path / "t"),
                      "--cache-dir", str(cache), isolated=True)
        assert got.returncode == 2 and "torch is not installed" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_labels_and_cards_beside_a_model_are_read_as_people_save_them_and_checked(head_run, tmp_path):
    """labels.txt saved by Notepad (a byte-order mark, CRLF) named the first class '\\ufeffants'; Latin-1
    was a UnicodeDecodeError; labels.txt disagreeing with the model's own names was silent; a card's
    class_names of 5 was a TypeError, of "xyz" three classes x, y, z; MODEL.KERAS was an unknown type."""
    import shutil
    import warnings

    from pipeline.errors import DataWarning, UserError
    from pipeline.export import export_run
    from pipeline.export.runtime import open_model
    from pipeline.inference.apply import load_run

    run_id, _, cache = head_run
    folder = tmp_path / "k"
    export_run(load_run(cache, run_id), "keras", folder)
    labels, card = folder / "labels.txt", folder / "model_card.json"
    labels.write_bytes(b"\xef\xbb\xbfants\r\nbees\r\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert open_model(folder / "model.keras").class_names == ["ants", "bees"]
    labels.write_bytes(b"fourmis\nabeilles\n")
    with pytest.warns(DataWarning, match=r"labels.txt beside model.keras names the classes 'fourmis', 'abeilles' but "
                                         r"the model itself names 'ants', 'bees'"):
        assert open_model(folder / "model.keras").class_names == ["fourmis", "abeilles"]
    labels.write_bytes(b"fourmis\nabeill\xe9s\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        open_model(folder / "model.keras")
    labels.unlink()
    for bad in (5, "xyz", ["a\tb", "c"]):
        card.write_text(json.dumps({**json.loads(card.read_text()), "class_names": bad}))
        with pytest.raises(UserError, match="does not name the classes as a list of text"):
            open_model(folder / "model.keras")
    shutil.copy(folder / "model.keras", tmp_path / "MODEL.KERAS")
    with pytest.raises(UserError, match="Keras opens only files whose name ends in .keras, in lower case"):
        open_model(tmp_path / "MODEL.KERAS")
