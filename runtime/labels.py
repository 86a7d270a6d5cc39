"""The label space: ordered labels, answer correctness and per-question candidate masks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .data import labels_of

NA = "NA"


@dataclass
class LabelSpace:
    """Everything the kernel needs to know about labels, fitted on training rows and stored as JSON."""

    labels: list[str]
    correct: dict[str, str]  # QuestionId -> correct MC_Answer
    answers: dict[str, list[str]]  # QuestionId -> answers seen in training
    misconceptions: dict[str, list[str]]  # QuestionId -> misconceptions seen in training
    counts: list[int]  # training frequency of each label: the prior when no model is left

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LabelSpace":
        return cls(**{k: d[k] for k in ("labels", "correct", "answers", "misconceptions", "counts")})

    def prior(self, rows: int) -> np.ndarray:
        """Training label frequencies (add-one) for every row: the floor a model must beat, and the kernel's answer
        when no model is left; the candidate mask makes them per question and correctness."""
        p = np.asarray(self.counts, dtype=np.float32) + 1.0
        return np.tile(p / p.sum(), (rows, 1))

    def is_correct(self, df: pd.DataFrame) -> pd.Series:
        """True/False where the question's correct answer is known, None elsewhere."""
        correct = df["QuestionId"].map(self.correct)
        return pd.Series(
            [None if c is None or pd.isna(c) else a == c for a, c in zip(df["MC_Answer"], correct)],
            index=df.index,
            dtype=object,
        )

    def candidate_mask(self, df: pd.DataFrame) -> np.ndarray:
        """(rows, labels) bool: labels whose prefix matches correctness and misconception fits the question.

        A row whose question or answer never appeared in training keeps the whole label space.
        """
        prefix = np.array([lab.split("_", 1)[0] for lab in self.labels])
        misc = np.array([lab.split(":", 1)[1] for lab in self.labels])
        mask = np.ones((len(df), len(self.labels)), dtype=bool)
        for i, (q, a) in enumerate(zip(df["QuestionId"], df["MC_Answer"])):
            if q not in self.correct or a not in self.answers[q]:
                continue
            ok_prefix = prefix == ("True" if a == self.correct[q] else "False")
            ok_misc = (misc == NA) | np.isin(misc, self.misconceptions[q])
            mask[i] = ok_prefix & ok_misc
        return mask


def fit_label_space(train: pd.DataFrame, labels: list[str] | None = None) -> LabelSpace:
    """Fit the label space on labelled rows; `labels` fixes the order (a model's head) when given."""
    y = labels_of(train)
    labels = labels or sorted(y.unique())
    true_rows = train[train["Category"].str.startswith("True_")]
    # Most frequent answer among True_ rows; ties go to the alphabetically first answer for determinism.
    counts = true_rows.groupby(["QuestionId", "MC_Answer"]).size().reset_index(name="n")
    counts = counts.sort_values(["QuestionId", "n", "MC_Answer"], ascending=[True, False, True])
    correct = counts.drop_duplicates("QuestionId").set_index("QuestionId")["MC_Answer"].to_dict()
    answers = train.groupby("QuestionId")["MC_Answer"].agg(lambda s: sorted(s.unique())).to_dict()
    miscs = train[train["Misconception"] != NA].groupby("QuestionId")["Misconception"]
    misconceptions = {q: sorted(m.unique()) for q, m in miscs}
    freq = y.value_counts()
    return LabelSpace(
        labels=list(labels),
        correct=correct,
        answers={q: answers[q] for q in correct},
        misconceptions={q: misconceptions.get(q, []) for q in correct},
        counts=[int(freq.get(lab, 0)) for lab in labels],
    )


def top3(probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices of the 3 best labels per row, candidates first; other labels only fill a short candidate list.
    Scores of any scale (probabilities, summed ensemble votes, ranks) keep that order."""
    order = np.lexsort((-probs, ~mask), axis=1)  # by candidate first, then by score; ties keep label order
    return order[:, :3]
