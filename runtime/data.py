"""Reading competition CSVs and the input contract: every record exactly as the file holds it, or a one-line error."""

from __future__ import annotations

import codecs
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
LABEL = re.compile(r"[^\s:]+:[^\s:]+")  # Category:Misconception, as the submission writes it: space-separated
log = logging.getLogger("mapbuild")



BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decoded(path: Path, data: bytes) -> str:
    """The file's text in the encoding its bytes declare: UTF-16 or UTF-8 by their byte-order mark, else UTF-8.
    Never a guess and never a replaced character: one cp1252 byte read as U+FFFD changes what a model sees."""
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(encoding, errors="replace").count("\n") + 1
        raise InputError(
            f"{path}: line {line} is not valid {encoding.removesuffix('-sig').upper()} (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None


def records(path: Path) -> list[list[str]]:
    """The file's CSV records, blank lines dropped. Strict quoting: an unclosed quote or text after a closing one
    is an error, not rows silently merged."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass the CSV file itself")
    try:
        text = decoded(path, path.read_bytes())
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
    that are integers in another spelling become plain integers, and text fields are cut at MAX_TEXT characters.
    Records of blank fields only are dropped as blank lines are; a repeated header, a merged row or a row without
    row_id is an error."""
    path = Path(path)
    found = records(path)
    if not found:
        raise InputError(f"{path}: empty file; expected a header {', '.join(TEST_COLUMNS)} and rows")
    header = [h.lstrip("\ufeff") for h in found[0]]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise InputError(f"{path}: column {', '.join(map(repr, twice))} appears more than once in the header; keep one")
    required = TEST_COLUMNS + (LABEL_COLUMNS if labelled else ())
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{path}: missing column {', '.join(missing)}; expected {', '.join(required)}")
    numbered = [(n, r) for n, r in enumerate(found[1:], start=2) if any(f.strip() for f in r)]
    at_id, at_q = header.index("row_id"), header.index("QuestionId")
    for n, r in numbered:
        if len(r) != len(header):
            raise InputError(f"{path}: record {n} (row_id {r[0]!r}) has {len(r)} fields, the header {len(header)}; fix that row or its quotes")
        if sum(f.strip().lstrip("\ufeff") == h for f, h in zip(r, header)) >= len(header) - 1:  # one may carry a mangled BOM
            raise InputError(f"{path}: record {n} repeats the header (two files joined?); remove it")
        if not r[at_id].strip():
            raise InputError(f"{path}: record {n} has no row_id; give every row one")
    rows = [r for _, r in numbered]
    questions = {question_id(r[at_q]) for r in rows}
    for n, r in numbered:
        if swallowed(r, header, questions):
            raise InputError(f"{path}: record {n} (row_id {r[at_id]!r}) holds another row inside a quoted field; fix its quotes")
    df = pd.DataFrame(rows, columns=header, dtype=str)
    check_labels(path, df, labelled)
    for c in TEXT_COLUMNS:
        df[c] = df[c].str.strip()
    df["QuestionId"] = df["QuestionId"].map(question_id)
    long = df[list(TEXT_COLUMNS)].apply(lambda col: col.str.len() > MAX_TEXT).any(axis=1)
    if long.any():
        log.warning("%s: %d row(s) with a text field over %d characters, cut to that length", path, int(long.sum()), MAX_TEXT)
        for c in TEXT_COLUMNS:
            df[c] = df[c].str.slice(0, MAX_TEXT)
    return df


def check_labels(path: Path, df: pd.DataFrame, labelled: bool) -> None:
    """Every row labelled, or (a file that need not be) none. An empty Misconception is almost always the label NA
    lost in a pandas round trip: `pd.read_csv` reads the string NA as NaN and `to_csv` writes NaN back empty, and
    "True_Correct:" taken as a label trains and scores a label no row has."""
    if not all(c in df.columns for c in LABEL_COLUMNS):
        return
    empty = (df["Category"].str.strip() == "") | (df["Misconception"].str.strip() == "")
    if not empty.any():
        bad = ~labels_of(df).str.fullmatch(LABEL)
        if bad.any():  # the kernel refuses such a label; found here, before hours of training on it
            first = int(bad.to_numpy().argmax())
            raise InputError(
                f"{path}: {int(bad.sum())} rows have a label that is not Category:Misconception without spaces or a "
                f"second ':' (first: row_id {df['row_id'].iloc[first]!r}, {labels_of(df).iloc[first]!r}); a submission "
                "separates labels by spaces: fix those Category or Misconception values"
            )
        return
    if not labelled and empty.all():
        return
    first = int(empty.to_numpy().argmax())
    blank = "Misconception" if df["Category"].iloc[first].strip() else "Category"
    raise InputError(
        f"{path}: {int(empty.sum())} of {len(df)} rows have an empty Category or Misconception (first: row_id "
        f"{df['row_id'].iloc[first]!r}, empty {blank}); an empty Misconception is the label NA after pandas: read the "
        "file with pd.read_csv(..., keep_default_na=False) before writing it again"
    )


def question_id(text: str) -> str:
    """31772 for 31772.0, +031772 or " 31772 ": ids that are integers in another spelling."""
    m = INTEGER.fullmatch(text.strip())
    return m.group(1) if m else text.strip()


def swallowed(record: list[str], header: list[str], questions: set[str]) -> bool:
    """Whether a quote that opened in one row found its closing one only in a later row: a one-line field (row_id,
    QuestionId, MC_Answer) holds a line break, or a field holds, past a line break, the start of a row of the file
    (a row_id, then one of its question ids where the header has them). No multi-line answer in train.csv reads
    as one."""
    at = header.index("QuestionId")
    if any("\n" in record[header.index(c)] or "\r" in record[header.index(c)] for c in ("row_id", "QuestionId", "MC_Answer")):
        return True
    for field in record:
        for line in field.splitlines()[1:]:
            f = next(csv.reader([line]), [])
            if len(f) > at and question_id(f[at]) in questions:
                return True
    return False


def has_labels(df: pd.DataFrame) -> bool:
    return all(c in df.columns for c in LABEL_COLUMNS) and bool((df["Category"] != "").all())


def labels_of(df: pd.DataFrame) -> pd.Series:
    """The `Category:Misconception` label of each row."""
    return df["Category"] + ":" + df["Misconception"]


def duplicate_row_ids(df: pd.DataFrame) -> list[str]:
    return sorted(df.loc[df["row_id"].duplicated(), "row_id"].unique().tolist())
