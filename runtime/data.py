"""Reading competition CSVs and the input contract."""

from __future__ import annotations

import os

import pandas as pd

TEST_COLUMNS = ("row_id", "QuestionId", "QuestionText", "MC_Answer", "StudentExplanation")
LABEL_COLUMNS = ("Category", "Misconception")
TEXT_COLUMNS = ("QuestionId", "QuestionText", "MC_Answer", "StudentExplanation")


class InputError(ValueError):
    """An input file the runtime cannot use; the message is one line naming the file and the fix."""


def read_rows(path: str | os.PathLike, labelled: bool = False) -> pd.DataFrame:
    """Read a MAP CSV as strings; "NA" stays a label, and missing text becomes ""."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    required = TEST_COLUMNS + (LABEL_COLUMNS if labelled else ())
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column {', '.join(missing)}; expected {', '.join(required)}")
    for c in TEXT_COLUMNS:
        df[c] = df[c].str.strip()
    return df.reset_index(drop=True)


def has_labels(df: pd.DataFrame) -> bool:
    return all(c in df.columns for c in LABEL_COLUMNS) and bool((df["Category"] != "").all())


def labels_of(df: pd.DataFrame) -> pd.Series:
    """The `Category:Misconception` label of each row."""
    return df["Category"] + ":" + df["Misconception"]


def duplicate_row_ids(df: pd.DataFrame) -> list[str]:
    return sorted(df.loc[df["row_id"].duplicated(), "row_id"].unique().tolist())
