"""Stage 2 as a user runs it: fit-head (both heads, sweep), runs, evaluate and predict --run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import make_folder, run_cli
from helpers_features import write_cache

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--no-progress"]


def _run_id(stdout: str) -> str:
    line = next(l for l in stdout.splitlines() if " run " in l and "saved in" in l)
    return line.split(" run ")[1].split()[0]


def test_fit_head_from_extract_options_then_use_the_run(tmp_path):
    data = make_folder(tmp_path / "d", per_class=12)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    assert "extracting first" in fit.stderr and "val   accuracy" in fit.stdout
    run_id = _run_id(fit.stdout)
    run_dir = Path(cache) / "runs" / run_id
    assert (run_dir / "head.npz").exists() and (run_dir / "head.json").exists() and (run_dir / "confusion_val.png").exists()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["backbone"] == "vgg16" and cfg["head"] == "logistic"

    again = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1.0")
    assert "extracting first" not in again.stderr and "cache hit" in again.stdout

    listing = run_cli("runs", "--cache-dir", cache)
    assert listing.returncode == 0 and run_id in listing.stdout and "extract" in listing.stdout
    only = run_cli("runs", "--stage", "fit-head", "--filter", "head=logistic", "--cache-dir", cache)
    assert run_id in only.stdout and "│ extract" not in only.stdout
    others = [p.name for p in (Path(cache) / "runs").iterdir() if p.name != run_id]
    # a prefix no other run shares (two runs of one second share 2 random hex digits 1 time in 256)
    prefix = next(run_id[:n] for n in range(18, len(run_id) + 1) if not any(o.startswith(run_id[:n]) for o in others))
    show = run_cli("runs", "show", prefix, "--cache-dir", cache)
    assert show.returncode == 0 and '"head": "logistic"' in show.stdout

    ev = run_cli("evaluate", "--run", run_id, "--data", str(data), "--split", "val", "--cache-dir", cache)
    assert ev.returncode == 0, ev.stderr
    assert "accuracy" in ev.stdout and "(n=24)" in ev.stdout  # 12 per class in val
    no_test = run_cli("evaluate", "--run", run_id, "--data", str(data), "--split", "test", "--cache-dir", cache)
    assert no_test.returncode == 2 and "its labelled images are in train, val: give --split train or --split val, " \
        "or --split all" in no_test.stderr, no_test.stderr

    out_csv = tmp_path / "p.csv"
    pred = run_cli("predict", "--run", run_id, str(data / "val" / "ants"), "--csv", str(out_csv),
                   "--top-k", "1", "--cache-dir", cache)
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 12 and set(rows[0]) == {"path", "prediction", "probability", "ants", "bees"}
    assert all(abs(float(r["ants"]) + float(r["bees"]) - 1) < 1e-4 for r in rows)
    assert len(pred.stdout.strip().splitlines()) == 12
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "new\nline.jpg").write_bytes(next((data / "val" / "ants").iterdir()).read_bytes())
    one = run_cli("predict", "--run", run_id, str(odd), "--top-k", "1", "--cache-dir", cache)
    assert one.returncode == 0 and one.stdout.strip().splitlines() == [one.stdout.strip()], one.stdout
    assert one.stdout.startswith(f"{odd}/new\\nline.jpg\t"), one.stdout  # one line per image, tab-separated


def test_dense_head_and_sweep_on_a_cache_file(tmp_path):
    path = write_cache(tmp_path / "c", n_images=240, dim=32, n_classes=3)
    cache = str(tmp_path / "c")
    dense = run_cli("fit-head", "--cache", str(path), "--head", "dense", "--hidden", "32", "--epochs", "5",
                    "--early-stopping", "2", "--lr-schedule", "cosine", "--cache-dir", cache)
    assert dense.returncode == 0, dense.stderr
    run_dir = Path(cache) / "runs" / _run_id(dense.stdout)
    assert (run_dir / "head.keras").exists() and (run_dir / "curves.png").exists()
    assert "test  accuracy" in dense.stdout
    assert re.search(r"early stopping kept epoch [1-5] of [1-5] by the val loss, so the val figures below are not "
                     r"held out", dense.stdout), dense.stdout
    sweep = run_cli("fit-head", "--cache", path.stem.rsplit("-", 1)[1], "--head", "dense", "--sweep",
                    "--epochs", "3", "--jobs", "2", "--cache-dir", cache,
                    isolated=True)  # its workers start from a fresh process, as a user's
    assert sweep.returncode == 0, sweep.stderr
    assert "best saved in run" in sweep.stdout and "sweep" in sweep.stdout
    best = Path(cache) / "runs" / sweep.stdout.split("best saved in run ")[1].split()[0]
    assert (best / "curves.png").exists() and (best / "confusion_val.png").exists()  # like any run
    chosen = json.loads((best / "metrics.json").read_text())["best_params"]  # the config recorded the grid's base
    config = json.loads((best / "config.json").read_text())
    assert {k: config["head_params"][k] for k in chosen} == chosen and config["sweep"] is True, (chosen, config)
    from pipeline.heads.training import recorded_split                      # its images, as any run's
    assert recorded_split(best) is not None and recorded_split(best)["train"]
    chatter = [line for line in sweep.stderr.splitlines() if "cuda" in line.lower() or "absl" in line
               or "oneDNN" in line or "cpu_feature_guard" in line]
    assert not chatter, chatter  # the sweep's worker processes start silently


@pytest.mark.parametrize("args, fragment", [
    (["evaluate", "--run", "nope", "--data", "x"], "unknown run ID"),
    (["predict", "--run", "nope", "{img}"], "unknown run ID"),
    (["fit-head", "--cache", "ffffffffff"], "no cache entry"),
    (["fit-head", "--cache", "{cache_file}", "--C", "-1"], "--C"),
    # a head option the head does not read, or that --sweep searches, was ignored without a word
    (["fit-head", "--cache", "{cache_file}", "--head", "svm", "--hidden", "64"],
     "--hidden is not read by --head svm; leave it out, or use --head dense"),
    (["fit-head", "--cache", "{cache_file}", "--head", "knn", "--C", "3"], "--C is not read by --head knn"),
    (["fit-head", "--cache", "{cache_file}", "--head", "logistic", "--k", "5", "--epochs", "3"],
     "--epochs, --k are not read by --head logistic; leave them out"),
    (["fit-head", "--cache", "{cache_file}", "--head", "auto", "--vote-temperature", "0.1"],
     "--vote-temperature is not read by --head auto; leave it out, or use --head knn"),
    (["fit-head", "--cache", "{cache_file}", "--head", "svm", "--sweep", "--C", "3"],
     "--sweep searches --C over its own grid"),
    (["fit-head", "--cache", "{cache_file}", "--head", "dense", "--sweep", "--hidden", "64"],
     "--sweep searches --hidden over its own grid"),
])
def test_stage2_errors_are_one_line(args, fragment, tmp_path):
    path = write_cache(tmp_path / "c", n_images=60, dim=8)
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    args = [a.format(img=img, cache_file=path) for a in args]
    proc = run_cli(*args, "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]


def test_a_knn_sweep_on_fewer_training_images_than_its_largest_k_leaves_that_k_out(tmp_path):
    """The grid's k 50 needs 51 training rows; a sweep on fewer refused itself ('give a smaller --k',
    which --sweep then refuses) where a knn fit trims its own grid."""
    path = write_cache(tmp_path / "c", n_images=60, dim=8)
    proc = run_cli("fit-head", "--cache", str(path), "--head", "knn", "--sweep", "--jobs", "1",
                   "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "sweep (9 configs, best first)" in proc.stdout, proc.stdout  # k 5, 10, 20 x three temperatures


def test_head_that_does_not_match_the_cache_is_refused(tmp_path):
    a = write_cache(tmp_path / "c", n_images=90, dim=16, key="aaaa000000000001", name="a")
    write_cache(tmp_path / "c", n_images=90, dim=24, key="bbbb000000000002", name="b")
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--cache", str(a), "--head", "logistic", "--C", "1", "--cache-dir", cache)
    assert fit.returncode == 0, fit.stderr
    from pipeline.heads import load_head
    from pipeline.features.store import FeatureFile
    from pipeline.errors import UserError
    head = load_head(Path(cache) / "runs" / _run_id(fit.stdout))
    with FeatureFile(next((Path(cache) / "features").glob("b-*.h5"))) as other, pytest.raises(UserError):
        head.check_matches(other)


def test_class_names_in_messages_are_quoted_so_a_comma_in_one_reads_as_one():
    from pipeline.heads.base import short_names
    assert short_names(['daisy, "white"', "rose"]) == """2 classes: 'daisy, "white"', 'rose'"""
    assert short_names(list("abcdef")) == "6 classes: 'a', 'b', 'c', 'd', ..."


def test_every_dense_and_logistic_flag_reaches_the_head(tmp_path):
    path = write_cache(tmp_path / "c", n_images=120, dim=16, n_classes=2, feature_shape=(2, 2, 16))
    cache = str(tmp_path / "c")
    dense = run_cli("fit-head", "--cache", str(path), "--head", "dense", "--flatten", "flatten", "--hidden", "8",
                    "--hidden", "4", "--batchnorm", "--dropout", "0.1", "--l2", "0.001", "--optimizer", "nadam",
                    "--lr", "0.002", "--lr-schedule", "exponential", "--lr-start", "0.0005", "--lr-min", "0.0001",
                    "--lr-max", "0.002", "--rampup-epochs", "1", "--sustain-epochs", "1", "--exp-decay", "0.5",
                    "--epochs", "3", "--head-batch-size", "16", "--class-weight", "balanced", "--seed", "3",
                    "--no-augmented", "--cache-dir", cache)
    assert dense.returncode == 0, dense.stderr
    params = json.loads((Path(cache) / "runs" / _run_id(dense.stdout) / "config.json").read_text())["head_params"]
    assert params["hidden"] == [8, 4] and params["batchnorm"] and params["optimizer"] == "nadam"
    assert params["flatten"] == "flatten" and params["lr_schedule"] == "exponential" and params["exp_decay"] == 0.5
    assert params["batch_size"] == 16 and params["class_weight"] == "balanced" and params["seed"] == 3
    logistic = run_cli("fit-head", "--cache", str(path), "--head", "logistic", "--C", "0.5", "--class-weight", "balanced", "--jobs", "1",
                       "--flatten", "max", "--cache-dir", cache)
    assert logistic.returncode == 0, logistic.stderr
    params = json.loads((Path(cache) / "runs" / _run_id(logistic.stdout) / "config.json").read_text())["head_params"]
    assert params["C"] == 0.5 and params["flatten"] == "max" and params["n_jobs"] == 1


def test_fit_head_streams_the_logistic_head_over_the_memory_budget(tmp_path):
    path = write_cache(tmp_path / "c", n_images=4000, dim=128, n_classes=3, sep=0.8, chunk_images=500)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--cache", str(path), "--memory-budget", "1", "--cache-dir", cache)
    assert fit.returncode == 0, fit.stderr
    notes = [line for line in fit.stdout.splitlines() if "streamed from the cache" in line]
    assert len(notes) == 1 and notes[0].startswith("logistic head streamed from the cache (")
    assert "> budget 1 MB" in notes[0] and "val   accuracy" in fit.stdout
    run_dir = Path(cache) / "runs" / _run_id(fit.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["streamed"] is True and metrics["stream_note"] == notes[0] and metrics["val"]["accuracy"] > 0.6
    assert metrics["stream"]["passes"] >= 2 and "held-out subsample" in metrics["C_choice"]
    params = json.loads((run_dir / "config.json").read_text())["head_params"]
    assert params["memory_budget_mb"] == 1.0
    assert (run_dir / "c_curve.png").exists()
    from pipeline.heads import load_head
    head = load_head(run_dir)
    assert head.streamed_ and head.stream_note_ == notes[0]
    in_memory = run_cli("fit-head", "--cache", str(path), "--head", "logistic", "--C", "0.1", "--cache-dir", cache)
    assert in_memory.returncode == 0 and "streamed" not in in_memory.stdout
    bad = run_cli("fit-head", "--cache", str(path), "--memory-budget", "0", "--cache-dir", cache)
    assert bad.returncode == 2 and "--memory-budget" in bad.stderr


def test_default_head_is_auto_and_says_which_head_it_kept(tmp_path):
    path = write_cache(tmp_path / "c", n_images=240, dim=32, n_classes=3, sep=1.0)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--cache", str(path), "--cache-dir", cache)
    assert fit.returncode == 0, fit.stderr
    assert "head auto: fitting the logistic, the svm and the knn head" in fit.stderr
    line = next(l for l in fit.stdout.splitlines() if l.startswith("head auto: kept "))
    kept = line.split()[3]
    assert kept in ("svm", "logistic", "knn") and "CV log loss logistic " in line and ", svm " in line
    assert ", knn " in line
    run_dir = Path(cache) / "runs" / _run_id(fit.stdout)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["head"] == kept and cfg["head_choice"]["chosen"] == kept
    svm = run_cli("fit-head", "--cache", str(path), "--head", "svm", "--C", "3", "--cache-dir", cache)
    assert svm.returncode == 0 and "head auto" not in svm.stdout and "note:" not in svm.stderr, svm.stderr
    elsewhere = run_cli("fit-head", "--cache", str(path), "--head", "logistic", "--cache-dir", str(Path(cache) / "other"))
    assert elsewhere.returncode == 0 and f"lies in the cache {Path(path).parents[1]}: the run is recorded there, not " \
        f"in --cache-dir" in elsewhere.stderr and not (Path(cache) / "other").exists(), elsewhere.stderr
    svm_dir = Path(cache) / "runs" / _run_id(svm.stdout)
    assert json.loads((svm_dir / "metrics.json").read_text())["C"] == 3.0
    assert (svm_dir / "head.npz").exists() and (svm_dir / "c_curve.png").exists()
    runs = run_cli("runs", "--filter", "head=svm", "--cache-dir", cache)
    assert svm_dir.name in runs.stdout
    for args, words in [(["--C", "1"], "add --head svm or --head logistic"),
                        (["--sweep"], "--sweep searches one head's grid")]:
        bad = run_cli("fit-head", "--cache", str(path), *args, "--cache-dir", cache)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    sweep = run_cli("fit-head", "--cache", str(path), "--head", "svm", "--sweep", "--jobs", "2", "--cache-dir", cache)
    assert sweep.returncode == 0 and "6 configs" in sweep.stdout, sweep.stderr


def test_fit_head_ranks_several_backbones_by_cv_and_keeps_the_best(tmp_path):
    """`--backbone a,b`: each is extracted, the head is fitted and cross-validated on each training
    set, the ranking is printed and recorded, and the run is the head on the best; names and options
    that cannot apply to several backbones are refused before anything is extracted."""
    from pipeline.features.store import FeatureFile
    from pipeline.heads.logistic import LogisticHead
    from pipeline.heads.ranking import score_cache

    data = make_folder(tmp_path / "d", per_class=12)
    cache = tmp_path / "c"
    opts = ["--data", str(data), "--cache-dir", str(cache), "--weights", "none", "--image-size", "32",
            "--no-progress", "--dtype", "float32"]
    two = ["--backbone", "vgg16,mobilenetv2"]
    for extra, says in ((["--backbone", "vgg16,resnet9000"], "unknown backbone 'resnet9000'"),
                        ([*two, "--head", "logistic", "--sweep"], "rank the backbones first"),
                        ([*two, "--sweep"], "rank the backbones first"),  # not: add --head svm, then this
                        ([*two, "--layer", "block4_pool"], "names a layer of one backbone"),
                        ([*two, "--head", "dense"], "rank the backbones with the default head"),
                        ([*two, "--head", "logistic", "--C", "1.0"], "not cross-validated"),
                        (["--backbone", "vgg16,inceptionv3"], "too small for inceptionv3"),
                        (["--backbone", "vgg16,VGG16"], "twice"),
                        (["--backbone", "vgg16,,mobilenetv2"], "has an empty name")):
        bad = run_cli("fit-head", *opts, *extra)
        assert bad.returncode != 0 and says in bad.stderr and "Traceback" not in bad.stderr, (extra, bad.stderr)
        assert not list(cache.glob("features/*.h5"))

    fit = run_cli("fit-head", *opts, *two, "--head", "logistic")
    assert fit.returncode == 0, fit.stderr
    assert "backbones ranked by the head's cross-validated log loss" in fit.stdout
    kept = fit.stdout.split("backbone ranking: kept ")[1].split()[0]
    cfg = json.loads((cache / "runs" / _run_id(fit.stdout) / "config.json").read_text())
    ranking = cfg["backbone_ranking"]
    assert ranking[0]["backbone"] == kept == cfg["backbone"] and ranking[0]["cache_key"] == cfg["cache_key"]
    assert sorted(r["backbone"] for r in ranking) == ["mobilenetv2", "vgg16"]
    assert ranking[0]["cv_log_loss"] <= ranking[1]["cv_log_loss"]
    files = sorted(cache.glob("features/*.h5"))
    assert len(files) == 2
    for path in files:  # the recorded scores are the head's on that backbone's training rows
        with FeatureFile(path) as ff:
            (r,) = [r for r in ranking if r["cache_key"] == ff.key]
            again = score_cache(ff, r["backbone"], LogisticHead).as_json()
        assert again["cv_log_loss"] == r["cv_log_loss"] and again["train_rows"] == r["train_rows"] == 24
