"""Fine-tuning's recalibration (`pipeline.finetune.calibrate`): one temperature fitted on the val
images' predictions, val figures cross-fitted over two halves, the saved model carrying it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.finetune.calibrate import halves, recalibrate, with_temperature
from pipeline.heads.calibration import temperature_scaled
from pipeline.tracking.metrics import classification_report


def _underconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities 95% right but never above ~0.6 (label smoothing's look, exaggerated)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.95, y, (y + 1) % 3)
    logits = rng.normal(0, 0.1, (n, 3))
    logits[np.arange(n), pred] += 0.6
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


def test_a_temperature_fitted_on_val_fixes_underconfidence_without_changing_a_prediction():
    preds = {"val": _underconfident(400, 0), "test": _underconfident(400, 1)}
    cal = recalibrate(preds, seed=3)
    assert cal.temperature < 0.5 and "400 val images" in cal.note
    for name, (y, p) in preds.items():
        assert (cal.proba[name].argmax(axis=1) == p.argmax(axis=1)).all()
        before, after = classification_report(y, p, ["a", "b", "c"]), classification_report(y, cal.proba[name], ["a", "b", "c"])
        assert after["ece"] < before["ece"] / 3 and after["log_loss"] < before["log_loss"]
    # test at the temperature of all val; val cross-fitted: each half at the other half's temperature
    np.testing.assert_allclose(cal.proba["test"], temperature_scaled(np.log(preds["test"][1]), cal.temperature))
    assert not np.allclose(cal.proba["val"], temperature_scaled(np.log(preds["val"][1]), cal.temperature))
    assert recalibrate(preds, seed=3).proba["val"] == pytest.approx(cal.proba["val"])  # seeded halves


def test_without_val_images_nothing_is_recalibrated_and_the_note_says_why():
    y, p = _underconfident(50, 0)
    for preds in ({"test": (y, p)}, {"val": (y[:1], p[:1]), "test": (y, p)}):
        cal = recalibrate(preds)
        assert cal.temperature == 1.0 and "fewer than 2 validation images or classes" in cal.note
        np.testing.assert_array_equal(cal.proba["test"], p)


def test_every_val_image_right_keeps_the_temperature_and_does_not_claim_a_fit():
    y, p = _underconfident(400, 0)
    p = np.where(np.arange(3) == y[:, None], 0.5, 0.25)  # every val image right
    cal = recalibrate({"val": (y, p), "test": _underconfident(40, 1)})
    assert cal.temperature == 1.0 and "all 400 val images are classified right" in cal.note and "fitted" not in cal.note
    np.testing.assert_array_equal(cal.proba["val"], p)


def test_halves_deal_every_class_into_both():
    y = np.array([0] * 5 + [1] * 2 + [2] * 1)
    h = halves(y, seed=0)
    assert set(h[y == 0]) == {0, 1} and set(h[y == 1]) == {0, 1} and np.bincount(h[y == 0]).tolist() in ([3, 2], [2, 3])


def test_the_saved_model_carries_the_temperature():
    keras = pytest.importorskip("keras")
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp), name="m")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    p = np.asarray(model.predict(x, verbose=0), np.float64)
    assert with_temperature(model, 1.0) is model
    hot = with_temperature(model, 0.25)
    assert hot.name == "m" and hot.layers[-1].name == "recalibrated" and hot.input.shape == model.input.shape
    np.testing.assert_allclose(hot.predict(x, verbose=0), temperature_scaled(np.log(p), 0.25), atol=1e-5)
