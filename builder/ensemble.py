"""Ensemble weights fitted on the members' out-of-fold probabilities to maximise MAP@3."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.data import labels_of
from runtime.ensemble import combine, rank_rows
from runtime.labels import LabelSpace, top3
from runtime.metrics import map_at_3

from .stages import read_meta
from .train import load_labelled


def select(parts: list[np.ndarray], score, rounds: int = 20) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., 2004): `rounds` times, add one vote for the member
    that raises the score most; keep the best-scoring prefix. Returns vote shares; a member never chosen gets 0."""
    votes, total = np.zeros(len(parts)), np.zeros_like(parts[0])
    best, best_votes = -np.inf, votes
    for _ in range(rounds):
        pick = max(range(len(parts)), key=lambda i: score(total + parts[i]))
        votes[pick] += 1
        total += parts[pick]
        if (s := score(total)) > best:
            best, best_votes = s, votes.copy()
    return best_votes / best_votes.sum()


def fit(onnx_dirs: list[str | os.PathLike], method: str = "prob") -> dict:
    """Weights and OOF MAP@3 per member and for the ensemble, on the held-out rows every member's run shares.
    Runs that held out different folds share none: then the weights stay equal and no score is given."""
    oofs = []
    for d in onnx_dirs:
        z = np.load(Path(read_meta(d, "onnx")["run"]) / "oof.npz")
        oofs.append(dict(zip(z["row_id"].tolist(), z["probs"])))
    shared = sorted(set.intersection(*(set(o) for o in oofs)))
    n = len(oofs)
    if not shared:
        return {"method": method, "rows": 0, "weights": [1 / n] * n, "member_map3": [None] * n, "map3": None}
    meta = read_meta(onnx_dirs[0], "onnx")
    rows = load_labelled(meta["config"]["data"]).drop_duplicates("row_id").set_index("row_id", drop=False).loc[shared]
    space = LabelSpace.from_json(meta["label_space"])
    truth, mask, labels = labels_of(rows).tolist(), space.candidate_mask(rows), np.array(space.labels)
    score = lambda p: map_at_3(truth, labels[top3(p, mask)].tolist())
    probs = [np.stack([o[r] for r in shared]) for o in oofs]
    weights = select([rank_rows(p) if method == "rank" else p for p in probs], score) if n > 1 else np.ones(1)
    kept = weights > 0
    return {
        "method": method,
        "rows": len(shared),
        "weights": weights.tolist(),
        "member_map3": [score(p) for p in probs],
        "map3": score(combine([p for p, k in zip(probs, kept) if k], weights[kept], method)),
    }
