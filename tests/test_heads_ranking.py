"""Ranking backbones by the head's cross-validated scores on the training rows (`fit-head --backbone a,b`)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_features import blobs, write_cache
from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads.auto import AutoHead
from pipeline.heads.dense import DenseHead
from pipeline.heads.knn import KNNHead
from pipeline.heads.logistic import LogisticHead
from pipeline.heads.ranking import BackboneScore, ranked, score_cache
from pipeline.heads.svm import KernelHead
from pipeline.heads.training import split_rows


@pytest.mark.parametrize("make", [LogisticHead, KernelHead, KNNHead, AutoHead])
def test_every_cross_validating_head_reports_out_of_fold_accuracy_not_training_accuracy(make):
    """On labels with no relation to the features a head can fit its training rows, but its CV
    accuracy stays near chance; on separable classes both are high."""
    x, y = blobs(150, 32, 3, seed=0, sep=4.0)
    head = make().fit(x, y)
    assert head.cv_log_loss() is not None and head.cv_accuracy() > 0.9
    shuffled = np.random.default_rng(1).permutation(y)
    head = make().fit(x, shuffled)
    assert head.cv_accuracy() < 0.6 and head.cv_log_loss() > 0.9


def test_heads_without_cross_validation_report_no_cv_scores():
    x, y = blobs(90, 16, 3, seed=0)
    given = LogisticHead(C=1.0).fit(x, y)
    assert given.cv_log_loss() is None and given.cv_accuracy() is None
    assert DenseHead.cv_log_loss(DenseHead()) is None and DenseHead.cv_accuracy(DenseHead()) is None


@pytest.mark.parametrize("make", [LogisticHead, lambda: LogisticHead(C=1.0), KernelHead, lambda: KernelHead(C=1.0),
                                  KNNHead, lambda: KNNHead(k=5, vote_temperature=0.1, calibrate=False),
                                  lambda: KNNHead(k=5, vote_temperature=0.1), AutoHead])
def test_a_head_says_before_fitting_whether_the_fit_will_give_cv_scores(make):
    """`fit-head --backbone a,b` refuses a head that will not cross-validate before extracting anything:
    what `cross_validates` promises must be what the fit gives."""
    x, y = blobs(90, 16, 3, seed=0)
    head = make()
    promised = head.cross_validates()
    assert promised == (head.fit(x, y).cv_log_loss() is not None)
    assert DenseHead().cross_validates() is False


def test_backbones_rank_by_cv_log_loss_then_accuracy_then_the_order_given():
    def entry(name, loss, acc):
        return BackboneScore(name, name, "svm", loss, acc, 8, 100, None)

    order = ranked([entry("a", 0.30, 0.90), entry("b", 0.20, 0.90), entry("c", 0.20, 0.95), entry("d", 0.20, 0.95)])
    assert [s.backbone for s in order] == ["c", "d", "b", "a"]


def test_the_better_features_rank_first_scored_on_the_rows_a_head_trains_on(tmp_path):
    """Two caches of the same images, one with well-separated classes: it ranks first. The head is
    fitted on fit-head's training rows (augmented views included, the held-out share left out), and
    the cache's recorded extraction rate is carried along; a head that cannot cross-validate is refused."""
    clear = write_cache(tmp_path / "a", n_images=200, dim=24, views=1, split_fractions=(1, 0, 0), sep=4.0,
                        attrs={"extract_seconds": 4.0})
    murky = write_cache(tmp_path / "b", n_images=200, dim=24, views=1, split_fractions=(1, 0, 0), sep=0.6,
                        attrs={"extract_seconds": 4.0, "images_per_s": 123.4})
    scores = []
    for name, path in (("murky", murky), ("clear", clear)):
        with FeatureFile(path) as ff:
            scores.append(score_cache(ff, name, LogisticHead, val_fraction=0.25, seed=3))
            rows = split_rows(ff, 0.25, 3).train
            n = len(ff)
    best, worst = ranked(scores)
    assert best.backbone == "clear" and best.cv_log_loss < worst.cv_log_loss and best.cv_accuracy > worst.cv_accuracy
    assert best.train_rows == rows.size == 300 and best.width == 24 and best.head == "logistic"
    # the recorded rate (the backbone build left out); a cache from before it was recorded: rows over seconds
    assert best.images_per_s == n / 4.0 and worst.images_per_s == 123.4
    assert best.as_json()["train_rows"] == 300 and best.as_json()["backbone"] == "clear"
    with FeatureFile(clear) as ff, pytest.raises(UserError, match="no cross-validated score"):
        score_cache(ff, "clear", lambda: LogisticHead(C=1.0))
