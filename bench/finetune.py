"""Benchmark: fine-tuning throughput, this tool's input path vs the keras.io way, in one run.

Not a test. For each backbone, on `--images` photos from `--data` (train/<class>/...), the same
model (uint8 image -> preprocessing -> backbone with its top block trainable -> head), the same
batch size, the same device:

  ours      `pipeline.finetune.data.make_batches` (the shared loader: OpenCV decode, resize and
            seeded augmentation in threads, uint8 batches, prefetch) into `model.fit`
  keras.io  the tutorial input: tf.data (decode_image + resize, AUTOTUNE) on TensorFlow, a Pillow
            PyDataset on JAX/PyTorch, float32 batches into the same `model.fit`

One warm-up epoch (tracing) is not timed; then `--epochs` epochs are, and images/s per training
epoch is printed with the ratio ours / keras.io. Runs on the Keras backend in force.

    .venv/bin/python bench/finetune.py
    KERAS_BACKEND=jax .venv/bin/python bench/finetune.py --backbones efficientnet_lite0 --images 256
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.append(p)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flower_photos_224"))
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    ap.add_argument("--images", type=int, default=128, help="photos per epoch (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up one")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--augment", action="store_true", help="augment in our input path (keras.io side: none)")
    ap.add_argument("--precision", choices=("auto", "float32", "mixed"), default="auto",
                    help="mixed: bfloat16 where the GPU does it natively (float16 elsewhere); auto: mixed on a GPU, "
                         "as `finetune` does (default)")
    ap.add_argument("--repeat-files", type=int, default=1,
                    help="list every photo this many times (a large epoch from a few hundred photos)")
    return ap.parse_args(argv)


def weights_for(name: str) -> str:
    """Real ImageNet weights where they install offline (the Lite models); random init otherwise
    (throughput does not depend on the weight values)."""
    return "imagenet" if name.startswith("efficientnet_lite") else "none"


def main(argv=None) -> None:
    args = parse_args(argv)
    import keras

    from extract import link_files
    from heads import _keras_io_input
    from pipeline import backbones as bb
    from pipeline.data.augment import AugmentConfig
    from pipeline.data.sources import open_source
    from pipeline.extract import ExtractRequest
    from pipeline.finetune.data import make_batches
    from pipeline.finetune.tuner import build_finetune_model, set_trainable
    from pipeline.heads import LogisticHead

    train_dir = Path(args.data) / "train"
    if not train_dir.is_dir():
        sys.exit(f"no image folder at {train_dir}; pass --data")
    from pipeline.backend import accelerator, mixed_policy

    files = sorted(p for p in train_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files * max(1, args.repeat_files)
    files = files[:: max(1, len(files) // args.images)][: args.images]
    classes = sorted({p.parent.name for p in files})
    mixed = args.precision == "mixed" or (args.precision == "auto" and accelerator() == "gpu")
    if mixed:
        keras.mixed_precision.set_global_policy(mixed_policy())
    print(f"Keras backend {keras.backend.backend()} on {accelerator() or 'cpu'}; cpus {os.cpu_count()}; {len(files)} photos "
          f"from {args.data} ({args.repeat_files}x listed), batch {args.batch_size}, size {args.size}, "
          f"policy {keras.mixed_precision.global_policy().name}, {args.epochs} timed epoch(s) after one warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        # links beside the manifest (it refuses paths outside its folder), one name per listing
        files = link_files([(str(p), p.parent.name) for p in files], Path(tmp, "files"))
        manifest = Path(tmp) / "subset.csv"
        with open(manifest, "w", newline="") as fh:
            csv.writer(fh).writerows([str(p), p.parent.name, "train"] for p in files)
        for name in args.backbones:
            spec = bb.get(name)
            req = ExtractRequest(data=str(manifest), backbone=name, weights=weights_for(name), image_size=args.size)
            source = open_source(req.data, req.split)
            listing = source.listing()
            idx = np.arange(len(listing))
            labels = np.asarray(listing.labels)

            def model_for(dtype_in: str):
                probe = build_finetune_model(req, _dummy_head(LogisticHead, spec, req, classes, labels))
                names = [layer.name for layer in probe.get_layer("backbone").layers]
                top = list(bb.block_spans(spec, names))[:1]  # the topmost block
                set_trainable(probe, spec, top)
                if dtype_in == "float32":  # keras.io feeds float images: same graph, float input
                    inp = keras.Input((args.size, args.size, 3), dtype="float32")
                    probe = keras.Model(inp, probe(inp))
                probe.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
                return probe, top

            def epochs_per_s(model, data) -> float:
                model.fit(data, epochs=1, verbose=0)  # warm-up: tracing, not counted
                t = time.perf_counter()
                model.fit(data, epochs=args.epochs, verbose=0)
                return len(files) * args.epochs / (time.perf_counter() - t)

            model, top = model_for("uint8")
            ours_data = make_batches(source, listing, idx, args.size, req.resize, args.batch_size, shuffle_seed=0,
                                     augment=AugmentConfig() if args.augment else None)
            ours = epochs_per_s(model, ours_data)
            del model
            model, _ = model_for("float32")
            theirs = epochs_per_s(model, _keras_io_input(keras, [str(p) for p in listing.paths], labels.tolist(),
                                                         args.size))
            print(f"{name} @{args.size} (trainable: {', '.join(top) or 'head'}; weights {req.weights}): "
                  f"ours {ours:.1f} img/s, keras.io {theirs:.1f} img/s per training epoch; "
                  f"ratio ours / keras.io = {ours / theirs:.2f}")


def _dummy_head(LogisticHead, spec, req, classes, labels):
    """A fitted logistic head of the right feature width (random features: throughput only)."""
    from pipeline.backbones.model import feature_model

    dim = int(feature_model(spec, "none", req.image_size).output_shape[-1])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(max(20, labels.size), dim)).astype(np.float32)
    y = np.resize(labels, X.shape[0])
    return LogisticHead(C=1.0).fit(X, y, class_names=classes, feature_info={"backbone": spec.name})


if __name__ == "__main__":
    main()
