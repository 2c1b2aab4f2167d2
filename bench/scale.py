"""Scale-out benchmarks (the issue "Scale out"), ratios measured in one run:

(a) extraction of --photos flower photos as one process, on a local Ray cluster with 1 worker and
    with 2 workers (on 2 cores no gain is expected; the figure is Ray's overhead, target < 10%), and
    with 2 workers sending their chunks back to the driver (what a node without the shared cache does);
(b) incremental: extract --photos photos, add 1% to the same manifest, extract again (target: the
    second takes < 5% of the first);
(c) the logistic head on a cache larger than its memory budget (below).

(a) and (b) read ../shared/data/flower_photos_224 in place (skipped when absent).

Benchmark (c): the logistic head on a cache larger than its memory budget.

Not a test. Writes a synthetic --rows x --dim float16 cache (5 classes, shaped like pooled
EfficientNet features as in bench/heads.py: non-negative, low-rank class structure plus noise;
80% train / 20% val; 1,000,000 x 1280 is 2.5 GB on disk) into a temporary folder (or --keep DIR,
reused when already there), then fits `LogisticHead(C="auto", n_jobs=2, memory_budget_mb=--budget)`
on the train rows as fit-head does (a FeatureSource over the cache file) in a fresh child process,
so the peak RSS reported (getrusage ru_maxrss) is the fit's own plus the interpreter's, not the writer's.
It prints fit wall and CPU seconds, the streamed fit's passes over the cache and their parts,
val accuracy, and peak RSS (and the RSS before the fit: interpreter, libraries, the cache's row
metadata, which the budget does not cover). With --in-memory (default for <= 300,000 rows) the same fit with the
whole budget of RAM runs in another child for comparison. Target (the issue "Scale out", item 4):
1,000,000 x 1280 in < 3 minutes on the 2-core box with < 2 GB peak.

    .venv/bin/python bench/scale.py                           # (a), (b), (c) at 200,000 x 1280, budget 1024 MB
    .venv/bin/python bench/scale.py --parts a b --photos 600
    .venv/bin/python bench/scale.py --rows 1000000 --keep /tmp/scale-cache
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import numpy as np  # noqa: E402

from pipeline.features.store import ChunkDir, FeatureFile, ItemTable, assemble  # noqa: E402

CHUNK = 10_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    ap.add_argument("--photos", type=int, default=300, help="(a), (b): photos to extract (default %(default)s)")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="(a), (b): backbone")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows (default %(default)s)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1024, help="LogisticHead memory budget in MB (default %(default)s)")
    ap.add_argument("--keep", help="folder to write the cache in and keep (reused when already there)")
    ap.add_argument("--in-memory", dest="in_memory", action="store_true", default=None,
                    help="also fit in memory for comparison (default: when rows <= 300000)")
    ap.add_argument("--no-in-memory", dest="in_memory", action="store_false")
    ap.add_argument("--fit", help=argparse.SUPPRESS)   # child mode: fit this cache and print JSON
    return ap.parse_args(argv)


def write_synthetic(folder: Path, n: int, dim: int, k: int, seed: int = 0) -> Path:
    """A float16 cache of pooled-feature-like vectors, generated and written chunk by chunk."""
    target = folder / f"scale-{n}x{dim}.h5"
    if target.exists():
        return target
    rng = np.random.default_rng(seed)
    rank = 64
    basis = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    means = (rng.standard_normal((k, rank)) * 0.3).astype(np.float32)
    y = rng.integers(0, k, n)
    splits = np.where(rng.random(n) < 0.8, "train", "val")
    chunks = ChunkDir(folder / f"scale-{n}x{dim}.parts", chunk_units=CHUNK)
    done = set(chunks.done())
    for c, start in enumerate(range(0, n, CHUNK)):
        if c in done:
            continue
        idx = np.arange(start, min(n, start + CHUNK))
        r = np.random.default_rng([seed, c])
        z = means[y[idx]] + r.standard_normal((idx.size, rank), dtype=np.float32)
        x = z @ basis + 0.7 * r.standard_normal((idx.size, dim), dtype=np.float32) - 0.5
        x = np.logaddexp(0, 2 * x) / 2   # softplus: sparse-ish, non-negative
        chunks.write(c, {"features": x.astype(np.float16), "index": idx.astype(np.int32),
                         "views": np.zeros(idx.size, np.int8), "skipped_index": np.zeros(0, np.int32),
                         "skipped_reason": np.zeros(0, "<U1")})
    items = ItemTable([f"img{i}.jpg" for i in range(n)], y, list(splits), [f"class_{i}" for i in range(k)])
    assemble(chunks, target, items, {"key": f"scale{n}x{dim}", "backbone": "synthetic"})
    chunks.remove()
    return target


def fit_child(path: str, budget: float) -> dict:
    """Child process: fit the logistic head on the train rows, score val; JSON-ready facts."""
    from pipeline.heads import FeatureSource, LogisticHead

    with FeatureFile(path) as ff:
        tr, va = ff.rows("train"), ff.rows("val")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # interpreter, libraries, FeatureFile
        t, c = time.perf_counter(), time.process_time()
        head = LogisticHead(C="auto", n_jobs=2, memory_budget_mb=budget).fit(FeatureSource(ff, tr), ff.labels[tr])
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        acc = float((head.predict(FeatureSource(ff, va)) == ff.labels[va]).mean())
        predict = time.perf_counter() - t
    return {"rows": int(tr.size), "val_rows": int(va.size), "wall": wall, "cpu": cpu, "predict": predict,
            "val_accuracy": acc, "C": head.C_, "C_note": head.C_note_, "converged": bool(head.converged_),
            "streamed": bool(head.streamed_), "note": head.stream_note_, "info": getattr(head, "stream_info_", {}),
            "rss_before_fit_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(path: Path, budget: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--fit", str(path), "--budget", str(budget)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the fit failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(label: str, r: dict) -> None:
    print(f"{label}: {r['rows']:,} train rows: fit {r['wall']:.1f} s wall, {r['cpu']:.1f} s cpu; "
          f"peak RSS {r['peak_rss_mb']:,.0f} MB ({r['rss_before_fit_mb']:,.0f} MB before the fit); val accuracy {r['val_accuracy']:.4f} ({r['val_rows']:,} rows, "
          f"predicted in {r['predict']:.1f} s); C={r['C']:g} ({r['C_note']}); converged {r['converged']}")
    if r["streamed"]:
        print(f"      {r['note']}\n      {r['info']}")


# --- (a) Ray vs the plain run, (b) incremental extraction: merged into bench/scale.py
def _flower_files(root: Path, n: int) -> list[tuple[str, str, str]]:
    """(path, label, split) of the first n photos, classes interleaved, from ../shared/data."""
    rows = []
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
            rows += [(str(f), cls, split) for f in sorted((root / split / cls).iterdir())]
    rows.sort(key=lambda r: (hash_name(r[0]), r[0]))
    return rows[:n]


def hash_name(path: str) -> str:
    import hashlib
    return hashlib.sha1(Path(path).name.encode()).hexdigest()


def _manifest(path: Path, rows) -> Path:
    path.write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    return path


def _request(manifest: Path, backbone: str):
    from pipeline.data.sources import SplitConfig
    from pipeline.extract import ExtractRequest
    return ExtractRequest(data=str(manifest), backbone=backbone, split=SplitConfig(allow_outside_paths=True))


def bench_ray(root: Path, n: int, backbone: str, tmp: Path) -> None:
    """(a) the same extraction as one process, on Ray with 1 worker and with 2 workers."""
    from pipeline.extract import RunOptions, extract
    from pipeline.extract.ray_distributor import extract_ray
    manifest = _manifest(tmp / "a.csv", _flower_files(root, n))
    req = _request(manifest, backbone)
    results = {}
    t = time.perf_counter()
    extract(req, RunOptions(cache_dir=tmp / "plain", progress=False))
    results["plain"] = time.perf_counter() - t
    for workers, transport in ((1, "auto"), (2, "auto"), (2, "driver")):
        t = time.perf_counter()
        extract_ray(req, RunOptions(cache_dir=tmp / f"ray{workers}{transport}", progress=False), n_workers=workers,
                    log=lambda m: None, transport=transport)
        results[f"ray x{workers}" + (" (chunks sent back to the driver)" if transport == "driver" else "")] = \
            time.perf_counter() - t
    base = results["plain"]
    print(f"(a) {backbone}, {n} photos, {os.cpu_count()} cores (Ray times include starting a local cluster)")
    for name, sec in results.items():
        print(f"    {name:40s} {sec:7.1f} s  {n / sec:7.1f} img/s  {sec / base:5.2f}x the plain run")


def bench_incremental(root: Path, n: int, backbone: str, tmp: Path) -> None:
    """(b) extract n photos, add 1% more to the same manifest, extract again."""
    from pipeline.extract import RunOptions, extract
    rows = _flower_files(root, n + max(1, n // 100))
    manifest = tmp / "b.csv"
    _manifest(manifest, rows[:n])
    opts = RunOptions(cache_dir=tmp / "inc", progress=False)
    t = time.perf_counter()
    first = extract(_request(manifest, backbone), opts)
    t_first = time.perf_counter() - t
    _manifest(manifest, rows)
    t = time.perf_counter()
    second = extract(_request(manifest, backbone), opts)
    t_second = time.perf_counter() - t
    print(f"(b) {backbone}: first extraction {first.computed} photos in {t_first:.1f} s; after adding "
          f"{len(rows) - n}: computed {second.computed}, reused {second.reused} in {t_second:.1f} s = "
          f"{t_second / t_first:.1%} of the first (target < 5%)")


SHARED = REPO.parent / "shared" / "data" / "flower_photos_224"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.fit:
        print(json.dumps(fit_child(args.fit, args.budget)))
        return
    if {"a", "b"} & set(args.parts):
        if not SHARED.is_dir():
            print(f"(a), (b) skipped: {SHARED} is absent")
        else:
            with tempfile.TemporaryDirectory() as work:
                if "a" in args.parts:
                    bench_ray(SHARED, args.photos, args.backbone, Path(work))
                if "b" in args.parts:
                    bench_incremental(SHARED, args.photos, args.backbone, Path(work))
    if "c" not in args.parts:
        return
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    folder = Path(args.keep or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = write_synthetic(folder, args.rows, args.dim, args.classes)
    size = path.stat().st_size / 2**30
    print(f"cache {path.name}: {size:.2f} GB on disk (ready in {time.perf_counter() - t:.0f} s); "
          f"cpus {os.cpu_count()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    report(f"(c)   streamed, budget {args.budget:g} MB", run_child(path, args.budget))
    in_memory = args.in_memory if args.in_memory is not None else args.rows <= 300_000
    if in_memory:
        report("      in memory (budget 1e9 MB)", run_child(path, 1e9))
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
