"""The knn head (a weighted vote of the nearest training images that can name them) and calibration
(ECE and NLL per split, reliability diagram, temperature scaling) through the library and the CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder, run_cli
from helpers_features import blobs, write_cache

from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads.base import FeatureSource
from pipeline.heads.calibration import fit_temperature, nll
from pipeline.heads.folds import cv_folds
from pipeline.heads.knn import VOTE_FLOOR, KNNHead
from pipeline.heads.logistic import LogisticHead
from pipeline.heads.registry import load_head, make_head
from pipeline.tracking.metrics import classification_report

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--no-progress"]


def _run_id(stdout: str) -> str:
    return next(l for l in stdout.splitlines() if "saved in" in l).split(" run ")[1].split()[0]


def _brute_force_vote(train: np.ndarray, y: np.ndarray, x: np.ndarray, k: int, t: float, n_classes: int):
    """DINO's eval_knn rule, written out: cosine similarity, top k, weights exp(s / T), class sums."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = b @ a.T
    out = np.zeros((len(x), n_classes))
    for i in range(len(x)):
        top = np.argsort(-s[i])[:k]
        for j in top:
            out[i, y[j]] += np.exp(s[i, j] / t)
    return out / out.sum(axis=1, keepdims=True)


def test_the_vote_is_dinos_weighted_knn_and_k_and_t_come_from_cv():
    X, y = blobs(300, 16, 3, sep=1.5)
    head = KNNHead(k=7, vote_temperature=0.1, calibrate=False).fit(X[:200], y[:200])
    votes = _brute_force_vote(X[:200], y[:200], X[200:], 7, 0.1, 3)
    np.testing.assert_allclose(head.predict_proba(X[200:]), (votes + VOTE_FLOOR) / (1 + 3 * VOTE_FLOOR), atol=1e-5)
    auto = KNNHead(ks=(1, 5, 25), vote_temperatures=(0.05, 0.5)).fit(X[:200], y[:200])
    assert len(auto.cv_scores_) == 6  # leave-one-image-out, which chooses k and T
    assert auto.cv_scores_[f"k={auto.k_} T={auto.vote_temperature_:g}"] == min(auto.cv_scores_.values())
    assert auto.k_ in (1, 5, 25) and auto.temperature_ > 0
    assert (auto.predict(X[200:]) == y[200:]).mean() > 0.8
    raw = KNNHead(ks=(1, 5, 25), vote_temperatures=(0.05, 0.5), calibrate=False).fit(X[:200], y[:200])
    assert (raw.k_, raw.vote_temperature_, raw.temperature_) == (auto.k_, auto.vote_temperature_, 1.0)
    np.testing.assert_array_equal(raw.predict(X[200:]), auto.predict(X[200:]))  # calibration moves no prediction


def test_the_cv_log_loss_is_the_chosen_votes_on_the_other_heads_folds():
    """What the auto head compares: the vote at the chosen k and T, each row voted on by the other folds
    of `cv_folds` (the logistic and svm heads' folds, same seed) only, the temperature fitted without
    the fold it scores; written out here by brute force."""
    X, y = blobs(300, 16, 3, sep=0.6)
    head = KNNHead(ks=(5, 25), vote_temperatures=(0.05, 0.5), random_state=3).fit(X, y)
    folds, _ = cv_folds(y, None, 5, 3)
    logits = np.zeros((y.size, 3))
    for train, test in folds:
        logits[test] = np.log(_brute_force_vote(X[train], y[train], X[test], head.k_, head.vote_temperature_, 3)
                              + VOTE_FLOOR)
    want = sum(nll(logits[test], y[test], fit_temperature(logits[train], y[train])) * test.size
               for train, test in folds) / y.size
    assert head.cv_log_loss_ == pytest.approx(want, rel=1e-6) and head.cv_how_.startswith("5-fold CV")
    assert head.cv_accuracy_ == pytest.approx((logits.argmax(axis=1) == y).mean())
    assert head.facts()["cv_log_loss_on"] == head.cv_how_


def test_an_images_augmented_views_never_vote_for_it(tmp_path):
    """Leave-one-image-out: with views, a row's CV neighbours never include its own image's rows."""
    path = write_cache(tmp_path, n_images=90, dim=8, n_classes=3, views=2, split_fractions=(1, 0, 0))
    with FeatureFile(path) as ff:
        rows = ff.rows("train", "all")
        head = KNNHead(k=5, vote_temperature=0.07)
        head.fit(FeatureSource(ff, rows), ff.labels[rows])
        groups = ff.index[rows]
        queries, *_ = head._cross_validate(ff.labels[rows], groups, [5], [0.07])
        nb = head.neighbours(FeatureSource(ff, rows[queries]), 5)
        from pipeline.features.neighbours import CosineIndex
        cv = CosineIndex(head.memory_, groups=groups).query(head.memory_[queries], 5, query_groups=groups[queries])
        assert (groups[cv.index] != groups[queries][:, None]).all()
        assert (groups[nb.index[:, 0]] == groups[queries]).all()  # unrestricted, an image finds itself first
        assert head.neighbour_paths(nb)[0][0] == ff.paths[rows[queries[0]]]


def test_knn_keras_form_predicts_like_the_head():
    X, y = blobs(160, 12, 4, sep=2.0)
    head = KNNHead(k=9).fit(X[:120], y[:120], paths=[f"img/{i}.jpg" for i in range(120)])
    model = head.to_keras()  # built-in layers and keras.ops: top-k, exp, the one-hot vote
    np.testing.assert_allclose(np.asarray(model.predict(X[120:], verbose=0)), head.predict_proba(X[120:]), atol=1e-5)
    # duplicated training images tie at the k-th similarity: still exactly k voters; a tiny T with far
    # neighbours: weights relative to the nearest do not underflow to a uniform vote
    dup = np.concatenate([X[:60], X[:60]])
    for kw in ({"k": 3}, {"k": 5, "vote_temperature": 0.002}):
        tied = KNNHead(calibrate=False, **({"vote_temperature": 0.1} | kw)).fit(dup, np.concatenate([y[:60], y[:60]]))
        got, want = np.asarray(tied.to_keras().predict(X[120:], verbose=0)), tied.predict_proba(X[120:])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert (want.max(axis=1) > 0.5).all()


def test_saved_head_round_trips_and_a_damaged_one_is_one_line(tmp_path):
    X, y = blobs(100, 6, 3)
    head = KNNHead().fit(X[:80], y[:80], class_names=["a", "b", "c"], paths=[f"p{i}" for i in range(80)])
    head.save(tmp_path / "head.npz")
    again = load_head(tmp_path)
    assert isinstance(again, KNNHead) and again.k_ == head.k_ and again.temperature_ == head.temperature_
    np.testing.assert_allclose(again.predict_proba(X[80:]), head.predict_proba(X[80:]))
    assert again.neighbour_paths(again.neighbours(X[80:81], 2))[0][0].startswith("p")
    with np.load(tmp_path / "head.npz") as z:
        arrays = dict(z)
    arrays["labels"] = arrays["labels"] + 5  # labels beyond the head's classes
    np.savez(tmp_path / "head.npz", **arrays)
    with pytest.raises(UserError, match="do not describe a valid knn head"):
        load_head(tmp_path)


def test_bad_knn_input_is_one_line():
    X, y = blobs(40, 4, 2)
    with pytest.raises(UserError, match="k=100 needs more than 100 training rows"):
        KNNHead(k=100).fit(X, y)
    with pytest.raises(UserError, match="whole number"):
        make_head("knn", k=0).check_params()
    with pytest.raises(UserError, match="budget"):
        KNNHead(memory_budget_mb=1e-4).fit(X, y)
    tiny = KNNHead(k=5, vote_temperature=0.1).fit(X, np.r_[np.zeros(38, int), [1, 1]])
    assert "a class has 2 training row(s), fewer than k=5" in tiny.after_fit_note() and "(--k 2 " in tiny.after_fit_note()
    with pytest.raises(UserError, match="only a knn head keeps"):
        LogisticHead(C=1.0).fit(X, y).neighbours(X, 3)


def test_ece_and_temperature_scaling():
    y = np.array([0, 0, 1, 1])
    report = classification_report(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]]))
    # bins: 0.9 (right), 0.6 (right), 0.8 (right), 0.7 (wrong) -> |1-.9| + |1-.6| + |1-.8| + |0-.7| over 4
    assert report["ece"] == pytest.approx((0.1 + 0.4 + 0.2 + 0.7) / 4)
    assert sum(report["reliability"]["count"]) == 4 and len(report["reliability"]["count"]) == 15
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((500, 3)) * 4
    truth = np.array([rng.choice(3, p=np.exp(z / 4) / np.exp(z / 4).sum()) for z in logits])
    t = fit_temperature(logits, truth)
    assert 3 < t < 5.5 and nll(logits, truth, t) < nll(logits, truth)
    # every out-of-fold row right: nothing bounds the sharpening, so no temperature (it went to the 0.05 bound)
    right = logits.argmax(axis=1)
    assert fit_temperature(logits, right) == 1.0
    one_wrong = right.copy()
    one_wrong[0] = (right[0] + 1) % 3
    assert fit_temperature(logits, one_wrong) < 1.0  # one error is evidence enough to fit on


def test_logistic_calibration_changes_no_prediction_and_lowers_held_out_nll():
    X, y = blobs(900, 20, 3, sep=0.8, seed=3)
    raw = LogisticHead(calibrate=False).fit(X[:600], y[:600])
    cal = LogisticHead().fit(X[:600], y[:600])
    assert raw.temperature_ == 1.0 and cal.temperature_ != 1.0 and "out-of-fold" in cal.calibration_note_
    np.testing.assert_array_equal(raw.predict(X[600:]), cal.predict(X[600:]))
    before, after = (classification_report(y[600:], h.predict_proba(X[600:])) for h in (raw, cal))
    assert after["log_loss"] <= before["log_loss"] + 1e-9
    W, b = cal.as_dense_weights()  # the temperature is inside the weights every Keras form and export uses
    np.testing.assert_allclose(cal.decision_function(X[600:]), X[600:] @ W + b, rtol=1e-5, atol=1e-5)


def test_fit_head_knn_then_predict_and_evaluate_explain(tmp_path):
    data = make_folder(tmp_path / "d", per_class=8)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "knn", "--k", "3")
    assert fit.returncode == 0, fit.stderr
    run_id = _run_id(fit.stdout)
    run_dir = Path(cache) / "runs" / run_id
    assert (run_dir / "head.npz").exists() and (run_dir / "calibration_val.png").stat().st_size > 5000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["k"] == 3 and 0 <= metrics["val"]["ece"] <= 1 and metrics["val"]["log_loss"] > 0
    assert "ECE" in fit.stdout

    out = tmp_path / "p.csv"
    image = data / "val" / "ants" / "img_000.jpg"
    pred = run_cli("predict", "--run", run_id, str(image), "--explain", "2", "--csv", str(out), "--cache-dir", cache)
    assert pred.returncode == 0, pred.stderr
    near = [l for l in pred.stdout.splitlines() if l.strip().startswith("near")]
    assert len(near) == 2 and all(str(data / "train") in l for l in near)
    row = next(csv.DictReader(out.open()))
    assert row["neighbour_1"].startswith(str(data / "train")) and -1 <= float(row["similarity_1"]) <= 1
    assert float(row["similarity_1"]) >= float(row["similarity_2"])

    ev_csv = tmp_path / "e.csv"
    ev = run_cli("evaluate", "--run", run_id, "--data", str(data), "--split", "val", "--explain", "1", "--csv",
                 str(ev_csv), "--cache-dir", cache)
    assert ev.returncode == 0, ev.stderr
    assert "misclassified" in ev.stdout and "ECE" in ev.stdout
    rows = list(csv.DictReader(ev_csv.open()))
    assert len(rows) == 16 and {r["label"] for r in rows} == {"ants", "bees"} and rows[0]["neighbour_1"]

    from pipeline.inference.apply import check_explain, load_run  # another head: refused before any work
    run = load_run(Path(cache), run_id)
    run.head = LogisticHead(C=1.0).fit(*blobs(20, 4, 2))
    run.head.feature_shape_ = (512,)
    with pytest.raises(UserError, match="only a knn head keeps"):
        check_explain(run, 2)
    no_run = run_cli("predict", str(image), "--explain", "2", "--backbone", "vgg16")
    assert no_run.returncode != 0 and "--explain" in no_run.stderr
    too_big = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "knn", "--k", "500")
    assert too_big.returncode != 0 and "k=500 needs more than 500 training rows" in too_big.stderr


def test_knn_sweep_and_auto_take_part(tmp_path):
    write_cache(tmp_path / "c", n_images=240, dim=16, n_classes=3)
    cache = str(tmp_path / "c")
    sweep = run_cli("fit-head", "--cache", "k0000", "--cache-dir", cache, "--head", "knn", "--sweep")
    assert sweep.returncode == 0, sweep.stderr
    assert "k=5 vote_temperature=" in sweep.stdout
    best = load_head(Path(cache) / "runs" / _run_id(sweep.stdout))
    assert best.kind == "knn" and best.memory_paths_.size == best.memory_.shape[0]  # --explain names images
    plain = run_cli("fit-head", "--cache", "k0000", "--cache-dir", cache, "--head", "knn")
    config = json.loads((Path(cache) / "runs" / _run_id(plain.stdout) / "config.json").read_text())
    assert isinstance(config["params"]["k"], int) and config["head_params"]["k"] == "auto"  # chosen, and asked
    auto = run_cli("fit-head", "--cache", "k0000", "--cache-dir", cache)
    assert auto.returncode == 0, auto.stderr
    line = next(l for l in auto.stdout.splitlines() if l.startswith("head auto: kept"))
    assert "knn" in line and "logistic" in line and "svm" in line


def test_dense_calibration_is_out_of_fold_inside_the_model_and_changes_no_prediction():
    from pipeline.heads.dense import DenseHead

    X, y = blobs(400, 16, 3, sep=0.8, seed=5)
    raw = DenseHead(epochs=6, calibrate=False).fit(X[:300], y[:300])
    cal = DenseHead(epochs=6).fit(X[:300], y[:300])
    assert raw.temperature_ == 1.0 and cal.temperature_ != 1.0 and "3-fold" in cal.calibration_note_
    np.testing.assert_array_equal(raw.predict(X[300:]), cal.predict(X[300:]))  # the same seed: the same net
    z_raw, z_cal = (np.log(h.predict_proba(X[300:])) for h in (raw, cal))
    np.testing.assert_allclose(z_cal - z_cal.max(1, keepdims=True), (z_raw - z_raw.max(1, keepdims=True))
                               / cal.temperature_, atol=1e-3)  # softmax(z / T), folded into the last layer
    swept = DenseHead(epochs=2).fit_for_sweep(X[:300], y[:300], None, None, {})
    assert swept.temperature_ == 1.0 and "sweep" in swept.calibration_note_


def test_one_vote_for_the_knn_head_and_the_audit():
    """features.neighbours.vote_shares: weights exp(sim / T), normalised; label -1 or similarity -inf do not
    vote; a row with no voter is uniform. The kNN head and the audit's label agreement both vote through it."""
    from pipeline.features.neighbours import vote_shares
    sim = np.array([[0.9, 0.8, 0.7], [0.5, -np.inf, 0.4], [-np.inf, -np.inf, -np.inf], [900.0, 899.0, 0.2]])
    lab = np.array([[0, 1, 1], [2, 0, -1], [-1, -1, -1], [1, 0, 0]])
    got = vote_shares(sim, lab, 3, 0.1)
    w = np.exp(np.array([0.9, 0.8, 0.7]) / 0.1)
    np.testing.assert_allclose(got[0], [w[0] / w.sum(), (w[1] + w[2]) / w.sum(), 0.0])
    np.testing.assert_allclose(got[1], [0.0, 0.0, 1.0])     # the -inf neighbour and the unlabelled one do not vote
    np.testing.assert_allclose(got[2], [1 / 3, 1 / 3, 1 / 3])
    assert np.isfinite(got).all() and np.allclose(got.sum(axis=1), 1.0)  # large similarities do not overflow


@pytest.mark.parametrize("params,said", [
    ({"k": 0}, "k must be 'auto' or a whole number >= 1, not 0"),
    ({"k": 2.5}, "k must be 'auto' or a whole number >= 1, not 2.5"),
    ({"k": "many"}, "k must be 'auto' or a whole number >= 1, not 'many'"),
    ({"vote_temperature": float("inf")}, "the vote temperature must be 'auto' or a finite positive number"),
    ({"vote_temperature": -1}, "the vote temperature must be positive, not -1.0"),
])
def test_the_knn_heads_k_and_temperature_are_checked_in_one_line(params, said):
    with pytest.raises(UserError, match=re.escape(said)):
        KNNHead(**params).check_params()
