"""Which labelled rows a member trains and validates on: a seeded sample, cross-validation folds, the full data."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from runtime.data import InputError, labels_of, read_rows
from runtime.labels import LabelSpace, fit_label_space

from .dataset import clean
from .errors import MapbuildError


def load_labelled(path: str, sample: int | None = None, seed: int = 42) -> pd.DataFrame:
    """The labelled rows of `path`; with `sample`, that many drawn stratified by label (seeded), in file order."""
    try:
        df = read_rows(path, labelled=True)
    except InputError as e:
        raise MapbuildError(str(e)) from None
    if not sample or sample >= len(df):
        return df
    # Every label keeps its share, rounded, and at least one row: the file is sorted by question, a head() is not.
    share = labels_of(df).map(labels_of(df).value_counts(normalize=True))
    keep = df.assign(_r=np.random.default_rng(seed).random(len(df))).groupby(labels_of(df), group_keys=False)
    picked = keep.apply(lambda g: g.nsmallest(max(1, round(sample * share[g.index[0]])), "_r"))
    return df.loc[sorted(picked.index)].reset_index(drop=True)


def assign_folds(df: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Fold of each row: stratified by label, with identical inputs kept in one fold so none leak."""
    key = df["QuestionId"] + "\x1f" + df["MC_Answer"] + "\x1f" + df["StudentExplanation"]
    groups = pd.DataFrame({"key": key, "label": labels_of(df)}).drop_duplicates("key")
    groups = groups.sample(frac=1.0, random_state=seed).sort_values("label", kind="stable")
    fold_of = dict(zip(groups["key"], np.arange(len(groups)) % k))
    return key.map(fold_of).to_numpy()


class FoldSplit(NamedTuple):
    rows: pd.DataFrame  # every labelled row
    train: pd.DataFrame  # the training folds, cleaned
    valid: pd.DataFrame  # the held-out fold, as the test set would have it; empty for a full refit
    labels: list[str]  # the sorted label list: a model's head order
    space: LabelSpace  # fitted on the training folds alone: validation sees only what training saw
    cleaning: dict  # what cleaning changed, for metrics.json


def split_fold(data: str, sample: int | None, folds: int, fold: int | None, seed: int, dedupe: bool, relabel: bool = False) -> FoldSplit:
    """The rows every member trains and validates on: the same held-out fold for the same data, folds and seed, so
    an ensemble's members share their out-of-fold rows. `fold=None` trains on every row (the full refit)."""
    df = load_labelled(data, sample, seed)
    held_out = assign_folds(df, folds, seed) == fold if fold is not None else np.zeros(len(df), dtype=bool)
    tr, va = df[~held_out], df[held_out]
    labels = sorted(labels_of(df).unique())
    space = fit_label_space(tr, labels)
    tr, cleaning = clean(tr, space, dedupe=dedupe, relabel_rows=relabel)
    return FoldSplit(df, tr, va, labels, space, cleaning)
