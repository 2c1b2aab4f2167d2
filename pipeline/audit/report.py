"""Self-contained HTML report of an audit (audit.json): one file, no network, no external files.

CSS is inline, thumbnails are base64 JPEG data URIs and the embedding map is an inline SVG, so the
page can be mailed or archived as is. Its one script (where the audited images are files a manifest
can name) is the review (`pipeline.audit.review`): menus per image and the reviewed manifest. Every
string from the audit (paths, class names, splits) is user data and goes through `html.escape`. Work
is bounded: at most `MAX_CARDS` thumbnails per section, each distinct image decoded once, and at most
`MAX_POINTS` points on the map. Any image that is missing or cannot be decoded becomes a grey
placeholder, never an exception.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipeline.atomic import write_text_atomic
from pipeline.audit import review as reviewing
from pipeline.audit.review import Review
from pipeline.data.decode import decode, read_file
from pipeline.data.sources import names_files

THUMB = 112          # thumbnail box, pixels
MAX_CARDS = 60       # thumbnails per section; the rest are listed as text
MAX_ROWS = 1000      # text rows per section beyond the cards (the full lists stay in audit.json)
MAX_POINTS = 20_000  # map points; flagged points are always kept
MAP_W, MAP_H, MAP_PAD = 700, 500, 16
# matplotlib's tab20, the ten strong colours first so that small label sets get distinct hues.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
UNKNOWN_COLOUR = "#444444"

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;padding:16px 24px;
 max-width:1400px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #ddd}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0 0 8px}
dl.meta dt{color:#666}dl.meta dd{margin:0;word-break:break-all}p.cleaned code{word-break:break-all}
.counts{display:flex;flex-wrap:wrap;gap:6px}.counts span.item{background:#fff;border:1px solid #ddd;
 border-radius:12px;padding:2px 10px}.count{font-weight:600}
nav a{margin-right:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.grid.pairs{grid-template-columns:repeat(auto-fill,minmax(290px,1fr))}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;min-width:0}
.card.leak{border:2px solid #d62728}
.card .imgs{display:flex;gap:8px}.card .imgs>div{flex:1;min-width:0}
.thumb{width:112px;height:112px;object-fit:contain;background:#eee;display:block;margin:0 auto 6px}
div.thumb{display:flex;align-items:center;justify-content:center;text-align:center;color:#555;
 font-size:11px;word-break:break-all;overflow:hidden;box-sizing:border-box;padding:4px}
.path{color:#666;word-break:break-all}.badge{background:#d62728;color:#fff;border-radius:3px;
 padding:0 4px;font-size:11px}.na,.none,.note{color:#777;font-style:italic}.warn{color:#d62728;font-weight:bold}
table{border-collapse:collapse;background:#fff;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}table.cm td{min-width:28px;text-align:center}
table.cm th.v{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;max-width:700px;font-size:12px}
.sw{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px}
svg.map{background:#fff;border:1px solid #ddd}
.cleaned-dropped{color:#d62728}.cleaned-kept{color:#777}.cleaned-relabelled{color:#1f77b4}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str = ".3f") -> str:
    """Format a number, or a dash for a missing or non-numeric value (audit files may be partial)."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "&mdash;"


def _pct(value: Any) -> str:
    return _num(value * 100, ".1f") + "%" if isinstance(value, (int, float)) else "&mdash;"


def _change(before: Any, after: Any) -> str:
    """Accuracy change in percentage points; a drop after removing leaked images means leakage inflated it."""
    ok = all(isinstance(v, (int, float)) for v in (before, after))
    return _num((after - before) * 100, "+.1f") if ok else "&mdash;"


def _thumbnail(image: str | os.PathLike | np.ndarray) -> str | None:
    """JPEG data URI of a <=112 px thumbnail of an image file or of RGB pixels (a built-in image, enlarged
    to fit), or None when the file cannot be read or decoded. Decoded as extraction decodes (every format
    it reads, upright, JPEGs at reduced scale), by its code."""
    try:
        if isinstance(image, np.ndarray):
            small = Image.fromarray(image)
            scale = THUMB // max(small.size)
            if scale > 1:  # 8 x 8 digits: sharp squares, not a blur the browser would make
                small = small.resize((small.width * scale, small.height * scale), Image.NEAREST)
        else:
            small = Image.fromarray(decode(read_file(os.fspath(image)), size=THUMB))
        small.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - truncated, not an image, too large: all become placeholders
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Thumbs:
    """Thumbnail HTML per path, each distinct path resolved and decoded once per report."""

    def __init__(self, image_file: Callable[[str], str | np.ndarray | None]):
        self.image_file = image_file
        self.cache: dict[str, str] = {}

    def __call__(self, path: Any) -> str:
        path = str(path)
        if path not in self.cache:
            file = self.image_file(path)
            uri = _thumbnail(file) if file is not None else None
            name = _e(path.replace("\\", "/").rsplit("/", 1)[-1])
            self.cache[path] = (f'<img class="thumb" src="{uri}" alt="{name}" title="{_e(path)}">' if uri else
                                f'<div class="thumb missing" title="{_e(path)}">{name}</div>')
        return self.cache[path]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0, cls: str = "") -> str:
    """An HTML table of already-escaped cells; the first `left` columns are left-aligned (text)."""
    def cell(tag: str, i: int, value: str) -> str:
        return f'<{tag}{" class=l" if i < left else ""}>{value}</{tag}>'
    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table{f" class={cls}" if cls else ""}><tr>{head}</tr>{body}</table>'


class _Decide:
    """Each image's review menu (`review.Review.control`), or nothing where the page has no review."""

    def __init__(self, review: Review | None):
        self.review = review if review is not None and not review.too_large else None
        self.menus = 0

    def __call__(self, path: Any, hint: Any = None, why: str = "suggested") -> str:
        menu = self.review.control(path, hint, why) if self.review is not None else ""
        self.menus += bool(menu)
        return menu

    def column(self, headers: Sequence[str], row: Callable[[Mapping[str, Any]], Sequence[str]],
               hint: str | None = None, why: str = "suggested"):
        """The text table's headers and row cells, with a last column of menus where the page reviews
        (`hint`: the item's key naming the class to offer first)."""
        if self.review is None:
            return headers, row
        return [*headers, "your manifest"], lambda it: [*row(it), self(it.get("path", ""), it.get(hint), why)]


NO_REVIEW = _Decide(None)


def _cards(items: Any, card: Callable[[Mapping[str, Any]], str], headers: Sequence[str],
           row: Callable[[Mapping[str, Any]], Sequence[str]], pairs: bool = False) -> str:
    """The first MAX_CARDS items as cards, the next MAX_ROWS as a collapsed text table."""
    if items is None:
        return '<p class="na">not computed</p>'
    items = list(items)
    if not items:
        return '<p class="none">none found</p>'
    shown = items[:MAX_CARDS]
    out = [f'<p class="note">showing {len(shown)} of {len(items)}</p>' if len(items) > len(shown) else "",
           f'<div class="grid{" pairs" if pairs else ""}">', *map(card, shown), "</div>"]
    rest = items[MAX_CARDS:MAX_CARDS + MAX_ROWS]
    if rest:
        more = len(items) - MAX_CARDS - len(rest)
        out += [f"<details><summary>{len(rest)} more, without thumbnails</summary>",
                _table(headers, [row(it) for it in rest], left=len(headers)),
                f'<p class="note">and {more} more in audit.json</p>' if more else "", "</details>"]
    return "".join(out)


def cleaned_use(cleaned: Mapping[str, Any], code: Callable[[str], str] = str) -> str:
    """What to do with cleaned.csv, as the command line and the page say it: the command that trains on
    it (shown by `code`), or why there is none."""
    if cleaned.get("command"):
        return f"train on it: {code(str(cleaned['command']))}"
    if cleaned.get("train_images") == 0:
        return "it keeps no training image, so fit-head cannot train on it (evaluate --run ID --data scores a run on it)"
    return ("it names built-in or tfds: images, which a manifest cannot load: audit a folder or manifest of files "
            "to train on a cleaned set")


def _cleaned(audit: Mapping[str, Any]) -> str:
    """What cleaned.csv keeps and the command that trains on it (nothing where the audit has no `cleaned`)."""
    c = audit.get("cleaned")
    if not isinstance(c, Mapping) or "images" not in c:
        return ""
    relabelled = f", {_e(c.get('relabelled', 0))} relabelled" if c.get("relabel") else ""
    use = cleaned_use(c, lambda command: f"<code>{_e(command)}</code>")
    gone = c.get("classes_left_out") or []
    warn = (f'<p class="cleaned warn">cleaned.csv keeps no training image of {_e(", ".join(map(repr, gone)))}, so '
            f"none of its val or test images either: a head fitted on it will not know "
            f"{'that class' if len(gone) == 1 else 'those classes'}</p>" if gone else "")
    if "val" in (c.get("splits_emptied") or []):
        warn += ('<p class="cleaned warn">cleaned.csv keeps no val image: fit-head on it holds out part of the '
                 "training images as val instead</p>")
    return (f'<p class="cleaned">cleaned.csv keeps {_e(c["images"])} images, {_e(c.get("removed", "?"))} '
            f"removed (train, val and test alike){relabelled}; {use}</p>{warn}")


def _header(audit: Mapping[str, Any], review: Review | None = None, menus: int = 0) -> str:
    meta = "".join(f"<dt>{label}</dt><dd>{_e(audit[key]) if key in audit else 'not computed'}</dd>"
                   for key, label in (("data", "data"), ("run", "run"), ("cache_key", "cache key")))
    counts = audit.get("counts")
    if isinstance(counts, Mapping):
        summary = "".join(f'<span class="item">{_e(str(k).replace("_", " "))} '
                          f'<span class="count" data-key="{_e(k)}">{_e(v)}</span></span>'
                          for k, v in counts.items())
    else:
        summary = '<span class="na">counts not computed</span>'
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title in SECTIONS)
    return (f"<h1>Data audit</h1><dl class=meta>{meta}</dl><div class=counts>{summary}</div>"
            f"{_cleaned(audit)}{reviewing.panel(review, menus)}<nav><p>{nav}</p></nav>")


def _label_issues(audit: Mapping[str, Any], thumbs: _Thumbs, decide: _Decide = NO_REVIEW) -> str:
    def card(it: Mapping[str, Any]) -> str:
        return (f'<div class="card">{thumbs(it.get("path", ""))}given <b>{_e(it.get("given", "?"))}</b> &rarr; '
                f'suggested <b>{_e(it.get("suggested", "?"))}</b><br>score {_num(it.get("score"))} '
                f'&middot; {_e(it.get("split", ""))}{_in_cleaned(it)}{decide(it.get("path", ""), it.get("suggested"))}'
                f'<div class="path">{_e(it.get("path", ""))}</div></div>')
    headers, row = decide.column(["path", "split", "given", "suggested", "score", "cleaned.csv"],
                                 lambda it: [_e(it.get("path", "")), _e(it.get("split", "")), _e(it.get("given", "")),
                                             _e(it.get("suggested", "")), _num(it.get("score")),
                                             _e(it.get("cleaned", ""))], hint="suggested")
    return _cards(audit.get("label_issues"), card, headers, row)


def _in_cleaned(issue: Mapping[str, Any]) -> str:
    """What cleaned.csv did with a label issue (dropped, kept, relabelled), where the audit says."""
    return f'<br><span class="cleaned-{_e(issue["cleaned"])}">{_e(issue["cleaned"])} in cleaned.csv</span>' \
        if "cleaned" in issue else ""


def _is_leak(pair: Mapping[str, Any]) -> bool:
    a, b = pair.get("split_a"), pair.get("split_b")
    return bool(a) and bool(b) and a != b


def _duplicates(audit: Mapping[str, Any], thumbs: _Thumbs, decide: _Decide = NO_REVIEW) -> str:
    def side(pair: Mapping[str, Any], k: str) -> str:
        return (f'<div>{thumbs(pair.get(k, ""))}<b>{_e(pair.get("split_" + k, ""))}</b>{decide(pair.get(k, ""))}'
                f'<div class="path">{_e(pair.get(k, ""))}</div></div>')

    def card(pair: Mapping[str, Any]) -> str:
        leak = _is_leak(pair)
        return (f'<div class="card{" leak" if leak else ""}"><div class="imgs">{side(pair, "a")}{side(pair, "b")}'
                f'</div>similarity {_num(pair.get("similarity"))} &middot; {_e(pair.get("kind", "?"))}'
                f'{" <span class=badge>leakage</span>" if leak else ""}</div>')
    def row(p: Mapping[str, Any]) -> list[str]:
        menus = [decide(p.get("a", "")), decide(p.get("b", ""))] if decide.review is not None else []
        return [_e(p.get("a", "")), _e(p.get("b", "")), _e(f'{p.get("split_a", "")} / {p.get("split_b", "")}'),
                _num(p.get("similarity")), _e(p.get("kind", "")) + (" (leakage)" if _is_leak(p) else ""), *menus]
    headers = ["a", "b", "splits", "similarity", "kind"] + (["your manifest: a", "b"] if decide.review is not None else [])
    out = [_cards(audit.get("duplicates"), card, headers, row, pairs=True), "<h3>Leakage</h3>"]
    leakage = audit.get("leakage")
    if not isinstance(leakage, Mapping):
        return "".join(out + ['<p class="na">not computed</p>'])
    out.append(f'<p>cross-split duplicate pairs: <b>{_e(leakage.get("pairs", "not computed"))}</b></p>')
    accuracy = leakage.get("accuracy")
    if not accuracy:
        out.append('<p class="na">accuracy before/after removing leaked images: not computed (no val or test split to score, or a train split of one class to score them with)</p>')
    else:
        rows = [[_e(split), _pct(a.get("before")), _pct(a.get("after")), _change(a.get("before"), a.get("after")),
                 _e(a.get("n_before", "")), _e(a.get("n_after", "")), _e(a.get("removed", ""))]
                for split, a in accuracy.items() if isinstance(a, Mapping)]
        out.append(_table(["split", "accuracy before", "after", "change (points)", "n before", "n after", "removed"],
                          rows, left=1))
    return "".join(out)


def _outliers(audit: Mapping[str, Any], thumbs: _Thumbs, decide: _Decide = NO_REVIEW) -> str:
    def card(it: Mapping[str, Any]) -> str:
        return (f'<div class="card">{thumbs(it.get("path", ""))}<b>{_e(it.get("label", "?"))}</b> &middot; '
                f'{_e(it.get("split", ""))}<br>score {_num(it.get("score"))}{decide(it.get("path", ""))}'
                f'<div class="path">{_e(it.get("path", ""))}</div></div>')
    headers, row = decide.column(["path", "split", "label", "score"],
                                 lambda it: [_e(it.get("path", "")), _e(it.get("split", "")), _e(it.get("label", "")),
                                             _num(it.get("score"))])
    return _cards(audit.get("outliers"), card, headers, row)


def _model_errors(audit: Mapping[str, Any], thumbs: _Thumbs, decide: _Decide = NO_REVIEW) -> str:
    def card(it: Mapping[str, Any]) -> str:
        return (f'<div class="card">{thumbs(it.get("path", ""))}given <b>{_e(it.get("given", "?"))}</b><br>'
                f'predicted <b>{_e(it.get("predicted", "?"))}</b> ({_num(it.get("probability"), ".2f")})<br>'
                f'loss {_num(it.get("loss"), ".2f")} &middot; {_e(it.get("split", ""))}'
                f'{decide(it.get("path", ""), it.get("predicted"), "predicted")}'
                f'<div class="path">{_e(it.get("path", ""))}</div></div>')
    headers, row = decide.column(["path", "split", "given", "predicted", "probability", "loss"],
                                 lambda it: [_e(it.get("path", "")), _e(it.get("split", "")), _e(it.get("given", "")),
                                             _e(it.get("predicted", "")), _num(it.get("probability"), ".2f"),
                                             _num(it.get("loss"), ".2f")], hint="predicted", why="predicted")
    out = ["<h3>Top losses</h3>", _cards(audit.get("top_losses"), card, headers, row), "<h3>Most confused</h3>"]
    confused = audit.get("most_confused")
    if confused is None:
        out.append('<p class="na">not computed</p>')
    elif not confused:
        out.append('<p class="none">none found</p>')
    else:
        out.append(_table(["actual", "predicted", "count"], [[_e(c.get("actual", "")), _e(c.get("predicted", "")),
                                                            _e(c.get("count", ""))] for c in confused], left=2))
    return "".join(out)


def _confusion(audit: Mapping[str, Any]) -> str:
    """Counts in cells, background shaded by the row-normalised value (recall), like plots.py's PNG."""
    conf = audit.get("confusion")
    if not isinstance(conf, Mapping) or not conf.get("matrix"):
        return '<p class="na">not computed</p>'
    cm = np.asarray(conf["matrix"], dtype=np.int64)
    names = [str(n) for n in conf.get("class_names") or audit.get("class_names") or range(len(cm))]
    names += [str(i) for i in range(len(names), len(cm))]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    vertical = ' class="v"' if len(cm) > 6 else ""
    head = "<th>actual \\ predicted</th>" + "".join(f"<th{vertical}>{_e(n)}</th>" for n in names[:cm.shape[1]])
    body = []
    for i, row in enumerate(cm):
        cells = []
        for j, count in enumerate(row):
            v = float(norm[i, j])  # white -> dark blue (#08306b), like matplotlib's Blues
            r, g, b = (round(255 + (c - 255) * v) for c in (8, 48, 107))
            fg = "#fff" if v > 0.5 else "#222"
            cells.append(f'<td style="background:rgb({r},{g},{b});color:{fg}" title="{v:.1%}">{count}</td>')
        body.append(f'<tr><th class="l">{_e(names[i])}</th>{"".join(cells)}</tr>')
    return (f'<p>split: {_e(conf.get("split", "not given"))}; colour = fraction of the actual class</p>'
            f'<table class="cm"><tr>{head}</tr>{"".join(body)}</table>')


def _map_indices(flagged: np.ndarray) -> np.ndarray:
    """Every flagged point plus evenly spaced others, at most MAX_POINTS in all (unless more are flagged)."""
    if len(flagged) <= MAX_POINTS:
        return np.arange(len(flagged))
    others = np.flatnonzero(~flagged)
    budget = max(0, MAX_POINTS - int(flagged.sum()))
    keep = others[np.linspace(0, len(others) - 1, budget).round().astype(int)] if budget and len(others) else others[:0]
    return np.union1d(np.flatnonzero(flagged), keep)


def _map(audit: Mapping[str, Any]) -> str:
    """Inline SVG scatter of the 2-D embedding: one <circle> per point, its path as the tooltip."""
    m = audit.get("map")
    if not isinstance(m, Mapping) or not m.get("x"):
        return '<p class="na">not computed</p>'
    x, y = np.asarray(m["x"], float), np.asarray(m.get("y", []), float)
    n = min(len(x), len(y))
    labels = (list(m.get("labels") or []) + [-1] * n)[:n]
    paths = (list(m.get("paths") or []) + [""] * n)[:n]
    flagged = np.asarray((list(m.get("flagged") or []) + [False] * n)[:n], bool)
    idx = _map_indices(flagged)
    idx = idx[np.isfinite(x[idx]) & np.isfinite(y[idx])]
    idx = np.concatenate([idx[~flagged[idx]], idx[flagged[idx]]])  # flagged drawn last, on top
    names = [str(c) for c in audit.get("class_names") or []]
    if not len(idx):
        return '<p class="na">no finite points</p>'

    # One scale for both axes (distances in the embedding keep their proportions), centred, y up.
    lo = np.array([x[idx].min(), y[idx].min()])
    span = np.array([x[idx].max(), y[idx].max()]) - lo
    room = np.array([MAP_W, MAP_H]) - 2 * MAP_PAD
    s = float(min(room[k] / span[k] for k in (0, 1) if span[k] > 0)) if span.max() > 0 else 0.0
    off = MAP_PAD + (room - span * s) / 2
    px, py = off[0] + (x[:n] - lo[0]) * s, MAP_H - (off[1] + (y[:n] - lo[1]) * s)
    circles = []
    for i in idx:
        lab = int(labels[i]) if isinstance(labels[i], (int, np.integer)) else -1
        colour = PALETTE[lab % len(PALETTE)] if lab >= 0 else UNKNOWN_COLOUR
        name = names[lab] if 0 <= lab < len(names) else str(lab)
        style = 'r="5.5" stroke="#000" stroke-width="1.5"' if flagged[i] else 'r="3" fill-opacity="0.75"'
        circles.append(f'<circle cx="{px[i]:.1f}" cy="{py[i]:.1f}" {style} fill="{colour}">'
                       f'<title>{_e(paths[i])} ({_e(name)}){" flagged" if flagged[i] else ""}</title></circle>')
    legend = "".join(f'<span><i class="sw" style="background:{PALETTE[k % len(PALETTE)]}"></i>{_e(c)}</span>'
                     for k, c in enumerate(names))
    legend += '<span><i class="sw" style="background:#fff;border:1.5px solid #000"></i>flagged</span>'
    note = f" (showing {len(idx)} of {n})" if len(idx) < n else ""
    return (f'<p>method: {_e(m.get("method", "?"))}{note}; hover a point for its path</p>'
            f'<svg class="map" width="{MAP_W}" height="{MAP_H}" viewBox="0 0 {MAP_W} {MAP_H}" role="img">'
            f'{"".join(circles)}</svg><div class="legend">{legend}</div>')


SECTIONS = (("label-issues", "Label issues"), ("duplicates", "Duplicates &amp; leakage"),
            ("outliers", "Outliers"), ("model-errors", "Model errors"), ("confusion", "Confusion matrix"),
            ("map", "Embedding map"))


def write_report(audit: Mapping[str, Any], out: str | os.PathLike,
                 image_file: Callable[[str], str | np.ndarray | None], review: Review | None = None) -> Path:
    """Write `out` (report.html): a self-contained page (no network, no external files: CSS inline, thumbnails as
    base64 data URIs, the embedding map as inline SVG) showing every finding of `audit` (the audit.json dict).
    With `review` (the audited images in cleaned.csv's order) and a cleaned.csv a manifest can train on,
    each image gets a menu and the page builds the reviewed manifest (`pipeline.audit.review`); how many
    menus it holds goes to `review.menus`."""
    out = Path(out)
    thumbs = _Thumbs(image_file)
    review = review if names_files(str(audit.get("data") or "")) else None  # built-in or tfds: no manifest names them
    decide = _Decide(review)
    parts = (_label_issues(audit, thumbs, decide), _duplicates(audit, thumbs, decide), _outliers(audit, thumbs, decide),
             _model_errors(audit, thumbs, decide), _confusion(audit), _map(audit))
    sections = "".join(f'<section id="{sid}"><h2>{title}</h2>{body}</section>'
                       for (sid, title), body in zip(SECTIONS, parts))
    title = _e(f"Data audit: {audit.get('run') or audit.get('data') or ''}")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}{reviewing.CSS}</style></head><body>{_header(audit, review, decide.menus)}{sections}"
            f"{reviewing.script(review, decide.menus)}</body></html>\n")
    if review is not None:
        review.menus = decide.menus
    # Non-ASCII as character references: the file is then correct whatever the locale's encoding.
    write_text_atomic(out, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return out
