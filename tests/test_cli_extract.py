"""Stage 1 as a user runs it: `python cli.py extract|backbones|cache` (`run_cli`; killed and concurrent runs in
processes of their own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, make_folder, run_cli

from pipeline.extract.mapper import release_models

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--no-progress"]


def _one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1 and fragment in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_extract_then_cache_hit_fast_without_tensorflow(tiny_split_folder, tmp_path):
    cache = str(tmp_path / "c")
    first = run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and ".h5" in first.stdout
    second = run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST)
    assert second.returncode == 0 and second.stdout.startswith("cache hit: ")
    # fast because the hit path never imports TensorFlow (seconds on its own): checked directly, as a
    # wall-clock bound on a child process is at the mercy of a loaded 2-core CI machine
    probe = subprocess.run(  # the hit path must not import TensorFlow at all
        [sys.executable, "-c", "import sys; from pipeline.extract import extract, ExtractRequest, RunOptions;"
         f"r = extract(ExtractRequest(data={str(tiny_split_folder)!r}, backbone='vgg16', weights='none',"
         f" image_size=32), RunOptions(cache_dir={cache!r}, progress=False));"
         "print(r.cache_hit, 'tensorflow' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert probe.stdout.split() == ["True", "False"], probe.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--data", "/no/such/folder"], "not found"),
    (["--backbone", "resnet9000"], "unknown backbone"),
    (["--backbone", "xception", "--image-size", "50"], "too small"),
    (["--weights", "/no/such/file.h5"], "--weights"),
    (["--pooling", "median"], "median"),
    (["--augment-ops", "warp"], "unknown augmentation"),
    (["--augment-copies", "1", "--augment-ops", ""], "each view would copy its image"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_input_gives_one_line_error(args, fragment, tiny_split_folder, tmp_path):
    base = ["extract", "--data", str(tiny_split_folder), "--cache-dir", str(tmp_path), *FAST]
    proc = run_cli(*base, *args)
    if fragment == "median":  # click's own usage error for a bad choice
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "median" in proc.stderr
        return
    _one_line_error(proc, fragment)


def test_empty_class_folder_error(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, splits=())
    (root / "zebras").mkdir()
    _one_line_error(run_cli("extract", "--data", str(root), "--cache-dir", str(tmp_path), *FAST), "empty")


def test_corrupt_files_reported_with_count_and_names(mixed_formats_folder, tmp_path):
    proc = run_cli("extract", "--data", str(mixed_formats_folder), "--cache-dir", str(tmp_path), *FAST,
                   isolated=True)  # as a user's process prints it: decoding overlaps TensorFlow's first import there
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 file(s)" in proc.stderr and "truncated.jpg" in proc.stderr
    # damaged_scan.jpg is kept: libjpeg's own line is folded into one note, not printed raw
    assert "note: the image decoders warned" in proc.stderr and "Corrupt JPEG data" in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("Corrupt JPEG data")]


def _features(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["features"][:].astype(np.float32)


def test_kill_9_mid_extraction_then_rerun_gives_same_features(tmp_path):
    data = make_folder(tmp_path / "d", per_class=150, splits=())
    args = ["extract", "--data", str(data), *FAST, "--chunk-size", "16", "--batch-size", "8"]
    ref = run_cli(*args, "--cache-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_file = next((tmp_path / "ref" / "features").glob("*.h5"))
    cache = tmp_path / "c"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--cache-dir", str(cache)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "features").glob("*.parts/chunk-000002.npz")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((cache / "features").glob("*.h5")), "killed too late: the extraction had finished"
    release_models()  # the rerun builds its model afresh, as a new process would, not the reference's
    rerun = run_cli(*args, "--cache-dir", str(cache))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    out = next((cache / "features").glob("*.h5"))
    assert out.name == ref_file.name
    np.testing.assert_allclose(_features(out), _features(ref_file), atol=1e-3)


def test_two_concurrent_extracts_of_one_key_do_not_corrupt(tmp_path):
    data = make_folder(tmp_path / "d", per_class=40, splits=())
    cache = tmp_path / "c"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--data", str(data), "--cache-dir", str(cache),
           *FAST, "--chunk-size", "8"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    files = list((cache / "features").glob("*.h5"))
    assert len(files) == 1
    stdout = "".join(o for o, _ in outs)
    assert stdout.count("wrote") == 1 and stdout.count("cache hit") == 1
    with h5py.File(files[0]) as f:
        assert f.attrs["complete"] and f["features"].shape[0] == 80
        assert np.isfinite(f["features"][:]).all()


def test_cache_ls_info_rm(tiny_split_folder, tmp_path):
    cache = str(tmp_path / "c")
    assert run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST).returncode == 0
    ls = run_cli("cache", "ls", "--cache-dir", cache)
    assert ls.returncode == 0 and "vgg16" in ls.stdout and "complete" in ls.stdout
    key = next((Path(cache) / "features").glob("*.h5")).stem.rsplit("-", 1)[1]
    info = run_cli("cache", "info", key[:8], "--cache-dir", cache)
    assert info.returncode == 0 and "train: 12 images (ants=6, bees=6)" in info.stdout
    _one_line_error(run_cli("cache", "info", "ffffffff", "--cache-dir", cache), "no cache entry")
    rm = run_cli("cache", "rm", key[:8], "--cache-dir", cache)
    assert rm.returncode == 0 and "removed" in rm.stdout
    assert not list((Path(cache) / "features").glob("*.h5"))
    for pooling in ("avg", "none"):  # a layer's pooled and unpooled caches: told apart in the listing
        layer = run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST, "--layer",
                        "block4_pool", "--pooling", pooling)
        assert layer.returncode == 0, layer.stderr
    ls = run_cli("cache", "ls", "--cache-dir", cache)
    assert "block4_pool/avg" in ls.stdout and "block4_pool/none" in ls.stdout, ls.stdout


def test_backbones_lists_every_family():
    proc = run_cli("backbones")
    assert proc.returncode == 0
    for name in ("vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2",
                 "resnet152v2", "inceptionv3", "xception", "inceptionresnetv2", "densenet121", "densenet169",
                 "densenet201", "mobilenet", "mobilenetv2", "mobilenetv3small", "mobilenetv3large",
                 *[f"efficientnetb{i}" for i in range(8)], "efficientnetv2b0", "efficientnetv2b3",
                 "efficientnetv2s", "efficientnetv2m", "efficientnetv2l", "convnexttiny", "convnextxlarge",
                 "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert name in proc.stdout, name
    layers = run_cli("backbones", "vgg16", "--layers")
    assert layers.returncode == 0 and "block5_conv3" in layers.stdout.split()
    assert "hub:PRESET" in proc.stdout  # keras-hub presets are named beside the table


def test_pip_install_gives_a_featurecache_command_that_is_cli_py():
    """`pip install -e .` (the README's set-up, and CI's) puts `featurecache` beside the interpreter."""
    import importlib.metadata
    points = importlib.metadata.entry_points(group="console_scripts", name="featurecache")
    assert [p.value for p in points] == ["pipeline.cli:main"], "reinstall: pip install -e ."
    script = Path(sys.executable).parent / "featurecache"
    proc = subprocess.run([str(script), "backbones"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == run_cli("backbones").stdout, proc.stderr
    usage = subprocess.run([str(script), "nope"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "see 'featurecache -h'" in usage.stderr


def test_every_commands_help_keeps_its_examples_whole_and_shows_no_empty_range():
    """--help of each command: every example command on lines of its own (click rewrapped them into one
    paragraph, splitting a command mid-way), and no 'x<=None' for an unbounded number option."""
    import click

    from pipeline.cli import cli

    def commands(group: click.Group, prefix: tuple[str, ...] = ()):
        for name, cmd in group.commands.items():
            yield (*prefix, name)
            if isinstance(cmd, click.Group):
                yield from commands(cmd, (*prefix, name))

    examples = 0
    for path in commands(cli):
        shown = run_cli(*path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
        assert "None]" not in shown.stdout, (path, shown.stdout)
        for line in shown.stdout.splitlines():
            assert line.count("python cli.py") <= 1, (path, line)
            if "python cli.py" in line:  # the whole command on its line
                examples += 1
                assert line.strip().startswith(("Example: python cli.py", "Examples: python cli.py", "python cli.py")), line
    assert examples >= 15


def test_ctrl_c_says_how_to_resume_and_with_force_to_drop_it(tmp_path, monkeypatch):
    """Ctrl-C: exit 130 and one line saying what is kept; after --force, running the same command again
    recomputed every kept chunk, so the line says to leave --force out."""
    import pipeline.cli.extract_cmds as extract_cmds

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_cmds, "extract", interrupted)
    data = str(make_folder(tmp_path / "d", per_class=2))
    plain = run_cli("extract", "--data", data, "--cache-dir", str(tmp_path / "c"), *FAST)
    assert plain.returncode == 130 and "interrupted: finished chunks are kept; run the same command again to resume" \
        in plain.stderr, plain.stderr
    forced = run_cli("extract", "--data", data, "--cache-dir", str(tmp_path / "c"), "--force", *FAST)
    assert forced.returncode == 130 and "run the same command without --force to resume" in forced.stderr, forced.stderr


def test_a_lock_left_by_a_refused_extraction_is_listed_and_removable(tiny_split_folder, tmp_path):
    """A request refused after taking its lock (an unknown --layer) leaves only the lock file, which
    cache ls did not list and cache rm could not name ('no cache entry matches')."""
    cache = str(tmp_path / "c")
    bad = run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST, "--layer", "nope")
    _one_line_error(bad, "has no layer 'nope'")
    lock = next(Path(cache, "features").glob("*-nope-*.lock"))
    listed = run_cli("cache", "ls", "--cache-dir", cache)
    assert "lock file only" in listed.stdout, listed.stdout
    key = lock.name.rsplit("-", 1)[1].split(".")[0]
    rm = run_cli("cache", "rm", key[:8], "--cache-dir", cache)
    assert rm.returncode == 0 and not lock.exists(), rm.stderr
    # a finished cache: cache rm takes its lock and its shards' locks with it, and --all leaves nothing behind
    assert run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST).returncode == 0
    done = next(Path(cache, "features").glob("*.h5"))
    Path(cache, "features", done.stem + ".shard-0-of-2.lock").touch()
    assert run_cli("extract", "--data", str(tiny_split_folder), "--cache-dir", cache, *FAST, "--image-size", "48").returncode == 0
    one = run_cli("cache", "rm", done.stem.rsplit("-", 1)[1][:8], "--cache-dir", cache)
    assert one.returncode == 0 and not list(Path(cache, "features").glob(done.stem + ".*")), one.stderr
    everything = run_cli("cache", "rm", "--all", "--yes", "--cache-dir", cache)
    assert everything.returncode == 0 and not list(Path(cache, "features").iterdir()), everything.stderr
