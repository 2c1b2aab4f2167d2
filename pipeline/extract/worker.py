"""Stage 1's job: lay out the units (image, view), run reader -> backbone -> writer, assemble.

Reader: the source's per-image jobs (decode, resize, seeded augmentation) on the loader's
threads, in order, a few batches ahead. Backbone: the backend's runner, one batch in flight.
Writer: a thread writing finished chunks atomically. The three overlap; a killed run resumes from
its last finished chunk and ends with the same features.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.data.augment import augmented_view, name_index
from pipeline.data.sources import Listing
from pipeline.errors import DataWarning, UncleanFileError, UserError
from pipeline.extract.plan import ExtractRequest, ExtractResult, Plan, RunOptions, check_size, plan
from pipeline.extract.writer import ChunkWriter
from pipeline.features.store import ChunkDir, DegenerateFeatures, ItemTable, assemble, is_complete, read_parts_json
from pipeline.locking import exclusive_lock

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
            with contextlib.suppress(OSError), exclusive_lock(p.lock) as got:
                if got:
                    _clean_leftovers(p, log)
        return ExtractResult(p.path, p.key, cache_hit=True)
    check_size(p.size, options.allow_large)
    from pipeline.backend import require
    require()
    try:
        if options.shard is not None:  # shards run side by side: each holds its own lock, not the key's
            if options.force:
                raise UserError("--force cannot be combined with --shard; remove the cache (`cache rm`) first")
            i, n = options.shard
            shard_lock = p.path.with_suffix(f".shard-{i}-of-{n}.lock")
            with exclusive_lock(shard_lock, lambda: log(f"shard {i}/{n} of this request is already running; waiting")):
                return run_recorded(p, options, log)
        with exclusive_lock(p.lock, lambda: log(f"another extract of this request is running; waiting for it ({p.lock})")):
            options, hit = prepare_key(p, options, log)
            return hit or run_recorded(p, options, log)
    except OSError as exc:
        raise _disk_error(exc, p) from None


def prepare_key(p: Plan, options: RunOptions, log: Log) -> tuple[RunOptions, ExtractResult | None]:
    """Holding the key's lock: clean up after killed runs, then either start over (--force: the
    options come back with force and reuse off) or find that another process finished the file."""
    _clean_leftovers(p, log)
    if options.force:
        p.path.unlink(missing_ok=True)
        ChunkDir.remove_path(p.parts)
        return RunOptions(**{**asdict(options), "force": False, "reuse": False}), None
    if is_complete(p.path):
        return options, ExtractResult(p.path, p.key, cache_hit=True)
    return options, None


class _ReuseMismatch(Exception):
    """The reuse candidate's rows are not as wide as this request's (a damaged or crafted file)."""

    def __init__(self, theirs: tuple[int, ...], ours: tuple[int, ...]) -> None:
        super().__init__(f"{theirs} != {ours}")
        self.theirs, self.ours = theirs, ours


def _disk_error(exc: OSError, p: Plan) -> UserError | OSError:
    """Disk-full and permission errors as one line naming the folder; finished chunks stay."""
    if isinstance(exc, UncleanFileError):  # the CLI must leave without HDF5's shutdown: keep the type
        return exc
    where = Path(exc.filename).parent if getattr(exc, "filename", None) else p.path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the disk holding {where}; free some space (or use --cache-dir on "
                         f"another disk) and run the same command again: finished chunks are kept")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write to {where} ({exc.strerror}); choose a writable --cache-dir")
    return exc


def run_recorded(p: Plan, options: RunOptions, log: Log) -> ExtractResult:
    """Run the extraction inside a runs-registry record."""
    from pipeline.backend import name as backend_name
    from pipeline.tracking.runs import Registry
    config = {"backbone": p.spec.name, "data": p.request.data, "head": None, "cache_key": p.key,
              "cache_path": str(p.path), "request": p.request.to_json(), "backend": backend_name(),
              "params": {"size": p.size, "pooling": p.request.layer or p.request.pooling,
                         "weights": p.request.weights, "aug": p.request.augment_copies}}
    with Registry(options.cache_dir).start("extract", config) as run:
        result = ExtractionJob(p, options, log).run()
        run.finish("ok", {"rows": result.n_rows, "skipped": len(result.skipped), "seconds": result.seconds,
                          "images_per_s": result.images_per_s, "resumed_from": result.resumed_from,
                          "computed": result.computed, "reused": result.reused,
                          "reused_from": str(result.reused_from) if result.reused_from else None})
    result.run_id = run.id
    return result


class ExtractionJob:
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
        self.reuse = None
        self.reused = np.zeros(self.unit_index.size, bool)  # units copied from an older cache
        self._runner = None
        self._feat_shape: tuple[int, ...] = ()
        self._reuse_checked = False
        self._distributed = False  # a Ray actor's job (chunk sets handed in by the driver)

    @property
    def n_chunks(self) -> int:
        """Chunks of this job at the chunk size the parts folder was started with (its meta.json)."""
        return -(-self.unit_index.size // ChunkDir(self.p.parts, self.options.chunk_units).chunk_units)

    def compute_chunks(self, todo: list[int]) -> int:
        """Compute and write exactly the chunks `todo` (a distributed worker's share; no assembly);
        returns how many images it computed. Chunks are atomic and deterministic, so a chunk computed
        twice (a re-issued straggler) is simply written twice with the same content."""
        chunks = ChunkDir(self.p.parts, self.options.chunk_units)
        total = self.unit_index.size
        self._distributed = True
        if not self._reuse_checked and self.options.reuse:
            from pipeline.features.reuse import find_reuse, item_stats
            # size + mtime only: hashing here would read the whole data set once per worker
            self.reuse = find_reuse(self.p.path, self.p.key_material, self.listing.ids,
                                    item_stats(self.listing.paths), self.unit_index, self.unit_view)
            if self.reuse is not None:
                self.reused[self.reuse.tags] = True
            self._reuse_checked = True
        u = chunks.chunk_units
        in_todo = np.zeros(total, bool)
        for c in todo:
            in_todo[c * u:(c + 1) * u] = True
        self.compute = in_todo & ~self.reused
        needed = int(np.count_nonzero(self.compute))
        if todo:
            self._compute(chunks, sorted(todo), total, needed)
        return needed

    def run(self) -> ExtractResult:
        p, opts = self.p, self.options
        total = self.unit_index.size
        if total == 0:
            raise UserError(f"{p.request.data} contains no images")
        chunks = ChunkDir(p.parts, opts.chunk_units)
        u = chunks.chunk_units
        n_chunks = -(-total // u)
        done = set(chunks.done())
        shard = opts.shard
        if shard is not None:
            _check_shards(p, shard, n_chunks, done)
        else:
            _refuse_unfinished_shards(p, n_chunks, done)
        todo = [c for c in range(n_chunks) if c not in done and (shard is None or c % shard[1] == shard[0])]
        in_todo = np.zeros(total, bool)
        for c in todo:
            in_todo[c * u:(c + 1) * u] = True
        start = min(todo[0] * u, total) if todo else total
        if done:
            self.log(f"resuming: {sum(min(u, total - c * u) for c in done if c < n_chunks)} of {total} images "
                     f"already extracted")
        from pipeline.features.reuse import file_hashes, find_reuse, item_stats, write_hash_note
        stats = item_stats(self.listing.paths)
        mine = None  # a shard hashes the images of its own chunks and leaves a note; assembly hashes the rest
        if opts.content_hash and stats is not None:
            if shard is not None:
                mine = np.zeros(len(self.listing.paths), bool)
                mine[self.unit_index[in_todo]] = True
            hashes = file_hashes(self.listing.paths, p.parts, mine)
            if mine is not None and mine.any():
                write_hash_note(p.parts, f"shard{shard[0]}of{shard[1]}", hashes, mine)
            stats = (stats[0], stats[1], hashes)
        if opts.reuse and todo:
            self.reuse = find_reuse(p.path, p.key_material, self.listing.ids, stats, self.unit_index, self.unit_view)
        if self.reuse is not None:
            self.reused[self.reuse.tags] = True
            self.log(f"reusing {self.reuse.tags.size} feature row(s) of unchanged images from {self.reuse.base.name}")
        self.compute = in_todo & ~self.reused
        needed = int(np.count_nonzero(self.compute))
        t0 = time.perf_counter()
        try:
            if todo:
                try:
                    self._compute(chunks, todo, total, needed)
                except _ReuseMismatch as mismatch:  # a damaged candidate: skipped, as the reuse search skips others
                    warnings.warn(f"not reusing rows from {self.reuse.base.name}: it records this request but holds "
                                  f"features of shape {mismatch.theirs} where this backbone makes {mismatch.ours} "
                                  f"(a damaged file: python cli.py cache rm {self.reuse.base.name}); computing them",
                                  DataWarning, stacklevel=2)
                    self.reuse = None
                    self.reused[:] = False
                    self.compute = in_todo & ~self.reused
                    needed = int(np.count_nonzero(self.compute))
                    self._compute(chunks, todo, total, needed)
        finally:
            if shard is None and not chunks.done() and not (p.parts / SHARDS_FILE).exists():
                chunks.remove()  # nothing finished: leave no empty partial behind (shards may share it)
        if shard is not None:
            if is_complete(p.path) or not p.parts.exists():  # another shard assembled meanwhile
                return ExtractResult(p.path, p.key, cache_hit=False, computed=needed, shard=shard,
                                     n_chunks=n_chunks)
            finished = set(chunks.done())
            missing = [c for c in range(n_chunks) if c not in finished]
            if missing:
                return ExtractResult(p.path, p.key, cache_hit=False, seconds=time.perf_counter() - t0,
                                     computed=needed, shard=shard, n_chunks=n_chunks, missing_chunks=missing,
                                     reused=int(np.count_nonzero(self.reused & in_todo)))
            with exclusive_lock(p.lock) as got:  # the last shard to finish assembles, unless one already does
                if not got or is_complete(p.path):
                    return ExtractResult(p.path, p.key, cache_hit=False, computed=needed, shard=shard,
                                         n_chunks=n_chunks)
                if mine is not None:  # every image's: the shards' notes (ours too), then what none holds
                    stats = (stats[0], stats[1], file_hashes(self.listing.paths, p.parts))
                return self._assemble(chunks, stats, t0, needed, start, in_todo)
        return self._assemble(chunks, stats, t0, needed, start, in_todo)

    def _assemble(self, chunks: ChunkDir, stats, t0: float, needed: int, start: int, in_todo: np.ndarray
                  ) -> ExtractResult:
        p, opts = self.p, self.options
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
        items = ItemTable(self.listing.ids, self.listing.labels, self.listing.splits, self.listing.class_names,
                          *(stats if stats is not None else (None, None, None)))
        try:
            assemble(chunks, p.path, items, attrs, dtype=p.request.dtype, compression=opts.compression)
        except DegenerateFeatures as exc:
            chunks.remove()  # every chunk holds the same junk; a rerun must recompute
            raise UserError(str(exc)) from None
        chunks.remove()
        with _h5_open(p.path) as f:
            n_rows = int(f.attrs["n_rows"])
            skipped = list(zip(f["skipped_paths"].asstr()[:], f["skipped_reasons"].asstr()[:]))
        computed = needed
        return ExtractResult(p.path, p.key, cache_hit=False, n_rows=n_rows, skipped=skipped, seconds=seconds,
                             images_per_s=computed / seconds if computed and seconds > 0 else 0.0,
                             resumed_from=start, computed=computed,
                             reused=int(np.count_nonzero(self.reused & in_todo)),
                             reused_from=self.reuse.base if self.reuse is not None else None,
                             shard=opts.shard, n_chunks=-(-self.unit_index.size // chunks.chunk_units))

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

    def _model_key(self) -> tuple:
        """What decides the feature model's graph and weights (the weights by the cache key's own
        identity of them: a weights file by its contents)."""
        req = self.p.request
        return (self.p.spec, self.p.key_material["weights"], self.p.size, req.pooling, req.layer, req.precision)

    def jobs(self) -> Iterator[tuple[int, Callable[[], np.ndarray]]]:
        """(tag, job) for the units to compute, in order; augmented views wrap the clean image's job.
        Units of finished chunks, of other shards and copied from an older cache are not read."""
        req, size = self.p.request, self.p.size
        for a, b in zip(self.pass_bounds[:-1], self.pass_bounds[1:]):
            lo, hi = int(a), int(b)
            tags = np.arange(lo, hi)[self.compute[lo:hi]]
            if not tags.size:
                continue
            indices = self.unit_index[tags]
            raw = self.p.source.raw_images(self.listing, indices, size, req.resize)
            for tag, index, job in zip(tags.tolist(), indices, raw):
                view = int(self.unit_view[tag])
                if view:
                    job = functools.partial(augmented_view, job, req.augment, req.augment_seed, view,
                                            name_index(self.listing.ids[int(index)]))
                yield tag, job

    def _compute(self, chunks: ChunkDir, todo: list[int], total: int, needed: int) -> None:
        from tqdm import tqdm

        from pipeline.data.loader import Prefetcher, batches
        from pipeline.extract.runners import cached_runner
        size, bs = self.p.size, self.options.batch_size
        if needed == 0:  # every unit left is copied from an older cache: no model, no decoding
            writer = ChunkWriter(chunks, self.unit_index, self.unit_view, todo, total, self.reuse.feature_shape,
                                 np.dtype(self.p.request.dtype), self.reuse)
            writer.start()
            writer.finish()
            return
        # decoding starts while the model is built and traced
        feed = Prefetcher(batches(self.jobs(), bs, (size, size, 3), self.options.workers), depth=2)
        if self._runner is None:  # once per job (a Ray actor computes many chunk sets with it)
            # sized by the whole job's images to compute, not by those left (nor by a shard's or an actor's
            # part): a resumed tail or another shard runs on the same kernels (frozen graph or eager) as
            # the rest, so the features are bit-identical however the job was split or interrupted
            job_images = int(np.count_nonzero(~self.reused))
            self._runner, self._feat_shape = cached_runner(self._model_key(), self._model, size, bs,
                                                           self.options.jit, n_images=job_images)
        runner, feat_shape = self._runner, self._feat_shape
        if self.reuse is not None and tuple(self.reuse.feature_shape) != tuple(feat_shape):
            feed.close()  # nothing written yet: the caller starts again without the candidate
            raise _ReuseMismatch(tuple(self.reuse.feature_shape), tuple(feat_shape))
        writer = ChunkWriter(chunks, self.unit_index, self.unit_view, todo, total, feat_shape,
                             np.dtype(self.p.request.dtype), self.reuse)
        bar = tqdm(total=needed, unit="img", desc=f"extract {self.p.spec.name}",
                   disable=not self.options.progress, smoothing=0.1, dynamic_ncols=True, file=sys.stderr)
        writer.start()
        try:
            pending = None  # (batch, handle): one batch on the device while the next is handed over
            for batch in feed:
                handle = runner.submit(batch.images) if batch.tags.size else None
                if pending is not None:
                    self._emit(writer, runner, *pending, bar)
                pending = (batch, handle)
            if pending is not None:
                self._emit(writer, runner, *pending, bar)
            writer.finish()
        finally:
            feed.close()
            writer.stop()
            bar.close()

    @staticmethod
    def _emit(writer: ChunkWriter, runner, batch, handle, bar) -> None:
        feats = runner.collect(handle) if handle is not None else np.empty((0,), np.float32)
        writer.put(batch.tags, feats, batch.skipped)
        bar.update(int(batch.tags.size) + len(batch.skipped))


SHARDS_FILE = "shards.json"


def _check_shards(p: Plan, shard: tuple[int, int], n_chunks: int, done: set[int]) -> None:
    """Record the shard count in the parts folder; refuse a run that splits the chunks differently."""
    import json

    from pipeline.atomic import write_text_atomic
    marker = p.parts / SHARDS_FILE
    if shard == (0, 1):  # "compute every missing chunk here": fits any earlier split
        return
    if marker.exists():
        known = read_parts_json(marker, {"n": int, "n_chunks": int})
        if int(known["n"]) != shard[1] or int(known["n_chunks"]) != n_chunks:
            raise UserError(f"this extraction is already split into {known['n']} shards of {known['n_chunks']} "
                            f"chunks; use --shard I/{known['n']} with the same --chunk-size")
    else:
        write_text_atomic(marker, json.dumps({"n": shard[1], "n_chunks": n_chunks}))


def _refuse_unfinished_shards(p: Plan, n_chunks: int, done: set[int]) -> None:
    """A plain extract after sharded runs assembles only when every chunk is there; else it says which
    chunks (and shards) are missing rather than silently doing the shards' work."""
    marker = p.parts / SHARDS_FILE
    if not marker.exists():
        return
    n = read_parts_json(marker, {"n": int})["n"]
    missing = [c for c in range(n_chunks) if c not in done]
    if missing:
        shards = sorted({c % n for c in missing})
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UserError(f"{len(missing)} of {n_chunks} chunks are missing ({shown}), from shard(s) "
                        f"{', '.join(f'{i}/{n}' for i in shards)}: run those with --shard (or --shard 0/1 "
                        f"to compute every missing chunk here), then extract again to assemble")


def _h5_open(path: Path):
    import h5py
    return h5py.File(path, "r")
