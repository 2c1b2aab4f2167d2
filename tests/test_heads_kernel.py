"""The svm head (RBF kernel on unit-length features) and the auto head that picks svm or logistic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from helpers_features import write_cache
from pipeline.errors import UserError
from pipeline.heads import AutoHead, KernelHead, LogisticHead, head_class, load_head, make_head
from pipeline.heads.calibration import fit_pair_calibrator, pair_signs
from pipeline.heads.svm import _pair_coefficients, unit_rows


def rings(n: int = 360, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes by angle band of the first two coordinates: not linearly separable on the sphere
    (class 0 owns two opposite bands), so a kernel head must beat a linear one."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    band = (angle // (np.pi / 3)).astype(int) % 3
    x = np.c_[np.cos(angle), np.sin(angle), 0.05 * rng.standard_normal((n, dim - 2))] * rng.uniform(0.5, 2, (n, 1))
    return x.astype(np.float32), band.astype(np.int64)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_pair_coefficients_reproduce_sklearn_decisions(k):
    rng = np.random.default_rng(k)
    y = np.arange(120) % k
    Z = unit_rows(rng.standard_normal((120, 6)) + 2 * np.eye(k, 6)[y])
    svc = SVC(C=3, gamma=0.7, decision_function_shape="ovo").fit(Z, y)
    P, p0 = _pair_coefficients(svc)
    d2 = ((Z[:, None, :] - svc.support_vectors_[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.exp(-0.7 * d2) @ P.T + p0, svc.decision_function(Z).reshape(120, -1), atol=1e-9)


def test_pair_calibrator_keeps_each_pair_on_the_side_it_votes_for_where_a_free_regression_inverts_it():
    """Small-sample CV can make out-of-fold decisions anti-correlated with the labels; a free multinomial
    regression (the calibrator before) then learned that a decision for class 0 means class 2."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    sign = pair_signs(3)  # columns (0,1), (0,2), (1,2)
    dec = sign[y].copy() + 0.3 * rng.standard_normal((90, 3))
    dec[:, 1] *= -1  # pair (0, 2): out of fold, its decisions point the wrong way
    free = LogisticRegression(C=1.0, max_iter=1000).fit(dec, y)
    assert free.coef_[0, 1] < free.coef_[2, 1]  # the inversion the pair calibrator refuses
    cal = fit_pair_calibrator(dec, y, np.arange(3))
    for col, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        assert cal.coef_[i, col] >= cal.coef_[j, col] - 1e-9
    p = cal.predict_proba(np.array([[0.0, 3.0, 0.0]]))  # a strong vote for 0 over 2, nothing else
    assert p[0, 0] >= p[0, 2] and free.predict_proba(np.array([[0.0, 3.0, 0.0]]))[0, 0] < free.predict_proba(
        np.array([[0.0, 3.0, 0.0]]))[0, 2]
    # binary (scikit-learn's decision votes for the second class): the slope cannot turn negative
    yb = np.repeat([0, 1], 30)
    db = -(2.0 * yb - 1 + 0.3 * rng.standard_normal(60))[:, None]
    calb = fit_pair_calibrator(db, yb, np.arange(2))
    assert calb.coef_.shape == (2, 1) and calb.coef_[1, 0] - calb.coef_[0, 0] >= -1e-9
    # where no sign binds it is scikit-learn's regression (C=1; binomial for two classes)
    for k, n in ((2, 40), (3, 60), (5, 300)):
        yk = np.arange(n) % k
        sk = pair_signs(k)[yk] * 1.5 + rng.standard_normal((n, pair_signs(k).shape[1]))
        ours = fit_pair_calibrator(sk, yk, np.arange(k)).predict_proba(sk)
        np.testing.assert_allclose(ours, LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(sk, yk).predict_proba(sk),
                                   atol=1e-4)
    with pytest.raises(ValueError, match="not among the classes"):
        fit_pair_calibrator(dec, y + 1, np.arange(3))


def test_svm_on_weak_signal_never_scores_below_chance_on_its_own_training_images():
    """3 classes x 8 noisy rows, 12 seeds: the free calibrator scored 0 of 24 on two of them (and 0.49
    on average); the sign-kept one never falls below chance."""
    accuracies = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        y = np.arange(24) % 3
        X = np.abs(0.5 * rng.standard_normal((3, 32))[y] + rng.standard_normal((24, 32)))
        accuracies.append((KernelHead().fit(X, y).predict(X) == y).mean())
    assert min(accuracies) >= 0.33 and np.mean(accuracies) >= 0.6


def test_svm_beats_logistic_where_classes_are_not_linear_and_probabilities_are_consistent():
    X, y = rings()
    Xv, yv = rings(seed=1)
    svm = KernelHead(n_jobs=2).fit(X, y)
    lin = LogisticHead().fit(X, y)
    acc_svm, acc_lin = (svm.predict(Xv) == yv).mean(), (lin.predict(Xv) == yv).mean()
    assert acc_svm > 0.9 and acc_svm > acc_lin + 0.2
    p = svm.predict_proba(Xv)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (svm.predict(Xv) == p.argmax(axis=1)).all()
    assert svm.C_ in svm.cv_scores_ and svm.C_note_.startswith("5-fold CV") and 0 < svm.cv_log_loss_ < 1
    assert svm.cv_accuracy() == svm.cv_accuracies_[svm.C_] and set(svm.cv_accuracies_) == set(svm.cv_scores_)
    assert 0 < svm.n_support_ <= len(y) and svm.support_vectors_.shape == (svm.n_support_, X.shape[1])
    # unit length: scaling a row does not change its prediction
    np.testing.assert_allclose(svm.predict_proba(Xv * 7.5), p, atol=1e-6)


def test_svm_picks_the_C_whose_calibrated_out_of_fold_log_loss_is_lowest():
    """CV accuracy moves by an image or two between Cs (flowers: C 1, 3 or 10 as 1% of the rows changed,
    1.5 points of val apart); the calibrated log loss is what the auto head compares heads by."""
    rng = np.random.default_rng(3)
    y = np.arange(300) % 3
    X = rng.standard_normal((300, 8)) + 1.2 * np.eye(3, 8)[y]  # overlapping classes: the Cs differ
    svm = KernelHead(Cs=(0.1, 1.0, 10.0, 100.0), n_jobs=2).fit(X, y)
    losses = svm.cv_scores_
    assert svm.C_ == min(losses, key=lambda c: (losses[c], c)) and svm.cv_log_loss_ == losses[svm.C_]
    assert len(set(losses.values())) > 1 and svm.C_note_.endswith("(calibrated log loss)")
    assert all(0 <= a <= 1 for a in svm.cv_accuracies_.values()) and svm.cv_accuracy() == svm.cv_accuracies_[svm.C_]
    facts = svm.facts()
    assert facts["cv_scores"] == {f"{c:g}": v for c, v in losses.items()} and facts["cv_log_loss"] == losses[svm.C_]


def test_svm_cv_log_loss_scores_the_calibrator_on_the_out_of_fold_decisions_it_was_fitted_on():
    """As the logistic head's temperature is scored: a calibrator cross-fitted again inside the folds read
    0.04-0.15 above the svm's held-out log loss on flowers subsets (10-160 images per class) and the auto
    head passed the svm over where it was the best head. The head's own calibrator is that fit."""
    from sklearn.metrics import log_loss

    from pipeline.heads.calibration import calibrated_log_loss
    from pipeline.heads.folds import cv_folds

    rng = np.random.default_rng(5)
    y = np.arange(120) % 3
    X = rng.standard_normal((120, 8)) + 1.5 * np.eye(3, 8)[y]
    svm = KernelHead(Cs=(0.3, 3.0, 30.0), random_state=4).fit(X, y)
    assert len(set(svm.cv_scores_.values())) == 3 and svm.facts()["cv_log_loss_on"].startswith("calibrator scored on")
    Z = unit_rows(X, dtype=np.float64)
    oof = np.zeros((y.size, 3))
    for tr, te in cv_folds(y, None, 5, 4)[0]:
        oof[te] = SVC(C=svm.C_, gamma=svm.gamma_, decision_function_shape="ovo").fit(Z[tr], y[tr]).decision_function(Z[te])
    cal = fit_pair_calibrator(oof, y, np.arange(3))
    assert svm.cv_log_loss_ == pytest.approx(log_loss(y, cal.predict_proba(oof)), rel=1e-6)
    assert calibrated_log_loss(cal, oof, y) == pytest.approx(svm.cv_log_loss_, rel=1e-6)
    P, p0 = _pair_coefficients(SVC(C=svm.C_, gamma=svm.gamma_, decision_function_shape="ovo").fit(Z, y))
    np.testing.assert_allclose(svm.coef_, cal.coef_ @ P, rtol=1e-2, atol=2e-3)  # the head is the chosen C's calibrator
    # a class the calibrator never saw scores as probability ~0, not an index error
    assert calibrated_log_loss(fit_pair_calibrator(oof[y < 2], y[y < 2], np.arange(3)), oof, y) > 10


def test_with_no_more_rows_than_calibrator_weights_the_svm_cross_fits_its_calibrator():
    """Scored on its own rows, a calibrator with as many weights as rows reads low (10 classes: 415 weights;
    20 synthetic weak-signal classes of 10 rows: 1.44 against 2.36 held out, and the auto head kept the
    worst head): there it is fitted again without each fold, as it was before 2026-12-07."""
    from pipeline.heads.calibration import cross_fitted_log_loss, pair_calibrator_weights

    assert [pair_calibrator_weights(k) for k in (2, 3, 5, 10, 20)] == [3, 9, 45, 415, 3630]
    rng = np.random.default_rng(2)
    y = np.arange(80) % 10
    X = rng.standard_normal((80, 16)) + 2.0 * np.eye(10, 16)[y]
    svm = KernelHead(C=1.0, random_state=0).fit(X, y)
    assert svm.facts()["cv_log_loss_on"].startswith("calibrator cross-fitted: 80 rows are too few to score its 415")
    Z = unit_rows(X, dtype=np.float64)
    folds = cv_folds_of(y)
    oof = np.zeros((y.size, 45))
    for tr, te in folds:
        oof[te] = SVC(C=1.0, gamma=svm.gamma_, decision_function_shape="ovo").fit(Z[tr], y[tr]).decision_function(Z[te])
    assert svm.cv_log_loss_ == pytest.approx(cross_fitted_log_loss(oof, y, folds), rel=1e-5)


def cv_folds_of(y):
    from pipeline.heads.folds import cv_folds

    return cv_folds(y, None, 5, 0)[0]


def test_a_calibrator_that_stops_before_converging_is_said(monkeypatch, tmp_path):
    """L-BFGS-B's best point is kept, but the run's facts and a line after the fit say it had not converged."""
    import pipeline.heads.calibration as calibration

    X, y = rings()
    svm = KernelHead(C=3.0).fit(X, y)
    assert svm.facts()["calibrator_converged"] is True and svm.after_fit_note() == ""
    assert KernelHead.load(svm.save(tmp_path / "head.npz")).facts()["calibrator_converged"] is None  # not recorded
    real = calibration.minimize

    def stopped(*args, **kwargs):
        res = real(*args, **kwargs)
        res.success = False
        return res

    monkeypatch.setattr(calibration, "minimize", stopped)
    again = KernelHead(C=3.0).fit(X, y)
    assert again.facts()["calibrator_converged"] is False and "before converging" in again.after_fit_note()
    np.testing.assert_allclose(again.predict_proba(X), svm.predict_proba(X))  # the same best point


def test_binary_svm_and_a_class_missing_from_training():
    X, y = rings()
    keep = y < 2
    svm = KernelHead(C=3.0).fit(X[keep], y[keep], class_names=["a", "b", "c"])
    assert svm.C_ == 3.0 and svm.C_note_ == "given"
    p = svm.predict_proba(X)
    assert p.shape == (len(X), 3) and p[:, 2].max() < 1e-9
    assert (svm.predict(X[keep]) == y[keep]).mean() > 0.9


def test_svm_save_load_roundtrip_and_load_head_dispatch(tmp_path):
    X, y = rings()
    svm = KernelHead().fit(X, y, class_names=["x", "y", "z"], cache_key="k1", feature_info={"backbone": "b"})
    path = svm.save(tmp_path / "head.npz")
    back = load_head(tmp_path)
    assert isinstance(back, KernelHead) and back.class_names_ == ["x", "y", "z"] and back.cache_key_ == "k1"
    np.testing.assert_allclose(back.predict_proba(X), svm.predict_proba(X), atol=1e-6)
    assert back.C_ == svm.C_ and back.gamma_ == svm.gamma_ and back.cv_scores_ == svm.cv_scores_
    assert back.cv_accuracies_ == svm.cv_accuracies_ and back.cv_accuracy() == svm.cv_accuracy()
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    old = {**meta, "version": 1, "cv_scores": meta["cv_accuracies"]}  # version 1 kept CV accuracies only
    del old["cv_accuracies"]
    side.write_text(json.dumps(old))
    back = load_head(tmp_path)
    assert back.cv_scores_ == {} and back.cv_accuracy() == svm.cv_accuracy() and back.c_curve() is None
    meta["feature_shape"] = [X.shape[1] + 1]
    side.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not describe a valid svm head"):
        load_head(tmp_path)
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable head file"):
        load_head(path)


def test_svm_keras_stack_equals_predict_proba_on_feature_maps():
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (90, 3, 3, 8)).astype(np.float32)
    y = np.arange(90) % 3
    maps[np.arange(90), :, :, y] += 2.0
    svm = KernelHead().fit(maps, y)
    model = svm.keras_head((3, 3, 8))
    assert [l.name for l in model.layers][-3:] == ["rbf_kernel", "logits", "probabilities"]
    np.testing.assert_allclose(np.asarray(model.predict(maps, verbose=0)), svm.predict_proba(maps), atol=1e-4)


def test_svm_refuses_too_many_rows_and_bad_parameters():
    X, y = rings()
    with pytest.raises(UserError, match="at most 100 training rows.*--head logistic"):
        KernelHead(max_rows=100).fit(X, y)
    with pytest.raises(UserError, match="in memory .* > budget"):
        KernelHead(memory_budget_mb=0.001).fit(X, y)
    for bad, match in [({"C": -1}, "C must be"), ({"C": "x"}, "C must be"), ({"gamma": 0}, "gamma must be"),
                       ({"C": float("inf")}, "C must be a finite positive number"),
                       ({"class_weight": "x"}, "class_weight")]:
        with pytest.raises(UserError, match=match):
            KernelHead(**bad).check_params()
    with pytest.raises(UserError, match="no parameter nosuch"):
        make_head("svm", nosuch=1)


def test_auto_head_keeps_the_lower_cv_log_loss():
    X, y = rings()
    auto = make_head("auto").fit(X, y)
    losses = auto.choice_["cv_log_loss"]  # rings: both the svm and the knn head beat a linear one
    assert isinstance(auto, AutoHead) and auto.choice_["chosen"] == auto.best_.kind == min(losses, key=losses.get)
    assert max(losses["svm"], losses["knn"]) < losses["logistic"]
    np.testing.assert_allclose(auto.predict_proba(X), auto.best_.predict_proba(X))
    # linearly separable blobs in 64-d: the svm may still fit, but the choice follows the scores
    from helpers_features import blobs
    Xb, yb = blobs(240, 64, 3, sep=1.0)
    choice = AutoHead().fit(Xb, yb).choice_
    scores = choice["cv_log_loss"]
    assert choice["chosen"] == min(scores, key=scores.get)
    # the svm cannot fit: the logistic head is kept, with the reason
    assert AutoHead().max_rows == 6000 < KernelHead().max_rows  # auto keeps the default head fast
    small = AutoHead(max_rows=10).fit(X, y)
    assert small.best_.kind == "knn" and "svm skipped" in small.choice_["note"]
    assert small.choice_["cv_log_loss"]["svm"] is None
    # --class-weight: the knn head, which cannot weight classes, is not a candidate (rings: knn beat logistic)
    weighted = AutoHead(class_weight="balanced")
    assert "knn head takes no --class-weight" in weighted.fit_note()
    weighted.fit(X, y)
    assert set(weighted.choice_["cv_log_loss"]) == {"logistic", "svm"}
    assert weighted.best_.kind in ("logistic", "svm") and weighted.best_.class_weight == "balanced"
    unweighted_small = AutoHead(class_weight="balanced", max_rows=10).fit(X, y)
    assert unweighted_small.best_.kind == "logistic"  # the svm skipped: not the knn


def test_auto_with_a_class_of_one_training_image_says_why_the_heads_are_not_compared():
    X, y = rings(120)
    X, y = np.r_[X, X[:1] + 0.01], np.r_[y, 3]  # a fourth class with one image: no stratified CV for logistic
    auto = AutoHead().fit(X, y)
    assert auto.best_.kind == "logistic" and auto.choice_["cv_log_loss"]["logistic"] is None
    assert "too few training images to cross-validate the logistic head, so the heads are not compared" in \
        auto.choice_.get("note", ""), auto.choice_


def test_fit_head_on_a_cache_records_the_auto_choice(tmp_path):
    from pipeline.heads.training import fit_head_run

    path = write_cache(tmp_path / "c", n_images=200, dim=16, n_classes=3, sep=1.5)
    from pipeline.features.store import FeatureFile
    with FeatureFile(path) as ff:
        result, run = fit_head_run(ff, AutoHead())
    cfg = json.loads((run.dir / "config.json").read_text())
    metrics = json.loads((run.dir / "metrics.json").read_text())
    chosen = result.head.kind
    assert cfg["head"] == chosen and cfg["head_choice"]["chosen"] == chosen == metrics["head_choice"]["chosen"]
    assert type(load_head(run.dir)).__name__ == {"svm": "KernelHead", "logistic": "LogisticHead"}[chosen]
    assert (run.dir / "c_curve.png").exists() and metrics["val"]["accuracy"] > 0.5
    # the runs table shows the C the fit chose, not 'auto'
    assert cfg["params"]["C"] == result.head.C_ and cfg["params"]["C"] != "auto"


@pytest.mark.parametrize("kind", ["logistic", "svm", "knn", "auto"])
def test_fit_head_seed_draws_each_heads_cv_folds(kind):
    """`fit-head --seed S` reaches every head's CV folds, so fits over seeds show the folds' draw (it
    used to reach the dense and knn heads only: the svm's figure was one draw whatever the seed)."""
    opts = {"seed": 7, "C": "auto", "flatten": "avg", "jobs": 1}
    head = head_class(kind).from_options(opts)
    assert head.random_state == 7
    if kind == "auto":
        assert {c.random_state for c in head.candidates()} == {7}
    assert head_class(kind).from_options({**opts, "seed": 0}).random_state == 0


def test_the_seed_moves_the_svm_cv_and_a_fixed_seed_repeats_it():
    rng = np.random.default_rng(3)
    y = np.arange(240) % 3
    X = rng.standard_normal((240, 8)) + 1.2 * np.eye(3, 8)[y]
    fit = [head_class("svm").from_options({"seed": s, "jobs": 2}).fit(X, y).cv_scores_ for s in (0, 0, 1)]
    assert fit[0] == fit[1] and fit[0] != fit[2]
