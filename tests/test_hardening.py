"""Hardening (issue 9): nothing deleted or run that should not be, and bad input never gives a traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_folder, run_cli
from pipeline.errors import UserError
from helpers_features import write_cache

FAST = ["--backbone", "mobilenetv2", "--image-size", "32", "--weights", "none", "--dtype", "float32", "--no-progress"]


def _one_line_error(proc: subprocess.CompletedProcess, fragment: str, code: int = 2) -> str:
    """The command failed with exit `code` and one `error:` line containing `fragment`, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    return errors[0]


def _no_tty_cli(*args: str) -> subprocess.CompletedProcess:
    """run_cli with stdin closed (not a terminal), as in a script or CI job."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------- 1. cache rm, runs rm
@pytest.fixture
def three_entries(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    for name, key in (("a", "4aaa000000000017"), ("b", "4bbb000000000027"), ("c", "5ccc000000000037")):
        write_cache(cache, n_images=12, dim=4, key=key, name=name)
    return cache


def test_cache_rm_never_removes_paths_empty_refs_or_name_endings(three_entries, tmp_path):
    cache = str(three_entries)
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("mine")
    before, entries = _snapshot(tmp_path), sorted(p.name for p in (three_entries / "features").iterdir())
    _one_line_error(run_cli("cache", "rm", str(outside), "--cache-dir", cache), "never other paths")
    _one_line_error(run_cli("cache", "rm", "", "--cache-dir", cache, cwd=outside), "empty")
    _one_line_error(run_cli("cache", "rm", "7", "--cache-dir", cache), "no cache entry matches '7'")
    err = _one_line_error(run_cli("cache", "rm", "4", "--cache-dir", cache), "matches 2 cache entries")
    assert "a-4aaa000000000017.h5" in err and "b-4bbb000000000027.h5" in err and "nothing removed" in err
    assert _snapshot(tmp_path) == before
    rm = run_cli("cache", "rm", "4a", "5ccc000000000037", "--cache-dir", cache)
    assert rm.returncode == 0, rm.stderr
    assert sorted(p.name for p in (three_entries / "features").iterdir()) == [entries[1]]
    assert (outside / "sub" / "keep.txt").read_text() == "mine"


def test_cache_rm_by_path_only_inside_the_cache(three_entries):
    target = next((three_entries / "features").glob("c-*.h5"))
    rm = run_cli("cache", "rm", str(target), "--cache-dir", str(three_entries))
    assert rm.returncode == 0 and not target.exists(), rm.stderr


def test_cache_rm_eviction_dry_run_and_confirmation(three_entries):
    cache = str(three_entries)
    old = next((three_entries / "features").glob("a-*.h5"))
    os.utime(old, (1_000_000_000, 1_000_000_000))  # 2001
    names = lambda: sorted(p.name for p in (three_entries / "features").iterdir())  # noqa: E731
    before = names()
    dry = run_cli("cache", "rm", "--older-than", "7d", "--dry-run", "--cache-dir", cache)
    assert dry.returncode == 0 and "would remove" in dry.stdout and old.name in dry.stdout, dry.stderr
    assert "b-4bbb" not in dry.stdout and names() == before
    big = run_cli("cache", "rm", "--larger-than", "1GB", "--dry-run", "--cache-dir", cache)
    assert big.returncode == 0 and "nothing to remove" in big.stdout
    _one_line_error(run_cli("cache", "rm", "--older-than", "soon", "--cache-dir", cache), "--older-than")
    _one_line_error(run_cli("cache", "rm", "--larger-than", "5XB", "--cache-dir", cache), "--larger-than")
    refused = _no_tty_cli("cache", "rm", "--all", "--cache-dir", cache)
    _one_line_error(refused, "--yes")
    assert refused.stdout.count("to remove") == 3 and names() == before
    gone = run_cli("cache", "rm", "--older-than", "7d", "--yes", "--cache-dir", cache)
    assert gone.returncode == 0 and names() == before[1:], gone.stderr
    everything = run_cli("cache", "rm", "--all", "--yes", "--cache-dir", cache)
    assert everything.returncode == 0 and names() == [], everything.stderr


def test_cache_commands_survive_a_dangling_link_skip_a_busy_entry_and_name_a_missing_folder(three_entries, tmp_path):
    """A link to a moved store broke cache ls/rm with a FileNotFoundError; --all refused everything when one
    entry was being written (its dry run had listed it); a mistyped --cache-dir read as an empty cache."""
    import fcntl

    cache, features = str(three_entries), three_entries / "features"
    link = features / "d-9ddd000000000047.h5"
    link.symlink_to(tmp_path / "moved" / "d.h5")
    listed = run_cli("cache", "ls", "--cache-dir", cache)
    assert listed.returncode == 0 and "a symbolic link that leads nowhere" in listed.stdout, listed.stderr
    busy = next(features.glob("b-*.h5"))
    with open(busy.with_suffix(".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # an extraction of b's key is running
        dry = run_cli("cache", "rm", "--all", "--dry-run", "--cache-dir", cache)
        assert dry.returncode == 0 and f"would skip {busy}: an extraction is writing it now" in dry.stdout, dry.stdout
        assert "would remove" in dry.stdout and f"would remove {busy}" not in dry.stdout
        gone = run_cli("cache", "rm", "--all", "--yes", "--cache-dir", cache)
        assert gone.returncode == 0 and f"skipping {busy}" in gone.stdout, gone.stderr
        assert sorted(p.name for p in features.iterdir() if p.suffix == ".h5") == [busy.name]
        assert not link.is_symlink()
        _one_line_error(run_cli("cache", "rm", "4bbb", "--cache-dir", cache), "is writing")  # named: refused
    missing = run_cli("cache", "ls", "--cache-dir", str(tmp_path / "typo"))
    assert missing.returncode == 0 and "(no such folder)" in missing.stdout
    assert "(no such folder)" in run_cli("runs", "--cache-dir", str(tmp_path / "typo")).stdout
    (tmp_path / "afile").write_text("x")
    _one_line_error(run_cli("cache", "ls", "--cache-dir", str(tmp_path / "afile")), "is a file")


def _fake_run(cache: Path, run_id: str, status: str = "ok", pid: int | None = None) -> Path:
    folder = cache / "runs" / run_id
    folder.mkdir(parents=True)
    info = {"stage": "fit-head", "status": status, "started": run_id, "pid": pid, "host": socket.gethostname()}
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "config.json").write_text("{}")
    return folder


def test_runs_rm_by_id_or_unique_prefix_only_inside_runs(tmp_path):
    cache = tmp_path / "cache"
    a = _fake_run(cache, "20260101-000000-aaaa")
    b = _fake_run(cache, "20260101-000000-aaab")
    c = _fake_run(cache, "20260102-000000-cccc")
    live = _fake_run(cache, "20260103-000000-dddd", status="running", pid=os.getpid())
    outside = tmp_path / "20260101-000000-aaaa"
    outside.mkdir()
    _one_line_error(run_cli("runs", "rm", "", "--cache-dir", str(cache)), "empty")
    err = _one_line_error(run_cli("runs", "rm", "20260101", "--cache-dir", str(cache)), "matches 2 runs")
    assert a.name in err and b.name in err
    _one_line_error(run_cli("runs", "rm", "../../20260101-000000-aaaa", "--cache-dir", str(cache)), "no run")
    _one_line_error(run_cli("runs", "rm", "20260103", "--cache-dir", str(cache)), "still running")
    assert a.exists() and b.exists() and c.exists() and live.exists() and outside.exists()
    ok = run_cli("runs", "rm", "20260102", a.name, "--cache-dir", str(cache))
    assert ok.returncode == 0 and not c.exists() and not a.exists() and b.exists(), ok.stderr
    forced = run_cli("runs", "rm", "20260103", "--force", "--cache-dir", str(cache))
    assert forced.returncode == 0 and not live.exists() and outside.exists()


# ------------------------------------------------------------------------------------ 7. --debug
_BOOM = ("import sys, click; from pipeline.cli import cli\n"
         "@cli.command('boom')\n"
         "def boom():\n"
         "    raise RuntimeError('kaput\\n second line')\n"
         "cli(sys.argv[1:], prog_name='cli.py')\n")


@pytest.mark.parametrize("debug", ["", "flag", "env"])
def test_unexpected_errors_are_one_line_unless_debug(debug):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("FEATURECACHE_DEBUG", None)
    args = ["--debug", "boom"] if debug == "flag" else ["boom"]
    if debug == "env":
        env["FEATURECACHE_DEBUG"] = "1"
    proc = subprocess.run([sys.executable, "-c", _BOOM, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1
    if debug:
        assert "Traceback" in proc.stderr and "error: RuntimeError: kaput second line" in proc.stderr
    else:
        assert proc.stderr.strip() == ("error: RuntimeError: kaput second line (python cli.py --debug ... or "
                                       "FEATURECACHE_DEBUG=1 shows the traceback)")


@pytest.mark.parametrize("args, fragment", [
    (["extract", "--pooling", "foo"], "Invalid value for '--pooling'"),
    (["extrac"], "No such command 'extrac'"),
    (["fit-head", "--head", "dense", "--dropout", "2"], "Invalid value for '--dropout'"),
    (["runs", "--stage", "nope"], "Invalid value for '--stage'"),
    (["fit-head", "--head", "dense", "--l2", "nan"], "'nan' is not a finite number"),   # nan passes a range check
    (["fit-head", "--seed", "-1"], "Invalid value for '--seed'"),
    (["finetune", "--run", "x", "--lr", "inf"], "'inf' is not a finite number"),
])
def test_usage_errors_are_one_line(args, fragment):
    line = _one_line_error(_no_tty_cli(*args), fragment)
    assert "-h')" in line  # says where the help is


@pytest.mark.parametrize("args, fragment", [
    (["--C", "abc"], "--C must be 'auto' or a positive number"),
    (["--head", "logistic", "--C", "nan"], "--C must be positive"),  # NaN passed the CLI's own parser once
    (["--head", "dense", "--optimizer", "adam", "--lr-schedule", "exponential", "--exp-decay", "-1"], "decay"),
    # options that would be ignored: refused, not recorded as if they applied
    (["--head", "dense", "--hidden", "0", "--dropout", "0.5", "--batchnorm"],
     "--dropout and --batchnorm act on hidden layers, and --hidden 0 has none"),
    (["--head", "dense", "--hidden", "64", "--hidden", "0"], "--hidden 0 means no hidden layer, so it cannot go"),
])
def test_fit_head_checks_its_options_before_extracting(tmp_path, args, fragment):
    data = make_folder(tmp_path / "data", per_class=2)
    cache = tmp_path / "cache"
    _one_line_error(_no_tty_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *FAST, *args), fragment)
    assert not list(cache.rglob("*.h5")), "extracted before rejecting the head's options"


# ----------------------------------------------------------------------- 2. heads load without code
class _Evil:
    """Unpickling this creates a file: stands in for code a crafted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _run_id(stdout: str) -> str:
    line = next(l for l in stdout.splitlines() if " run " in l and "saved in" in l)
    return line.split(" run ")[1].split()[0]


def test_logistic_head_is_npz_json_and_old_pickles_need_trust_pickle(tmp_path):
    import joblib

    from pipeline.heads import load_head

    data = make_folder(tmp_path / "d", per_class=4)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    run_dir = Path(cache) / "runs" / _run_id(fit.stdout)
    assert (run_dir / "head.npz").exists() and (run_dir / "head.json").exists()
    assert not list(run_dir.glob("*.joblib")) and not list(run_dir.glob("*.pkl"))
    with np.load(run_dir / "head.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    image = str(next((data / "val" / "ants").glob("*.jpg")))
    pred = run_cli("predict", "--run", run_dir.name, image, "--cache-dir", cache)
    assert pred.returncode == 0 and ("ants" in pred.stdout or "bees" in pred.stdout), pred.stderr

    head = load_head(run_dir)                                  # an old version's head.joblib of the same head
    old = {"format": "featurecache-logistic-head", "version": 1, **head.metadata(), "pipeline": head.pipeline_,
           "C_": head.C_, "cv_scores": {}, "C_note": "given", "converged": True}
    for name in ("head.npz", "head.json"):
        (run_dir / name).unlink()
    joblib.dump(old, run_dir / "head.joblib")
    for cmd in (["predict", "--run", run_dir.name, image], ["evaluate", "--run", run_dir.name, "--data", str(data)]):
        err = _one_line_error(run_cli(*cmd, "--cache-dir", cache), "--trust-pickle")
        assert "older version" in err and "can run code" in err
    trusted = run_cli("predict", "--run", run_dir.name, image, "--trust-pickle", "--cache-dir", cache)
    assert trusted.returncode == 0 and trusted.stdout == pred.stdout, trusted.stderr

    marker = tmp_path / "pwned"
    joblib.dump({"format": "featurecache-logistic-head", "x": _Evil(marker)}, run_dir / "head.joblib")
    for cmd in (["predict", "--run", run_dir.name, image], ["evaluate", "--run", run_dir.name, "--data", str(data)],
                ["finetune", "--run", run_dir.name, "--epochs", "1"]):
        _one_line_error(run_cli(*cmd, "--cache-dir", cache), "--trust-pickle")
        assert not marker.exists()


def test_dense_head_corrupt_or_unsafe_keras_file_is_one_line(tmp_path):
    path = write_cache(tmp_path / "c", n_images=60, dim=8, n_classes=2)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--cache", str(path), "--head", "dense", "--hidden", "4", "--epochs", "1",
                  "--cache-dir", cache)
    assert fit.returncode == 0, fit.stderr
    run_dir = Path(cache) / "runs" / _run_id(fit.stdout)
    model = run_dir / "head.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    _one_line_error(run_cli("predict", "--run", run_dir.name, str(path), "--cache-dir", cache), "truncated")
    (run_dir / "head.json").write_text("{not json")
    _one_line_error(run_cli("predict", "--run", run_dir.name, str(path), "--cache-dir", cache), "head.json")


def test_head_files_load_without_pickle_or_unsafe_code(tmp_path):
    import keras

    from pipeline.errors import UserError
    from pipeline.heads import LogisticHead, load_keras_file

    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    y = np.arange(40) % 2
    head = LogisticHead(C=1.0).fit(x, y, class_names=["a", "b"])
    head.save(tmp_path / "head.npz")
    np.testing.assert_allclose(LogisticHead.load(tmp_path / "head.npz").predict_proba(x), head.predict_proba(x))
    with pytest.raises(UserError, match=r"\.npz"):
        head.save(tmp_path / "head.joblib")
    import pickle
    (tmp_path / "head.npz").write_bytes(pickle.dumps({"a": 1}))      # a pickle under the new name is not unpickled
    with pytest.raises(UserError, match="not a readable head file"):
        LogisticHead.load(tmp_path / "head.npz")
    inp = keras.Input((3,))
    lam = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp))
    lam.save(tmp_path / "lambda.keras")
    with pytest.raises(UserError, match="not loaded for safety"):
        load_keras_file(tmp_path / "lambda.keras")


# ------------------------------------------------------------------------------------ 3. CSV manifests
def _manifest(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def imgs(tmp_path: Path) -> Path:
    """tmp/m/d/{train,val}/{ants,bees}/img_00k.jpg; manifests go in tmp/m."""
    make_folder(tmp_path / "m" / "d", per_class=3)
    return tmp_path / "m"


A0, A1, B0, B1 = "d/train/ants/img_000.jpg", "d/train/ants/img_001.jpg", "d/train/bees/img_000.jpg", "d/train/bees/img_001.jpg"


@pytest.mark.parametrize("name, text, fragment", [
    ("latin.csv", f"{A0},fourmi\xe9\n{B0},bees\n".encode("latin-1"), "not UTF-8"),
    ("unknown.csv", f"filepath,klass\n{A0},ants\n{B0},bees\n", "accepted names are path column: path/filename"),
    ("empty.csv", f"{A0},ants\n{B0}, \n{B1},\n", "empty label on line(s) 2, 3"),
    ("conflict.csv", f"{A0},ants,train\n{B0},bees,train\n./{A0},bees,val\n", "lines 1 and 3"),
    ("outside.csv", f"../x.jpg,ants\n{B0},bees\n", "--allow-outside-paths"),
    ("swapped.csv", f"ants,{A0}\nbees,{B0}\n", "columns look swapped"),
    ("valonly.csv", f"{A0},ants,train\n{B0},bees,train\n{B1},bess,val\n", "class 'bess' has val images"),
    ("binary.csv", b"\x00\x01\x02garbage\xff", "not a text manifest"),
    ("dev.csv", f"{A0},ants,train\n{B0},bees,dev\n", "not 'dev' (--split-names renames split folders only"),
])
def test_bad_manifests_are_refused_in_one_line(imgs, tmp_path, name, text, fragment):
    manifest = _manifest(imgs, name, text)
    proc = run_cli("extract", "--data", str(manifest), "--cache-dir", str(tmp_path / "c"), *FAST)
    err = _one_line_error(proc, fragment)
    if name == "valonly.csv":
        assert "line(s) 3" in err


def test_swapped_columns_are_named_before_the_rows_look_like_duplicates(imgs):
    """label,path with a class repeated: the 'path' ants appears twice with different 'labels', which
    was reported as a conflict instead of the swap."""
    from pipeline.data.sources import open_source

    manifest = _manifest(imgs, "swapped2.csv", f"ants,{A0}\nants,{A1}\nbees,{B0}\nbees,{B1}\n")
    with pytest.raises(UserError, match="columns look swapped"):
        open_source(str(manifest)).listing()


def test_manifest_headers_delimiters_bom_and_labels(imgs):
    from pipeline.data.sources import open_source

    cases = {
        "bom.csv": f"\ufeffpath,label\n{A0},ants\n{B0},bees\n",
        "named.csv": f"filename,class\n{A0},ants\n{B0},bees\n",
        "reordered.csv": f"split,category,image\ntrain,ants,{A0}\ntrain,bees,{B0}\ntest,ants,{A1}\n",
        "tabs.tsv": f"path\tlabel\n{A0}\tants\n{B0}\tbees\n",
        "semicolons.csv": f"{A0};ants\n{B0};bees\n",
        "spaces.csv": f"{A0}, ants \n{B0},bees\t\n",
    }
    for name, text in cases.items():
        listing = open_source(str(_manifest(imgs, name, text))).listing()
        assert listing.class_names == ["ants", "bees"], name
        assert [Path(p).name for p in listing.paths][:2] == ["img_000.jpg", "img_000.jpg"], name
        assert listing.labels.tolist()[:2] == [0, 1], name
    assert open_source(str(imgs / "reordered.csv")).listing().splits == ["train", "train", "test"]
    with pytest.warns(UserWarning, match="duplicate"):
        dup = open_source(str(_manifest(imgs, "dup.csv", f"{A0},ants\n{A0},ants\n{B0},bees\n"))).listing()
    assert len(dup) == 2
    with pytest.warns(UserWarning, match="'ANTS' and 'ants'"):
        open_source(str(_manifest(imgs, "case.csv", f"{A0},ANTS\n{A1},ants\n{B0},bees\n"))).listing()


def test_manifest_warnings_single_image_and_outside_flag_through_the_cli(imgs, tmp_path):
    cache = str(tmp_path / "c")
    text = f"path,label\n{A0},ants\n{A0},ants\n{A1},ANTS\n{B0},bees\n{B1},bees\n"
    proc = run_cli("extract", "--data", str(_manifest(imgs, "m.csv", text)), "--cache-dir", cache, *FAST)
    assert proc.returncode == 0, proc.stderr
    warned = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert any("duplicate" in l for l in warned) and any("'ANTS' and 'ants'" in l for l in warned), proc.stderr
    _one_line_error(run_cli("extract", "--data", str(imgs / A0), "--cache-dir", cache, *FAST), "single image")
    sub = imgs / "sub"
    sub.mkdir()
    outside = _manifest(sub, "o.csv", f"../{A0},ants\n../{B0},bees\n../{A1},ants\n../{B1},bees\n")
    _one_line_error(run_cli("extract", "--data", str(outside), "--cache-dir", cache, *FAST), "outside")
    ok = run_cli("extract", "--data", str(outside), "--allow-outside-paths", "--cache-dir", cache, *FAST)
    assert ok.returncode == 0, ok.stderr


# ------------------------------------------------------------------- 4. hidden folders, realpath keys
def test_hidden_and_tool_files_are_skipped_at_every_depth_and_paths_are_resolved(tmp_path):
    from pipeline.data.folders import is_hidden

    root = make_folder(tmp_path / "data" / "clean", per_class=3)
    junk = [root / "train" / "ants" / ".ipynb_checkpoints" / "x.jpg", root / "train" / "ants" / "@eaDir" / "y.jpg",
            root / "train" / "bees" / "__MACOSX" / "deep" / "z.jpg", root / "val" / "bees" / ".hidden.jpg",
            root / ".trash" / "ants" / "w.jpg"]
    for j in junk:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_bytes((root / "train" / "ants" / "img_000.jpg").read_bytes())
    (root / "train" / "ants" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "train" / "bees" / ".DS_Store").write_bytes(b"\0" * 10)
    assert is_hidden("ants/.ipynb_checkpoints/x.jpg") and is_hidden("@eaDir/a.jpg") and not is_hidden("ants/a.jpg")
    cache = str(tmp_path / "c")
    first = run_cli("extract", "--data", str(root), "--cache-dir", cache, *FAST)
    assert first.returncode == 0 and "skipped" not in first.stderr, first.stderr
    info = run_cli("cache", "info", next((Path(cache) / "features").glob("*.h5")).stem.rsplit("-", 1)[1],
                   "--cache-dir", cache)
    assert "train: 6 images (ants=3, bees=3)" in info.stdout and "val: 6 images" in info.stdout, info.stdout
    respelt = run_cli("extract", "--data", "./data/../data/clean/", "--cache-dir", cache, *FAST, cwd=tmp_path)
    assert respelt.returncode == 0 and "cache hit" in respelt.stdout, respelt.stderr


# ------------------------------------------------------------------------------------------ 5. classes
def test_class_only_in_val_is_named_with_its_folder(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    (root / "val" / "bess").mkdir()
    (root / "val" / "bess" / "a.jpg").write_bytes((root / "val" / "bees" / "img_000.jpg").read_bytes())
    err = _one_line_error(run_cli("extract", "--data", str(root), "--cache-dir", str(tmp_path / "c"), *FAST), "'bess'")
    assert str(root / "val" / "bess") in err


def test_evaluate_checks_classes_first_and_accepts_a_subset(tmp_path):
    data = make_folder(tmp_path / "d", per_class=4, classes=("ants", "bees", "wasps"))
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *FAST, "--head", "logistic", "--C", "1.0")
    assert fit.returncode == 0, fit.stderr
    run_id = _run_id(fit.stdout)
    subset = make_folder(tmp_path / "s", per_class=3, classes=("ants", "wasps"), seed=5)
    ev = run_cli("evaluate", "--run", run_id, "--data", str(subset), "--cache-dir", str(cache))
    assert ev.returncode == 0 and "(n=12)" in ev.stdout, ev.stderr
    assert "training images" not in ev.stderr  # other images: no warning
    own = run_cli("evaluate", "--run", run_id, "--data", str(data), "--cache-dir", str(cache))  # --split all
    assert own.returncode == 0 and "12 of the 24 images scored are run" in own.stderr, own.stderr
    assert "their figures are not held out; give --split val or --split test" in own.stderr  # a val folder: offered
    val = run_cli("evaluate", "--run", run_id, "--data", str(data), "--split", "val", "--cache-dir", str(cache))
    assert val.returncode == 0 and "training images" not in val.stderr, val.stderr
    named = make_folder(tmp_path / "n", per_class=2, classes=("ants", "bees"), splits=("train", "validation"))
    advice = run_cli("evaluate", "--run", run_id, "--data", str(named), "--cache-dir", str(cache))
    assert advice.returncode == 2 and "pass --split-names train,validation,test" in advice.stderr, advice.stderr
    taken = run_cli("evaluate", "--run", run_id, "--data", str(named), "--split", "val", "--split-names",
                    "train,validation,test", "--cache-dir", str(cache))  # the advice works: evaluate takes it
    assert taken.returncode == 0 and "(n=4)" in taken.stdout, taken.stderr
    flat = make_folder(tmp_path / "f", per_class=5, classes=("ants", "bees"), splits=(), seed=8)
    drawn = run_cli("evaluate", "--run", run_id, "--data", str(flat), "--split", "val", "--cache-dir", str(cache))
    assert drawn.returncode == 0 and "has no split folders, so --split val scores the" in drawn.stderr, drawn.stderr
    listed = tmp_path / "lists" / "val.csv"  # the run's val images in a manifest without splits: its rows are reused
    listed.parent.mkdir()
    listed.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted((data / "val").rglob("*.jpg"))))
    outside = run_cli("evaluate", "--run", run_id, "--data", str(listed), "--cache-dir", str(cache))
    assert outside.returncode == 2 and "--allow-outside-paths" in outside.stderr, outside.stderr  # names it: taken
    ev = run_cli("evaluate", "--run", run_id, "--data", str(listed), "--allow-outside-paths", "--cache-dir", str(cache))
    assert ev.returncode == 0 and "another split than" not in ev.stderr, ev.stderr  # not a fit: no split talk
    _one_line_error(run_cli("evaluate", "--run", run_id, "--data", str(named), "--split-names", "train,validation",
                            "--cache-dir", str(cache)), "--split-names takes three distinct folder names")
    (subset / "val" / "ants" / "zero.jpg").write_bytes(b"")  # not scored: said, on a fresh extraction and a hit
    for _ in range(2):
        ev = run_cli("evaluate", "--run", run_id, "--data", str(subset), "--split", "val", "--cache-dir", str(cache))
        assert ev.returncode == 0 and "(n=6)" in ev.stdout and "skipped 1 file(s) that could not be used as images: " \
            in ev.stderr and "zero.jpg" in ev.stderr, ev.stderr
    other = make_folder(tmp_path / "o", per_class=3, classes=("ants", "moths"), seed=6)
    before = sorted((cache / "features").iterdir())
    err = _one_line_error(run_cli("evaluate", "--run", run_id, "--data", str(other), "--cache-dir", str(cache)),
                          "'moths'")
    assert "never trained on" in err and sorted((cache / "features").iterdir()) == before
    cased = make_folder(tmp_path / "k", per_class=2, classes=("Ants", "bees"), seed=7)
    err = _one_line_error(run_cli("evaluate", "--run", run_id, "--data", str(cased), "--cache-dir", str(cache)),
                          "'Ants'")
    assert "differ from the run's only in upper and lower case ('Ants' and 'ants')" in err


# --------------------------------------------------------------------------- 6. fit-head guards
def test_flatten_on_a_cache_of_pooled_vectors_is_refused_not_recorded(tmp_path):
    """--flatten only reduces feature maps; on pooled vectors it changed nothing but the run said flatten=max."""
    path = write_cache(tmp_path / "c", n_images=40, dim=8, n_classes=2)
    got = run_cli("fit-head", "--cache", str(path), "--head", "logistic", "--C", "1", "--flatten", "max")
    _one_line_error(got, "--flatten turns feature maps into vectors, but")
    assert "leave --flatten out" in got.stderr and not list((tmp_path / "c").glob("runs/*/run.json"))
    maps = write_cache(tmp_path / "m", n_images=40, dim=8, n_classes=2, feature_shape=(2, 2, 8))
    ok = run_cli("fit-head", "--cache", str(maps), "--head", "logistic", "--C", "1", "--flatten", "max")
    assert ok.returncode == 0, ok.stderr


def test_fit_head_empty_cache_ref_and_non_finite_features(tmp_path):
    import h5py

    cache = tmp_path / "c"
    path = write_cache(cache, n_images=40, dim=4, n_classes=2)
    _one_line_error(run_cli("fit-head", "--cache", "", "--cache-dir", str(cache)), "--cache is empty")
    assert sorted(p.name for p in (cache / "features").iterdir()) == [path.name]  # nothing extracted
    with h5py.File(path, "r+") as f:
        f["features"][3] = np.nan
    err = _one_line_error(run_cli("fit-head", "--cache", str(path), "--head", "logistic", "--C", "1", "--cache-dir", str(cache)),
                          "non-finite features")
    assert "--dtype float32" in err and f"cache rm {path.name} --cache-dir {cache.resolve()}`" in err  # its own cache


# --------------------------------------------------------------------- 8. property: junk never hurts
def _random_manifest(rng: np.random.Generator, real: list[str], sep: str) -> bytes:
    """Random manifest text: mostly path,label[,split] rows (real or odd paths, odd labels), some junk."""
    pieces = ["path", "label", "split", "filename", "class", "train", "val", "test", "ants", "ANTS", " bees ", "",
              "..", "../..", "/", "~", "~nobody", '"', "'", "\\", "é", "\ufeff", "\x00", ",", ";", "\t", "|", "\r",
              "x.jpg", "/etc/passwd", "*", "a" * 300, *real]
    tidy = rng.random() < 0.4  # some nearly valid manifests, so extraction itself runs too
    lines = [sep.join(["path", "label", "split"][:int(rng.integers(2, 4))])] if rng.random() < 0.3 else []
    unused = [str(p) for p in rng.permutation(real)]
    for _ in range(int(rng.integers(0, 8))):
        if tidy and not unused:
            break
        if tidy or rng.random() < 0.85:
            path = unused.pop() if tidy else str(rng.choice(real)) if rng.random() < 0.7 else str(rng.choice(pieces))
            labels = ["ants", "bees", " bees ", "ANTS"] if tidy else ["ants", "bees", "ANTS", " bees ", "", "é", "label"]
            cells = [path, str(rng.choice(labels))]
            if not tidy and rng.random() < 0.5:
                cells.append(str(rng.choice(["train", "val", "test", "", "holdout"])))
        else:
            cells = [str(rng.choice(pieces)) + str(rng.choice(pieces)) * int(rng.integers(0, 2))
                     for _ in range(int(rng.integers(1, 5)))]
        lines.append(sep.join(cells))
    text = "\n".join(lines)
    encodings = ["utf-8", "utf-8-sig"] if tidy else ["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]
    return text.encode(str(rng.choice(encodings)), errors="replace")


def test_property_junk_input_gives_exit_0_or_2_and_removes_nothing_outside(tmp_path):
    import io

    from PIL import Image

    rng = np.random.default_rng(9)
    data = make_folder(tmp_path / "data", per_class=2, splits=())
    sibling = tmp_path / "sibling"
    (sibling / "inner").mkdir(parents=True)
    for i in range(3):
        (sibling / "inner" / f"keep{i}.txt").write_text(str(i))
    cache = tmp_path / "cache"
    for fmt in ("JPEG", "PNG"):                                  # truncated prefixes of real images
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, fmt)
        blob = buf.getvalue()
        for cut in rng.integers(0, len(blob), 3):
            (data / "ants" / f"cut{cut}.{fmt.lower()}").write_bytes(blob[:cut])
    for i in range(3):                                           # random bytes named as images or not
        (data / "bees" / f"rand{i}.{['jpg', 'png', 'bin'][i]}").write_bytes(rng.bytes(int(rng.integers(0, 400))))
    real = [str(p.relative_to(tmp_path)) for p in sorted(data.rglob("*.*"))]
    inputs = [str(data)]
    for i in range(6):
        ext, sep = ("tsv", "\t") if i % 3 == 2 else ("csv", str(rng.choice([",", ";"])))
        inputs.append(str(_manifest(tmp_path, f"m{i}.{ext}", _random_manifest(rng, real, sep))))
    random_file = tmp_path / "junk.bin"
    random_file.write_bytes(rng.bytes(300))
    inputs.append(str(random_file))
    outside_cache = lambda: {p for p in _snapshot(tmp_path) if not p.startswith("cache")}  # noqa: E731
    for data_arg in inputs:
        before = outside_cache()
        proc = run_cli("extract", "--data", data_arg, "--cache-dir", str(cache), *FAST, cwd=sibling,
                       isolated=True)  # a crash or traceback at exit counts too: only a process shows it
        assert proc.returncode in (0, 2), (data_arg, proc.stderr)
        assert "Traceback" not in proc.stderr, (data_arg, proc.stderr)
        if proc.returncode == 2:
            assert sum(l.startswith("error:") for l in proc.stderr.splitlines()) == 1, proc.stderr
        assert before <= outside_cache(), data_arg
        assert sorted(p.name for p in (sibling / "inner").iterdir()) == ["keep0.txt", "keep1.txt", "keep2.txt"]


def test_predict_refuses_an_empty_image_argument_and_a_folder_for_csv(tmp_path):
    empty = _no_tty_cli("predict", "--backbone", "mobilenetv2", "--weights", "none", "")
    _one_line_error(empty, "an image argument is empty")
    image = make_folder(tmp_path / "d", per_class=1) / "train" / "ants" / "img_000.jpg"
    folder_csv = _no_tty_cli("predict", "--run", "nosuch", str(image), "--csv", str(tmp_path))
    _one_line_error(folder_csv, "is a folder; give a file name")  # before the run is even looked up
    if Path("/proc/self").is_dir():  # a folder no one can write in, root included: said before the work
        _one_line_error(_no_tty_cli("predict", "--run", "nosuch", str(image), "--csv", "/proc/x.csv"),
                        "--csv /proc/x.csv: cannot write in /proc (")
    under_file = _no_tty_cli("runs", "compare", "a", "b", "--out", str(image / "x.png"))
    _one_line_error(under_file, "is a file, not a folder")
    # an image being predicted (or any file but a CSV) is not replaced by the CSV; nor an image by the plot
    before = image.read_bytes()
    over_image = run_cli("predict", "--run", "nosuch", str(image), "--csv", str(image))
    _one_line_error(over_image, "exists and is not a .csv file, so writing would replace it")
    _one_line_error(run_cli("runs", "compare", "a", "b", "--out", str(image)), "exists and is not a .png file")
    _one_line_error(run_cli("predict", "--run", "nosuch", str(image), "--csv", "-"), "would write a file named '-'")
    # options the chosen mode does not read: refused, not ignored
    _one_line_error(run_cli("predict", "--backbone", "mobilenetv2", str(image), "--trust-model", "--csv",
                            str(tmp_path / "p.csv")), "--trust-model does nothing with --backbone; leave it out")
    _one_line_error(run_cli("predict", "--run", "nosuch", str(image), "--weights", "w.h5", "--trust-model"),
                    "--weights, --trust-model do nothing with --run; leave them out")
    assert not (tmp_path / "p.csv").exists()
    _one_line_error(run_cli("predict", "--backbone", "efficientnet_lite0+efficientnet_lite2", str(image)),
                    "predict --backbone takes one backbone")
    _one_line_error(run_cli("predict", "--run", "nosuch", "/dev/null"), "/dev/null is not a regular file")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    _one_line_error(run_cli("predict", "--run", "nosuch", str(tmp_path / "gone.jpg")), "a symbolic link that leads nowhere")
    assert image.read_bytes() == before


def test_output_of_a_closed_pipe_is_no_error(tmp_path):
    """`cli.py backbones | head -1`: the reader leaves early; no `error: BrokenPipeError` line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run(f"'{sys.executable}' '{ROOT / 'cli.py'}' backbones --layers efficientnet_lite0 | true",
                          shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_extract_of_nothing_readable_names_an_example_and_its_reason(tmp_path):
    for cls in ("ants", "bees"):
        folder = tmp_path / "d" / "train" / cls
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_text("not a picture")
    proc = _no_tty_cli("extract", "--data", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"), *FAST)
    line = _one_line_error(proc, "no image could be read (2 listed)")
    assert "a.jpg: " in line, line  # the reason, since nothing else was printed
    assert "dtype" not in line and "weights" not in line, line  # the data is what to fix, not the backbone
    manifest = tmp_path / "win.csv"  # a manifest written on Windows
    manifest.write_text("path,label\nimg\\a0.jpg,ants\nimg\\b0.jpg,bees\n")
    proc = _no_tty_cli("extract", "--data", str(manifest), "--cache-dir", str(tmp_path / "c"), *FAST)
    assert "write it with /" in _one_line_error(proc, "no image could be read (2 listed)")


def test_fit_head_refuses_one_class_before_extracting(tmp_path):
    data = make_folder(tmp_path / "d", per_class=3, classes=("ants",))
    cache = tmp_path / "c"
    _one_line_error(_no_tty_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *FAST),
                    "needs at least two classes with training images")
    assert not list(cache.rglob("*.h5")), "extracted before refusing"
    # data that names no splits: a --val-fraction that draws every image into val still trains each class
    # on its highest-hash image (the hash split keeps one training image per class)
    flat = make_folder(tmp_path / "flat", per_class=6, splits=())
    drawn = _no_tty_cli("fit-head", "--data", str(flat), "--val-fraction", "0.99", "--cache-dir", str(tmp_path / "c2"),
                        *FAST, "--head", "logistic", "--C", "1")
    assert drawn.returncode == 0 and "(n=2)" in drawn.stdout and "(n=10)" in drawn.stdout, drawn.stdout + drawn.stderr
    # train/ only and --val-fraction 0: refused before the head's fitting note and before a run is recorded
    only_train = make_folder(tmp_path / "only_train", per_class=4, splits=("train",))
    none_held = run_cli("fit-head", "--data", str(only_train), "--val-fraction", "0", "--cache-dir", str(cache), *FAST)
    _one_line_error(none_held, "give --val-fraction between 0 and 1")
    stages = [json.loads(f.read_text())["stage"] for f in (cache / "runs").glob("*/run.json")]
    assert "head auto: fitting" not in none_held.stderr and stages == ["extract"], (stages, none_held.stderr)


@pytest.mark.parametrize("name, lr, params, fragment", [
    ("constant", float("inf"), {}, "lr (--lr) must be a positive number"),
    ("exponential", 1e-3, {"lr_max": 0.0}, "lr_max (--lr-max) must be a positive number"),
    ("exponential", 1e-3, {"lr_start": -1.0}, "lr_start (--lr-start) must be a non-negative number"),
    ("cosine", 1e-3, {"lr_min": 1.0}, "lr_min (--lr-min, 1.0) must not exceed lr_max (--lr, the peak without --lr-max, "),
    ("cosine", 1e-3, {"lr_min": 1.0, "lr_max": 0.5}, "must not exceed lr_max (--lr-max, 0.5)"),
])
def test_schedule_errors_name_the_option(name, lr, params, fragment):
    from pipeline.heads.schedules import make_schedule

    with pytest.raises(UserError, match=re.escape(fragment)):
        make_schedule(name, lr, 10, **params)


def test_backbones_layers_without_a_name_is_refused():
    _one_line_error(_no_tty_cli("backbones", "--layers"), "--layers lists one backbone's layer names: give its NAME")


def test_empty_listings_name_the_folder_and_cache_refuses_feature_options(tmp_path):
    typo = tmp_path / "chache"
    runs = _no_tty_cli("runs", "--cache-dir", str(typo))
    assert runs.returncode == 0 and f"no runs recorded yet in {typo}" in runs.stdout, runs.stdout + runs.stderr
    ls = _no_tty_cli("cache", "ls", "--cache-dir", str(typo))
    assert ls.returncode == 0 and f"no cache entries in {typo}" in ls.stdout, ls.stdout + ls.stderr
    cache = write_cache(tmp_path / "c", n_images=40, dim=4, n_classes=2)
    mixed = _no_tty_cli("fit-head", "--cache", str(cache), "--backbone", "resnet50", "--cache-dir", str(tmp_path / "c"))
    _one_line_error(mixed, "so --backbone would be ignored")


def test_a_fit_head_run_outlives_its_cache_file(tmp_path):
    """`cache rm` (or eviction) of the features a head was fitted on loses no work: predict reads the
    backbone settings from the run, finetune extracts the recorded request again (same key)."""
    data = make_folder(tmp_path / "d", per_class=4)
    cache = tmp_path / "c"
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", str(cache), *FAST, "--head", "logistic", "--C", "1")
    assert fit.returncode == 0, fit.stderr
    run_id = _run_id(fit.stdout)
    (h5,) = list((cache / "features").glob("*.h5"))
    removed = run_cli("cache", "rm", h5.stem.rsplit("-", 1)[1][:12], "--yes", "--cache-dir", str(cache))
    assert removed.returncode == 0 and not h5.exists(), removed.stdout + removed.stderr
    image = data / "val" / "bees" / "img_000.jpg"
    pred = run_cli("predict", "--run", run_id, str(image), "--cache-dir", str(cache))
    assert pred.returncode == 0 and "bees" in pred.stdout + pred.stderr, pred.stderr
    ft = run_cli("finetune", "--run", run_id, "--epochs", "1", "--batch-size", "4", "--no-trunk-cache",
                 "--cache-dir", str(cache), "--no-progress")
    assert ft.returncode == 0, ft.stderr
    assert h5.exists()  # the same request made the same file again


def test_export_checks_out_and_run_before_loading(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_no_tty_cli("export", "--run", "nosuch", "--out", str(afile), "--cache-dir", str(tmp_path)),
                    "exists and is not a folder")
    _one_line_error(_no_tty_cli("export", "--run", "nosuch", "--cache-dir", str(tmp_path)), "unknown run ID")


def test_offline_imagenet_weights_advice_offers_weights_none_only_where_it_works(tmp_path):
    """Keras cannot download weights here: extract may go on with --weights none, but predict --backbone's
    ImageNet top-k refuses it, so its advice must not offer it."""
    image = make_folder(tmp_path / "d", per_class=1) / "train" / "ants" / "img_000.jpg"
    top = run_cli("predict", "--backbone", "vgg16", str(image))
    if "could not download" not in top.stderr:
        pytest.skip("vgg16's ImageNet weights are on this machine (or it is online)")
    _one_line_error(top, "could not download ImageNet weights for vgg16")
    assert "--weights none" not in top.stderr
    ex = run_cli("extract", "--data", str(tmp_path / "d"), "--backbone", "vgg16", "--image-size", "32",
                 "--cache-dir", str(tmp_path / "c"), "--no-progress")
    _one_line_error(ex, "(or --weights none)")


def test_a_class_held_out_whole_is_one_warning_line(tmp_path):
    """fit-head makes the split three times (to refuse early, before the run record, for the fit): the
    warning that a class has no training image is printed once, not three times."""
    import shutil

    data = make_folder(tmp_path / "d", per_class=10, classes=("a", "b"), splits=("train",))
    one = make_folder(tmp_path / "x", per_class=1, classes=("c",), splits=("train",))
    shutil.move(str(one / "train" / "c"), str(data / "train" / "c"))
    got = run_cli("fit-head", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *FAST, "--head", "logistic",
                  "--C", "1", "--val-fraction", "0.5", "--seed", "0")
    assert got.returncode == 0, got.stderr
    assert got.stderr.count("have val images but no training image ('c')") == 1, got.stderr


def test_a_run_on_random_weights_is_not_rebuilt_on_another_backend(tmp_path):
    """Random weights differ by backend (cosine 0.3 between TensorFlow's and JAX's features): a head fitted on
    JAX's, evaluated, exported or fine-tuned on TensorFlow read other features without a word."""
    from pipeline.backend import check_recorded

    data = make_folder(tmp_path / "d", per_class=4)
    cache = str(tmp_path / "c")
    fit = run_cli("fit-head", "--data", str(data), "--cache-dir", cache, *FAST, "--head", "logistic", "--C", "1")
    assert fit.returncode == 0, fit.stderr
    run_id = _run_id(fit.stdout)
    config_path = Path(cache) / "runs" / run_id / "config.json"
    config = json.loads(config_path.read_text())
    assert config["backend"] == "tensorflow"  # recorded from the features it was fitted on
    config["backend"] = "jax"                 # as if fitted with --backend jax
    config_path.write_text(json.dumps(config))
    fragment = "was made on the jax backend with random weights (--weights none), which tensorflow initialises"
    for args in (["evaluate", "--run", run_id, "--data", str(data)], ["predict", "--run", run_id, str(data)],
                 ["export", "--run", run_id, "--format", "keras", "--out", str(tmp_path / "x")],
                 ["finetune", "--run", run_id, "--epochs", "1"]):
        err = _one_line_error(run_cli(*args, "--cache-dir", cache), fragment)
        assert "--backend jax" in err
    check_recorded({"backend": "jax", "request": {"weights": "imagenet"}}, "run x")  # trained: the same everywhere
    check_recorded({"request": {"weights": "none"}}, "run x")  # a run from before the backend was recorded


def test_random_weights_in_mixed_precision_are_told_to_use_float32_precision(tmp_path):
    """Identical features from --precision mixed with random weights: the advice named --dtype float32,
    which was already given."""
    data = make_folder(tmp_path / "d", per_class=3)
    got = run_cli("extract", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *FAST, "--precision", "mixed")
    if got.returncode == 0:
        pytest.skip("mixed precision kept these random features apart on this machine")
    err = _one_line_error(got, "every image gave the same feature vector")
    assert "--precision float32" in err and "--dtype float32" not in err, err


def test_a_data_set_of_copies_of_one_file_is_named_so_not_blamed_on_the_weights(tmp_path):
    """Every file the same bytes: the features are all the same, and the advice was trained --weights or
    --dtype float32 (already given), not what the audit exists to find."""
    import shutil

    data = make_folder(tmp_path / "d", per_class=3)
    first = next(data.rglob("*.jpg"))
    for other in data.rglob("*.jpg"):
        if other != first:
            shutil.copy(first, other)
    err = _one_line_error(run_cli("audit", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *FAST),
                          "every image is a copy of one file (12 files with the same bytes")
    assert "--weights" not in err and "--dtype" not in err, err


def test_ctrl_c_while_a_head_fits_says_the_features_are_cached(tmp_path, monkeypatch):
    import pipeline.heads.training as training

    data = make_folder(tmp_path / "d", per_class=3)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit_head_run", interrupted)
    got = run_cli("fit-head", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *FAST, "--head", "logistic",
                  "--C", "1")
    assert got.returncode == 130 and "the features are cached; run the same command again" in got.stderr, got.stderr


def test_cache_ls_and_info_of_a_join_of_two_input_sizes(tmp_path):
    """A join of backbones of other input sizes showed size 0; `cache info` listed a removed part as if there."""
    from pipeline.features.cache import describe, find_entries

    kept = write_cache(tmp_path / "c", n_images=12, dim=4, key="1111000000000001", name="a", attrs={"data": "d"})
    path = write_cache(tmp_path / "c", n_images=12, dim=4, key="2222000000000002", name="a+b",
                       attrs={"data": "d", "image_size": 0, "image_sizes": [224, 240],
                              "parts": [str(kept), str(tmp_path / "c" / "features" / "b-gone.h5")]})
    sizes = {e.key[:4]: e.image_size for e in find_entries(tmp_path / "c")}
    assert sizes["2222"] == "224+240" and sizes["1111"] == 32
    info = describe("2222", tmp_path / "c")
    assert f"{kept}\"" in info and "b-gone.h5 (removed)" in info and f"{kept} (removed)" not in info, info
    assert path.exists()
