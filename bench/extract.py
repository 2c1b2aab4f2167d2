"""Benchmark: stage 1 (`pipeline.extract.extract`) against the backbone's own speed and the loops
users write today, on any Keras backend (KERAS_BACKEND or --backend) and device. Not a test.

One run measures, on the same N image files (a CSV manifest of the folder's first files, repeated
with --repeat-files to make a large set from a small one):

  (d)   loader     the input path alone: read, decode, resize into uint8 batches (no model).
  (i)   backbone   the feature model alone on device-resident uint8 batches, through the same
                   runner extract uses (jit/XLA/frozen graph), first call's compilation excluded.
  (ii)  extract    `extract(...)` end to end (files to finished HDF5), fresh cache, model build
                   excluded (identical for all rows), compilation, writes and assembly included.
  (iii) naive      PIL in a loop + `model.predict_on_batch` (the notebook way); a Keras PyDataset
                   with worker processes + `model.predict`; a torch DataLoader with worker
                   processes + the model, where torch is installed.

All rates are images / wall second; ratios are printed at the end.

    python bench/extract.py --backbone mobilenetv2 --image-size 160 --weights none --limit 1000
    KERAS_BACKEND=jax python bench/extract.py --backbone resnet50 --image-size 224 --precision mixed \\
        --batch-size 256 --repeat-files 20 --data photos/
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flower_photos_224"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (default: %(default)s)")
    ap.add_argument("--backbone", default="mobilenetv2")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--precision", default="float32", choices=("float32", "mixed"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=1000, help="first N files of the folder (0: all)")
    ap.add_argument("--repeat-files", type=int, default=1, help="list every file this many times")
    ap.add_argument("--workers", type=int, default=None, help="decode threads / naive worker processes")
    ap.add_argument("--parts", default="d,i,ii,iii", help="which measurements to run")
    ap.add_argument("--backend", default=None, help="tensorflow, jax or torch (default: KERAS_BACKEND)")
    return ap.parse_args(argv)


def list_files(data: str, limit: int, repeat: int) -> list[tuple[str, str]]:
    root = Path(data)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if limit:
        files = files[:limit]
    if not files:
        sys.exit(f"no images under {root}")
    return [(str(p), p.parent.name) for p in files] * max(1, repeat)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_loader(args, files) -> float:
    import functools

    from pipeline.data.decode import load_file
    from pipeline.data.loader import batches
    s = args.image_size
    jobs = ((i, functools.partial(load_file, p, s, "stretch")) for i, (p, _) in enumerate(files))
    n, sec = timed(lambda: sum(len(b.tags) for b in batches(jobs, args.batch_size, (s, s, 3), args.workers)))
    return n / sec


def build(args):
    import keras

    from pipeline import backbones as bb
    from pipeline.backbones.model import feature_model
    from pipeline.backend import mixed_policy
    if args.precision == "mixed":
        keras.mixed_precision.set_global_policy(mixed_policy())
    try:
        return feature_model(bb.get(args.backbone), args.weights, args.image_size)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bench_backbone(args, model, n_images: int) -> float:
    import numpy as np

    from pipeline.backend import name
    from pipeline.extract.mapper import make_runner
    s, bs = args.image_size, args.batch_size
    runner = make_runner(model, s, bs)
    x = np.random.default_rng(0).integers(0, 256, (bs, s, s, 3), dtype=np.uint8)
    if name() == "jax":
        import jax
        x = jax.device_put(x)  # device-resident: no host transfer per batch
    elif name() == "torch":
        import torch
        x = torch.from_numpy(x).to(runner.device)
    elif name() == "tensorflow":
        import tensorflow as tf
        x = tf.constant(x)
    runner.collect(runner.submit(x))  # compile (a full batch: submit pads nothing, x stays on the device)
    batches = max(3, n_images // bs)

    def run():
        handles = [runner.submit(x) for _ in range(batches)]
        for h in handles[-2:]:
            runner.collect(h)

    _, sec = timed(run)
    return batches * bs / sec


def link_files(files: list[tuple[str, str]], tree: Path) -> list[Path]:
    """tree/<class>/<k>_<name>: one link per listed (path, class), so repeats get their own names (a
    manifest or folder refuses duplicates) and the data stays in place; links to resolved paths."""
    links = []
    for k, (p, c) in enumerate(files):
        link = tree / c / f"{k:07d}_{Path(p).name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(p).resolve())  # a relative --data must not leave dangling links
        links.append(link)
    return links


def bench_extract(args, files, tmp: Path) -> tuple[float, object]:
    from pipeline.extract import ExtractRequest, RunOptions, extract
    tree = tmp / "files"
    link_files(files, tree)
    req = ExtractRequest(data=str(tree), backbone=args.backbone, weights=args.weights,
                         image_size=args.image_size, precision=args.precision, dtype="float32")
    result, sec = timed(lambda: extract(req, RunOptions(cache_dir=tmp / "cache", batch_size=args.batch_size,
                                                         progress=False, force=True, workers=args.workers),
                                        log=lambda m: None))
    return result.n_rows / (sec - result.model_seconds), result


def bench_naive_pil(args, model, files) -> float:
    import numpy as np
    from PIL import Image
    s, bs = args.image_size, args.batch_size

    def run():
        out = []
        for k in range(0, len(files), bs):
            batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((s, s))) for p, _ in files[k:k + bs]])
            out.append(np.asarray(model.predict_on_batch(batch)))
        return np.concatenate(out)

    _, sec = timed(run)
    return len(files) / sec


class _Files:  # picklable for worker processes
    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image
        return np.asarray(Image.open(self.files[i][0]).convert("RGB").resize((self.size, self.size)))


def bench_naive_pydataset(args, model, files) -> float:
    import keras
    import numpy as np
    items, bs = _Files(files, args.image_size), args.batch_size
    workers = args.workers or os.cpu_count() or 1

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return -(-len(items) // bs)

        def __getitem__(self, i):
            return np.stack([items[j] for j in range(i * bs, min(len(items), (i + 1) * bs))])

    ds = Batches(workers=workers, use_multiprocessing=True, max_queue_size=8)
    _, sec = timed(lambda: model.predict(ds, verbose=0))
    return len(files) / sec


def bench_naive_torch(args, model, files) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    import numpy as np
    loader = torch.utils.data.DataLoader(_Files(files, args.image_size), batch_size=args.batch_size,
                                         num_workers=args.workers or os.cpu_count() or 1)

    def run():
        return [np.asarray(model.predict_on_batch(np.asarray(b))) for b in loader]

    _, sec = timed(run)
    return len(files) / sec


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.backend import accelerator, name, select
    select(args.backend)
    files = list_files(args.data, args.limit, args.repeat_files)
    parts = set(args.parts.split(","))
    rows: dict[str, float] = {}
    import keras
    print(f"backend {name()}  accelerator {accelerator() or 'cpu'}  keras {keras.__version__}  "
          f"cpus {os.cpu_count()}  {args.backbone}@{args.image_size} {args.precision} batch {args.batch_size}  "
          f"{len(files)} files", flush=True)
    if "d" in parts:
        rows["(d) loader alone"] = bench_loader(args, files)
    model = build(args) if parts & {"i", "iii"} else None
    if "i" in parts:
        rows["(i) backbone alone"] = bench_backbone(args, model, len(files))
    if "ii" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows["(ii) extract end to end"], _ = bench_extract(args, files, Path(tmp))
    if "iii" in parts:
        rows["(iii) naive: PIL loop + predict_on_batch"] = bench_naive_pil(args, model, files)
        rows["(iii) naive: Keras PyDataset (processes) + predict"] = bench_naive_pydataset(args, model, files)
        torch_rate = bench_naive_torch(args, model, files)
        if torch_rate is not None:
            rows["(iii) naive: torch DataLoader (processes) + model"] = torch_rate
    for k, v in rows.items():
        print(f"{k:<52s} {v:10.1f} img/s", flush=True)
    ii = rows.get("(ii) extract end to end")
    if ii and "(i) backbone alone" in rows:
        print(f"(ii)/(i)   = {ii / rows['(i) backbone alone']:.2f}")
    naive = {k: v for k, v in rows.items() if k.startswith("(iii)")}
    if ii and naive:
        best = max(naive, key=naive.get)
        print(f"(ii)/(iii) = {ii / naive[best]:.2f}  (against the fastest naive loop: {best[12:]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
