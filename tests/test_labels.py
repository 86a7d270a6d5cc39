from collections import Counter

import numpy as np
import pandas as pd
import pytest

from runtime.data import labels_of, read_rows
from runtime.labels import LabelSpace, fit_label_space, top3
from runtime.metrics import map_at_3

from .conftest import SAMPLE_TRAIN


def rows(*items: tuple[str, str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"row_id": str(i), "QuestionId": q, "QuestionText": "?", "MC_Answer": a, "StudentExplanation": "x", "Category": c, "Misconception": m}
         for i, (q, a, c, m) in enumerate(items)]
    )


TRAIN = rows(
    ("1", "A", "True_Correct", "NA"),
    ("1", "A", "True_Neither", "NA"),
    ("1", "B", "True_Correct", "NA"),  # a mislabelled row: A still wins the majority among True_ rows
    ("1", "B", "False_Misconception", "Swap"),
    ("1", "C", "False_Neither", "NA"),
    ("2", "X", "True_Correct", "NA"),
    ("2", "Y", "False_Misconception", "Flip"),
    ("2", "Y", "False_Misconception", "Swap"),
)


def test_correct_answer_is_the_majority_among_true_rows():
    space = fit_label_space(TRAIN)
    assert space.correct == {"1": "A", "2": "X"}
    assert space.misconceptions == {"1": ["Swap"], "2": ["Flip", "Swap"]}


def test_candidate_mask_follows_correctness_and_question():
    space = fit_label_space(TRAIN)
    test = rows(("1", "A", "", ""), ("1", "C", "", ""), ("2", "Y", "", ""), ("9", "A", "", ""), ("1", "Z", "", ""))
    mask = space.candidate_mask(test)
    kept = [sorted(np.array(space.labels)[m]) for m in mask]
    assert kept[0] == ["True_Correct:NA", "True_Neither:NA"]
    assert kept[1] == ["False_Misconception:Swap", "False_Neither:NA"]
    assert kept[2] == ["False_Misconception:Flip", "False_Misconception:Swap", "False_Neither:NA"]
    assert mask[3].all() and mask[4].all()  # unseen question, unseen answer: the whole label space


def test_top3_puts_candidates_first_and_fills_short_lists():
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    mask = np.array([[False, False, True, True], [True, True, True, True]])
    assert top3(probs, mask).tolist() == [[2, 3, 0], [3, 2, 1]]


@pytest.mark.parametrize("votes", [1, 3, 5, 20])
def test_top3_keeps_candidates_first_whatever_the_scale_of_the_scores(votes):
    """Ensemble selection scores summed votes: a candidate at 1.0 per vote must still beat a masked label at 0.9."""
    probs = votes * np.array([[0.9, 0.0, 0.1, 0.0]])  # the masked label 0 leads every vote
    mask = np.array([[False, True, True, True]])
    truth_first = top3(probs, mask)[0].tolist()
    assert truth_first[0] == 2 and 0 not in truth_first  # three candidates: the masked label never shows


def test_map_at_3_by_hand():
    assert map_at_3(["a", "b", "c", "d"], [["a", "x", "y"], ["x", "b", "y"], ["x", "y", "c"], ["x", "y", "z"]]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    with pytest.raises(ValueError):
        map_at_3(["a"], [])


def test_label_space_round_trips_through_json():
    space = fit_label_space(TRAIN)
    assert LabelSpace.from_json(space.to_json()) == space
    assert sum(space.counts) == len(TRAIN)


def test_sample_data_keeps_true_label_in_candidates():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = fit_label_space(df)
    idx = labels_of(df).map(space.labels.index).to_numpy()
    covered = space.candidate_mask(df)[np.arange(len(df)), idx]
    assert df.loc[~covered, "row_id"].tolist() == ["281"]  # the sample's one planted True_ label on a wrong answer


def test_shared_data_correctness_agrees_with_labels(shared_train):
    df = read_rows(shared_train, labelled=True)
    space = fit_label_space(df)
    # Independent count: majority answer per question among True_ rows, by plain counting.
    truth = {}
    for q, g in df[df["Category"].str.startswith("True_")].groupby("QuestionId"):
        truth[q] = Counter(g["MC_Answer"]).most_common(1)[0][0]
    assert space.correct == truth
    disagree = [(q, c) for q, a, c in zip(df["QuestionId"], df["MC_Answer"], df["Category"]) if (a == truth[q]) != c.startswith("True_")]
    idx = labels_of(df).map(space.labels.index).to_numpy()
    covered = space.candidate_mask(df)[np.arange(len(df)), idx]
    assert (~covered).sum() >= len(disagree)
    assert len(disagree) / len(df) < 0.001
    assert 2 <= min(len(m) for m in space.misconceptions.values()) <= max(len(m) for m in space.misconceptions.values()) <= 4
