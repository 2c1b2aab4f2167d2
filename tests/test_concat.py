"""`--backbone a+b`: two backbones' pooled features side by side as one cache view, through every
stage that reads a cache (fit-head, its ranking, audit, predict and evaluate with the run, cache ls), export
as one model, and a one-line refusal where one backbone trains (finetune) or an option describes one."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import make_folder, run_cli
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, cache_path, extract
from pipeline.features.store import FeatureFile
from pipeline.tracking.runs import Registry

A, B = "mobilenetv2", "vgg16"  # random weights at 32 px: the mechanics, in seconds


def req(data, backbone: str, **kw) -> ExtractRequest:
    return ExtractRequest(data=str(data), backbone=backbone, weights="none", image_size=32, dtype="float32", **kw)


def opts(cache, **kw) -> RunOptions:
    return RunOptions(cache_dir=cache, progress=False, batch_size=8, **kw)


def test_a_concatenation_is_each_backbones_rows_side_by_side_and_a_cache_of_its_own(tmp_path):
    data = make_folder(tmp_path / "d", per_class=4)
    cache = tmp_path / "c"
    logs: list[str] = []
    joined = extract(req(data, f"{A}+{B}"), opts(cache), log=logs.append)
    assert joined.path == cache_path(req(data, f"{A}+{B}"), cache) and not joined.cache_hit
    assert joined.distributor == "concat" and len(joined.parts) == 2 and joined.computed == 2 * 16
    a, b = extract(req(data, A), opts(cache)), extract(req(data, B), opts(cache))
    assert a.cache_hit and b.cache_hit                       # the parts are ordinary cache entries
    with FeatureFile(joined.path) as j, FeatureFile(a.path) as fa, FeatureFile(b.path) as fb:
        assert j.feature_shape == (fa.feature_shape[0] + fb.feature_shape[0],)
        assert j.paths == fa.paths == fb.paths and list(j.splits) == list(fa.splits)
        np.testing.assert_array_equal(j.load(), np.hstack([fa.load(), fb.load()]))
        assert j.attrs["backbone"] == f"{A}+{B}" and j.key != fa.key
    run = Registry(cache).get(joined.run_id)                 # the join is a recorded extract run (--mlflow logs it)
    assert run.stage == "extract" and run.config["backbone"] == f"{A}+{B}" and run.config["cache_key"] == joined.key
    assert run.status == "ok" and run.metrics["rows"] == joined.n_rows and run.metrics["computed"] == 2 * 16
    again = extract(req(data, f"{A}+{B}"), opts(cache))
    assert again.cache_hit and again.run_id is None
    swapped = extract(req(data, f"{B}+{A}"), opts(cache))
    assert swapped.path != joined.path                       # the order of the parts is part of the key
    whole = joined.path.read_bytes()                         # a damaged joined file is refused, left, --force replaces it
    joined.path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="is damaged") as err:
        extract(req(data, f"{A}+{B}"), opts(cache))
    assert str(joined.path) in str(err.value) and joined.path.stat().st_size == len(whole) // 2
    assert not extract(req(data, f"{A}+{B}"), opts(cache, force=True)).cache_hit
    with pytest.raises(UserError, match="names a layer of one backbone"):
        extract(req(data, f"{A}+{B}", layer="block_1_expand"), opts(cache))
    with pytest.raises(UserError, match="feature maps"):
        extract(req(data, f"{A}+{B}", pooling="none"), opts(cache))
    with pytest.raises(UserError, match="run each backbone with --shard"):
        extract(req(data, f"{A}+{B}"), opts(cache, shard=(0, 2)))
    with pytest.raises(UserError, match="names a backbone twice"):
        extract(req(data, f"{A}+{A}"), opts(cache))
    with pytest.raises(UserError, match="two or more"):
        extract(req(data, f"{A}+"), opts(cache))


def test_fit_head_ranks_predicts_and_exports_a_concatenation_and_finetune_refuses_it(tmp_path):
    data = make_folder(tmp_path / "d", per_class=6)
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "c"), "--weights", "none", "--image-size", "32",
              "--dtype", "float32", "--no-progress"]
    ranked = run_cli("fit-head", *common, "--backbone", f"{A},{B},{A}+{B}")
    assert ranked.returncode == 0, ranked.stderr
    assert "backbone 3/3: mobilenetv2+vgg16" in ranked.stderr and "backbone ranking: kept" in ranked.stdout
    fit = run_cli("fit-head", *common, "--backbone", f"{A}+{B}", "--head", "logistic")
    assert fit.returncode == 0, fit.stderr
    run_id = fit.stdout.split("run ")[-1].split()[0]
    out = tmp_path / "pred.csv"
    pred = run_cli("predict", "--run", run_id, str(data / "val"), "--cache-dir", str(tmp_path / "c"), "--csv", str(out))
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12
    ev = run_cli("evaluate", "--run", run_id, "--data", str(data), "--split", "val", "--cache-dir", str(tmp_path / "c"))
    assert ev.returncode == 0, ev.stderr
    # what predict computed from the images is what the head gives on the joined cache's rows
    from pipeline.heads.registry import load_head
    from pipeline.tracking.runs import Registry

    record = Registry(tmp_path / "c").get(run_id)
    head = load_head(record.dir)
    with FeatureFile(record.config["cache_file"]) as ff:
        val = ff.rows("val")
        cached = dict(zip([ff.paths[r] for r in val], head.predict_proba(ff.load(val))[:, 1]))
    assert sorted(cached) == sorted(row["path"] for row in rows)
    for row in rows:
        assert abs(float(row["bees"]) - cached[row["path"]]) < 1e-4
    audited = run_cli("audit", *common, "--backbone", f"{A}+{B}", "--no-map")
    assert audited.returncode == 0, audited.stderr
    assert "1792 features" in audited.stdout + audited.stderr      # 1280 (mobilenetv2) + 512 (vgg16)
    listed = run_cli("cache", "ls", "--cache-dir", str(tmp_path / "c"))
    assert listed.returncode == 0 and "mobilenetv2+vgg16" in listed.stdout and "damaged" not in listed.stdout
    joined = next((tmp_path / "c" / "features").glob("mobilenetv2+vgg16-*.h5"))
    info = run_cli("cache", "info", joined.name, "--cache-dir", str(tmp_path / "c"))
    assert info.returncode == 0 and "parts: [" in info.stdout and ": None" not in info.stdout, info.stdout
    # export: both backbones on one uint8 input, joined, then the head; it predicts what the run predicts
    exported = run_cli("export", "--run", run_id, "--format", "keras", "--cache-dir", str(tmp_path / "c"),
                       "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    served = tmp_path / "served.csv"
    pred = run_cli("predict", "--model", str(tmp_path / "export" / "model.keras"), str(data / "val"),
                   "--csv", str(served))
    assert pred.returncode == 0, pred.stderr
    by_model = {row["path"]: float(row["bees"]) for row in csv.DictReader(served.open())}
    assert sorted(by_model) == sorted(cached)
    for path, p in by_model.items():
        assert abs(p - cached[path]) < 1e-4
    refused = run_cli("finetune", "--run", run_id, "--cache-dir", str(tmp_path / "c"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "one backbone" in refused.stderr and "Traceback" not in refused.stderr
