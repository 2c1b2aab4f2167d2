"""The audit of one cache: label issues, duplicates and leakage, outliers, model errors and a 2-D map,
from the cached embeddings (seconds; the backbone never runs), written into a run folder as audit.json,
one CSV per finding, a cleaned manifest and a self-contained report.html."""

from __future__ import annotations

import json
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.atomic import write_text_atomic
from pipeline.audit.duplicates import SPLIT_ORDER, NearSettings, Pair, copy_groups, exact_pairs, near_pairs
from pipeline.audit.labels import (DEFAULT_C, KNN_K, LabelEvidence, class_images, cv_splits, fit_logistic,
                                   label_evidence, rank_issues)
from pipeline.audit.outliers import outlier_scores
from pipeline.audit.report import write_report
from pipeline.audit.review import DROP, Review
from pipeline.audit.rules import DROP_BELOW, RELABEL_CONFIDENCE
from pipeline.backend import DEFAULT as DEFAULT_BACKEND
from pipeline.data.sources import builtin_image, names_files
from pipeline.errors import DataWarning, UserError
from pipeline.extract.plan import DEFAULT_CACHE, ExtractRequest
from pipeline.features.neighbours import EXACT_ROWS, search_space, self_neighbours, unit_rows
from pipeline.features.reuse import fill_hashes
from pipeline.features.store import FeatureFile
from pipeline.heads.base import FeatureSource, Head, fit_meta
from pipeline.layout import CacheLayout, cache_dir_flags
from pipeline.sheets import csv_text
from pipeline.tracking.runs import Run

AUDIT_VERSION = 2  # 2 (2026-12-05): an outlier's score holds its neighbourhood's term; cleaned.command added
OUTLIER_Z = 3.5        # robust z-score from which an image is listed as an outlier
TOP_LOSSES = 20        # per split
MAP_POINTS = 5000      # the 2-D map embeds at most this many images (flagged ones first)


@dataclass
class AuditOptions:
    """How to audit: CV folds, the seed, the logistic C of the out-of-fold model, near-duplicate
    thresholds and whether to draw the map (what cleaned.csv does is `write_audit`'s to say)."""

    cv: int = 5
    seed: int = 0
    C: float = DEFAULT_C
    near: NearSettings = field(default_factory=NearSettings)
    draw_map: bool = True


@dataclass
class Audited:
    """The audited images: clean labelled rows of the cache, their features (unit length: every audit
    measure is a cosine) and where they came from."""

    rows: np.ndarray
    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    splits: np.ndarray
    class_names: list[str]


def audited_images(ff: FeatureFile) -> Audited:
    """The clean (not augmented), labelled images of the cache, features reduced as fit-head does
    (feature maps averaged over space) and scaled to unit length in place (one float32 copy in memory);
    UserError when nothing can be audited."""
    labelled = ff.labels >= 0
    if not labelled.any():
        raise UserError(f"{ff.path.name} has no labels (every image is unlabelled); audit needs a labelled data "
                        f"set, e.g. one sub-folder per class or a CSV manifest with labels")
    rows = np.flatnonzero(labelled & (ff.views == 0))
    y = ff.labels[rows].astype(np.int64)
    if np.unique(y).size < 2:
        name = ff.class_names[int(y[0])] if ff.class_names else str(int(y[0]))
        raise UserError(f"audit needs at least two classes, but every labelled image of {ff.path.name} is {name!r}")
    X = unit_rows(FeatureSource(ff, rows).load_reduced("avg"), in_place=True)
    return Audited(rows, X, y, [ff.paths[r] for r in rows], ff.splits[rows].astype(str), fit_meta(ff)["class_names"])


def readable_files(paths: list[str]) -> list[str | None]:
    """Each path where it is a file on this machine, else None (built-in and tfds images are not)."""
    return [p if os.path.isfile(p) else None for p in paths]


def pixel_sources(paths: list[str], files: list[str | None]) -> list[str | None]:
    """Where the audit can read each image's pixels: its file (`readable_files`), or a built-in image's id;
    None for tfds images."""
    return [f if f is not None else p if builtin_image(p) is not None else None for p, f in zip(paths, files)]


def _log_loss_rows(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(proba[np.arange(y.size), y], 1e-15, 1.0))


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def most_confused(cm: np.ndarray, names: list[str], top: int = 10) -> list[dict[str, Any]]:
    """The off-diagonal cells of a confusion matrix, largest first (fastai's `most_confused`)."""
    off = [(int(cm[i, j]), i, j) for i in range(cm.shape[0]) for j in range(cm.shape[1]) if i != j and cm[i, j]]
    return [{"actual": names[i], "predicted": names[j], "count": n} for n, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:top]]


def split_model_proba(ff: FeatureFile, img: Audited, ev: LabelEvidence, head: Head | None,
                      U: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Probabilities for the val and test images of a model that did not train on them: the given
    run's head, else the out-of-fold model's logistic regression fitted on the train split here, on
    the rows `U` it read (the images' features unless given)."""
    U = img.X if U is None else U
    out: dict[str, np.ndarray] = {}
    wanted = [s for s in ("val", "test") if (img.splits == s).any()]
    if not wanted:
        return out
    if head is not None:
        for s in wanted:
            out[s] = head.predict_proba(FeatureSource(ff, img.rows[img.splits == s]))
        return out
    train = img.splits == "train"
    if np.unique(img.y[train]).size < 2:
        return out
    model = fit_logistic(U[train], img.y[train], ev.C)
    for s in wanted:
        proba = np.zeros((int((img.splits == s).sum()), len(img.class_names)))
        proba[:, model.classes_] = model.predict_proba(U[img.splits == s])
        out[s] = proba
    return out


def leakage(img: Audited, pairs: list[Pair], split_proba: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Cross-split pairs, and each evaluated split's accuracy with and without its images that copy an
    image of an earlier split (val: of train; test: of train or val)."""
    order = {"train": 0, "val": 1, "test": 2}
    leaked: dict[str, set[int]] = {}
    crossing = 0
    for p in pairs:
        sa, sb = img.splits[p.a], img.splits[p.b]
        if sa == sb:
            continue
        crossing += 1
        later, row = (sb, p.b) if order.get(sb, 3) > order.get(sa, 3) else (sa, p.a)
        leaked.setdefault(later, set()).add(row)
    accuracy: dict[str, Any] = {}
    for s, proba in split_proba.items():
        rows = np.flatnonzero(img.splits == s)
        correct = proba.argmax(axis=1) == img.y[rows]
        keep = ~np.isin(rows, sorted(leaked.get(s, set())))
        accuracy[s] = {"before": float(correct.mean()), "after": float(correct[keep].mean()) if keep.any() else None,
                       "n_before": int(rows.size), "n_after": int(keep.sum()), "removed": int((~keep).sum())}
    return {"pairs": crossing, "accuracy": accuracy,
            "leaked": {s: sorted(img.paths[r] for r in rows) for s, rows in leaked.items()}}


def embedding_map(X: np.ndarray, keep: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows `keep` (t-SNE on a 50-component PCA of unit-length features)."""
    from sklearn.decomposition import PCA  # noqa: PLC0415 - only for the map, which --no-map skips
    from sklearn.manifold import TSNE  # noqa: PLC0415 - only for the map, which --no-map skips

    Z = unit_rows(X[keep])
    if Z.shape[0] < 5:
        return np.zeros((Z.shape[0], 2)), "none"
    Z = PCA(min(50, Z.shape[1], Z.shape[0]), random_state=seed).fit_transform(Z)
    perplexity = float(min(30, max(2, (Z.shape[0] - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500).fit_transform(Z)
    return xy, "t-SNE"


def map_rows(n: int, flagged: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The rows the map embeds: all when at most `limit`, else every flagged row and a seeded sample of
    the others up to `limit` (a sample of the flagged ones when they alone exceed it: t-SNE's time grows
    with its points)."""
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    marked = np.flatnonzero(flagged)
    if marked.size >= limit:
        return np.sort(rng.choice(marked, limit, replace=False))
    extra = rng.choice(np.flatnonzero(~flagged), limit - marked.size, replace=False)
    return np.sort(np.concatenate([marked, extra]))


def audit_cache(ff: FeatureFile, options: AuditOptions = AuditOptions(), head: Head | None = None,
                say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Audit the cache (the module docstring): the audit.json dict, with timings in `seconds`."""
    t = {"start": time.perf_counter()}
    img = audited_images(ff)
    n, k = img.y.size, len(img.class_names)
    if head is not None:
        head.check_matches(ff)
    say(f"audit: {n:,} labelled images, {k} classes, {img.X.shape[1]} features")
    walk = search_space(img.X) if n > EXACT_ROWS else None  # one projection for every approximate search
    neigh = self_neighbours(img.X, max(KNN_K, options.near.neighbours), normalized=True, walk=walk)
    t["neighbours"] = time.perf_counter()
    z = outlier_scores(img.X, img.y, walk=walk, neigh=neigh)
    out_rank = np.argsort(-z, kind="stable")
    out_rows = out_rank[z[out_rank] >= OUTLIER_Z]
    t["outliers"] = time.perf_counter()
    files = readable_files(img.paths)
    readable = np.asarray([f is not None for f in files])
    hashes = list(fill_hashes(np.full(len(files), "", dtype=object), img.paths, readable))
    exact = exact_pairs(hashes, list(img.splits))
    pairs = exact + near_pairs(neigh, pixel_sources(img.paths, files), options.near, hashes)
    groups = copy_groups(n, [(p.a, p.b) for p in pairs])  # copies of one image never vouch for each other's label
    t["duplicates"] = time.perf_counter()
    say(f"audit: duplicates {len(exact)} exact, {len(pairs) - len(exact)} near")
    copied = np.unique([i for p in pairs for i in (p.a, p.b)]).size
    if n >= 20 and copied > n / 2:  # features that hardly tell images apart (random weights): findings mean little
        warnings.warn(f"{copied:,} of the {n:,} images have a near copy by these features, which hardly tell the "
                      f"images apart (random weights, or a backbone that does not suit them): the duplicates, "
                      f"leakage and label issues below mean little; audit features of trained weights",
                      DataWarning, stacklevel=2)
    folds = cv_splits(img.y, options.cv, options.seed, groups)
    # the logistic reads the projection where there is one: 5x less to read per pass over 200,000
    # rows, and as good a ranking on flowers (top-N precision within one image over 3 seeds, bench/audit.py)
    U = img.X if walk is None else walk
    ev = label_evidence(U, img.y, k, neigh, options.cv, options.seed, options.C, groups)
    if folds >= 2:
        issues, issue_score = rank_issues(img.y, ev.proba)
        say(f"audit: label issues from {folds}-fold out-of-fold probabilities and {KNN_K} neighbours: {issues.size:,}")
    else:  # no out-of-fold evidence: ranking against uniform probabilities would list half the images
        issues, issue_score = np.zeros(0, np.int64), np.zeros(0)
        say("audit: no label issues: no two classes have two distinct images each to cross-validate on (copies of "
            "one image count once)")
    t["labels"] = time.perf_counter()
    split_proba = split_model_proba(ff, img, ev, head, U)
    leaks = leakage(img, pairs, split_proba)
    top_losses = _top_losses(img, ev, split_proba)
    pred = ev.proba.argmax(axis=1)
    cm = _confusion(img.y, pred, k)
    t["errors"] = time.perf_counter()
    flagged = np.zeros(n, bool)
    flagged[issues] = True
    flagged[out_rows] = True
    for p in pairs:
        flagged[[p.a, p.b]] = True
    audit_map = None
    if options.draw_map:
        keep = map_rows(n, flagged, MAP_POINTS, options.seed)
        xy, method = embedding_map(img.X, keep, options.seed)
        audit_map = {"method": method, "x": xy[:, 0].round(3).tolist(), "y": xy[:, 1].round(3).tolist(),
                     "labels": img.y[keep].tolist(), "paths": [img.paths[i] for i in keep],
                     "flagged": flagged[keep].tolist()}
    t["map"] = time.perf_counter()
    names = img.class_names
    suggested = ev.proba.argmax(axis=1)
    result = {
        "version": AUDIT_VERSION, "data": ff.data or str(ff.path), "cache_key": ff.key,
        "class_names": names,
        "label_issues": [{"path": img.paths[i], "split": img.splits[i], "given": names[img.y[i]],
                          "suggested": names[suggested[i]], "score": round(float(issue_score[i]), 4),
                          "suggested_probability": round(float(ev.proba[i, suggested[i]]), 4)} for i in issues],
        "duplicates": [{"a": img.paths[p.a], "b": img.paths[p.b], "split_a": img.splits[p.a],
                        "split_b": img.splits[p.b], "similarity": round(p.similarity, 4), "kind": p.kind,
                        **({"pixel_correlation": round(p.pixel, 4)} if p.pixel is not None else {})}
                       for p in sorted(pairs, key=lambda p: (p.kind != "exact", -p.similarity))],
        "outliers": [{"path": img.paths[i], "split": img.splits[i], "label": names[img.y[i]],
                      "score": round(float(z[i]), 3)} for i in out_rows],
        "leakage": leaks,
        "top_losses": top_losses,
        "most_confused": most_confused(cm, names),
        "confusion": {"split": "out-of-fold, all labelled images", "class_names": names, "matrix": cm.tolist()},
        "out_of_fold": {"folds": folds, "logistic_C": ev.C, "knn_k": KNN_K,
                        "accuracy": {"logistic": float((ev.logistic.argmax(1) == img.y).mean()),
                                     "knn": float((ev.knn.argmax(1) == img.y).mean()),
                                     "average": float((pred == img.y).mean())}},
        "model": "run head" if head is not None else "logistic regression on the train split",
    }
    if audit_map is not None:
        result["map"] = audit_map
    result["counts"] = {"images": n, "label_issues": len(result["label_issues"]),
                        "duplicates": len(pairs), "exact_duplicates": len(exact),
                        "near_duplicates": len(pairs) - len(exact), "leakage_pairs": leaks["pairs"],
                        "outliers": len(result["outliers"]), "top_losses": len(top_losses)}
    marks = list(t.items())
    result["seconds"] = {name: round(at - prev_at, 3) for (_, prev_at), (name, at) in zip(marks, marks[1:])}
    result["seconds"]["total"] = round(time.perf_counter() - t["start"], 3)
    result["_cleaning"] = {"flagged_issues": issues.tolist(), "outliers": out_rows.tolist(),
                           "pairs": [(p.a, p.b) for p in pairs], "suggested": suggested.tolist(),
                           "confidence": ev.proba.max(axis=1).tolist(),
                           "given_probability": ev.proba[np.arange(n), img.y].tolist()}
    result["_images"] = img
    result["_retrain"] = {"data": ff.data, "request": ff.request,
                          "backend": ff.attrs.get("backend"), "cache_root": str(CacheLayout.of(ff.path).root)}
    return result


def _top_losses(img: Audited, ev: LabelEvidence, split_proba: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The highest-loss misclassified images per split (TOP_LOSSES each): train scored out of fold (none
    where no cross-validation could be made: those scores would be guesses), val/test by the held-out model."""
    out = []
    sources = {"train": (np.flatnonzero(img.splits == "train"), None)} if ev.folds >= 2 else {}
    sources.update({s: (np.flatnonzero(img.splits == s), p) for s, p in split_proba.items()})
    for s, (rows, proba) in sources.items():
        if not rows.size:
            continue
        proba = ev.proba[rows] if proba is None else proba
        loss = _log_loss_rows(proba, img.y[rows])
        wrong = np.flatnonzero(proba.argmax(axis=1) != img.y[rows])
        for j in wrong[np.argsort(-loss[wrong], kind="stable")][:TOP_LOSSES]:
            pred = int(proba[j].argmax())
            out.append({"path": img.paths[rows[j]], "split": s, "given": img.class_names[img.y[rows[j]]],
                        "predicted": img.class_names[pred], "probability": round(float(proba[j, pred]), 4),
                        "loss": round(float(loss[j]), 4)})
    return out


@dataclass
class Cleaning:
    """What cleaned.csv does, by row of the audited images: each row's label (suggestions applied),
    which rows it keeps, and per listed label issue (in the order listed) dropped, kept or relabelled."""

    labels: np.ndarray
    keep: np.ndarray
    issue_actions: list[str]

    def rows(self, img: Audited) -> list[tuple[str, str, str]]:
        """(path, label, split) of the kept rows: cleaned.csv's lines."""
        return [(img.paths[i], img.class_names[self.labels[i]], img.splits[i]) for i in np.flatnonzero(self.keep)]


def plan_cleaning(result: Mapping[str, Any], relabel: bool, drop_below: float = DROP_BELOW) -> Cleaning:
    """Drop the label issues whose given label the evidence all but rules out (out-of-fold probability
    under `drop_below`; 1 drops every issue not relabelled), with `relabel` after applying suggestions
    of RELABEL_CONFIDENCE or more; drop outliers, and of each group of copies (duplicate pairs chained)
    keep one: the earliest split's that is still kept. The other issues stay with their labels: most
    are hard images, not wrong ones, and training without them cost more than it gained
    (bench/audit.py). An image whose class has no other labelled image (or only copies of it) stays as
    it is: nothing can vouch for its label, so its issue is evidence of nothing, and dropping it would
    drop the class."""
    img: Audited = result["_images"]
    c = result["_cleaning"]
    keep = np.ones(img.y.size, bool)
    keep[c["outliers"]] = False
    labels = img.y.copy()
    groups = copy_groups(img.y.size, c["pairs"])
    alone = class_images(img.y, groups)[img.y] < 2  # one image, or copies of one: nothing can vouch for the class
    for i in c["flagged_issues"]:
        if alone[i]:
            continue
        if relabel and c["suggested"][i] != img.y[i] and c["confidence"][i] >= RELABEL_CONFIDENCE:
            labels[i] = c["suggested"][i]
        elif c["given_probability"][i] < drop_below:
            keep[i] = False
    copies: dict[int, list[int]] = {}
    for r in sorted({r for pair in c["pairs"] for r in pair}, key=lambda r: (SPLIT_ORDER.get(img.splits[r], 3), r)):
        copies.setdefault(int(groups[r]), []).append(r)
    for members in copies.values():
        kept = [r for r in members if keep[r]]
        keep[kept[1:]] = False  # the earliest split's copy stays (val keeps no copy of train)
    train = img.splits == "train"
    if train.any():  # a class with no training image left loses its val and test images too: fit-head
        taught = np.zeros(len(img.class_names), bool)  # refuses a class it has val images but no training images of
        taught[labels[train & keep]] = True
        keep &= train | taught[labels]
    actions = ["dropped" if not keep[i] else "relabelled" if labels[i] != img.y[i] else "kept"
               for i in c["flagged_issues"]]
    return Cleaning(labels, keep, actions)


def classes_left_out(img: Audited, plan: Cleaning) -> list[str]:
    """The classes of the audited images that cleaned.csv keeps no training image of (every one a
    confident label issue, an outlier or a copy), and so none of at all (`plan_cleaning`): a head fitted
    on it will not know them, which the user should hear rather than find out."""
    train = img.splits == "train"
    if not train.any():
        train = np.ones(img.y.size, bool)
    before = set(img.y.tolist())
    after = set(plan.labels[train & plan.keep].tolist())
    return [img.class_names[c] for c in sorted(before - after)]


def splits_emptied(img: Audited, plan: Cleaning) -> list[str]:
    """The splits other than train that the audited images have and cleaned.csv keeps none of (each
    image a copy of an earlier split's, a label issue or an outlier): without val, fit-head holds out
    part of the training images instead, which the user should hear."""
    return [s for s in sorted(set(img.splits.tolist()) - {"train"}, key=lambda s: (SPLIT_ORDER.get(s, 3), s))
            if not (plan.keep & (img.splits == s)).any()]


def cleaned_rows(result: Mapping[str, Any], relabel: bool, drop_below: float = DROP_BELOW
                 ) -> list[tuple[str, str, str]]:
    """(path, label, split) of the images cleaned.csv keeps (`plan_cleaning`)."""
    return plan_cleaning(result, relabel, drop_below).rows(result["_images"])


def retrain_command(result: Mapping[str, Any], manifest: Path) -> str | None:
    """The fit-head command that trains on cleaned.csv and reuses every cached row: the cache's
    extraction options that are not defaults, its backend if not Keras' default, its cache folder if not
    the default; every path absolute, so it runs from the repository root wherever the audit ran; None
    where the audited images are not files (built-in or tfds: images)."""
    r = result.get("_retrain") or {}
    if not names_files(r.get("data") or ""):
        return None
    words = ["python", "cli.py", "fit-head", "--data", str(Path(manifest).resolve()), "--allow-outside-paths",
             *ExtractRequest.recorded_flags(r.get("request"))]  # another version's request: the plain command
    if r.get("backend") and r["backend"] != DEFAULT_BACKEND:
        words += ["--backend", str(r["backend"])]
    words += cache_dir_flags(r.get("cache_root") or DEFAULT_CACHE)
    return " ".join(shlex.quote(w) for w in words)


CSV_COLUMNS = {
    "label_issues": ("path", "split", "given", "suggested", "score", "suggested_probability", "cleaned"),
    "duplicates": ("a", "b", "split_a", "split_b", "similarity", "kind", "pixel_correlation"),
    "outliers": ("path", "split", "label", "score"),
    "top_losses": ("path", "split", "given", "predicted", "probability", "loss"),
}


def write_audit(result: dict[str, Any], run: Run, relabel: bool = False, drop_below: float = DROP_BELOW
                ) -> dict[str, Path]:
    """Write audit.json, a CSV per finding, cleaned.csv and report.html into the run folder; sets
    result["cleaned"] (what cleaned.csv keeps, as audit.json says) and result["review_menus"] (how many
    images' menus the report holds to review) for the caller to report."""
    files: dict[str, Path] = {}
    img: Audited = result["_images"]
    plan = plan_cleaning(result, relabel, drop_below)
    cleaned = plan.rows(img)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["cleaned"] = {"file": "cleaned.csv", "images": len(cleaned), "removed": int((~plan.keep).sum()),
                         "relabel": relabel, "relabelled": int((plan.labels != img.y)[plan.keep].sum()),
                         "label_issues_dropped_below": drop_below,
                         "classes_left_out": classes_left_out(img, plan),
                         "splits_emptied": splits_emptied(img, plan),
                         "train_images": sum(split == "train" for _, _, split in cleaned),
                         "command": None}
    if public["cleaned"]["train_images"]:  # fit-head refuses a manifest without training images
        public["cleaned"]["command"] = retrain_command(result, run.path("cleaned.csv"))
    result["cleaned"] = public["cleaned"]
    public["label_issues"] = [{**issue, "cleaned": action}
                              for issue, action in zip(public["label_issues"], plan.issue_actions)]
    for name, columns in CSV_COLUMNS.items():
        files[name] = run.path(f"{name}.csv")
        write_text_atomic(files[name], csv_text(public[name], columns, spreadsheet=True))
    files["cleaned"] = run.path("cleaned.csv")
    write_text_atomic(files["cleaned"], csv_text(cleaned, ("path", "label", "split")))
    files["audit"] = run.path("audit.json")
    public["run"] = run.id
    write_text_atomic(files["audit"], json.dumps(public, indent=1) + "\n")
    review = Review(paths=img.paths, splits=[str(s) for s in img.splits], given=img.y.tolist(),
                    cleaned=np.where(plan.keep, plan.labels, DROP).tolist(), classes=img.class_names, key=run.id)
    files["report"] = write_report(public, run.path("report.html"), lambda p: p if os.path.isfile(p) else builtin_image(p),
                                   review=review)
    result["review_menus"] = review.menus
    return files
