"""How well `audit` finds faults planted with a seed into real photos (it is never told which), against
cleanlab's documented recipe on the same cached features. Not a test: a benchmark whose figures go
in docs/benchmarks.md (Audit: planted faults).

    .venv/bin/python bench/audit.py                      # flowers + hymenoptera from ../shared/data
    .venv/bin/python bench/audit.py --parts labels,dups --work /tmp/bench-audit

Parts (each runs `cli.py audit` on a manifest, read in place; features are extracted once and every
later manifest of the same files reuses those rows):
- labels: 5% of flowers' (and hymenoptera's) training labels flipped to another class. Top-N
  precision (N = flipped) and recall of the flagged set; cleanlab's `find_label_issues` on
  out-of-fold probabilities of a plain `LogisticRegression` (its documented recipe, on the rows in a
  shuffled order; also printed on the listing's order, whose folds gather the flips) beside it, and
  the two evidence sources alone (logistic, kNN) to show what the neighbours add.
- dups: 50 training images copied into val as JPEG-50, 0.6x, centre-90% and +10%-bright variants
  (200 planted pairs): recall, and cross-split pairs reported against the planted count.
- outliers: 20 hymenoptera photos dropped into flowers' training classes: how many are in the top 40
  of the outlier ranking; cleanlab's `OutOfDistribution` on the features beside it; then the spread
  over `--plant-seeds` plants from `--plant-seed-start` (from all of hymenoptera, its ants alone, its bees alone).
- clean: 10% of flowers' training labels flipped, over 10 seeds: head-only val accuracy of each head
  kind (auto, logistic, knn, dense) with clean labels, noisy labels, and `cleaned.csv` (with and
  without `--relabel`), same val images throughout; recovery as a ratio of means, against one clean
  fit and against clean fits missing 1%, with its bootstrap standard error over seeds.
- clean-cv (not run by default: ~65 min on 2 cores for auto, logistic and knn over 10 seeds): the clean
  part cross-fitted. 10% of every flowers label flipped, one audit, each head scored out of fold on all
  3,116 images rather than val's 547, so the auto head's recovery has a standard error it can be judged by.
  `--drop-grid 0.1,0.3,0.5` also scores cleaned.csv under those --drop-below values (the rule's default,
  0.2, against its neighbours); `--clean-heads svm:C=3:cv=1` is the svm the auto head keeps on flowers,
  at its usual C and without its 5-fold CV (~5x faster).
- speed: the whole audit of clean flowers with the map (t-SNE) and the report.
- `--without-reviewed`: the labels and outliers parts leave tf_flowers' reviewed faults out of flowers
  before planting, so the planted faults compete with no known fault of the data set's own.
- scale: the whole audit (with map and report) of a synthetic --scale-rows x 1280 float16 cache
  (bench/scale.py's generator: 5 classes, low-rank class structure plus noise, 80/20 train/val) in a
  child process: wall seconds, the audit's timings, peak RSS; and the recall of the approximate
  neighbour search it switches to above EXACT_ROWS rows, against exact search, on a sample of its
  rows and on flowers (forced approximate there).
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
from typing import Callable, Collection

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = REPO.parent / "shared" / "data"
IMAGES = {".jpg", ".jpeg", ".png"}


def listing(root: Path, leave_out: Collection[str] = ()) -> list[tuple[str, str, str]]:
    """(absolute path, class, split) of a train/ val/ folder tree, less the absolute paths `leave_out`."""
    rows = []
    for split in ("train", "val", "test"):
        for p in sorted((root / split).rglob("*")) if (root / split).is_dir() else []:
            if p.suffix.lower() in IMAGES and str(p.resolve()) not in leave_out:
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


def reviewed(root: Path) -> dict[str, str]:
    """tf_flowers' own faults found by looking (bench/flowers_reviewed.csv: photos whose label is wrong
    or that show no flower of their class at all), absolute path -> finding; {} for another data set."""
    if root.name != "flower_photos_224":
        return {}
    with (Path(__file__).parent / "flowers_reviewed.csv").open() as f:
        return {str((root / r["file"]).resolve()): r["finding"] for r in csv.DictReader(f)}


def precision_recall(ranked: list[str], flagged: set[str], truth: set[str]) -> tuple[float, float]:
    n = len(truth)
    return sum(p in truth for p in ranked[:n]) / n, len(flagged & truth) / n


def cleanlab_anchor(X: np.ndarray, y: np.ndarray, order_seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's README recipe: out-of-fold probabilities of LogisticRegression() (`cross_val_predict`,
    5 folds), then find_label_issues. The rows go in an order shuffled with `order_seed`: in the
    listing's order (`None`) the unshuffled folds see where the planting put the flips. A flipped image
    is listed under its true class's folder, so among its new label's rows it comes first or right after
    that label's training images, and 2 of the 5 folds hold nearly all flips (hymenoptera 6/0/0/6/0 of 12):
    the models that score them trained on almost clean labels. cleanlab's own
    `estimate_cv_predicted_probabilities` shuffles its folds too."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    order = np.arange(y.size) if order_seed is None else np.random.default_rng(order_seed).permutation(y.size)
    proba = np.empty((y.size, int(y.max()) + 1))
    proba[order] = cross_val_predict(LogisticRegression(max_iter=1000), X[order], y[order], cv=5, method="predict_proba")
    ranked = find_label_issues(y, proba, return_indices_ranked_by="self_confidence")
    return np.asarray(ranked), proba


def part_labels(name: str, root: Path, work: Path, cache: Path, seed: int, details: bool = True,
                leave_out: Collection[str] = ()) -> tuple:
    from pipeline.audit.labels import KNN_K, knn_oof, label_evidence, rank_issues
    from pipeline.audit.runner import audited_images
    from pipeline.features.neighbours import CosineIndex
    from pipeline.features.store import FeatureFile
    from pipeline.heads.base import FeatureSource

    rows, truth = flip(listing(root, leave_out), 0.05, seed)
    tag = "-without-reviewed" if leave_out else ""
    result, wall, _ = audit(write_manifest(rows, work / f"{name}{tag}-flip5-seed{seed}.csv"), cache, "--no-map")
    ranked = [r["path"] for r in result["label_issues"]]
    p, r = precision_recall(ranked, set(ranked), truth)
    known = reviewed(root)
    p_known = sum(q in truth or q in known for q in ranked[:len(truth)]) / len(truth)
    print(f"labels {name} seed {seed}: {len(truth)} flipped of {sum(x[2] == 'train' for x in rows)} train; audit flags "
          f"{len(ranked)}: top-N precision {p:.3f}, recall {r:.3f} (audit {result['seconds']['total']:.1f} s, "
          f"command {wall:.1f} s)" + (f"; top-N precision counting the reviewed faults of the data set itself "
                                      f"{p_known:.3f}" if known else ""))
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        img = audited_images(ff)
        raw = FeatureSource(ff, img.rows).load_reduced("avg")   # the anchor reads the features as cached
    paths = np.asarray(img.paths)
    ranked_a, _ = cleanlab_anchor(raw, img.y, order_seed=seed)
    pa, ra = precision_recall(list(paths[ranked_a]), set(paths[ranked_a]), truth)
    listed_a, _ = cleanlab_anchor(raw, img.y, order_seed=None)
    pl, rl = precision_recall(list(paths[listed_a]), set(paths[listed_a]), truth)
    print(f"labels {name} seed {seed}: anchor (cleanlab find_label_issues, LogisticRegression OOF, rows shuffled) "
          f"flags {ranked_a.size}: top-N precision {pa:.3f}, recall {ra:.3f}; on the listing's order (its folds "
          f"gather the flips) {listed_a.size}: {pl:.3f}, {rl:.3f}")
    if not details:
        return p, r, pa, ra, p_known, pl, rl
    neigh = CosineIndex(img.X).self_query(KNN_K)
    ev = label_evidence(img.X, img.y, len(img.class_names), neigh)
    for source, proba in (("logistic alone", ev.logistic), ("kNN alone", ev.knn),
                          ("kNN k=10", knn_oof(neigh, img.y, len(img.class_names), k=10)), ("average", ev.proba)):
        flagged, _ = rank_issues(img.y, proba)
        ps, rs = precision_recall(list(paths[flagged]), set(paths[flagged]), truth)
        print(f"labels {name}:   {source:15s} flags {flagged.size}: top-N precision {ps:.3f}, recall {rs:.3f}")
    return p, r, pa, ra, p_known, pl, rl


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


def part_outliers(root: Path, work: Path, cache: Path, seed: int, plant_seeds: int = 20, plant_start: int = 0,
                  leave_out: Collection[str] = ()) -> None:
    from cleanlab.outlier import OutOfDistribution

    from pipeline.audit.outliers import outlier_scores
    from pipeline.audit.runner import audited_images
    from pipeline.features.store import FeatureFile
    from pipeline.heads.base import FeatureSource

    rows = listing(root, leave_out)
    classes = sorted({r[1] for r in rows})
    rng = np.random.default_rng(seed)
    foreign = listing(SHARED / "hymenoptera")
    dropped = [foreign[i][0] for i in rng.choice(len(foreign), 20, replace=False)]
    extra = [(p, classes[i % len(classes)], "train") for i, p in enumerate(dropped)]
    tag = "-without-reviewed" if leave_out else ""
    result, _, _ = audit(write_manifest(rows + extra, work / f"flowers{tag}-outliers.csv"), cache, "--no-map")
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        img = audited_images(ff)
        raw = FeatureSource(ff, img.rows).load_reduced("avg")
    paths = np.asarray(img.paths)
    ours = paths[np.argsort(-outlier_scores(img.X, img.y), kind="stable")[:40]]
    ood = OutOfDistribution().fit_score(features=raw)
    theirs = paths[np.argsort(ood, kind="stable")[:40]]
    listed = {o["path"] for o in result["outliers"]}
    known = {p for p, finding in reviewed(root).items() if finding == "not_the_class"}
    print(f"outliers: our top 40 also holds {sum(p in known for p in ours)} of flowers' own reviewed photos of no "
          f"flower of their class: {sum(p in known or p in dropped for p in ours)} of 40 do not belong")
    issues = {d["path"] for d in result["label_issues"]}
    print(f"outliers: the audit flags {sum(p in listed or p in issues for p in dropped)} of the 20 foreign photos "
          f"({sum(p in issues for p in dropped)} as label issues of the {len(issues)} listed, "
          f"{sum(p in listed for p in dropped)} as outliers)")
    print(f"outliers: of 20 foreign photos, {sum(p in dropped for p in ours)} in our top 40 "
          f"(listed as outliers: {sum(p in listed for p in dropped)} of {len(listed)} listed); "
          f"cleanlab OutOfDistribution top 40: {sum(p in dropped for p in theirs)}")
    plant_spread(rows, foreign, classes, work, cache, known, range(plant_start, plant_start + plant_seeds))


def plant_spread(rows: list, foreign: list, classes: list[str], work: Path, cache: Path, known: set[str],
                 seeds: range) -> None:
    """How the outlier figure moves with the plant: 20 photos drawn with each of `seeds` from all
    of hymenoptera, from its ants alone and from its bees alone, ranked by the audit's own outlier
    score (in process, on rows of one cache holding flowers and every hymenoptera photo)."""
    from pipeline.audit.outliers import outlier_scores
    from pipeline.features.neighbours import unit_rows
    from pipeline.features.store import FeatureFile
    from pipeline.heads.base import FeatureSource

    every = [(p, classes[i % len(classes)], "train") for i, (p, _, _) in enumerate(foreign)]
    result, _, _ = audit(write_manifest(rows + every, work / f"flowers-all-foreign-{len(rows)}.csv"), cache, "--no-map")
    with FeatureFile(cache_file(cache, result["cache_key"])) as ff:
        at = {ff.paths[r]: r for r in range(len(ff.paths)) if ff.views[r] == 0}

        def features(listed: list) -> np.ndarray:  # in the listing's order (the file is read in its own)
            where = np.asarray([at[p] for p, _, _ in listed])
            return FeatureSource(ff, np.sort(where)).load_reduced("avg")[np.argsort(np.argsort(where))]

        X_own, X_foreign = features(rows), features(foreign)
    y_own = np.asarray([classes.index(c) for _, c, _ in rows])
    own_known = np.asarray([p in known for p, _, _ in rows])
    imagenet_view(X_own, y_own, classes, X_foreign, ["/bees/" in p for p, _, _ in foreign])
    for name, pool in (("any", np.arange(len(foreign))),
                       ("ants", np.flatnonzero(["/ants/" in p for p, _, _ in foreign])),
                       ("bees", np.flatnonzero(["/bees/" in p for p, _, _ in foreign]))):
        got = []
        for seed in seeds:
            pick = pool[np.random.default_rng(seed).choice(pool.size, 20, replace=False)]
            X = unit_rows(np.concatenate([X_own, X_foreign[pick]]).astype(np.float32), in_place=True)
            y = np.concatenate([y_own, np.arange(20) % len(classes)])
            top = np.argsort(-outlier_scores(X, y), kind="stable")[:40]
            got.append(((top >= len(rows)).sum(), own_known[top[top < len(rows)]].sum()))
        got = np.asarray(got)
        print(f"outliers: 20 photos from {name} of hymenoptera, plant seeds {seeds.start}-{seeds.stop - 1}: {got[:, 0].mean():.1f} in the top 40 "
              f"({got[:, 0].min()}-{got[:, 0].max()}), with {got[:, 1].mean():.1f} of flowers' own reviewed photos of no "
              f"flower of their class")


def imagenet_view(X_own: np.ndarray, y_own: np.ndarray, classes: list[str], X_foreign: np.ndarray,
                  bees: list[bool]) -> None:
    """What the default backbone's own ImageNet classifier (linear on the cached pooled features) calls
    flowers' photos and the planted ones: why bees hide among the flowers and ants do not."""
    from pipeline.backbones.imagenet import class_names
    from pipeline.backbones.lite_weights import weights_path
    from pipeline.backbones.table import DEFAULT_BACKBONE
    from pipeline.backbones.torchfile import load_state_dict

    state = load_state_dict(weights_path(DEFAULT_BACKBONE))
    W, b = state["_fc.weight"].astype(np.float32), state["_fc.bias"].astype(np.float32)
    names = class_names()
    bee, ant = names.index("bee"), names.index("ant")
    top_own = (X_own.astype(np.float32) @ W.T + b).argmax(axis=1)
    top_foreign = (X_foreign.astype(np.float32) @ W.T + b).argmax(axis=1)
    bees = np.asarray(bees)
    per_class = ", ".join(f"{c} {int(((top_own == bee) & (y_own == i)).sum())}" for i, c in enumerate(classes))
    print(f"outliers: {DEFAULT_BACKBONE}'s ImageNet classifier calls {int((top_own == bee).sum())} of flowers' "
          f"{top_own.size} photos 'bee' ({per_class}) and {int((top_own == ant).sum())} 'ant'; hymenoptera's bee "
          f"photos: {int((top_foreign[bees] == bee).sum())} of {int(bees.sum())} 'bee', its ant photos "
          f"{int((top_foreign[~bees] == ant).sum())} of {int((~bees).sum())} 'ant'")


CLEAN_HEADS = ("auto", "logistic", "knn", "dense")


def paired(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(mean of ours - theirs over seeds, its standard error): on the same seeds, so the plant's own
    spread cancels; (nan, nan) for no seeds, SE nan for one."""
    d = np.asarray(ours, float) - np.asarray(theirs, float)
    if not d.size:
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")


def recovery(acc_of: dict[str, list[float]], name: str, base: str, draws: int = 2000) -> tuple[float, float]:
    """(share of the noise's cost that `name` wins back, as a ratio of means over seeds; its bootstrap
    standard error, resampling seeds). The per-seed ratio is useless: it divides by a few val images."""
    got, noisy, clean = (np.asarray(acc_of[k]) for k in (name, "noisy", base))

    def ratio(i: np.ndarray) -> float:
        lost = clean[i].mean() - noisy[i].mean()
        return float((got[i].mean() - noisy[i].mean()) / lost) if lost else float("nan")

    rng = np.random.default_rng(0)
    every = np.arange(noisy.size)
    return ratio(every), float(np.nanstd([ratio(rng.integers(0, noisy.size, noisy.size)) for _ in range(draws)]))


def features_in_order(cache: Path, key: str, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """(the cached features of `paths`, in that order, clean views; the cache's class names)."""
    from pipeline.features.store import FeatureFile

    with FeatureFile(cache_file(cache, key)) as ff:
        by_path = {p: i for i, p in enumerate(ff.paths) if ff.views[i] == 0}
        return ff.load()[np.asarray([by_path[p] for p in paths])], list(ff.class_names)


def read_cleaned(folder: Path, noisy: list[tuple[str, str, str]], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(which of the `noisy` rows the run's cleaned.csv keeps, each row's class number there: its
    cleaned label where kept, its noisy one where dropped)."""
    kept = {r["path"]: r["label"] for r in csv.DictReader((folder / "cleaned.csv").open())}
    return (np.asarray([p in kept for p, _, _ in noisy]),
            np.asarray([names.index(kept.get(p, c)) for p, c, _ in noisy]))


def head_spec(spec: str) -> tuple[str, dict[str, float]]:
    """'svm:C=3:cv=1' -> ('svm', {'C': 3.0, 'cv': 1}): a head kind with constructor parameters (numbers)."""
    kind, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            params[name] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"{spec!r}: a head's parameters read name=number, not {pair!r}")
    return kind, params


def fresh_head(kind: str):
    """An unfitted head of `kind` (a head spec: 'svm:C=3:cv=1' sets parameters); those that
    cross-validate in parallel get both cores."""
    from pipeline.heads.registry import make_head

    name, params = head_spec(kind)
    head = make_head(name, **params)
    if "n_jobs" in head.get_params():
        head.set_params(n_jobs=2)
    return head


def part_clean(root: Path, work: Path, cache: Path, seed: int, seeds: int = 10,
               heads: tuple[str, ...] = CLEAN_HEADS) -> None:
    """10% of training labels flipped (per seed): val accuracy (clean val labels, the same val images
    throughout) of each head kind trained on noisy labels, on cleaned.csv, on cleaned.csv of `--relabel`,
    on cleaned.csv of `--drop-below 1` (every listed issue dropped: the rule before 2026-12-05), and minus exactly
    the flipped images (an oracle no audit can beat by dropping).

    What the noise cost is measured against clean labels twice: one fit on every training image (first
    seed only), and per seed a fit missing a random 1% of them (the auto head's val accuracy moves by up
    to 1.5 points with one image in a hundred, and one fit can sit above that spread). Recovery is the
    ratio of the means over seeds, with its bootstrap standard error over seeds: heads that noise costs
    little (the auto head: 1.5 points, 8 val images) cannot tell 65% from 80% in 20 seeds."""
    rows = listing(root)
    clean_lab = {p: c for p, c, _ in rows}
    acc_of: dict[str, dict[str, list[float]]] = {kind: {} for kind in heads}
    for s in range(seed, seed + seeds):
        noisy, truth = flip(rows, 0.10, s + 1)
        manifest = write_manifest(noisy, work / f"flowers-flip10-seed{s}.csv")
        result, _, run = audit(manifest, cache, "--no-map")
        _, _, run_relabel = audit(manifest, cache, "--no-map", "--relabel")
        _, _, run_all = audit(manifest, cache, "--no-map", "--drop-below", "1")  # the rule before 2026-12-05
        paths = [p for p, _, _ in noisy]
        X, names = features_in_order(cache, result["cache_key"], paths)
        split = np.asarray([sp for _, _, sp in noisy])
        tr, va = split == "train", split == "val"
        y_noisy = np.asarray([names.index(c) for _, c, _ in noisy])
        y_clean = np.asarray([names.index(clean_lab[p]) for p, _, _ in noisy])

        def from_cleaned(folder: Path) -> tuple[np.ndarray, np.ndarray]:
            mask, y = read_cleaned(folder, noisy, names)
            return tr & mask, y

        rng = np.random.default_rng(1000 + s)
        train_rows = np.flatnonzero(tr)
        less = tr.copy()
        less[rng.choice(train_rows, max(1, train_rows.size // 100), replace=False)] = False
        sets = {"clean labels, 1% left out": (less, y_clean), "noisy": (tr, y_noisy),
                "cleaned.csv": from_cleaned(run), "cleaned.csv with --relabel": from_cleaned(run_relabel),
                "cleaned.csv --drop-below 1 (every listed issue dropped)": from_cleaned(run_all),
                "oracle: drop exactly the flipped": (tr & ~np.isin(paths, list(truth)), y_noisy)}
        if s == seed:
            sets = {"clean labels, one fit on all": (tr, y_clean), **sets}
        for kind in heads:
            got = {}
            for name, (mask, y) in sets.items():
                head = fresh_head(kind)
                head.fit(X[mask], y[mask], class_names=names)
                got[name] = float((head.predict(X[va]) == y_clean[va]).mean())
            print(f"clean seed {s}, {kind} head: 10% flipped ({len(truth)}), val accuracy "
                  + ", ".join(f"{k} {a:.4f}" for k, a in got.items()), flush=True)
            for k, a in got.items():
                acc_of[kind].setdefault(k, []).append(a)
    for kind in heads:
        acc = acc_of[kind]
        noisy_mean = np.mean(acc["noisy"])
        for base in ("clean labels, one fit on all", "clean labels, 1% left out"):
            if base == "clean labels, one fit on all":  # one fit: no spread over seeds to draw from
                lost = acc[base][0] - noisy_mean
                shares = {k: f"{(np.mean(v) - noisy_mean) / lost:.0%}" for k, v in acc.items() if k.startswith(("cleaned", "oracle"))}
            else:
                lost = np.mean(acc[base]) - noisy_mean
                shares = {k: "{:.0%} (SE {:.0%})".format(*recovery(acc, k, base)) for k in acc if k.startswith(("cleaned", "oracle"))}
            print(f"clean over {seeds} seeds, {kind} head, against {base} ({np.mean(acc[base]):.4f}; noisy {noisy_mean:.4f}, "
                  f"the noise cost {lost * 100:.2f} points): "
                  + ", ".join(f"{k} {np.mean(acc[k]):.4f} recovers {share}" for k, share in shares.items()))
        spread = acc["clean labels, 1% left out"]
        print(f"clean, {kind} head: the clean-label fits with 1% left out range {min(spread):.4f}-{max(spread):.4f}")


def part_clean_cv(root: Path, work: Path, cache: Path, seed: int, seeds: int = 10,
                  heads: tuple[str, ...] = CLEAN_HEADS, folds: int = 5, drop_grid: tuple[float, ...] = ()) -> None:
    """The clean part cross-fitted, so every image is scored rather than val's 547: 10% of all of
    flowers' labels flipped (per seed; train and val listed as one training split), one audit of the
    whole noisy manifest as a user would run it, then per fold of a fixed stratified `folds`-fold split
    each head trained on the other folds (clean labels, noisy, cleaned.csv, cleaned.csv with
    `--relabel`, and cleaned.csv of each `--drop-below` in `drop_grid`) and scored on the fold against
    its clean labels. Recovery as in the clean part: a ratio of means over seeds with its bootstrap
    standard error (the clean fits are one per fold, shared by every seed: 3,116 scored images make them
    steady where val's 547 were not)."""
    from sklearn.model_selection import StratifiedKFold

    rows = [(p, c, "train") for p, c, _ in listing(root)]
    names = sorted({c for _, c, _ in rows})
    paths = [p for p, _, _ in rows]
    y_clean = np.asarray([names.index(c) for _, c, _ in rows])
    fold = np.zeros(y_clean.size, int)
    for f, (_, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=0).split(y_clean, y_clean)):
        fold[test] = f

    def fit_score(kind: str, X: np.ndarray, y: np.ndarray, keep: np.ndarray) -> float:
        """Share of all images predicted right (clean labels), each by the head fit on the kept rows of the other folds."""
        right = 0
        for f in range(folds):
            train = keep & (fold != f)
            head = fresh_head(kind)
            head.fit(X[train], y[train], class_names=names)
            right += int((head.predict(X[fold == f]) == y_clean[fold == f]).sum())
        return right / y_clean.size

    acc_of: dict[str, dict[str, list[float]]] = {kind: {} for kind in heads}
    clean_acc: dict[str, float] = {}
    X = None
    for s in range(seed, seed + seeds):
        noisy, truth = flip(rows, 0.10, s + 1)
        manifest = write_manifest(noisy, work / f"flowers-all-flip10-seed{s}.csv")
        result, _, run = audit(manifest, cache, "--no-map")
        _, _, run_relabel = audit(manifest, cache, "--no-map", "--relabel")
        if X is None:
            X, _ = features_in_order(cache, result["cache_key"], paths)
        y_noisy = np.asarray([names.index(c) for _, c, _ in noisy])
        everything = np.ones(y_clean.size, bool)
        sets = {"noisy": (everything, y_noisy), "cleaned.csv": read_cleaned(run, noisy, names),
                "cleaned.csv with --relabel": read_cleaned(run_relabel, noisy, names),
                "oracle: drop exactly the flipped": (~np.isin(paths, list(truth)), y_noisy)}
        for below in drop_grid:  # the same audit's findings, another drop rule: one more run folder each
            _, _, run_below = audit(manifest, cache, "--no-map", "--drop-below", f"{below:g}")
            sets[f"cleaned.csv --drop-below {below:g}"] = read_cleaned(run_below, noisy, names)
        for kind in heads:
            if kind not in clean_acc:
                clean_acc[kind] = fit_score(kind, X, y_clean, everything)
            got = {"clean labels": clean_acc[kind]}
            got.update({name: fit_score(kind, X, y, keep) for name, (keep, y) in sets.items()})
            print(f"clean-cv seed {s}, {kind} head: 10% flipped ({len(truth)} of {len(rows)}), {folds}-fold "
                  "accuracy on every image " + ", ".join(f"{k} {a:.4f}" for k, a in got.items()), flush=True)
            for k, a in got.items():
                acc_of[kind].setdefault(k, []).append(a)
    for kind in heads:
        acc = acc_of[kind]
        noisy_mean = np.mean(acc["noisy"])
        lost = clean_acc[kind] - noisy_mean
        print(f"clean-cv over {seeds} seeds, {kind} head (clean {clean_acc[kind]:.4f}, noisy {noisy_mean:.4f}: the noise "
              f"cost {lost * 100:.2f} points, {lost * len(rows):.0f} images): "
              + ", ".join("{} {:.4f} recovers {:.0%} (SE {:.0%})".format(k, np.mean(acc[k]), *recovery(acc, k, "clean labels"))
                          for k in acc if k.startswith(("cleaned", "oracle"))))


def part_speed(root: Path, work: Path, cache: Path) -> None:
    result, wall, _ = audit(write_manifest(listing(root), work / "flowers.csv"), cache)
    print(f"speed: flowers audit with map and report: {result['seconds']['total']:.1f} s in the audit "
          f"({json.dumps(result['seconds'])}), {wall:.1f} s for the command (start-up included)")


def part_scale(work: Path, cache: Path, rows: int) -> None:
    from scale import write_synthetic

    from pipeline.audit.labels import KNN_K
    from pipeline.audit.runner import audited_images
    from pipeline.audit.outliers import CLASS_K, class_knn_distance
    from pipeline.features.neighbours import EXACT_ROWS, CosineIndex, search_space, self_neighbours
    from pipeline.features.store import FeatureFile

    folder = work / "scale"
    t = time.perf_counter()
    path = write_synthetic(folder / "features", rows, 1280, 5)
    print(f"scale: synthetic {rows:,} x 1280 float16 cache ready ({time.perf_counter() - t:.0f} s): {path}")
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
               "sys.exit(r.returncode)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, str(REPO / "cli.py"), "audit", "--cache",
                           str(path), "--cache-dir", str(folder), "--no-progress"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"scale audit failed: {proc.stderr.strip()[-2000:]}")
    rss = int(re.search(r"MAXRSS (\d+)", proc.stdout).group(1)) / 1024 ** 2   # KiB -> GiB
    run = folder / "runs" / re.search(r"audit (\S+) in", proc.stdout).group(1)
    result = json.loads((run / "audit.json").read_text())
    print(f"scale: audit of {rows:,} x 1280: {wall:.1f} s for the command, {result['seconds']['total']:.1f} s in the "
          f"audit ({json.dumps(result['seconds'])}), peak RSS {rss:.2f} GiB; counts {json.dumps(result['counts'])}")
    with FeatureFile(path) as ff:
        img = audited_images(ff)
    rng = np.random.default_rng(0)
    sample = rng.choice(img.y.size, 500, replace=False)
    t = time.perf_counter()
    approx = self_neighbours(img.X, KNN_K, normalized=True, exact_rows=0)
    t_approx = time.perf_counter() - t
    exact = CosineIndex(img.X, normalized=True).query(img.X[sample], KNN_K + 1)
    recall = np.mean([len(set(approx.index[q]) & set(exact.index[j][exact.index[j] != q][:KNN_K])) / KNN_K
                      for j, q in enumerate(sample)])
    print(f"scale: approximate neighbours (above {EXACT_ROWS:,} rows) of {rows:,} rows in {t_approx:.1f} s; recall@"
          f"{KNN_K} against exact search on 500 sampled rows {recall:.3f}")
    # the outliers' per-class distances as the audit makes them (from the global neighbours, the rows
    # short of their class searched through the shared projection) and, for reference, with a graph per
    # class, against exact per-class search
    walk = search_space(img.X)
    t = time.perf_counter()
    approx_d = class_knn_distance(img.X, img.y, CLASS_K, walk=walk, neigh=approx)
    t_class = time.perf_counter() - t
    t = time.perf_counter()
    graph_d = class_knn_distance(img.X, img.y, CLASS_K, walk=walk)
    t_graph = time.perf_counter() - t
    exact_d = np.empty(sample.size)
    for j, q in enumerate(sample):
        same = np.flatnonzero(img.y == img.y[q])
        got = CosineIndex(img.X[same], normalized=True).query(img.X[q:q + 1], CLASS_K + 1)
        sims = got.similarity[0][same[got.index[0]] != q][:CLASS_K]
        exact_d[j] = 1.0 - sims.mean()
    for how, d, took in (("from the global neighbours (the audit's way)", approx_d, t_class),
                         ("a graph per class", graph_d, t_graph)):
        ratio = d[sample] / exact_d
        print(f"scale: per-class {CLASS_K}-NN distances (outliers) of {rows:,} rows, {how}: {took:.1f} s; "
              f"approximate / exact on 500 sampled rows: median {np.median(ratio):.4f}, 95th pct "
              f"{np.percentile(ratio, 95):.4f}")
    flowers = sorted((cache / "features").glob("*.h5"))
    for f in flowers:
        with FeatureFile(f) as ff:
            if "flower_photos" not in (ff.paths[0] if len(ff.paths) else ""):
                continue
            img = audited_images(ff)
        ex = CosineIndex(img.X, normalized=True).self_query(KNN_K)
        ap = self_neighbours(img.X, KNN_K, normalized=True, exact_rows=0)
        rec = np.mean([len(set(a) & set(b)) / KNN_K for a, b in zip(ap.index, ex.index)])
        print(f"scale: flowers ({img.y.size:,} images), approximate search forced: recall@{KNN_K} {rec:.3f}")
        break


def counted(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least` (argparse turns the error into one line)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise ValueError(text)
        return value
    parse.__name__ = f"whole number from {least}"
    return parse


def probabilities(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers from 0 to 1 (argparse turns the error into one line)."""
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if any(not 0 <= v <= 1 for v in values):
        raise ValueError(text)
    return values


probabilities.__name__ = "comma-separated --drop-below values from 0 to 1"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-audit", help="Manifests, planted files and the cache.")
    ap.add_argument("--parts", default="labels,dups,outliers,clean,speed,scale",
                    help="Comma-separated parts to run; clean-cv (all images, cross-fitted: ~1 hour) is not a default.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-seeds", type=int, default=3, help="Flip seeds of the labels part (mean and range).")
    ap.add_argument("--label-data", default="flowers,hymenoptera",
                    help="Data sets of the labels part (hymenoptera alone over 40 seeds: ~5 minutes).")
    ap.add_argument("--clean-seed", type=int, default=100,
                    help="First flip seed of the clean part (0-11 chose cleaned.csv's rule on 2026-12-05).")
    ap.add_argument("--clean-seeds", type=int, default=10, help="Flip seeds of the clean part.")
    ap.add_argument("--clean-heads", default=",".join(CLEAN_HEADS),
                    help="Head kinds the clean parts fit on each training set (auto is fit-head's default); "
                         "kind:name=number sets a parameter (svm:C=3:cv=1, an svm at C 3 without its CV: ~5x faster).")
    ap.add_argument("--drop-grid", type=probabilities, default="",
                    help="clean-cv also scores cleaned.csv of each of these comma-separated --drop-below values "
                         "(0.1,0.3,0.5: the default 0.2 against its neighbours).")
    ap.add_argument("--plant-seeds", type=counted(1), default=20, help="Plant seeds of the outliers part's spread.")
    ap.add_argument("--plant-seed-start", type=counted(0), default=0,
                    help="First plant seed of the spread (the neighbourhood weight was chosen on 0-59; 60 on are fresh).")
    ap.add_argument("--without-reviewed", action="store_true",
                    help="Leave tf_flowers' reviewed faults (bench/flowers_reviewed.csv) out of flowers before the labels "
                         "and outliers parts plant theirs, so the planted faults are the only known ones.")
    ap.add_argument("--scale-rows", type=int, default=200_000, help="Rows of the scale part's synthetic cache.")
    args = ap.parse_args(argv)
    from pipeline.errors import UserError
    from pipeline.heads.registry import HEAD_KINDS

    # names checked before any part runs, not after minutes of another (a misspelt part ran nothing and said nothing)
    for flag, given, known in (("--label-data", args.label_data, ("flowers", "hymenoptera")),
                               ("--parts", args.parts, ("labels", "dups", "outliers", "clean", "clean-cv", "speed",
                                                        "scale")),
                               ("--clean-heads", ",".join(k.split(":")[0] for k in args.clean_heads.split(",")),
                                tuple(HEAD_KINDS))):
        odd = [n for n in given.split(",") if n not in known]
        if odd:
            ap.error(f"{flag} takes {', '.join(known)}, not {odd[0]!r}")
    if args.drop_grid and "clean-cv" not in args.parts.split(","):  # read by clean-cv alone: not ignored in silence
        ap.error("--drop-grid is read by --parts clean-cv only; add clean-cv to --parts or leave --drop-grid out")
    for spec in args.clean_heads.split(","):  # a parameter the head lacks or a bad value: refused now, not an hour in
        try:
            fresh_head(spec).check_params()
        except (ValueError, UserError) as e:
            ap.error(f"--clean-heads {spec}: {e}")
    work = Path(args.work)
    cache = work / "cache"
    flowers = SHARED / "flower_photos_224"
    if not flowers.is_dir():
        sys.exit(f"no {flowers}: this benchmark reads the shared photos")
    parts = set(args.parts.split(","))
    if "labels" in parts:
        sets = {"flowers": flowers, "hymenoptera": SHARED / "hymenoptera"}
        for name in args.label_data.split(","):
            got = np.asarray([part_labels(name, sets[name], work, cache, s, details=s == args.seed,
                                          leave_out=reviewed(sets[name]) if args.without_reviewed else ())
                              for s in range(args.seed, args.seed + args.label_seeds)])
            mean, lo, hi = got.mean(axis=0), got.min(axis=0), got.max(axis=0)
            print(f"labels {name} over {args.label_seeds} seeds: audit top-N precision {mean[0]:.3f} "
                  f"({lo[0]:.3f}-{hi[0]:.3f}), recall {mean[1]:.3f} ({lo[1]:.3f}-{hi[1]:.3f}); anchor "
                  f"{mean[2]:.3f} ({lo[2]:.3f}-{hi[2]:.3f}), {mean[3]:.3f} ({lo[3]:.3f}-{hi[3]:.3f}); audit top-N precision "
                  f"counting reviewed faults {mean[4]:.3f} ({lo[4]:.3f}-{hi[4]:.3f}); seeds with the audit's "
                  f"precision at least the anchor's: {int(np.sum(got[:, 0] >= got[:, 2]))} of {len(got)}, "
                  f"its recall: {int(np.sum(got[:, 1] >= got[:, 3]))} of {len(got)}; anchor on the listing's order "
                  f"(folds that gather the flips) {mean[5]:.3f} ({lo[5]:.3f}-{hi[5]:.3f}), {mean[6]:.3f} ({lo[6]:.3f}-{hi[6]:.3f})")
            (dp, sp), (dr, sr) = paired(got[:, 0], got[:, 2]), paired(got[:, 1], got[:, 3])
            print(f"labels {name}: audit minus anchor on the same seeds: top-N precision {dp:+.3f} +- {sp:.3f}, "
                  f"recall {dr:+.3f} +- {sr:.3f} (standard errors)")
    if "dups" in parts:
        part_dups(flowers, work, cache, args.seed)
    if "outliers" in parts:
        part_outliers(flowers, work, cache, args.seed, args.plant_seeds, args.plant_seed_start,
                      reviewed(flowers) if args.without_reviewed else ())
    if "clean" in parts:
        part_clean(flowers, work, cache, args.clean_seed, args.clean_seeds, tuple(args.clean_heads.split(",")))
    if "clean-cv" in parts:
        part_clean_cv(flowers, work, cache, args.clean_seed, args.clean_seeds, tuple(args.clean_heads.split(",")),
                      drop_grid=args.drop_grid)
    if "speed" in parts:
        part_speed(flowers, work, cache)
    if "scale" in parts:
        part_scale(work, cache, args.scale_rows)


if __name__ == "__main__":
    main()
