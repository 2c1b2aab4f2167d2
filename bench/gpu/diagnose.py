"""Measurements behind bench/gpu/diagnose.sh (not a test): where extraction's time goes after decoding,
and what bounds the loader. Each subcommand prints one line per measurement.

  env       CPU counts as Python, the affinity mask and the cgroup quota see them; the loader's default
            thread count; library versions
  loader    one-thread cost of each decode stage; then the loader alone (pipeline.data.loader.batches) at
            several thread counts and with decode variants, each with the CPU it used (cores busy), minor
            page faults and context switches per image:
              as-is   the pipeline's load_file
              cvt     BGR->RGB by cv2.cvtColor instead of numpy's reversed-stride copy (same pixels)
              nohdr   cvt, and the Pillow header parse (held GIL) replaced by a cv2-only decode
              procs   as-is in worker processes (no shared GIL; pickled arrays): a GIL-free reference
  extract   `extract()` end to end (bench/extract.py's (ii)) twice in one process: cold (runner built and
            compiled) and warm (this process's cached runner: no build, no compile), each with a breakdown:
            planning (listing, key), runner, first batch, first submit (JAX traces + compiles there),
            feed waits, submit/collect, writer.put blocking, writer busy (np.savez, fsync), assembly, and
            the XLA compiles counted (JAX)

    python bench/gpu/diagnose.py env
    python bench/gpu/diagnose.py loader --data .photos/train --repeat 10 --workers 4,8,16,32
    KERAS_BACKEND=jax python bench/gpu/diagnose.py extract --data .photos/train --repeat 20 \\
        --backbone efficientnet_lite0 --weights imagenet --precision mixed --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


# ------------------------------------------------------------------------------------------- env
def cmd_env(args) -> None:
    from pipeline.data.loader import default_workers
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    quota = "?"
    for f in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        with contextlib.suppress(OSError):
            quota = f"{f}: {Path(f).read_text().strip()}"
            break
    model, siblings, cores = "?", "?", "?"
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k == "model name":
                model = v.strip()
            elif k == "siblings":
                siblings = v.strip()
            elif k == "cpu cores":
                cores = v.strip()
    print(f"env: os.cpu_count {os.cpu_count()}, affinity {aff}, cgroup {quota}, per socket {cores} cores / "
          f"{siblings} threads ({model}); loader default_workers() = {default_workers()}")
    vers = []
    for mod in ("numpy", "cv2", "PIL", "h5py", "jax", "jaxlib", "keras", "torch"):
        try:
            m = __import__(mod)
            vers.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - absent is an answer
            vers.append(f"{mod} -")
    print("env: python " + sys.version.split()[0] + ", " + ", ".join(vers) + f", switchinterval {sys.getswitchinterval()}")


# ---------------------------------------------------------------------------------------- loader
def list_images(data: str, limit: int, repeat: int) -> list[str]:
    from extract import list_files
    return [p for p, _ in list_files(data, limit, repeat)]


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime, r.ru_minflt + c.ru_minflt,
            r.ru_nvcsw + c.ru_nvcsw, r.ru_nivcsw + c.ru_nivcsw, time.perf_counter())


def _report(label: str, n: int, u0, u1) -> float:
    cpu, flt, vcs, ivcs, wall = (b - a for a, b in zip(u0, u1))
    rate = n / wall
    print(f"loader {label:<24s} {rate:8.0f} img/s  cores busy {cpu / wall:5.1f}  cpu {cpu / n * 1e3:5.2f} ms/img  "
          f"minflt/img {flt / n:6.1f}  ctxsw/img vol {vcs / n:5.1f} invol {ivcs / n:5.1f}", flush=True)
    return rate


def _decode_cvt(data: bytes, size: int | None = None) -> np.ndarray:
    """pipeline.data.decode.decode with cv2.cvtColor for BGR->RGB (identical pixels)."""
    from pipeline.data import decode as D
    cv2 = D._cv2()
    fmt, w, h = D.read_header(data)
    k = D.reduction(fmt, w, h, size) if size else 1
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[k]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is not None and img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return D._decode_pillow(data, fmt)


def _decode_nohdr(data: bytes, size: int | None = None) -> np.ndarray:
    """No Pillow header parse (GIL held): full-scale cv2 decode + cvtColor (timing only, not the rule)."""
    from pipeline.data import decode as D
    cv2 = D._cv2()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _load_chunk(paths_size):  # a worker process's job: a list of files -> stacked uint8 images
    from pipeline.data.decode import load_file
    paths, size = paths_size
    return np.stack([load_file(p, size, "stretch") for p in paths])


@contextlib.contextmanager
def decode_variant(name: str):
    from pipeline.data import decode as D
    orig = D.decode
    D.decode = {"cvt": _decode_cvt, "nohdr": _decode_nohdr}.get(name, orig)
    try:
        yield
    finally:
        D.decode = orig


def cmd_loader(args) -> None:
    import functools

    from pipeline.data import decode as D
    from pipeline.data.loader import batches, default_workers
    D.load_libraries()
    cv2 = D._cv2()
    s, bs = args.size, args.batch_size
    paths = list_images(args.data, args.limit, args.repeat)
    # one-thread cost of each stage, on up to 200 distinct files
    sample = list(dict.fromkeys(paths))[:200]
    datas = [D.read_file(p) for p in sample]
    imgs = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for d in datas]
    rgb = [np.ascontiguousarray(i[..., ::-1]) for i in imgs]

    def per(fn, items):
        t = time.perf_counter()
        for x in items:
            fn(x)
        return (time.perf_counter() - t) / len(items) * 1e6

    stages = {"read": per(D.read_file, sample), "header(PIL,GIL)": per(D.read_header, datas),
              "imdecode": per(lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), datas),
              "flip(numpy)": per(lambda i: np.ascontiguousarray(i[..., ::-1]), imgs),
              "cvtColor": per(lambda i: cv2.cvtColor(i, cv2.COLOR_BGR2RGB), imgs),
              "resize": per(lambda i: D.resize(i, s), rgb),
              "load_file": per(lambda p: D.load_file(p, s, "stretch"), sample)}
    mp = np.mean([i.shape[0] * i.shape[1] for i in imgs]) / 1e6
    print(f"stages (one thread, us/img, {len(sample)} files, mean {mp:.2f} MP): "
          + "  ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
    print(f"loader: {len(paths)} images, batch {bs}, size {s}, default workers {default_workers()}", flush=True)

    def run_threads(workers: int, label: str) -> float:
        jobs = ((i, functools.partial(D.load_file, p, s, "stretch")) for i, p in enumerate(paths))
        u0 = _usage()
        n = sum(len(b.tags) for b in batches(jobs, bs, (s, s, 3), workers))
        return _report(label, n, u0, _usage())

    for variant in args.variants.split(","):
        for w in [int(x) for x in args.workers.split(",")]:
            if variant == "procs":
                import multiprocessing as mproc
                from concurrent.futures import ProcessPoolExecutor
                chunks = [(paths[i:i + 32], s) for i in range(0, len(paths), 32)]
                u0 = _usage()  # children's CPU is counted once they are reaped: after the pool closes
                with ProcessPoolExecutor(w, mp_context=mproc.get_context("fork")) as ex:
                    list(ex.map(_load_chunk, chunks[:w]))  # start the workers (their CPU is counted too)
                    t0 = time.perf_counter()
                    n = sum(len(a) for a in ex.map(_load_chunk, chunks))
                    wall = time.perf_counter() - t0
                u1 = _usage()
                u0 = u0[:4] + (0.0,)
                u1 = u1[:4] + (wall,)
                _report(f"procs x{w} (cpu incl. start)", n, u0, u1)
                continue
            with decode_variant(variant):
                run_threads(w, f"{variant} threads x{w}")
    if args.switchinterval:
        old = sys.getswitchinterval()
        sys.setswitchinterval(args.switchinterval)
        try:
            run_threads(default_workers(), f"as-is x{default_workers()} sw={args.switchinterval:g}")
        finally:
            sys.setswitchinterval(old)


# --------------------------------------------------------------------------------------- extract
class Breakdown:
    """Class-level wrappers around extract's stages, summing wall seconds per stage (any thread)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.lock = threading.Lock()
        self.compiles: list[float] = []
        self._undo: list = []

    def add(self, key: str, sec: float) -> None:
        with self.lock:
            self.t[key] = self.t.get(key, 0.0) + sec
            self.n[key] = self.n.get(key, 0) + 1
            self.first.setdefault(key, sec)

    def wrap(self, owner, attr: str, key: str) -> None:
        orig = getattr(owner, attr)
        bd = self

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                bd.add(key, time.perf_counter() - t)

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def install(self) -> Breakdown:
        import pipeline.extract.distributor as D
        import pipeline.extract.mapper as R
        import pipeline.extract.runner as W
        from pipeline.data.loader import Prefetcher
        from pipeline.extract.writer import ChunkWriter
        from pipeline.features.store import ChunkDir
        self.wrap(D, "plan", "plan (listing, key)")
        self.wrap(W, "cached_runner", "runner (build+wrap)")  # as the runner module calls it
        self.wrap(R.Runner, "submit", "submit")
        self.wrap(R.Runner, "collect", "collect")
        self.wrap(ChunkWriter, "put", "writer.put (main, blocking)")
        self.wrap(ChunkWriter, "finish", "writer.finish (main, final wait)")
        self.wrap(ChunkWriter, "_flush", "writer busy (_flush)")
        self.wrap(ChunkDir, "write", "  of which chunk np.savez+fsync")
        self.wrap(os, "fsync", "fsync (any file, any thread)")
        self.wrap(W, "assemble", "assemble (HDF5)")
        self.wrap(W.ExtractionJob, "_compute", "compute (decode..writer)")
        orig_iter = Prefetcher.__iter__
        bd = self

        def timed_iter(self_):
            it = orig_iter(self_)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    bd.add("feed wait (main)", time.perf_counter() - t)
                    return
                bd.add("feed wait (main)", time.perf_counter() - t)
                yield item

        Prefetcher.__iter__ = timed_iter
        self._undo.append((Prefetcher, "__iter__", orig_iter))
        try:
            import jax.monitoring

            def on_duration(event, duration, **kw):
                if event.endswith("backend_compile_duration"):
                    self.compiles.append(float(duration))

            jax.monitoring.register_event_duration_secs_listener(on_duration)
        except Exception:  # noqa: BLE001 - not JAX
            pass
        return self

    def reset(self) -> None:
        self.t.clear()
        self.n.clear()
        self.first.clear()
        self.compiles.clear()

    def print(self, label: str, total: float, rows: int, build: float) -> None:
        print(f"extract {label}: {rows} rows in {total:.2f} s (model build {build:.2f} s excluded) = "
              f"{rows / max(total - build, 1e-9):.0f} img/s; XLA compiles {len(self.compiles)} "
              f"({sum(self.compiles):.2f} s)", flush=True)
        order = ["plan (listing, key)", "runner (build+wrap)", "compute (decode..writer)", "feed wait (main)",
                 "submit", "collect", "writer.put (main, blocking)", "writer.finish (main, final wait)",
                 "writer busy (_flush)", "  of which chunk np.savez+fsync", "assemble (HDF5)",
                 "fsync (any file, any thread)"]
        for k in sorted(self.t, key=lambda k: order.index(k) if k in order else len(order)):
            v = self.t[k]
            extra = ""
            if k in ("submit", "collect", "feed wait (main)"):
                extra = f"   first {self.first[k]:.3f} s, rest {(v - self.first[k]):.2f} s over {self.n[k] - 1} calls"
            print(f"    {k:<34s} {v:8.2f} s  x{self.n[k]:<5d}{extra}", flush=True)


def cmd_extract(args) -> None:
    from extract import bench_extract

    from pipeline.backend import accelerator, name, select
    select(args.backend)
    files = [(p, Path(p).parent.name) for p in list_images(args.data, args.limit, args.repeat)]
    import keras
    print(f"extract: backend {name()} on {accelerator() or 'cpu'}, keras {keras.__version__}, {args.backbone}@"
          f"{args.image_size} {args.precision} batch {args.batch_size}, {len(files)} files, workers "
          f"{args.workers or 'default'}", flush=True)
    bd = Breakdown().install()
    ns = argparse.Namespace(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                            precision=args.precision, batch_size=args.batch_size, workers=args.workers)
    import pipeline.extract.runner as W
    for label in ("cold (build + compile)", "warm (cached runner)")[:args.runs]:
        bd.reset()
        build = {"t": 0.0}
        orig_model = W.ExtractionJob._model

        def timed_model(self, _orig=orig_model):
            t = time.perf_counter()
            try:
                return _orig(self)
            finally:
                build["t"] += time.perf_counter() - t

        W.ExtractionJob._model = timed_model
        try:
            with tempfile.TemporaryDirectory() as tmp:
                u0 = _usage()
                rate, result = bench_extract(ns, files, Path(tmp))
                u1 = _usage()
        finally:
            W.ExtractionJob._model = orig_model
        bd.print(label, result.n_rows / rate + build["t"], result.n_rows, build["t"])
        cpu, wall = u1[0] - u0[0], u1[4] - u0[4]
        print(f"    process CPU {cpu:.1f} s over {wall:.1f} s wall (links + extract): {cpu / wall:.1f} cores busy",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    for c in ("loader", "extract"):
        sp = sub.add_parser(c)
        sp.add_argument("--data", required=True)
        sp.add_argument("--limit", type=int, default=0)
        sp.add_argument("--repeat", type=int, default=1)
        sp.add_argument("--batch-size", type=int, default=256)
        if c == "loader":
            sp.add_argument("--size", type=int, default=224)
            sp.add_argument("--workers", default="16", help="comma-separated thread counts")
            sp.add_argument("--variants", default="as-is", help="as-is, cvt, nohdr, procs (comma-separated)")
            sp.add_argument("--switchinterval", type=float, default=0.0,
                            help="also run as-is at the default thread count with this sys.setswitchinterval")
        else:
            sp.add_argument("--backbone", default="efficientnet_lite0")
            sp.add_argument("--weights", default="imagenet")
            sp.add_argument("--image-size", type=int, default=224)
            sp.add_argument("--precision", default="mixed", choices=("float32", "mixed"))
            sp.add_argument("--workers", type=int, default=None)
            sp.add_argument("--runs", type=int, default=2, help="1: cold only; 2: cold then warm")
            sp.add_argument("--backend", default=None)
    args = ap.parse_args(argv)
    {"env": cmd_env, "loader": cmd_loader, "extract": cmd_extract}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
