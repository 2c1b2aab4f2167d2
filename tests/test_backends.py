"""Every Keras backend: features agree across TensorFlow, JAX and PyTorch (real EfficientNet-Lite0
ImageNet weights), and extract, fit-head (logistic, dense, sweep), finetune, evaluate and predict
run on JAX with `import tensorflow` made to fail.

Each backend runs in its own process (Keras picks its backend once per process). Backends that
are not installed are skipped with the reason; CI installs TensorFlow and JAX (CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
PRESENT = [b for b, mod in BACKENDS.items() if importlib.util.find_spec(mod) is not None]

# Make `import tensorflow` (and any submodule) fail in the child process.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow is blocked in this test")
sys.meta_path.insert(0, _Block())
"""

# ...then run the CLI commands sent one JSON line at a time on stdin, in this one process (click's runner),
# answering each with a `@@result` line: its exit code and output. Keras and JAX load once for all the
# commands of a test rather than once per command (~15 s each).
BLOCKED_SESSION = _BLOCK + """
import json, traceback
from click.testing import CliRunner
from pipeline.cli import cli
for line in sys.stdin:
    r = CliRunner(capture="fd").invoke(cli, json.loads(line), prog_name="cli.py")  # fd 1 and 2 too
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    print("@@result " + json.dumps({"code": r.exit_code, "stdout": r.stdout, "stderr": err}), flush=True)
"""


class BlockedSession:
    """A child process on JAX with TensorFlow blocked, running CLI commands (`run`) one after another;
    each answers within `timeout` seconds, and the process must end cleanly (`close`: exit 0, no traceback)."""

    def __init__(self, cwd: Path, timeout: float = 600) -> None:
        self.timeout = timeout
        self.log = cwd / "session-stderr.txt"  # what the process itself writes (its end, if it dies)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", BLOCKED_SESSION], env=_env("jax"), cwd=cwd, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout] + [self.lines.put(None)],
                         daemon=True).start()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()
        while True:
            try:
                line = self.lines.get(timeout=self.timeout)
            except queue.Empty:
                raise AssertionError(f"{args} took over {self.timeout} s") from None
            if line is None:
                raise AssertionError(f"the session ended (exit {self.proc.wait()}) during {args}: "
                                     f"{self.log.read_text()[-3000:]}")
            if line.startswith("@@result "):
                got = json.loads(line[len("@@result "):])
                return subprocess.CompletedProcess(["cli.py", *args], got["code"], got["stdout"], got["stderr"])

    def close(self) -> int:
        """End the session; its exit code (a crash at shutdown shows here)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


FEATURES = """
import json, sys
import numpy as np
from pipeline.extract import ExtractRequest, RunOptions, extract
from pipeline.features.store import FeatureFile
from pipeline.inference.embed import image_paths, imagenet_top_k
folder, cache, out = sys.argv[1:4]
r = extract(ExtractRequest(data=folder, backbone="efficientnet_lite0", image_size=96, dtype="float32"),
            RunOptions(cache_dir=cache, progress=False, batch_size=4))
with FeatureFile(r.path) as ff:
    np.save(out + ".npy", ff.load())
    paths = list(ff.paths)
top, _ = imagenet_top_k("efficientnet_lite0", "imagenet", image_paths([folder]), k=1)
json.dump({"paths": paths, "top1": {p: t[0][0] for p, t in top}, "key": r.key,
           "tf_loaded": "tensorflow" in sys.modules}, open(out + ".json", "w"))
"""


def _env(backend: str) -> dict[str, str]:
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
                CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five real photos (scikit-learn and scikit-image samples) in two class folders."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("photos")
    pics = {"a/china.jpg": load_sample_image("china.jpg"), "a/flower.jpg": load_sample_image("flower.jpg"),
            "b/astronaut.jpg": skimage.data.astronaut(), "b/coffee.jpg": skimage.data.coffee(),
            "b/chelsea.jpg": skimage.data.chelsea()}
    for name, arr in pics.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / name, quality=95)
    return root


@pytest.fixture(scope="module")
def per_backend(photos, tmp_path_factory) -> dict[str, dict]:
    out = {}
    for backend in PRESENT:
        work = tmp_path_factory.mktemp(backend)
        proc = subprocess.run([sys.executable, "-c", FEATURES, str(photos), str(work / "cache"), str(work / "f")],
                              env=_env(backend), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads((work / "f.json").read_text())
        info["features"] = np.load(work / "f.npy")
        out[backend] = info
    return out


def test_features_agree_across_backends_and_the_others_never_load_tensorflow(per_backend):
    """One test over both facts, so that the extraction on every backend runs once, not on each test worker."""
    for backend in per_backend:
        if backend != "tensorflow":
            assert not per_backend[backend]["tf_loaded"], backend
    if len(per_backend) < 2:
        pytest.skip(f"only {PRESENT} installed; parity needs two of {list(BACKENDS)}")
    names = list(per_backend)
    ref = per_backend[names[0]]
    for other in names[1:]:
        got = per_backend[other]
        assert got["paths"] == ref["paths"]
        a, b = ref["features"], got["features"]
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.999, (names[0], other, cos)
        assert got["top1"] == ref["top1"], (names[0], other)
        assert got["key"] != ref["key"]  # the backend is part of the cache key


def test_torch_backend_or_reason():
    if "torch" not in PRESENT:
        pytest.skip("PyTorch is not installed (its wheel is too large for CI); pip install -e '.[torch]'")
    assert "torch" in PRESENT


@pytest.mark.skipif("jax" not in PRESENT, reason="JAX is not installed: pip install -e '.[jax]'")
def test_every_stage_runs_on_jax_with_tensorflow_blocked(photos, tmp_path):
    cache = str(tmp_path / "cache")
    session = BlockedSession(tmp_path)
    try:
        _every_stage(session, photos, tmp_path, cache)
    finally:
        code = session.close()
    assert code == 0 and "Traceback" not in session.log.read_text(), session.log.read_text()[-3000:]


def _every_stage(session: BlockedSession, photos: Path, tmp_path: Path, cache: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = session.run(*args)
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    common = ("--data", str(photos), "--image-size", "64", "--cache-dir", cache, "--no-progress")
    first = cli("extract", *common)
    assert "wrote" in first.stdout
    assert "cache hit" in cli("extract", *common).stdout
    top = cli("predict", "--backbone", "efficientnet_lite0", str(photos / "b" / "chelsea.jpg"), "--top-k", "1")
    assert "cat" in top.stdout.lower()  # tabby / tiger cat / Egyptian cat
    fit = cli("fit-head", *common, "--head", "logistic", "--C", "1.0")
    run_id = re.search(r"run (\S+) saved", fit.stdout).group(1)
    ev = cli("evaluate", "--run", run_id, "--data", str(photos), "--cache-dir", cache)
    assert "acc" in ev.stdout.lower()
    pred = cli("predict", "--run", run_id, str(photos / "a"), "--cache-dir", cache)
    assert "china.jpg" in pred.stdout
    # stages 2-3 on JAX with TensorFlow blocked: dense head, a parallel sweep, a fine-tune
    dense = cli("fit-head", *common, "--head", "dense", "--hidden", "16", "--epochs", "3", "--early-stopping", "2")
    assert "run" in dense.stdout and "val" in dense.stdout
    sweep = cli("fit-head", *common, "--head", "dense", "--sweep", "--epochs", "2", "--jobs", "2")
    assert "best saved in run" in sweep.stdout
    ft = cli("finetune", "--run", run_id, "--epochs", "1", "--batch-size", "4", "--no-progress",
             "--cache-dir", cache)
    assert "val   accuracy" in ft.stdout and "1 epoch(s)" in ft.stdout
    # serving and tracking on JAX with TensorFlow blocked: ONNX export (jax2onnx), predict --model, MLflow
    import importlib.util
    if all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnx", "onnxruntime")):
        exp = cli("export", "--run", run_id, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--cache-dir", cache)
        assert "max probability difference" in exp.stdout
        by_model = cli("predict", "--model", str(tmp_path / "onnx" / "model.onnx"), str(photos / "a"))
        assert [l.split("\t")[1].split()[0] for l in by_model.stdout.splitlines()] == \
            [l.split("\t")[1].split()[0] for l in pred.stdout.splitlines()]
        refused = session.run("export", "--run", run_id, "--format", "savedmodel", "--cache-dir", cache)
        assert refused.returncode == 2 and "needs TensorFlow" in refused.stderr
    if importlib.util.find_spec("mlflow"):
        logged = cli("fit-head", *common, "--head", "dense", "--hidden", "8", "--epochs", "2", "--mlflow")
        assert "logged to MLflow run" in logged.stderr and "MLflow logging failed" not in logged.stderr


DENSE = """
import json, sys
import numpy as np
from pipeline.heads.dense import DenseHead, compile_settings
rng = np.random.default_rng(0)
centers = rng.normal(0, 5, (3, 16))
y = np.repeat(np.arange(3), 40)
X = (centers[y] + rng.normal(0, 0.5, (120, 16))).astype(np.float32)
head = DenseHead(hidden=(32,), epochs=20, batch_size=16).fit(X[::2], y[::2], X[1::2], y[1::2], class_names=list("abc"))
p = head.predict_proba(X[1::2])
json.dump({"settings": compile_settings(), "sums": float(np.abs(p.sum(1) - 1).max()),
           "acc": float((p.argmax(1) == y[1::2]).mean()), "epochs": head.n_epochs_}, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("backend", PRESENT)
def test_dense_head_trains_and_predicts_on_each_backend(backend, tmp_path):
    """The dense head on every installed backend (PyTorch takes one step per call and returns
    tensors that carry grad; JAX must be jitted to be fast)."""
    out = tmp_path / "dense.json"
    proc = subprocess.run([sys.executable, "-c", DENSE, str(out)], env=_env(backend), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["sums"] < 1e-4 and got["acc"] > 0.9 and got["epochs"] == 20
    assert got["settings"]["steps_per_execution"] == (1 if backend == "torch" else 32)
    assert got["settings"]["jit_compile"] == (backend == "jax")
