"""`audit`: planted faults are found (a flipped label, duplicates across splits, an outlier), leakage
changes the recomputed accuracy, the cleaned manifest trains with no new extraction, the report shows
the counts of audit.json, and bad input gets one line."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from browser import Page, chromium
from conftest import ROOT, make_folder, run_cli, write_image
from helpers_features import write_cache
from pipeline.audit.duplicates import NearSettings, copy_groups, near_pairs, thumbnail
from pipeline.audit.labels import logistic_oof, oof_folds
from pipeline.audit.outliers import outlier_scores
from pipeline.audit.runner import AuditOptions, Audited, audit_cache, cleaned_rows, write_audit
from pipeline.errors import UserError
from pipeline.features.neighbours import CosineIndex
from pipeline.features.store import FeatureFile
from pipeline.tracking.runs import Registry

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--no-progress", "--dtype", "float32"]
NO_MAP = AuditOptions(draw_map=False)


def _edit_cache(path: Path, edit) -> None:
    """Change a finished synthetic cache in place (labels or feature rows) before it is audited."""
    import h5py

    with h5py.File(path, "r+") as f:
        edit(f)


# ------------------------------------------------------------------------------------ the seam
def test_cosine_index_matches_brute_force_and_never_returns_the_own_group():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 16)).astype(np.float32)
    groups = np.arange(300) // 2                        # rows 2i and 2i+1: two views of one image
    got = CosineIndex(X, groups=groups, block_rows=64).self_query(5)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Z @ Z.T
    sim[groups[:, None] == groups[None, :]] = -np.inf
    want = np.argsort(-sim, axis=1)[:, :5]
    np.testing.assert_array_equal(got.index, want)
    np.testing.assert_allclose(got.similarity, np.take_along_axis(sim, want, axis=1), atol=1e-5)
    assert not (groups[got.index] == groups[:, None]).any()


def test_the_approximate_search_finds_nearly_the_exact_neighbours_and_never_the_own_group(monkeypatch):
    """Above EXACT_ROWS rows self_neighbours switches to an HNSW graph (forced here on a small set):
    the same neighbours up to a few misses, exact similarities, never the row itself or its group;
    and the same answer again, on any number of threads (an audit must not change between runs)."""
    from pipeline.features.neighbours import self_neighbours

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    X = centres[rng.integers(0, 40, 2000)] + 0.3 * rng.standard_normal((2000, 32)).astype(np.float32)
    groups = np.arange(2000) // 2
    exact = self_neighbours(X, 10, groups)
    approx = self_neighbours(X, 10, groups, exact_rows=0)
    assert approx.index.shape == (2000, 10)
    assert not (groups[approx.index] == groups[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.index, exact.index)])
    assert recall > 0.95, recall
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(approx.similarity, np.einsum("ij,ikj->ik", Z, Z[approx.index]), atol=1e-5)
    assert (np.diff(approx.similarity, axis=1) <= 1e-6).all()     # most similar first
    for threads in (1, 4):  # the graph is built on os.cpu_count() threads
        monkeypatch.setattr(os, "cpu_count", lambda: threads)
        again = self_neighbours(X, 10, groups, exact_rows=0)
        np.testing.assert_array_equal(again.index, approx.index)
        np.testing.assert_array_equal(again.similarity, approx.similarity)


def test_one_projection_serves_the_search_over_all_rows_and_over_a_subset():
    """The audit projects wide rows once (search_space) and walks every approximate search, global
    and per class, on those rows: a class's search on its slice of the shared projection finds
    nearly its exact neighbours with exact similarities, and a projection of other rows is refused."""
    from pipeline.features.neighbours import HNSW_DIM, search_space, self_neighbours, unit_rows

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((30, HNSW_DIM + 64)).astype(np.float32)
    X = unit_rows(centres[rng.integers(0, 30, 1500)] + 0.3 * rng.standard_normal((1500, HNSW_DIM + 64)).astype(np.float32))
    walk = search_space(X)
    assert walk.shape == (1500, HNSW_DIM)
    np.testing.assert_allclose(np.linalg.norm(walk, axis=1), 1.0, atol=1e-5)
    rows = np.flatnonzero(rng.random(1500) < 0.5)
    exact = self_neighbours(X[rows], 10, normalized=True)
    approx = self_neighbours(X[rows], 10, normalized=True, exact_rows=0, walk=walk[rows])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.index, exact.index)])
    assert recall > 0.9, recall
    np.testing.assert_allclose(approx.similarity, np.einsum("ij,ikj->ik", X[rows], X[rows][approx.index]), atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        self_neighbours(X[rows], 10, normalized=True, exact_rows=0, walk=walk)


def test_the_outlier_distances_of_large_classes_walk_one_shared_projection(monkeypatch):
    """Classes above EXACT_ROWS (lowered here) are searched approximately on slices of one projection
    made once for all classes; their k-NN distances stay close to the exact ones."""
    import pipeline.audit.outliers as outliers
    from pipeline.features.neighbours import HNSW_DIM, search_space, unit_rows

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 300)
    centres = rng.standard_normal((30, HNSW_DIM + 64)).astype(np.float32)
    X = unit_rows(centres[rng.integers(0, 30, y.size)] + 0.4 * rng.standard_normal((y.size, HNSW_DIM + 64)).astype(np.float32))
    exact = outliers.class_knn_distance(X, y)
    made = []
    monkeypatch.setattr(outliers, "search_space", lambda base: made.append(base.shape) or search_space(base))
    monkeypatch.setattr(outliers, "EXACT_ROWS", 200)
    approx = outliers.class_knn_distance(X, y)
    assert made == [X.shape]                      # one projection, of every row, for the three classes
    ratio = approx / exact
    assert np.median(ratio) < 1.02 and (ratio >= 1 - 1e-5).all()   # the graph can only miss, never invent, neighbours


def test_the_outlier_distances_taken_from_the_global_neighbours_equal_a_search_per_class(monkeypatch):
    """Rows with k of their class among their global neighbours take those, the others are searched
    within their class: the same distances as searching every class, exact and approximate alike."""
    import pipeline.audit.outliers as outliers
    from pipeline.features.neighbours import HNSW_DIM, CosineIndex, unit_rows

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 300)
    centres = rng.standard_normal((3, HNSW_DIM + 64)).astype(np.float32)
    X = unit_rows(0.25 * centres[y] + rng.standard_normal((y.size, HNSW_DIM + 64)).astype(np.float32))
    neigh = CosineIndex(X, normalized=True).self_query(12)
    same = (y[neigh.index] == y[:, None]).sum(axis=1)
    assert 0 < (same < 8).sum() < y.size // 4     # both paths are taken
    exact = outliers.class_knn_distance(X, y, k=8)
    np.testing.assert_allclose(outliers.class_knn_distance(X, y, k=8, neigh=neigh), exact, rtol=1e-5)
    monkeypatch.setattr(outliers, "EXACT_ROWS", 200)    # classes of 300: the missing rows go through the projection
    approx = outliers.class_knn_distance(X, y, k=8, neigh=neigh)
    ratio = approx / exact
    assert np.median(ratio) < 1.02 and (ratio >= 1 - 1e-5).all()


def test_the_map_embeds_at_most_its_limit_even_when_more_images_are_flagged():
    from pipeline.audit.runner import map_rows

    flagged = np.zeros(1000, bool)
    flagged[:700] = True
    rows = map_rows(1000, flagged, 500, seed=0)
    assert rows.size == 500 and flagged[rows].all() and np.unique(rows).size == 500
    rows = map_rows(1000, np.arange(1000) < 100, 500, seed=0)
    assert rows.size == 500 and set(range(100)) <= set(rows.tolist())


def test_the_logistic_on_unit_rows_is_the_model_on_rows_scaled_to_unit_rms():
    """fit_logistic scales C instead of copying the rows: the same probabilities as the scaled fit."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.audit.labels import fit_logistic
    from pipeline.features.neighbours import unit_rows

    rng = np.random.default_rng(0)
    U = unit_rows(rng.standard_normal((400, 64)) + np.repeat(np.eye(4, 64) * 2, 100, axis=0))
    y = np.repeat(np.arange(4), 100)
    ours = fit_logistic(U, y, 0.01, max_iter=2000).predict_proba(U)
    scaled = LogisticRegression(C=0.01, max_iter=2000, tol=1e-8).fit(U * 8.0, y).predict_proba(U * 8.0)
    np.testing.assert_allclose(ours, scaled, atol=1e-2)          # the same model, up to where lbfgs stops
    unscaled = LogisticRegression(C=0.01, max_iter=2000, tol=1e-8).fit(U, y).predict_proba(U)
    assert np.abs(unscaled - scaled).max() > 0.1                 # what C unscaled would have fitted


# ----------------------------------------------------------------------------- planted faults
def _three_classes(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cache of 3 slightly overlapping classes (some val errors): its path, splits, labels and
    features, and its train rows, the clearest members of their class first (the ones to flip)."""
    path = write_cache(tmp_path, n_images=300, dim=24, n_classes=3, sep=1.5, seed=3)
    with FeatureFile(path) as ff:
        splits, labels, x = ff.splits.copy(), ff.labels.copy(), ff.load()
    train = np.flatnonzero(splits == "train")
    means = np.stack([x[labels == c].mean(axis=0) for c in range(3)])
    typical = np.linalg.norm(x[train] - means[labels[train]], axis=1)
    return path, splits, labels, x, train[np.argsort(typical, kind="stable")]


def _rewrite(path: Path, labels: np.ndarray, x: np.ndarray) -> None:
    def edit(f):
        f["labels"][...] = labels
        f["features"][...] = x.astype(f["features"].dtype)
    _edit_cache(path, edit)


def test_a_flipped_label_is_ranked_first_and_a_cross_split_copy_is_leakage(tmp_path):
    path, splits, labels, x, clearest = _three_classes(tmp_path)
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    flipped = int(clearest[0])                                            # a clear member of its class...
    labels[flipped] = (labels[flipped] + 1) % 3                           # ...given the wrong label
    copy_from, copy_to = int(train[7]), int(val[0])
    x[copy_to] = x[copy_from]                                             # a val image that copies a train one
    labels[copy_to] = labels[copy_from]
    _rewrite(path, labels, x)

    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
    issues = result["label_issues"]
    assert issues and issues[0]["path"] == f"img/{flipped:05d}.jpg"
    assert issues[0]["given"] == f"class_{labels[flipped]}" and issues[0]["suggested"] != issues[0]["given"]
    dup = [d for d in result["duplicates"] if {d["a"], d["b"]} == {f"img/{copy_from:05d}.jpg", f"img/{copy_to:05d}.jpg"}]
    assert dup and dup[0]["kind"] == "near" and {dup[0]["split_a"], dup[0]["split_b"]} == {"train", "val"}
    assert result["leakage"]["pairs"] >= 1
    acc = result["leakage"]["accuracy"]["val"]
    assert acc["removed"] >= 1 and acc["n_after"] == acc["n_before"] - acc["removed"]
    # the copy is predicted right (its twin is in train): taking it out lowers the accuracy
    assert acc["after"] < acc["before"]
    assert result["counts"]["label_issues"] == len(issues)


def test_the_seed_draws_the_out_of_fold_folds_and_the_same_seed_repeats_them(tmp_path):
    path, *_ = _three_classes(tmp_path)
    with FeatureFile(path) as ff:
        runs = [audit_cache(ff, AuditOptions(seed=seed, draw_map=False)) for seed in (0, 0, 1)]
    scores = [[(i["path"], i["score"]) for i in r["label_issues"]] for r in runs]
    assert scores[0] == scores[1]
    assert scores[0] != scores[2]  # other folds, other out-of-fold probabilities (the kNN vote has no folds)


def test_an_image_far_from_its_class_tops_the_outlier_ranking():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 32)) * 3
    y = np.repeat(np.arange(3), 60)
    X = centres[y] + rng.standard_normal((180, 32))
    X[10] = rng.standard_normal(32) * 3                  # not from any class
    z = outlier_scores(X, y)
    assert int(np.argmax(z)) == 10 and z[10] > 3.5


def test_foreign_images_that_vouch_for_each_other_outrank_real_images_between_two_classes():
    """A group of foreign images dropped 4 per class sit near each other, which lowers each one's
    distance to its class; real images between two classes are about as far from theirs. The
    neighbourhood term (the z of an image's nearest images overall) lifts the first, which sit among
    outliers, over the second, which sit among ordinary images of the other class."""
    from pipeline.audit.outliers import class_knn_distance, class_z
    from pipeline.features.neighbours import unit_rows

    found_old, found_new = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((3, 32)) * 2
        y = np.repeat(np.arange(3), 60)
        X = centres[y] + rng.standard_normal((180, 32))
        foreign = rng.standard_normal(32) * 2 + 0.5 * rng.standard_normal((12, 32))
        between = np.stack([0.3 * centres[c] + 0.7 * centres[(c + 1) % 3] + rng.standard_normal(32)
                            for c in (0, 1, 2) * 4])
        X = unit_rows(np.vstack([X, foreign, between]).astype(np.float32))
        y = np.concatenate([y, np.arange(12) % 3, np.arange(12) % 3])
        planted = set(range(180, 192))
        old = class_z(class_knn_distance(X, y), y)
        new = outlier_scores(X, y)
        found_old.append(len(planted & set(np.argsort(-old)[:12].tolist())))
        found_new.append(len(planted & set(np.argsort(-new)[:12].tolist())))
    assert all(n > o for n, o in zip(found_new, found_old)), (found_old, found_new)
    assert sum(found_new) >= 48, found_new


def test_a_tiny_class_with_a_duplicate_pair_lists_no_image_of_another_class():
    """A class of three, two of them copies: its median distance is shared by half the class, so its
    MAD is 0. Its third image must not score in the thousands, and must not lift the ordinary images
    of the class it sits among into the outliers (their neighbourhood holds it)."""
    from pipeline.features.neighbours import self_neighbours, unit_rows

    rng = np.random.default_rng(3)
    centre = rng.standard_normal(32) * 2
    ordinary = centre + rng.standard_normal((60, 32))
    a = rng.standard_normal(32) * 2
    b = ordinary[0] + 0.05 * rng.standard_normal(32)  # the tiny class's third image, among the others
    X = unit_rows(np.vstack([ordinary, a, a, b]).astype(np.float32))
    y = np.concatenate([np.ones(60, int), np.zeros(3, int)])
    for neigh in (None, self_neighbours(X, 20, normalized=True)):  # the fallback and the runner's table
        z = outlier_scores(X, y, neigh=neigh)
        assert np.isfinite(z).all() and np.abs(z).max() < 50, np.abs(z).max()
        assert (z[:60] < 3.5).all(), np.sort(z[:60])[-5:]


def test_a_class_of_four_lists_its_ordinary_images_no_more_than_a_large_class_does():
    """Three distances make a narrow spread by chance: with the MAD of a class of four alone, its
    ordinary images were listed 7x as often as a large class's (0.13 per data set of 454 images with no
    outlier); pooled with the median class's spread, about as often. A far image planted in
    the class of four still tops the ranking."""
    from pipeline.audit.outliers import class_z
    import pipeline.audit.outliers as outliers
    from pipeline.features.neighbours import unit_rows

    def scores(X, y, prior):
        keep = outliers.class_z
        outliers.class_z = lambda d, yy: keep(d, yy, prior)
        try:
            return outlier_scores(X, y)
        finally:
            outliers.class_z = keep

    listed = {0.0: 0, outliers.PRIOR_IMAGES: 0}
    for seed in range(150):
        rng = np.random.default_rng(seed)
        y = np.repeat(np.arange(4), [150, 150, 150, 4])
        X = rng.standard_normal((4, 32))[y] * 2 + rng.standard_normal((y.size, 32))
        for prior in listed:
            listed[prior] += int((scores(unit_rows(X.astype(np.float32)), y, prior)[y == 3] >= 3.5).sum())
        X[-1] = rng.standard_normal(32) * 2.5  # now a far image in the class of four
        assert int(np.argmax(outlier_scores(unit_rows(X.astype(np.float32)), y))) == y.size - 1
    assert listed[0.0] >= 12 and listed[outliers.PRIOR_IMAGES] * 3 <= listed[0.0], listed
    # where small classes outnumber large ones, the spread they are pooled with is a large class's (the
    # median over all classes was a small one's: 9 listed of the small classes' 1,200, 0.75% per image)
    small = large = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        y = np.repeat(np.arange(13), [150] * 3 + [4] * 10)
        X = unit_rows((rng.standard_normal((13, 32))[y] * 2 + rng.standard_normal((y.size, 32))).astype(np.float32))
        z = outlier_scores(X, y)
        small, large = small + int((z[y >= 3] >= 3.5).sum()), large + int((z[y < 3] >= 3.5).sum())
    assert small / (30 * 40) <= large / (30 * 450), (small, large)
    assert class_z(np.array([1.0, 1.0, 1.0, 2.0]), np.zeros(4, int))[3] > 0


def test_where_every_class_is_small_ordinary_images_are_listed_about_as_rarely_as_in_large_classes():
    """With no class of 20 images to pool with, a class's spread is pooled with the small classes' median,
    each 1.4826 x MAD of a few values, which runs low (one deviation from a median of three is 0): in
    classes of three, 2.5% of ordinary images were listed (0.3% in classes of 30). Made unbiased for its
    few values (`mad_correction`), 0.6%, and a far image planted in such a class is still listed."""
    from pipeline.audit.outliers import mad_correction
    from pipeline.features.neighbours import unit_rows

    ordinary = planted = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        y = np.repeat(np.arange(200), 3)
        X = rng.normal(0, 1, (200, 128))[y] + rng.normal(0, 0.8, (y.size, 128))
        far = rng.choice(200, 10, replace=False) * 3  # one image of 10 classes: a photo of something else
        X[far] = rng.normal(0, 1, (10, 128)) + rng.normal(0, 0.8, (10, 128))
        listed = outlier_scores(unit_rows(X.astype(np.float32)), y) >= 3.5
        planted += int(listed[far].sum())
        ordinary += int(listed.sum() - listed[far].sum())
    assert ordinary / (10 * 590) < 0.012 and planted >= 85, (ordinary, planted)
    assert mad_correction(3) > mad_correction(9) > mad_correction(30) > 1


def test_near_duplicates_need_the_same_layout_not_only_a_close_embedding(tmp_path):
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(2)
    coarse = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((160, 120), Image.BICUBIC))  # smooth, like a photo
    other = np.asarray(Image.fromarray(base).transpose(Image.FLIP_TOP_BOTTOM))
    files = {"orig": base, "other": other}
    write_image(tmp_path / "orig.png", base, "png")
    write_image(tmp_path / "other.png", other, "png")
    im = Image.open(tmp_path / "orig.png")
    im.save(tmp_path / "q50.jpg", "JPEG", quality=50)
    im.resize((96, 72)).save(tmp_path / "small.png")
    im.crop((8, 6, 152, 114)).save(tmp_path / "crop.png")
    ImageEnhance.Brightness(im).enhance(1.1).save(tmp_path / "bright.png")
    names = ["orig", "q50", "small", "crop", "bright", "other"]
    paths = [str(tmp_path / f"{n}.{'jpg' if n == 'q50' else 'png'}") for n in names]
    assert all(thumbnail(p) is not None for p in paths) and files
    # every image is every other's neighbour at a high cosine: the layout check decides
    from pipeline.features.neighbours import Neighbours
    n = len(names)
    idx = np.array([[j for j in range(n) if j != i] for i in range(n)])
    neigh = Neighbours(idx, np.full(idx.shape, 0.9, np.float32))
    pairs = near_pairs(neigh, paths, NearSettings(neighbours=n - 1))
    found = {frozenset((names[p.a], names[p.b])) for p in pairs}
    for copy in ("q50", "small", "crop", "bright"):
        assert frozenset(("orig", copy)) in found, copy
    assert not any("other" in pair for pair in found)
    # unreadable images: only a cosine above embedding_only counts
    blind = near_pairs(neigh, [None] * n, NearSettings(neighbours=n - 1))
    assert blind == []


def test_copies_of_one_file_pair_with_the_earliest_split_and_are_not_also_near():
    from pipeline.audit.duplicates import exact_pairs
    from pipeline.features.neighbours import Neighbours

    hashes = ["h", "x", "h", "h", ""]
    splits = ["test", "train", "val", "train", "val"]     # listing order: test before train
    pairs = exact_pairs(hashes, splits)
    assert {(p.a, p.b) for p in pairs} == {(0, 3), (2, 3)}  # each copy with the train one
    idx = np.array([[2, 3], [0, 2], [0, 3], [0, 2], [0, 1]])
    neigh = Neighbours(idx, np.full(idx.shape, 0.99, np.float32))
    near = near_pairs(neigh, [None] * 5, NearSettings(neighbours=2), hashes)
    assert near and not any(hashes[p.a] and hashes[p.a] == hashes[p.b] for p in near)  # (0,1), (0,4), ... only


def test_a_class_of_one_image_sits_out_of_the_folds_and_the_others_keep_their_evidence(tmp_path):
    path = write_cache(tmp_path, n_images=61, n_classes=2, class_names=["a", "b", "c"], sep=2.0,
                       split_fractions=(1, 0, 0))

    def one_of_c(f):
        labels = f["labels"][:]
        labels[-1] = 2
        f["labels"][...] = labels
    _edit_cache(path, one_of_c)
    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
    assert result["out_of_fold"]["folds"] == 5
    assert result["out_of_fold"]["accuracy"]["logistic"] > 0.8
    # nothing can vouch for the lone image's label: listed or not, cleaned.csv keeps it (and its class)
    lone = f"img/{60:05d}.jpg"
    assert (lone, "c", "train") in cleaned_rows(result, relabel=False)
    assert (lone, "c", "train") in cleaned_rows(result, relabel=True, drop_below=1.0)


def test_no_cross_validation_lists_no_label_issues_and_features_that_pair_everything_are_said(tmp_path, monkeypatch):
    """Only one class of two images or more: no out-of-fold evidence, and ranking against uniform
    probabilities listed half the images as label errors. Features that make most images near copies
    (random weights: 6,373 pairs on digits) are said to mean little."""
    import warnings

    import pipeline.audit.runner as runner
    from pipeline.audit.duplicates import Pair
    from pipeline.errors import DataWarning

    labels = np.r_[np.zeros(29, int), [1]]
    path = write_cache(tmp_path, n_images=30, n_classes=2, labels=labels, split_fractions=(1, 0, 0))
    said: list[str] = []
    with FeatureFile(path) as ff:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            result = audit_cache(ff, NO_MAP, say=said.append)
        assert result["out_of_fold"]["folds"] == 0 and result["label_issues"] == []
        assert result["top_losses"] == []  # train's "out of fold" losses were listed without any folds
        assert any("no label issues: no two classes have two distinct images" in line for line in said), said
        monkeypatch.setattr(runner, "near_pairs", lambda *a, **k: [Pair(i, i + 1, 0.99, "near")
                                                                     for i in range(0, 28, 2)])
        with pytest.warns(DataWarning, match="28 of the 30 images have a near copy by these features"):
            audit_cache(ff, NO_MAP, say=said.append)


def test_a_class_whose_images_are_copies_of_one_is_one_image_to_the_audit(tmp_path):
    """Copies never vouch for each other, so a class made of copies of one image has nothing to vouch
    for it: it sits out of the folds like a class of one (all of it in one fold once left a training
    fold with a single class: a traceback), and cleaned.csv keeps one copy instead of dropping the class."""
    labels = np.r_[[0, 0], np.ones(18)].astype(np.int64)
    two = write_cache(tmp_path / "two", n_images=20, n_classes=2, labels=labels, split_fractions=(1, 0, 0))
    three = write_cache(tmp_path / "three", n_images=62, n_classes=2, class_names=["a", "b", "c"], sep=2.0,
                        split_fractions=(1, 0, 0))

    def copies(first: int, label: int | None = None):
        def edit(f):
            x = f["features"][...]
            x[first + 1] = x[first]
            f["features"][...] = x
            if label is not None:
                y = f["labels"][...]
                y[first:first + 2] = label
                f["labels"][...] = y
        return edit
    _edit_cache(two, copies(0))
    _edit_cache(three, copies(60, label=2))
    for path, first, name in ((two, 0, None), (three, 60, "c")):
        with FeatureFile(path) as ff:
            result = audit_cache(ff, NO_MAP)
        name = name or result["class_names"][0]
        pair = {f"img/{first:05d}.jpg", f"img/{first + 1:05d}.jpg"}
        assert any({d["a"], d["b"]} == pair for d in result["duplicates"])
        for relabel, drop_below in ((False, 0.2), (True, 1.0)):
            kept = [r for r in cleaned_rows(result, relabel, drop_below) if r[0] in pair]
            assert len(kept) == 1 and kept[0][1] == name, (path.name, relabel, kept)
    assert result["out_of_fold"]["folds"] == 5 and result["out_of_fold"]["accuracy"]["logistic"] > 0.8


def test_copies_of_an_image_share_a_fold_even_when_their_first_sits_out():
    y = np.ones(40, np.int64)
    y[:20] = 0
    y[0] = 2                                          # row 0: the one image of its class (no fold)
    groups = copy_groups(40, [(0, 25), (0, 33)])       # rows 25 and 33 (class 1) copy it
    for seed in range(10):
        fold = oof_folds(y, 5, seed, groups)
        assert fold[0] == -1 and fold[25] == fold[33] >= 0, seed


def test_a_class_whose_copies_fill_one_fold_gets_no_evidence_rather_than_zero():
    """Class 0: two distinct images, one of them copied twice; the copies join their first's fold, so on
    some seeds every row of class 0 sits in one fold and that fold's model never saw the class: those
    rows keep the uniform row (no evidence), never p(given) 0, which would list and drop them."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 4 + [1] * 10 + [2] * 10)
    U = rng.normal(size=(y.size, 8)) + 3.0 * np.eye(8)[y]
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    groups = copy_groups(y.size, [(0, 1), (0, 2)])
    gathered = 0
    for seed in range(20):
        fold = oof_folds(y, 2, seed, groups)
        alone = np.unique(fold[:4]).size == 1
        gathered += alone
        proba = logistic_oof(U, y, 3, 2, seed, groups=groups)
        assert (proba[np.arange(y.size), y] > 0).all(), seed
        if alone:
            assert np.allclose(proba[:4], 1 / 3), seed
    assert gathered  # the case happens on these seeds


def test_one_class_and_no_labels_are_one_line_errors(tmp_path):
    one = write_cache(tmp_path / "one", n_images=40, labels=np.zeros(40, np.int64), n_classes=1)
    none = write_cache(tmp_path / "none", n_images=40, labels=np.full(40, -1, np.int64))
    with FeatureFile(one) as ff, pytest.raises(UserError, match="at least two classes"):
        audit_cache(ff, NO_MAP)
    with FeatureFile(none) as ff, pytest.raises(UserError, match="no labels"):
        audit_cache(ff, NO_MAP)


def test_tiny_classes_and_feature_maps_give_a_result(tmp_path):
    """Fewer images in a class than folds: fewer folds; pooled=none maps: averaged as fit-head does."""
    labels = np.array([0, 1, 2] * 10 + [2, 2])
    path = write_cache(tmp_path, n_images=32, labels=labels, n_classes=3, feature_shape=(2, 2, 16), dim=16,
                       split_fractions=(1, 0, 0))
    with FeatureFile(path) as ff:
        ff_classes = np.bincount(ff.labels)
        result = audit_cache(ff, AuditOptions(cv=20))
    assert result["out_of_fold"]["folds"] == int(ff_classes.min())
    assert result["counts"]["images"] == 32 and len(result["map"]["x"]) == 32


def test_write_audit_files_and_cleaned_rows(tmp_path):
    path = write_cache(tmp_path, n_images=120, dim=16, n_classes=2, sep=1.5)
    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
        run = Registry(tmp_path).start("audit", {})
        files = write_audit(result, run)
    data = json.loads(files["audit"].read_text())
    assert data["run"] == run.id and data["counts"]["images"] == 120
    assert {"label_issues", "duplicates", "outliers", "leakage", "top_losses", "most_confused", "confusion"} <= set(data)
    for name in ("label_issues", "duplicates", "outliers", "top_losses"):
        lines = files[name].read_text().splitlines()
        assert len(lines) == 1 + len(data[name])
    kept = cleaned_rows(result, relabel=False)
    assert len(kept) == 120 - data["cleaned"]["removed"]
    # each listed label issue says what cleaned.csv did with it, in audit.json and label_issues.csv
    labels = {p: c for p, c, _ in kept}
    assert data["label_issues"] and {d["cleaned"] for d in data["label_issues"]} <= {"dropped", "kept"}
    for d in data["label_issues"]:
        assert (d["cleaned"] == "dropped") == (d["path"] not in labels)
        assert d["cleaned"] == "dropped" or labels[d["path"]] == d["given"]
    assert files["label_issues"].read_text().splitlines()[0].endswith(",cleaned")
    relabelled = cleaned_rows(result, relabel=True)
    assert len(relabelled) >= len(kept)


def test_a_class_cleaning_empties_is_named_in_audit_json_and_by_the_command(tmp_path):
    """Two training images labelled "c" that sit deep in class a: both are confident label issues and
    cleaned.csv drops both; it then drops c's val image too (fit-head refuses a class with val images
    but no training images, so the printed command would fail), and the user hears that a head fitted
    on it will not know "c"."""
    path, splits, labels, x, clearest = _three_classes(tmp_path)
    with FeatureFile(path) as ff:
        names = list(ff.class_names)
    a = [int(r) for r in clearest if labels[r] == 0][:2]
    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
        run = Registry(tmp_path).start("audit", {})
        write_audit(result, run)
    assert result["cleaned"]["classes_left_out"] == [] and result["cleaned"]["splits_emptied"] == []
    labels = labels.copy()
    c_val = int(np.flatnonzero((labels == 2) & (splits == "val"))[0])
    labels[a] = 2
    labels[(labels == 2) & ~np.isin(np.arange(labels.size), [*a, c_val])] = 1
    _rewrite(path, labels, x)
    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
        run = Registry(tmp_path).start("audit", {})
        files = write_audit(result, run)
    assert result["cleaned"]["classes_left_out"] == [names[2]]
    assert json.loads(files["audit"].read_text())["cleaned"]["classes_left_out"] == [names[2]]
    assert f"cleaned.csv keeps no training image of {names[2]!r}, so none of its val" in html.unescape(
        files["report"].read_text())
    rows = cleaned_rows(result, relabel=False)
    assert all(label != names[2] for _, label, _ in rows)  # c's val image goes with its training images
    assert {label for _, label, split in rows if split != "train"} <= {label for _, label, split in rows if split == "train"}
    proc = run_cli("audit", "--cache", str(path), "--cache-dir", str(tmp_path / "runs"), "--no-map")
    assert proc.returncode == 0, proc.stderr
    assert (f"cleaned.csv keeps no training image of {names[2]!r}, so none of its val or test images either: a head "
            f"fitted on it will not know that class") in proc.stderr

    # the rule alone: c's training images (rows 2, 3) both dropped, its val image (row 5) in no finding
    img = Audited(rows=np.arange(6), X=np.zeros((6, 2)), y=np.array([0, 1, 2, 2, 0, 2]), paths=[f"p{i}" for i in range(6)],
                  splits=np.array(["train"] * 4 + ["val"] * 2), class_names=["a", "b", "c"])
    result = {"_images": img, "_cleaning": {"flagged_issues": [2, 3], "outliers": [], "pairs": [],
                                            "suggested": [0, 1, 0, 0, 0, 2], "confidence": [0.9] * 6,
                                            "given_probability": [0.9, 0.9, 0.05, 0.05, 0.9, 0.9]}}
    assert cleaned_rows(result, relabel=False) == [("p0", "a", "train"), ("p1", "b", "train"), ("p4", "a", "val")]


def test_cleaning_that_empties_val_says_fit_head_will_hold_out_training_images(tmp_path):
    """Every val image a copy of a training image: cleaned.csv keeps none of them, and the user hears
    that fit-head on it holds out part of the training images as val instead."""
    path, splits, labels, x, _ = _three_classes(tmp_path)
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    x[val], labels[val] = x[train[:val.size]], labels[train[:val.size]]
    _rewrite(path, labels, x)
    proc = run_cli("audit", "--cache", str(path), "--no-map")
    assert proc.returncode == 0, proc.stderr
    (found,) = (path.parent.parent / "runs").glob("*/audit.json")  # the run goes beside the cache file
    data = json.loads(found.read_text())
    assert data["cleaned"]["splits_emptied"] == ["val"]
    assert "val" not in {line.rsplit(",", 1)[1] for line in (found.parent / "cleaned.csv").read_text().splitlines()[1:]}
    assert "cleaned.csv keeps no val image" in proc.stderr and "holds out part of the training images" in proc.stderr


def test_cleaned_rows_drop_only_the_issues_the_evidence_rules_out_and_relabel_confident_ones(tmp_path):
    """Of four flagged label issues: a confident flip (p(given) 0.05, suggestion 0.9) is dropped, or
    relabelled with --relabel; one with an unsure suggestion but p(given) 0.1 is dropped either way; a
    hard image (p(given) 0.3) keeps its label either way; an outlier and a duplicate's later copy go."""
    img = Audited(rows=np.arange(7), X=np.zeros((7, 2)), y=np.array([0, 0, 1, 1, 0, 1, 0]),
                  paths=[f"p{i}" for i in range(7)], splits=np.array(["train"] * 6 + ["val"]), class_names=["a", "b"])
    result = {"_images": img, "_cleaning": {
        "flagged_issues": [0, 1, 2, 3], "outliers": [4], "pairs": [(5, 6)], "suggested": [1, 1, 0, 0, 0, 1, 0],
        "confidence": [0.9, 0.55, 0.6, 0.65, 0.5, 0.5, 0.5], "given_probability": [0.05, 0.1, 0.4, 0.3, 0.5, 0.5, 0.5]}}
    assert cleaned_rows(result, relabel=False) == [("p2", "b", "train"), ("p3", "b", "train"), ("p5", "b", "train")]
    relabelled = cleaned_rows(result, relabel=True)
    assert relabelled == [("p0", "b", "train"), ("p2", "b", "train"), ("p3", "b", "train"), ("p5", "b", "train")]
    assert cleaned_rows(result, relabel=False, drop_below=1.0) == [("p5", "b", "train")]  # every listed issue

    # write_audit: the counts and what happened to each listed issue, by row (paths may repeat)
    img.paths[1] = img.paths[2] = "same.jpg"
    result.update(class_names=["a", "b"], counts={"images": 7}, duplicates=[], outliers=[], top_losses=[],
                  label_issues=[{"path": img.paths[i], "given": "ab"[img.y[i]]} for i in (0, 1, 2, 3)])
    data = json.loads(write_audit(result, Registry(tmp_path).start("audit", {}), relabel=True)["audit"].read_text())
    assert {k: v for k, v in data["cleaned"].items() if k != "command"} == {
        "file": "cleaned.csv", "images": 4, "removed": 3, "relabel": True, "relabelled": 1,
        "label_issues_dropped_below": 0.2, "classes_left_out": ["a"],  # a's train images: relabelled, dropped, outlier
        "splits_emptied": ["val"], "train_images": 4}  # p6, a's only val image: the later copy of p5
    assert [d["cleaned"] for d in data["label_issues"]] == ["relabelled", "dropped", "kept", "kept"]


def test_the_retrain_command_asks_for_the_cached_features_and_only_for_files(tmp_path):
    """fit-head reuses cached rows only for the same extraction: the command carries the cache's
    options that are not defaults, a backend other than TensorFlow and a cache folder other than the
    default; built-in and tfds: images cannot be named by a manifest, so no command is offered."""
    from pipeline.audit.runner import retrain_command
    from pipeline.extract.plan import DEFAULT_CACHE, ExtractRequest

    request = ExtractRequest(data="/photos", backbone="efficientnet_lite0", dtype="float32", pooling="max").to_json()
    where = {"data": "/photos", "request": request, "backend": "jax", "cache_root": str(tmp_path / "c")}
    words = shlex.split(retrain_command({"_retrain": where}, tmp_path / "a b" / "cleaned.csv"))
    assert words == ["python", "cli.py", "fit-head", "--data", str(tmp_path / "a b" / "cleaned.csv"),
                     "--allow-outside-paths", "--backbone", "efficientnet_lite0", "--pooling", "max", "--dtype",
                     "float32", "--backend", "jax", "--cache-dir", str(tmp_path / "c")]
    plain = {**where, "request": ExtractRequest().to_json(), "backend": "tensorflow",
             "cache_root": str(DEFAULT_CACHE)}
    assert retrain_command({"_retrain": plain}, Path("/r/cleaned.csv")) == (
        "python cli.py fit-head --data /r/cleaned.csv --allow-outside-paths")
    for data in ("builtin:digits", "tfds:beans"):
        assert retrain_command({"_retrain": {**where, "data": data}}, Path("/r/cleaned.csv")) is None


def test_cleaning_keeps_one_copy_of_a_pair_and_relabels_only_to_another_label():
    """A duplicate pair whose earlier copy goes anyway (an outlier here, a dropped label issue there)
    keeps its later copy, so the image stays once; a label issue that confident learning alone lists
    (its suggestion is its given label, p 0.8) is not 'relabelled' to itself: --drop-below 1 drops it
    with --relabel as without."""
    img = Audited(rows=np.arange(7), X=np.zeros((7, 2)), y=np.array([0, 0, 0, 1, 1, 0, 1]),
                  paths=[f"p{i}" for i in range(7)], splits=np.array(["train", "val", "train", "test", "train",
                                                                       "train", "train"]), class_names=["a", "b"])
    result = {"_images": img, "_cleaning": {
        "flagged_issues": [2, 6], "outliers": [0], "pairs": [(1, 0), (2, 3)], "suggested": [0, 0, 1, 1, 1, 0, 1],
        "confidence": [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8], "given_probability": [0.9, 0.9, 0.05, 0.9, 0.9, 0.9, 0.8]}}
    assert [p for p, _, _ in cleaned_rows(result, relabel=False)] == ["p1", "p3", "p4", "p5", "p6"]
    assert [p for p, _, _ in cleaned_rows(result, relabel=False, drop_below=1.0)] == ["p1", "p3", "p4", "p5"]
    assert [p for p, _, _ in cleaned_rows(result, relabel=True, drop_below=1.0)] == ["p1", "p2", "p4", "p5"]


def test_copies_in_three_splits_keep_one_copy_even_when_the_first_goes():
    """Copies pair with their group's first member (or chain through a middle one): when that one is
    dropped, one copy stays, the earliest split's, and no later copy of it (test kept no copy of val)."""
    img = Audited(rows=np.arange(7), X=np.zeros((7, 2)), y=np.zeros(7, int),
                  paths=[f"p{i}" for i in range(7)],
                  splits=np.array(["train", "val", "test", "train", "train", "val", "test"]), class_names=["a"])
    result = {"_images": img, "_cleaning": {
        "flagged_issues": [], "outliers": [0, 3], "pairs": [(0, 1), (0, 2), (3, 4), (3, 5), (5, 6)],
        "suggested": [0] * 7, "confidence": [0.9] * 7, "given_probability": [0.9] * 7}}
    assert [p for p, _, _ in cleaned_rows(result, relabel=False)] == ["p1", "p4"]


def test_top_losses_list_the_misclassified_even_below_unsure_right_answers():
    """With three classes a right answer at p 0.34 has a higher loss than a wrong one at 0.45: the
    top losses are taken among the errors, so those five are listed, not crowded out."""
    from pipeline.audit.labels import LabelEvidence
    from pipeline.audit.runner import _top_losses

    y = np.zeros(30, int)
    proba = np.tile([0.34, 0.33, 0.33], (30, 1))
    proba[25:] = [0.45, 0.55, 0.0]
    img = Audited(rows=np.arange(30), X=np.zeros((30, 2)), y=y, paths=[f"p{i}" for i in range(30)],
                  splits=np.array(["train"] * 30), class_names=["a", "b", "c"])
    ev = LabelEvidence(logistic=proba, knn=proba, proba=proba, folds=5, C=0.01)
    listed = _top_losses(img, ev, {})
    assert [d["path"] for d in listed] == [f"p{i}" for i in range(25, 30)]
    assert {d["predicted"] for d in listed} == {"b"}


def test_a_wrong_label_copied_twice_is_still_found(tmp_path):
    """A copy at cosine 1 outvoted every other neighbour, so an image copied with its wrong label
    vouched for itself; copies now neither vote for each other nor train each other's fold."""
    path, _, labels, x, clearest = _three_classes(tmp_path)
    flipped, twin = (int(r) for r in clearest[:2])
    labels[flipped] = (labels[flipped] + 1) % 3
    x[twin], labels[twin] = x[flipped], labels[flipped]
    _rewrite(path, labels, x)
    with FeatureFile(path) as ff:
        result = audit_cache(ff, NO_MAP)
    assert {d["path"] for d in result["label_issues"][:2]} == {f"img/{flipped:05d}.jpg", f"img/{twin:05d}.jpg"}


# ------------------------------------------------------------------------------- as a user runs it
def test_cli_audit_finds_a_copied_val_image_and_the_cleaned_manifest_reuses_every_row(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8, classes=("red", "green", "blue"))
    src = data / "train" / "red" / "img_000.jpg"
    shutil.copy(src, data / "val" / "red" / "copy_of_train.jpg")            # leakage: the same bytes in val
    cache = str(tmp_path / "cache")
    proc = run_cli("audit", "--data", str(data), "--cache-dir", cache, *FAST)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(cache) / "runs" / re.search(r"audit (\S+) in", proc.stdout).group(1)
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["version"] == 2  # the outlier score's neighbourhood term and cleaned.command
    assert "report.html (review the findings there: drop, keep or relabel each image" in proc.stdout, proc.stdout
    exact = [d for d in audit["duplicates"] if d["kind"] == "exact"]
    assert len(exact) == 1 and {Path(exact[0]["a"]).name, Path(exact[0]["b"]).name} == {"img_000.jpg",
                                                                                          "copy_of_train.jpg"}
    assert audit["leakage"]["pairs"] >= 1 and audit["leakage"]["accuracy"]["val"]["removed"] >= 1
    for name in ("report.html", "cleaned.csv", "label_issues.csv", "duplicates.csv", "outliers.csv", "top_losses.csv"):
        assert (run_dir / name).is_file(), name
    cleaned = (run_dir / "cleaned.csv").read_text().splitlines()
    assert not any("copy_of_train" in line for line in cleaned)            # the val copy is dropped
    assert len(cleaned) - 1 == audit["cleaned"]["images"]
    assert f"cleaned.csv leaves out {audit['cleaned']['removed']} images" in proc.stderr, proc.stderr
    runs = run_cli("runs", "--stage", "audit", "--cache-dir", cache)
    assert run_dir.name in runs.stdout, runs.stdout + runs.stderr

    # the command the audit prints (and audit.json holds) trains on cleaned.csv with the cache's options
    printed = re.search(r"train on it: (.*)$", proc.stderr, re.M).group(1)
    assert printed == audit["cleaned"]["command"]
    words = shlex.split(printed)
    assert words[:3] == ["python", "cli.py", "fit-head"] and "--cache-dir" in words and "vgg16" in words
    fit = run_cli(*words[2:], "--no-progress", "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    assert "computed 0" in fit.stdout + fit.stderr, fit.stdout + fit.stderr

    fit_run = re.search(r"run (\S+) saved in", fit.stdout).group(1)
    again = run_cli("audit", "--cache", re.search(r"wrote (\S+\.h5)", fit.stdout + fit.stderr).group(1),
                    "--run", fit_run, "--relabel", "--drop-below", "1", "--no-map", "--seed", "3", "--cache-dir", cache)
    assert again.returncode == 0, again.stderr
    rerun = Path(cache) / "runs" / re.search(r"audit (\S+) in", again.stdout).group(1)
    assert json.loads((rerun / "audit.json").read_text())["model"] == "run head"
    config = json.loads((rerun / "config.json").read_text())
    assert config["relabel"] is True and config["drop_below"] == 1.0 and config["seed"] == 3
    relabelled = json.loads((rerun / "audit.json").read_text())["cleaned"]
    assert relabelled["relabel"] is True and f"relabels {relabelled['relabelled']};" in again.stderr, again.stderr
    assert relabelled["label_issues_dropped_below"] == 1.0
    not_a_head = run_cli("audit", "--data", str(data), "--run", run_dir.name, "--no-map", "--cache-dir", cache)
    assert not_a_head.returncode == 2 and len(not_a_head.stderr.strip().splitlines()) == 1, not_a_head.stderr
    assert "was made by audit; --run takes a fit-head or finetune run" in not_a_head.stderr, not_a_head.stderr

    # --cache reads the features as extracted: images changed or gone since are named, once
    assert "since they were extracted" not in again.stderr, again.stderr  # nothing changed: no warning
    (data / "train" / "green" / "img_001.jpg").unlink()
    shutil.copy(data / "train" / "blue" / "img_002.jpg", data / "train" / "red" / "img_003.jpg")
    stale = run_cli("audit", "--cache", json.loads((run_dir / "config.json").read_text())["cache_file"], "--no-map",
                    "--cache-dir", cache)
    assert stale.returncode == 0, stale.stderr
    assert re.search(r"^warning: 2 of the audited images changed or went missing since they were extracted \(e\.g\. "
                     r".*img_00[13]\.jpg: (missing|changed)\).*audit with --data .* --backbone vgg16 .*--image-size 32"
                     r".*--cache-dir \S+ to extract those again first$",
                     stale.stderr, re.M), stale.stderr

    if chromium() is None:
        pytest.skip("no chromium on PATH (CI installs Debian's chromium); the report's counts were not checked in a browser")
    with Page((run_dir / "report.html").as_uri(), tmp_path / "chrome") as page:
        shown = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('span.count'))"
                              ".map(s => [s.dataset.key, +s.textContent]))")
        assert shown == audit["counts"]
        # reviewed, untouched: cleaned.csv
        assert page.evaluate("window.reviewedCsv()") == (run_dir / "cleaned.csv").read_bytes().decode("utf-8")
        assert page.evaluate("document.querySelectorAll('select.decide').length") > 0


def test_cli_audit_with_a_run_reads_that_runs_features_and_refuses_a_head_that_saw_its_val(tmp_path):
    """--run: the audit reads the run's own features (its backbone and options, no new extraction),
    refuses extract options its head could not read, refuses a head trained on another split of the same
    images (its val accuracy would not be held out), and records the run's full id; --cache of a file
    outside a cache's features/ is refused; the retrain command's paths are absolute."""
    data = make_folder(tmp_path / "data", per_class=10, classes=("red", "green", "blue"), splits=())
    fit = run_cli("fit-head", "--data", "data", "--cache-dir", "cache", *FAST, "--split-seed", "1",
                  "--head", "logistic", "--C", "1.0", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    run_id = re.search(r"run (\S+) saved in", fit.stdout).group(1)
    fitted = json.loads((tmp_path / "cache" / "runs" / run_id / "config.json").read_text())
    assert fitted["data"] == str(data.resolve()) and Path(fitted["cache_file"]).is_absolute()  # given relative

    audit = run_cli("audit", "--run", run_id[:-2], "--cache-dir", "cache", "--no-map", "--no-progress", cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    assert "extracting first" not in audit.stderr and "computed" not in audit.stdout + audit.stderr, audit.stderr
    run_dir = tmp_path / "cache" / "runs" / re.search(r"audit (\S+) in", audit.stdout).group(1)
    assert json.loads((run_dir / "audit.json").read_text())["model"] == "run head"
    assert json.loads((run_dir / "config.json").read_text())["parent_run"] == run_id
    words = shlex.split(re.search(r"train on it: (.*)$", audit.stderr, re.M).group(1))
    assert Path(words[words.index("--data") + 1]).is_absolute() and words[words.index("--data") + 1].endswith("cleaned.csv")
    assert Path(words[words.index("--cache-dir") + 1]).is_absolute()

    other = run_cli("audit", "--run", run_id, "--image-size", "48", "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "--image-size" in other.stderr and "sets the features" in other.stderr
    ignored = run_cli("audit", "--run", run_id, "--val-fraction", "0.5", "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert ignored.returncode == 2 and "--val-fraction" in ignored.stderr and "sets the features" in ignored.stderr
    cleaned = run_cli("audit", "--run", run_id, "--data", str(run_dir / "cleaned.csv"), "--allow-outside-paths",
                      "--cache-dir", "cache", "--no-map", "--no-progress", cwd=tmp_path)  # the run's head on the audit's manifest
    assert cleaned.returncode == 0, cleaned.stderr
    assert "computed" not in cleaned.stdout + cleaned.stderr or "computed 0" in cleaned.stdout + cleaned.stderr

    resplit = run_cli("extract", "--data", str(data), "--cache-dir", "cache", *FAST, cwd=tmp_path)  # split seed 0
    assert resplit.returncode == 0, resplit.stderr
    key = re.search(r"wrote (\S+\.h5)", resplit.stdout + resplit.stderr).group(1)
    split_given = run_cli("audit", "--cache", key, "--val-fraction", "0.5", "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert split_given.returncode == 2 and "--val-fraction would be ignored" in split_given.stderr, split_given.stderr
    seen = run_cli("audit", "--cache", key, "--run", run_id, "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert seen.returncode == 2 and len(seen.stderr.strip().splitlines()) == 1, seen.stderr
    assert "trained on" in seen.stderr and "not be held out" in seen.stderr and "(leave out --data and --cache)" in seen.stderr
    fit_dir = tmp_path / "cache" / "runs" / run_id                     # the run's cache removed: its split.csv tells
    Path(json.loads((fit_dir / "config.json").read_text())["cache_file"]).unlink()
    gone = run_cli("audit", "--cache", key, "--run", run_id, "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert gone.returncode == 2 and "trained on" in gone.stderr, gone.stderr
    (fit_dir / "split.csv").unlink()                                   # a run from before split.csv: said, not silent
    unknown = run_cli("audit", "--cache", key, "--run", run_id, "--cache-dir", "cache", "--no-map", cwd=tmp_path)
    assert unknown.returncode == 0 and "training images are unknown (its split.csv is missing or damaged, and its cache file" in unknown.stderr, unknown.stderr

    outside = tmp_path / "elsewhere" / "copy.h5"
    outside.parent.mkdir()
    shutil.copy(tmp_path / key if not Path(key).is_absolute() else key, outside)
    for command in ("audit", "fit-head"):  # each would record its run in the file's grandparent
        loose = run_cli(command, "--cache", str(outside), cwd=tmp_path)
        assert loose.returncode == 2 and "not in a cache folder's features/" in loose.stderr, loose.stderr
        assert len(loose.stderr.strip().splitlines()) == 1, loose.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_audit_bad_input_is_one_line(tmp_path):
    one = make_folder(tmp_path / "one", per_class=4, classes=("only",))
    proc = run_cli("audit", "--data", str(one), "--cache-dir", str(tmp_path / "c"), *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: audit needs at least two classes"), proc.stderr
    missing_run = run_cli("audit", "--data", str(one), "--run", "nope", "--cache-dir", str(tmp_path / "c"), *FAST)
    assert missing_run.returncode == 2 and "Traceback" not in missing_run.stderr
    assert len(missing_run.stderr.strip().splitlines()) == 1, missing_run.stderr
    for value in ("1.5", "nan"):  # nan passes any range check: it would have dropped nothing and written NaN to JSON
        bad = run_cli("audit", "--data", str(one), "--drop-below", value, "--cache-dir", str(tmp_path / "c"), *FAST)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--drop-below" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    only_val = make_folder(tmp_path / "v", per_class=5, splits=("val",))  # printed a fit-head command that fails
    proc = run_cli("audit", "--data", str(only_val), "--no-map", "--cache-dir", str(tmp_path / "c"), *FAST)
    assert proc.returncode == 0 and "train on it:" not in proc.stderr, proc.stderr
    assert "it keeps no training image, so fit-head cannot train on it" in proc.stderr, proc.stderr


def test_audit_help_states_the_cleaning_thresholds_without_importing_scikit_learn(tmp_path):
    """The thresholds live in pipeline.audit.rules, so `--help` names the values the audit uses and stays off
    scikit-learn's import."""
    from pipeline.audit.rules import DROP_BELOW, RELABEL_CONFIDENCE

    code = ("import sys\nfrom click.testing import CliRunner\nfrom pipeline.cli import cli\n"
            "r = CliRunner().invoke(cli, ['audit', '--help'], terminal_width=400)\n"
            "print(r.output)\nprint('sklearn loaded:', 'sklearn' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    out = " ".join(proc.stdout.split())
    assert f"out-of-fold probability of {RELABEL_CONFIDENCE:g} or more" in out
    assert re.search(rf"--drop-below .*\[default: {DROP_BELOW:g};", out), out
    assert "sklearn loaded: False" in out


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """audit.json, the CSVs and cleaned.csv hold paths as given ('café/…'); under a C locale Python's
    default encoding is ASCII, which raised a traceback, and cp1252 would write what the manifest
    reader (UTF-8) misreads."""
    code = ("import sys; from pipeline.atomic import write_text_atomic; "
            "write_text_atomic(sys.argv[1], 'path\\ncaf\\u00e9/rose.jpg\\n')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.csv")], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.csv").read_bytes() == "path\ncafé/rose.jpg\n".encode("utf-8")


def test_cli_audit_of_built_in_images_offers_no_command_and_no_review(tmp_path):
    """builtin: images have names, not files: cleaned.csv is a list to read, so neither a retrain command
    nor the report's review (whose download would be a manifest no command can load) is offered. Near
    duplicates need their 8x8 pixels to agree too."""

    proc = run_cli("audit", "--data", "builtin:digits", "--cache-dir", str(tmp_path / "cache"), *FAST, "--no-map")
    assert proc.returncode == 0, proc.stderr
    assert "which a manifest cannot load" in proc.stderr and "train on it" not in proc.stderr, proc.stderr
    assert "review the findings there" not in proc.stdout, proc.stdout
    run_dir = tmp_path / "cache" / "runs" / re.search(r"audit (\S+) in", proc.stdout).group(1)
    page = (run_dir / "report.html").read_text()
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["cleaned"]["command"] is None
    assert "<script" not in page and 'class="decide"' not in page
    near = [d for d in audit["duplicates"] if d["kind"] == "near"]  # their pixels are read, as the report shows them:
    # cosine alone paired a '6' and a '1' (Lite0), the 8x8 pixels alone most '1's: both are needed
    assert near and all(d["pixel_correlation"] >= 0.95 and d["similarity"] >= 0.97 for d in near), near[:3]
