"""`--backbone a+b`: the pooled features of several backbones side by side, as one cache view.

Each backbone is extracted as usual (its own cache entry: a hit where present, resumable, shared
with every other request for it), then one derived cache file joins their rows, image by image
and view by view. Its key is the hash of the parts' keys, so it is found again like any cache and
changes whenever a part would. Heads, audits, `evaluate` and `predict --run` read it as they read
any cache, and `export` makes one model of it (every backbone on the same input, joined, then the
head); fine-tuning, which trains one backbone, refuses it with what to do.
What it gave on flowers and hymenoptera: docs/heads.md ("Two backbones side by side").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py

from pipeline import backbones
from pipeline.backend import name as backend_name
from pipeline.errors import UserError
from pipeline.extract.plan import KEY_VERSION, ExtractRequest, ExtractResult, Plan, RunOptions, image_rate, plan
from pipeline.features.store import concatenate, is_complete, refuse_damaged
from pipeline.layout import CacheLayout
from pipeline.locking import exclusive_lock, key_lock
from pipeline.tracking.runs import Registry

SEP = "+"
Log = Callable[[str], None]


def is_concat(backbone: str) -> bool:
    """Whether a --backbone value names several backbones joined by '+'."""
    return SEP in str(backbone)


def part_names(backbone: str) -> list[str]:
    """The backbones of 'a+b' (checked: two or more, known, distinct), as their table names."""
    names = [n.strip() for n in str(backbone).split(SEP)]
    if len(names) < 2 or not all(names):
        raise UserError(f"--backbone {backbone!r}: join two or more backbone names with '+', e.g. "
                        f"efficientnet_lite0+efficientnet_lite2")
    rows = [backbones.get(n).name for n in names]
    if len(set(rows)) < len(rows):
        raise UserError(f"--backbone {backbone!r} names a backbone twice; join different backbones")
    return names


def part_requests(request: ExtractRequest) -> list[ExtractRequest]:
    """One request per backbone of a concatenated one (the same data, size rule, views and dtype);
    refuses what describes one backbone only."""
    if request.layer:
        raise UserError(f"--layer {request.layer} names a layer of one backbone; concatenate pooled features "
                        f"(leave --layer out)")
    if request.pooling == "none":
        raise UserError("--pooling none keeps feature maps, which cannot be joined side by side; concatenate "
                        "pooled features (--pooling avg or max)")
    if request.weights.lower() not in ("imagenet", "none"):
        raise UserError("--weights FILE holds one backbone's weights; concatenate with --weights imagenet (or none)")
    return [dataclasses.replace(request, backbone=name) for name in part_names(request.backbone)]


@dataclass
class ConcatPlan:
    """The parts' plans and the derived file's key and path (no Keras)."""

    request: ExtractRequest
    parts: list[Plan]
    key: str
    path: Path

    @property
    def lock(self) -> Path:
        return key_lock(self.path)


def plan_concat(request: ExtractRequest, cache_dir: Path) -> ConcatPlan:
    """Key and file name of a concatenated request: the hash of its parts' keys, in order."""
    parts = [plan(r, cache_dir) for r in part_requests(request)]
    key = hashlib.sha256(json.dumps({"key_version": KEY_VERSION, "concat": [p.key for p in parts]}).encode()
                         ).hexdigest()
    name = f"{SEP.join(p.spec.slug for p in parts)}-{request.pooling}-{key[:16]}.h5".replace("/", "_")
    return ConcatPlan(request, parts, key, CacheLayout(cache_dir).features / name)


def cache_path(request: ExtractRequest, cache_dir: Path) -> Path:
    """Where the cache file of `request` is (or will be), for one backbone or a concatenation."""
    return plan_concat(request, cache_dir).path if is_concat(request.backbone) else plan(request, cache_dir).path


def extract_concat(request: ExtractRequest, options: RunOptions, log: Log,
                   extract_one: Callable[[ExtractRequest, RunOptions, Log], ExtractResult]) -> ExtractResult:
    """Extract (or find) every part with `extract_one`, then the derived file joining their rows."""
    if options.shard is not None:
        raise UserError("--shard splits one backbone's extraction; run each backbone with --shard, then "
                        f"--backbone {request.backbone} without it joins them")
    cp = plan_concat(request, options.cache_dir)
    if not options.force and is_complete(cp.path):
        return ExtractResult(cp.path, cp.key, cache_hit=True)
    if not options.force:
        refuse_damaged(cp.path)
    results = []
    for i, part in enumerate(cp.parts, 1):
        log(f"backbone {i}/{len(cp.parts)} of {request.backbone}: {part.spec.name}")
        results.append(extract_one(part.request, options, log))
    run_id = None
    with exclusive_lock(cp.lock, lambda: log(f"another extract of this request is running; waiting ({cp.lock})")):
        if options.force or not is_complete(cp.path):
            run_id, n_rows = _join(cp, request, options, results)
        else:  # another process joined it while this one waited
            n_rows = _n_rows(cp.path)
    computed, seconds = sum(r.computed for r in results), sum(r.seconds for r in results)
    model_seconds = sum(r.model_seconds for r in results)
    return ExtractResult(cp.path, cp.key, cache_hit=run_id is None, n_rows=n_rows, seconds=seconds,
                         computed=computed, images_per_s=image_rate(computed, seconds, model_seconds), model_seconds=model_seconds,
                         skipped=results[0].skipped, distributor="concat", parts=[r.path for r in results],
                         run_id=run_id)


def _join(cp: ConcatPlan, request: ExtractRequest, options: RunOptions,
          results: list[ExtractResult]) -> tuple[str, int]:
    """Write the derived file joining the parts' rows, recorded as an `extract` run (so `runs` lists it
    and `--mlflow` logs it); returns the run's id and the file's rows."""
    attrs = {"key": cp.key, "request": request.to_json(),
             "key_material": {"key_version": KEY_VERSION, "concat": [p.key for p in cp.parts],
                              "data": cp.parts[0].key_material["data"]},
             "backbone": SEP.join(p.spec.name for p in cp.parts), "weights": request.weights,
             "pooling": request.pooling, "layer": "", "dtype": request.dtype, "data": request.data,
             "data_fingerprint": cp.parts[0].key_material["data"]["fingerprint"],
             # one size where the parts share it (what `cache ls` shows), else 0 and each part's
             "image_size": cp.parts[0].size if len({p.size for p in cp.parts}) == 1 else 0,
             "image_sizes": [p.size for p in cp.parts], "resize": request.resize,
             "parts": [str(r.path) for r in results],
             "extract_seconds": round(sum(r.seconds for r in results), 3)}
    rates = [_rate_of(r.path) for r in results]
    if all(rates):  # one image through every backbone: the parts' times per image add up
        attrs["images_per_s"] = round(1 / sum(1 / r for r in rates), 2)
    config = {"backbone": attrs["backbone"], "data": request.data, "head": None, "cache_key": cp.key,
              "cache_path": str(cp.path), "request": request.to_json(), "backend": backend_name(),
              "parts": [p.key for p in cp.parts],
              "params": {"size": attrs["image_size"] or attrs["image_sizes"], "pooling": request.pooling,
                         "weights": request.weights}}
    with Registry(options.cache_dir).start("extract", config) as run:
        n_rows = concatenate([r.path for r in results], cp.path, attrs, dtype=request.dtype)
        run.finish("ok", {"rows": n_rows, "computed": sum(r.computed for r in results),
                          "seconds": attrs["extract_seconds"], "distributor": "concat",
                          "parts_computed": [r.computed for r in results]})
    return run.id, n_rows


def _rate_of(path: Path) -> float | None:
    """The images per second a part's own extraction recorded (None before the attribute existed)."""
    with h5py.File(path, "r") as f:
        rate = f.attrs.get("images_per_s")
    return float(rate) if rate is not None and float(rate) > 0 else None


def _n_rows(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["n_rows"])
