"""Combining member predictions: weighted probability, rank or log-probability (geometric) averaging, or a
log-linear pool with its own member scales and label biases per question."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHODS = ("prob", "rank", "geo", "pool")
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
    if method not in METHODS[:3]:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of prob, rank, geo (pool: use pool())")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.max() / (w / w.max()).sum()  # by the largest first: weights near 1e308 sum to inf, and every w/inf to 0
    mean = sum(float(wi) * parts(p, method) for wi, p in zip(w, probs))
    if method == "geo":
        mean = np.exp(mean - mean.max(axis=1, keepdims=True))  # shifted so exp never underflows to an all-zero row
        mean /= mean.sum(axis=1, keepdims=True)
    return mean.astype(np.float32)


def pool(probs: Sequence[np.ndarray], names: Sequence[str], questions: Sequence[str], params: dict, weights: Sequence[float]) -> np.ndarray:
    """The per-question log-linear pool: a row of question q gets softmax(sum_m scales[m] * log p_m + bias) with
    q's `params` ({"scales": {name: a}, "bias": one per label}). Rows of a question without parameters get the geo
    blend with `weights`. Its ranking is geo's with per-question member weights, sharpness and label offsets."""
    questions = np.asarray(questions, dtype=str)
    out = np.empty(probs[0].shape, dtype=np.float32)
    rest = ~np.isin(questions, list(params))
    if rest.any():
        out[rest] = combine([p[rest] for p in probs], weights, "geo")
    for q, prm in params.items():
        rows = questions == q
        if rows.any():
            z = sum(prm["scales"][n] * parts(p[rows], "geo") for n, p in zip(names, probs)) + np.asarray(prm["bias"], dtype=np.float64)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out[rows] = z / z.sum(axis=1, keepdims=True)
    return out
