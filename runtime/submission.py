"""Writing and checking submission.csv."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from .errors import BundleError
from .files import atomic_write

COLUMNS = ["row_id", "Category:Misconception"]


def write_submission(path: str | os.PathLike, row_ids: Sequence[str], predictions: Sequence[Sequence[str]]) -> None:
    """Write atomically and only a valid file: a crash, a full disk or an invalid result leaves the previous file or
    none, and a concurrent run's file is never mixed with this one's."""
    df = pd.DataFrame({COLUMNS[0]: list(row_ids), COLUMNS[1]: [" ".join(p) for p in predictions]})
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False)
        problems = check_submission(tmp, row_ids)
        if problems:
            raise BundleError(f"{path}: not written, the predictions are invalid: {problems[0]}")


def check_submission(path: str | os.PathLike, row_ids: Sequence[str]) -> list[str]:
    """Format problems: columns, one row per input row in input order, 3 distinct Category:Misconception labels."""
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(sub.columns) != COLUMNS:
        return [f"columns {list(sub.columns)}, expected {COLUMNS}"]
    problems = []
    if sub[COLUMNS[0]].tolist() != [str(r) for r in row_ids]:
        problems.append("row_id does not list every input row once, in input order")
    for rid, pred in zip(sub[COLUMNS[0]], sub[COLUMNS[1]]):
        labels = pred.split(" ")
        if len(labels) != 3 or len(set(labels)) != 3 or not all(":" in lab for lab in labels):
            problems.append(f"row_id {rid}: {pred!r} is not 3 distinct Category:Misconception labels")
    return problems
