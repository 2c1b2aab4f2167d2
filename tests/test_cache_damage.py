"""Crafted or damaged cache files are refused in one line that names the file and what is wrong,
within seconds (issue 24: a 10^9-row declaration hung fit-head; a non-JSON class_names attribute made
a run with classes '[', 'a', ...), by every reader: the library's FeatureFile, `cache ls`, `cache
info`, `fit-head` and `audit`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

# each command in a process of its own: HDF5 reports damage from C on fd 2, and a file it cannot close
# ends the process, so what C code prints and how the process ends are what is checked
from conftest import run_cli_isolated as run_cli
from helpers_features import write_cache

from pipeline.errors import UserError
from pipeline.features.store import FeatureFile


def _replace(f: h5py.File, name: str, **kw) -> None:
    del f[name]
    f.create_dataset(name, **kw)


def _huge(f: h5py.File) -> None:
    """Every per-row dataset and the features declare 10^9 rows (nothing written: the file stays small)."""
    n = 10**9
    _replace(f, "features", shape=(n, 16), dtype="f2", chunks=(4096, 16))
    for name in ("labels", "views", "index"):
        _replace(f, name, shape=(n,), dtype="i4", chunks=(65536,))
    for name in ("paths", "splits"):
        _replace(f, name, shape=(n,), dtype=h5py.string_dtype(), chunks=(65536,))


DAMAGE = {
    "huge declared shape": (_huge, "declare 1,000,000,000 rows"),
    "class_names not JSON": (lambda f: f.attrs.__setitem__("class_names", "[a, b"), "class_names"),
    "short class_names": (lambda f: f.attrs.__setitem__("class_names", '["a"]'), "labels run from"),
    "labels out of range": (lambda f: f["labels"].__setitem__(0, 99), "labels run from"),
    "float labels": (lambda f: _replace(f, "labels", data=np.zeros(f["labels"].shape, "f4")), "not integers"),
    "string features": (lambda f: _replace(f, "features", data=np.array(["x"] * f["features"].shape[0], "S1")),
                        "not floating-point"),
    "rows disagree": (lambda f: _replace(f, "labels", data=np.zeros(5, "i4")), "there are 120 feature rows"),
    "integer splits": (lambda f: _replace(f, "splits", data=np.zeros(f["splits"].shape, "i4")), "not strings"),
    "missing labels": (lambda f: f.__delitem__("labels"), "'labels' dataset is missing"),
    "missing features": (lambda f: f.__delitem__("features"), "'features' dataset is missing"),
    "missing splits": (lambda f: f.__delitem__("splits"), "'splits' dataset is missing"),
    "wiped attributes": (lambda f: [f.attrs.__delitem__(k) for k in list(f.attrs)], "attributes"),
    "request not JSON": (lambda f: f.attrs.__setitem__("request", "{oops"), "request attribute"),
    "key_material a list": (lambda f: f.attrs.__setitem__("key_material", "[1, 2]"), "key_material attribute"),
    "other schema": (lambda f: f.attrs.__setitem__("schema", 7), "schema 7"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("good"), n_images=120, dim=16, n_classes=3)


def _damaged(good: Path, folder: Path, case: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / good.name
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        DAMAGE[case][0](f)
    return path


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_file_is_one_line_naming_it_and_the_problem(good, tmp_path, case):
    path = _damaged(good, tmp_path / "features", case)
    t = time.perf_counter()
    with pytest.raises(UserError) as err:
        FeatureFile(path)
    assert time.perf_counter() - t < 5
    text = str(err.value)
    assert "\n" not in text and str(path) in text and DAMAGE[case][1] in text and "cache rm" in text
    assert f"cache rm {path.name} --cache-dir {tmp_path}`" in text  # the cache it is in, wherever that is


def test_a_damaged_file_outside_a_cache_folder_is_not_sent_to_cache_rm(good, tmp_path):
    """`cache rm` names entries of a cache folder: for a file elsewhere its advice could only fail."""
    path = _damaged(good, tmp_path / "loose", next(iter(DAMAGE)))
    with pytest.raises(UserError, match=r"delete it \(it is in no cache's features/ folder\)") as err:
        FeatureFile(path)
    assert "cache rm" not in str(err.value)


@pytest.mark.parametrize("error, said, not_said", [
    ("Unable to synchronously open file (unable to open file: name = 'x', errno = 13, error message = "
     "'Permission denied', flags = 0, o_flags = 0)", "cannot be read: permission denied", "cache rm"),
    ("Unable to synchronously open file (unable to lock file, errno = 37, error message = 'No locks available')",
     "HDF5_USE_FILE_LOCKING=FALSE", "cache rm"),
    ("Unable to synchronously open file (file signature not found)", "is damaged", "permission"),
])
def test_a_file_hdf5_cannot_open_is_called_damaged_only_when_it_is(good, monkeypatch, error, said, not_said):
    """A good file this process may not read, or one on a file system without locks, must not be called
    damaged: the way out of damage is removing the file."""
    import pipeline.features.store as store

    def refuse(*args, **kwargs):
        raise OSError(error)

    monkeypatch.setattr(store.h5py, "File", refuse)
    with pytest.raises(UserError) as err:
        FeatureFile(good)
    text = str(err.value)
    assert str(good) in text and said in text and not_said not in text and "\n" not in text, text


def test_cache_ls_says_a_file_another_process_holds_for_writing_is_locked_not_damaged(tmp_path):
    """A file another process has open for writing: `cache ls` said "unreadable: no file locks"."""
    import subprocess
    import sys

    from pipeline.features.cache import find_entries

    path = tmp_path / "features" / "vgg16_32_avg_abcdef0123456789.h5"
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'w'); f.flush(); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        [entry] = find_entries(tmp_path)
        assert entry.state.startswith("unreadable: HDF5 cannot lock it (another process may be writing it"), entry.state
    finally:
        holder.communicate("")


def test_the_good_file_still_opens(good):
    with FeatureFile(good) as ff:
        assert len(ff) == 120 and len(ff.class_names) == 3


def test_every_command_refuses_a_damaged_file_in_one_line_and_cache_ls_lists_it(good, tmp_path):
    cache = tmp_path / "c"
    huge = _damaged(good, cache / "features", "huge declared shape")
    for args in (["fit-head", "--cache", str(huge)], ["audit", "--cache", str(huge)], ["cache", "info", huge.name]):
        t = time.perf_counter()
        res = run_cli(*args, "--cache-dir", str(cache), timeout=120)
        assert time.perf_counter() - t < 60
        assert res.returncode != 0 and "damaged" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    listing = run_cli("cache", "ls", "--cache-dir", str(cache))
    assert listing.returncode == 0, listing.stderr
    assert "damaged" in listing.stdout


def test_a_damaged_file_at_the_requests_own_key_is_refused_not_extracted_over(tmp_path):
    """A key's file is renamed into place finished, so one there unfinished (truncated when it was copied
    in: a full disk, a copy cut short) is damaged: every command that would extract says so in one line and leaves it
    as it is (it said 'no cached features yet' and extracted over it); `extract --force` replaces it."""
    from conftest import make_folder

    fast = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--dtype", "float32", "--no-progress"]
    data = make_folder(tmp_path / "d", per_class=4)
    cache = tmp_path / "c"
    assert run_cli("extract", "--data", str(data), "--cache-dir", str(cache), *fast).returncode == 0
    (path,) = (cache / "features").glob("*.h5")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    for command in ("extract", "fit-head", "audit"):
        res = run_cli(command, "--data", str(data), "--cache-dir", str(cache), *fast)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (command, res.stderr)
        assert res.stderr.strip().splitlines() == [res.stderr.strip()], (command, res.stderr)
        assert str(path) in res.stderr, res.stderr
        assert "damaged" in res.stderr and f"cache rm {path.name}" in res.stderr and "yet" not in res.stderr
        assert path.read_bytes() == whole[: len(whole) // 2], command
    listed = run_cli("cache", "ls", "--cache-dir", str(cache))  # as the docs say: damaged, not "unreadable"
    assert listed.returncode == 0 and "damaged: not readable as HDF5" in listed.stdout, listed.stdout
    (tmp_path / "c2" / "features").mkdir(parents=True)  # beside another data set's extraction, which looks for reuse
    shutil.copy(path, tmp_path / "c2" / "features" / path.name)
    other = run_cli("extract", "--data", str(make_folder(tmp_path / "d2", per_class=4, seed=1)), "--cache-dir",
                    str(tmp_path / "c2"), *fast)
    assert other.returncode == 0, other.stderr
    assert f"warning: {path.name} is not used to reuse rows from: it is damaged (not readable as HDF5)" in other.stderr
    again = run_cli("extract", "--data", str(data), "--cache-dir", str(cache), "--force", *fast)
    assert again.returncode == 0, again.stderr
    with FeatureFile(path) as ff:
        assert len(ff) == 16


def test_a_damaged_reuse_candidate_is_skipped_with_a_warning_not_fatal(tmp_path):
    from conftest import make_folder

    fast = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--dtype", "float32", "--no-progress"]
    data = make_folder(tmp_path / "d", per_class=4)
    cache = tmp_path / "c"
    first = run_cli("extract", "--data", str(data), "--cache-dir", str(cache), *fast)
    assert first.returncode == 0, first.stderr
    (old,) = (cache / "features").glob("*.h5")
    with h5py.File(old, "r+") as f:
        f.attrs["key_material"] = "[1, 2]"  # an older or hand-edited file
    make_folder(tmp_path / "d", per_class=5, seed=1)  # the data grew: a new key, whose extraction looks for reuse
    second = run_cli("extract", "--data", str(data), "--cache-dir", str(cache), *fast)
    assert second.returncode == 0, second.stderr
    assert f"warning: {old.name} is not used to reuse rows from: it is damaged" in second.stderr


def test_filesystem_errors_are_one_line_that_names_the_path_and_what_to_do(tmp_path):
    import errno

    from pipeline.errors import filesystem_message

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = run_cli("extract", "--cache-dir", str(blocker / "sub"), "--backbone", "vgg16", "--weights", "none",
                  "--image-size", "32", "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert f"{blocker}/sub/features: a file stands where a folder is needed" in res.stderr
    # the errors root cannot cause here (root ignores permissions; no mounts): the mapping itself
    for code, words in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")]:
        text = filesystem_message(OSError(code, "boom", "/data/cache"))
        assert words in text and "/data/cache" in text
    assert filesystem_message(ValueError("no")) is None and filesystem_message(OSError(errno.EIO, "x")) is None


def _interrupted(tmp_path, monkeypatch):
    """An extraction stopped after two 4-image chunks: (request, options, its .parts folder)."""
    from conftest import make_folder
    from pipeline import extract as ex
    from pipeline.extract import ExtractRequest, RunOptions, extract, plan

    data = make_folder(tmp_path / "d", per_class=8)
    request = ExtractRequest(data=str(data), backbone="vgg16", weights="none", image_size=32)
    options = RunOptions(cache_dir=tmp_path / "c", progress=False, chunk_units=4)
    calls = {"n": 0}
    original = ex.ChunkWriter._flush

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(ex.ChunkWriter, "_flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        extract(request, options)
    monkeypatch.setattr(ex.ChunkWriter, "_flush", original)
    return request, options, plan(request, options.cache_dir).parts


def test_a_cache_key_naming_only_an_unfinished_extraction_says_so(tmp_path, monkeypatch):
    """`--cache KEY` where the key names only a .parts folder: not 'give a longer key', which cannot help."""
    request, options, parts = _interrupted(tmp_path, monkeypatch)
    key = parts.name.split(".")[0].rsplit("-", 1)[1]
    for command in (["fit-head", "--cache"], ["audit", "--cache"], ["cache", "info"]):
        res = run_cli(*command, key, "--cache-dir", str(options.cache_dir))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"names only an extraction that has not finished ({parts.name})" in res.stderr, res.stderr
        assert "longer key" not in res.stderr
    folder = run_cli("fit-head", "--cache", str(options.cache_dir / "features"), "--cache-dir", str(options.cache_dir))
    assert folder.returncode == 2 and "is a folder; give a cache file (.h5) in it or a key prefix" in folder.stderr


@pytest.mark.parametrize("damage", ["random bytes", "pickled object array", "junk meta.json", "junk shards.json"])
def test_a_damaged_unfinished_extraction_is_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    from pipeline.extract import extract

    request, options, parts = _interrupted(tmp_path, monkeypatch)
    chunk = parts / "chunk-000000.npz"
    if damage == "random bytes":
        chunk.write_bytes(np.random.default_rng(0).bytes(500))
        target = chunk
    elif damage == "pickled object array":
        with open(chunk, "wb") as fh:
            np.savez(fh, features=np.array([object()], dtype=object), index=np.zeros(1), views=np.zeros(1),
                     skipped_index=np.zeros(0), skipped_reason=np.zeros(0))
        target = chunk
    elif damage == "junk meta.json":
        target = parts / "meta.json"
        target.write_text("{not json")
    else:
        target = parts / "shards.json"
        target.write_text("[1, 2")
    with pytest.raises(UserError) as err:
        extract(request, options)
    text = str(err.value)
    assert str(target) in text and "damaged" in text and "\n" not in text
    assert f"cache rm {parts.name} --cache-dir {options.cache_dir}" in text  # the cache it is in
    if target == chunk:  # the chunk alone goes: the other chunks are kept, its images computed again
        assert f"`rm {chunk}`" in text and "the other chunks are kept" in text
        kept = 0
        for other in parts.glob("chunk-*.npz"):
            if other != chunk:
                with np.load(other) as z:
                    kept += z["index"].size
        chunk.unlink()
        result = extract(request, options)
        assert kept and result.computed == result.n_rows - kept  # the other chunks' images were not computed again
        return
    assert "--force" in text
    extract(request, options.__class__(**{**options.__dict__, "force": True}))  # the way out works


def test_a_run_whose_recorded_request_this_version_cannot_read_is_one_line(tmp_path):
    import json

    from conftest import make_folder

    data = make_folder(tmp_path / "d", per_class=6)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), "--backbone", "vgg16", "--weights",
                  "none", "--image-size", "32", "--no-progress", "--head", "logistic", "--C", "1")
    assert fit.returncode == 0, fit.stderr
    run_id = next(l for l in fit.stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]
    config = cache / "runs" / run_id / "config.json"
    cfg = json.loads(config.read_text())
    cfg["request"]["from_the_future"] = 1
    config.write_text(json.dumps(cfg))
    res = run_cli("predict", "--run", run_id, str(data / "val"), "--cache-dir", str(cache))
    assert res.returncode == 2 and "cannot read" in res.stderr and "from_the_future" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_an_unreadable_chunk_is_a_filesystem_error_not_damage(tmp_path, monkeypatch):
    """Permissions or I/O errors must not advise deleting good chunks as 'damaged'."""
    import errno

    from pipeline.features import store

    chunks = store.ChunkDir(tmp_path / "x.parts", 4)
    chunks.write(0, {"features": np.zeros((1, 2), "f4"), "index": np.zeros(1), "views": np.zeros(1),
                     "skipped_index": np.zeros(0), "skipped_reason": np.zeros(0)})
    assert chunks.read(0)["features"].shape == (1, 2)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.parts" / "chunk-000000.npz"))

    monkeypatch.setattr(store.np, "load", denied)
    with pytest.raises(PermissionError):
        chunks.read(0)


def test_load_keeps_the_order_given_and_reads_masks_and_repeats(good):
    """`ff.load(rows)` lined up with `ff.labels[rows]` only for sorted rows: it sorted them silently,
    and a boolean mask read the last rows of the file."""
    with FeatureFile(good) as ff:
        every = ff.load()
        rows = ff.rows("train")[::-1]
        np.testing.assert_array_equal(ff.load(rows), every[rows])
        mask = ff.splits == "val"
        np.testing.assert_array_equal(ff.load(mask), every[mask])
        np.testing.assert_array_equal(ff.load([5, 2, 5]), every[[5, 2, 5]])
        np.testing.assert_array_equal(np.concatenate(list(ff.iter_batches(rows, 7))), every[rows])
        assert ff.load([]).shape == (0, every.shape[1])
        with pytest.raises(IndexError, match="row numbers go from 0 to 119"):
            ff.load([3, 120])
        with pytest.raises(IndexError, match="mask"):
            ff.load(mask[:10])
        with pytest.raises(ValueError, match="not 'training'"):
            ff.rows("training")


def test_a_folder_or_a_fifo_named_as_a_cache_file_is_said_to_be_one_and_never_waited_on(good, tmp_path):
    import os

    features = tmp_path / "cache" / "features"
    features.mkdir(parents=True)
    with pytest.raises(UserError, match=r"is a folder, not a cache file") as err:
        FeatureFile(tmp_path / "cache")
    assert "\n" not in str(err.value) and "damaged" not in str(err.value)
    fifo = features / ("x-" + "a" * 16 + ".h5")
    os.mkfifo(fifo)
    t = time.perf_counter()
    with pytest.raises(UserError, match="not a regular file"):
        FeatureFile(fifo)
    listed = run_cli("cache", "ls", "--cache-dir", str(tmp_path / "cache"))
    assert listed.returncode == 0 and "not a regular file" in listed.stdout, listed.stdout + listed.stderr
    assert time.perf_counter() - t < 60
