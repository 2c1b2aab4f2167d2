"""Benchmark: how close does stage 1 (`pipeline.extract.extract`) get to the backbone's own speed?

Not a test. One run measures, on the same N images of an image folder:

  (i)   backbone   the feature model (`pipeline.model.feature_model`) alone, in the same kind of
                   `tf.function` and batch size as extract, on random preprocessed in-memory inputs.
                   Over as many batches as (ii), its first call's tracing included. The ceiling.
                   If `pipeline.extract` exposes `inference_fn(model, size, jit)` (the function it
                   runs per batch), (i) uses that, so (ii)/(i) measures pipeline overhead only.
  (ii)  extract    `pipeline.extract.extract(...)` end to end, fresh temporary cache dir, force=True,
                   progress bar off. With --limit, a CSV manifest of the first N files of the folder
                   listing is written to a temp dir so extract reads exactly those images.
  (iii) naive      what users write today: `keras.utils.image_dataset_from_directory` over the same N
                   files (symlinked into a temp folder tree), preprocess, `model.predict_on_batch` in a
                   Python loop, collect, `np.save` at the end. Runs in a fresh process that imports
                   TensorFlow first, with the environment this script was started with, as a user's
                   script would (so settings `pipeline` makes on import, e.g. TF_ENABLE_ONEDNN_OPTS,
                   do not reach it; --naive-same-env gives it this process's environment instead).

Timing rule (the ratios use it): images / wall seconds, where the wall time of (ii) and (iii) is the
whole call *minus the one-off model construction* (building the Keras backbone, ~seconds, identical
for both and unrelated to throughput). Everything else a user waits for stays in: listing the files,
building the tf.data pipeline, tracing the tf.function / predict function, the first batches, the
writer thread, and for (ii) the HDF5 assembly, for (iii) the `np.save`. For (ii) the model build is
measured by wrapping `_Extraction._model` (timing only, behaviour unchanged). (i) includes its
first call's tracing as (ii) and (iii) do, so (ii)/(i) is what decoding, resizing and writing cost
on top of the backbone; steady-state rates of (i) and (ii) are printed as well. The script also prints (ii)'s steady-state rate
(between the first and the last batch handed to the writer, from wrapping `_ChunkWriter.put`) and
`ExtractResult.images_per_s` (extract's own figure: units / `seconds`, where `seconds` covers
model build + compute but not the HDF5 assembly), and a breakdown of extract's wall time.

The machine is shared: wall times move with other processes (load average is printed); the
"cpu ms/img" column (this process's CPU time per image) is the steadier cost measure. Use
--repeat R for medians of interleaved runs.

Targets on the 2-core dev box, mobilenetv2 @160, --weights none: (ii)/(i) >= 0.9, (ii)/(iii) >= 1.5.

    .venv/bin/python bench/extract.py --limit 1000
    .venv/bin/python bench/extract.py --backbone efficientnet_lite0 --weights imagenet --image-size 224
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ENV0 = dict(os.environ)  # before anything imports pipeline (which may set TF_ENABLE_ONEDNN_OPTS)
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "flower_photos_224"
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: a PYTHONPATH copy of the package (experiments) wins

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (default: %(default)s)")
    ap.add_argument("--backbone", default="mobilenetv2")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=1000, help="first N images of the listing (0: all)")
    ap.add_argument("--parts", default="i,ii,iii", help="which measurements to run, e.g. i,ii")
    ap.add_argument("--backbone-batches", type=int, default=0,
                    help="timed batches for (i) (default: as many as N images)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up batches for (i)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the parts R times, interleaved (i, ii, iii, i, ...), report medians")
    ap.add_argument("--naive-same-env", action="store_true",
                    help="run (iii) with this process's TF environment (e.g. the oneDNN setting pipeline "
                         "chose) instead of the environment the script was started with")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (prints its path)")
    ap.add_argument("--naive-child", nargs=2, metavar=("TREE", "OUT_JSON"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ setup
def select_files(data: str, limit: int):
    """The first `limit` files of extract's own listing of `data` (paths, class names, splits)."""
    from pipeline.data.sources import open_source
    listing = open_source(data).listing()
    n = len(listing) if not limit else min(limit, len(listing))
    if listing.paths is None:
        raise SystemExit(f"{data}: the benchmark needs an image folder or CSV manifest")
    classes = [listing.class_names[int(l)] for l in listing.labels[:n]]
    return listing.paths[:n], classes, listing.splits[:n], n < len(listing)


def write_manifest(tmp: Path, paths, classes, splits) -> Path:
    out = tmp / "manifest.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(zip(paths, classes, splits))
    return out


def link_tree(tmp: Path, paths, classes) -> Path:
    """class/NNNNNN_name symlinks to the same files, for image_dataset_from_directory."""
    root = tmp / "naive_tree"
    for i, (p, c) in enumerate(zip(paths, classes)):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(p, d / f"{i:06d}_{Path(p).name}")
    return root


def build_model(args):
    from pipeline import backbones
    from pipeline.backbones.model import feature_model
    spec = backbones.get(args.backbone)
    size = spec.resolve_size(args.image_size)
    t = time.perf_counter()
    model = feature_model(spec, args.weights, size, "avg", None)
    return spec, size, model, time.perf_counter() - t


# ----------------------------------------------------------------------------------- measurements
def bench_backbone(args, n_images: int) -> dict:
    """(i): the frozen model in a tf.function on random preprocessed inputs, over as many batches as
    extract runs; wall time includes the first call's tracing (which (ii) and (iii) pay too)."""
    import numpy as np
    import tensorflow as tf
    from pipeline import extract as ex
    spec, size, model, build_s = build_model(args)
    jit = bool(tf.config.list_physical_devices("GPU"))  # extract's default (RunOptions.jit=None)
    t0, c = time.perf_counter(), time.process_time()
    if hasattr(ex, "inference_fn"):  # the function extract itself runs, if it exposes it
        infer = ex.inference_fn(model, size, jit)
    else:
        infer = tf.function(lambda x: model(x, training=False), jit_compile=jit, reduce_retracing=True)
    rng = np.random.default_rng(0)
    pool = [tf.constant(rng.uniform(-1, 1, (args.batch_size, size, size, 3)).astype(np.float32))
            for _ in range(4)]
    batches = args.backbone_batches or max(1, -(-n_images // args.batch_size))
    infer(pool[0]).numpy()  # the first call traces the graph (inference_fn froze it just before)
    warm_s = time.perf_counter() - t0
    t = time.perf_counter()
    for k in range(1, batches):
        infer(pool[k % 4]).numpy()  # .numpy(): the device->host copy extract pays too
    steady_s = time.perf_counter() - t
    s = time.perf_counter() - t0
    n = batches * args.batch_size
    return {"name": "(i) backbone", "images": n, "seconds": s, "rate": n / s, "build_s": build_s,
            "warmup_s": warm_s, "steady": (n - args.batch_size) / max(steady_s, 1e-9),
            "cpu_s": time.process_time() - c}


def bench_extract(args, data_arg: str, n_images: int, tmp: Path) -> dict:
    """(ii): extract end to end, instrumented (timing only) through two wrapped methods."""
    from pipeline import extract as ex
    marks: dict = {"model": 0.0, "model_cpu": 0.0, "puts": []}
    orig_model, orig_put, orig_assemble = ex._Extraction._model, ex._ChunkWriter.put, ex.assemble

    def timed_model(self):
        t, c = time.perf_counter(), time.process_time()
        try:
            return orig_model(self)
        finally:
            marks["model"] += time.perf_counter() - t
            marks["model_cpu"] += time.process_time() - c

    def timed_assemble(*a, **k):
        t = time.perf_counter()
        try:
            return orig_assemble(*a, **k)
        finally:
            marks["assemble"] = time.perf_counter() - t

    def timed_put(self, tags, feats):
        marks["puts"].append((time.perf_counter(), len(tags)))
        return orig_put(self, tags, feats)

    req = ex.ExtractRequest(data=data_arg, backbone=args.backbone, weights=args.weights,
                            image_size=args.image_size)
    opts = ex.RunOptions(cache_dir=tmp / "cache", batch_size=args.batch_size, force=True, progress=False)
    ex._Extraction._model, ex._ChunkWriter.put, ex.assemble = timed_model, timed_put, timed_assemble
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        res = ex.extract(req, opts, log=lambda m: None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        ex._Extraction._model, ex._ChunkWriter.put, ex.assemble = orig_model, orig_put, orig_assemble
    puts = marks["puts"]
    steady = float("nan")
    if len(puts) > 2:  # images after the first batch / time from first to last put
        steady = sum(n for _, n in puts[1:]) / (puts[-1][0] - puts[0][0])
    s = wall - marks["model"]
    return {"name": "(ii) extract", "images": res.n_rows, "seconds": s, "rate": res.n_rows / s,
            "wall": wall, "build_s": marks["model"], "steady": steady, "own_rate": res.images_per_s,
            "first_batch_s": (puts[0][0] - t0 - marks["model"]) if puts else float("nan"),
            "tail_s": (t0 + wall - puts[-1][0]) if puts else float("nan"),
            "assemble_s": marks.get("assemble", float("nan")), "skipped": len(res.skipped), "expected": n_images,
            "cpu_s": cpu - marks["model_cpu"]}


def bench_naive(args, tree: Path, n_images: int, tmp: Path) -> dict:
    """(iii) in a fresh process, as a user's script runs: TF imported first, with the environment
    this script was started with (so no setting pipeline makes on import applies to it)."""
    import json
    import subprocess
    out = tmp / f"naive-{time.monotonic_ns()}.json"
    env = dict(os.environ) if args.naive_same_env else dict(ENV0)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--backbone", args.backbone, "--image-size",
           str(args.image_size), "--weights", args.weights, "--batch-size", str(args.batch_size),
           "--naive-child", str(tree), str(out)]
    subprocess.run(cmd, env=env, check=True)
    r = json.loads(out.read_text())
    r["expected"] = n_images
    return r


def naive_child(args) -> int:
    """The naive loop itself: image_dataset_from_directory + predict_on_batch in a loop + np.save."""
    import json
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    import keras
    import numpy as np
    import tensorflow as tf  # noqa: F401  (imported before pipeline, as in a user's script)
    tree, out = Path(args.naive_child[0]), Path(args.naive_child[1])
    tmp = out.parent
    spec, size, model, build_s = build_model(args)
    pre = spec.preprocess_fn()
    t0, c0 = time.perf_counter(), time.process_time()
    ds = keras.utils.image_dataset_from_directory(tree, labels="inferred", image_size=(size, size),
                                                  batch_size=args.batch_size, shuffle=False, verbose=False)
    feats, labels = [], []
    for x, y in ds:
        x = pre(x) if pre is not None else x
        feats.append(model.predict_on_batch(x))
        labels.append(y.numpy())
    feats = np.concatenate(feats)
    np.save(tmp / "naive_features.npy", feats)
    np.save(tmp / "naive_labels.npy", np.concatenate(labels))
    s = time.perf_counter() - t0
    out.write_text(json.dumps({"name": "(iii) naive", "images": int(feats.shape[0]), "seconds": s,
                               "rate": feats.shape[0] / s, "build_s": build_s,
                               "cpu_s": time.process_time() - c0, "onednn": onednn}))
    return 0


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.naive_child:
        return naive_child(args)
    parts = [p for p in ("i", "ii", "iii") if p in {q.strip() for q in args.parts.split(",")}]
    if args.backbone.lower().replace("-", "_").startswith("efficientnet_lite"):
        try:
            import pipeline.backbones.lite  # noqa: F401
        except Exception as exc:  # lite.py is optional / written separately
            print(f"skip: {args.backbone} needs pipeline/lite.py, which does not import ({exc})")
            return 0
    tmp_obj = tempfile.TemporaryDirectory(prefix="bench_extract_")
    tmp = Path(tmp_obj.name)
    try:
        paths, classes, splits, limited = select_files(args.data, args.limit)  # imports pipeline
        n = len(paths)
        data_arg = str(write_manifest(tmp, paths, classes, splits)) if limited else args.data
        tree = link_tree(tmp, paths, classes) if "iii" in parts else None
        import pipeline
        import tensorflow as tf
        print(f"load average at start {_load()}")
        print(f"backbone={args.backbone} size={args.image_size} weights={args.weights} "
              f"batch={args.batch_size} images={n} data={args.data}{' (manifest of first N)' if limited else ''}")
        print(f"tensorflow {tf.__version__}  cpus={os.cpu_count()}  gpu={bool(tf.config.list_physical_devices('GPU'))}"
              f"  pipeline from {Path(pipeline.__file__).parent}\n"
              f"TF_ENABLE_ONEDNN_OPTS: (i)/(ii) {os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}, "
              f"(iii) {(os.environ if args.naive_same_env else ENV0).get('TF_ENABLE_ONEDNN_OPTS', 'default')}",
              flush=True)
        runs: dict[str, list[dict]] = {p: [] for p in parts}
        for rep in range(max(1, args.repeat)):
            for p in parts:
                if p == "i":
                    r = bench_backbone(args, n)
                elif p == "ii":
                    r = bench_extract(args, data_arg, n, tmp)
                else:
                    r = bench_naive(args, tree, n, tmp)
                runs[p].append(r)
                print(f"  run {rep + 1} {r['name']:<13} {r['rate']:7.1f} img/s  ({r['seconds']:.2f}s, "
                      f"load {_load().split()[0]})", flush=True)
        rows = {p: _median(rs) for p, rs in runs.items()}
        report(rows, max(1, args.repeat))
        print(f"load average now {_load()} (other processes on this machine distort wall times; "
              f"'cpu ms/img' is this process's CPU time per image)")
        if args.keep:
            print(f"kept {tmp}")
    finally:
        if args.keep:
            tmp_obj._finalizer.detach()
        else:
            tmp_obj.cleanup()
    return 0


def _median(rs: list[dict]) -> dict:
    """The run with the median rate (a whole run, so its detail fields stay consistent)."""
    return sorted(rs, key=lambda r: r["rate"])[len(rs) // 2]


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def report(rows: dict, repeat: int) -> None:
    print(f"\n{'median of ' + str(repeat) + ' runs' if repeat > 1 else 'one run'}:")
    print(f"{'measurement':<14}{'images':>8}{'seconds':>10}{'img/s':>10}{'cpu ms/img':>12}{'cores busy':>12}"
          f"{'model build s':>15}")
    for r in rows.values():
        print(f"{r['name']:<14}{r['images']:>8}{r['seconds']:>10.2f}{r['rate']:>10.1f}"
              f"{1000 * r['cpu_s'] / r['images']:>12.2f}{r['cpu_s'] / r['seconds']:>12.2f}{r['build_s']:>15.2f}")
    if "ii" in rows:
        e = rows["ii"]
        print(f"\n(ii) detail: wall incl. model build {e['wall']:.2f}s; model build {e['build_s']:.2f}s; "
              f"to first batch (trace + fill) {e['first_batch_s']:.2f}s; after last batch (writer + "
              f"HDF5 assembly) {e['tail_s']:.2f}s, of which assemble() {e['assemble_s']:.2f}s\n"
              f"     steady-state {e['steady']:.1f} img/s; ExtractResult.images_per_s {e['own_rate']:.1f} "
              f"(counts model build, not assembly); skipped {e['skipped']}")
        if e["images"] != e["expected"]:
            print(f"     WARNING: extract stored {e['images']} rows for {e['expected']} images")
    if "i" in rows:
        print(f"(i) detail: first call (trace + freeze) {rows['i']['warmup_s']:.2f}s; "
              f"steady-state {rows['i']['steady']:.1f} img/s")
    print("\nratios (images / wall seconds excluding model construction, tracing included for all three):")
    if "i" in rows and "ii" in rows:
        r = rows["ii"]["rate"] / rows["i"]["rate"]
        rs = rows["ii"]["steady"] / rows["i"]["steady"]
        print(f"  (ii)/(i)   = {r:.2f}   target >= 0.9 {'OK' if r >= 0.9 else 'MISS'}"
              f"   [steady-state (ii)/(i) = {rs:.2f}]")
    if "ii" in rows and "iii" in rows:
        r = rows["ii"]["rate"] / rows["iii"]["rate"]
        print(f"  (ii)/(iii) = {r:.2f}   target >= 1.5 {'OK' if r >= 1.5 else 'MISS'}")


if __name__ == "__main__":
    sys.exit(main())
