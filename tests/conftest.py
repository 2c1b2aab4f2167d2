"""Shared fixtures: tiny generated image sets, the real ../shared data, and a CLI runner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _img(rng: np.random.Generator, cls: int, size: int = 24) -> np.ndarray:
    """A small image whose colour depends on the class, so classes are separable."""
    base = np.zeros((size, size + 4, 3), np.float32)
    base[..., cls % 3] = 170
    noise = rng.normal(0, 30, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image(path: Path, arr: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if fmt == "gray":
        im.convert("L").save(path, "PNG")
    elif fmt == "cmyk":
        im.convert("CMYK").save(path, "JPEG")
    elif fmt == "rgba":
        im.convert("RGBA").save(path, "PNG")
    elif fmt == "gif":
        frames = [im.convert("P"), Image.fromarray(255 - arr).convert("P")]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
    else:
        im.save(path, fmt.upper())


def make_folder(root: Path, per_class: int = 6, classes=("ants", "bees"), splits=("train", "val"),
                seed: int = 0) -> Path:
    """root/<split>/<class>/img_k.jpg (or root/<class>/... when splits is empty)."""
    rng = np.random.default_rng(seed)
    for split in splits or [None]:
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            for k in range(per_class):
                write_image(folder / f"img_{k:03d}.jpg", _img(rng, c), "jpeg")
    return root


@pytest.fixture
def tiny_split_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", per_class=6)


@pytest.fixture
def tiny_flat_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "flat", per_class=10, splits=())


@pytest.fixture
def mixed_formats_folder(tmp_path: Path) -> Path:
    """One class folder per class, every supported format, plus bad files that must be skipped."""
    root = tmp_path / "mixed"
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b")):
        d = root / name
        for fmt, ext in (("jpeg", "jpg"), ("png", "png"), ("bmp", "bmp"), ("gif", "gif"), ("gray", "png"),
                         ("cmyk", "jpg"), ("rgba", "png")):
            write_image(d / f"{fmt}.{ext}", _img(rng, c), fmt)
    good = io.BytesIO()
    Image.fromarray(_img(rng, 0)).save(good, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "a" / "damaged_scan.jpg").write_bytes(damage_scan(good.getvalue()))  # kept: libjpeg repairs it
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def damage_scan(jpeg: bytes) -> bytes:
    """A stray restart marker in the middle of a JPEG's scan data: header and end intact, libjpeg
    prints `Corrupt JPEG data: premature end of data segment` and decodes the rest."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    mid = (start + len(jpeg) - 2) // 2
    return jpeg[:mid] + b"\xff\xd0" + jpeg[mid:]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real photo data not found at {SHARED} (../shared is absent on this machine)")
    return SHARED


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300, isolated: bool = False) -> subprocess.CompletedProcess:
    """Run `python cli.py ARGS` as a user would; returns the completed process (text output).

    By default in this process, through click's test runner: the same group, commands, one-line
    errors, exit codes, stdout and stderr (what C code and child processes write to fd 1 and 2 too),
    without importing TensorFlow again for every call (5-10 s each, the largest part of the suite's
    time). `isolated=True` starts a fresh `python cli.py`, for what only a process of its own shows:
    start-up and shutdown (a crash at exit), state a command leaves in its process (MLflow's tracking
    URI, Ray, the Keras backend), TensorFlow's own first import."""
    if isolated:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=env)
    return _in_process(args, Path(cwd), timeout)


def run_cli_isolated(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`run_cli(..., isolated=True)`: for modules whose every command needs a process of its own."""
    return run_cli(*args, isolated=True, **kwargs)


def _in_process(args: tuple[str, ...], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """`cli.py ARGS` run by click's CliRunner in `cwd`, as a fresh process would run it where it can be:
    fd 1 and 2 captured, Python's default warning filters with the CLI's one-line warnings and every
    other warning printed to stderr (pytest records them otherwise), tracebacks of threads and of
    unraisable exceptions printed too, the environment restored after. A command still running after
    `timeout` seconds ends the test worker with every thread's traceback (faulthandler), as a
    subprocess's timeout failed the test. An exception that escaped the group (it never should) is
    appended to stderr as the traceback a process would print, with exit code 1."""
    import faulthandler
    import threading
    import traceback
    import warnings
    from unittest import mock

    from click.testing import CliRunner

    from pipeline.cli import cli, group
    from pipeline.errors import DataWarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DataWarning):
            group.one_line_warning(message, category, filename, lineno, file, line)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    before, hooks = os.getcwd(), (threading.excepthook, sys.unraisablehook)
    os.chdir(cwd)
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with warnings.catch_warnings(), mock.patch.dict(os.environ):
            warnings.resetwarnings()  # then Python's defaults, as a fresh process has them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            # set once per process by pipeline.data.decode when it loads Pillow: lost with pytest's per-test filters
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            warnings.showwarning = show
            threading.excepthook, sys.unraisablehook = threading.__excepthook__, sys.__unraisablehook__
            result = CliRunner(capture="fd").invoke(cli, list(args), prog_name="cli.py", catch_exceptions=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
        threading.excepthook, sys.unraisablehook = hooks
        os.chdir(before)
    stderr, code = result.stderr, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["cli.py", *args], code, result.stdout, stderr)


@pytest.fixture(autouse=True)
def _no_outside_mlflow(monkeypatch):
    """Tests never log to a tracking server the developer's shell points at; MLflow tests set their own."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _fresh_models():
    """Each test builds its own feature model: the one a process keeps for its next extraction
    (`release_models`) would let one test's fake runner or model reach the next."""
    from pipeline.extract.mapper import release_models
    release_models()
    yield
    release_models()
