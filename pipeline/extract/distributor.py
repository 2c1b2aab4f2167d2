"""Stage 1's entry point: `extract` guards a request once, then hands it to a distributor.

The guard is the same for every way of running: a finished cache is a hit (leftovers of killed
runs tidied), the size is checked, the backend is there, the key's lock is held (a shard holds its
own, as shards run side by side), leftovers and `--force` are dealt with under it, a file another
process finished meanwhile is a hit, the run is recorded in the runs registry, and a full or
read-only disk is one line, with finished chunks kept.

A distributor takes `(plan, options, log)` and returns the `ExtractResult`, driving the public
steps of `runner.ExtractionJob`: `local` (every missing chunk here), `shard` (`--shard I/N`: chunks
c with c % N == I; the last shard to finish assembles) and `ray_distributor.on_ray(...)` (chunks on
Ray actors, assembled here), as img2dataset gives each of its distributors one signature.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from pipeline.backend import name as backend_name
from pipeline.backend import require
from pipeline.errors import UncleanFileError, UserError
from pipeline.extract.concat import extract_concat, is_concat
from pipeline.extract.plan import ExtractRequest, ExtractResult, Plan, RunOptions, check_size, plan
from pipeline.extract.runner import ExtractionJob
from pipeline.features.store import ChunkDir, is_complete, refuse_damaged
from pipeline.locking import exclusive_lock, is_locked
from pipeline.tracking.runs import Registry

Log = Callable[[str], None]
Distributor = Callable[[Plan, RunOptions, Log], ExtractResult]


def to_stderr(message: str) -> None:
    """The default log of an extraction: one line on stderr."""
    print(message, file=sys.stderr)


def local(p: Plan, options: RunOptions, log: Log, ran: tuple[int, float] | None = None) -> ExtractResult:
    """Every missing chunk in this process, then the assembly (`ran`: see `ExtractionJob.assemble`)."""
    job = ExtractionJob(p, options, log)
    job.plan_chunks(ran=ran is not None)
    job.look_for_reuse()
    job.compute()
    return job.assemble(ran)


def shard(p: Plan, options: RunOptions, log: Log) -> ExtractResult:
    """Shard I/N's chunks (c % N == I); the last shard to finish assembles, unless one already does."""
    job = ExtractionJob(p, options, log)
    job.plan_chunks(options.shard)
    job.look_for_reuse()
    job.compute()
    if is_complete(p.path) or not p.parts.exists():  # another shard assembled meanwhile
        return job.shard_result()
    missing = job.missing_chunks()
    if missing:
        if options.shard == (0, 1) and job.n_shards > 1:  # a shard it left its chunks to may have stopped meanwhile
            held = job.running_shards()
            gone = sorted({c % job.n_shards for c in missing} - {i for i, n in held if n == job.n_shards})
            if gone:
                log(f"shard(s) {', '.join(f'{i}/{job.n_shards}' for i in gone)} stopped without finishing their "
                    f"chunks: run --shard 0/1 again to compute them here")
        return job.shard_result(missing)
    with exclusive_lock(p.lock) as got:
        if not got or is_complete(p.path):
            return job.shard_result()
        return job.assemble()


def extract(request: ExtractRequest, options: RunOptions = RunOptions(), log: Log = to_stderr,
            distributor: Distributor | None = None) -> ExtractResult:
    """Return the cache file for `request`, computing (or resuming) it only when needed: by
    `distributor` (default: `shard` with `options.shard`, else `local`). A concatenation 'a+b'
    extracts each backbone through this guard, then joins them (`concat.py`)."""
    if is_concat(request.backbone):
        if distributor is not None:
            raise UserError(f"--backbone {request.backbone} joins finished caches; extract each backbone with --ray "
                            f"first, then join them without it")
        return extract_concat(request, options, log, extract)
    p = plan(request, options.cache_dir)
    if not options.force and is_complete(p.path):
        if p.parts.exists() or any(p.path.parent.glob(f".{p.path.name}.*.tmp")):
            with contextlib.suppress(OSError), exclusive_lock(p.lock) as got:
                if got:
                    _clean_leftovers(p, log)
        return ExtractResult(p.path, p.key, cache_hit=True)
    if not options.force:
        refuse_damaged(p.path)
    check_size(p.size, options.allow_large)
    require()
    distribute = distributor or (shard if options.shard is not None else local)
    try:
        if options.shard is not None:  # shards run side by side: each holds its own lock, not the key's
            if options.force:
                raise UserError("--force cannot be combined with --shard; remove the cache (`cache rm`) first")
            i, n = options.shard
            if (i, n) != (0, 1) and is_locked(p.shard_lock(0, 1)):  # it computes this shard's chunks too: wait
                with exclusive_lock(p.shard_lock(0, 1), lambda: log("--shard 0/1 of this request is running and "
                                                                      "computes every missing chunk; waiting for it")):
                    pass
                if is_complete(p.path):
                    return ExtractResult(p.path, p.key, cache_hit=True)
            with exclusive_lock(p.shard_lock(i, n), lambda: log(f"shard {i}/{n} of this request is already running; waiting")):
                if is_complete(p.path):  # the copy we waited for finished the file: nothing is left to do
                    return ExtractResult(p.path, p.key, cache_hit=True)
                return run_recorded(p, options, log, distribute)
        with exclusive_lock(p.lock, lambda: log(f"another extract of this request is running; waiting for it ({p.lock})")):
            options, hit = _prepare_key(p, options, log)
            return hit or run_recorded(p, options, log, distribute)
    except OSError as exc:
        raise _disk_error(exc, p) from None


def _prepare_key(p: Plan, options: RunOptions, log: Log) -> tuple[RunOptions, ExtractResult | None]:
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


def run_recorded(p: Plan, options: RunOptions, log: Log, distribute: Distributor = local) -> ExtractResult:
    """Run `distribute` inside a runs-registry record (stage `extract`) with the result's figures."""
    config = {"backbone": p.spec.name, "data": p.request.data, "head": None, "cache_key": p.key,
              "cache_path": str(p.path), "request": p.request.to_json(), "backend": backend_name(),
              "params": {"size": p.size, "pooling": p.request.layer or p.request.pooling,
                         "weights": p.request.weights, "aug": p.request.augment_copies}}
    with Registry(options.cache_dir).start("extract", config) as run:
        result = distribute(p, options, log)
        run.finish("ok", {"rows": result.n_rows, "skipped": len(result.skipped), "seconds": result.seconds,
                          "images_per_s": result.images_per_s, "resumed_from": result.resumed_from,
                          "computed": result.computed, "reused": result.reused,
                          "reused_from": str(result.reused_from) if result.reused_from else None,
                          "distributor": result.distributor})
    result.run_id = run.id
    return result


def _clean_leftovers(p: Plan, log: Log) -> None:
    """Under the lock: remove temporary files of a killed assembly and the parts of a finished key."""
    for tmp in p.path.parent.glob(f".{p.path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        log(f"removed {tmp.name}, left by an interrupted assembly")
    if p.parts.exists() and is_complete(p.path):
        ChunkDir.remove_path(p.parts)


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
