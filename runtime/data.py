"""Reading competition CSVs and the input contract: every record exactly as the file holds it, or a one-line error."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

import pandas as pd

from .errors import InputError

TEST_COLUMNS = ("row_id", "QuestionId", "QuestionText", "MC_Answer", "StudentExplanation")
LABEL_COLUMNS = ("Category", "Misconception")
TEXT_COLUMNS = ("QuestionId", "QuestionText", "MC_Answer", "StudentExplanation")
MAX_TEXT = 20_000  # characters kept of one field: students write far less, and a 50 MB field must not sink a member
INTEGER = re.compile(r"\+?0*(\d+)(?:\.0*)?")  # 31772, 31772.0, +031772: one question id
log = logging.getLogger("mapbuild")



def records(path: Path) -> list[list[str]]:
    """The file's CSV records, blank lines dropped. Strict quoting: an unclosed quote or text after a closing one
    is an error, not rows silently merged."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass the CSV file itself")
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return [r for r in reader if r]
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV at line {reader.line_num} ({e}); check its quotes") from None


def read_rows(path: str | os.PathLike, labelled: bool = False) -> pd.DataFrame:
    """Read a MAP CSV as strings, every record with exactly the header's fields; "NA" stays a label, question ids
    that are integers in another spelling become plain integers, and text fields are cut at MAX_TEXT characters."""
    path = Path(path)
    found = records(path)
    if not found:
        raise InputError(f"{path}: empty file; expected a header {', '.join(TEST_COLUMNS)} and rows")
    header, rows = found[0], found[1:]
    for n, r in enumerate(rows, start=2):
        if len(r) != len(header):
            raise InputError(f"{path}: record {n} (row_id {r[0]!r}) has {len(r)} fields, the header {len(header)}; fix that row or its quotes")
    required = TEST_COLUMNS + (LABEL_COLUMNS if labelled else ())
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{path}: missing column {', '.join(missing)}; expected {', '.join(required)}")
    questions = {question_id(r[header.index("QuestionId")]) for r in rows}
    for n, r in enumerate(rows, start=2):
        if swallowed(r, header, questions):
            raise InputError(f"{path}: record {n} (row_id {r[header.index('row_id')]!r}) holds another row inside a quoted field; fix its quotes")
    df = pd.DataFrame(rows, columns=header, dtype=str)
    for c in TEXT_COLUMNS:
        df[c] = df[c].str.strip()
    df["QuestionId"] = df["QuestionId"].map(question_id)
    long = df[list(TEXT_COLUMNS)].apply(lambda col: col.str.len() > MAX_TEXT).any(axis=1)
    if long.any():
        log.warning("%s: %d row(s) with a text field over %d characters, cut to that length", path, int(long.sum()), MAX_TEXT)
        for c in TEXT_COLUMNS:
            df[c] = df[c].str.slice(0, MAX_TEXT)
    return df


def question_id(text: str) -> str:
    """31772 for 31772.0, +031772 or " 31772 ": ids that are integers in another spelling."""
    m = INTEGER.fullmatch(text.strip())
    return m.group(1) if m else text.strip()


def swallowed(record: list[str], header: list[str], questions: set[str]) -> bool:
    """Whether a field holds, past a line break, a whole row of the file (the header's fields or more, one of its question
    ids): an opening quote that found its closing one only at the end of a later row. No multi-line answer in
    train.csv reads as one."""
    at = header.index("QuestionId")
    for field in record:
        for line in field.splitlines()[1:]:
            f = next(csv.reader([line]), [])
            if len(f) >= len(header) and question_id(f[at]) in questions:
                return True
    return False


def has_labels(df: pd.DataFrame) -> bool:
    return all(c in df.columns for c in LABEL_COLUMNS) and bool((df["Category"] != "").all())


def labels_of(df: pd.DataFrame) -> pd.Series:
    """The `Category:Misconception` label of each row."""
    return df["Category"] + ":" + df["Misconception"]


def duplicate_row_ids(df: pd.DataFrame) -> list[str]:
    return sorted(df.loc[df["row_id"].duplicated(), "row_id"].unique().tolist())
