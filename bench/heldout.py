"""A held-out check of the default recipe on flowers, which has no test split of its own.

Not a test. The fine-tuning defaults were chosen on flowers' val split, so the val figure is a
selected one. This script carves a test split out of flowers' train folder (every image whose
name hashes to 0 mod 5: about 20%, never trained on, never looked at while choosing the recipe),
writes a manifest for it (`path,label,split`, read in place), and runs the README's two commands
with their defaults: `fit-head`, then `finetune --run <that run>`. It prints val and test accuracy
before and after fine-tuning and the wall time of each command.

    .venv/bin/python bench/heldout.py                   # ../shared/data/flower_photos_224
    .venv/bin/python bench/heldout.py --data DIR --work /tmp/heldout
    .venv/bin/python bench/heldout.py --backbone efficientnet_lite0   # other options go to fit-head
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flower_photos_224"))
    ap.add_argument("--work", default=None, help="manifest and cache folder (default: a temporary folder)")
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
    out, t_head = cli("fit-head", "--data", str(manifest), "--allow-outside-paths", *cache, *fit_head_args)
    head_run = re.search(r"run (\S+) saved in", out).group(1)
    print(f"fit-head ({t_head:.0f} s): " + "; ".join(l.strip() for l in out.splitlines()
                                                  if l.startswith(("val ", "test ")) and "accuracy" in l))
    out, t_ft = cli("finetune", "--run", head_run, *cache)
    print(f"finetune ({t_ft:.0f} s):")
    for line in out.splitlines():
        if re.match(r"(val|test)\s+(accuracy|log_loss)", line):
            print("   ", line)


if __name__ == "__main__":
    main()
