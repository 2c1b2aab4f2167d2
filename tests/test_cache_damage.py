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

from conftest import run_cli
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
