"""docs/quality.md's quality table, regenerated from the current code: one command per row, as a user runs it.

Not a test. Each row runs `cli.py fit-head` on a data set with the defaults (in a fresh cache, so
the time includes the extraction), then, unless `--no-finetune`, `cli.py finetune --run <it>` with
the defaults, and prints the row as docs/quality.md's table has it: the val accuracy, the head the auto
head kept with its CV log loss, and the wall times. The held-out rows over seeds come from
`bench/heldout.py --seeds 0,1,2` (`--rows heldout` runs it here too). It ends with the environment
(CPU, cores, library versions), because fine-tuned figures move between machines (docs/quality.md).

    .venv/bin/python bench/quality.py                         # every row (about 35 minutes on 2 cores)
    .venv/bin/python bench/quality.py --no-finetune           # head-only rows (about 3 minutes)
    .venv/bin/python bench/quality.py --rows hymenoptera --work /tmp/quality
    .venv/bin/python bench/quality.py --backbone efficientnet_lite0   # other options go to fit-head
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import accuracies, cli  # a sibling bench script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# name -> (--data, fine-tune it by default)
ROWS = {
    "flowers": (str(SHARED / "flower_photos_224"), True),
    "hymenoptera": (str(SHARED / "hymenoptera"), True),
    "digits": ("builtin:digits", False),
}


def kept_head(stdout: str) -> str:
    """'svm (CV log loss svm 0.248, logistic 0.284)' from fit-head's auto-head line, or ''."""
    m = re.search(r"^head auto: kept (.+)$", stdout, re.M)
    return m.group(1).strip() if m else ""


def environment() -> str:
    """One line: CPU model, usable cores and the numeric libraries' versions (as run.json records them)."""
    from pipeline.tracking.runs import environment as env

    e = env()
    versions = ", ".join(f"{k} {v}" for k, v in e.get("packages", {}).items() if k in ("tensorflow", "keras", "numpy"))
    return f"{e.get('cpu', '?')}, {e.get('cpu_count', '?')} cores, {e.get('os', '?')}, {versions}"


def run_row(name: str, data: str, finetune: bool, work: Path, fit_head_args: list[str]) -> str:
    cache = ["--cache-dir", str(work / name / "cache")]
    out, t_head = cli("fit-head", "--data", data, *cache, *fit_head_args)
    head_run = re.search(r"run (\S+) saved in", out).group(1)
    val = accuracies(out).get("val")
    shown = os.path.relpath(data, REPO) if Path(data).is_absolute() else data  # as docs/quality.md writes it
    command = " ".join(["fit-head --data", shown, *fit_head_args])
    row = f"| {name} | `{command}` | **{100 * val:.1f}%** ({kept_head(out) or 'head as asked'}); {t_head:.0f} s |"
    print(row, flush=True)
    if not finetune:
        return row
    out, t_ft = cli("finetune", "--run", head_run, *cache)
    before, after = accuracies(out)["val"]
    ft_row = (f"| {name}, fine-tuned | `finetune --run <the {name} fit-head run>` (defaults) | "
              f"**{100 * after:.1f}%** (from {100 * before:.1f}%); {t_ft / 60:.1f} min |")
    print(ft_row, flush=True)
    return row + "\n" + ft_row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="flowers,hymenoptera,digits,heldout")
    ap.add_argument("--no-finetune", action="store_true", help="head-only rows")
    ap.add_argument("--seeds", default="0,1,2", help="the held-out rows' seeds (bench/heldout.py)")
    ap.add_argument("--work", default=None, help="caches per row (default: a temporary folder)")
    args, fit_head_args = ap.parse_known_args(argv)  # the rest goes to fit-head (and heldout.py)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS and r != "heldout"]
    if unknown:
        sys.exit(f"unknown row {unknown[0]!r}; choose from {', '.join([*ROWS, 'heldout'])}")
    work = Path(args.work or tempfile.mkdtemp(prefix="quality-"))
    print("| data | command | val accuracy |\n|---|---|---|", flush=True)
    for name in rows:
        if name == "heldout":
            continue
        data, finetune = ROWS[name]
        if not data.startswith("builtin:") and not Path(data).is_dir():
            print(f"| {name} | skipped: {data} not found | |")
            continue
        run_row(name, data, finetune and not args.no_finetune, work, fit_head_args)
    if "heldout" in rows:
        cmd = [sys.executable, str(REPO / "bench" / "heldout.py"), "--seeds", args.seeds, "--work",
               str(work / "heldout")] + (["--no-finetune"] if args.no_finetune else []) + fit_head_args
        print("held out (bench/heldout.py):", flush=True)
        subprocess.run(cmd, check=True)
    print(f"environment: {environment()}")


if __name__ == "__main__":
    main()
