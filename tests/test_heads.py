"""Stage-2 heads: schedules, feature reduction, the logistic and dense heads, saving and loading."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from sklearn.metrics import log_loss

from pipeline.errors import UserError
from pipeline.heads import DenseHead, FeatureSource, LogisticHead, ReducedFeatures, load_head, make_head
from pipeline.heads.base import reduce_features, softmax
from pipeline.heads.scaling import feature_scale
from pipeline.heads.schedules import make_schedule
from pipeline.features.store import FeatureFile

from helpers_features import blobs, write_cache


# --------------------------------------------------------------------------------- schedules
def test_exponential_schedule_ramps_sustains_decays_to_min():
    s = make_schedule("exponential", 1e-3, 20, lr_start=1e-4, lr_min=1e-5, rampup_epochs=4, sustain_epochs=2,
                      exp_decay=0.5)
    curve = s.curve()
    assert curve[0] == pytest.approx(1e-4)
    assert np.all(np.diff(curve[:5]) > 0) and curve[4] == pytest.approx(1e-3)           # linear ramp-up
    assert np.allclose(np.diff(curve[:5]), (1e-3 - 1e-4) / 4)
    assert curve[5] == pytest.approx(1e-3)                                               # sustain
    assert curve[7] == pytest.approx((1e-3 - 1e-5) * 0.5 + 1e-5)                        # Kaggle lrfn decay
    assert np.all(np.diff(curve[6:]) < 0) and min(curve) >= 1e-5 and curve[-1] == pytest.approx(1e-5, rel=0.02)


def test_cosine_and_constant_schedules_and_defaults():
    cos = make_schedule("cosine", 1e-2, 11).curve()
    assert cos[0] == pytest.approx(1e-2) and cos[-1] == pytest.approx(1e-4)             # lr_min default lr/100
    assert cos[5] == pytest.approx((1e-2 + 1e-4) / 2) and np.all(np.diff(cos) < 0)
    warm = make_schedule("cosine", 1e-2, 10, rampup_epochs=2).curve()
    assert warm[0] == pytest.approx(1e-3) and warm[2] == pytest.approx(1e-2)
    assert make_schedule("constant", 3e-4, 5).curve() == [3e-4] * 5
    exp = make_schedule("exponential", 1e-3, 10)                                         # defaults from lr
    assert exp(0) == pytest.approx(1e-4) and exp(3) == pytest.approx(1e-3) and exp(4) < 1e-3
    assert exp(5, 0.123) == exp(5)                                                       # Keras' (epoch, lr) call
    assert pickle.loads(pickle.dumps(exp)).curve() == exp.curve()


def test_schedule_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown learning-rate schedule"):
        make_schedule("step", 1e-3, 5)
    with pytest.raises(UserError, match="takes no parameter exp_decay"):
        make_schedule("cosine", 1e-3, 5, exp_decay=0.9)
    with pytest.raises(UserError, match="exp_decay"):
        make_schedule("exponential", 1e-3, 5, exp_decay=1.5)


# ------------------------------------------------------------------------------- reduction
def test_reduce_features_modes():
    x = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    assert reduce_features(x, "avg").shape == (2, 4)
    np.testing.assert_allclose(reduce_features(x, "avg"), x.mean(axis=(1, 2)))
    np.testing.assert_allclose(reduce_features(x, "max"), x.max(axis=(1, 2)))
    np.testing.assert_array_equal(reduce_features(x, "flatten"), x.reshape(2, -1))
    v = np.ones((3, 5), np.float16)
    assert reduce_features(v, "max").dtype == np.float32 and reduce_features(v, "max").shape == (3, 5)
    with pytest.raises(UserError, match="flatten mode"):
        reduce_features(x, "mean")


# -------------------------------------------------------------------------------- logistic
@pytest.fixture(scope="module")
def data3():
    X, y = blobs(400, 32, 3, seed=1, sep=1.5)
    return X[:300], y[:300], X[300:], y[300:]


def test_logistic_auto_C_fits_and_reports_cv(data3):
    Xtr, ytr, Xte, yte = data3
    head = LogisticHead(Cs=(1e-3, 1e-2, 1e-1, 1.0)).fit(Xtr, ytr, class_names=["a", "b", "c"])
    assert head.C_ in (1e-3, 1e-2, 1e-1, 1.0) and set(head.cv_scores_) == {1e-3, 1e-2, 1e-1, 1.0}
    assert head.C_ == max(head.cv_scores_, key=head.cv_scores_.get)
    assert (head.predict(Xte) == yte).mean() > 0.85
    assert head.predict_proba(Xte).shape == (100, 3)
    assert head.class_names_ == ["a", "b", "c"] and head.feature_shape_ == (32,)
    fixed = LogisticHead(C=0.5).fit(Xtr, ytr)
    assert fixed.C_ == 0.5 and fixed.cv_scores_ == {} and fixed.class_names_ == ["0", "1", "2"]


def test_cv_keeps_augmented_views_of_an_image_in_one_fold(tmp_path):
    """Near-duplicate views split across folds reward memorizing (C -> max); grouping by image must not."""
    path = write_cache(tmp_path, n_images=200, dim=64, views=4, sep=0.8, view_noise=0.05, split_fractions=(1, 0, 0))
    Cs = tuple(float(c) for c in np.logspace(-4, 2, 7))
    with FeatureFile(path) as ff:
        rows = ff.rows("train", "all")
        grouped = LogisticHead(Cs=Cs).fit(FeatureSource(ff, rows), ff.labels[rows])
        leaky = LogisticHead(Cs=Cs).fit(FeatureSource(ff, rows), ff.labels[rows], groups=np.arange(rows.size))
    assert "grouped" in grouped.C_note_ and "grouped" not in leaky.C_note_
    assert leaky.C_ == 100.0 and grouped.C_ <= 0.1


def test_as_dense_weights_equals_decision_function(data3):
    Xtr, ytr, Xte, _ = data3
    head = LogisticHead(C=0.3).fit(Xtr, ytr)
    W, b = head.as_dense_weights()
    assert W.shape == (32, 3) and b.shape == (3,)
    np.testing.assert_allclose(Xte @ W + b, head.pipeline_.decision_function(Xte), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(softmax(Xte @ W + b), head.pipeline_.predict_proba(Xte), atol=1e-6)
    np.testing.assert_allclose(head.decision_function(Xte), Xte @ W + b, atol=1e-6)
    # binary: one coefficient row becomes logits [0, z] with the same probabilities
    yb = (ytr == 1).astype(int)
    binary = LogisticHead(C=0.3).fit(Xtr, yb)
    Wb, bb = binary.as_dense_weights()
    assert Wb.shape == (32, 2)
    np.testing.assert_allclose((Xte @ Wb + bb)[:, 1], binary.pipeline_.decision_function(Xte), atol=1e-6)
    np.testing.assert_allclose(softmax(Xte @ Wb + bb), binary.pipeline_.predict_proba(Xte), atol=1e-6)


def test_class_missing_from_training_gets_a_column_with_zero_probability(data3):
    Xtr, ytr, Xte, _ = data3
    keep = ytr != 1
    head = LogisticHead(C=1.0).fit(Xtr[keep], ytr[keep], class_names=["a", "b", "c"])
    p = head.predict_proba(Xte)
    assert p.shape == (100, 3) and p[:, 1].max() < 1e-9 and np.allclose(p.sum(axis=1), 1)


def test_class_weight_balanced_changes_the_fit():
    X, y = blobs(600, 16, 2, seed=3, sep=0.6)
    rare = np.flatnonzero(y == 1)[:40]
    keep = np.sort(np.concatenate([np.flatnonzero(y == 0), rare]))
    X, y = X[keep], y[keep]
    plain = LogisticHead(C=0.05).fit(X, y)
    balanced = LogisticHead(C=0.05, class_weight="balanced").fit(X, y)
    assert not np.allclose(plain.as_dense_weights()[1], balanced.as_dense_weights()[1])
    recall = lambda h: (h.predict(X[y == 1]) == 1).mean()  # noqa: E731
    assert recall(balanced) > recall(plain) + 0.1
    dense_plain = DenseHead(hidden=(), epochs=8, lr=1e-2, batch_size=32).fit(X, y)
    dense_bal = DenseHead(hidden=(), epochs=8, lr=1e-2, batch_size=32, class_weight="balanced").fit(X, y)
    assert recall(dense_bal) > recall(dense_plain) + 0.1


def test_logistic_on_feature_maps_pools_like_vectors(tmp_path):
    path = write_cache(tmp_path, n_images=150, dim=8, feature_shape=(2, 2, 8), split_fractions=(1, 0, 0))
    with FeatureFile(path) as ff:
        rows = ff.rows("train")
        src = FeatureSource(ff, rows)
        pooled = ff.load(rows).mean(axis=(1, 2))
        a = LogisticHead(C=1.0).fit(src, ff.labels[rows])
        b = LogisticHead(C=1.0).fit(pooled, ff.labels[rows])
        assert a.feature_shape_ == (2, 2, 8) and b.feature_shape_ == (8,)
        np.testing.assert_allclose(a.predict_proba(src), b.predict_proba(pooled), atol=1e-5)
        flat = LogisticHead(C=1.0, flatten="flatten").fit(src, ff.labels[rows])
        assert flat.as_dense_weights()[0].shape == (32, 3)
        with pytest.raises(UserError, match="shape"):
            a.predict_proba(pooled)


def test_logistic_save_load_roundtrip(tmp_path, data3):
    Xtr, ytr, Xte, _ = data3
    head = LogisticHead(Cs=(0.01, 0.1)).fit(Xtr, ytr, class_names=["a", "b", "c"], cache_key="abc",
                                            feature_info={"backbone": "x"})
    path = head.save(tmp_path / "head.npz")
    back = load_head(tmp_path)                                    # a folder holding head.npz works too
    assert isinstance(back, LogisticHead) and back.get_params() == head.get_params()
    assert (back.class_names_, back.cache_key_, back.feature_shape_) == (["a", "b", "c"], "abc", (32,))
    assert back.C_ == head.C_
    np.testing.assert_array_equal(back.predict_proba(Xte), head.predict_proba(Xte))
    assert back.feature_info_ == {"backbone": "x"} and path.exists()
    (tmp_path / "junk.npz").write_text("no")
    (tmp_path / "junk.json").write_text((tmp_path / "head.json").read_text())
    with pytest.raises(UserError, match="not a readable head file"):
        LogisticHead.load(tmp_path / "junk.npz")
    # a head.json that names no format: several kinds save head.npz, so none of them is named
    (tmp_path / "head.json").write_text('{"class_names": 5}')
    with pytest.raises(UserError, match=r"head\.json is damaged or not written by this tool \(no format") as err:
        load_head(tmp_path)
    assert "svm" not in str(err.value).split("(")[0] and "an svm head" not in str(err.value)


def test_head_errors_are_one_line_user_errors(data3):
    Xtr, ytr, _, _ = data3
    with pytest.raises(UserError, match="at least two classes"):
        LogisticHead(C=1.0).fit(Xtr, np.zeros_like(ytr))
    with pytest.raises(UserError, match="C must be"):
        LogisticHead(C="big").fit(Xtr, ytr)
    with pytest.raises(UserError, match="no parameter"):
        make_head("dense", hiden=(3,))
    with pytest.raises(UserError, match="unknown optimizer"):
        DenseHead(optimizer="adagrad").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="early_stopping"):
        DenseHead(early_stopping=2).fit(Xtr, ytr)


# ----------------------------------------------------------------------------------- dense
def test_dense_fit_history_save_load_and_exported_model(tmp_path):
    path = write_cache(tmp_path, n_images=240, dim=16, feature_shape=(2, 2, 16), sep=3.0)
    with FeatureFile(path) as ff:
        tr, va = ff.rows("train"), ff.rows("val")
        head = DenseHead(hidden=(32,), batchnorm=True, dropout=0.2, epochs=6, batch_size=32, lr=3e-3,
                         lr_schedule="cosine").fit(
            FeatureSource(ff, tr), ff.labels[tr], FeatureSource(ff, va), ff.labels[va],
            class_names=ff.class_names, cache_key=ff.key)
        h = head.history_
        assert set(h) == {"loss", "acc", "val_loss", "val_acc", "lr"} and all(len(v) == 6 for v in h.values())
        assert h["lr"][0] == pytest.approx(3e-3) and h["lr"][-1] == pytest.approx(3e-5, rel=1e-3)
        assert h["loss"][-1] < h["loss"][0] and not head.streamed_
        Xva = ff.load(va)
        proba = head.predict_proba(Xva)
        assert (proba.argmax(1) == ff.labels[va]).mean() > 0.8
        # the exported model takes raw feature maps (pooling inside) and matches predict_proba
        np.testing.assert_allclose(np.asarray(head.model_(Xva)), proba, atol=1e-5)
        head.save(tmp_path / "head.keras")
        assert (tmp_path / "head.json").exists()
        back = load_head(tmp_path / "head.keras")
        assert isinstance(back, DenseHead) and back.get_params() == head.get_params()
        assert back.class_names_ == ff.class_names and back.cache_key_ == ff.key and back.feature_shape_ == (2, 2, 16)
        assert back.history_["loss"] == pytest.approx(h["loss"])
        np.testing.assert_allclose(back.predict_proba(Xva), proba, atol=1e-6)
        clone = pickle.loads(pickle.dumps(head))                  # joblib workers send heads this way
        np.testing.assert_allclose(clone.predict_proba(Xva), proba, atol=1e-6)


def test_early_stopping_restores_the_best_weights():
    rng = np.random.default_rng(0)
    X, Xv = rng.standard_normal((200, 20)).astype(np.float32), rng.standard_normal((100, 20)).astype(np.float32)
    y, yv = rng.integers(0, 2, 200), rng.integers(0, 2, 100)   # pure noise: memorizing it raises val loss
    head = DenseHead(hidden=(128,), lr=1e-2, epochs=40, batch_size=16, early_stopping=3,
                     calibrate=False).fit(X, y, Xv, yv)  # the val loss curve is of uncalibrated output
    vl = head.history_["val_loss"]
    assert head.n_epochs_ < 40 and head.best_epoch_ == int(np.argmin(vl)) < head.n_epochs_ - 1
    final = log_loss(yv, head.predict_proba(Xv), labels=[0, 1])
    assert final == pytest.approx(min(vl), rel=1e-3) and final < vl[-1] - 1e-3


def test_streamed_training_is_used_over_the_memory_budget_and_learns(tmp_path, monkeypatch):
    path = write_cache(tmp_path, n_images=300, dim=24, sep=1.5, views=1)
    with FeatureFile(path) as ff:
        tr, va = ff.rows("train", "all"), ff.rows("val")
        args = (FeatureSource(ff, tr), ff.labels[tr], FeatureSource(ff, va), ff.labels[va])
        kw = dict(hidden=(32,), epochs=6, batch_size=32, lr=3e-3)
        memory = DenseHead(**kw).fit(*args)
        monkeypatch.setattr(FeatureSource, "load_reduced", lambda *a, **k: pytest.fail("loaded whole"))
        reads = []
        real_read = FeatureSource.read
        monkeypatch.setattr(FeatureSource, "read", lambda self, pos: reads.append(len(pos)) or real_read(self, pos))
        streamed = DenseHead(memory_budget_mb=0.01, **kw).fit(*args)
        assert streamed.streamed_ and not memory.streamed_
        assert max(reads) <= 1024 and len(reads) >= 6 * (len(tr) // 32)      # batches, every epoch
        monkeypatch.undo()
        Xv = ff.load(va)
        acc = lambda h: (h.predict(Xv) == ff.labels[va]).mean()  # noqa: E731
        assert acc(streamed) > 0.8 and abs(acc(streamed) - acc(memory)) < 0.1
        assert streamed.history_["val_acc"][-1] == pytest.approx(memory.history_["val_acc"][-1], abs=0.1)


def test_reused_compiled_model_gives_the_same_fit_as_a_fresh_one():
    X, y = blobs(160, 12, 3, seed=5, sep=1.0)
    Xv, yv = blobs(60, 12, 3, seed=6, sep=1.0)
    kw = dict(hidden=(16,), dropout=0.3, epochs=3, batch_size=32)
    fresh = DenseHead(lr=3e-3, **kw).fit(X, y, Xv, yv)
    reuse: dict = {}
    DenseHead(lr=1e-2, **kw).fit(X, y, Xv, yv, reuse=reuse)        # builds and compiles
    again = DenseHead(lr=3e-3, **kw).fit(X, y, Xv, yv, reuse=reuse)  # reset weights + optimizer, same graph
    assert len(reuse) == 1
    np.testing.assert_allclose(again.history_["loss"], fresh.history_["loss"], rtol=1e-4)
    np.testing.assert_allclose(again.predict_proba(Xv), fresh.predict_proba(Xv), atol=1e-5)
    red = ReducedFeatures.of(Xv, "avg")
    np.testing.assert_allclose(again.predict_proba(red), again.predict_proba(Xv), atol=1e-6)


# ------------------------------------------------------------------ logistic streamed from the cache
def test_fast_float16_conversion_and_row_reads_are_exact(tmp_path):
    from pipeline.heads.streaming import as_float32
    every = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)                   # every finite value >= 0
    np.testing.assert_array_equal(as_float32(every), every.astype(np.float32))
    for odd in (-every, np.array([np.inf, np.nan] + [1.0] * 2000, np.float16)):        # sign bits, inf, NaN
        np.testing.assert_array_equal(as_float32(odd), odd.astype(np.float32))
    path = write_cache(tmp_path, n_images=700, dim=8, chunk_images=100)
    with FeatureFile(path) as ff:
        every_row = ff.features[:].astype(np.float32)
        rng = np.random.default_rng(0)
        for rows in (np.arange(700), rng.permutation(700)[:50], np.array([5, 5, 600, 3, 3]), np.array([0, 699]),
                     np.array([], np.int64)):
            src = FeatureSource(ff, rows)
            np.testing.assert_array_equal(src.read(np.arange(rows.size)), every_row[rows])
            np.testing.assert_array_equal(src.load_reduced("avg", batch_size=16), every_row[rows])


def _stream_case(tmp_path, n_classes=4, n_images=6000, dim=64):
    path = write_cache(tmp_path, n_images=n_images, dim=dim, n_classes=n_classes, sep=0.8,
                       split_fractions=(0.8, 0.2, 0), chunk_images=1000)
    return FeatureFile(path)


@pytest.mark.parametrize("n_classes, class_weight, budget, solver", [
    (4, None, 0.5, "Newton-CG"), (2, "balanced", 0.2, "L-BFGS")])
def test_streamed_logistic_reaches_the_in_memory_optimum(tmp_path, monkeypatch, n_classes, class_weight, budget,
                                                         solver):
    """Same objective as scikit-learn's: solved tightly, the streamed fit lands on scikit-learn's
    float64 optimum; at the default tol it predicts like the in-memory head. A subsample with few
    rows per feature (the smaller budget) makes it use L-BFGS instead of Newton steps."""
    from sklearn.linear_model import LogisticRegression

    with _stream_case(tmp_path, n_classes) as ff:
        tr, va = ff.rows("train"), ff.rows("val")
        src, y, Xv, yv = FeatureSource(ff, tr), ff.labels[tr], ff.load(va), ff.labels[va]
        kw = dict(C=0.05, class_weight=class_weight)
        memory = LogisticHead(**kw).fit(src, y)
        monkeypatch.setattr(FeatureSource, "load_reduced", lambda *a, **k: pytest.fail("loaded whole"))
        streamed = LogisticHead(memory_budget_mb=budget, **kw).fit(src, y)
        tight = LogisticHead(memory_budget_mb=budget, tol=1e-7, max_iter=1000, **kw).fit(src, y)
        monkeypatch.undo()
        assert streamed.streamed_ and not memory.streamed_ and streamed.converged_ and tight.converged_
        assert streamed.stream_info_["solver"] == solver
        assert "streamed from the cache" in streamed.stream_note_ and f"{tr.size} rows x 64" in streamed.stream_note_
        X64 = ff.load(tr).astype(np.float64)
        ref = LogisticRegression(tol=1e-10, max_iter=5000, **kw).fit((X64 - X64.mean(0)) / feature_scale(X64.std(0)), y)
        coef = tight.pipeline_.named_steps["logreg"].coef_
        assert coef.shape == ref.coef_.shape == ((1, 64) if n_classes == 2 else (4, 64))
        np.testing.assert_allclose(coef, ref.coef_, atol=1e-4 * np.abs(ref.coef_).max())
        assert streamed.as_dense_weights()[0].shape == (64, n_classes)
        np.testing.assert_allclose(streamed.predict_proba(Xv), memory.predict_proba(Xv), atol=1e-2)
        acc = lambda h: (h.predict(Xv) == yv).mean()  # noqa: E731
        assert abs(acc(streamed) - acc(memory)) <= 0.01 and acc(memory) > 0.6


def test_streamed_logistic_scales_features_of_tiny_magnitude_as_scikit_learn_does(tmp_path):
    """Features of tiny magnitude (random-init backbones: ~1e-11, spread under 1e-12): the streamed scaler
    called them constant (std under a fixed 1e-12) and fitted on nothing, 70% against the in-memory 100%."""
    import h5py

    path = write_cache(tmp_path, n_images=3000, dim=16, n_classes=3, sep=2.0, split_fractions=(0.8, 0.2, 0),
                       chunk_images=500)
    with h5py.File(path, "r+") as f:  # float32: float16 cannot hold 1e-11
        tiny = f["features"][...].astype(np.float32) * np.float32(1e-13)
        del f["features"]
        f.create_dataset("features", data=tiny)
    with FeatureFile(path) as ff:
        tr, va = ff.rows("train"), ff.rows("val")
        src, y, Xv, yv = FeatureSource(ff, tr), ff.labels[tr], ff.load(va), ff.labels[va]
        memory = LogisticHead(C=1.0).fit(src, y)
        streamed = LogisticHead(C=1.0, memory_budget_mb=0.05).fit(src, y)
        assert streamed.streamed_ and not memory.streamed_
        acc = lambda h: (h.predict(Xv) == yv).mean()  # noqa: E731
        assert acc(memory) > 0.9 and abs(acc(streamed) - acc(memory)) <= 0.01, (acc(streamed), acc(memory))


def test_feature_scale_floors_each_std_at_the_median_of_the_varying_ones():
    np.testing.assert_allclose(feature_scale(np.array([0.0, 1e-6, 1.0, 2.0, 4.0])), [1.5, 1.5, 1.5, 2.0, 4.0])
    np.testing.assert_allclose(feature_scale(np.array([3e-12, 1e-12, 2e-12])), [3e-12, 2e-12, 2e-12])  # relative
    np.testing.assert_array_equal(feature_scale(np.zeros(3)), np.ones(3))


@pytest.mark.parametrize("kind", ["logistic", "dense"])
def test_a_channel_constant_in_training_does_not_decide_new_images(kind):
    """Pooled CNN channels that are ~0 on every training image (std 1e-6) were divided by that std: a new
    image lighting one got a standardized value of ~10^6, which outvoted every real feature. On 10 images
    per class of the built-in digits half the other images had such a value, and the held-out log loss
    was 1.36 (0.54 with the std floored at the median std)."""
    rng = np.random.default_rng(0)

    def images(n: int, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        X = rng.normal(0, 1, (n, 10)) + np.where(y[:, None] == 1, 1.5, -1.5) * (np.arange(10) < 8)
        X[:, 8:] = rng.normal(0, 1e-6, (n, 2)) if quiet else np.abs(rng.normal(0, 1, (n, 2)))
        return X.astype(np.float32), y

    X, y = images(40, quiet=True)
    Xt, yt = images(400, quiet=False)
    head = (LogisticHead(C=1.0) if kind == "logistic" else DenseHead(hidden=(), epochs=30, lr=1e-2, batch_size=8)).fit(X, y)
    acc = (head.predict(Xt) == yt).mean()
    assert acc > 0.95, acc


def test_streamed_logistic_auto_C_is_within_a_point_and_saves_loads_identically(tmp_path):
    with _stream_case(tmp_path) as ff:
        tr, va = ff.rows("train"), ff.rows("val")
        src, yv = FeatureSource(ff, tr), ff.labels[va]
        memory = LogisticHead().fit(src, ff.labels[tr], class_names=ff.class_names, cache_key=ff.key)
        head = LogisticHead(memory_budget_mb=0.5).fit(src, ff.labels[tr], class_names=ff.class_names, cache_key=ff.key)
        assert head.streamed_ and head.C_ in head.cv_scores_ and len(head.cv_scores_) == len(head.Cs)
        assert "held-out subsample" in head.C_note_
        val = FeatureSource(ff, va)
        acc = lambda h: (h.predict(val) == yv).mean()  # noqa: E731
        assert abs(acc(head) - acc(memory)) <= 0.01
        (tmp_path / "run").mkdir()
        head.save(tmp_path / "run" / "head.npz")
        meta = json.loads((tmp_path / "run" / "head.json").read_text())
        assert meta["streamed"] is True and meta["stream_note"] == head.stream_note_
        back = load_head(tmp_path / "run")
        assert isinstance(back, LogisticHead) and back.streamed_ and back.get_params() == head.get_params()
        np.testing.assert_array_equal(back.predict_proba(val), head.predict_proba(val))
        np.testing.assert_array_equal(back.as_dense_weights()[0], head.as_dense_weights()[0])
        back.check_matches(ff)


def test_streamed_logistic_peak_memory_stays_near_the_budget(tmp_path):
    """A 20,000 x 256 float16 cache, 4 MB budget: numpy's peak during the streamed fit stays under
    the budget (about 3 MB), while the in-memory fit holds about 16x it."""
    import tracemalloc

    path = write_cache(tmp_path, n_images=20000, dim=256, n_classes=5, sep=0.5, split_fractions=(1, 0, 0),
                       chunk_images=5000)
    with FeatureFile(path) as ff:
        rows = ff.rows("train")
        src, y = FeatureSource(ff, rows), ff.labels[rows]
        peaks = {}
        for budget in (4, None):
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            head = LogisticHead(C=0.1, memory_budget_mb=budget).fit(src, y)
            peaks[budget] = (tracemalloc.get_traced_memory()[1] - base) / 2**20
            tracemalloc.stop()
            assert head.streamed_ == (budget == 4)
    assert peaks[4] < 4, peaks
    assert peaks[None] > 30, peaks


def test_a_val_fraction_that_leaves_one_class_and_a_class_held_out_whole_are_said(tmp_path):
    """Holding out most training images left one class: the error named that class, not the val
    fraction. A class whose only image went to val could never be predicted, and nothing said so."""
    import warnings

    from pipeline.errors import DataWarning
    from pipeline.heads.training import split_rows

    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    two = write_cache(tmp_path / "a", n_images=20, dim=8, n_classes=2, labels=labels, split_fractions=(1, 0, 0))
    with FeatureFile(two) as ff, pytest.raises(UserError, match=r"holding out 0.95 of the training images as val "
                                                                  r"\(--val-fraction\) leaves only 'class_\d' images"):
        split_rows(ff, val_fraction=0.95)
    labels = np.r_[np.zeros(40, int), np.ones(40, int), [2]]
    three = write_cache(tmp_path / "b", n_images=81, dim=8, n_classes=3, labels=labels, split_fractions=(1, 0, 0))
    with FeatureFile(three) as ff:
        seed = next(s for s in range(50) if 80 in split_rows(ff, 0.5, s).val)  # the one class_2 image held out
        with pytest.warns(DataWarning, match=r"1 class\(es\) have val images but no training image \('class_2'\): "
                                             r"the head can never predict them; .* or give a smaller --val-fraction"):
            split_rows(ff, 0.5, seed)
        other = next(s for s in range(50) if 80 not in split_rows(ff, 0.5, s).val)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            split_rows(ff, 0.5, other)
    # a listed class whose every file was skipped at extraction: in the class names, in no row
    gone = write_cache(tmp_path / "c", n_images=20, dim=8, n_classes=2, labels=labels[:20] * 0 + np.arange(20) % 2,
                       class_names=["class_0", "class_1", "onlybad"], split_fractions=(1, 0, 0))
    with FeatureFile(gone) as ff, pytest.warns(DataWarning, match=r"1 class\(es\) have no image in the cache "
                                                                    r"\('onlybad'\): their files were skipped at extraction, or the data lists none"):
        split_rows(ff, 0.2)


def test_running_moments_over_blocks_equal_the_whole_arrays():
    """heads.streaming.RunningMoments: the dense head's standardization and the streamed logistic head's."""
    from pipeline.heads.streaming import RunningMoments
    rng = np.random.default_rng(0)
    x = (rng.normal(3.0, 2.0, (1000, 7)) * np.arange(1, 8)).astype(np.float32)
    for dtype in (np.float32, np.float64):
        m = RunningMoments()
        for block in (x[:13], x[13:13], x[13:500], x[500:999], x[999:]):  # uneven blocks, an empty one among them
            m.add(block.astype(dtype))
        assert m.count == 1000
        np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(m.variance, x.astype(np.float64).var(axis=0), rtol=1e-5)
