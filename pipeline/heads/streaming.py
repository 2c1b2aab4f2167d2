"""The logistic head on caches larger than memory: scikit-learn's objective, minimized over blocks
streamed from the HDF5 file.

The objective is LogisticRegression's own (lbfgs solver): multinomial softmax loss (binomial when
the training labels hold two classes), intercept unpenalized, `C * sum(w_i * loss_i) + 0.5 * ||W||^2`,
scaled by 1 / sum(w_i) as scikit-learn scales it; w_i are the 'balanced' class weights or 1.

1. One pass: standardization statistics (Chan's parallel update) and a stratified random subsample
   of rows kept in memory, sized to a share of the memory budget.
2. Fits on 3/4 of the subsample over the C grid (warm-started along the path), scored on the held-out
   rest, grouped by image so augmented views never score their copies: C="auto" takes the best.
   The fit whose held-out loss plus full-data penalty (an estimate of the streamed objective) is
   least, among those and one at the full data's penalty per row, is the warm start.
3. The streamed solve. Each objective evaluation is one pass: the exact loss and gradient, with the
   next block read and converted in a thread while BLAS works on this one. With a subsample of at
   least 4 rows per feature, Newton-CG: the direction comes from the subsample's Hessian (in
   memory, conjugate gradients), damped Levenberg-Marquardt style when its steps overshoot, and a
   backtracking line search on the exact loss keeps every step a descent; a handful of passes where
   L-BFGS needs dozens. With fewer rows, scikit-learn's own L-BFGS settings. Both stop on
   scikit-learn's test (largest gradient component <= tol, or a relative loss change below
   64 eps), so the result is the in-memory head's optimum to the same tolerance.

Standardization is folded into the weights: blocks are only centred, never divided by the scale.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import get_scorer, log_loss

from pipeline.errors import UserError
from pipeline.heads.folds import cv_folds, is_grouped
from pipeline.heads.scaling import feature_scale

# A selection of rows is read as one contiguous slice (then indexed in memory) while it covers at
# least 1/_DENSE_READ of the rows it spans: h5py point selections cost ~100x more per row.
_DENSE_READ = 64
_SPAN_BYTES = 64 * 2**20      # at most this much raw data per slice read by `read_rows`
_SAMPLE_ROWS_MAX = 30_000     # the in-memory subsample (C choice, warm start, Hessian) stops here
_SAMPLE_SHARE = 0.35          # ... and takes at most this share of the budget, twice (fits copy it)
_BLOCK_SHARE = 0.25           # blocks in flight (read ahead, converted, being multiplied) take this
_BLOCK_ROWS_MAX = 4096        # thin (rows x classes) products run fastest on blocks about this size
_CG_ITERS = 50
_HOLDOUT_SPLITS = 4           # C="auto" holds out 1/4 of the subsample
_NEWTON_ROWS_PER_FEATURE = 4  # Newton steps need this many subsample rows per feature, else L-BFGS


def default_memory_budget_mb(fraction: float = 0.25) -> float:
    """A share of physical memory in MB (2048 where the OS does not say): fit-head's default budget."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return float(max(64, int(fraction * total / 2**20))) if total > 0 else 2048.0


# ------------------------------------------------------------------------------------ reading rows
_F16_PROBE = np.array([0x0001, 0x03FF, 0x3C00, 0x7BFF], np.uint16)    # subnormals, 1.0, the largest finite
_REBIAS = np.float32(2.0 ** 112)   # float16 bits << 13, read as float32, times 2^112 = the float16 value


def _rebias(h: np.ndarray) -> np.ndarray:
    u = h.astype(np.uint32)
    u <<= 13
    f = u.view(np.float32)
    f *= _REBIAS
    return f


def as_float32(x: np.ndarray) -> np.ndarray:
    """`x` as float32 (no copy when it already is). Float16 arrays of non-negative finite values,
    what pooled CNN features hold, convert by shifting their bits and rescaling: exact, and about
    4x faster than numpy's float16 cast, which dominated a streamed pass; anything else (a sign
    bit, inf, NaN, or a thread that flushes subnormals) takes numpy's cast."""
    x = np.asarray(x)
    if x.dtype != np.float16 or x.size < 1024 or not x.flags.c_contiguous:
        return x.astype(np.float32, copy=False)
    h = x.view(np.uint16)
    if int(h.max()) >= 0x7C00 or not np.array_equal(_rebias(_F16_PROBE), _F16_PROBE.view(np.float16)):
        return x.astype(np.float32)
    return _rebias(h)


def row_spans(sorted_rows: np.ndarray, max_rows: int, max_span: int) -> Iterator[tuple[int, int]]:
    """(a, b) ranges of ascending row numbers, each at most `max_rows` rows spanning at most
    `max_span` rows of the file: the units read in one call."""
    n, a = sorted_rows.size, 0
    max_rows, max_span = max(1, int(max_rows)), max(1, int(max_span))
    while a < n:
        b = min(n, a + max_rows)
        b = min(b, int(np.searchsorted(sorted_rows, sorted_rows[a] + max_span, side="left")))
        b = max(b, a + 1)
        yield a, b
        a = b


def read_sorted(ds: Any, rows: np.ndarray) -> np.ndarray:
    """Rows (ascending) of an HDF5 dataset in its own dtype: one slice when they are dense enough
    (a point selection reads ~100x slower per row), else a point selection."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.empty((0, *ds.shape[1:]), ds.dtype)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= _DENSE_READ * rows.size:
        block = ds[lo:hi]
        if hi - lo == rows.size and (rows.size < 2 or bool(np.all(np.diff(rows) == 1))):
            return block
        return block[rows - lo]
    uniq, inverse = np.unique(rows, return_inverse=True)
    data = ds[uniq]
    return data if uniq.size == rows.size else data[inverse]


def read_rows(ds: Any, rows: np.ndarray) -> np.ndarray:
    """`ds[rows]` as float32 for rows in any order (repeats allowed), read as sorted runs."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((rows.size, *ds.shape[1:]), np.float32)
    if rows.size == 0:
        return out
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
    for a, b in row_spans(srt, srt.size, _SPAN_BYTES // row_bytes):
        out[order[a:b]] = read_sorted(ds, srt[a:b])
    return out


def prefetched(make: Callable[[], Iterator[Any]], depth: int = 1) -> Iterator[Any]:
    """Items of `make()` produced in a thread, `depth` ahead: reading and converting the next block
    (h5py, numpy casts) overlaps the BLAS work on this one. Errors surface here; closing the
    generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, name="head-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------- the fit
Blocks = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class StreamedFit:
    """What the streamed fit found: scaler statistics, model arrays (scikit-learn's shapes) and how."""

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    coef: np.ndarray             # (1 or n_present_classes, d), standardized features
    intercept: np.ndarray
    classes: np.ndarray          # the labels present in y, as LogisticRegression.classes_
    C: float
    cv_scores: dict[float, float]
    C_note: str
    n_iter: int
    converged: bool
    passes: int                  # full passes over the cache
    sample_rows: int
    block_rows: int
    solver: str
    seconds: dict[str, float] = field(default_factory=dict)


def plan_rows(budget_mb: float, n: int, dim: int, raw_row_bytes: int) -> tuple[int, int]:
    """(subsample rows, block rows) that keep the fit within `budget_mb`."""
    budget = float(budget_mb) * 2**20
    sample = int(_SAMPLE_SHARE * budget / (2 * 4 * dim))
    sample = min(n, _SAMPLE_ROWS_MAX, max(sample, 200))
    per_row = 3 * 4 * dim + 6 * max(1, int(raw_row_bytes))   # 3 float32 blocks + raw slices in flight
    block = int(min(_BLOCK_ROWS_MAX, max(16, _BLOCK_SHARE * budget / per_row)))
    return sample, block


def fit_streamed_logistic(blocks: Blocks, n: int, dim: int, y: np.ndarray, *, C: float | None,
                          Cs: Sequence[float], scoring: str, class_weight: str | None, groups: Any,
                          tol: float, cv_tol: float, max_iter: int, random_state: int, budget_mb: float,
                          raw_row_bytes: int) -> StreamedFit:
    """Fit scikit-learn's L2 logistic regression on n rows read by `blocks(block_rows)` (which yields
    (positions, float32 (b, dim) reduced features) in disk order); C=None picks C from `Cs`."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    y = np.asarray(y, np.int64)
    classes = np.unique(y)
    yi = np.searchsorted(classes, y)
    binary = classes.size == 2
    if class_weight == "balanced":
        counts = np.bincount(yi).astype(np.float64)
        sw = (n / (classes.size * counts))[yi]
    else:
        sw = np.ones(n)
    sw_sum = float(sw.sum())
    m, block_rows = plan_rows(budget_mb, n, dim, raw_row_bytes)
    sample = _stratified_sample(yi, m, np.random.default_rng(random_state))
    mean, var, Xs = _stats_and_sample(blocks, block_rows, n, dim, sample)
    scale = feature_scale(np.sqrt(var))  # as the in-memory head's (floored at the median std)
    Xs -= mean.astype(np.float32)
    Xs /= scale.astype(np.float32)
    ys, sws = yi[sample], sw[sample]
    gs = None if groups is None else np.asarray(groups)[sample]
    times["stats_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    C, scores, note, w = _sample_fits(Xs, ys, sws, gs, C, Cs, scoring, cv_tol, max_iter, random_state, binary,
                                      sw_sum)
    times["sample_fits"] = time.perf_counter() - t

    t = time.perf_counter()
    l2 = 1.0 / (C * sw_sum)
    objective = _StreamedObjective(blocks, block_rows, yi, sw, sw_sum, l2, mean, scale, binary)
    f0, _ = objective(w)
    if f0 > math.log(classes.size):          # the warm start is worse than all-zero weights
        w = np.zeros_like(w)
    if sample.size >= _NEWTON_ROWS_PER_FEATURE * (dim + 1):
        w, n_iter, converged, solver = _newton_cg(objective, Xs, ys, sws, l2, binary, w, tol, max_iter)
    else:                                     # too few rows for a useful Hessian estimate
        w, n_iter, converged = _lbfgs(objective, w, tol, max_iter)
        solver = "L-BFGS"
    times["passes"] = time.perf_counter() - t
    return StreamedFit(mean=mean, var=var, scale=scale, coef=w[:, :-1].copy(), intercept=w[:, -1].copy(),
                       classes=classes, C=float(C), cv_scores=scores, C_note=note, n_iter=n_iter,
                       converged=converged, passes=objective.passes + 1, sample_rows=int(sample.size),
                       block_rows=block_rows, solver=solver, seconds=times)


def _stratified_sample(yi: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """About m row positions, each class in proportion and with at least 2 rows (when it has them)."""
    n = yi.size
    if m >= n:
        return np.arange(n)
    picks = []
    for c in range(int(yi.max()) + 1):
        members = np.flatnonzero(yi == c)
        k = min(members.size, max(2, int(round(m * members.size / n))))
        picks.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(picks))


class RunningMoments:
    """Mean and population variance of rows seen block by block (Chan's parallel update), kept in float64;
    a block's squared deviations are taken in its own dtype (float32 blocks: no float64 copy of them)."""

    def __init__(self, dim: int | None = None) -> None:
        """`dim`: the row width, where known before the first block (then no rows give zeros)."""
        self.count = 0
        self.mean: np.ndarray | float = np.zeros(dim) if dim is not None else 0.0
        self.m2: np.ndarray | float = np.zeros(dim) if dim is not None else 0.0

    def add(self, x: np.ndarray) -> None:
        """Take in one block of rows (n, dim)."""
        k = x.shape[0]
        if k == 0:
            return
        bm = x.mean(axis=0, dtype=np.float64)
        bm2 = np.square(x - bm.astype(x.dtype)).sum(axis=0, dtype=np.float64)
        delta, total = bm - self.mean, self.count + k
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + bm2 + delta ** 2 * (self.count * k / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)


def _stats_and_sample(blocks: Blocks, block_rows: int, n: int, dim: int,
                      sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, population variance, sampled rows as float32) in one streamed pass."""
    slot = np.full(n, -1, np.int64)
    slot[sample] = np.arange(sample.size)
    kept = np.empty((sample.size, dim), np.float32)
    moments = RunningMoments(dim)
    for pos, x in prefetched(lambda: blocks(block_rows)):
        where = slot[pos]
        keep = where >= 0
        if keep.any():
            kept[where[keep]] = x[keep]
        moments.add(x)
    return moments.mean, moments.variance, kept


def _holdout(ys: np.ndarray, groups: Any, random_state: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(train, held-out) positions of the subsample, 1/4 held out, stratified and grouped by image;
    None when a class has too few images to hold any out."""
    folds, _ = cv_folds(ys, groups, _HOLDOUT_SPLITS, random_state)
    if folds is None:
        return None
    tr, ho = folds[0]
    return tr, ho, is_grouped(groups)


def _sample_fits(Xs: np.ndarray, ys: np.ndarray, sws: np.ndarray, groups: Any, C: float | None,
                 Cs: Sequence[float], scoring: str, cv_tol: float, max_iter: int, random_state: int, binary: bool,
                 sw_sum: float) -> tuple[float, dict[float, float], str, np.ndarray]:
    """(C, {C: held-out score}, how C was chosen, warm start (k, d+1)) from fits on the subsample.

    The grid's fits on 3/4 of the subsample are scored on the rest (C="auto" takes the best); one
    more fit at the C with the full data's penalty per row joins them, and the warm start is the
    fit whose held-out loss plus full-data penalty, an estimate of the streamed objective, is least.
    """
    grid = sorted(float(c) for c in Cs)
    if not grid or grid[0] <= 0:
        raise UserError("the C grid must hold positive numbers")
    w0 = np.zeros((1 if binary else int(ys.max()) + 1, Xs.shape[1] + 1))
    split = _holdout(ys, groups, random_state)
    if split is None:
        if C is None:
            return 1.0, {}, "default: a class has a single example in the subsample, too few to hold out", w0
        return C, {}, "given", w0
    tr, ho, grouped = split
    Xtr, Xho, sw_tr = Xs[tr], Xs[ho], sws[tr]
    model = LogisticRegression(warm_start=True, tol=cv_tol, max_iter=max_iter, random_state=random_state)
    fits: dict[float, np.ndarray] = {}
    scores: dict[float, float] = {}

    def fit(c: float) -> None:
        model.set_params(C=c).fit(Xtr, ys[tr], sample_weight=sw_tr)
        fits[c] = np.hstack([model.coef_, model.intercept_[:, None]])
        if C is None and c in grid:
            scores[c] = _score(model, Xho, ys[ho], scoring)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            fit(c)
        if C is None:
            C = max(grid, key=lambda c: (scores[c], -c))
            note = (f"held-out subsample ({tr.size} train / {ho.size} scored rows of {Xs.shape[0]}"
                    f"{', grouped by image' if grouped else ''}; {scoring})")
        else:
            note = "given"
        per_row = C * sw_sum / float(sw_tr.sum())
        if per_row not in fits:
            fit(per_row)
    if fits[grid[0]].shape[0] != w0.shape[0]:    # a class missing from the training part
        return C, scores, note, w0
    l2 = 1.0 / (C * sw_sum)
    estimate = {c: _heldout_loss(w, Xho, ys[ho], sws[ho], binary) + 0.5 * l2 * float((w[:, :-1] ** 2).sum())
                for c, w in fits.items()}
    return C, scores, note, fits[min(estimate, key=estimate.get)]


def _heldout_loss(w: np.ndarray, X: np.ndarray, y: np.ndarray, sw: np.ndarray, binary: bool) -> float:
    z = _full_logits((X @ w[:, :-1].T.astype(np.float32)).astype(np.float64) + w[:, -1], binary)
    lse = _softmax_parts(z)[0]
    return float(sw @ (lse - z[np.arange(y.size), y]) / sw.sum())


def _score(model: LogisticRegression, X: np.ndarray, y: np.ndarray, scoring: str) -> float:
    if scoring == "neg_log_loss":  # with every training class as a column, present in y or not
        return -float(log_loss(y, model.predict_proba(X), labels=model.classes_))
    try:
        return float(get_scorer(scoring)(model, X, y))
    except ValueError as exc:
        raise UserError(f"scoring {scoring!r} cannot score the held-out rows ({exc})") from None


def _full_logits(z: np.ndarray, binary: bool) -> np.ndarray:
    """Binary models have one logit column z; as two classes the logits are [0, z]."""
    return np.hstack([np.zeros((z.shape[0], 1)), z]) if binary else z


def _softmax_parts(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-sum-exp per row, probabilities) of float64 logits."""
    top = z.max(axis=1, keepdims=True)
    e = np.exp(z - top)
    s = e.sum(axis=1, keepdims=True)
    return (np.log(s) + top)[:, 0], e / s


class _StreamedObjective:
    """scikit-learn's scaled objective and its gradient at w = (k, d+1), one streamed pass per call."""

    def __init__(self, blocks: Blocks, block_rows: int, yi: np.ndarray, sw: np.ndarray, sw_sum: float, l2: float,
                 mean: np.ndarray, scale: np.ndarray, binary: bool) -> None:
        self.blocks, self.block_rows = blocks, block_rows
        self.yi, self.sw, self.sw_sum, self.l2 = yi, sw, sw_sum, l2
        self.mean32, self.scale = mean.astype(np.float32), scale
        self.binary = binary
        self.passes = 0
        self._last: tuple[np.ndarray, float, np.ndarray] | None = None

    def _centred(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for pos, x in self.blocks(self.block_rows):
            np.subtract(x, self.mean32, out=x)
            yield pos, x

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        if self._last is not None and np.array_equal(self._last[0], w):   # L-BFGS starts where Newton stopped
            return self._last[1], self._last[2].copy()
        coef, b = w[:, :-1], w[:, -1]
        W32 = np.ascontiguousarray((coef / self.scale).T, np.float32)        # (d, k): scale folded in
        loss, G, gb = 0.0, np.zeros(W32.shape), np.zeros(w.shape[0])
        for pos, xc in prefetched(self._centred):
            z = _full_logits((xc @ W32).astype(np.float64) + b, self.binary)
            yb, swb = self.yi[pos], self.sw[pos]
            rows = np.arange(yb.size)
            lse, p = _softmax_parts(z)
            loss += float(swb @ (lse - z[rows, yb]))
            p[rows, yb] -= 1.0
            r = p * swb[:, None]
            if self.binary:
                r = r[:, 1:]
            G += xc.T @ r.astype(np.float32)
            gb += r.sum(axis=0)
        self.passes += 1
        grad = np.empty_like(w)
        grad[:, :-1] = (G / self.scale[:, None]).T / self.sw_sum + self.l2 * coef
        grad[:, -1] = gb / self.sw_sum
        f = loss / self.sw_sum + 0.5 * self.l2 * float((coef ** 2).sum())
        self._last = (w.copy(), f, grad.copy())
        return f, grad


class _SampleHessian:
    """Hessian-vector products of the objective at w, estimated on the in-memory subsample."""

    def __init__(self, Xs: np.ndarray, ys: np.ndarray, sws: np.ndarray, w: np.ndarray, l2: float,
                 binary: bool) -> None:
        z = _full_logits((Xs @ w[:, :-1].T.astype(np.float32)).astype(np.float64) + w[:, -1], binary)
        self.p = _softmax_parts(z)[1]
        # the mean curvature of one coefficient: sum_i wt_i p_ik (1 - p_ik), x standardized (unit variance)
        self.diagonal_hint = (sws / float(sws.sum())) @ (self.p * (1 - self.p))
        self.Xs, self.wt, self.l2, self.binary = Xs, sws / float(sws.sum()), l2, binary

    def dot(self, v: np.ndarray) -> np.ndarray:
        a = _full_logits((self.Xs @ v[:, :-1].T.astype(np.float32)).astype(np.float64) + v[:, -1], self.binary)
        pa = self.p * a
        s = (pa - self.p * pa.sum(axis=1, keepdims=True)) * self.wt[:, None]
        if self.binary:
            s = s[:, 1:]
        out = np.empty_like(v)
        out[:, :-1] = (self.Xs.T @ s.astype(np.float32)).T + self.l2 * v[:, :-1]
        out[:, -1] = s.sum(axis=0)
        return out


def _conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, rtol: float,
                        maxiter: int) -> np.ndarray:
    """Approximate solution of H x = b for a positive semi-definite H (stops on rtol or curvature <= 0)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = float((r * r).sum())
    stop = rtol ** 2 * rs
    for _ in range(maxiter):
        if rs <= stop:
            break
        hp = matvec(p)
        curvature = float((p * hp).sum())
        if curvature <= 0:
            break
        step = rs / curvature
        x += step * p
        r -= step * hp
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x if x.any() else b


def _newton_cg(objective: _StreamedObjective, Xs: np.ndarray, ys: np.ndarray, sws: np.ndarray, l2: float,
               binary: bool, w: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool, str]:
    """(w, iterations, converged, solver): Newton-CG on the streamed objective with the subsample's
    Hessian plus mu * I, where mu grows while steps achieve under 1/4 of the predicted decrease and
    shrinks above 3/4: a subsample underestimates the curvature of directions it covers thinly."""
    f, g = objective(w)
    ftol = 64 * np.finfo(float).eps
    mu = 0.0
    for it in range(max_iter + 1):
        if float(np.abs(g).max()) <= tol:
            return w, it, True, "Newton-CG"
        if it == max_iter:
            break
        hess = _SampleHessian(Xs, ys, sws, w, l2, binary)
        gnorm = float(np.sqrt((g * g).sum()))
        step = _conjugate_gradient(lambda v: hess.dot(v) + mu * v, -g, min(0.5, math.sqrt(gnorm)), _CG_ITERS)
        slope = float((g * step).sum())
        if slope >= 0:                       # not a descent direction: fall back to the gradient
            step, slope = -g, -gnorm ** 2
        predicted = -(slope + 0.5 * float((step * hess.dot(step)).sum()))
        alpha = 1.0
        while True:
            f_new, g_new = objective(w + alpha * step)
            if f_new <= f + 1e-4 * alpha * slope:
                break
            # minimum of the quadratic through f, the slope and f_new, kept within [0.1, 0.5] alpha
            alpha *= min(0.5, max(0.1, -slope * alpha / (2 * (f_new - f - slope * alpha))))
            if alpha < 1e-8:
                return w, it, False, "Newton-CG"
        ratio = (f - f_new) / predicted if alpha == 1.0 and predicted > 0 else 0.0
        typical = float(np.mean(hess.diagonal_hint))       # the size of one coefficient's curvature
        if ratio < 0.25:
            mu = max(4 * mu, 1e-2 * typical)
        elif ratio > 0.75:
            mu = mu / 4 if mu > 1e-4 * typical else 0.0
        w = w + alpha * step
        done = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
        f, g = f_new, g_new
        if done:
            return w, it + 1, True, "Newton-CG"
    return w, max_iter, False, "Newton-CG"


def _lbfgs(objective: _StreamedObjective, w: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """(w, iterations, converged): scikit-learn's own L-BFGS settings on the streamed objective."""
    shape = w.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = objective(flat.reshape(shape))
        return f, g.ravel()

    if max_iter < 1:
        return w, 0, False
    res = minimize(fun, w.ravel(), method="L-BFGS-B", jac=True,
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return res.x.reshape(shape), int(res.nit), bool(res.success)

