"""Does `fit-head --backbone a,b,c` keep the backbone that is best on held-out data? Not a test: a
benchmark whose figures go in docs/heads.md (Choosing the backbone).

For each data set it runs `fit-head --backbone a,b,c` (the ranking: the head's cross-validated log loss
on the training images), then `fit-head --backbone x` for each (cache hits: the default auto head) and
prints the CV scores beside each backbone's held-out accuracy: the test split where there is one
(flowers: carved from train by bench/heldout.py's name hash; digits: --test-fraction 0.2), else val
(hymenoptera); val is printed too. A pick within 0.5 points of the held-out best counts as right.

    .venv/bin/python bench/backbones.py                        # flowers, hymenoptera, digits
    .venv/bin/python bench/backbones.py --sets hymenoptera,digits --work /tmp/bench-backbones
    .venv/bin/python bench/backbones.py --sets digits --backbones vgg16,mobilenetv2 --weights none --dtype float32
                                                               # other options go to every fit-head
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import cli, write_manifest  # a sibling bench script

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


def data_args(name: str, work: Path) -> list[str] | None:
    """The fit-head options naming one data set, or None where it is not here."""
    if name == "digits":
        return ["--data", "builtin:digits", "--test-fraction", "0.2"]
    if name == "hymenoptera":
        root = DATA / "hymenoptera"
        return ["--data", str(root)] if root.is_dir() else None
    if name == "flowers":
        root = DATA / "flower_photos_224"
        if not (root / "train").is_dir():
            return None
        manifest = work / "flowers-heldout.csv"
        write_manifest(root, manifest)
        return ["--data", str(manifest), "--allow-outside-paths"]
    raise SystemExit(f"unknown set {name!r}: flowers, hymenoptera or digits")


def heldout_accuracy(stdout: str) -> dict[str, float]:
    """{'val': accuracy, 'test': accuracy (where printed)} from fit-head's summary lines."""
    return {part: float(acc) for part, acc in re.findall(r"^(val|test)\s+accuracy ([0-9.]+)", stdout, re.M)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="flowers,hymenoptera,digits")
    ap.add_argument("--backbones", default=BACKBONES)
    ap.add_argument("--work", default=None, help="manifests and cache folder (default: a temporary folder)")
    args, extra = ap.parse_known_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-backbones-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = ["--cache-dir", str(work / "cache"), *extra]
    right = scored = 0
    sets = [s.strip() for s in args.sets.split(",")]
    for name in sets:
        given = data_args(name, work)
        if given is None:
            print(f"{name}: not in {DATA}, skipped")
            continue
        out, seconds = cli("fit-head", *given, "--backbone", args.backbones, *cache)
        run = re.search(r"run (\S+) saved in", out).group(1)
        ranking = json.loads((work / "cache" / "runs" / run / "config.json").read_text())["backbone_ranking"]
        held = {}
        for r in ranking:
            one, _ = cli("fit-head", *given, "--backbone", r["backbone"], *cache)
            held[r["backbone"]] = heldout_accuracy(one)
        part = "test" if "test" in next(iter(held.values())) else "val"
        best = max(h[part] for h in held.values())
        pick = ranking[0]["backbone"]
        ok = held[pick][part] >= best - 0.005
        right += ok
        scored += 1
        print(f"{name} (ranking command {seconds:.0f} s, extractions included):")
        for r in ranking:
            h = held[r["backbone"]]
            print(f"    {r['backbone']:20s} {r['head']:8s} CV log loss {r['cv_log_loss']:.4f}  CV accuracy "
                  f"{r['cv_accuracy'] or float('nan'):.4f}  " + "  ".join(f"{p} accuracy {a:.4f}" for p, a in h.items()))
        print(f"    kept {pick}: {part} {held[pick][part]:.4f}, best {best:.4f} -> "
              f"{'right (within 0.5 points)' if ok else 'WRONG'}")
    print(f"the ranking kept the held-out best (within 0.5 points) on {right} of {scored} data sets")


if __name__ == "__main__":
    main()
