"""Combining member predictions: weighted probability, rank or log-probability (geometric) averaging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHODS = ("prob", "rank", "geo")
FLOOR = 1e-9  # before the log: a member's zero costs a label heavily (log 1e-9 = -20.7), but finitely, not -inf


def rank_rows(probs: np.ndarray) -> np.ndarray:
    """Each label's rank within its row, scaled to [0, 1]: members with different confidence count alike."""
    return probs.argsort(axis=1).argsort(axis=1).astype(np.float32) / max(probs.shape[1] - 1, 1)


def parts(probs: np.ndarray, method: str) -> np.ndarray:
    """What a member contributes to the weighted sum: its probabilities, per-row ranks or log-probabilities. Summed
    weighted parts rank labels as `combine` does, so weights can be fitted on them directly."""
    if method == "rank":
        return rank_rows(probs)
    if method == "geo":
        return np.log(np.maximum(probs, FLOOR))
    return probs


def combine(probs: Sequence[np.ndarray], weights: Sequence[float], method: str = "prob") -> np.ndarray:
    """The weighted mean of member probabilities (prob), of their per-row ranks (rank), or of their log-probabilities
    (geo: the weighted geometric mean, renormalised per row so it stays a probability)."""
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = sum(float(wi) * parts(p, method) for wi, p in zip(w, probs))
    if method == "geo":
        mean = np.exp(mean - mean.max(axis=1, keepdims=True))  # shifted so exp never underflows to an all-zero row
        mean /= mean.sum(axis=1, keepdims=True)
    return mean.astype(np.float32)
