"""Incremental caches: a data set that gains, loses or changes images re-extracts only what changed;
rows of unchanged images are copied byte for byte from the older cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from conftest import _img, make_folder, run_cli, write_image
from pipeline.extract import ExtractRequest, RunOptions, extract
from pipeline.features.store import FeatureFile


def req(data: Path, **kw) -> ExtractRequest:
    return ExtractRequest(data=str(data), backbone="vgg16", weights="none", image_size=32, **kw)


def opts(cache: Path, **kw) -> RunOptions:
    return RunOptions(cache_dir=cache, progress=False, chunk_units=4, **kw)


def _rows(path: Path) -> dict[str, bytes]:
    with FeatureFile(path) as ff:
        clean = ff.rows(views="clean")
        feats = ff.load(clean, dtype=ff.features.dtype)
        return {ff.paths[r]: feats[k].tobytes() for k, r in enumerate(clean)}


def _add(root: Path, cls: str, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        write_image(root / cls / name, _img(rng, 0 if cls == "ants" else 1), "jpeg")


def test_added_removed_and_changed_images_compute_only_what_changed(tmp_path):
    data = make_folder(tmp_path / "d", per_class=6, splits=())
    cache = tmp_path / "c"
    first = extract(req(data), opts(cache))
    assert first.computed == 12 and first.reused == 0
    before = _rows(first.path)

    _add(data, "ants", [f"new_{k}.jpg" for k in range(3)], seed=1)
    _add(data, "bees", [f"new_{k}.jpg" for k in range(2)], seed=2)
    grown = extract(req(data), opts(cache))
    assert grown.path != first.path and first.path.exists()          # a new key, the old file kept
    assert (grown.computed, grown.reused, grown.reused_from) == (5, 12, first.path)
    after = _rows(grown.path)
    assert len(after) == 17 and all(after[p] == before[p] for p in before)   # old rows byte-identical
    fresh = extract(req(data), opts(tmp_path / "fresh"))
    with FeatureFile(fresh.path) as a, FeatureFile(grown.path) as b:
        assert a.paths == b.paths and list(a.splits) == list(b.splits) and list(a.labels) == list(b.labels)
        np.testing.assert_allclose(b.load(), a.load(), atol=1e-3)

    for name in ("img_000.jpg", "img_001.jpg", "img_002.jpg"):
        (data / "bees" / name).unlink()
    shrunk = extract(req(data), opts(cache))
    assert (shrunk.computed, shrunk.reused) == (0, 14)                   # removing never recomputes
    assert all(_rows(shrunk.path)[p] == after[p] for p in _rows(shrunk.path))

    changed = data / "ants" / "img_003.jpg"
    write_image(changed, _img(np.random.default_rng(9), 1), "jpeg")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    edited = extract(req(data), opts(cache))
    assert (edited.computed, edited.reused) == (1, 13)


def test_only_the_same_request_is_reused_and_force_recomputes(tmp_path):
    data = make_folder(tmp_path / "d", per_class=4, splits=())
    cache = tmp_path / "c"
    extract(req(data), opts(cache))
    _add(data, "ants", ["extra.jpg"], seed=3)
    other = extract(req(data, pooling="max"), opts(cache))                # another request: nothing to reuse
    assert other.reused == 0 and other.computed == 9
    forced = extract(req(data), opts(cache, force=True))
    assert forced.reused == 0 and forced.computed == 9


def test_cli_says_reused_and_computed(tmp_path):
    data = make_folder(tmp_path / "d", per_class=4, splits=())
    cache = str(tmp_path / "c")
    args = ["extract", "--data", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
            "--no-progress", "--cache-dir", cache]
    assert run_cli(*args).returncode == 0
    _add(data, "bees", ["late.jpg"], seed=4)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "reused 8 unchanged from" in again.stdout and "computed 1 at" in again.stdout
    unhashed = run_cli(*args, "--content-hash")  # a hit: the file stays as it was made, which is said
    assert "cache hit" in unhashed.stdout and "holds no content hashes; add --force" in unhashed.stderr, unhashed.stderr
    # --content-hash from the command line: the file records the bytes, and a touched file is reused
    _add(data, "bees", ["later.jpg"], seed=5)
    hashed = run_cli(*args, "--content-hash")
    assert hashed.returncode == 0 and "computed 1 at" in hashed.stdout, hashed.stderr
    os.utime(data / "bees" / "late.jpg", ns=(0, 10**18))
    touched = run_cli(*args, "--content-hash")
    assert "reused 10 unchanged from" in touched.stdout and "computed 0" in touched.stdout, touched.stdout
    hit = run_cli(*args, "--content-hash")
    assert "cache hit" in hit.stdout and "note:" not in hit.stderr, hit.stderr


def test_content_hash_reuses_touched_files_and_catches_rewrites_with_the_same_size_and_time(tmp_path):
    """--content-hash: the bytes decide. A touched file (new mtime, same bytes) is reused, where size
    + mtime would recompute it; a file rewritten with other bytes of the same size, its mtime put
    back, is recomputed, where size + mtime would wrongly reuse it."""
    data = make_folder(tmp_path / "d", per_class=4, splits=())
    cache = tmp_path / "c"
    hashed = opts(cache, content_hash=True)
    first = extract(req(data), hashed)
    with FeatureFile(first.path) as ff:
        import hashlib
        row = ff.paths.index(str(data / "ants" / "img_000.jpg"))
        assert ff._f["hashes"].asstr()[row] == hashlib.sha256((data / "ants" / "img_000.jpg").read_bytes()).hexdigest()

    touched = data / "ants" / "img_001.jpg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    by_bytes = extract(req(data), hashed)
    assert (by_bytes.computed, by_bytes.reused) == (0, 8)
    by_time = extract(req(data), opts(tmp_path / "c2"))  # a cache without hashes, then the same touch
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    assert extract(req(data), opts(tmp_path / "c2")).computed == 1 and by_time.computed == 8

    rewritten = data / "bees" / "img_002.jpg"
    st = rewritten.stat()
    raw = bytearray(rewritten.read_bytes())
    raw[-3] ^= 0xFF  # other bytes, same size (inside the JPEG's entropy data, before the EOI marker)
    rewritten.write_bytes(bytes(raw))
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))
    _add(data, "bees", ["new_0.jpg"], seed=3)  # a new listing (so a new key) to reuse from the old one
    assert extract(req(data), hashed).computed == 2  # the new file and the rewritten one
    assert extract(req(data), opts(tmp_path / "c2")).computed == 1  # size + mtime miss the rewrite


def test_the_next_extraction_in_a_process_reuses_the_model(tmp_path, monkeypatch):
    """A second extraction with the same backbone in one process (an incremental run's new images,
    a notebook's next folder) does not build the model again; another backbone setting does, and
    `release_models()` drops what is kept. The features are those of a fresh build."""
    import pipeline.backbones.model as bm
    from pipeline.extract import release_models
    builds = []
    real = bm.feature_model
    monkeypatch.setattr(bm, "feature_model", lambda *a, **k: builds.append(a) or real(*a, **k))
    release_models()
    a = make_folder(tmp_path / "a", per_class=3, splits=())
    b = make_folder(tmp_path / "b", per_class=2, splits=(), seed=5)
    first = extract(req(a), opts(tmp_path / "c"))
    second = extract(req(b), opts(tmp_path / "c"))
    assert len(builds) == 1 and second.computed == 4
    extract(req(b, pooling="max"), opts(tmp_path / "c"))
    assert len(builds) == 2                                            # another graph: built
    release_models()
    again = extract(req(b), opts(tmp_path / "fresh"))
    assert len(builds) == 3
    assert _rows(again.path) == _rows(second.path) and first.computed == 6


def _by_view(path: Path) -> dict[tuple[str, int], np.ndarray]:
    with FeatureFile(path) as ff:
        feats = ff.load(np.arange(len(ff.paths)), dtype=np.float32)
        return {(p, int(v)): feats[r] for r, (p, v) in enumerate(zip(ff.paths, ff.views.tolist()))}


def test_augmented_views_follow_their_image_and_are_reused(tmp_path):
    """--augment-copies: views are seeded by the image's name, so adding images reuses the old
    images' views, and more copies compute only the new views; every row equals a fresh extraction's."""
    data = make_folder(tmp_path / "d", per_class=4)                  # train/ and val/, 8 images each
    cache = tmp_path / "c"
    first = extract(req(data, augment_copies=2), opts(cache))
    assert first.computed == 16 + 2 * 8
    _add(data / "train", "ants", ["new_0.jpg", "new_1.jpg"], seed=7)
    grown = extract(req(data, augment_copies=2), opts(cache))
    assert (grown.computed, grown.reused) == (2 * 3, 32)            # the new images: clean + 2 views each
    more = extract(req(data, augment_copies=3), opts(cache))
    assert (more.computed, more.reused) == (10, 18 + 2 * 10)        # view 3 of the 10 training images only
    fresh = _by_view(extract(req(data, augment_copies=3), opts(tmp_path / "fresh")).path)
    got = _by_view(more.path)
    assert got.keys() == fresh.keys() and len(got) == 18 + 3 * 10
    for k in got:
        np.testing.assert_allclose(got[k], fresh[k], atol=1e-3)
    old = _by_view(first.path)                                       # views copied byte for byte
    assert all(np.array_equal(got[k], old[k]) for k in old)
    # another augmentation seed: only the clean rows are reused
    other = extract(req(data, augment_copies=2, augment_seed=5), opts(cache))
    assert (other.computed, other.reused) == (2 * 10, 18)


def test_a_candidate_whose_rows_are_not_this_requests_width_is_skipped_with_a_warning(tmp_path):
    """A file that records the same request but holds features of another width (damaged or crafted)
    failed the grown extraction with numpy's 'all the input array dimensions...'; it is skipped with a
    warning and every image is computed."""
    import json
    import warnings

    import h5py

    from pipeline.errors import DataWarning

    data = make_folder(tmp_path / "d", per_class=3, splits=())
    cache = tmp_path / "c"
    first = extract(req(data), opts(cache))
    with h5py.File(first.path, "r+") as f:
        n, width = f["features"].shape
        del f["features"]
        f["features"] = np.ones((n, width + 3), np.float16)
        f.attrs["feature_shape"] = json.dumps([width + 3])
    _add(data, "ants", ["new_0.jpg"], seed=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        grown = extract(req(data), opts(cache))
    assert any(issubclass(w.category, DataWarning) and "not reusing rows" in str(w.message) for w in seen)
    assert (grown.computed, grown.reused) == (7, 0)
    with FeatureFile(grown.path) as ff:
        assert ff.feature_shape == (width,)


def _u(key: str, seed: int = 0) -> float:
    """The hash split's draw for one image (pipeline.data.sources.hash_split)."""
    import hashlib
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def test_a_lent_val_image_that_goes_back_to_train_is_named_when_rows_are_reused(tmp_path):
    # bees: three images none of which hashes into val (u >= 0.2), so its lowest-hash one is lent to val;
    # then one that hashes into val is added, and the lent image goes back to train
    train_names = [n for n in (f"t{k}.jpg" for k in range(200)) if _u(f"bees/{n}") >= 0.2][:3]
    val_name = next(n for n in (f"v{k}.jpg" for k in range(200)) if _u(f"bees/{n}") < 0.2)
    lent = min(train_names, key=lambda n: _u(f"bees/{n}"))
    data = make_folder(tmp_path / "d", per_class=6, classes=("ants",), splits=())
    _add(data, "bees", train_names, seed=6)
    cache = str(tmp_path / "c")
    args = ["extract", "--data", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
            "--no-progress", "--cache-dir", cache]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "another split" not in first.stderr
    _add(data, "bees", [val_name], seed=7)
    grown = run_cli(*args)
    assert grown.returncode == 0, grown.stderr
    assert "computed 1 at" in grown.stdout, grown.stdout
    assert "warning: 1 image(s) are in another split than in" in grown.stderr, grown.stderr
    assert f"bees/{lent} (val -> train)" in grown.stderr and "lends a class" in grown.stderr, grown.stderr


def test_the_extraction_rate_leaves_the_backbone_build_out(tmp_path):
    import re
    data = make_folder(tmp_path / "d", per_class=1, splits=())
    got = run_cli("extract", "--data", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
                  "--no-progress", "--cache-dir", str(tmp_path / "c"))
    assert got.returncode == 0, got.stderr
    found = re.search(r"computed 2 at ([0-9.]+) images/s; backbone built in ([0-9.]+) s\)", got.stdout)
    assert found, got.stdout
    rate, built = float(found[1]), float(found[2])
    assert rate * built > 2, got.stdout  # counting the build, two images could not go faster than 2 / build
    # the file records the same rate: backbone rankings (fit-head --backbone a,b) show it
    with FeatureFile(next((tmp_path / "c" / "features").glob("*.h5"))) as ff:
        assert abs(ff.attrs["images_per_s"] - rate) < 0.1 and "images_per_s" in ff.attrs
    data2 = make_folder(tmp_path / "d2", per_class=1, splits=())  # a joined cache: one image through both backbones
    joined = run_cli("extract", "--data", str(data2), "--backbone", "vgg16+mobilenetv2", "--weights", "none",
                     "--image-size", "32", "--dtype", "float32", "--no-progress", "--cache-dir", str(tmp_path / "j"))
    assert joined.returncode == 0, joined.stderr
    files = {p.name.split("-")[0]: p for p in (tmp_path / "j" / "features").glob("*.h5")}
    rates = {}
    for name, path in files.items():
        with FeatureFile(path) as ff:
            rates[name] = ff.attrs["images_per_s"]
    whole = rates.pop(next(n for n in rates if "+" in n))
    assert abs(whole - 1 / sum(1 / r for r in rates.values())) < 0.02, (whole, rates)


def test_a_touched_file_with_the_same_bytes_is_not_changed_where_the_cache_holds_hashes(tmp_path):
    from pipeline.features.reuse import changed_files
    data = make_folder(tmp_path / "d", per_class=3, splits=())
    touched, rewritten = data / "ants" / "img_000.jpg", data / "bees" / "img_001.jpg"
    plain = extract(req(data), opts(tmp_path / "plain"))
    hashed = extract(req(data), opts(tmp_path / "hashed", content_hash=True))
    os.utime(touched, ns=(0, 10**18))                      # same bytes, other time (a copy without cp -p)
    write_image(rewritten, _img(np.random.default_rng(11), 0), "jpeg")
    with FeatureFile(plain.path) as ff:
        assert sorted(changed_files(ff, ff.rows(views="clean"))) == [(str(touched), "changed"),
                                                                      (str(rewritten), "changed")]
    with FeatureFile(hashed.path) as ff:
        assert changed_files(ff, ff.rows(views="clean")) == [(str(rewritten), "changed")]
