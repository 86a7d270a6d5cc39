import numpy as np
import pandas as pd

from builder.folds import FoldSplit, across_questions, check_rows


def sorted_by_question(counts: dict[str, int]) -> pd.DataFrame:
    """Rows sorted by question, as train.csv is: a head() is the first question's alone."""
    return pd.DataFrame({"QuestionId": np.repeat(list(counts), list(counts.values())), "row_id": np.arange(sum(counts.values()))})


def test_a_sample_across_questions_keeps_every_questions_share_seeded_and_in_order():
    rows = sorted_by_question({"a": 700, "b": 200, "c": 90, "d": 9, "e": 1})
    picked = across_questions(rows, 100, seed=1)
    assert picked["QuestionId"].value_counts().to_dict() == {"a": 69, "b": 20, "c": 9, "d": 1, "e": 1}
    assert picked["row_id"].is_monotonic_increasing and picked.equals(across_questions(rows, 100, seed=1))
    assert not picked.equals(across_questions(rows, 100, seed=2))
    assert across_questions(rows, 3, seed=1)["QuestionId"].tolist() == ["a", "a", "b"]  # fewer rows than questions: shares alone
    assert across_questions(rows, 1000, seed=1) is rows


def test_a_full_refit_measures_its_pace_and_drift_on_2000_rows_of_every_question():
    train = sorted_by_question({"a": 3000, "b": 1000, "c": 500, "d": 400, "e": 100})
    checked = check_rows(FoldSplit(train, train, train.iloc[:0], [], None, {}), seed=42)
    assert len(checked) == 2000 and set(checked["QuestionId"]) == set("abcde")
    valid = train.iloc[::7]
    assert check_rows(FoldSplit(train, train, valid, [], None, {}), seed=42) is valid  # a fold is scored whole
