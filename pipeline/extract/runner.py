"""Stage 1's runner: one extraction job, chunk by chunk: reader -> mapper -> writer, then assembly.

Reader: the source's per-image jobs (decode, resize, seeded augmentation, `pipeline.data`) on the
loader's threads, in order, a few batches ahead. Mapper: the backend's backbone call
(`mapper.py`), one batch in flight. Writer: a thread writing finished chunks atomically
(`writer.py`). The three overlap; a killed run resumes from its last finished chunk and ends with
the same features.

Every way of running (`distributor.py`: local, --shard; `ray_distributor.py`) drives the same
public steps of `ExtractionJob`: `plan_chunks` (which chunks are left, shard bookkeeping),
`look_for_reuse`, `compute` (or `compute_chunks` for a Ray actor's share), `assemble`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_text_atomic
from pipeline.backbones import model as backbone_model
from pipeline.backend import mixed_policy
from pipeline.data.augment import augmented_view, name_index
from pipeline.data.loader import Prefetcher, batches
from pipeline.data.sources import Listing
from pipeline.errors import DataWarning, UserError
from pipeline.extract.mapper import cached_runner
from pipeline.extract.plan import ExtractResult, Plan, RunOptions, image_rate
from pipeline.extract.writer import ChunkWriter
from pipeline.features.reuse import file_hashes, find_reuse, item_stats, moved_message, write_hash_note
from pipeline.features.store import (PARTS_SUFFIX, ChunkDir, DegenerateFeatures, ItemTable, NoImageRead, OneImage, assemble,
                                     cache_rm_command, read_parts_json, read_skipped)
from pipeline.locking import is_locked, shard_locks

Log = Callable[[str], None]
SHARDS_FILE = "shards.json"  # in the parts folder: how many shards split this job's chunks


class _ReuseMismatch(Exception):
    """The reuse candidate's rows are not as wide as this request's (a damaged or crafted file)."""

    def __init__(self, theirs: tuple[int, ...], ours: tuple[int, ...]) -> None:
        super().__init__(f"{theirs} != {ours}")
        self.theirs, self.ours = theirs, ours


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
        self.model_seconds = 0.0  # building the backbone model, in this process (`_timed_model`)
        self.n_skipped = 0  # images of this run's compute that could not be read (each is counted once)
        self.chunks: ChunkDir | None = None  # the parts folder, from `plan_chunks` (or `n_chunks`)

    @property
    def n_chunks(self) -> int:
        """Chunks of this job at the chunk size the parts folder was started with (its meta.json; read
        once: a finished job's parts folder is gone, and asking must not make it again)."""
        if self.chunks is None:
            self.chunks = ChunkDir(self.p.parts, self.options.chunk_units)
        return -(-self.unit_index.size // self.chunks.chunk_units)

    def compute_chunks(self, todo: list[int]) -> int:
        """Compute and write exactly the chunks `todo` (a distributed worker's share; no assembly);
        returns how many images it computed. Chunks are atomic and deterministic, so a chunk computed
        twice (a re-issued straggler) is simply written twice with the same content."""
        chunks = ChunkDir(self.p.parts, self.options.chunk_units)
        total = self.unit_index.size
        if not self._reuse_checked and self.options.reuse:
            # size + mtime only: hashing here would read the whole data set once per worker
            self.reuse = find_reuse(self.p.path, self.p.key_material, self.listing.ids,
                                    item_stats(self.listing.paths), self.unit_index, self.unit_view)
            if self.reuse is not None:
                self.reused[self.reuse.tags] = True
            self._reuse_checked = True
        self.compute_mask = self._units_of(todo, chunks.chunk_units) & ~self.reused
        needed = int(np.count_nonzero(self.compute_mask))
        skipped_before = self.n_skipped
        if todo:
            self._compute(chunks, sorted(todo), total, needed)
        return needed - (self.n_skipped - skipped_before)  # rows computed: a skipped file is not one

    def _units_of(self, chunks: list[int], chunk_units: int) -> np.ndarray:
        """A mask over the job's units: those in `chunks`."""
        mask = np.zeros(self.unit_index.size, bool)
        for c in chunks:
            mask[c * chunk_units:(c + 1) * chunk_units] = True
        return mask

    def plan_chunks(self, shard: tuple[int, int] | None = None, ran: bool = False) -> list[int]:
        """The chunks still to compute (of shard I/N's share: chunks c with c % N == I), with the shard
        bookkeeping: a sharded run records the split in the parts folder and refuses another one; an
        unsharded run refuses to do the work of shards that have not finished."""
        p, total = self.p, self.unit_index.size
        if total == 0:
            raise UserError(f"{p.request.data} contains no images")
        self.chunks = ChunkDir(p.parts, self.options.chunk_units)
        u, n_chunks = self.chunks.chunk_units, self.n_chunks
        done = set(self.chunks.done())
        self.shard = shard
        self.n_shards = shard[1] if shard is not None else 0  # into how many shards the job's chunks are split
        if shard is not None:
            _check_shards(p, shard, n_chunks, done)
        else:
            _refuse_unfinished_shards(p, n_chunks, done)
        self.todo = [c for c in range(n_chunks) if c not in done and (shard is None or c % shard[1] == shard[0])]
        if shard == (0, 1):
            self.todo = self._leave_running_shards(self.todo)
        self.in_todo = self._units_of(self.todo, u)
        self.start = min(self.todo[0] * u, total) if self.todo else total
        if done and not ran:  # `ran`: the chunks are this run's own (Ray's workers wrote them), none resumed
            self.log(f"resuming: {sum(min(u, total - c * u) for c in done if c < n_chunks)} of {total} images "
                     f"already extracted")
        if u != self.options.chunk_units:  # the chunks already written fix their size for the whole run
            self.log(f"note: the unfinished extraction cuts chunks of {u} images, so --chunk-size "
                     f"{self.options.chunk_units} is not used")
        return self.todo

    def _leave_running_shards(self, todo: list[int]) -> list[int]:
        """`--shard 0/1` (every missing chunk) leaves the share of each shard running now to it: the
        chunks would be computed twice. Whichever run finishes last assembles the file."""
        running = self.running_shards()
        for i, n in running:
            self.n_shards = n
            left = [c for c in todo if c % n == i]
            if left:
                self.log(f"shard {i}/{n} is running: its {len(left)} missing chunk(s) are left to it")
        return [c for c in todo if not any(c % n == i for i, n in running)]

    def running_shards(self) -> list[tuple[int, int]]:
        """(I, N) of every `--shard I/N` of this job running now (holding its lock), 0/1 left out: found
        by their lock files, which a shard holds from before it lists the data, unlike its shards.json."""
        return sorted(shard for shard, lock in shard_locks(self.p.path).items() if shard != (0, 1) and is_locked(lock))

    def look_for_reuse(self) -> None:
        """Before computing the planned chunks: the files' identities (size, mtime; with --content-hash
        their SHA-256, a shard hashing only its own images and leaving a note for the assembly), and
        an older cache of the same request whose rows of unchanged images can be copied."""
        p, opts = self.p, self.options
        stats = item_stats(self.listing.paths)
        self.hashed_all = True
        if opts.content_hash and stats is not None:
            mine = None
            if self.shard is not None:
                mine = np.zeros(len(self.listing.paths), bool)
                mine[self.unit_index[self.in_todo]] = True
                self.hashed_all = False
            hashes = file_hashes(self.listing.paths, p.parts, mine)
            if mine is not None and mine.any():
                write_hash_note(p.parts, f"shard{self.shard[0]}of{self.shard[1]}", hashes, mine)
            stats = (stats[0], stats[1], hashes)
        self.stats = stats
        if opts.reuse and self.todo:
            self.reuse = find_reuse(p.path, p.key_material, self.listing.ids, stats, self.unit_index, self.unit_view)
        if self.reuse is not None:
            self.reused[self.reuse.tags] = True
            self.log(f"reusing {self.reuse.tags.size} feature row(s) of unchanged images from {self.reuse.base.name}")
            moved = self.reuse.moved(self.listing.ids, self.listing.splits, self.unit_index, self.unit_view)
            if moved and opts.warn_moved:
                warnings.warn(moved_message(moved, self.reuse.base.name, self.listing.split_origin),
                              DataWarning, stacklevel=2)

    def compute(self) -> int:
        """Compute and write the planned chunks (reader -> mapper -> writer); returns the images computed
        (skipped files left out). A reuse candidate whose rows turn out the wrong width is dropped and
        everything computed."""
        p, total = self.p, self.unit_index.size
        self.compute_mask = self.in_todo & ~self.reused
        self.needed = int(np.count_nonzero(self.compute_mask))
        self.t0 = time.perf_counter()
        try:
            if self.todo:
                try:
                    self._compute(self.chunks, self.todo, total, self.needed)
                except _ReuseMismatch as mismatch:  # a damaged candidate: skipped, as the reuse search skips others
                    warnings.warn(f"not reusing rows from {self.reuse.base.name}: it records this request but holds "
                                  f"features of shape {mismatch.theirs} where this backbone makes {mismatch.ours} "
                                  f"(a damaged file: {cache_rm_command(self.reuse.base)}); computing them",
                                  DataWarning, stacklevel=2)
                    self.reuse = None
                    self.n_skipped = 0  # the files are read again from the start
                    self.reused[:] = False
                    self.compute_mask = self.in_todo & ~self.reused
                    self.needed = int(np.count_nonzero(self.compute_mask))
                    self._compute(self.chunks, self.todo, total, self.needed)
        finally:
            if self.shard is None and not self.chunks.done() and not (p.parts / SHARDS_FILE).exists():
                self.chunks.remove()  # nothing finished: leave no empty partial behind (shards may share it)
        return self.computed

    @property
    def computed(self) -> int:
        """Rows this job's compute made: the images it read (`needed`), less those it skipped."""
        return self.needed - self.n_skipped

    def missing_chunks(self) -> list[int]:
        """Chunks no run has finished yet (a shard's run: what other shards still owe)."""
        done = set(self.chunks.done())
        return [c for c in range(self.n_chunks) if c not in done]

    def shard_result(self, missing: list[int] | None = None) -> ExtractResult:
        """A shard's result when it does not assemble: the file is not (or already) there."""
        extra = {} if missing is None else {"seconds": time.perf_counter() - self.t0, "missing_chunks": missing,
                                            "reused": int(np.count_nonzero(self.reused & self.in_todo))}
        return ExtractResult(self.p.path, self.p.key, cache_hit=False, computed=self.computed, shard=self.shard,
                             n_chunks=self.n_chunks, n_shards=self.n_shards, distributor="shard",
                             model_seconds=self.model_seconds, **extra)

    def assemble(self, ran: tuple[int, float] | None = None) -> ExtractResult:
        """Every chunk is there: write the HDF5 file (items, attributes, features) and remove the parts.
        `ran`: (images computed, seconds) where other processes computed the chunks (Ray's workers),
        so the file records that run's time and rate, not this assembly's."""
        p, opts, chunks = self.p, self.options, self.chunks
        if not self.hashed_all:  # every image's: the shards' notes (ours too), then what none holds
            self.stats = (self.stats[0], self.stats[1], file_hashes(self.listing.paths, p.parts))
        seconds = time.perf_counter() - self.t0
        # images read (skipped ones too: the rate counts them) and rows made; Ray's workers report rows
        read, made = (ran[0], ran[0]) if ran is not None else (self.needed, self.computed)
        seconds += ran[1] if ran is not None else 0.0
        rate = image_rate(read, seconds, self.model_seconds)  # the backbone build left out
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
        if read:  # what `fit-head --backbone a,b` shows
            attrs["images_per_s"] = round(rate, 2)
        items = ItemTable(self.listing.ids, self.listing.labels, self.listing.splits, self.listing.class_names,
                          *(self.stats if self.stats is not None else (None, None, None)))
        try:
            assemble(chunks, p.path, items, attrs, dtype=p.request.dtype, compression=opts.compression)
        except (NoImageRead, OneImage):
            chunks.remove()  # nothing read, or one picture: the data is what to fix, not the weights or the dtype
            raise
        except DegenerateFeatures as exc:
            chunks.remove()  # every chunk holds the same junk; a rerun must recompute
            req = p.request  # random-init activations underflow in half precision: say which flag is half
            ways = [flag for flag, on in (("use trained --weights", str(req.weights).lower() == "none"),
                                          ("--dtype float32", req.dtype == "float16"),
                                          ("--precision float32", req.precision == "mixed")) if on]
            raise UserError(f"{exc}; {', or '.join(ways) or 'check the backbone and its weights'}") from None
        chunks.remove()
        with _h5_open(p.path) as f:
            n_rows = int(f.attrs["n_rows"])
            skipped = read_skipped(f)
        return ExtractResult(p.path, p.key, cache_hit=False, n_rows=n_rows, skipped=skipped, seconds=seconds,
                             images_per_s=rate, resumed_from=self.start, computed=made,
                             reused=int(np.count_nonzero(self.reused & self.in_todo)),
                             reused_from=self.reuse.base if self.reuse is not None else None,
                             shard=self.shard, n_chunks=self.n_chunks, model_seconds=self.model_seconds,
                             distributor="local" if self.shard is None else "shard")

    # -- the worker
    def _model(self):
        import keras  # noqa: PLC0415 - TensorFlow takes seconds to import

        if self.p.request.precision == "mixed":
            keras.mixed_precision.set_global_policy(mixed_policy())
        try:
            return backbone_model.feature_model(self.p.spec, self.p.request.weights, self.p.size,
                                 self.p.request.pooling, self.p.request.layer)
        finally:
            keras.mixed_precision.set_global_policy("float32")

    def _timed_model(self):
        """`_model`, its seconds added to `model_seconds`: the build is not image throughput, and a
        benchmark of steady-state speed (bench/extract.py) leaves it out."""
        t = time.perf_counter()
        try:
            return self._model()
        finally:
            self.model_seconds += time.perf_counter() - t

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
            tags = np.arange(lo, hi)[self.compute_mask[lo:hi]]
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
            self._runner, self._feat_shape = cached_runner(self._model_key(), self._timed_model, size, bs,
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

    def _emit(self, writer: ChunkWriter, runner, batch, handle, bar) -> None:
        feats = runner.collect(handle) if handle is not None else np.empty((0,), np.float32)
        writer.put(batch.tags, feats, batch.skipped)
        self.n_skipped += len(batch.skipped)
        bar.update(int(batch.tags.size) + len(batch.skipped))


def _check_shards(p: Plan, shard: tuple[int, int], n_chunks: int, done: set[int]) -> None:
    """Record the shard count in the parts folder; refuse a run that splits the chunks differently."""
    marker = p.parts / SHARDS_FILE
    if shard == (0, 1):  # "compute every missing chunk here": fits any earlier split
        return
    if shard[0] >= n_chunks:
        warnings.warn(f"shard {shard[0]}/{shard[1]} has no chunk to compute: this job has {n_chunks} chunk(s) "
                      f"(chunks c with c % {shard[1]} == {shard[0]} are its share); a smaller --chunk-size makes more",
                      DataWarning, stacklevel=3)
    if not marker.exists() and not done:
        _warn_other_sharded_job(p)
    if marker.exists():
        known = read_parts_json(marker, {"n": int, "n_chunks": int})
        if int(known["n"]) != shard[1] or int(known["n_chunks"]) != n_chunks:
            raise UserError(f"this extraction is already split into {known['n']} shards of {known['n_chunks']} "
                            f"chunks; use --shard I/{known['n']} with the same --chunk-size")
    else:
        write_text_atomic(marker, json.dumps({"n": shard[1], "n_chunks": n_chunks, "job": _job_identity(p)}))


def _job_identity(p: Plan) -> str:
    """The request without what its files' sizes, dates and classes add to the key: equal for the
    shards of one job run on a data folder that changed between them."""
    data = {k: v for k, v in p.key_material["data"].items() if k not in ("fingerprint", "class_names")}
    material = json.dumps({**p.key_material, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _warn_other_sharded_job(p: Plan) -> None:
    """A shard starting a job while a sharded job of the same request on the same data source is
    unfinished under another key: the data listing changed between its shards (a file touched or
    added: the key covers every file's size and date), so the two would never join."""
    ours = _job_identity(p)
    others = []
    for d in p.parts.parent.glob(f"*{PARTS_SUFFIX}"):
        try:
            if d != p.parts and json.loads((d / SHARDS_FILE).read_text()).get("job") == ours:
                others.append(d)
        except (OSError, ValueError, AttributeError):  # not sharded, or an older note without the job
            continue
    if others:
        warnings.warn(f"a sharded extraction of this request on {p.request.data} is unfinished under another key "
                      f"({others[0].name}): the data changed since its shards ran (the key covers every file's size "
                      f"and date), so the two will not join; run every shard on the same files "
                      f"(`{cache_rm_command(others[0])}` "
                      f"removes the other)", DataWarning, stacklevel=4)


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
    return h5py.File(path, "r")
