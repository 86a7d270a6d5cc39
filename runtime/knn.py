"""A k-nearest-neighbours member: a sentence encoder embeds the answer and explanation, and the question's most
similar training rows vote for their labels.

The builder embeds the training rows with the same ONNX encoder and this module's `knn_text`, so a row's
neighbours are found in the kernel exactly as at validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# A member's `knn` object in the manifest: each setting's test and what it must be. The builder's flags use them too.
SETTINGS = {
    "k": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
    "power": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 256, "between 0 and 256"),
    "prior_share": (lambda v: isinstance(v, (int, float)) and 0 < v < 1, "between 0 and 1, both excluded"),
}


def knn_text(df: pd.DataFrame) -> list[str]:
    """What is embedded: the chosen answer, then the explanation (the answer separates right from wrong reasoning)."""
    return (df["MC_Answer"] + " | " + df["StudentExplanation"]).tolist()


def bad_setting(knn: dict) -> tuple[str, str] | None:
    """The first setting outside its bounds and why ("0 must be a positive integer"), or None."""
    return next(((name, f"{knn[name]!r} must be {rule}") for name, (ok, rule) in SETTINGS.items() if not ok(knn[name])), None)


def check_settings(knn: object) -> dict:
    """The member's vote settings, or ValueError naming the bad one."""
    if not isinstance(knn, dict) or set(knn) != set(SETTINGS):
        raise ValueError(f"knn settings must be an object with exactly {', '.join(SETTINGS)}")
    if bad := bad_setting(knn):
        raise ValueError(f"knn.{bad[0]} {bad[1]}")
    return knn


def vote(
    query: np.ndarray, questions: np.ndarray, candidates: np.ndarray, table: dict[str, np.ndarray], n_labels: int, k: int, power: float, prior_share: float
) -> np.ndarray:
    """(rows, n_labels) probabilities. Per question, the k most cosine-similar training rows among those whose label
    is a candidate for the row vote for it with weight max(similarity, 0)^power. The shares are mixed with the
    question's training label frequencies (`prior_share` of them), so no label that the mask keeps gets zero.
    A question without training rows gets the uniform row; the candidate mask makes it per question.

    `table`: `emb` (n, d) unit rows, `label` (n,) label indices, `question` (n,) question ids."""
    emb, y, tq = table["emb"].astype(np.float32), table["label"], table["question"]
    out = np.full((len(query), n_labels), 1.0 / n_labels)
    for q in np.unique(questions):
        rows, train = np.flatnonzero(questions == q), np.flatnonzero(tq == q)
        if not len(train):
            continue
        ok = candidates[rows][:, y[train]]
        sim = np.where(ok, query[rows] @ emb[train].T, -np.inf)
        kk = min(k, len(train))
        nn = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        # masked, not left to 0 ** power: at power 0 that is 1, and non-candidates would vote
        w = np.where(np.take_along_axis(ok, nn, 1), np.maximum(np.take_along_axis(sim, nn, 1), 0.0) ** power, 0.0)
        votes = np.zeros((len(rows), n_labels))
        np.add.at(votes, (np.repeat(np.arange(len(rows)), kk), y[train][nn].ravel()), w.ravel())
        prior = np.bincount(y[train], minlength=n_labels) + 1e-3  # a label unseen here still ranks, last
        prior /= prior.sum()
        total = votes.sum(1, keepdims=True)
        share = np.divide(votes, total, out=np.tile(prior, (len(rows), 1)), where=total > 0)
        out[rows] = (1 - prior_share) * share + prior_share * prior
    return out.astype(np.float32)


def load_table(path: str | Path, n_labels: int) -> dict[str, np.ndarray]:
    """neighbours.npz, plain arrays only (np.load refuses pickled objects), checked against the label count."""
    with np.load(path) as z:
        table = {k: z[k] for k in ("emb", "label", "question")}
    n = len(table["emb"])
    if table["emb"].ndim != 2 or len(table["label"]) != n or len(table["question"]) != n:
        raise ValueError(f"{Path(path).name}: emb, label and question must have one entry per training row")
    if n and not 0 <= table["label"].min() <= table["label"].max() < n_labels:
        raise ValueError(f"{Path(path).name}: label indices outside the {n_labels} labels")
    table["question"] = table["question"].astype(str)
    return table
