"""Combining member predictions: weighted probability or rank averaging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHODS = ("prob", "rank")


def rank_rows(probs: np.ndarray) -> np.ndarray:
    """Each label's rank within its row, scaled to [0, 1]: members with different confidence count alike."""
    return probs.argsort(axis=1).argsort(axis=1).astype(np.float32) / max(probs.shape[1] - 1, 1)


def combine(probs: Sequence[np.ndarray], weights: Sequence[float], method: str = "prob") -> np.ndarray:
    """The weighted mean of member probabilities (prob) or of their per-row ranks (rank)."""
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    parts = [rank_rows(p) if method == "rank" else p for p in probs]
    return sum(float(wi) * p for wi, p in zip(w, parts)).astype(np.float32)
