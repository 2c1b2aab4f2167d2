"""CSV text the tool writes for people: fields quoted where they must be, and, in files meant for a
spreadsheet (the audit's findings, predictions), text that a spreadsheet would run as a formula made
inert. A class folder or file named `=HYPERLINK(...)` or `-2+3|cmd...` is the user's data, not theirs
to run (CWE-1236, OWASP "CSV injection"); manifests the tool reads back (cleaned.csv) stay verbatim."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what Excel, LibreOffice and Sheets read as a formula


def formula_safe(value: Any) -> Any:
    """`value`, or for text that a spreadsheet would evaluate, the text after an apostrophe (which a
    spreadsheet shows as text). Numbers, and text that reads as a number ("-1", "+0.5": plain values to a
    spreadsheet, and common class names), pass unchanged."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_field(value: Any) -> str:
    """One CSV field: quoted (quotes doubled) where it holds a comma, a quote or a line break. Python's
    csv module quotes a lone carriage return only from 3.11.9/3.12.3 on; this does on every version, as
    the report's review does when it builds the same lines (`audit.review.SCRIPT`)."""
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def csv_text(rows: list[Mapping[str, Any]] | list[tuple], columns: tuple[str, ...], spreadsheet: bool = False) -> str:
    """A header line of `columns`, then one line per row (a mapping by column, or values in order);
    `spreadsheet`: every field through `formula_safe` (for files people open, not files the tool reads)."""
    lines = [columns, *([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row for row in rows)]
    return "".join(csv_line(line, spreadsheet) for line in lines)


def csv_line(cells: Sequence[Any], spreadsheet: bool = False) -> str:
    """One CSV line of `cells`, ending in "\n" (`csv_text`'s lines; for files written a line at a time);
    `spreadsheet`: every field through `formula_safe`."""
    return ",".join(csv_field(formula_safe(v)) if spreadsheet else csv_field(v) for v in cells) + "\n"
