"""Which labelled rows a member trains and validates on: a seeded sample, cross-validation folds, the full data."""

from __future__ import annotations

import json
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from runtime.data import labels_of, read_rows
from runtime.labels import LabelSpace, fit_label_space
from runtime.metrics import masked_map3

from .dataset import clean
from .options import check_finite, one_of, require


# How rows are dealt into folds. A stage folder written before `fold_scheme` existed used round-robin: `canonical`
# and `scheme_of` read its absence as that, so its folds stay what they were.
FOLD_SCHEMES = ("stratified-group", "round-robin")
LEGACY_SCHEME = "round-robin"


def scheme_of(config: dict) -> str:
    """The fold scheme a recorded config used."""
    return config.get("fold_scheme", LEGACY_SCHEME)


def absolute(path: str) -> str:
    """Stage folders record absolute paths, so that later stages run from any folder."""
    return str(Path(path).resolve()) if path else path


@dataclass
class SplitConfig:
    """The rows a member trains on, shared by every member kind: members with the same split share their
    out-of-fold rows, and so can be ensembled."""

    data: str = field(metadata={"help": "Labelled train.csv in the competition's format."})
    folds: int = field(default=5, metadata={"help": "Number of cross-validation folds."})
    fold: int = field(default=0, metadata={"help": "The fold held out for validation."})
    full: bool = field(default=False, metadata={"help": "Train on every row (the final refit): no fold held out, no validation."})
    dedupe: bool = field(default=True, metadata={"help": "Train on one copy of rows that are exact duplicates (same input and label)."})
    relabel: bool = field(default=False, metadata={"help": "Fix training labels that contradict the data: the True_/False_ prefix to the answer's correctness, conflicting duplicates to their majority label."})
    sample: int | None = field(default=None, metadata={"help": "Use about N rows, drawn stratified by label with --seed (quick runs)."})
    oof: str | None = field(default=None, metadata={"help": "For a --full refit: its recipe's cross-validation oof.npz, which stands in for it in ensemble selection."})
    seed: int = field(default=42, metadata={"help": "Seed for the folds and the sample (and a transformer's initialisation and shuffling)."})
    fold_scheme: str = field(default="stratified-group", metadata={
        "help": "stratified-group: scikit-learn's StratifiedGroupKFold (each label's rows balanced across folds); round-robin: the scheme before 2026-12-03.",
        "absent": LEGACY_SCHEME,
    })  # fmt: skip

    def __post_init__(self) -> None:
        check_finite(self)  # every config kind runs this: inf and nan are no setting
        require(
            (bool(self.data), "--data: give a labelled train.csv"),
            (self.folds >= 2, f"--folds must be at least 2, got {self.folds}"),
            (0 <= self.fold < self.folds, f"--fold must be in 0..{self.folds - 1}, got {self.fold}"),
            (self.sample is None or self.sample >= 2 * self.folds, f"--sample must be at least 2 x folds, got {self.sample}"),
        )
        one_of(self.fold_scheme, FOLD_SCHEMES, "--fold-scheme")
        self.data, self.oof = absolute(self.data), self.oof and absolute(self.oof)

    @classmethod
    def canonical(cls, recorded: dict) -> dict:
        """A stage folder's recorded config in the one form that `matches` and ensemble recipes compare: an option it
        does not record was added since the folder was written, and took its default then; `epochs = 3` in a TOML and
        `--epochs 3` (3.0) on the command line are one number."""
        defaults = {f.name: f.metadata.get("absent", f.default) for f in fields(cls) if f.default is not MISSING}
        return {k: float(v) if type(v) is int else v for k, v in json.loads(json.dumps(defaults | recorded)).items()}

    def matches(self, recorded: dict) -> bool:
        """Whether a stage folder's recorded config is this one."""
        return self.canonical(recorded) == self.canonical(asdict(self))

    def split(self) -> FoldSplit:
        """This config's rows: its fold held out (none for a full refit), the training rows cleaned."""
        return split_fold(self.data, self.sample, self.folds, None if self.full else self.fold, self.seed, self.dedupe, self.relabel, self.fold_scheme)

    @classmethod
    def recorded(cls, config: dict):
        """The config a stage folder recorded, as it ran: an option it lacks took the value it had then."""
        return cls(**{**{f.name: f.metadata["absent"] for f in fields(cls) if "absent" in f.metadata}, **config})


def load_labelled(path: str, sample: int | None = None, seed: int = 42) -> pd.DataFrame:
    """The labelled rows of `path`; with `sample`, that many drawn stratified by label (seeded), in file order."""
    df = read_rows(path, labelled=True)
    if not sample or sample >= len(df):
        return df
    # Every label keeps its share, rounded, and at least one row: the file is sorted by question, a head() is not.
    share = labels_of(df).map(labels_of(df).value_counts(normalize=True))
    keep = df.assign(_r=np.random.default_rng(seed).random(len(df))).groupby(labels_of(df), group_keys=False)
    picked = keep.apply(lambda g: g.nsmallest(max(1, round(sample * share[g.index[0]])), "_r"))
    return df.loc[sorted(picked.index)].reset_index(drop=True)


def input_key(df: pd.DataFrame) -> pd.Series:
    """What a model sees of a row: rows with one key are the same input."""
    return df["QuestionId"] + "\x1f" + df["MC_Answer"] + "\x1f" + df["StudentExplanation"]


def assign_folds(df: pd.DataFrame, k: int, seed: int, scheme: str = FOLD_SCHEMES[0]) -> np.ndarray:
    """Fold of each row, with identical inputs kept in one fold so none leak, stratified by label: by scikit-learn's
    StratifiedGroupKFold, or (round-robin) by dealing the label-sorted groups in turn."""
    key = input_key(df)
    if scheme == "stratified-group":
        from sklearn.model_selection import StratifiedGroupKFold

        fold = np.zeros(len(df), dtype=np.int64)
        with warnings.catch_warnings():  # "The least populated class in y has only 1 members": true, and expected
            warnings.simplefilter("ignore", UserWarning)
            splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(df, labels_of(df), key)
            for i, (_, held) in enumerate(splits):
                fold[held] = i
        return fold
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


def split_fold(
    data: str, sample: int | None, folds: int, fold: int | None, seed: int, dedupe: bool, relabel: bool = False, scheme: str = FOLD_SCHEMES[0]
) -> FoldSplit:
    """The rows every member trains and validates on: the same held-out fold for the same data, folds and seed, so
    an ensemble's members share their out-of-fold rows. `fold=None` trains on every row (the full refit)."""
    df = load_labelled(data, sample, seed)
    held_out = assign_folds(df, folds, seed, scheme) == fold if fold is not None else np.zeros(len(df), dtype=bool)
    tr, va = df[~held_out], df[held_out]
    labels = sorted(labels_of(df).unique())
    space = fit_label_space(tr, labels)
    tr, cleaning = clean(tr, space, dedupe=dedupe, relabel_rows=relabel)
    return FoldSplit(df, tr, va, labels, space, cleaning)


def across_questions(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n of `rows` (all when they are fewer) drawn seeded and stratified by question, in their order: each question
    keeps its share, rounded by largest remainder, and at least one row while n reaches every question. The data is
    sorted by question, so a head() measures a pace, drift or tokens per row on one or two questions."""
    if n >= len(rows):
        return rows
    _, index = np.unique(rows["QuestionId"].to_numpy(str), return_inverse=True)
    quota = n * np.bincount(index) / len(rows)  # never above a question's rows, as n < len(rows)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    if n >= len(take):  # a question left out takes its row from the one furthest over its share
        for _ in range(int((take == 0).sum())):
            take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
        take[take == 0] = 1
    order = np.random.default_rng(seed).permutation(len(rows))
    rank = pd.Series(index[order]).groupby(index[order]).cumcount().to_numpy()  # a row's place in its question's draw
    return rows.iloc[np.sort(order[rank < take[index[order]]])]


def check_rows(split: FoldSplit, seed: int) -> pd.DataFrame:
    """The rows a member is scored on: its held-out fold or, for a full refit (none held out), 2,000 training rows
    across its questions that measure its speed and drift alone."""
    return split.valid if len(split.valid) else across_questions(split.train, 2000, seed)


def record_validation(folder: Path, probs: np.ndarray, split: FoldSplit, seconds: float) -> dict:
    """A member folder's metrics.json and oof.npz from its probabilities on `check_rows(split)`; the metrics."""
    va = split.valid
    metrics = {**split.cleaning, "rows_train": len(split.train), "rows_valid": len(va), "train_seconds": round(seconds, 1)}
    if len(va):
        metrics.update(validate(probs, va, split.space, unmasked=False))
    np.savez(folder / "oof.npz", row_id=va["row_id"].to_numpy(str), probs=probs[: len(va)].astype(np.float32))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def validate(probs: np.ndarray, rows: pd.DataFrame, space: LabelSpace, unmasked: bool) -> dict:
    """MAP@3 with the kernel's candidate mask; also without it for a model trained over all labels (a model trained
    on candidates alone never learned to rank the others, so that figure would mean nothing)."""
    truth, mask = labels_of(rows), space.candidate_mask(rows)
    scores = {
        "map3": masked_map3(truth, probs, space.labels, mask),
        "map3_prior": masked_map3(truth, space.prior(len(rows)), space.labels, mask),
    }
    if unmasked:
        scores["map3_unmasked"] = masked_map3(truth, probs, space.labels, np.ones_like(mask))
    return scores
