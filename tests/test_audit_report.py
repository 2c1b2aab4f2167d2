"""The audit's HTML report: self-contained, escaped, bounded, robust to missing images, and rendered by
a real browser (headless Chromium) with header counts equal to audit.json's."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import Page, chromium
from pipeline.audit import review as reviewing
from pipeline.audit.report import MAX_CARDS, MAX_POINTS, write_report
from pipeline.audit.review import DROP, Review
from pipeline.sheets import csv_text

CLASSES = ["daisy", "roses", '<b>&"']  # the last one checks escaping of user data
MISSING = "val/daisy/missing.jpg"      # not on disk: image_file returns None
BROKEN = "train/roses/broken.jpg"      # on disk but not an image


class _Counts(HTMLParser):
    """Collects <span class="count" data-key=K>V</span> as {K: V}."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, str] = {}
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "count" in (a.get("class") or "").split():
            self._key, self.counts[a["data-key"]] = a["data-key"], ""

    def handle_data(self, data):
        if self._key is not None:
            self.counts[self._key] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._key = None


def span_counts(page: str) -> dict[str, str]:
    parser = _Counts()
    parser.feed(page)
    return parser.counts


def make_audit(root: Path) -> tuple[dict, list[str]]:
    """12 small JPEGs under root (train/val x 3 classes x 2) and an audit dict that refers to them."""
    rng = np.random.default_rng(0)
    paths = []
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            for k in range(2):
                rel = f"{split}/{name}/{k}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                arr = np.zeros((40, 60, 3), np.uint8)
                arr[..., c] = 200
                arr[10:30, 10 + 20 * k:30 + 20 * k] = rng.integers(0, 255, 3)
                Image.fromarray(arr).save(root / rel, "JPEG")
                paths.append(rel)
    (root / BROKEN).write_bytes(b"not a jpeg at all")
    label_issues = [{"path": paths[0], "split": "train", "given": "daisy", "suggested": CLASSES[2], "score": 0.93},
                    {"path": MISSING, "split": "val", "given": CLASSES[2], "suggested": "roses", "score": 0.71}]
    duplicates = [{"a": paths[1], "b": paths[7], "split_a": "train", "split_b": "val", "similarity": 1.0,
                   "kind": "exact"},
                  {"a": paths[2], "b": paths[9], "split_a": "train", "split_b": "val", "similarity": 0.974,
                   "kind": "near"}]
    outliers = [{"path": paths[4], "split": "train", "label": CLASSES[2], "score": 0.87},
                {"path": BROKEN, "split": "train", "label": "roses", "score": 0.66}]
    top_losses = [{"path": paths[6], "split": "val", "given": "daisy", "predicted": "roses", "probability": 0.91,
                   "loss": 4.2},
                  {"path": paths[0], "split": "train", "given": "daisy", "predicted": CLASSES[2],
                   "probability": 0.8, "loss": 2.1}]
    audit = {
        "version": 1, "run": "run-0001", "data": str(root), "cache_key": "abc123def456",
        "class_names": CLASSES,
        "counts": {"images": len(paths), "label_issues": 2, "duplicates": 2, "exact_duplicates": 1,
                   "near_duplicates": 1, "leakage_pairs": 2, "outliers": 2, "top_losses": 2},
        "label_issues": label_issues, "duplicates": duplicates, "outliers": outliers,
        "leakage": {"pairs": 2, "accuracy": {"val": {"before": 0.95, "after": 0.93, "n_before": 6, "n_after": 4,
                                                     "removed": 2}}},
        "top_losses": top_losses,
        "most_confused": [{"actual": "daisy", "predicted": CLASSES[2], "count": 3}],
        "confusion": {"split": "out-of-fold train", "class_names": CLASSES,
                      "matrix": [[5, 1, 0], [0, 6, 0], [2, 0, 4]]},
        "map": {"method": "umap", "x": rng.normal(size=12).tolist(), "y": rng.normal(size=12).tolist(),
                "labels": [i // 2 % 3 for i in range(12)], "paths": paths,
                "flagged": [i in (0, 4, 6) for i in range(12)]},
    }
    return audit, paths


def resolver(root: Path, calls: list[str] | None = None):
    def image_file(path: str) -> str | None:
        if calls is not None:
            calls.append(path)
        file = root / path
        return str(file) if file.exists() else None
    return image_file


def test_report_is_self_contained_escaped_and_robust(tmp_path):
    audit, paths = make_audit(tmp_path / "data")
    calls: list[str] = []
    out = write_report(audit, tmp_path / "run" / "report.html", resolver(tmp_path / "data", calls))
    assert out == tmp_path / "run" / "report.html" and out.is_file()
    page = out.read_text(encoding="ascii")  # non-ASCII is written as character references
    # Self-contained: nothing fetched from the network or from other files.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    # Thumbnails are inline JPEGs of at most 112 px.
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris
    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as im:
        assert im.format == "JPEG" and max(im.size) <= 112
    # User strings are escaped, never raw markup.
    assert "&lt;b&gt;&amp;&quot;" in page and '<b>&"' not in page
    # A missing image and an undecodable one become placeholders named after the file.
    assert re.search(r'<div class="thumb missing" title="val/daisy/missing.jpg">missing.jpg</div>', page)
    assert re.search(r'<div class="thumb missing" title="train/roses/broken.jpg">broken.jpg</div>', page)
    # Each distinct path is resolved once (paths[0] is both a label issue and a top loss).
    assert sorted(calls) == sorted(set(calls)) and paths[0] in calls
    # Sections in order, header counts equal to audit.json, leakage marked, map drawn.
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert heads == ["Label issues", "Duplicates &amp; leakage", "Outliers", "Model errors", "Confusion matrix",
                     "Embedding map"]
    assert span_counts(page) == {k: str(v) for k, v in audit["counts"].items()}
    assert page.count('class="card leak"') == 2 and "&rarr;" in page
    assert page.count("<circle") == 12 and page.count('stroke="#000"') == 3
    assert "-2.0" in page  # accuracy change in points, val 95% -> 93%


def test_the_header_says_what_cleaned_csv_keeps_and_how_to_train_on_it(tmp_path):
    command = "python cli.py fit-head --data '/a b/cleaned.csv' --allow-outside-paths --backbone vgg16"
    cleaned = {"file": "cleaned.csv", "images": 90, "removed": 10, "relabel": True, "relabelled": 4, "command": command}
    page = write_report({"cleaned": cleaned}, tmp_path / "run" / "report.html", lambda p: None).read_text()
    assert "cleaned.csv keeps 90 images, 10 removed (train, val and test alike), 4 relabelled" in page
    assert f"train on it: <code>{html.escape(command)}</code>" in page
    page = write_report({"cleaned": {**cleaned, "relabel": False}}, tmp_path / "r.html", lambda p: None).read_text()
    assert "10 removed (train, val and test alike); train on it" in page and " relabelled;" not in page
    page = write_report({"cleaned": {**cleaned, "command": None}}, tmp_path / "b.html", lambda p: None).read_text()
    assert "train on it" not in page and "which a manifest cannot load" in page
    issue = {"path": "a.jpg", "split": "train", "given": "daisy", "suggested": "roses", "score": 0.9, "cleaned": "dropped"}
    page = write_report({"label_issues": [issue]}, tmp_path / "i.html", lambda p: None).read_text()
    assert '<span class="cleaned-dropped">dropped in cleaned.csv</span>' in page


def test_missing_keys_say_not_computed(tmp_path):
    out = write_report({"version": 1}, tmp_path / "report.html", lambda p: None)
    page = out.read_text()
    assert page.count("not computed") >= 6 and 'class="count"' not in page and 'class="cleaned"' not in page


def test_work_is_bounded(tmp_path):
    audit, paths = make_audit(tmp_path / "data")
    audit["label_issues"] = [{"path": paths[i % 12], "split": "train", "given": "daisy", "suggested": "roses",
                              "score": 1 - i / 100} for i in range(75)] + [{"path": f"x/{i}.jpg"} for i in range(5)]
    n = MAX_POINTS + 5000
    flagged = np.zeros(n, bool)
    flagged[[3, 777, n - 1]] = True
    audit["map"] = {"method": "pca", "x": np.arange(n, dtype=float).tolist(), "y": np.sin(np.arange(n)).tolist(),
                    "labels": (np.arange(n) % 3).tolist(), "paths": [f"p{i}" for i in range(n)],
                    "flagged": flagged.tolist()}
    page = write_report(audit, tmp_path / "report.html", resolver(tmp_path / "data")).read_text()
    section = page.split('<section id="label-issues">')[1].split("</section>")[0]
    assert f"showing {MAX_CARDS} of 80" in section and section.count('class="thumb') == MAX_CARDS
    assert "<td class=l>x/4.jpg</td>" in section  # the rest are listed as text
    assert page.count("<circle") == MAX_POINTS and page.count('stroke="#000"') == 3
    assert all(f"<title>p{i} (" in page for i in (3, 777, n - 1))


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH (`chromium` or `chromium-browser`); "
                                                 "install it with `apt-get install -y chromium`")
def test_report_renders_in_chromium(tmp_path):
    audit, _ = make_audit(tmp_path / "data")
    report = write_report(audit, tmp_path / "report.html", resolver(tmp_path / "data"))
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    png = tmp_path / "report.png"
    subprocess.run(base + [f"--screenshot={png}", "--window-size=1200,2000", report.as_uri()],
                   check=True, timeout=60, capture_output=True)
    assert png.is_file()
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("L"))
    values, freq = np.unique(pixels, return_counts=True)
    assert pixels.std() > 5 and (pixels != values[freq.argmax()]).mean() > 0.01, "blank screenshot"
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], check=True, timeout=60, capture_output=True,
                         text=True).stdout
    assert span_counts(dom) == {k: str(v) for k, v in audit["counts"].items()}


# ------------------------------------------------------------------------------- reviewing in the page
COMMAND = "python cli.py fit-head --data /r/cleaned.csv --allow-outside-paths"
# a comma, quotes, non-ASCII, markup, a lone carriage return (quoted by Python's csv only from 3.11.9)
ODD = ['/d/train/a,b "c".jpg', "/d/val/caf\u00e9 </script><b>.jpg", "/d/val/line\rbreak.jpg"]
CHOOSE = ("(function (row, value) {{ var s = document.querySelector('select.decide[data-row=\"' + row + '\"]');"
          " s.dispatchEvent(new MouseEvent('mousedown', {{bubbles: true}}));"   # as a click opens it
          " s.value = String(value); s.dispatchEvent(new Event('change', {{bubbles: true}})); }})({}, {})")
MENUS_OF = "Array.from(document.querySelectorAll('select.decide[data-row=\"{}\"]')).map(s => s.value)"
OPTIONS_OF = ("Array.from(document.querySelectorAll('select.decide[data-row=\"{}\"]'))"
              ".map(s => Array.from(s.options).map(o => o.textContent))")
CHANGES = "document.getElementById('review-changes').textContent"


def make_review(paths: list[str], classes: list[str] = CLASSES) -> Review:
    """Rows in cleaned.csv's order: every path of `paths` plus ODD; cleaned.csv drops rows 1 and 4 and
    relabels row 2 (roses -> the third class)."""
    rows = [*paths, *ODD]
    given = [i // 2 % 3 for i in range(len(rows))]
    cleaned = list(given)
    cleaned[1], cleaned[4], cleaned[2] = DROP, DROP, 2
    splits = ["train" if r.startswith("train") or "/train/" in r else "val" for r in rows]
    return Review(paths=rows, splits=splits, given=given, cleaned=cleaned, classes=classes, key="run-0001")


def cleaned_csv(review: Review, choice: dict[int, int] | None = None) -> str:
    """What cleaned.csv holds for `review` (the runner's own writer), with `choice` applied."""
    labels = [(choice or {}).get(i, c) for i, c in enumerate(review.cleaned)]
    return csv_text([(p, review.classes[c], s) for p, s, c in zip(review.paths, review.splits, labels) if c != DROP],
                    ("path", "label", "split"))


def reviewed_report(tmp_path: Path, classes: list[str] = CLASSES) -> tuple[Path, Review]:
    audit, paths = make_audit(tmp_path / "data")
    audit["cleaned"] = {"file": "cleaned.csv", "images": 12, "removed": 2, "command": COMMAND}
    review = make_review(paths, classes)
    return write_report(audit, tmp_path / "report.html", resolver(tmp_path / "data"), review=review), review


def test_the_page_carries_a_menu_per_image_and_its_rows_safely(tmp_path, monkeypatch):
    report, review = reviewed_report(tmp_path)
    page = report.read_text()
    # a menu on every card whose image is a row: label issue 0, duplicate sides 1/7 and 2/9, outlier 4, top loss 6 and 0
    menus = re.findall(r'<select class="decide" data-row="(\d+)"', page)
    assert sorted(map(int, menus)) == [0, 0, 1, 2, 4, 6, 7, 9]
    assert "Download cleaned-reviewed-run-0001.csv" in page and page.count("<script") == 2
    # the download is named after the audit run; what a file name should not hold is left out
    assert reviewing.Review([], [], [], [], [], key="../2026 12:05").file_name == "cleaned-reviewed-20261205.csv"
    assert reviewing.Review([], [], [], [], [], key="").file_name == "cleaned-reviewed.csv"
    # the rows are JSON that no path can break out of, and the page stays ASCII
    data = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S).group(1)
    assert "</script>" not in data and "<" not in data
    parsed = json.loads(data)
    assert [parsed["prefix"] + r[0] for r in parsed["rows"]] == review.paths
    assert parsed["cleaned"] == {"1": DROP, "2": 2, "4": DROP} and parsed["key"] == "run-0001"
    # cleaned.csv quotes as the page does, on every Python (its csv module left a lone \r bare before 3.11.9)
    assert csv_text([("a\rb", 'c,"d"', None)], ("path", "label", "split")) == 'path,label,split\n"a\rb","c,""d""",\n'
    # a path two rows share gets no menu (it could not say which row it means); the others keep theirs
    audit, paths = make_audit(tmp_path / "data")
    audit["cleaned"] = {"file": "cleaned.csv", "images": 12, "removed": 2, "command": COMMAND}
    shared = make_review(paths)
    shared.__init__([*shared.paths, paths[0]], [*shared.splits, "val"], [*shared.given, 0], [*shared.cleaned, DROP],
                    CLASSES, "run-0002")
    page = write_report(audit, tmp_path / "s.html", resolver(tmp_path / "data"), review=shared).read_text()
    assert sorted(map(int, re.findall(r'<select class="decide" data-row="(\d+)"', page))) == [1, 2, 4, 6, 7, 9]
    # built-in or tfds: images (a manifest cannot name them), nothing shown, or too many rows: no script
    page = write_report({**audit, "data": "builtin:digits"}, tmp_path / "b.html", resolver(tmp_path / "data"),
                        review=review).read_text()
    assert "<script" not in page and 'class="decide"' not in page
    page = write_report({"cleaned": audit["cleaned"], "label_issues": []}, tmp_path / "e.html",
                        resolver(tmp_path / "data"), review=review).read_text()
    assert "<script" not in page and 'id="review"' not in page
    monkeypatch.setattr(reviewing, "MAX_ROWS", 5)
    page = write_report(audit, tmp_path / "c.html", resolver(tmp_path / "data"), review=review).read_text()
    assert "<script" not in page and 'class="decide"' not in page
    assert "Reviewing in this page takes at most 5 images, and this audit has 15: edit cleaned.csv" in page


STORE = "featurecache-review:run-0001"


def reload(page: Page, report: Path, stored: str) -> None:
    """Load `report` again until what its script read from storage on load is `stored`: a write in the
    previous document reaches the next one asynchronously (a race seen under load). The read runs before
    the page's own script, so that script read the same or newer."""
    seen = page.run_first(f"window.__storedOnLoad = localStorage.getItem({json.dumps(STORE)});")
    try:
        for _ in range(50):
            page.goto(report.as_uri())
            if page.evaluate("window.__storedOnLoad") == stored:
                return
            time.sleep(0.1)
        raise AssertionError(f"the page never loaded with {stored} stored")
    finally:
        page.stop_running(seen)


def load_with_stored(page: Page, report: Path, stored: str) -> None:
    """Load `report` with `stored` put in its storage before its script runs (no race)."""
    put = page.run_first(f"localStorage.setItem({json.dumps(STORE)}, {json.dumps(stored)});")
    try:
        page.goto(report.as_uri())
    finally:
        page.stop_running(put)


def settle(tab, expression: str, want: object, tries: int = 100) -> None:
    """Wait (up to `tries` x 0.05 s) until `expression` in `tab` reads `want`: a choice saved in one tab
    reaches another through a storage event, asynchronously. The caller's assertions judge the result."""
    for _ in range(tries):
        if tab.evaluate(expression) == want:
            return
        time.sleep(0.05)


def assert_menus_show(page: Page, review: Review, choice: dict[int, int]) -> None:
    """Every menu shows its image's current choice, and holds it among its options."""
    shown = page.evaluate("Array.from(document.querySelectorAll('select.decide'))"
                          ".map(s => [+s.dataset.row, s.value, s.selectedIndex])")
    assert shown and all(index >= 0 and value == str(choice.get(row, review.cleaned[row]))
                         for row, value, index in shown), shown


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH (`chromium` or `chromium-browser`); "
                                                "install it with `apt-get install -y chromium`")
def test_a_review_in_the_browser_builds_the_manifest_and_survives_a_reload(tmp_path):
    report, review = reviewed_report(tmp_path)
    with Page(report.as_uri(), tmp_path / "profile") as page:
        # untouched, the page builds cleaned.csv to the byte (quoting, non-ASCII and order included) ...
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review)
        page.downloads_to(tmp_path / "downloads")
        page.evaluate("document.getElementById('review-download').click()")
        got = tmp_path / "downloads" / "cleaned-reviewed-run-0001.csv"
        for _ in range(200):
            if got.is_file():
                break
            time.sleep(0.05)
        assert got.read_bytes() == cleaned_csv(review).encode("utf-8")  # ... and downloads it
        assert page.evaluate(CHANGES) == "0"
        assert page.evaluate(MENUS_OF.format(0)) == ["0", "0"]                 # one image, two sections
        # closed, a menu holds drop, keep and the hint; opened, every class, the hint first
        assert page.evaluate(OPTIONS_OF.format(0)) == [["drop it", "keep: daisy", f"relabel: {CLASSES[2]} (suggested)"],
                                                       ["drop it", "keep: daisy", f"relabel: {CLASSES[2]} (predicted)"]]
        page.evaluate("document.querySelector('select.decide').dispatchEvent(new FocusEvent('focusin', {bubbles: true}))")
        assert page.evaluate(OPTIONS_OF.format(0))[0] == ["drop it", "keep: daisy", f"relabel: {CLASSES[2]} (suggested)",
                                                          "relabel: roses"]
        page.evaluate("document.querySelector('select.decide').dispatchEvent(new FocusEvent('focusout', {bubbles: true}))")
        assert len(page.evaluate(OPTIONS_OF.format(0))[0]) == 3                 # closed again: short again
        assert_menus_show(page, review, {})     # row 2's relabelling, no hint of its own, is among its options
        page.evaluate(CHOOSE.format(0, 1))      # a class the other menu of the image does not hold closed
        assert page.evaluate(MENUS_OF.format(0)) == ["1", "1"]
        assert_menus_show(page, review, {0: 1})
        page.evaluate(CHOOSE.format(0, DROP))   # drop a label issue cleaned.csv kept
        page.evaluate(CHOOSE.format(1, 0))      # keep a copy cleaned.csv dropped, with its label
        page.evaluate(CHOOSE.format(6, 2))      # relabel a top loss
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {0: DROP, 1: 0, 6: 2})
        assert page.evaluate(MENUS_OF.format(0)) == [str(DROP), str(DROP)]      # its other menu follows
        assert_menus_show(page, review, {0: DROP, 1: 0, 6: 2})
        assert page.evaluate(CHANGES) == "3"
        assert page.evaluate("document.querySelectorAll('.card.changed').length") == 4  # a pair's card once
        page.evaluate(CHOOSE.format(6, 0))      # back to what cleaned.csv does: no longer a change
        assert page.evaluate(CHANGES) == "2"
        assert page.evaluate("document.getElementById('review-unsaved').hidden") is True
        reload(page, report, '{"0":-1,"1":0}')  # a reload keeps the choices
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {0: DROP, 1: 0})
        assert page.evaluate(MENUS_OF.format(1)) == ["0"] and page.evaluate(CHANGES) == "2"
        assert_menus_show(page, review, {0: DROP, 1: 0})
        page.evaluate("document.getElementById('review-reset').click()")
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review)
        assert_menus_show(page, review, {})
        # stored choices this page cannot mean, or that change nothing, are ignored; so are stored non-objects
        load_with_stored(page, report, '{"0": 99, "length": 1, "3": -1, "2": 2, "5": 1.5, "07": -1}')
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {3: DROP}) and page.evaluate(CHANGES) == "1"
        for stored in ("5", "true", '"abc"', "[1, 2]", "null", "{"):
            load_with_stored(page, report, stored)
            assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review), stored
            assert_menus_show(page, review, {})
        # a browser that will not store the choices says so
        page.evaluate("Storage.prototype.setItem = function () { throw new Error('quota'); }")
        page.evaluate(CHOOSE.format(0, DROP))
        assert page.evaluate("document.getElementById('review-unsaved').hidden") is False


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH")
def test_a_thousand_classes_leave_the_review_quick(tmp_path):
    """Every class in every menu (up to ~5,000 menus) froze the page for minutes: a closed menu holds
    three choices, an opened one all 1,000."""
    classes = CLASSES + [f"class {k}" for k in range(997)]
    audit, paths = make_audit(tmp_path / "data")
    audit["cleaned"] = {"file": "cleaned.csv", "images": 12, "removed": 2, "command": COMMAND}
    audit["label_issues"] = [{"path": paths[i % 12], "given": "daisy", "suggested": "roses", "score": 0.5}
                             for i in range(MAX_CARDS + 400)]
    review = make_review(paths, classes)
    report = write_report(audit, tmp_path / "report.html", resolver(tmp_path / "data"), review=review)
    started = time.perf_counter()
    with Page(report.as_uri(), tmp_path / "profile") as page:
        menus = page.evaluate("document.querySelectorAll('select.decide').length")
        assert menus > MAX_CARDS + 400
        assert page.evaluate("document.querySelectorAll('select.decide option').length") <= 3 * menus
        page.evaluate(CHOOSE.format(0, 999))
        assert page.evaluate(OPTIONS_OF.format(0))[0][-1] == "relabel: class 996"
        assert set(page.evaluate(MENUS_OF.format(0))) == {"999"}            # every menu of the image, closed too
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {0: 999})
    assert time.perf_counter() - started < 60


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH")
def test_the_same_report_in_two_tabs_keeps_one_set_of_choices(tmp_path):
    """Each tab saves its whole set of choices; without following the other's, the last to save won."""
    report, review = reviewed_report(tmp_path)
    with Page(report.as_uri(), tmp_path / "profile") as page:
        other = page.open_tab(report.as_uri())
        other.evaluate(CHOOSE.format(9, DROP))
        settle(page, CHANGES, "1")
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {9: DROP})
        assert page.evaluate(MENUS_OF.format(9)) == [str(DROP)]
        page.evaluate(CHOOSE.format(0, DROP))
        settle(other, CHANGES, "2")
        assert other.evaluate("window.reviewedCsv()") == cleaned_csv(review, {0: DROP, 9: DROP})
        assert other.evaluate(MENUS_OF.format(0)) == [str(DROP), str(DROP)]


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH")
def test_the_review_works_from_the_keyboard(tmp_path):
    """D drops, K keeps, R takes the suggestion, typed as fast as a person types: the page's own keys.
    Left to the browser's type-ahead, a second R moved on to the next class starting with "r", R on a
    card without a suggestion relabelled anyway, and D then K within a second searched for "dk"."""
    report, review = reviewed_report(tmp_path)
    with Page(report.as_uri(), tmp_path / "profile") as page:
        page.evaluate("document.querySelector('select.decide').focus()")
        for key, want in (("d", DROP), ("k", 0), ("r", 2), ("r", 2), ("D", DROP), ("r", 2), ("k", 0)):
            page.press(key)
            assert page.evaluate(MENUS_OF.format(0)) == [str(want)] * 2, key
            assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {0: want} if want else {}), key
        page.press("Tab")
        assert page.evaluate("document.activeElement.dataset.row") == "1"
        page.press("r")                         # a duplicate's menu: no suggestion, so nothing changes
        assert page.evaluate(MENUS_OF.format(1)) == [str(DROP)] and page.evaluate(CHANGES) == "0"
        page.press("k")                         # keep the copy cleaned.csv drops
        assert page.evaluate("window.reviewedCsv()") == cleaned_csv(review, {1: 0})


@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium on PATH")
def test_the_page_warns_where_the_choices_leave_a_class_with_val_images_and_no_training_image(tmp_path):
    """fit-head refuses a manifest with val images of a class and no training image of it: the page says
    so while the choices would make one (cleaned.csv never does), and stops once they no longer do."""
    report, review = reviewed_report(tmp_path)
    orphans = "document.getElementById('review-orphans')"
    with Page(report.as_uri(), tmp_path / "profile") as page:
        assert page.evaluate(f"{orphans}.hidden") is True
        load_with_stored(page, report, '{"3": -1}')  # roses' one training image cleaned.csv keeps: dropped
        assert page.evaluate(f"{orphans}.hidden") is False
        text = page.evaluate(f"{orphans}.textContent")  # (a non-ASCII space became a literal &#160; in the script)
        assert text.strip().startswith("Your manifest keeps val or test images of 'roses' but no training image of "
                                       "that class, which fit-head refuses") and "&#" not in text, text
        page.evaluate(CHOOSE.format(2, 1))            # a training image cleaned.csv relabels: kept as roses
        assert page.evaluate(f"{orphans}.hidden") is True


def test_thumbnails_of_every_format_extraction_reads(tmp_path):
    """Every format extract decodes gets a thumbnail (PNG ones were placeholders: the report opened
    files with its own list of Pillow formats, which failed on anything not JPEG), upright by EXIF."""
    from pipeline.audit.report import _thumbnail

    arr = np.zeros((60, 90, 3), np.uint8)
    arr[:, :45, 0] = 220  # red left half
    for fmt, name in (("PNG", "a.png"), ("WEBP", "a.webp"), ("BMP", "a.bmp"), ("GIF", "a.gif"), ("TIFF", "a.tif"),
                      ("JPEG", "a.jpg")):
        Image.fromarray(arr).save(tmp_path / name, fmt)
        uri = _thumbnail(tmp_path / name)
        assert uri, name
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
            assert im.size == (90, 60), name
            assert np.asarray(im.convert("RGB"))[30, 10, 0] > 150 > np.asarray(im.convert("RGB"))[30, 80, 0], name
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(arr).save(tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(base64.b64decode(_thumbnail(tmp_path / "rot.jpg").split(",", 1)[1]))) as im:
        assert im.size == (60, 90)
    assert _thumbnail(tmp_path / "nothing.png") is None


def test_built_in_digits_have_thumbnails(tmp_path):
    """The README's default data: every thumbnail was a grey box naming builtin:digits/0832."""
    from pipeline.data.sources import builtin_image

    issue = {"path": "builtin:digits/0832", "split": "train", "given": "3", "suggested": "8", "score": 0.9}
    page = write_report({"data": "builtin:digits", "label_issues": [issue]}, tmp_path / "d.html", builtin_image).read_text()
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 1 and "thumb missing" not in page
    assert builtin_image("builtin:digits/99999") is None and builtin_image("a.jpg") is None
    assert builtin_image("builtin:digits/0832").shape == (8, 8, 3)
