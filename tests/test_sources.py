"""The tfds: source (with a stand-in tensorflow_datasets module) and mixed-precision extraction."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, plan
from pipeline.features.store import FeatureFile


def _fake_tfds(prepared: bool = True) -> types.ModuleType:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    data = {"train": (rng.integers(0, 255, (6, 12, 10, 3), dtype=np.uint8), np.array([0, 1, 0, 1, 0, 1])),
            "test": (rng.integers(0, 255, (3, 12, 10, 1), dtype=np.uint8), np.array([1, 0, 1]))}

    class Builder:
        info = types.SimpleNamespace(
            splits={s: types.SimpleNamespace(num_examples=len(y)) for s, (_, y) in data.items()},
            features={"label": types.SimpleNamespace(names=["cat", "dog"])}, version="1.2.0")

        def is_prepared(self):
            return prepared

        def as_dataset(self, split, as_supervised, shuffle_files):
            x, y = data[split]
            return tf.data.Dataset.from_tensor_slices((x, y))

    def builder(name):
        if name != "pets":
            raise ValueError(f"Dataset {name} not found.")
        return Builder()

    return types.SimpleNamespace(builder=builder)


def test_tfds_source_lists_and_extracts(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds())
    req = ExtractRequest(data="tfds:pets", backbone="vgg16", weights="none", image_size=32)
    listing = plan(req, tmp_path).source.listing()
    assert listing.class_names == ["cat", "dog"] and listing.splits == ["train"] * 6 + ["test"] * 3
    r = extract(req, RunOptions(cache_dir=tmp_path, progress=False))
    with FeatureFile(r.path) as ff:
        assert len(ff) == 9 and ff.paths[0] == "tfds:pets/train/0" and list(ff.labels[-3:]) == [1, 0, 1]
    with pytest.raises(UserError, match="not found"):
        plan(ExtractRequest(data="tfds:nope"), tmp_path)


def test_tfds_missing_or_not_prepared_gives_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install tensorflow-datasets"):
        plan(ExtractRequest(data="tfds:pets"), tmp_path)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(prepared=False))
    with pytest.raises(UserError, match="not downloaded"):
        plan(ExtractRequest(data="tfds:pets"), tmp_path)


def test_mixed_precision_is_its_own_cache_entry(tiny_split_folder, tmp_path):
    base = ExtractRequest(data=str(tiny_split_folder), backbone="vgg16", weights="none", image_size=32)
    mixed = ExtractRequest(data=str(tiny_split_folder), backbone="vgg16", weights="none", image_size=32,
                           precision="mixed")
    assert plan(base, tmp_path).key != plan(mixed, tmp_path).key
    r32 = extract(base, RunOptions(cache_dir=tmp_path, progress=False))
    r16 = extract(mixed, RunOptions(cache_dir=tmp_path, progress=False))
    with FeatureFile(r32.path) as a, FeatureFile(r16.path) as b:
        assert b.attrs["request"]["precision"] == "mixed"
        np.testing.assert_allclose(b.load(), a.load(), rtol=0.05, atol=0.02)
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy is restored


@pytest.mark.parametrize("splits, suggested", [
    (("train", "validation"), "--split-names train,validation,test"),  # validation images were dropped
    (("training", "validation"), "--split-names training,validation,test"),  # these became two classes
    (("Train", "Val"), "--split-names Train,Val,test"),
])
def test_split_folders_under_other_names_are_refused_with_the_fix(tmp_path, splits, suggested):
    from conftest import make_folder
    from pipeline.data.sources import SplitConfig, open_source

    root = make_folder(tmp_path / "d", per_class=2, splits=splits)
    with pytest.raises(UserError, match=suggested):
        open_source(str(root)).listing()
    names = suggested.split()[-1].split(",")
    listing = open_source(str(root), SplitConfig(folder_names=tuple(names))).listing()
    assert listing.class_names == ["ants", "bees"] and set(listing.splits) == {"train", "val"}


def test_other_folders_beside_split_folders_are_named_in_a_warning(tmp_path):
    from conftest import make_folder
    from pipeline.data.sources import open_source
    from pipeline.errors import DataWarning

    root = make_folder(tmp_path / "d", per_class=2, splits=("train", "val", "extra"))
    with pytest.warns(DataWarning, match="ignoring folder.s. extra"):
        listing = open_source(str(root)).listing()
    assert set(listing.splits) == {"train", "val"} and len(listing) == 8


def test_an_unreadable_class_folder_is_named_as_unreadable_not_empty(tmp_path, monkeypatch):
    """os.walk skips folders it cannot read: a class folder without read permission was reported as
    'empty' (simulated here: as root, permissions do not stop reads)."""
    import os

    from conftest import make_folder
    from pipeline.data.sources import open_source

    root = make_folder(tmp_path / "d", per_class=2, splits=())
    locked = next(p for p in sorted(root.iterdir()) if p.is_dir())
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=f"cannot read {locked} \\(Permission denied\\)"):
        open_source(str(root)).listing()


def test_one_owner_of_the_named_source_prefixes():
    """open_source and names_files (the audit's "can a manifest load these?") read one function."""
    from pipeline.data.sources import named_source, names_files

    assert named_source("builtin:digits") == "builtin" and named_source("tfds:beans") == "tfds"
    assert named_source("photos/tfds:x") is None and named_source("tfds") is None
    assert not names_files("tfds:beans") and names_files("photos") and names_files("m.csv")


def test_a_class_folder_name_is_read_as_a_manifest_label_is(tmp_path):
    """Without spaces at its ends: a folder ' ants ' and the manifest an audit writes from it (labels
    stripped) name one class, so a head fitted on either scores the other; a name of spaces alone and
    two names that differ only in them are refused in one line."""
    from conftest import make_folder
    from pipeline.data.sources import open_source

    root = make_folder(tmp_path / "d", per_class=2, classes=(" ants ", "bees"))
    listing = open_source(str(root)).listing()
    assert listing.class_names == ["ants", "bees"] and len(listing) == 8
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f'"{p}"," {listing.class_names[l]} ",{s}\n' for p, l, s in zip(listing.paths, listing.labels, listing.splits)))
    assert open_source(str(manifest)).listing().class_names == listing.class_names
    no_train = make_folder(tmp_path / "nt", per_class=2, classes=("ants",))
    make_folder(tmp_path / "nt", per_class=2, classes=(" bees ",), splits=("val",))
    with pytest.raises(UserError, match=r"class 'bees' has val images \(folder .*/val/ bees \) but no training"):
        open_source(str(no_train)).listing()  # the folder as it is spelt on disk
    blank = make_folder(tmp_path / "blank", per_class=2, classes=("   ", "bees"))
    with pytest.raises(UserError, match="has a name of spaces alone; rename it"):
        open_source(str(blank)).listing()
    twins = make_folder(tmp_path / "twins", per_class=2, classes=("ants", "ants "), splits=())
    with pytest.raises(UserError, match="'ants' and 'ants ' in .* differ only in spaces at their ends"):
        open_source(str(twins)).listing()


def test_a_file_or_class_folder_not_named_in_utf8_is_refused_by_name(tmp_path):
    """Latin-1 bytes in a name: Python holds them as surrogates, which the fingerprint's hash, HDF5 and
    the reports cannot encode (a traceback's last line before); one line naming the file instead."""
    import os

    from conftest import make_folder
    from pipeline.data.sources import open_source

    for bad in (b"caf\xe9_x.jpg", b"caf\xe9"):
        root = make_folder(tmp_path / bad.decode("latin1").replace("\xe9", "e"), per_class=2)
        target = os.fsencode(root / "train" / "ants") + b"/" + bad
        if bad.endswith(b".jpg"):
            os.link(os.fsencode(root / "train" / "ants" / "img_000.jpg"), target)
        else:
            os.mkdir(target)
            os.link(os.fsencode(root / "train" / "ants" / "img_000.jpg"), target + b"/a.jpg")
        with pytest.raises(UserError, match=r"caf\\xe9.* is not named in UTF-8.*rename it"):
            open_source(str(root)).listing()


def test_a_class_name_with_a_line_break_or_tab_is_refused_where_it_is_read(tmp_path):
    """labels.txt holds a class per line and predict prints them tab-separated: a label "line1\\nline2"
    made an exported model that predict --model refused for good ('names 3 classes but the model
    outputs 2'). Refused in one line by the manifest's line, or by the folder's name."""
    from conftest import make_folder
    from pipeline.data.sources import open_source

    root = make_folder(tmp_path / "d", per_class=2)
    manifest = tmp_path / "m.csv"
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    broken = "line1\nline2"
    manifest.write_text("path,label\n" + "".join(f'"{p}","{"ants" if k % 2 else broken}"\n' for k, p in enumerate(files)))
    with pytest.raises(UserError, match=r"m\.csv line 2: the label 'line1\\nline2' holds a line break, tab"):
        open_source(str(manifest)).listing()
    tabbed = make_folder(tmp_path / "t", per_class=2, classes=("a\tb", "c"))
    with pytest.raises(UserError, match=r"class folder .*a\\tb.* holds a line break, tab or other control"):
        open_source(str(tabbed)).listing()


def test_the_hash_split_gives_every_class_a_training_image_and_a_val_image():
    """A small class whose names all hash into val (or test) had no training image: the head could never
    predict it, and nothing said so. Its highest-hash image trains now; a class of two or more still
    keeps a val image (its lowest-hash training image is lent)."""
    import hashlib

    from pipeline.data.sources import SplitConfig, hash_split

    def u(key: str) -> float:
        return int.from_bytes(hashlib.sha1(f"0:{key}".encode()).digest()[:8], "big") / 2**64

    into_val = [n for n in (f"tulips/{k}.jpg" for k in range(400)) if 0.1 <= u(n) < 0.3][:3]
    into_test = [n for n in (f"roses/{k}.jpg" for k in range(400)) if u(n) < 0.1][:1]
    big = [f"daisy/{k}.jpg" for k in range(30)]
    keys = big + into_val + into_test
    labels = np.array([0] * 30 + [1] * 3 + [2])
    splits = hash_split(keys, labels, SplitConfig(val_fraction=0.2, test_fraction=0.1))
    by_class = {c: [s for s, l in zip(splits, labels) if l == c] for c in (0, 1, 2)}
    assert sorted(by_class[1]) == ["train", "val", "val"]   # three val images: the highest-hash one trains
    assert splits[30 + max(range(3), key=lambda i: u(into_val[i]))] == "train"
    assert by_class[2] == ["train"]                           # a class of one image in test: it trains
    assert "train" in by_class[0] and "val" in by_class[0]
    plain = hash_split(big, np.zeros(30, int), SplitConfig(val_fraction=0.2, test_fraction=0.1))
    assert plain == splits[:30]                               # other classes are not touched


def test_links_loose_images_and_a_class_folder_linking_to_the_root(tmp_path):
    """A linked sub-folder is read as a linked class folder is (it was left out without a word); a
    dangling link is listed, so extraction skips it as a missing file; a loop is named and not read;
    images beside the class folders are named; a class folder that links to the data root is refused."""
    import os

    from conftest import make_folder
    from pipeline.data.decode import DecodeError, read_file
    from pipeline.data.sources import open_source
    from pipeline.errors import DataWarning

    root = make_folder(tmp_path / "d", per_class=2, splits=())
    extra = make_folder(tmp_path / "extra", per_class=1, splits=())
    os.symlink(extra / "ants", root / "ants" / "linked")
    os.symlink(tmp_path / "gone.jpg", root / "ants" / "dangling.jpg")
    os.symlink(root / "bees", root / "bees" / "loop")
    (root / "loose.jpg").write_bytes((extra / "bees" / os.listdir(extra / "bees")[0]).read_bytes())
    with pytest.warns(DataWarning) as caught:
        listing = open_source(str(root)).listing()
    said = " | ".join(str(w.message) for w in caught)
    assert "1 image file(s) directly in" in said and "loose.jpg" in said
    assert "not following" in said and "loop" in said
    names = [os.path.relpath(p, root) for p in listing.paths]
    assert "ants/linked/" + os.listdir(extra / "ants")[0] in names and "ants/dangling.jpg" in names
    assert not [n for n in names if "loop" in n] and len(listing) == 2 + 1 + 1 + 2
    with pytest.raises(DecodeError, match="missing file"):
        read_file(str(root / "ants" / "dangling.jpg"))
    os.symlink(root, root / "everything")
    with pytest.warns(DataWarning), pytest.raises(UserError, match="links to .* which holds the data folder itself"):
        open_source(str(root)).listing()


def test_a_link_to_a_folder_read_anyway_keeps_the_real_names_whatever_the_order(tmp_path):
    """`cats/latest -> 2024-01` beside the real folder: the images keep their real names, with no
    warning (the link's name once replaced them); links to a folder and to a folder inside it list
    every image once, the same way in any order."""
    import os

    from pipeline.data.folders import visible_files

    cats = tmp_path / "cats"
    (cats / "2024-01").mkdir(parents=True)
    (cats / "2024-01" / "a.jpg").write_bytes(b"x")
    os.symlink(cats / "2024-01", cats / "latest")
    nas = tmp_path / "nas" / "x"
    (nas / "y").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg"):
        (nas / name).write_bytes(b"x")
    (nas / "y" / "3.jpg").write_bytes(b"x")
    os.symlink(nas / "y", cats / "y")  # sorts after "all"; "0" sorts before it
    os.symlink(nas, cats / "all")
    os.symlink(nas / "y", cats / "0")
    import warnings
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        files = [os.path.relpath(p, cats) for p in visible_files(cats)]
    assert sorted(files) == ["0/3.jpg", "2024-01/a.jpg", "all/1.jpg", "all/2.jpg"], files
    assert [str(w.message) for w in said if "another link already led" in str(w.message)], [str(w.message) for w in said]
    assert not [w for w in said if "2024-01" in str(w.message)]


def test_predict_lists_a_folder_as_extract_lists_a_class_folder(tmp_path):
    """predict's folders followed no link (rglob), so a folder of linked class folders had 'no images'
    and a dangling link was dropped without the 'missing file' extract gives it."""
    import os

    from pipeline.inference.embed import image_paths

    real = tmp_path / "real" / "daisy"
    real.mkdir(parents=True)
    (real / "a.jpg").write_bytes(b"x")
    (real / ".DS_Store").write_bytes(b"x")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(real, linked / "daisy")
    os.symlink(tmp_path / "gone.jpg", linked / "gone.jpg")
    assert image_paths([str(linked)]) == [str(linked / "daisy" / "a.jpg"), str(linked / "gone.jpg")]


def test_predict_names_a_list_of_images_given_as_an_image(tmp_path):
    from pipeline.inference.embed import image_paths

    listed = tmp_path / "list.txt"
    listed.write_text("a.jpg\nb.jpg\n")
    with pytest.raises(UserError, match="looks like a list of images, but predict takes image files and folders"):
        image_paths([str(listed)])


def test_a_manifest_keeps_the_spaces_of_a_file_named_with_them_and_strips_them_elsewhere(tmp_path):
    """"a.jpg, cat" names a.jpg; but a file whose name ends in a space, listed so by the audit's
    cleaned.csv, lost the space and was skipped as missing."""
    from PIL import Image

    from pipeline.data.sources import open_source

    for name in ("a.png ", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "m.csv").write_text("path,label\na.png ,cat\n b.png ,dog\n")
    listing = open_source(str(tmp_path / "m.csv")).listing()
    assert sorted(listing.paths) == [str(tmp_path / "a.png "), str(tmp_path / "b.png")]
