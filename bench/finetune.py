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
import contextlib
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
    ap.add_argument("--precision", choices=("auto", "float32", "mixed", "bf16"), default="auto",
                    help="mixed: bfloat16 where the GPU does it natively (float16 elsewhere); auto: mixed on a GPU, "
                         "as `finetune` does (default); bf16: mixed_bfloat16 forced (the GPU's policy, on a CPU)")
    ap.add_argument("--repeat-files", type=int, default=1,
                    help="list every photo this many times (a large epoch from a few hundred photos)")
    # diagnosis (bench/gpu/diagnose.sh): which sides run, and ablations of "ours"
    ap.add_argument("--sides", default="ours,keras.io",
                    help="comma-separated, any of: ours, keras.io (keras.io@N: its input at batch N), ours-f32 (our "
                         "batches cast to float32 into the float-input model), ours-noaug, ours-pad (every batch "
                         "padded to --batch-size with weight-0 rows: one shape), synth-u8 / synth-f32 (in-memory "
                         "random batches of --batch-size: the device step alone, no input path)")
    ap.add_argument("--keras-io-batch", type=int, default=32, help="the keras.io input's batch (its recipe: 32)")
    ap.add_argument("--probe", action="store_true",
                    help="per side: XLA compiles (count, seconds) in the warm-up and in the timed epochs, "
                         "step wall times, time the input spent in __getitem__, and the compile options in force")
    return ap.parse_args(argv)


class Probe:
    """Counts XLA compilations (JAX monitoring events, JAX only) and times steps and input batches."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.compiles: list[tuple[str, float]] = []
        if enabled:
            try:
                import jax.monitoring

                def on_duration(event, duration, **kw):
                    if event.endswith("backend_compile_duration"):
                        self.compiles.append((str(kw.get("fun_name", "?")), float(duration)))

                jax.monitoring.register_event_duration_secs_listener(on_duration)
            except Exception as exc:  # noqa: BLE001 - not JAX, or an older JAX: steps are still timed
                print(f"  probe: no JAX compile events ({type(exc).__name__})")

    def callback(self, keras):
        """A callback stamping each step's start and each epoch's end, from the training loop's own thread.
        `async_safe`, and no batch-end hook: it adds no host-device sync (Keras would sync every step for
        a callback with on_train_batch_end), so the intervals are the loop's own: input wait + dispatch +
        any compilation; the epoch's last interval also waits for the device (the epoch end syncs)."""

        class StepTimes(keras.callbacks.Callback):
            async_safe = True

            def __init__(self):
                super().__init__()
                self.marks: list[tuple[str, float]] = []

            def on_train_batch_begin(self, batch, logs=None):
                self.marks.append(("step", time.perf_counter()))

            def on_epoch_end(self, epoch, logs=None):
                self.marks.append(("end", time.perf_counter()))

        self.steps = StepTimes()
        return self.steps

    def _intervals(self) -> list[list[float]]:
        """Per epoch, the seconds of each step (from its start to the next step's start or the epoch end)."""
        out: list[list[float]] = [[]]
        marks = self.steps.marks if getattr(self, "steps", None) else []
        for (kind, t), (_, t_next) in zip(marks, marks[1:]):
            if kind == "step":
                out[-1].append(t_next - t)
            else:
                out.append([])
        return [e for e in out if e]

    def phase(self, label: str, mark: int, model=None, timed_input=None) -> None:
        if not self.enabled:
            return
        new = self.compiles[mark:]
        names: dict[str, int] = {}
        for n, _ in new:
            names[n] = names.get(n, 0) + 1
        top = ", ".join(f"{k} x{v}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:6])
        line = f"  probe {label}: {len(new)} XLA compiles, {sum(d for _, d in new):.1f} s ({top or '-'})"
        for k, ep in enumerate(self._intervals()):
            shown = " ".join(f"{x * 1e3:.0f}" for x in ep[:12]) + (" ..." if len(ep) > 12 else "")
            line += f"; epoch {k + 1} step ms: {shown} (sum {sum(ep):.2f} s)"
        if timed_input is not None:
            input_s, rows = timed_input.reset()
            line += (f"; input __getitem__ {input_s:.2f} s (summed over its threads), batches fetched (rows, in "
                     f"call order) {rows}")
        if model is not None:
            line += (f"; jit_compile={getattr(model, 'jit_compile', '?')} run_eagerly={model.run_eagerly} "
                     f"steps_per_execution={getattr(model, 'steps_per_execution', '?')}")
        print(line, flush=True)
        if getattr(self, "steps", None):
            self.steps.marks.clear()


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
    from pipeline.finetune.devices import batch_multiple
    from pipeline.finetune.model import build_finetune_model, set_trainable
    from pipeline.heads import LogisticHead

    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    diag = Probe(args.probe)

    train_dir = Path(args.data) / "train"
    if not train_dir.is_dir():
        sys.exit(f"no image folder at {train_dir}; pass --data")
    from pipeline.backend import accelerator, mixed_policy

    files = sorted(p for p in train_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files * max(1, args.repeat_files)
    files = files[:: max(1, len(files) // args.images)][: args.images]
    classes = sorted({p.parent.name for p in files})
    mixed = args.precision == "mixed" or (args.precision == "auto" and accelerator() == "gpu")
    if args.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    elif mixed:
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

            def epochs_per_s(model, data, side: str, n_images: int) -> float:
                cbs = [diag.callback(keras)] if diag.enabled else []
                timed_input = _time_getitem(data) if diag.enabled else None
                mark = len(diag.compiles)
                t = time.perf_counter()
                model.fit(data, epochs=1, verbose=0, callbacks=cbs)  # warm-up: tracing, not counted
                warm = time.perf_counter() - t
                diag.phase(f"{name} {side} warm-up ({warm:.1f} s)", mark, model, timed_input)
                mark = len(diag.compiles)
                t = time.perf_counter()
                model.fit(data, epochs=args.epochs, verbose=0, callbacks=cbs)
                sec = time.perf_counter() - t
                diag.phase(f"{name} {side} timed ({sec:.1f} s)", mark, None, timed_input)
                return n_images * args.epochs / sec

            rates: dict[str, float] = {}
            top: list[str] = []
            for side in sides:
                if side in ("ours", "ours-noaug", "ours-f32", "ours-pad"):
                    model, top = model_for("float32" if side == "ours-f32" else "uint8")
                    data = make_batches(source, listing, idx, args.size, req.resize, args.batch_size,
                                        shuffle_seed=0, devices=batch_multiple(args.batch_size, 1),  # as finetune pads
                                        augment=AugmentConfig() if args.augment and side != "ours-noaug" else None)
                    if side == "ours-f32":
                        data = _Mapped(keras, data, _as_float)
                    elif side == "ours-pad":
                        data = _Mapped(keras, data, _padded_to(args.batch_size))
                    rates[side] = epochs_per_s(model, data, side, len(files))
                elif side == "keras.io" or side.startswith("keras.io@"):
                    batch = int(side.split("@")[1]) if "@" in side else args.keras_io_batch
                    model, top = model_for("float32")
                    rates[side] = epochs_per_s(model, _keras_io_input(keras, [str(p) for p in listing.paths],
                                                                      labels.tolist(), args.size, batch=batch),
                                               side, len(files))
                elif side in ("synth-u8", "synth-f32"):
                    model, top = model_for("float32" if side == "synth-f32" else "uint8")
                    rng = np.random.default_rng(0)
                    x = rng.integers(0, 256, (len(files), args.size, args.size, 3), dtype=np.uint8)
                    x = x.astype(np.float32) if side == "synth-f32" else x
                    data = _InMemory(keras, x, labels[np.arange(len(files)) % labels.size].astype(np.int32),
                                     args.batch_size)
                    rates[side] = epochs_per_s(model, data, side, len(files))
                else:
                    sys.exit(f"unknown side {side!r}")
                del model
                print(f"{name} @{args.size} {side}: {rates[side]:.1f} img/s per training epoch", flush=True)
            if "ours" in rates and "keras.io" in rates:
                print(f"{name} @{args.size} (trainable: {', '.join(top) or 'head'}; weights {req.weights}): "
                      f"ours {rates['ours']:.1f} img/s, keras.io {rates['keras.io']:.1f} img/s per training epoch; "
                      f"ratio ours / keras.io = {rates['ours'] / rates['keras.io']:.2f}", flush=True)


def _time_getitem(data):
    """Wrap a PyDataset's __getitem__ (on this instance's class) to sum the seconds spent in it."""

    class Timer:
        total = 0.0
        rows: list[int] = []

        def reset(self):
            out, Timer.total = Timer.total, 0.0
            rows, Timer.rows = Timer.rows, []
            return out, rows

    cls = type(data)
    orig = cls.__getitem__
    if getattr(orig, "_probe_timed", False):
        return Timer()

    def timed_getitem(self, i):
        t = time.perf_counter()
        out = None
        try:
            out = orig(self, i)
            return out
        finally:
            Timer.total += time.perf_counter() - t
            with contextlib.suppress(Exception):
                Timer.rows.append(int(len(out[0])))

    timed_getitem._probe_timed = True
    cls.__getitem__ = timed_getitem
    return Timer()


def _Mapped(keras, inner, fn):
    """`inner`'s batches through `fn` (same order and augmentation): for the ablations below."""

    class Mapped(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)

        def __len__(self):
            return len(inner)

        def __getitem__(self, i):
            return fn(inner[i])

        def on_epoch_end(self):
            inner.on_epoch_end()

    return Mapped()


def _as_float(batch):
    """x cast to float32 (the keras.io dtype)."""
    x, *rest = batch
    return (x.astype(np.float32), *rest)


def _padded_to(batch_size):
    """Batches padded to `batch_size` rows with weight-0 copies (one batch shape: one compile)."""
    from pipeline.finetune.data import pad_to_multiple

    return lambda batch: pad_to_multiple(batch[0], batch[1], batch_size)


def _InMemory(keras, x, y, batch_size):
    """Fixed in-memory batches (no decoding): what the device step alone sustains."""

    class InMemory(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)

        def __len__(self):
            return -(-len(x) // batch_size)

        def __getitem__(self, i):
            return x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size]

    return InMemory()


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
