"""MAP@3, the competition metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .labels import top3


def map_at_3(truth: Sequence[str], predictions: Sequence[Sequence[str]]) -> float:
    """Mean over rows of 1/rank of the true label among the first 3 predictions (0 when absent)."""
    if len(truth) != len(predictions):
        raise ValueError(f"{len(truth)} labels but {len(predictions)} predictions")
    if not len(truth):
        return 0.0
    score = [next((1.0 / (k + 1) for k, p in enumerate(ps[:3]) if p == t), 0.0) for t, ps in zip(truth, predictions)]
    return float(np.mean(score))


def masked_map3(truth: Sequence[str], probs: np.ndarray, labels: Sequence[str], mask: np.ndarray) -> float:
    """MAP@3 of the kernel's prediction: each row's 3 best labels, its candidates (`mask`) first."""
    return map_at_3(list(truth), np.asarray(labels)[top3(probs, mask)].tolist())
