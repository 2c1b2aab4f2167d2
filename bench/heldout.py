"""A held-out check of the default recipe on flowers, which has no test split of its own.

Not a test. The fine-tuning defaults were chosen on flowers' val split, so the val figure is a
selected one. This script carves a test split out of flowers' train folder (every image whose
name hashes to 0 mod 5: about 20%, never trained on, never looked at while choosing the recipe),
writes a manifest for it (`path,label,split`, read in place), and runs the two commands of
docs/quality.md with their defaults: `fit-head`, then `finetune --run <that run>`, once per `--seeds` value (each is
passed as `--seed` to both: the heads' CV folds, the fine-tune's augmentation, shuffling and
initialisation change; the split does not). It prints val and test accuracy before and after
fine-tuning (and log loss and ECE after it) and the wall time of each command, then the mean and
the range over the seeds.

    .venv/bin/python bench/heldout.py                   # ../shared/data/flower_photos_224
    .venv/bin/python bench/heldout.py --data DIR --work /tmp/heldout
    .venv/bin/python bench/heldout.py --backbone efficientnet_lite0   # other options go to fit-head
    .venv/bin/python bench/heldout.py --seeds 0,1,2 --work /tmp/heldout  # docs/quality.md's figures
    .venv/bin/python bench/heldout.py --seeds 0,1,2 --also="--label-smoothing 0"  # and a second finetune each
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = {".jpg", ".jpeg", ".png"}


def write_manifest(root: Path, out: Path, fold: int = 5) -> dict[str, int]:
    """train/ images whose name hashes to 0 mod `fold` become 'test'; val/ stays val."""
    rows = []
    for split in ("train", "val"):
        for p in sorted((root / split).rglob("*")):
            if p.suffix.lower() not in IMAGES:
                continue
            s = split
            if split == "train" and int(hashlib.sha1(p.name.encode()).hexdigest(), 16) % fold == 0:
                s = "test"
            rows.append((str(p.resolve()), p.parent.name, s))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return {s: sum(r[2] == s for r in rows) for s in ("train", "val", "test")}


def cli(*args: str) -> tuple[str, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, "--no-progress"], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"cli.py {args[0]} failed: {(proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}")
    return proc.stdout, time.perf_counter() - t


def accuracies(stdout: str) -> dict[str, float]:
    """{'val': ..., 'test': ...} from fit-head's summary lines, or {'val': (before, after), ...} from
    finetune's comparison lines."""
    out: dict = {}
    for part, acc in re.findall(r"^(val|test)\s+accuracy ([0-9.]+)", stdout, re.M):
        out[part] = float(acc)
    for part, before, after in re.findall(r"^(val|test)\s+accuracy\s+([0-9.]+) -> ([0-9.]+)", stdout, re.M):
        out[part] = (float(before), float(after))
    return out


def after_values(stdout: str, metric: str) -> dict[str, float]:
    """{'val': after, 'test': after} of one metric (log_loss, ece) from finetune's comparison lines."""
    return {part: float(after) for part, after in
            re.findall(rf"^(val|test)\s+{metric}\s+[0-9.]+ -> ([0-9.]+)", stdout, re.M)}


def spread(values: list[float]) -> str:
    """'93.9% (93.5-94.3)': mean and range in percent."""
    return f"{100 * sum(values) / len(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flower_photos_224"))
    ap.add_argument("--work", default=None, help="manifest and cache folder (default: a temporary folder)")
    ap.add_argument("--seeds", default="0", help="comma-separated --seed values, one fit-head + finetune each")
    ap.add_argument("--no-finetune", action="store_true", help="head-only figures")
    ap.add_argument("--also", action="append", default=[], metavar="OPTIONS",
                    help='one more finetune per seed from the same head with these options, e.g. --also="--label-smoothing 0"'
                         " (repeatable)")
    args, fit_head_args = ap.parse_known_args(argv)
    root = Path(args.data)
    if not (root / "train").is_dir():
        sys.exit(f"{root} has no train/ folder")
    work = Path(args.work or tempfile.mkdtemp(prefix="heldout-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "heldout.csv"
    counts = write_manifest(root, manifest)
    print(f"{root.name}: {counts['train']} train / {counts['val']} val / {counts['test']} test (carved from train)")
    cache = ["--cache-dir", str(work / "cache")]
    seeds = [int(s) for s in args.seeds.split(",")]
    figures: dict[str, list[float]] = {}  # accuracies, shown in percent
    plain: dict[str, list[float]] = {}  # log loss and ECE after fine-tuning
    for seed in seeds:
        out, t_head = cli("fit-head", "--data", str(manifest), "--allow-outside-paths", *cache, *fit_head_args,
                          "--seed", str(seed))
        head_run = re.search(r"run (\S+) saved in", out).group(1)
        print(f"seed {seed}: fit-head ({t_head:.0f} s): " + "; ".join(
            l.strip() for l in out.splitlines() if l.startswith(("val ", "test ")) and "accuracy" in l), flush=True)
        for part, acc in accuracies(out).items():
            figures.setdefault(f"head-only {part}", []).append(acc)
        if args.no_finetune:
            continue
        for extra in ["", *args.also]:
            suffix = f" {extra}" if extra else ""  # names this fine-tune's lines and figures
            out, t_ft = cli("finetune", "--run", head_run, *cache, "--seed", str(seed), *shlex.split(extra))
            print(f"seed {seed}: finetune{suffix} ({t_ft:.0f} s):")
            for line in out.splitlines():
                if re.match(r"(val|test)\s+(accuracy|log_loss|ece)", line):
                    print("   ", line)
            for part, (_, after) in accuracies(out).items():
                figures.setdefault(f"fine-tuned{suffix} {part}", []).append(after)
            for metric in ("log_loss", "ece"):
                for part, after in after_values(out, metric).items():
                    plain.setdefault(f"fine-tuned{suffix} {part} {metric}", []).append(after)
            sys.stdout.flush()
    print(f"over seeds {args.seeds}: mean (min-max)")
    for name, values in figures.items():
        print(f"    {name:16s} {spread(values)}")
    for name, values in plain.items():
        print(f"    {name:16s} {sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()
