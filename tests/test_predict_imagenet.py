"""`python cli.py predict --backbone NAME IMAGE...` prints the backbone's own ImageNet top-k."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def test_lite0_top5_on_package_photos(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.png")
    Image.fromarray(skdata.chelsea()).save(tmp_path / "chelsea.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    out = tmp_path / "out" / "top.csv"
    out.parent.mkdir()
    proc = run_cli("predict", "--backbone", "efficientnet_lite0", "--top-k", "3", str(tmp_path), "--csv", str(out))
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.strip().split("\n")
    coffee = blocks[blocks.index(str(tmp_path / "coffee.png")) + 1]
    assert "espresso" in coffee and " 967 " in coffee
    chelsea = blocks[blocks.index(str(tmp_path / "chelsea.jpg")) + 1: blocks.index(str(tmp_path / "chelsea.jpg")) + 4]
    assert any("Egyptian cat" in l or "tabby" in l or "tiger cat" in l for l in chelsea[:1])
    assert len(chelsea) == 3
    assert "skipped 1 file(s)" in proc.stderr and "broken.jpg" in proc.stderr
    # --csv: the same top-k, a row per readable image
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", *(f"{c}_{i}" for i in (1, 2, 3) for c in ("class", "index", "probability"))]
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {str(tmp_path / "coffee.png"), str(tmp_path / "chelsea.jpg")}
    assert by_path[str(tmp_path / "coffee.png")]["class_1"] == "espresso"
    assert by_path[str(tmp_path / "coffee.png")]["index_1"] == "967"
    probs = [float(by_path[str(tmp_path / "chelsea.jpg")][f"probability_{i}"]) for i in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert f"wrote {out}" in proc.stderr


def test_predict_errors_are_one_line(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    for args, fragment in ((["--backbone", "efficientnet_lite0", str(tmp_path / "missing.jpg")], "not found"),
                           (["--backbone", "vgg16", "--weights", "none", str(img)], "trained weights"),
                           (["--backbone", "nope", str(img)], "unknown backbone")):
        proc = run_cli("predict", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert fragment in proc.stderr.strip().splitlines()[-1]
