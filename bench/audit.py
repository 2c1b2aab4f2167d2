"""How well `audit` finds faults planted with a seed into real photos (it is never told which), against
cleanlab's documented recipe on the same cached features. Not a test: a benchmark whose figures go
in the README.

    .venv/bin/python bench/audit.py                      # flowers + hymenoptera from ../shared/data
    .venv/bin/python bench/audit.py --parts labels,dups --work /tmp/bench-audit

Parts (each runs `cli.py audit` on a manifest, read in place; features are extracted once and every
later manifest of the same files reuses those rows):
- labels: 5% of flowers' (and hymenoptera's) training labels flipped to another class. Top-N
  precision (N = flipped) and recall of the flagged set; cleanlab's `find_label_issues` on
  out-of-fold probabilities of a plain `LogisticRegression` (its documented recipe) beside it, and
  the two evidence sources alone (logistic, kNN) to show what the neighbours add.
- dups: 50 training images copied into val as JPEG-50, 0.6x, centre-90% and +10%-bright variants
  (200 planted pairs): recall, and cross-split pairs reported against the planted count.
- outliers: 20 hymenoptera photos dropped into flowers' training classes: how many are in the top 40
  of the outlier ranking; cleanlab's `OutOfDistribution` on the features beside it.
- clean: 10% of flowers' training labels flipped: head-only (auto head) val accuracy with clean
  labels, noisy labels, and noisy labels minus what `cleaned.csv` drops (same val images throughout).
- speed: the whole audit of clean flowers with the map (t-SNE) and the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
IMAGES = {".jpg", ".jpeg", ".png"}


def listing(root: Path) -> list[tuple[str, str, str]]:
    """(absolute path, class, split) of a train/ val/ folder tree."""
    rows = []
    for split in ("train", "val", "test"):
        for p in sorted((root / split).rglob("*")) if (root / split).is_dir() else []:
            if p.suffix.lower() in IMAGES:
                rows.append((str(p.resolve()), p.parent.name, split))
    return rows


def write_manifest(rows: list[tuple[str, str, str]], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out


def flip(rows: list[tuple[str, str, str]], share: float, seed: int) -> tuple[list, set[str]]:
    """`share` of the training rows get another class, chosen with `seed`; returns (rows, flipped paths)."""
    rng = np.random.default_rng(seed)
    classes = sorted({r[1] for r in rows})
    train = [i for i, r in enumerate(rows) if r[2] == "train"]
    chosen = rng.choice(train, int(round(share * len(train))), replace=False)
    out = list(rows)
    for i in chosen:
        p, c, s = rows[i]
        out[i] = (p, str(rng.choice([k for k in classes if k != c])), s)
    return out, {rows[i][0] for i in chosen}


def audit(manifest: Path, cache: Path, *extra: str) -> tuple[dict, float, Path]:
    """Run `cli.py audit` on a manifest; (audit.json, wall seconds, run folder)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "audit", "--data", str(manifest),
                           "--allow-outside-paths", "--cache-dir", str(cache), "--no-progress", *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"audit failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    run = cache / "runs" / re.search(r"audit (\S+) in", proc.stdout).group(1)
    return json.loads((run / "audit.json").read_text()), wall, run


def cache_file(cache: Path, key: str) -> Path:
    return next((cache / "features").glob(f"*{key[:16]}*.h5"))


def precision_recall(ranked: list[str], flagged: set[str], truth: set[str]) -> tuple[float, float]:
    n = len(truth)
    return sum(p in truth for p in ranked[:n]) / n, len(flagged & truth) / n


def cleanlab_anchor(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's README recipe: out-of-fold probabilities of LogisticRegression(), then find_label_issues."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    proba = cross_val_predict(LogisticRegression(max_iter=1000), X, y, cv=5, method="predict_proba")
    ranked = find_label_issues(y, proba, return_indices_ranked_by="self_confidence")
    return np.asarray(ranked), proba


def part_labels(name: str, root: Path, work: Path, cache: Path, seed: int, details: bool = True) -> tuple:
    from pipeline.audit.labels import KNN_K, knn_oof, label_evidence, rank_issues
    from pipeline.audit.runner import audited_images
    from pipeline.features.neighbours import CosineIndex
    from pipeline.features.store import FeatureFile

    rows, truth = flip(listing(root), 0.05, seed)
    result, wall, _ = audit(write_manifest(rows, work / f"{name}-flip5-seed{seed}.csv"), cache, "--no-map")
    ranked = [r["path"] for r in result["label_issues"]]
    p, r = precision_recall(ranked, set(ranked), truth)
    print(f"labels {name} seed {seed}: {len(truth)} flipped of {sum(x[2] == 'train' for x in rows)} train; audit flags "
          f"{len(ranked)}: top-N precision {p:.3f}, recall {r:.3f} (audit {result['seconds']['total']:.1f} s, "
          f"command {wall:.1f} s)")
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        img = audited_images(ff)
    paths = np.asarray(img.paths)
    ranked_a, _ = cleanlab_anchor(img.X, img.y)
    pa, ra = precision_recall(list(paths[ranked_a]), set(paths[ranked_a]), truth)
    print(f"labels {name} seed {seed}: anchor (cleanlab find_label_issues, LogisticRegression OOF) flags "
          f"{ranked_a.size}: top-N precision {pa:.3f}, recall {ra:.3f}")
    if not details:
        return p, r, pa, ra
    neigh = CosineIndex(img.X).self_query(KNN_K)
    ev = label_evidence(img.X, img.y, len(img.class_names), neigh)
    for source, proba in (("logistic alone", ev.logistic), ("kNN alone", ev.knn),
                          ("kNN k=10", knn_oof(neigh, img.y, len(img.class_names), k=10)), ("average", ev.proba)):
        flagged, _ = rank_issues(img.y, proba)
        ps, rs = precision_recall(list(paths[flagged]), set(paths[flagged]), truth)
        print(f"labels {name}:   {source:15s} flags {flagged.size}: top-N precision {ps:.3f}, recall {rs:.3f}")
    return p, r, pa, ra


def variants(src: str, out: Path) -> dict[str, Path]:
    from PIL import Image, ImageEnhance

    im = Image.open(src).convert("RGB")
    w, h = im.size
    stem = Path(src).stem
    made = {"jpeg50": out / f"{stem}-q50.jpg", "resized": out / f"{stem}-small.jpg",
            "cropped": out / f"{stem}-crop.jpg", "brightened": out / f"{stem}-bright.jpg"}
    im.save(made["jpeg50"], quality=50)
    im.resize((int(w * 0.6), int(h * 0.6)), Image.BILINEAR).save(made["resized"], quality=90)
    im.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95))).save(made["cropped"], quality=90)
    ImageEnhance.Brightness(im).enhance(1.1).save(made["brightened"], quality=90)
    return made


def part_dups(root: Path, work: Path, cache: Path, seed: int) -> None:
    rows = listing(root)
    clean, _, _ = audit(write_manifest(rows, work / "flowers.csv"), cache, "--no-map")
    real = [d for d in clean["duplicates"] if d["split_a"] != d["split_b"]]
    print(f"dups: clean flowers has {len(clean['duplicates'])} pairs "
          f"({clean['counts']['exact_duplicates']} exact), {len(real)} across splits:")
    for d in clean["duplicates"]:
        print(f"dups:   {d['kind']:5s} {d['similarity']:.3f} {d['split_a']}/{Path(d['a']).name} ~ "
              f"{d['split_b']}/{Path(d['b']).name}")
    rng = np.random.default_rng(seed)
    train = [r for r in rows if r[2] == "train"]
    picked = [train[i] for i in rng.choice(len(train), 50, replace=False)]
    out = work / "planted"
    out.mkdir(parents=True, exist_ok=True)
    planted: dict[str, tuple[str, str]] = {}
    extra = []
    for path, label, _ in picked:
        for kind, file in variants(path, out).items():
            planted[str(file.resolve())] = (path, kind)
            extra.append((str(file.resolve()), label, "val"))
    result, _, _ = audit(write_manifest(rows + extra, work / "flowers-dups.csv"), cache, "--no-map")
    pairs = {frozenset((d["a"], d["b"])) for d in result["duplicates"]}
    found = {v: frozenset((v, o)) in pairs for v, (o, _) in planted.items()}
    by_kind = {}
    for v, (_, kind) in planted.items():
        by_kind.setdefault(kind, []).append(found[v])
    cross = sum(d["split_a"] != d["split_b"] for d in result["duplicates"])
    print(f"dups: planted {len(planted)} (50 images x 4 variants): recall {np.mean(list(found.values())):.3f} "
          f"({', '.join(f'{k} {np.mean(v):.2f}' for k, v in by_kind.items())}); cross-split pairs reported "
          f"{cross} = {cross / len(planted):.2f}x planted")


def part_outliers(root: Path, work: Path, cache: Path, seed: int) -> None:
    from cleanlab.outlier import OutOfDistribution

    from pipeline.audit.outliers import outlier_scores
    from pipeline.audit.runner import audited_images
    from pipeline.features.store import FeatureFile

    rows = listing(root)
    classes = sorted({r[1] for r in rows})
    rng = np.random.default_rng(seed)
    foreign = listing(SHARED / "hymenoptera")
    dropped = [foreign[i][0] for i in rng.choice(len(foreign), 20, replace=False)]
    extra = [(p, classes[i % len(classes)], "train") for i, p in enumerate(dropped)]
    result, _, _ = audit(write_manifest(rows + extra, work / "flowers-outliers.csv"), cache, "--no-map")
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        img = audited_images(ff)
    paths = np.asarray(img.paths)
    ours = paths[np.argsort(-outlier_scores(img.X, img.y), kind="stable")[:40]]
    ood = OutOfDistribution().fit_score(features=img.X)
    theirs = paths[np.argsort(ood, kind="stable")[:40]]
    listed = {o["path"] for o in result["outliers"]}
    print(f"outliers: of 20 foreign photos, {sum(p in dropped for p in ours)} in our top 40 "
          f"(listed as outliers: {sum(p in listed for p in dropped)} of {len(listed)} listed); "
          f"cleanlab OutOfDistribution top 40: {sum(p in dropped for p in theirs)}")


def part_clean(root: Path, work: Path, cache: Path, seed: int) -> None:
    from pipeline.heads.auto import AutoHead
    from pipeline.features.store import FeatureFile

    rows = listing(root)
    noisy, truth = flip(rows, 0.10, seed + 1)
    result, _, run = audit(write_manifest(noisy, work / "flowers-flip10.csv"), cache, "--no-map")
    kept = {r["path"] for r in csv.DictReader((run / "cleaned.csv").open())}
    clean_lab = {p: c for p, c, _ in rows}
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        paths = np.asarray(ff.paths)
        names = list(ff.class_names)
        X = ff.load()
    split = np.asarray([s for _, _, s in noisy])
    by_path = {p: i for i, p in enumerate(paths)}
    order = np.asarray([by_path[p] for p, _, _ in noisy])
    X = X[order]
    y_noisy = np.asarray([names.index(c) for _, c, _ in noisy])
    y_clean = np.asarray([names.index(clean_lab[p]) for p, _, _ in noisy])
    tr, va = split == "train", split == "val"
    in_clean = np.asarray([p in kept for p, _, _ in noisy])

    def acc(mask: np.ndarray, y: np.ndarray) -> float:
        head = AutoHead(n_jobs=2).fit(X[mask], y[mask], class_names=names)
        return float((head.predict(X[va]) == y_clean[va]).mean())

    a_clean, a_noisy, a_cleaned = acc(tr, y_clean), acc(tr, y_noisy), acc(tr & in_clean, y_noisy)
    lost = a_clean - a_noisy
    print(f"clean: 10% flipped ({len(truth)}); val accuracy clean labels {a_clean:.4f}, noisy {a_noisy:.4f}, "
          f"noisy minus cleaned.csv's drops ({int((tr & ~in_clean).sum())} train images) {a_cleaned:.4f}: "
          f"recovered {(a_cleaned - a_noisy) / lost if lost > 0 else float('nan'):.0%} of what the noise cost")


def part_speed(root: Path, work: Path, cache: Path) -> None:
    result, wall, _ = audit(write_manifest(listing(root), work / "flowers.csv"), cache)
    print(f"speed: flowers audit with map and report: {result['seconds']['total']:.1f} s in the audit "
          f"({json.dumps(result['seconds'])}), {wall:.1f} s for the command (start-up included)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-audit", help="Manifests, planted files and the cache.")
    ap.add_argument("--parts", default="labels,dups,outliers,clean,speed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-seeds", type=int, default=3, help="Flip seeds of the labels part (mean and range).")
    args = ap.parse_args(argv)
    work = Path(args.work)
    cache = work / "cache"
    flowers = SHARED / "flower_photos_224"
    if not flowers.is_dir():
        sys.exit(f"no {flowers}: this benchmark reads the shared photos")
    parts = set(args.parts.split(","))
    if "labels" in parts:
        for name, root in (("flowers", flowers), ("hymenoptera", SHARED / "hymenoptera")):
            got = np.asarray([part_labels(name, root, work, cache, s, details=s == args.seed)
                              for s in range(args.seed, args.seed + args.label_seeds)])
            mean, lo, hi = got.mean(axis=0), got.min(axis=0), got.max(axis=0)
            print(f"labels {name} over {args.label_seeds} seeds: audit top-N precision {mean[0]:.3f} "
                  f"({lo[0]:.3f}-{hi[0]:.3f}), recall {mean[1]:.3f} ({lo[1]:.3f}-{hi[1]:.3f}); anchor "
                  f"{mean[2]:.3f} ({lo[2]:.3f}-{hi[2]:.3f}), {mean[3]:.3f} ({lo[3]:.3f}-{hi[3]:.3f})")
    if "dups" in parts:
        part_dups(flowers, work, cache, args.seed)
    if "outliers" in parts:
        part_outliers(flowers, work, cache, args.seed)
    if "clean" in parts:
        part_clean(flowers, work, cache, args.seed)
    if "speed" in parts:
        part_speed(flowers, work, cache)


if __name__ == "__main__":
    main()
