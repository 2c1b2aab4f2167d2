"""Extraction on a Ray cluster: `extract --ray [ADDRESS]` (extra `.[ray]`, imported only when used).

The driver plans the units and chunks exactly as a plain run (`runner.ExtractionJob`), under the
same guard (`distributor.extract`; this is its `on_ray` distributor). Ray actors,
one per GPU where the cluster has GPUs, else `--workers` CPU actors, each build the model once and
compute whole chunks. Where an actor sees the driver's `.parts` folder (a shared filesystem: the
driver leaves a probe file there and each actor looks for it) it writes its chunks there, each
atomically; where it does not, it computes into a node-local folder and sends each finished chunk
back to the driver through Ray's object store, and the driver writes it. Either way the driver then
assembles the same HDF5 file a single process writes. Only missing chunks are scheduled, so a rerun resumes; a chunk whose actor dies is
rescheduled on another (a replacement actor is started); when nothing is left to hand out, idle
actors re-run the oldest chunks still in flight so one slow worker does not hold the job (chunks
are deterministic, whichever copy lands first wins).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.errors import UserError
from pipeline.extract.distributor import Distributor, extract, local, to_stderr
from pipeline.extract.plan import ExtractRequest, ExtractResult, Plan, RunOptions, plan
from pipeline.extract.runner import ExtractionJob
from pipeline.features.store import ChunkDir, chunk_file
from pipeline.quiet_fd import muted_stderr

Log = Callable[[str], None]
MAX_RESTARTS = 4  # replacement actors per job before giving up


def _ray():
    try:
        import ray  # noqa: PLC0415 - the optional extra .[ray]
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e \".[ray]\"") from None
    return ray


class _ChunkWorker:
    """A Ray actor: rebuilds the plan from the request (refusing a node whose libraries give another
    cache key), builds the model once, computes the chunk lists it is handed."""

    def __init__(self, request: dict[str, Any], options: dict[str, Any], key: str, cwd: str,
                 probe: tuple[str, str] | None = None, transport: str = "auto") -> None:
        if os.path.isdir(cwd):  # relative --data paths mean what they mean on the driver
            os.chdir(cwd)
        req = ExtractRequest.from_json(request)
        opts = RunOptions(**options)
        p = plan(req, opts.cache_dir)
        if p.key != key:
            raise UserError(f"this node computes cache key {p.key[:16]}, the driver {key[:16]}: install the same "
                            f"versions of the tool, Keras and the backend on every node")
        self.shared = transport == "shared" or (transport == "auto" and _sees(probe))
        self.local: Path | None = None
        if not self.shared:  # chunks go to a node-local folder, then back to the driver
            _sweep_dead_actor_folders(Path(tempfile.gettempdir()))
            # mkdtemp's private (0700) folder, for this actor's lifetime; its pid and host name it
            self.local = Path(tempfile.mkdtemp(prefix=f"featurecache-ray-{os.getpid()}-{_host()}-"))
            p = dataclasses.replace(p, path=self.local / p.path.name)
            ChunkDir(p.parts, opts.chunk_units)  # the driver's chunk size (its meta.json's)
        self.job = ExtractionJob(p, opts, lambda m: None)
        if self.local is not None:  # no chunk data stays on the node between chunks
            shutil.rmtree(self.job.p.parts, ignore_errors=True)

    def compute(self, todo: list[int]) -> tuple[list[int], int, dict[int, bytes] | None]:
        """(chunks, images computed, the chunk files' bytes when the driver must write them)."""
        if self.local is None:
            return todo, self.job.compute_chunks(todo), None
        try:  # the parts folder inside our private folder: made by compute_chunks, removed after each chunk
            n = self.job.compute_chunks(todo)
            payload = {c: chunk_file(self.job.p.parts, c).read_bytes() for c in todo}
        finally:
            shutil.rmtree(self.job.p.parts, ignore_errors=True)
        return todo, n, payload

    def close(self) -> None:
        """Remove this actor's node-local folder (the driver calls it when the job is done; an actor
        killed mid-chunk leaves it to the sweep of the next actor on its node)."""
        if getattr(self, "local", None) is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    __del__ = close

    def node(self) -> str:
        return socket.gethostname()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def _sweep_dead_actor_folders(tmp: Path) -> None:
    """Remove node-local folders of actors that died (killed when the driver finished while they
    computed a re-issued straggler): `featurecache-ray-<pid>-<this host>-*` owned by this user whose
    pid runs no process here. Best effort: a folder it cannot judge is left alone."""
    host, uid = _host(), os.getuid()
    for folder in tmp.glob("featurecache-ray-*"):
        try:
            pid, _, rest = folder.name[len("featurecache-ray-"):].partition("-")
            if (not pid.isdigit() or not rest.startswith(host + "-") or folder.is_symlink() or not folder.is_dir()
                    or folder.stat().st_uid != uid):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except Exception:  # noqa: BLE001 - alive (another user's, PermissionError), or a pid out of range: leave it
            continue


def _sees(probe: tuple[str, str] | None) -> bool:
    """Whether this node sees the driver's probe file (so its `.parts` folder is shared)."""
    if probe is None:
        return True
    try:
        return Path(probe[0]).read_text() == probe[1]
    except OSError:
        return False


def extract_ray(request: ExtractRequest, options: RunOptions, address: str | None = None,
                n_workers: int | None = None, log: Log = to_stderr,
                on_chunk: Callable[[int, list], None] | None = None, transport: str = "auto") -> ExtractResult:
    """`extract` with the Ray distributor (`on_ray`): the missing chunks of `request` on Ray actors,
    assembled on the driver; the same guard as every extraction (cache hit, lock, --force, disk errors)."""
    _ray()  # a missing extra is one line before any lock is taken or run recorded
    return extract(request, options, log, distributor=on_ray(address, n_workers, on_chunk, transport))


def on_ray(address: str | None = None, n_workers: int | None = None,
           on_chunk: Callable[[int, list], None] | None = None, transport: str = "auto") -> Distributor:
    """The Ray distributor (`distributor.Distributor`'s signature).

    `address`: None or 'local' starts a local cluster, 'auto' joins the running one, else a
    `ray://` or `host:port` address. `on_chunk(n_done, actors)` is called after each finished
    chunk (tests use it to kill a worker or the driver mid-run). `transport`: 'auto' (each actor
    writes to the shared `.parts` folder if it sees it, else sends chunks back), 'shared' or 'driver'.
    """

    def distribute(p: Plan, options: RunOptions, log: Log) -> ExtractResult:
        ray = _ray()
        chunks = ChunkDir(p.parts, options.chunk_units)
        options = dataclasses.replace(options, chunk_units=chunks.chunk_units)  # the folder's, for every actor
        job = ExtractionJob(p, options, log)
        todo = job.plan_chunks()
        t0 = time.perf_counter()
        computed = 0
        if todo:
            computed = _run_on_ray(ray, p, options, todo, address, n_workers, log, on_chunk, transport)
            unseen = sorted(set(todo) - set(chunks.done()))
            if unseen:
                raise UserError(f"the Ray workers wrote {len(todo) - len(unseen)} of {len(todo)} chunks where this "
                                f"driver can see them ({p.parts}): the cache folder must be on a filesystem every "
                                f"node shares (give --cache-dir on it)")
        seconds = time.perf_counter() - t0
        result = local(p, options, log, ran=(computed, seconds))  # every chunk is there: this only assembles
        result.computed, result.seconds, result.distributor = computed, seconds, "ray"
        result.images_per_s = computed / seconds if computed and seconds > 0 else 0.0
        return result

    return distribute


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on a `host:port` (or `ray://host:port`) nothing listens on; `ray.init` itself
    retries such an address for minutes before giving up."""
    if address in (None, "local", "auto"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray takes host:port (e.g. 10.0.0.5:6379) or ray://host:port, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"could not reach a Ray cluster at {address!r} ({exc.strerror or exc}); start one with "
                        f"`ray start --head` there, check the address, or drop it for a local cluster") from None


def _run_on_ray(ray, p, options: RunOptions, todo: list[int], address: str | None, n_workers: int | None,
                log: Log, on_chunk, transport: str = "auto") -> int:
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address in (None, "local"):  # "local": a new cluster even where another runs on this machine
            kwargs.update(address="local", num_cpus=os.cpu_count())
        else:
            kwargs["address"] = address
        env = {k: v for k, v in os.environ.items() if k in ("KERAS_BACKEND", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")}
        kwargs["runtime_env"] = {"env_vars": env} if env else None
        _check_reachable(address)
        try:
            remote = address not in (None, "local")  # (a local cluster's processes would inherit the mute)
            with muted_stderr(show_on_error=False) if remote else contextlib.nullcontext():
                ray.init(**kwargs)  # Ray's C++ client prints every failed retry to fd 2
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"could not reach a Ray cluster at {address!r} ({' '.join(str(exc).split())[:160]}); "
                            f"start one with `ray start --head` or drop the address for a local cluster") from None
        started = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = n_workers or (gpus if gpus else max(1, min(int(resources.get("CPU", 1)), 4)))
        count = max(1, min(count, len(todo)))
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": max(1, int(resources.get("CPU", 1)) // count)}
        threads = None if gpus else per_actor["num_cpus"]
        opts = {**asdict(options), "progress": False, "workers": options.workers or threads,
                "cache_dir": str(os.path.abspath(options.cache_dir))}
        Actor = ray.remote(max_restarts=0)(_ChunkWorker).options(**per_actor)
        cwd = os.getcwd()
        made: list = []
        probe = (str(os.path.abspath(p.parts / f"ray-probe-{uuid.uuid4().hex[:8]}")), uuid.uuid4().hex)
        write_text_atomic(Path(probe[0]), probe[1])

        def make():
            made.append(Actor.remote(p.request.to_json(), opts, p.key, cwd, probe, transport))
            return made[-1]

        def receive(chunk: int, data: bytes) -> None:  # a chunk sent back by an actor without the shared folder
            with atomic_path(chunk_file(p.parts, chunk), suffix=".npz") as tmp:
                Path(tmp).write_bytes(data)

        actors = [make() for _ in range(count)]
        each = "1 GPU" if gpus else f"{per_actor['num_cpus']} CPU"
        log(f"ray: {count} worker(s) ({each} each) computing {len(todo)} chunk(s) of {options.chunk_units} images")
        try:
            return _schedule(ray, actors, make, todo, log, on_chunk, tqdm(
                total=len(todo), unit="chunk", desc="extract (ray)", disable=not options.progress, file=sys.stderr),
                receive)
        finally:
            if transport != "shared":  # idle actors remove their node-local folders; busy ones are not waited for
                ray.wait([actor.close.remote() for actor in made], num_returns=len(made), timeout=5)
            for actor in made:  # stragglers still computing a chunk another actor finished
                ray.kill(actor)
            Path(probe[0]).unlink(missing_ok=True)
    finally:
        if started:
            ray.shutdown()


def _schedule(ray, actors: list, make, todo: list[int], log: Log, on_chunk, bar,
              receive: Callable[[int, bytes], None] | None = None) -> int:
    """Hand chunks to idle actors until all are written; reschedule a dead actor's chunk; re-issue
    stragglers to idle actors once nothing new is left."""
    pending = collections.deque(todo)
    done: set[int] = set()
    in_flight: dict[Any, tuple[Any, int, float]] = {}  # ref -> (actor, chunk, started)
    idle = list(actors)
    restarts, computed = 0, 0
    try:
        while len(done) < len(todo):
            while idle:
                chunk = _next_chunk(pending, in_flight, done)
                if chunk is None:
                    break
                actor = idle.pop()
                in_flight[actor.compute.remote([chunk])] = (actor, chunk, time.monotonic())
            if not in_flight:
                raise UserError("every Ray worker failed; see the Ray logs (`ray logs`) and run again to resume")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            actor, chunk, _ = in_flight.pop(ref)
            try:
                finished, n, payload = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                _raise_user_error(exc)
                restarts += 1
                if chunk not in done and chunk not in {c for _, c, _ in in_flight.values()}:
                    pending.appendleft(chunk)
                log(f"ray: a worker died computing chunk {chunk}; rescheduled"
                    + ("" if restarts > MAX_RESTARTS else ", starting a replacement"))
                if restarts <= MAX_RESTARTS:
                    idle.append(make())
                continue
            except ray.exceptions.RayTaskError as exc:
                _raise_user_error(exc)
                raise
            idle.append(actor)
            for c, data in (payload or {}).items():
                if c not in done and receive is not None:
                    receive(c, data)
            for c in finished:
                if c not in done:
                    done.add(c)
                    computed += n
                    bar.update(1)
            if on_chunk is not None:
                on_chunk(len(done), actors + [a for a, _, _ in in_flight.values()])
    finally:
        bar.close()
    return computed


def _raise_user_error(exc: BaseException) -> None:
    """A worker's UserError (bad data, a node with other library versions) ends the job in one line."""
    found = re.search(r"UserError: (.+)", str(exc))
    if found:
        raise UserError(found.group(1).strip()) from None


def _next_chunk(pending: collections.deque, in_flight: dict, done: set[int]) -> int | None:
    """The next chunk nobody computes yet; with none left, the oldest one still in flight (a
    straggler re-issued), unless it already runs twice."""
    while pending:
        chunk = pending.popleft()
        if chunk not in done:
            return chunk
    running = collections.Counter(c for _, c, _ in in_flight.values())
    for _, chunk, _ in sorted(in_flight.values(), key=lambda v: v[2]):
        if chunk not in done and running[chunk] < 2:
            return chunk
    return None
