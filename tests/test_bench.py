"""The bench/ scripts still run (tiny sizes): a refactor once left bench/finetune.py importing a removed
function, found only when a GPU session was being prepared."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_folder


def _bench(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_bench_extract_runs_on_a_relative_folder_listed_twice(tmp_path):
    make_folder(tmp_path / "photos", per_class=3, splits=("train",))
    proc = _bench("extract.py", "--data", "photos/train", "--backbone", "mobilenetv2", "--image-size", "32",
                  "--limit", "0", "--repeat-files", "2", "--batch-size", "4", "--parts", "d,i,ii", cwd=tmp_path)
    assert "(ii)" in proc.stdout and "12" in proc.stdout, proc.stdout


def test_bench_finetune_runs(tmp_path, repeat="2"):  # photos listed twice: the path a refactor once broke
    make_folder(tmp_path / "photos", per_class=4, splits=("train",))
    proc = _bench("finetune.py", "--data", str(tmp_path / "photos"), "--backbones", "mobilenetv2", "--size", "32",
                  "--images", "8", "--batch-size", "4", "--repeat-files", repeat, "--precision", "float32",
                  cwd=tmp_path)
    assert "ratio ours / keras.io" in proc.stdout and "8 photos" in proc.stdout, proc.stdout


def test_bench_gpu_diagnosis_runs_its_loader_and_extraction_breakdowns(tmp_path):
    """bench/gpu/diagnose.py (what bench/gpu/diagnose.sh runs on a GPU machine) on a CPU, tiny."""
    make_folder(tmp_path / "photos", per_class=3, splits=("train",))
    diag = "gpu/diagnose.py"
    proc = _bench(diag, "loader", "--data", "photos/train", "--limit", "0", "--repeat", "2", "--batch-size", "4",
                  "--workers", "1,2", "--variants", "as-is,cvt", cwd=tmp_path)
    assert re.search(r"loader as-is threads x2 +\d+ img/s", proc.stdout) and "loader cvt" in proc.stdout, proc.stdout
    proc = _bench(diag, "extract", "--data", "photos/train", "--limit", "0", "--repeat", "2", "--batch-size", "4",
                  "--image-size", "32", "--backbone", "mobilenetv2", "--weights", "none", "--runs", "1",
                  "--precision", "float32", cwd=tmp_path)
    assert re.search(r"extract cold .*: 12 rows in", proc.stdout) and "assemble (HDF5)" in proc.stdout, proc.stdout


def test_bench_backbones_runs(tmp_path):
    proc = _bench("backbones.py", "--sets", "digits", "--backbones", "efficientnet_lite0,mobilenetv2", "--work", str(tmp_path),
                  "--weights", "none", "--image-size", "32", "--dtype", "float32", "--head", "logistic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kept " in proc.stdout and "test accuracy" in proc.stdout and "of 1 data sets" in proc.stdout


def test_bench_quality_prints_the_quality_table_rows(tmp_path):
    proc = _bench("quality.py", "--rows", "digits", "--work", str(tmp_path), "--backbone", "mobilenetv2", "--weights",
                  "none", "--image-size", "32", "--dtype", "float32", "--head", "logistic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = next(l for l in proc.stdout.splitlines() if l.startswith("| digits |"))
    assert re.search(r"\*\*\d+\.\d%\*\*", row) and "fit-head --data builtin:digits" in row
    assert "environment: " in proc.stdout and "cores" in proc.stdout


def test_bench_heldout_reports_over_seeds(tmp_path):
    make_folder(tmp_path / "photos", per_class=10)
    proc = _bench("heldout.py", "--data", str(tmp_path / "photos"), "--work", str(tmp_path / "w"), "--seeds", "0,1",
                  "--no-finetune", "--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--dtype",
                  "float32", "--head", "logistic", cwd=tmp_path)
    assert proc.stdout.count("fit-head (") == 2 and "over seeds 0,1" in proc.stdout
    assert "head-only val" in proc.stdout


def test_bench_heldout_fine_tunes_once_more_per_seed_with_also(tmp_path):
    make_folder(tmp_path / "photos", per_class=6)
    proc = _bench("heldout.py", "--data", str(tmp_path / "photos"), "--work", str(tmp_path / "w"), "--seeds", "0",
                  "--also=--epochs 1 --label-smoothing 0", "--backbone", "vgg16", "--weights", "none",
                  "--image-size", "32", "--dtype", "float32", "--head", "logistic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "seed 0: finetune (" in proc.stdout and "seed 0: finetune --epochs 1 --label-smoothing 0 (" in proc.stdout
    assert re.search(r"fine-tuned --epochs 1 --label-smoothing 0 val\s+\d", proc.stdout)


def test_bench_heldout_reads_both_commands_figures():
    """The fine-tune's before -> after lines (which the smoke test above skips) and fit-head's lines."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from heldout import accuracies, after_values, spread
    finally:
        sys.path.remove(str(ROOT / "bench"))
    fit = "train accuracy 1.000 · log loss 0.01\nval   accuracy 0.932 · macro-F1 0.933\ntest  accuracy 0.939 · x\n"
    assert accuracies(fit) == {"val": 0.932, "test": 0.939}
    tuned = ("val   accuracy           0.932 -> 0.941 (+0.009)\nval   log_loss           0.203 -> 0.256\n"
             "test  accuracy           0.939 -> 0.947 (+0.008)\n")
    assert accuracies(tuned) == {"val": (0.932, 0.941), "test": (0.939, 0.947)}
    assert after_values(tuned, "log_loss") == {"val": 0.256} and after_values(tuned, "ece") == {}
    assert spread([0.947, 0.949, 0.951]) == "94.9% (94.7-95.1)"


def test_bench_audit_refuses_bad_options_in_one_line(tmp_path):
    for args in (("--plant-seeds", "0"), ("--plant-seed-start", "-1"), ("--label-data", "cifar"),
                 ("--clean-heads", "auto,bogus"), ("--parts", "labels,clean_cv"), ("--clean-heads", "svm:Q=3"),
                 ("--clean-heads", "svm:C=-1"), ("--clean-heads", "svm:C"), ("--drop-grid", "0.1,2"),
                 ("--drop-grid", "0.3")):  # --parts labels: clean-cv alone reads it
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "audit.py"), "--parts", "labels", *args,
                               "--work", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert args[0] in last or "cifar" in last, proc.stderr
        assert "clean_cv" not in args[1] or "'clean_cv'" in last, proc.stderr


def test_bench_head_specs_set_parameters():
    sys.path.insert(0, str(ROOT / "bench"))
    import audit as bench

    assert bench.head_spec("svm:C=3:cv=1") == ("svm", {"C": 3.0, "cv": 1})
    head = bench.fresh_head("svm:C=0.5:cv=1")
    assert (head.C, head.cv, head.n_jobs) == (0.5, 1, 2)
    for bad in ("svm:C", "svm:=3", "svm:C=x"):
        with pytest.raises(ValueError, match="name=number"):
            bench.head_spec(bad)


def test_bench_audit_compares_with_the_anchor_seed_by_seed():
    sys.path.insert(0, str(ROOT / "bench"))
    from audit import paired

    assert paired(np.array([0.8, 0.9, 0.7]), np.array([0.8, 0.9, 0.7])) == (0.0, 0.0)
    diff, se = paired(np.array([0.9, 0.7, 0.8, 0.6]), np.array([0.8, 0.8, 0.8, 0.8]))
    assert diff == pytest.approx(-0.05) and se == pytest.approx(np.std([0.1, -0.1, 0.0, -0.2], ddof=1) / 2)
    assert np.isnan(paired(np.array([0.5]), np.array([0.4]))[1])


def test_bench_audit_counts_what_the_backbones_imagenet_classifier_calls_the_photos(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    from audit import imagenet_view

    from pipeline.backbones.imagenet import class_names
    from pipeline.backbones.lite_weights import weights_path
    from pipeline.backbones.table import DEFAULT_BACKBONE
    from pipeline.backbones.torchfile import load_state_dict

    W = load_state_dict(weights_path(DEFAULT_BACKBONE))["_fc.weight"].astype(np.float32)
    bee, ant = (W[class_names().index(name)] for name in ("bee", "ant"))
    unit = 50 * np.eye(W.shape[1], dtype=np.float32)[:1]
    X_own = np.concatenate([50 * bee[None] / np.linalg.norm(bee), unit, unit])  # a bee photo, two others
    X_foreign = np.stack([50 * bee / np.linalg.norm(bee), 50 * ant / np.linalg.norm(ant), unit[0]])
    imagenet_view(X_own, np.array([1, 0, 1]), ["a", "b"], X_foreign, [True, False, False])
    out = capsys.readouterr().out
    assert "calls 1 of flowers' 3 photos 'bee' (a 0, b 1) and 0 'ant'" in out, out
    assert "bee photos: 1 of 1 'bee', its ant photos 1 of 2 'ant'" in out, out


def test_bench_audit_anchor_scores_each_row_in_its_place_when_it_shuffles_them():
    """The anchor shuffles its rows (in folder order its folds gather the flips) and must hand back each
    row's own out-of-fold probabilities: misplaced rows would score ~half of them against the wrong class."""
    sys.path.insert(0, str(ROOT / "bench"))
    from audit import cleanlab_anchor

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 60)
    X = rng.normal(size=(120, 8)) + 6.0 * truth[:, None]
    y = truth.copy()
    flipped = {0, 1, 2, 60, 61, 62}  # listed first in their folders, as the bench plants
    y[list(flipped)] = 1 - y[list(flipped)]
    for order_seed in (None, 0, 7):
        ranked, proba = cleanlab_anchor(X, y, order_seed=order_seed)
        assert (proba.argmax(axis=1) == truth).mean() > 0.95, order_seed
        assert (proba[list(flipped), y[list(flipped)]] < 0.5).all(), order_seed  # the flips' own rows doubt them
        assert set(ranked.tolist()) <= set(np.flatnonzero(proba.argmax(axis=1) != y).tolist()) | flipped


def test_bench_audit_recovery_is_a_ratio_of_means_with_a_spread_over_seeds():
    sys.path.insert(0, str(ROOT / "bench"))
    from audit import recovery

    same = {"noisy": [0.90] * 4, "clean": [1.00] * 4, "cleaned": [0.95] * 4}
    assert recovery(same, "cleaned", "clean") == pytest.approx((0.5, 0.0))
    # per seed 0% and 100%: the ratio of means (50%), not a mean of ratios, and seeds that disagree spread it
    mixed = {"noisy": [0.90, 0.80], "clean": [1.00, 0.90], "cleaned": [0.90, 0.90]}
    share, se = recovery(mixed, "cleaned", "clean")
    assert share == pytest.approx(0.5) and se > 0.1


def test_bench_audit_listing_leaves_out_the_named_paths(tmp_path):
    """--without-reviewed: the planted data set is the folder less the reviewed faults."""
    sys.path.insert(0, str(ROOT / "bench"))
    from audit import listing

    root = make_folder(tmp_path / "data", per_class=3)
    every = listing(root)
    gone = {every[0][0], every[4][0]}
    kept = listing(root, gone)
    assert len(every) == 12 and len(kept) == 10 and not gone & {p for p, _, _ in kept}


def test_bench_audit_clean_cv_scores_every_image_by_heads_that_never_saw_it(tmp_path, capsys, monkeypatch):
    """--parts clean-cv on a tiny folder: one audit of the flipped manifest, each training set fitted
    fold by fold, every image scored once; the oracle set is the noisy one less exactly the flips."""
    sys.path.insert(0, str(ROOT / "bench"))
    import audit as bench

    root = make_folder(tmp_path / "data", per_class=10, classes=("a", "b", "c"))
    fitted = []
    real_fresh_head = bench.fresh_head

    def counting(kind):
        head = real_fresh_head(kind)
        fit = head.fit
        head.fit = lambda X, y, **kw: fitted.append(len(y)) or fit(X, y, **kw)
        return head

    real_audit = bench.audit

    def audit_then_trim(manifest, cache, *extra):  # the grid's run folder keeps 30 rows: its set must be those
        result, wall, run = real_audit(manifest, cache, *extra)
        if "--drop-below" in extra:
            lines = (run / "cleaned.csv").read_text().splitlines(keepends=True)
            (run / "cleaned.csv").write_text("".join(lines[:31]))
        return result, wall, run

    monkeypatch.setattr(bench, "fresh_head", counting)
    monkeypatch.setattr(bench, "audit", audit_then_trim)
    bench.part_clean_cv(root, tmp_path, tmp_path / "cache", seed=0, seeds=1, heads=("logistic",), folds=3,
                        drop_grid=(1.0,))
    out = capsys.readouterr().out
    line = re.search(r"clean-cv seed 0, logistic head: 10% flipped \((\d+) of 60\), 3-fold accuracy on every image "
                     r"clean labels (\S+), noisy (\S+), cleaned.csv (\S+), cleaned.csv with --relabel (\S+), "
                     r"oracle: drop exactly the flipped (\S+), cleaned.csv --drop-below 1 (\S+)", out)
    assert line, out
    flipped = int(line.group(1))
    assert flipped == 6 and all(0.0 <= float(a) <= 1.0 for a in line.groups()[1:])
    assert float(line.group(2)) >= 0.95  # the generated classes are apart: clean labels score nearly every image right
    # 6 training sets x 3 folds; each fold trains on 2 of 3 folds of what the set keeps, the oracle 60 - 6 flips
    assert len(fitted) == 18 and sum(fitted[:3]) == 2 * 60 and sum(fitted[12:15]) == 2 * (60 - flipped)
    # the grid's set is the cleaned.csv of its own audit run, with --drop-below 1 (trimmed above to 30 rows)
    below = [run for run in (tmp_path / "cache" / "runs").iterdir()
             if json.loads((run / "config.json").read_text()).get("drop_below") == 1]
    assert len(below) == 1 and json.loads((below[0] / "audit.json").read_text())["cleaned"]["label_issues_dropped_below"] == 1
    assert sum(fitted[15:]) == 2 * 30 < sum(fitted[6:9])
    assert re.search(rf"clean-cv over 1 seeds, logistic head \(clean {line.group(2)}, noisy {line.group(3)}: the noise cost",
                     out), out
