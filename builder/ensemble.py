"""Ensemble weights fitted on the members' out-of-fold probabilities to maximise MAP@3.

A recipe is one model configuration; its fold models (or its full refit) count as one member whose out-of-fold
rows are the union of its folds'. Weights are fitted per recipe and shared equally by a recipe's models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from runtime.data import labels_of
from runtime.ensemble import combine, parts
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace, top3
from runtime.metrics import map_at_3

from .folds import assign_folds, load_labelled
from .kinds import KINDS
from .stages import read_meta

PER_FOLD = ("fold", "full", "oof")  # config keys that differ between the models of one recipe
SPLIT = ("data", "folds", "seed", "sample")  # config keys every member must share for their rows to line up


def recipe(meta: dict) -> str:
    """What makes two ONNX folders models of the same recipe: kind, base and every option but the fold."""
    kind = meta.get("kind", "transformer")
    config = {k: v for k, v in KINDS[kind].config.canonical(meta["config"]).items() if k not in PER_FOLD}
    return json.dumps([kind, meta.get("model_type"), meta.get("precision"), config], sort_keys=True)


def oof_of(meta: dict) -> dict[str, np.ndarray]:
    """Row id -> probabilities on rows the model never trained on: its fold's, or for a full refit its recipe's
    cross-validation out-of-fold file (config `oof`), or none."""
    own = np.load(Path(meta["run"]) / "oof.npz")
    path = meta["config"].get("oof") if not len(own["row_id"]) else None
    z = np.load(path) if path else own
    return dict(zip(z["row_id"].tolist(), z["probs"]))


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


def fit(onnx_dirs: list[str | os.PathLike], method: str = "geo") -> dict:
    """Weights per ONNX folder, and MAP@3 per recipe and for the ensemble, on the out-of-fold rows every recipe
    covers. Also the honest figure: weights fitted on the other folds' rows, scored on each fold's, averaged.
    Without shared rows the weights stay equal per recipe and no score is given."""
    metas = [read_meta(d, "onnx") for d in onnx_dirs]
    for d, m in zip(onnx_dirs, metas):
        if any(m["config"].get(k) != metas[0]["config"].get(k) for k in SPLIT):
            raise MapbuildError(f"{d}: trained on other rows than {onnx_dirs[0]} ({', '.join(SPLIT)} differ); ensemble members must share them")
    keys = list(dict.fromkeys(recipe(m) for m in metas))
    group = [keys.index(recipe(m)) for m in metas]
    oofs: list[dict] = [{} for _ in keys]
    for g, m in zip(group, metas):
        oofs[g].update(oof_of(m))
    share = lambda w: [w[g] / group.count(g) for g in group]  # a recipe's weight, split over its models
    shared = sorted(set.intersection(*(set(o) for o in oofs)))
    result = {"method": method, "rows": len(shared), "recipes": len(keys), "map3_held_out": None}
    if not shared:
        return result | {"weights": share([1 / len(keys)] * len(keys)), "member_map3": [None] * len(metas), "map3": None}
    cfg = metas[0]["config"]
    df = load_labelled(cfg["data"], cfg.get("sample"), cfg["seed"])
    df = df.assign(_fold=assign_folds(df, cfg["folds"], cfg["seed"])).drop_duplicates("row_id").set_index("row_id", drop=False)
    rows = df.loc[shared]
    space = LabelSpace.from_json(metas[0]["label_space"])
    truth, mask, labels = np.array(labels_of(rows).tolist()), space.candidate_mask(rows), np.array(space.labels)
    score = lambda p, at=slice(None): map_at_3(truth[at].tolist(), labels[top3(p, mask[at])].tolist())
    probs = [np.stack([o[r] for r in shared]) for o in oofs]
    votes = [parts(p, method) for p in probs]  # for geo, log-probs: summed votes rank as the geometric mean
    weights = select(votes, score) if len(keys) > 1 else np.ones(1)
    blend = lambda w, at=slice(None): score(combine([p[at] for p, x in zip(probs, w) if x > 0], w[w > 0], method), at)
    folds = rows["_fold"].to_numpy()
    if len(keys) > 1 and len(set(folds)) > 1:
        held = []
        for f in sorted(set(folds)):
            fit_on, test = folds != f, folds == f
            w = select([v[fit_on] for v in votes], lambda p: score(p, fit_on))
            held.append(blend(w, test) * test.sum())
        result["map3_held_out"] = sum(held) / len(folds)
    recipe_map3 = [score(p) for p in probs]
    return result | {"weights": share(weights.tolist()), "member_map3": [recipe_map3[g] for g in group], "map3": blend(weights)}
