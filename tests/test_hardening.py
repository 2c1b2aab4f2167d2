"""Hardening (issue 9): nothing deleted or run that should not be, and bad input never gives a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_folder, run_cli
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
        assert proc.stderr.strip() == "error: RuntimeError: kaput second line (run with --debug for the traceback)"
