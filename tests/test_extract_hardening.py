"""Extraction under hostile conditions: junk features refused where they are made, size caps,
disk-full, clean-up after kills, honest resume messages, skip reasons."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, plan
from pipeline.extract import runners
from pipeline.features.store import ChunkDir, FeatureFile

from conftest import make_folder, run_cli
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


def test_huge_image_size_is_refused_quickly(tiny_split_folder, tmp_path):
    proc = run_cli("extract", "--data", str(tiny_split_folder), "--image-size", "99999", "--weights", "none",
                   "--cache-dir", str(tmp_path / "c"), timeout=60)
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

    monkeypatch.setattr("pipeline.extract.worker.assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4))
    monkeypatch.undo()
    messages = []
    r = extract(req(tiny_split_folder), opts(tmp_path / "c", chunk_units=4), log=messages.append)
    assert r.resumed_from == 24 and r.computed == 0 and r.images_per_s == 0.0
    assert messages == ["resuming: 24 of 24 images already extracted"]


def test_missing_and_non_image_files_are_skipped_with_reasons(tmp_path):
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
    proc = run_cli(*common, "--backend", "jax", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.split("wrote ")[1].split(" (")[0]
    with FeatureFile(path) as ff:
        assert ff.attrs["backend"] == "jax" and len(ff) == 24
    tf_run = run_cli(*common, "--backend", "tensorflow")
    assert "wrote" in tf_run.stdout and path not in tf_run.stdout  # another backend, another key
    bad = run_cli(*common, "--workers", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
