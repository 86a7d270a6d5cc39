"""Training-data checks and cleaning: correctness against labels, exact duplicates, conflicting labels."""

from __future__ import annotations

import pandas as pd

from runtime.data import TEXT_COLUMNS, labels_of
from runtime.labels import LabelSpace

INPUT = list(TEXT_COLUMNS)
LABELLED = INPUT + ["Category", "Misconception"]


def with_correctness(df: pd.DataFrame, space: LabelSpace) -> pd.DataFrame:
    """`is_correct` from the correctness table, and `agrees` where the label's True_/False_ prefix matches it."""
    out = df.copy()
    out["is_correct"] = space.is_correct(df)
    prefix = df["Category"].str.startswith("True_")
    out["agrees"] = [None if c is None else c == p for c, p in zip(out["is_correct"], prefix)]
    return out


def disagreeing(df: pd.DataFrame, space: LabelSpace) -> pd.DataFrame:
    """Rows whose True_/False_ prefix contradicts their answer's correctness."""
    checked = with_correctness(df, space)
    return checked[checked["agrees"] == False]  # noqa: E712 (None means unknown, not disagreeing)


def exact_duplicates(df: pd.DataFrame) -> pd.Series:
    """True for every copy after the first of a row with the same input and label (row_id aside)."""
    return df.duplicated(LABELLED)


def conflicts(df: pd.DataFrame) -> pd.DataFrame:
    """Identical inputs given different labels: one row per input with its labels and their counts."""
    labelled = df.assign(label=labels_of(df))
    per_input = labelled.groupby(INPUT, sort=False)["label"]
    clash = labelled[per_input.transform("nunique") > 1]
    out = clash.groupby(INPUT, sort=False)["label"].agg(lambda s: {k: int(v) for k, v in s.value_counts().items()}).reset_index(name="labels")
    # astype: with no conflict at all the frame is empty, and an empty object column sums to "", not 0
    return out.assign(rows=out["labels"].map(lambda d: sum(d.values())).astype(int))


def relabel(df: pd.DataFrame, space: LabelSpace) -> tuple[pd.DataFrame, int]:
    """Labels made consistent, and how many rows changed: conflicting duplicates take their majority label (ties:
    the alphabetically first), then a prefix that contradicts correctness is flipped where the flipped label exists."""
    out = df.copy()
    before = labels_of(df)
    counts = out.assign(label=before).groupby(INPUT + ["label"], sort=False).size().reset_index(name="n")
    best = counts.sort_values(["n", "label"], ascending=[False, True]).drop_duplicates(INPUT)
    majority = out[INPUT].merge(best, on=INPUT, how="left")["label"].set_axis(out.index)
    out["Category"], out["Misconception"] = majority.str.split(":", n=1).str[0], majority.str.split(":", n=1).str[1]
    known = set(space.labels)
    for i in disagreeing(out, space).index:
        category = out.at[i, "Category"]
        flipped = ("False_" if category.startswith("True_") else "True_") + category.split("_", 1)[1]
        if f"{flipped}:{out.at[i, 'Misconception']}" in known:
            out.at[i, "Category"] = flipped
    return out, int((labels_of(out) != before).sum())


def clean(df: pd.DataFrame, space: LabelSpace, dedupe: bool = True, relabel_rows: bool = False) -> tuple[pd.DataFrame, dict]:
    """Training rows after the chosen cleaning, and what it did (for metrics.json)."""
    changed = 0
    if relabel_rows:
        df, changed = relabel(df, space)
    copies = exact_duplicates(df) if dedupe else pd.Series(False, index=df.index)
    return df[~copies], {"duplicates_dropped": int(copies.sum()), "rows_relabelled": changed}
