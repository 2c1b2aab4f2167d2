"""Stage 1's job: lay out the units (image, view), run reader -> backbone -> writer, assemble.

Reader: the source's per-image jobs (decode, resize, seeded augmentation) on the loader's
threads, in order, a few batches ahead. Backbone: the backend's runner, one batch in flight.
Writer: a thread writing finished chunks atomically. The three overlap; a killed run resumes from
its last finished chunk and ends with the same features.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.data.augment import augmented_view
from pipeline.data.sources import Listing
from pipeline.errors import UserError
from pipeline.extract.plan import ExtractRequest, ExtractResult, Plan, RunOptions, check_size, plan
from pipeline.extract.writer import ChunkWriter
from pipeline.features.store import ChunkDir, DegenerateFeatures, ItemTable, assemble, is_complete

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def _locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (released by the OS even after kill -9); yields whether it is
    held. When another process holds it: call `on_wait` and wait, or without one, yield False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is None:
                yield False
                return
            on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_leftovers(p: Plan, log: Log) -> None:
    """Under the lock: remove temporary files of a killed assembly and the parts of a finished key."""
    for tmp in p.path.parent.glob(f".{p.path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        log(f"removed {tmp.name}, left by an interrupted assembly")
    if p.parts.exists() and is_complete(p.path):
        ChunkDir.remove_path(p.parts)


def extract(request: ExtractRequest, options: RunOptions = RunOptions(), log: Log = _stderr) -> ExtractResult:
    """Return the cache file for `request`, computing (or resuming) it only when needed."""
    p = plan(request, options.cache_dir)
    if not options.force and is_complete(p.path):
        if p.parts.exists() or any(p.path.parent.glob(f".{p.path.name}.*.tmp")):
            with contextlib.suppress(OSError), _locked(p.lock) as got:
                if got:
                    _clean_leftovers(p, log)
        return ExtractResult(p.path, p.key, cache_hit=True)
    check_size(p.size, options.allow_large)
    from pipeline.backend import require
    require()
    try:
        with _locked(p.lock, lambda: log(f"another extract of this request is running; waiting for it ({p.lock})")):
            _clean_leftovers(p, log)
            if options.force:
                p.path.unlink(missing_ok=True)
                ChunkDir.remove_path(p.parts)
                options = RunOptions(**{**asdict(options), "force": False})
            elif is_complete(p.path):
                return ExtractResult(p.path, p.key, cache_hit=True)
            return _recorded(p, options, log)
    except OSError as exc:
        raise _disk_error(exc, p) from None


def _disk_error(exc: OSError, p: Plan) -> UserError | OSError:
    """Disk-full and permission errors as one line naming the folder; finished chunks stay."""
    where = Path(exc.filename).parent if getattr(exc, "filename", None) else p.path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the disk holding {where}; free some space (or use --cache-dir on "
                         f"another disk) and run the same command again: finished chunks are kept")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write to {where} ({exc.strerror}); choose a writable --cache-dir")
    return exc


def _recorded(p: Plan, options: RunOptions, log: Log) -> ExtractResult:
    """Run the extraction inside a runs-registry record."""
    from pipeline.backend import name as backend_name
    from pipeline.tracking.runs import Registry
    config = {"backbone": p.spec.name, "data": p.request.data, "head": None, "cache_key": p.key,
              "cache_path": str(p.path), "request": p.request.to_json(), "backend": backend_name(),
              "params": {"size": p.size, "pooling": p.request.layer or p.request.pooling,
                         "weights": p.request.weights, "aug": p.request.augment_copies}}
    with Registry(options.cache_dir).start("extract", config) as run:
        result = _Extraction(p, options, log).run()
        run.finish("ok", {"rows": result.n_rows, "skipped": len(result.skipped), "seconds": result.seconds,
                          "images_per_s": result.images_per_s, "resumed_from": result.resumed_from,
                          "computed": result.computed})
    result.run_id = run.id
    return result


class _Extraction:
    """One extraction job: lays out the units (image, view), runs the pipeline, assembles the file."""

    def __init__(self, p: Plan, options: RunOptions, log: Log) -> None:
        self.p, self.options, self.log = p, options, log
        self.listing: Listing = p.source.listing()
        n = len(self.listing)
        train = np.flatnonzero(np.asarray(self.listing.splits) == "train")
        copies = p.request.augment_copies
        self.unit_index = np.concatenate([np.arange(n)] + [train] * copies).astype(np.int64)
        self.unit_view = np.concatenate([np.zeros(n)] + [np.full(train.size, k + 1) for k in range(copies)]
                                        ).astype(np.int8)
        self.pass_bounds = np.cumsum([0, n] + [train.size] * copies)

    def run(self) -> ExtractResult:
        p, opts = self.p, self.options
        total = self.unit_index.size
        if total == 0:
            raise UserError(f"{p.request.data} contains no images")
        chunks = ChunkDir(p.parts, opts.chunk_units)
        done = set(chunks.done())
        n_chunks = -(-total // chunks.chunk_units)
        first_missing = next((c for c in range(n_chunks) if c not in done), n_chunks)
        start = min(first_missing * chunks.chunk_units, total)
        if start:
            self.log(f"resuming: {start} of {total} images already extracted")
        t0 = time.perf_counter()
        try:
            if start < total:
                self._compute(chunks, start, total)
        finally:
            if not chunks.done():
                chunks.remove()  # nothing finished: leave no empty partial behind
        seconds = time.perf_counter() - t0
        attrs = {
            "key": p.key, "request": p.request.to_json(), "key_material": p.key_material,
            "backbone": p.spec.name, "weights": p.request.weights, "weights_id": p.key_material["weights"],
            "image_size": p.size, "resize": p.request.resize, "preprocessing": p.spec.preprocess,
            "pooling": p.request.pooling, "layer": p.request.layer or "", "dtype": p.request.dtype,
            "data": p.request.data, "data_fingerprint": p.key_material["data"]["fingerprint"],
            "split_origin": self.listing.split_origin, "augment_copies": p.request.augment_copies,
            "augment_seed": p.request.augment_seed, "versions": p.key_material["versions"],
            "backend": p.key_material["backend"], "decoder": p.key_material["decoder"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extract_seconds": round(seconds, 3),
        }
        items = ItemTable(self.listing.ids, self.listing.labels, self.listing.splits, self.listing.class_names)
        try:
            assemble(chunks, p.path, items, attrs, dtype=p.request.dtype, compression=opts.compression)
        except DegenerateFeatures as exc:
            chunks.remove()  # every chunk holds the same junk; a rerun must recompute
            raise UserError(str(exc)) from None
        chunks.remove()
        with _h5_open(p.path) as f:
            n_rows = int(f.attrs["n_rows"])
            skipped = list(zip(f["skipped_paths"].asstr()[:], f["skipped_reasons"].asstr()[:]))
        computed = total - start
        return ExtractResult(p.path, p.key, cache_hit=False, n_rows=n_rows, skipped=skipped, seconds=seconds,
                             images_per_s=computed / seconds if computed and seconds > 0 else 0.0,
                             resumed_from=start, computed=computed)

    # -- the worker
    def _model(self):
        import keras

        from pipeline.backbones.model import feature_model
        if self.p.request.precision == "mixed":
            from pipeline.backend import mixed_policy
            keras.mixed_precision.set_global_policy(mixed_policy())
        try:
            return feature_model(self.p.spec, self.p.request.weights, self.p.size,
                                 self.p.request.pooling, self.p.request.layer)
        finally:
            keras.mixed_precision.set_global_policy("float32")

    def jobs(self, start: int, total: int) -> Iterator[tuple[int, Callable[[], np.ndarray]]]:
        """(tag, job) for units start..total-1 in order; augmented views wrap the clean image's job."""
        req, size = self.p.request, self.p.size
        for a, b in zip(self.pass_bounds[:-1], self.pass_bounds[1:]):
            lo, hi = max(int(a), start), min(int(b), total)
            if lo >= hi:
                continue
            indices = self.unit_index[lo:hi]
            raw = self.p.source.raw_images(self.listing, indices, size, req.resize)
            for tag, index, job in zip(range(lo, hi), indices, raw):
                view = int(self.unit_view[tag])
                if view:
                    job = functools.partial(augmented_view, job, req.augment, req.augment_seed, view, int(index))
                yield tag, job

    def _compute(self, chunks: ChunkDir, start: int, total: int) -> None:
        from tqdm import tqdm

        from pipeline.data.loader import Prefetcher, batches
        from pipeline.extract.runners import make_runner
        size, bs = self.p.size, self.options.batch_size
        # decoding starts while the model is built and traced
        feed = Prefetcher(batches(self.jobs(start, total), bs, (size, size, 3), self.options.workers), depth=2)
        model = self._model()
        runner = make_runner(model, size, bs, self.options.jit)
        feat_shape = tuple(int(d) for d in model.output.shape[1:])
        writer = ChunkWriter(chunks, self.unit_index, self.unit_view, start, total, feat_shape,
                             np.dtype(self.p.request.dtype))
        bar = tqdm(total=total, initial=start, unit="img", desc=f"extract {self.p.spec.name}",
                   disable=not self.options.progress, smoothing=0.1, dynamic_ncols=True, file=sys.stderr)
        writer.start()
        try:
            pending = None  # (batch, handle): one batch on the device while the next is handed over
            last = start
            for batch in feed:
                handle = runner.submit(batch.images) if batch.tags.size else None
                if pending is not None:
                    last = self._emit(writer, runner, *pending, bar, last)
                pending = (batch, handle)
            if pending is not None:
                last = self._emit(writer, runner, *pending, bar, last)
            writer.finish()
            bar.update(total - last)
        finally:
            feed.close()
            writer.stop()
            bar.close()

    @staticmethod
    def _emit(writer: ChunkWriter, runner, batch, handle, bar, last: int) -> int:
        feats = runner.collect(handle) if handle is not None else np.empty((0,), np.float32)
        writer.put(batch.tags, feats, batch.skipped)
        now = max([last - 1, *(batch.tags[-1:].tolist()), *(t for t, _ in batch.skipped)]) + 1
        bar.update(now - last)
        return now


def _h5_open(path: Path):
    import h5py
    return h5py.File(path, "r")
