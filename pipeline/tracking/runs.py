"""Runs registry: one folder per run of any stage under `<cache_dir>/runs/<id>/`.

Each folder holds `run.json` (stage, status, start/end times, duration, pid/host, the environment:
CPU, Python and library versions, since those can move a trained figure), `config.json`
(what the run was asked to do), `metrics.json` (what it measured) and its artifacts and plots.
All JSON is written atomically. IDs sort by start time: `20261122-233015-a1b2`.

Conventions the table relies on: config keys `backbone`, `data`, `head` and `params` (a dict of
the key hyperparameters); metrics `val` (a `pipeline.tracking.metrics` report with `accuracy`, `macro_f1`),
or flat `val_accuracy` / `val_macro_f1`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fnmatch
import functools
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rich.table import Table

from pipeline.atomic import write_text_atomic
from pipeline.backend import name as backend_name
from pipeline.errors import UserError
from pipeline.layout import CacheLayout, cache_dir_flags
from pipeline.versions import version

HISTORY_FILES = ("head.json", "finetune.json", "checkpoint.json")  # a run's per-epoch series: dense head, fine-tune
STAGES = ("extract", "fit-head", "finetune", "audit")  # a sweep is a fit-head run with sweep: true in its config
STATUSES = ("running", "ok", "failed", "interrupted", "incomplete")


ENVIRONMENT_PACKAGES = ("numpy", "scikit-learn", "h5py", "Pillow", "faiss-cpu", "keras", "tensorflow", "tensorflow-cpu",
                        "jax", "jaxlib", "torch", "opencv-python-headless", "opencv-python")


def environment() -> dict[str, Any]:
    """What a run ran on (CPU model and the cores this process may use, NVIDIA GPUs, OS, Python, the
    Keras backend, the numeric libraries installed, by their distribution metadata: nothing is
    imported). The same command can train a different model on other CPU kernels or library versions
    (docs/quality.md, 'Where the 95.8% went'); this says which."""
    return copy.deepcopy(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            gpus += [line.split(":", 1)[1].strip() for line in info.read_text(errors="replace").splitlines()
                     if line.startswith("Model:")]
    packages = {name: v for name in ENVIRONMENT_PACKAGES if (v := version(name, default=None))}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": cores, "gpus": gpus,
            "os": platform.platform(), "python": sys.version.split()[0], "keras_backend": backend_name(),
            "packages": packages}


def _now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


def write_json(path: Path, data: Any) -> None:
    """A run folder's JSON file, written atomically (arrays and paths as plain values)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, _dt.datetime)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def read_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """A run file's JSON object, or ({}, what is wrong with it): a run folder's files are read through
    this one check, so a damaged or hand-edited one is named instead of failing later. A missing file
    is ({}, None): metrics.json is written only at the end."""
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"{path.name} is not readable JSON ({type(exc).__name__})"
    if not isinstance(data, dict):
        return {}, f"{path.name} holds a {type(data).__name__}, not a JSON object"
    return data, None


@dataclass
class RunRecord:
    """What the registry knows about one run, read back from its folder."""

    id: str
    stage: str
    status: str
    started: str
    ended: str | None
    duration_s: float | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # what is wrong with its files (read_object)

    def value(self, key: str) -> Any:
        """A field, val_accuracy / val_f1, or a dotted key looked up in metrics then config (`params.lr`)."""
        if key in ("id", "stage", "status", "started", "ended", "duration_s"):
            return getattr(self, key)
        if key == "duration":
            return self.duration_s
        if key in ("val_accuracy", "val_acc", "val.accuracy"):
            return self.val_accuracy
        if key in ("val_f1", "val_macro_f1", "val.macro_f1"):
            return self.val_f1
        for source in (self.metrics, self.config):
            found, value = _dotted(source, key)
            if found:
                return value
        return None

    @property
    def val_accuracy(self) -> float | None:
        return _metric(self.metrics, "accuracy")

    @property
    def val_f1(self) -> float | None:
        return _metric(self.metrics, "macro_f1")

    def history(self) -> dict[str, list[float]] | None:
        """Per-epoch series (loss, accuracy, val_loss, ...) of a dense head's run or a fine-tune's (finished, or
        interrupted: its checkpoint's), from the file HISTORY_FILES names first; None when it has none, or
        only a hand-edited one that is not numbers."""
        for name in HISTORY_FILES:
            data, _ = read_object(self.dir / name)
            history = data.get("history")
            if isinstance(history, dict) and history.get("loss"):
                try:
                    return {str(k): [float(v) for v in values] for k, values in history.items() if isinstance(values, list)}
                except (TypeError, ValueError):
                    return None
        return None


def _dotted(data: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    cur: Any = data
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    """A run's val figure `name` (None where it has none, or a hand-edited metrics.json holds no number:
    one such run must not stop `runs` listing every other)."""
    val = metrics.get("val")
    value = val.get(name) if isinstance(val, Mapping) and val.get(name) is not None else metrics.get(f"val_{name}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Run:
    """A run in progress: log metrics as they come, then `finish` it (or use it as a context manager)."""

    def __init__(self, registry: "Registry", run_id: str, stage: str, config: dict[str, Any]) -> None:
        self.registry = registry
        self.id = run_id
        self.stage = stage
        self.config = config
        self.dir = registry.root / run_id
        self.metrics: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._info = {"id": run_id, "stage": stage, "status": "running", "started": _now().isoformat(),
                      "ended": None, "duration_s": None, "pid": os.getpid(), "host": socket.gethostname(),
                      "environment": environment()}

    def path(self, name: str) -> Path:
        """Where to write artifact `name` inside this run's folder."""
        self._check_there()
        return self.dir / name

    def _check_there(self) -> None:
        """UserError where the run's folder was removed while it ran (`runs rm --force`): writing on would
        make a folder of it again, without its config, listed as a run that succeeded."""
        if not self.dir.is_dir():
            raise UserError(f"run {self.id}'s folder {self.dir} was removed while it ran (runs rm --force); "
                            f"nothing more of it is saved")

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Replace config.json (e.g. once the auto head has chosen which head the run keeps)."""
        self._check_there()
        self.config = dict(config)
        write_json(self.dir / "config.json", self.config)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Merge `metrics` into metrics.json (rewritten atomically)."""
        self._check_there()
        self.metrics.update(metrics)
        write_json(self.dir / "metrics.json", self.metrics)

    def finish(self, status: str = "ok", metrics: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """Record the end: status ('ok' | 'failed' | 'interrupted'), end time, duration, final metrics."""
        if status not in ("ok", "failed", "interrupted"):
            raise ValueError(f"status must be 'ok', 'failed' or 'interrupted', not {status!r}")
        if metrics:
            self.log_metrics(metrics)
        self._info.update(status=status, ended=_now().isoformat(), duration_s=round(time.monotonic() - self._t0, 3))
        if error:
            self._info["error"] = error
        self._check_there()
        write_json(self.dir / "run.json", self._info)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._info["status"] != "running" or (exc is not None and not self.dir.is_dir()):
            return  # finished already; or failing with its folder removed: the error says what happened
        if exc is None:
            self.finish("ok")
        elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C: stopped, not broken
            self.finish("interrupted", error="interrupted (Ctrl-C)")
        else:
            self.finish("failed", error=f"{type(exc).__name__}: {exc}")


class Registry:
    """The runs of one cache directory: start new ones, list, filter, look up and tabulate them."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.root = CacheLayout(cache_dir).runs

    def start(self, stage: str, config: Mapping[str, Any]) -> Run:
        """Create `runs/<id>/` with config.json and run.json (status 'running')."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            run_id = f"{_now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
            try:
                (self.root / run_id).mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions in one second
            raise RuntimeError("could not allocate a run ID")
        run = Run(self, run_id, stage, dict(config))
        write_json(run.dir / "config.json", run.config)
        write_json(run.dir / "run.json", run._info)
        return run

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "run.json").exists())

    def record(self, run_id: str) -> RunRecord:
        folder = self.root / run_id
        read = {name: read_object(folder / f"{name}.json") for name in ("run", "config", "metrics")}
        info, config, metrics = (read[name][0] for name in ("run", "config", "metrics"))
        damaged = [problem for _, problem in read.values() if problem]
        status = str(info.get("status", "incomplete"))
        if status == "running" and not _alive(info):
            status = "incomplete"
        if damaged:
            status = "damaged"
        return RunRecord(
            id=run_id, stage=str(info.get("stage", "?")), status=status, started=str(info.get("started", "")),
            ended=info.get("ended"), duration_s=info.get("duration_s") if isinstance(info.get("duration_s"), (int, float))
            else None, config=config, metrics=metrics, dir=folder, info=info, damaged=damaged,
        )

    def list(self, stage: str | None = None, filters: Mapping[str, Any] | None = None, sort: str = "started",
             descending: bool = True) -> list[RunRecord]:
        """Runs of `stage` (None = all) whose fields/config/metrics match `filters`, sorted by `sort`.

        A filter value matches by equality of its string form or as a glob (`efficientnet*`);
        `sort` is a field (started, duration, status, ...) or a dotted metrics/config key; runs
        without that value go last; ties keep start-time order.
        """
        records = sorted((self.record(i) for i in self.ids()), key=lambda r: r.started, reverse=descending)
        if stage is not None:
            records = [r for r in records if r.stage == stage]
        for key, want in (filters or {}).items():
            if records and all(r.value(key) is None for r in records):  # a typo, not "no such runs"
                raise UserError(f"no run listed has a value for {key!r} to filter on; use a field such as stage, "
                                f"status or backbone, or a dotted metrics/config key such as params.C")
            records = [r for r in records if _matches(r.value(key), want)]
        keyed = [(r, r.value(sort)) for r in records]
        missing = [r for r, value in keyed if value is None]
        if records and len(missing) == len(records):
            raise UserError(f"no run listed has a value for {sort!r} to sort by; use started, duration, status, "
                            f"val_accuracy, val_f1 or a dotted metrics/config key such as val.log_loss or backbone")
        numbered = [(r, value, _number(value)) for r, value in keyed if value is not None]
        numbers = sorted(((r, n) for r, _, n in numbered if n is not None),  # by value: "10" after "3"
                         key=lambda item: item[1], reverse=descending)
        others = [(r, value) for r, value, n in numbered if n is None]  # text ("auto"), NaN: after the numbers
        try:
            others.sort(key=lambda item: item[1], reverse=descending)
        except TypeError:
            others.sort(key=lambda item: str(item[1]), reverse=descending)
        return [r for r, _ in numbers] + [r for r, _ in others] + missing

    def get(self, run_id: str) -> RunRecord:
        """The run with this ID or unique ID prefix; UserError when none or several match."""
        hint = "`python cli.py runs` lists them"
        wanted = str(run_id).strip()
        ids = self.ids()
        if wanted in ids:
            return self.record(wanted)
        hits = [i for i in ids if wanted and i.startswith(wanted)]
        if len(hits) == 1:
            return self.record(hits[0])
        if len(hits) > 1:
            raise UserError(f"run ID prefix {wanted!r} matches {len(hits)} runs ({', '.join(hits[:3])}"
                            f"{', ...' if len(hits) > 3 else ''}); give more of it; {hint}")
        raise UserError(f"unknown run ID {wanted!r}; {hint}")

    def match(self, run_id: str) -> RunRecord:
        """The one run named by a full ID or unambiguous prefix; UserError listing every match otherwise."""
        wanted = str(run_id).strip()
        if not wanted:
            raise UserError("an empty run ID was given; `python cli.py runs` lists them")
        ids = self.ids()
        if wanted in ids:
            return self.record(wanted)
        hits = [i for i in ids if i.startswith(wanted)]
        if len(hits) > 1:
            raise UserError(f"run ID prefix {wanted!r} matches {len(hits)} runs ({', '.join(hits)}); nothing removed; "
                            f"give more of it")
        if not hits:
            raise UserError(f"no run {wanted!r} in {self.root}; `python cli.py runs` lists them")
        return self.record(hits[0])

    def remove(self, run_ids: Sequence[str], force: bool = False, dry_run: bool = False,
               resumable: Callable[[Path], bool] | None = None) -> list[Path]:
        """Delete run folders (only under `<cache_dir>/runs/`), each by full ID or unambiguous prefix.

        Every ID is checked before anything is deleted; a run still running (status running, its
        process alive) is refused unless `force`, as is the parent of an unfinished finetune run that
        `resumable` (given its folder) says holds work to resume (default: every unfinished one).
        """
        records: list[RunRecord] = []
        for run_id in run_ids:
            r = self.match(run_id)
            if r.status == "running" and not force:
                raise UserError(f"run {r.id} is still running (pid {r.info.get('pid')} on {r.info.get('host')}); "
                                f"nothing removed; stop it first or pass --force")
            if r.id not in {x.id for x in records}:
                records.append(r)
        leaving = {r.id for r in records}
        waiting = [x for x in self.list("finetune") if x.id not in leaving and x.status not in ("ok", "damaged")
                   and x.config.get("parent_run") in leaving and (resumable is None or resumable(x.dir))] if not force else []
        if waiting:  # a resume reads its parent run again: removing the parent loses the checkpointed epochs
            w = waiting[0]
            raise UserError(f"run {w.config['parent_run']} is where unfinished run {w.id} ({w.stage}, {w.status}) "
                            f"starts, and resuming it reads that run again; nothing removed; resume it first "
                            f"({shlex.join(['python', 'cli.py', 'finetune', '--resume', w.id, *cache_dir_flags(self.cache_dir)])}),"
                            f" remove it too, or pass --force")
        folders = [os.path.realpath(r.dir) for r in records if not r.dir.is_symlink()]  # a link goes, not its target
        reading = [x for x in self.list() if x.id not in leaving and _data_in(x.config, folders)] if not force else []
        if reading:  # an audit's cleaned.csv: finetune and audit --run of a run trained on it list it again
            data = _data_in(reading[0].config, folders)
            more = f" and {len(reading) - 1} more" if len(reading) > 1 else ""
            raise UserError(f"run {reading[0].id} ({reading[0].stage}{more}) was made on {data}, which removing run "
                            f"{os.path.basename(os.path.dirname(data))} deletes, and a command that reads that run's "
                            f"images again (finetune, audit --run) would fail; nothing removed; remove those runs too, "
                            f"or pass --force")
        root = os.path.realpath(self.root)
        for r in records:
            inside = (os.path.realpath(r.dir.parent) == root if r.dir.is_symlink()
                      else os.path.realpath(r.dir) == os.path.join(root, r.id))
            if not inside:
                raise UserError(f"{r.dir} does not lie inside {root}; nothing removed")
        if dry_run:
            return [r.dir for r in records]
        for r in records:
            if r.dir.is_symlink():
                r.dir.unlink()
            else:
                shutil.rmtree(r.dir)
        return [r.dir for r in records]

    def table(self, records: list[RunRecord], title: str | None = None) -> Table:
        """Rich table: id, stage, status, backbone, data, head, key parameters, val acc/F1, duration."""
        table = Table(title=title, title_justify="left")
        for name, kw in [("id", {"no_wrap": True}), ("stage", {}), ("status", {}), ("backbone", {}), ("data", {}),
                         ("head", {}), ("key parameters", {"max_width": 40}), ("val acc", {"justify": "right"}),
                         ("val F1", {"justify": "right"}), ("duration", {"justify": "right"})]:
            table.add_column(name, **kw)
        for r in records:
            c = r.config
            table.add_row(
                r.id, r.stage, _status_text(r.status), _cell(c.get("backbone")), _cell(c.get("data")),
                _cell(c.get("head")), _params_text(c.get("params")), _num(r.val_accuracy), _num(r.val_f1),
                format_duration(r.duration_s),
            )
        return table


def _alive(info: Mapping[str, Any]) -> bool:
    """Whether the process that started a 'running' run still exists (unknowable on another host)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _number(value: Any) -> float | None:
    """A recorded value as a finite number (1, 1.0, "1e+12"), else None (text, NaN, booleans, lists)."""
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _matches(value: Any, want: Any) -> bool:
    """A filter's value against a run's: by number where both are numbers (C=1 is 1.0), true/false by
    meaning, else the text or a glob of it."""
    if value is None:
        return False
    text, pattern = str(value), str(want)
    if isinstance(value, bool):
        return pattern.lower() == text.lower()
    if _number(value) is not None and _number(want) is not None:
        return _number(value) == _number(want)
    return text == pattern or fnmatch.fnmatchcase(text, pattern)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    return text if len(text) <= 32 else "..." + text[-29:]


def _params_text(params: Any) -> str:
    if not isinstance(params, Mapping) or not params:
        return "-"
    return " ".join(f"{k}={_short_value(v)}" for k, v in params.items())


def _short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_short_value(x) for x in v) or "()"
    return str(v)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _status_text(status: str) -> str:
    colour = {"ok": "green", "failed": "red", "running": "yellow", "interrupted": "yellow", "incomplete": "magenta",
              "damaged": "red"}.get(status)
    return f"[{colour}]{status}[/{colour}]" if colour else status


def format_duration(seconds: float | None) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _data_in(config: Mapping[str, Any], folders: list[str]) -> str | None:
    """The data path a run's config names (its --data, or its extraction request's) where it lies in
    one of `folders` (an audit's cleaned.csv in its run folder), else None."""
    request = config.get("request") if isinstance(config.get("request"), Mapping) else {}
    for data in (config.get("data"), request.get("data")):
        if isinstance(data, str) and data and os.path.isabs(data):
            real = os.path.realpath(data)
            if any(os.path.commonpath([real, f]) == f for f in folders):
                return data
    return None
