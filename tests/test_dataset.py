"""Training-data checks, each against an independent count."""

from collections import Counter
from dataclasses import asdict

import pandas as pd
import pytest

from builder.dataset import clean, conflicts, disagreeing, exact_duplicates, relabel
from builder.folds import FOLD_SCHEMES, assign_folds, load_labelled, scheme_of
from builder.train import TrainConfig
from runtime.data import labels_of
from runtime.errors import MapbuildError
from runtime.labels import fit_label_space

from .conftest import SAMPLE_TRAIN

FIELDS = ("QuestionId", "QuestionText", "MC_Answer", "StudentExplanation")


def correct_by_hand(df) -> dict[str, str]:
    """Each question's most frequent answer among its True_ rows (ties: alphabetical), by plain counting."""
    true_answers: dict[str, Counter] = {}
    for q, a, cat in zip(df["QuestionId"], df["MC_Answer"], df["Category"]):
        if cat.startswith("True_"):
            true_answers.setdefault(q, Counter())[a] += 1
    return {q: min(c, key=lambda a: (-c[a], a)) for q, c in true_answers.items()}


def by_hand(df):
    """Duplicate copies, conflicting inputs and rows disagreeing with correctness, counted with plain Python."""
    rows = [tuple(r) for r in df[list(FIELDS) + ["Category", "Misconception"]].itertuples(index=False)]
    copies = sum(n - 1 for n in Counter(rows).values())
    labels_per_input: dict[tuple, set] = {}
    for r in rows:
        labels_per_input.setdefault(r[:4], set()).add(r[4:])
    clashing = sum(len(s) > 1 for s in labels_per_input.values())
    correct = correct_by_hand(df)
    bad = [q for q, a, cat in zip(df["QuestionId"], df["MC_Answer"], df["Category"]) if (a == correct[q]) != cat.startswith("True_")]
    return copies, clashing, bad


def check_against_hand_counts(df):
    space = fit_label_space(df)
    copies, clashing, bad = by_hand(df)
    assert exact_duplicates(df).sum() == copies
    assert len(conflicts(df)) == clashing
    assert sorted(disagreeing(df, space)["QuestionId"]) == sorted(bad)
    return copies, clashing, bad


def test_sample_counts_match_hand_counts():
    copies, clashing, bad = check_against_hand_counts(load_labelled(str(SAMPLE_TRAIN)))
    assert copies > 0 and clashing > 0 and bad  # the sample plants each case


def test_shared_counts_match_hand_counts(shared_train):
    copies, clashing, bad = check_against_hand_counts(load_labelled(str(shared_train)))
    # 736 exact duplicates and 18 disagreeing rows in the full 36,696; this subset keeps fewer of each.
    assert 0 < copies <= 736 and 0 < len(bad) <= 18 and set(bad) == {"31778"}


@pytest.mark.parametrize("path", ["sample", "shared"])
def test_relabel_leaves_no_contradiction(path, request):
    csv = SAMPLE_TRAIN if path == "sample" else request.getfixturevalue("shared_train")
    df = load_labelled(str(csv))
    space = fit_label_space(df)
    fixed, changed = relabel(df, space)
    assert changed > 0 and len(fixed) == len(df)
    assert len(disagreeing(fixed, space)) == 0 and len(conflicts(fixed)) == 0
    assert set(fixed["Category"] + ":" + fixed["Misconception"]) <= set(space.labels)


def test_cleaning_is_dedupe_only_by_default():
    df = load_labelled(str(SAMPLE_TRAIN))
    space = fit_label_space(df)
    cfg = TrainConfig(data=str(SAMPLE_TRAIN))
    out, info = clean(df, space, dedupe=cfg.dedupe, relabel_rows=cfg.relabel)
    assert info == {"duplicates_dropped": by_hand(df)[0], "rows_relabelled": 0}
    assert not exact_duplicates(out).any() and len(disagreeing(out, space)) == len(by_hand(df)[2])


@pytest.mark.parametrize("scheme", FOLD_SCHEMES)
def test_folds_keep_identical_inputs_together_and_stratify(scheme):
    df = load_labelled(str(SAMPLE_TRAIN))
    fold = assign_folds(df, 5, 0, scheme)
    key = df[list(FIELDS)].agg("\x1f".join, axis=1)
    assert (df.assign(fold=fold, key=key).groupby("key")["fold"].nunique() == 1).all()
    sizes = Counter(fold)
    assert max(sizes.values()) - min(sizes.values()) <= 0.1 * len(df)
    assert (assign_folds(df, 5, 0, scheme) == fold).all() and not (assign_folds(df, 5, 1, scheme) == fold).all()  # seeded


def test_stratified_group_folds_balance_every_label_to_one_row_on_the_shared_data(shared_train):
    df = load_labelled(str(shared_train))
    spread = {s: pd.crosstab(labels_of(df), assign_folds(df, 5, 42, s)).agg(lambda c: c.max() - c.min(), axis=1).max() for s in FOLD_SCHEMES}
    assert spread["stratified-group"] <= 1 < spread["round-robin"]  # measured: 1 against 23 (True_Correct:NA)


def test_a_folder_recorded_before_fold_scheme_keeps_its_round_robin_folds():
    before = {k: v for k, v in asdict(TrainConfig(data=str(SAMPLE_TRAIN))).items() if k != "fold_scheme"}
    assert TrainConfig.recorded(before).fold_scheme == "round-robin" and scheme_of(before) == "round-robin"
    assert not TrainConfig(data=str(SAMPLE_TRAIN)).matches(before)  # today's default splits other rows
    assert TrainConfig(data=str(SAMPLE_TRAIN), fold_scheme="round-robin").matches(before)
    with pytest.raises(MapbuildError, match="--fold-scheme must be one of stratified-group, round-robin"):
        TrainConfig(data=str(SAMPLE_TRAIN), fold_scheme="kfold")


