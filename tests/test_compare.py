"""`runs compare`: differing parameters, metrics per split, the comparison PNG, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from helpers_features import write_cache
from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads import LogisticHead
from pipeline.heads.training import fit_head_run
from pipeline.tracking.compare import (MISSING, compare, confusion_of, differing_params, format_value,
                                       metric_rows, plot_comparison, resolve)
from pipeline.tracking.runs import Registry, RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real fit-head runs on one small synthetic cache: logistic heads with C=0.1 and C=1.0."""
    root = tmp_path_factory.mktemp("compare")
    path = write_cache(root, n_images=150, dim=8, n_classes=3, sep=1.0)
    registry = Registry(root)
    with FeatureFile(path) as ff:
        runs = [fit_head_run(ff, LogisticHead(C=c), registry=registry)[1] for c in (0.1, 1.0)]
    return root, [r.id for r in runs]


def _record(config: dict, metrics: dict | None = None, run_id: str = "r", tmp: Path = Path(".")) -> RunRecord:
    return RunRecord(id=run_id, stage="fit-head", status="ok", started="", ended=None, duration_s=None,
                     config=config, metrics=metrics or {}, dir=tmp / run_id)


def _labels(stdout: str) -> list[str]:
    """The first cell of every row of a rich table."""
    return [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│")]


def _section(labels: list[str], start: str, end: str | None) -> list[str]:
    i = labels.index(start) + 1
    return labels[i:labels.index(end)] if end else labels[i:]


def test_compare_flattens_configs_and_keeps_only_differing_keys(tmp_path):
    base = {"cache_file": "/a/x.h5", "backbone": "vgg16", "head": "logistic", "params": {"C": 1.0, "flatten": "avg"},
            "head_params": {"C": 1.0, "Cs": [0.1, 1.0], "nested": {"a": 1, "b": [1, 2]}, "flatten": "avg"}}
    other = json.loads(json.dumps(base))
    other.update(cache_file="/b/x.h5", params={"C": 2.0})  # another folder; a summary without flatten
    other["head_params"].update(C=2.0, nested={"a": 1, "b": [2, 1]})
    other["head_params"].pop("flatten")
    rows = differing_params([_record(base, tmp=tmp_path), _record(other, run_id="s", tmp=tmp_path)])
    # C once (params.C repeats head_params.C), list order matters, a missing key differs, paths are noise
    assert list(rows) == ["head_params.C", "head_params.nested.b", "head_params.flatten"]
    assert rows["head_params.nested.b"] == [[1, 2], [2, 1]] and rows["head_params.flatten"] == ["avg", MISSING]
    assert format_value(MISSING) == "-" and format_value(0.123456, "accuracy") == "0.123"
    same = differing_params([_record(base, tmp=tmp_path), _record(json.loads(json.dumps(base)), "s", tmp_path)])
    assert same == {}


def test_compare_metric_rows_cover_every_split_and_only_differing_facts(tmp_path):
    report = {"n": 10, "accuracy": 0.5, "macro_f1": 0.4, "log_loss": 0.9, "confusion_matrix": [[5, 0], [5, 0]],
              "class_names": ["a", "b"], "per_class": {}}
    a = _record({}, {"train": report, "val": report, "test": report, "fit_seconds": 1.0, "split": {"rows": 3}})
    b = _record({}, {"val": {**report, "accuracy": 0.7}, "fit_seconds": 2.0, "split": {"rows": 3}}, "s")
    rows = metric_rows([a, b])
    assert list(rows)[:4] == ["train.accuracy", "train.macro_f1", "train.log_loss", "train.n"]
    assert rows["val.accuracy"] == [0.5, 0.7] and rows["test.n"] == [10, MISSING]
    assert rows["fit_seconds"] == [1.0, 2.0] and "split.rows" not in rows  # equal facts are left out
    assert not any("confusion" in k or "per_class" in k for k in rows)


def test_compare_cli_table_lists_exactly_the_differing_parameters(two_runs):
    root, ids = two_runs
    # a prefix of the first id (ids are "time-4hex" and both runs can share a second and a hex digit)
    prefix = next(ids[0][:n] for n in range(15, len(ids[0]) + 1) if not ids[1].startswith(ids[0][:n]))
    proc = run_cli("runs", "compare", prefix, ids[1], "--cache-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    labels = _labels(proc.stdout)
    assert labels[:6] == ["stage", "status", "backbone", "data", "head", "duration"]
    assert _section(labels, "parameters that differ", "metrics") == ["head_params.C"]
    metrics = _section(labels, "metrics", None)
    for split in ("train", "val", "test"):
        for name in ("accuracy", "macro_f1", "log_loss", "n"):
            assert f"{split}.{name}" in metrics
    assert all(i in proc.stdout for i in ids)
    png = Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert png == root / "runs" / f"compare-{ids[0]}-{ids[1]}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        im.verify()
    assert Registry(root).ids() == sorted(ids)  # the PNG beside the run folders is not taken for a run


def test_compare_json_and_out(two_runs, tmp_path):
    root, ids = two_runs
    out = tmp_path / "sub" / "cmp.png"
    proc = run_cli("runs", "compare", ids[1], ids[0], "--json", "--out", str(out), "--cache-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["id"] for r in data["runs"]] == [ids[1], ids[0]] and data["runs"][0]["head"] == "logistic"
    assert data["params"] == {"head_params.C": {ids[1]: 1.0, ids[0]: 0.1}}
    assert set(data["metrics"]["val.accuracy"]) == set(ids) and "test.log_loss" in data["metrics"]
    assert data["plot"] == str(out) and out.read_bytes()[:8] == PNG_MAGIC and f"wrote {out}" in proc.stderr
    assert not list((root / "runs").glob(f"compare-{ids[1]}*"))  # --out named: nothing else written
    metrics_file = root / "runs" / ids[0] / "metrics.json"                # a NaN figure: null, not a bare NaN
    metrics_file.write_text(metrics_file.read_text().replace('"log_loss": ', '"log_loss": NaN, "x": ', 1))
    proc = run_cli("runs", "compare", ids[1], ids[0], "--json", "--no-plot", "--cache-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert None in data["metrics"]["train.log_loss"].values() or None in data["metrics"]["val.log_loss"].values()


@pytest.mark.parametrize("args, fragment", [
    ([], "at least two run IDs (got 0)"),
    (["{a}"], "at least two run IDs (got 1)"),
    (["{a}", "nope"], "unknown run ID 'nope'"),
    (["{a}", "{a}"], "only one run"),
    (["{a}", "{b}", "--out", "{tmp}/plot.txt"], "does not end in .png"),
])
def test_compare_errors_are_one_line_exit_2(two_runs, tmp_path, args, fragment):
    root, ids = two_runs
    args = [a.format(a=ids[0], b=ids[1], tmp=tmp_path) for a in args]
    before = sorted(p.name for p in (root / "runs").iterdir())
    proc = run_cli("runs", "compare", *args, "--cache-dir", str(root))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert sorted(p.name for p in (root / "runs").iterdir()) == before and not list(tmp_path.iterdir())


def test_compare_run_with_curves_and_run_without_confusion(two_runs, tmp_path):
    root, ids = two_runs
    registry = Registry(tmp_path)
    history = {"loss": [1.0, 0.8, 0.7], "acc": [0.5, 0.6, 0.7], "val_loss": [1.1, 0.9, 0.85], "val_acc": [0.4, 0.5, 0.6]}
    with registry.start("finetune", {"backbone": "synthetic", "head": "finetune(logistic)",
                                     "params": {"lr": 1e-4}, "finetune_params": {"lr": None, "epochs": 3}}) as run:
        (run.dir / "finetune.json").write_text(json.dumps({"history": history}))
        run.log_metrics({"val": {"n": 0, "accuracy": None, "macro_f1": None}, "epochs_run": 3})
    tuned = registry.get(run.id)
    logistic = Registry(root).get(ids[0])
    assert tuned.history() == history and logistic.history() is None
    assert confusion_of(tuned) is None and confusion_of(logistic)[1] == ["class_0", "class_1", "class_2"]
    cmp = compare([logistic, tuned])
    assert cmp.params["params.lr"] == [MISSING, 1e-4]  # the effective LR differs from finetune_params.lr (None)
    assert cmp.params["head_params.C"] == [0.1, MISSING] and "finetune_params.epochs" in cmp.params
    out = plot_comparison(cmp.runs, tmp_path / "c.png", split="val")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 1200
    with pytest.raises(UserError, match="at least two"):
        resolve(registry, [run.id])


def test_a_damaged_confusion_matrix_or_curve_is_not_drawn_and_not_a_numpy_error(two_runs):
    """A hand-edited [[1, 2], [3]] in metrics.json was 'ValueError: setting an array element with a
    sequence', naming no run."""
    root, ids = two_runs
    metrics_file = root / "runs" / ids[0] / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["val"]["confusion_matrix"] = [[1, 2], [3]]
    metrics_file.write_text(json.dumps(metrics))
    proc = run_cli("runs", "compare", ids[1], ids[0], "--cache-dir", str(root))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
