"""Reviewing an audit in its report: a person decides per flagged image (drop it, keep its label, give it
another) and downloads the manifest that follows, instead of taking cleaned.csv's rule as it is.

cleaned.csv applies a rule, and a rule is wrong some of the time: crowd workers confirmed about half of
the label issues confident learning flagged on benchmark test sets (Northcutt et al. 2021). So each
image in the report carries a menu, preset to what cleaned.csv did with it; the page builds the same
lines cleaned.csv holds (its rows are embedded as JSON, ASCII only, `<` escaped, so no path can end the
script) with the person's choices applied, and keeps them in the browser's localStorage under the run's
id, so a reload loses no work. Nothing runs but the page's own script; nothing is fetched.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from typing import Sequence

MAX_ROWS = 100_000  # images a page embeds to build the reviewed manifest (~60 bytes each)
DROP = -1
FILE_STEM = "cleaned-reviewed"  # the download: cleaned-reviewed-<audit run id>.csv (`Review.file_name`)


@dataclass
class Review:
    """The audited images in cleaned.csv's order: path, split and given label (an index into
    `classes`) per row, and what cleaned.csv does with each (DROP or the label it writes)."""

    paths: Sequence[str]
    splits: Sequence[str]
    given: Sequence[int]
    cleaned: Sequence[int]
    classes: Sequence[str]
    key: str = ""
    menus: int = 0  # how many menus the report holds (`report.write_report` sets it)

    def __post_init__(self) -> None:
        self.row: dict[str, int] = {}
        shared = set()  # a path two rows share (paths may repeat): its menu could not say which row it means
        for i, p in enumerate(self.paths):
            if self.row.setdefault(str(p), i) != i:
                shared.add(str(p))
        for p in shared:
            del self.row[p]
        self.class_index = {str(c): k for k, c in enumerate(self.classes)}

    @property
    def file_name(self) -> str:
        """The manifest the page downloads, named after the audit run, so reviews of two audits do not
        land as one name and a browser's "(1)" (characters a file name should not hold left out)."""
        key = re.sub(r"[^A-Za-z0-9._-]", "", str(self.key)).strip(".")
        return f"{FILE_STEM}-{key}.csv" if key else f"{FILE_STEM}.csv"

    @property
    def too_large(self) -> bool:
        return len(self.paths) > MAX_ROWS

    def payload(self) -> str:
        """The rows as compact JSON for a <script type="application/json">: a shared path prefix, each
        row [rest of path, given label, split], and the rows cleaned.csv drops or relabels."""
        paths = [str(p) for p in self.paths]
        prefix = os.path.commonprefix(paths) if paths else ""
        prefix = prefix[:prefix.rfind("/") + 1]
        split_names = sorted(set(map(str, self.splits)))
        split_of = {s: k for k, s in enumerate(split_names)}
        rows = [[p[len(prefix):], int(g), split_of[str(s)]] for p, g, s in zip(paths, self.given, self.splits)]
        changes = {str(i): int(c) for i, (g, c) in enumerate(zip(self.given, self.cleaned)) if int(c) != int(g)}
        data = {"key": str(self.key), "file": self.file_name, "classes": [str(c) for c in self.classes],
                "splits": split_names, "prefix": prefix, "rows": rows, "cleaned": changes}
        text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    def control(self, path: object, hint: object = None, why: str = "suggested") -> str:
        """The menu for one image (empty where the image is not among the rows, or the page is too large
        to review); the page's script fills in its choices, `hint` (a class name: the audit's suggestion,
        the model's prediction) first among the relabellings, marked `why`."""
        i = self.row.get(str(path))
        if i is None or self.too_large:
            return ""
        k = self.class_index.get(str(hint)) if hint is not None else None
        extra = f' data-hint="{k}" data-why="{html.escape(why, quote=True)}"' if k is not None else ""
        return f'<select class="decide" data-row="{i}"{extra} aria-label="in your manifest"></select>'


def panel(review: Review | None, menus: int) -> str:
    """What the header says about reviewing: the download and reset buttons, or why there are none
    (nothing without a review, e.g. for images that are not files a manifest can name, or where no
    image shown has a menu)."""
    if review is None:
        return ""
    if review.too_large:
        return (f'<p class="note">Reviewing in this page takes at most {MAX_ROWS:,} images, and this audit has '
                f"{len(review.paths):,}: edit cleaned.csv (or label_issues.csv) instead.</p>")
    if not menus:
        return ""
    return (f'<div class="review" id="review"><b>Review</b>: the images below carry menus, preset to what '
            f"cleaned.csv does with each (drop it, keep its label, or give it another). "
            f'<span id="review-changes">0</span> of your choices differ from cleaned.csv. '
            f'<button type="button" id="review-download">Download {html.escape(review.file_name)}</button> '
            f'<button type="button" id="review-reset">Back to cleaned.csv\'s choices</button>'
            f'<br><span class="note">Keys: Tab to the next menu; D drops, K keeps, R relabels as suggested (where a card suggests). '
            f"Your choices stay in this browser; train on the downloaded file with the command above, naming "
            f"it in place of cleaned.csv.</span>"
            f'<span id="review-unsaved" class="warn" hidden><br>This browser would not store your choices: '
            f"download the manifest before you close the page.</span>"
            '<span id="review-orphans" class="warn" hidden></span>'
            f'<noscript><br><span class="warn">Reviewing needs JavaScript, which is off.</span></noscript></div>')


def script(review: Review | None, menus: int) -> str:
    """The data and the page's script ('' where there is nothing to review)."""
    if review is None or review.too_large or not menus:
        return ""
    return (f'<script type="application/json" id="review-data">{review.payload()}</script>'
            f"<script>{SCRIPT}</script>")


CSS = """
.review{position:sticky;top:0;z-index:2;background:#fff8e1;border:1px solid #e0c060;border-radius:6px;padding:8px 12px;margin:8px 0}
select.decide{display:block;margin:4px 0;max-width:100%;font-size:12px}
.card.changed,tr.changed{outline:3px solid #ff7f0e}
"""

# One script: reads the rows, fills the menus, keeps the person's choices (only those that differ from
# cleaned.csv's) in localStorage, warns where they would leave a class with val images and no training
# images (fit-head refuses that), and builds the manifest as `sheets.csv_text` writes cleaned.csv. D, K and
# R are the page's own keys (the browser's type-ahead moved a second R to the next class). A menu
# holds drop, keep, the hint and the current choice until it is first used, then every class: with a
# thousand classes, every class in every menu (up to ~5,000 of them) froze the page for minutes.
SCRIPT = """
(function () {
  "use strict";
  var R = JSON.parse(document.getElementById("review-data").textContent);
  var store = "featurecache-review:" + R.key, choice = {};
  function has(o, i) { return Object.prototype.hasOwnProperty.call(o, i); }
  function preset(i) { return has(R.cleaned, i) ? R.cleaned[i] : R.rows[i][1]; }
  function current(i) { return has(choice, i) ? choice[i] : preset(i); }
  function load(text) {  // stored choices: only those this page can mean, and that change something
    var got = {};
    try { got = JSON.parse(text || "{}"); } catch (e) { got = {}; }
    if (!got || typeof got !== "object" || Array.isArray(got)) got = {};
    Object.keys(got).forEach(function (i) {
      var a = got[i];
      var ok = /^(0|[1-9][0-9]*)$/.test(i) && +i < R.rows.length && typeof a === "number" &&
               a === Math.floor(a) && a >= -1 && a < R.classes.length && a !== preset(+i);
      if (!ok) delete got[i];
    });
    return got;
  }
  try { choice = load(localStorage.getItem(store)); } catch (e) { choice = {}; }
  function field(v) { return /[",\\r\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  window.reviewedCsv = function () {
    var out = ["path,label,split"];
    for (var i = 0; i < R.rows.length; i++) {
      var a = current(i), r = R.rows[i];
      if (a < 0) continue;
      out.push([R.prefix + r[0], R.classes[a], R.splits[r[2]]].map(field).join(","));
    }
    return out.join("\\n") + "\\n";
  };
  var menus = document.querySelectorAll("select.decide");
  function fill(sel, all) {
    var given = R.rows[+sel.dataset.row][1], hint = sel.dataset.hint === undefined ? -1 : +sel.dataset.hint;
    var values = [-1, given];
    if (hint >= 0 && hint !== given) values.push(hint);
    if (all) R.classes.forEach(function (c, k) { if (values.indexOf(k) < 0) values.push(k); });
    else if (values.indexOf(current(+sel.dataset.row)) < 0) values.push(current(+sel.dataset.row));
    sel.textContent = "";
    values.forEach(function (k) {
      var o = document.createElement("option");
      o.value = String(k);
      o.textContent = k < 0 ? "drop it" : k === given ? "keep: " + R.classes[k] :
        "relabel: " + R.classes[k] + (k === hint ? " (" + sel.dataset.why + ")" : "");
      sel.appendChild(o);
    });
    sel.dataset.full = all ? "1" : "";
    sel.value = String(current(+sel.dataset.row));
  }
  function show() {
    var boxes = [];  // a card (a duplicate pair's holds two menus) or table row, marked if any choice in it changed
    menus.forEach(function (sel) {
      var i = +sel.dataset.row, box = sel.closest(".card") || sel.closest("tr");
      sel.value = String(current(i));
      if (sel.value !== String(current(i))) fill(sel, false);  // a choice made in another menu of this image
      if (box) { box.classList.remove("changed"); if (has(choice, i)) boxes.push(box); }
    });
    boxes.forEach(function (box) { box.classList.add("changed"); });
    document.getElementById("review-changes").textContent = String(Object.keys(choice).length);
    var taught = {}, needed = {}, trains = false;  // fit-head refuses a class with val images and no training images
    for (var i = 0; i < R.rows.length; i++) {
      var a = current(i), train = R.splits[R.rows[i][2]] === "train";
      trains = trains || train;
      if (a >= 0) { if (train) taught[a] = true; else needed[a] = true; }
    }
    var orphans = Object.keys(needed).filter(function (a) { return trains && !has(taught, a); });
    var warn = document.getElementById("review-orphans");
    warn.hidden = !orphans.length;
    warn.textContent = orphans.length ? " Your manifest keeps val or test images of " +
      orphans.map(function (a) { return "'" + R.classes[+a] + "'"; }).join(", ") + " but no training image of " +
      (orphans.length > 1 ? "those classes" : "that class") + ", which fit-head refuses: keep one of " +
      (orphans.length > 1 ? "their" : "its") + " training images, or drop those." : "";
  }
  function choose(sel, a) {  // one image's choice; every menu of it follows (show)
    var i = +sel.dataset.row;
    if (a === preset(i)) delete choice[i]; else choice[i] = a;
    save(); show();
  }
  function save() {
    var stored = true;
    try { localStorage.setItem(store, JSON.stringify(choice)); } catch (e) { stored = false; }
    document.getElementById("review-unsaved").hidden = stored;
  }
  function menu(ev) { return ev.target.matches && ev.target.matches("select.decide") ? ev.target : null; }
  function open(ev) { var sel = menu(ev); if (sel && !sel.dataset.full) fill(sel, true); }
  menus.forEach(function (sel) { fill(sel, false); });
  document.addEventListener("focusin", open);
  document.addEventListener("mousedown", open);
  document.addEventListener("focusout", function (ev) {  // closed again: short again, so menus opened stay cheap
    var sel = menu(ev);
    if (sel && sel.dataset.full) fill(sel, false);
  });
  document.addEventListener("change", function (ev) {
    var sel = menu(ev);
    if (sel) choose(sel, +sel.value);
  });
  document.addEventListener("keydown", function (ev) {  // the page's keys, not the browser's type-ahead, which
    var sel = menu(ev), key = String(ev.key || "").toLowerCase();  // moved on to the next "r..." class
    if (!sel || ev.altKey || ev.ctrlKey || ev.metaKey || ["d", "k", "r"].indexOf(key) < 0) return;
    ev.preventDefault();
    var row = R.rows[+sel.dataset.row], hint = sel.dataset.hint === undefined ? null : +sel.dataset.hint;
    if (key === "r" && hint === null) return;  // no suggestion on this card: R changes nothing
    choose(sel, key === "d" ? -1 : key === "k" ? row[1] : hint);
  });
  document.getElementById("review-reset").addEventListener("click", function () { choice = {}; save(); show(); });
  window.addEventListener("storage", function (ev) {  // the same report open twice: each follows the other
    if (ev.key === store) { choice = load(ev.newValue); show(); }
  });
  document.getElementById("review-download").addEventListener("click", function () {
    var url = URL.createObjectURL(new Blob([window.reviewedCsv()], {type: "text/csv"}));
    var a = document.createElement("a");
    a.href = url; a.download = R.file; document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });
  show();
})();
"""
