"""Extraction under hostile conditions: junk features refused where they are made, size caps,
disk-full, clean-up after kills, honest resume messages, skip reasons."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, plan
from pipeline.extract import mapper as runners
from pipeline.features.store import ChunkDir, FeatureFile

from conftest import ROOT, make_folder, run_cli
from helpers_features import write_cache

FAST = dict(backbone="mobilenetv2", weights="none", image_size=32, dtype="float32")


def req(data, **kw) -> ExtractRequest:
    return ExtractRequest(data=str(data), **{**FAST, **kw})


def opts(cache, **kw) -> RunOptions:
    return RunOptions(cache_dir=cache, progress=False, batch_size=4, **kw)


class _Fixed(runners.Runner):
    """A runner whose features are a fixed function of the batch (to fake a misbehaving backbone)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def _start(self, x):
        return self.fn(x)

    def _finish(self, out):
        return out


@pytest.mark.parametrize("fn,message", [
    (lambda x: np.zeros((len(x), 1280), np.float32), "same feature vector"),
    (lambda x: np.full((len(x), 1280), np.nan, np.float32), "NaN or inf"),
    (lambda x: np.random.default_rng(0).normal(0, 1e-9, (len(x), 1280)).astype(np.float32), "float16"),
    (lambda x: np.full((len(x), 1280), 1e6, np.float32) * np.arange(1, len(x) + 1)[:, None], "overflow"),
])
def test_junk_features_fail_the_extraction_and_leave_nothing(tiny_split_folder, tmp_path, monkeypatch, fn, message):
    monkeypatch.setattr(runners, "make_runner", lambda *a, **k: _Fixed(fn))
    r = req(tiny_split_folder, dtype="float16")
    with pytest.raises(UserError, match=message):
        extract(r, opts(tmp_path / "c"))
    p = plan(r, tmp_path / "c")
    assert not p.path.exists() and not p.parts.exists()  # no junk file, no partial left behind


def test_fit_head_refuses_a_constant_cache_in_one_line(tmp_path):
    import h5py
    path = write_cache(tmp_path / "cache", n_images=40, dim=8)
    with h5py.File(path, "r+") as f:  # as an older version could have stored it: all zeros
        f["features"][...] = 0
    proc = run_cli("fit-head", "--cache", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "same feature vector" in proc.stderr and "Traceback" not in proc.stderr
    assert f"cache rm {path.name} --cache-dir {(tmp_path / 'cache').resolve()}`" in proc.stderr  # not the default cache


def test_huge_image_size_is_refused_quickly(tiny_split_folder, tmp_path):
    proc = run_cli("extract", "--data", str(tiny_split_folder), "--image-size", "99999", "--weights", "none",
                   "--cache-dir", str(tmp_path / "c"), timeout=60, isolated=True)  # were it built: not in the test's process
    assert proc.returncode == 2 and "--allow-large" in proc.stderr and "Traceback" not in proc.stderr


def test_disk_full_is_one_line_and_keeps_finished_chunks(tiny_split_folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ChunkDir.write

    def full_disk(self, number, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "chunk.npz"))
        original(self, number, arrays)

    monkeypatch.setattr(ChunkDir, "write", full_disk)
    with pytest.raises(UserError, match="no space left"):
        extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4))
    p = plan(req(tiny_split_folder), tmp_path / "c")
    assert len(list(p.parts.glob("chunk-*.npz"))) == 1  # the finished chunk is kept for the rerun


def test_leftovers_of_kills_are_listed_then_cleaned(tiny_split_folder, tmp_path):
    cache = tmp_path / "c"
    r = extract(req(tiny_split_folder), opts(cache))
    p = plan(req(tiny_split_folder), cache)
    tmp = p.path.with_name(f".{p.path.name}.abc123.h5.tmp")  # a killed assembly's temporary file
    tmp.write_bytes(b"half")
    (p.parts).mkdir()  # parts of a key whose file was already renamed into place
    ls = run_cli("cache", "ls", "--cache-dir", str(cache))
    assert "temporary" in ls.stdout and "partial" in ls.stdout
    again = extract(req(tiny_split_folder), opts(cache))
    assert again.cache_hit and again.path == r.path
    assert not tmp.exists() and not p.parts.exists()


def test_resume_after_a_kill_before_assembly_reports_honestly(tiny_split_folder, tmp_path, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.extract.runner.assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4))
    monkeypatch.undo()
    messages = []
    r = extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4), log=messages.append)
    assert r.resumed_from == 24 and r.computed == 0 and r.images_per_s == 0.0
    assert messages == ["resuming: 24 of 24 images already extracted"]


def test_missing_and_non_image_files_are_skipped_with_reasons(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", per_class=4, splits=())
    (data / "ants" / "notes.txt").write_text("hello")
    (data / "bees" / "photo.jpg").write_bytes(b"")
    manifest = tmp_path / "list.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(data.rglob("*.*"))]
    manifest.write_text("path,label\n" + "\n".join(rows + ["d/ants/gone.jpg,ants"]) + "\n")
    proc = run_cli("extract", "--data", str(manifest), "--backbone", "mobilenetv2", "--image-size", "32",
                   "--weights", "none", "--dtype", "float32", "--no-progress", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    for reason in ("missing file", "empty file", "not an image"):
        assert reason in proc.stderr
    path = proc.stdout.split("wrote ")[1].split(" (")[0]
    with FeatureFile(path) as ff:
        assert len(ff.skipped) == 3 and len(ff) == 8
    assert "(8 rows; computed 8 at" in proc.stdout, proc.stdout  # the three skipped files are not "computed"
    again = run_cli("extract", "--data", str(manifest), "--backbone", "mobilenetv2", "--image-size", "32",
                    "--weights", "none", "--dtype", "float32", "--no-progress", "--cache-dir", str(tmp_path / "c"))
    assert "cache hit" in again.stdout  # and it still says what the cache left out, which it said only once
    assert "note: when this cache was made it skipped 3 file(s)" in again.stderr and "can be read now" not in again.stderr
    # a file skipped for a reason that can change without its size or date (a permission granted later):
    # the key does not see that, so the cache hit's note says how to compute it
    import pipeline.data.decode as decode

    victim, real = sorted((data / "ants").glob("*.jpg"))[0], decode.read_file

    def denied(path: str) -> bytes:
        if path == str(victim):
            raise decode.DecodeError(decode.DENIED)
        return real(path)

    args = ["extract", "--data", str(data), "--backbone", "mobilenetv2", "--image-size", "32", "--weights", "none",
            "--dtype", "float32", "--no-progress", "--cache-dir", str(tmp_path / "c2")]
    monkeypatch.setattr(decode, "read_file", denied)
    first = run_cli(*args)
    assert first.returncode == 0 and f"{victim} (permission denied)" in first.stderr, first.stderr
    monkeypatch.undo()
    hit = run_cli(*args)
    assert "cache hit" in hit.stdout and "skipped 3 file(s)" in hit.stderr, hit.stderr
    assert f"some of them can be read now (e.g. {victim})" in hit.stderr and "`touch` those" in hit.stderr
    os.utime(victim)  # as the note says: the next run computes that image alone and reuses the rest
    touched = run_cli(*args)
    assert re.search(r"reused \d+ unchanged from .*computed 1 at", touched.stdout), touched.stdout + touched.stderr



def test_allow_large_lifts_the_size_cap():
    from pipeline.extract.plan import MAX_IMAGE_SIZE, check_size
    check_size(MAX_IMAGE_SIZE)
    with pytest.raises(UserError, match="--allow-large"):
        check_size(MAX_IMAGE_SIZE + 1)
    check_size(MAX_IMAGE_SIZE + 1, allow_large=True)


@pytest.mark.skipif(__import__("importlib").util.find_spec("jax") is None, reason="JAX is not installed")
def test_backend_and_workers_options_reach_the_extraction(tiny_split_folder, tmp_path):
    common = ("extract", "--data", str(tiny_split_folder), "--backbone", "mobilenetv2", "--image-size", "32",
              "--weights", "none", "--dtype", "float32", "--no-progress", "--cache-dir", str(tmp_path / "c"))
    proc = run_cli(*common, "--backend", "jax", "--workers", "1", isolated=True)  # Keras picks a backend per process
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.split("wrote ")[1].split(" (")[0]
    with FeatureFile(path) as ff:
        assert ff.attrs["backend"] == "jax" and len(ff) == 24
    tf_run = run_cli(*common, "--backend", "tensorflow")
    assert "wrote" in tf_run.stdout and path not in tf_run.stdout  # another backend, another key
    bad = run_cli(*common, "--workers", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_too_little_space_for_the_assembly_is_one_line_before_hdf5_writes(tiny_split_folder, tmp_path, monkeypatch):
    """A disk that would fill up inside HDF5 leaves the library unable to close the file (the process
    crashed on exit): assembly checks the free space first, keeps the chunks and leaves no file."""
    import collections
    import shutil

    from pipeline.features import store

    real = shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage",
                        lambda p: collections.namedtuple("U", "total used free")(real(p).total, real(p).used, 1000))
    with pytest.raises(UserError, match="no space left"):
        extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4))
    p = plan(req(tiny_split_folder), tmp_path / "c")
    assert list(p.parts.glob("chunk-*.npz")) and not p.path.exists()
    assert not list(p.path.parent.glob(".*.tmp"))


_FULL_DISK_CHILD = r"""
import sys
import numpy as np
from pathlib import Path
from pipeline.errors import UncleanFileError
from pipeline.features import store
store.check_space = lambda target, need: None          # as if another writer filled the disk meanwhile
chunks = store.ChunkDir(Path(sys.argv[1]), chunk_units=1000)
rng = np.random.default_rng(0)
n = 1990  # 2 MB of features: the data fits, the file's closing flush does not (what crashed on exit)
for c in range(2):
    idx = np.arange(c * 1000, min(n, (c + 1) * 1000))
    chunks.write(c, {"features": rng.random((idx.size, 512)).astype(np.float16), "index": idx.astype(np.int32),
                     "views": np.zeros(idx.size, np.int8), "skipped_index": np.zeros(0, np.int32),
                     "skipped_reason": np.zeros(0, "<U1")})
items = store.ItemTable([f"img{i}.jpg" for i in range(n)], rng.integers(0, 2, n), ["train"] * n, ["a", "b"])
try:
    store.assemble(chunks, Path(sys.argv[2]) / "x.h5", items, {"key": "k"})
except UncleanFileError as e:
    print("unclean", e.errno, e.filename, flush=True)
    import os
    os._exit(0)  # what the CLI does after its line (test below): a normal exit could crash in HDF5
"""


def test_a_disk_filling_up_inside_hdf5_is_reported_as_unclean_and_the_cli_leaves_without_crashing(tmp_path):
    """On a real 2 MB tmpfs (needs root to mount; skipped elsewhere): the HDF5 write fails, assembly
    raises UncleanFileError naming the target, and the CLI's exit for it is one line and code 2 (a
    plain exit crashed in HDF5's shutdown: exit -11)."""
    import os
    import subprocess
    import sys

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        child = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "parts"), str(mount)],
                               capture_output=True, text=True, env=env, timeout=120)
        assert f"unclean 28 {mount / 'x.h5'}" in child.stdout, child.stdout + child.stderr
        assert not list(mount.iterdir())                  # no temporary file left
        cli_child = ("import sys; from pipeline.errors import UncleanFileError; import pipeline.extract.distributor as w\n"
                     "def full(*a, **k): raise UncleanFileError(28, 'No space left on device', '/mnt/c/x.h5')\n"
                     "w.run_recorded = full\nsys.argv = ['cli.py'] + sys.argv[1:]\nfrom pipeline.cli import main\nmain()")
        data = make_folder(tmp_path / "d", per_class=1, splits=())
        proc = subprocess.run([sys.executable, "-c", cli_child, "extract", "--data", str(data), "--cache-dir",
                               str(tmp_path / "c"), "--backbone", "mobilenetv2", "--weights", "none", "--image-size",
                               "32", "--dtype", "float32", "--no-progress"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: no space left on the device holding /mnt/c/x.h5")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
