"""Ensemble weights fitted on the members' out-of-fold probabilities to maximise MAP@3.

A recipe is one model configuration; its fold models (or its full refit) count as one member whose out-of-fold
rows are the union of its folds'. Weights are fitted per recipe and shared equally by a recipe's models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from runtime.data import labels_of
from runtime.ensemble import combine, parts, pool
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace, top3
from runtime.metrics import map_at_3

from .folds import assign_folds, load_labelled, scheme_of
from .kinds import KINDS
from .stages import read_meta, run_file

PER_FOLD = ("fold", "full", "oof")  # config keys that differ between the models of one recipe
SPLIT = ("data", "folds", "seed", "sample", "fold_scheme")  # config keys every member must share for their rows to line up
POOL_L2 = 1e-3  # on a pool's biases; in 5-fold CV, 0 to 1e-2 score within 0.0006 of each other (issue 16)
POOL_MIN_ROWS = 100  # a question's rows to fit its 5-10 pool parameters on; with fewer, geo stands in for it
log = logging.getLogger("mapbuild")


def split_of(config: dict) -> tuple:
    """The SPLIT values a recorded config trained on (a folder without `fold_scheme` used the legacy one)."""
    return tuple(scheme_of(config) if k == "fold_scheme" else config.get(k) for k in SPLIT)


def recipe(meta: dict) -> str:
    """What makes two ONNX folders models of the same recipe: kind, base and every option but the fold."""
    kind = meta.get("kind", "transformer")
    config = {k: v for k, v in KINDS[kind].config.canonical(meta["config"]).items() if k not in PER_FOLD}
    return json.dumps([kind, meta.get("model_type"), meta.get("precision"), config], sort_keys=True)


def oof_of(meta: dict) -> dict[str, np.ndarray]:
    """Row id -> probabilities on rows the model never trained on: its fold's, or for a full refit its recipe's
    cross-validation out-of-fold file (config `oof`), or none."""
    own = load_oof(run_file(meta, "oof.npz"), "the run folder the export recorded holds it: restore that folder, or train and export again")
    path = meta["config"].get("oof") if not len(own["row_id"]) else None
    z = load_oof(Path(path), "the cross-validation file this refit recorded: run its `cv` folds again") if path else own
    return dict(zip(z["row_id"].tolist(), z["probs"]))


def load_oof(path: Path, fix: str) -> dict[str, np.ndarray]:
    """An out-of-fold file, or one line naming it and `fix`: people delete run folders once they are exported."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("row_id", "probs")}
    except FileNotFoundError:
        raise MapbuildError(f"{path}: not found; package weighs members by their out-of-fold rows, and {fix}") from None
    except (OSError, ValueError, KeyError) as e:  # not an .npz, a truncated one, a pickle (never loaded), a key missing
        raise MapbuildError(f"{path}: unreadable out-of-fold file ({type(e).__name__}); {fix}") from None


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


def fit_pool(logs: list[np.ndarray], y: np.ndarray, questions: np.ndarray, mask: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Per question, the member scales and label biases of `runtime.ensemble.pool` (members `names`, their
    log-probabilities `logs`) that minimise the log-loss over each row's candidate labels, plus POOL_L2 times the
    biases' squares: a convex problem, solved by L-BFGS, scales kept at 0 or above (a member never votes against
    its own labels). Rows whose label is not among their candidates teach nothing and are left out; a question with
    under POOL_MIN_ROWS rows or two labels gets no parameters (geo stands in)."""
    params = {}
    for q in np.unique(questions):
        at = (questions == q) & (y >= 0)
        at[at] &= mask[at, y[at]]
        if at.sum() < POOL_MIN_ROWS or len(np.unique(y[at])) < 2:
            continue
        cols = np.flatnonzero(mask[questions == q].any(0))
        x = np.stack([lp[at][:, cols] for lp in logs], 1)  # rows, members, the question's candidate labels
        allowed, t, k = mask[at][:, cols], np.searchsorted(cols, y[at]), len(logs)
        rows = np.arange(len(t))

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = np.where(allowed, np.einsum("rmc,m->rc", x, theta[:k]) + theta[k:], -np.inf)
            z -= z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            g = np.exp(z - lse[:, None])
            g[rows, t] -= 1
            g /= len(t)
            b = theta[k:]
            value = float((lse - z[rows, t]).mean() + POOL_L2 * b @ b)
            return value, np.concatenate([np.einsum("rmc,rc->m", x, g), g.sum(axis=0) + 2 * POOL_L2 * b])

        bounds = [(0, None)] * k + [(None, None)] * len(cols)
        theta = minimize(loss, np.r_[np.full(k, 1 / k), np.zeros(len(cols))], jac=True, method="L-BFGS-B", bounds=bounds).x
        bias = np.zeros(mask.shape[1])
        bias[cols] = theta[k:]
        params[str(q)] = {"scales": dict(zip(names, theta[:k].tolist())), "bias": bias.tolist()}
    return params


def fit(onnx_dirs: list[str | os.PathLike], method: str = "geo") -> dict:
    """Weights per ONNX folder, and MAP@3 per recipe and for the ensemble, on the out-of-fold rows every recipe
    covers. Also the honest figure: weights fitted on the other folds' rows, scored on each fold's, averaged (with
    one shared fold, on one random half of its rows, scored on the other).
    Without shared rows the weights stay equal per recipe and no score is given. A pool (geo weights, and per
    question the parameters of `fit_pool`, its scales per ONNX folder under "questions") falls back to geo when no
    question has POOL_MIN_ROWS shared rows."""
    metas = [read_meta(d, "onnx") for d in onnx_dirs]
    for d, m in zip(onnx_dirs, metas):
        if split_of(m["config"]) != split_of(metas[0]["config"]):
            raise MapbuildError(f"{d}: trained on other rows than {onnx_dirs[0]} ({', '.join(SPLIT)} differ); ensemble members must share them")
    keys = list(dict.fromkeys(recipe(m) for m in metas))
    group = [keys.index(recipe(m)) for m in metas]
    oofs: list[dict] = [{} for _ in keys]
    for g, m in zip(group, metas):
        oofs[g].update(oof_of(m))
    share = lambda w: [w[g] / group.count(g) for g in group]  # a recipe's weight, split over its models
    shared = sorted(set.intersection(*(set(o) for o in oofs)))
    if shared:
        cfg = metas[0]["config"]
        df = load_labelled(cfg["data"], cfg.get("sample"), cfg["seed"])
        df = df.assign(_fold=assign_folds(df, cfg["folds"], cfg["seed"], scheme_of(cfg))).drop_duplicates("row_id").set_index("row_id", drop=False)
        rows = df.loc[shared]
    if method == "pool" and (not shared or rows["QuestionId"].value_counts().max() < POOL_MIN_ROWS):
        log.warning("pool: no question has %d shared out-of-fold rows to fit it on; the geo blend instead", POOL_MIN_ROWS)
        method = "geo"
    result = {"method": method, "rows": len(shared), "recipes": len(keys), "map3_held_out": None}
    if not shared:
        return result | {"weights": share([1 / len(keys)] * len(keys)), "member_map3": [None] * len(metas), "map3": None}
    space = LabelSpace.from_json(metas[0]["label_space"])
    truth, mask, labels = np.array(labels_of(rows).tolist()), space.candidate_mask(rows), np.array(space.labels)
    score = lambda p, at=slice(None): map_at_3(truth[at].tolist(), labels[top3(p, mask[at])].tolist())
    probs = [np.stack([o[r] for r in shared]) for o in oofs]
    base = "geo" if method == "pool" else method  # a pool keeps geo's weights: they order the members, and stand in when one fails
    votes = [parts(p, base) for p in probs]  # for geo, log-probs: summed votes rank as the geometric mean
    questions, y = rows["QuestionId"].to_numpy(dtype=str), np.array([space.labels.index(t) if t in space.labels else -1 for t in truth])

    def blend(w: np.ndarray, fit_on: np.ndarray, at: np.ndarray) -> tuple[float, dict | None]:
        """MAP@3 on rows `at` of the members weighted w > 0, a pool fitted on rows `fit_on`; and the pool's parameters."""
        keep = np.flatnonzero(w > 0)
        if method != "pool":
            return score(combine([probs[i][at] for i in keep], w[keep], method), at), None
        names = [str(i) for i in keep]
        params = fit_pool([votes[i][fit_on] for i in keep], y[fit_on], questions[fit_on], mask[fit_on], names)
        return score(pool([probs[i][at] for i in keep], names, questions[at], params, w[keep]), at), params

    everything = np.ones(len(shared), dtype=bool)
    weights = select(votes, score) if len(keys) > 1 else np.ones(1)
    folds = rows["_fold"].to_numpy()
    if len(set(folds)) == 1:  # one shared fold: its two random halves stand in for folds
        folds = np.random.default_rng(0).permutation(np.arange(len(folds)) % 2)
    if len(keys) > 1 or method == "pool":
        held = []
        for f in sorted(set(folds)):
            fit_on, test = folds != f, folds == f
            w = select([v[fit_on] for v in votes], lambda p: score(p, fit_on)) if len(keys) > 1 else np.ones(1)
            held.append(blend(w, fit_on, test)[0] * test.sum())
        result["map3_held_out"] = sum(held) / len(folds)
    map3, params = blend(weights, everything, everything)
    if params is not None:  # per ONNX folder, as the weights: a recipe's scale split over its models
        result["questions"] = {q: {"scales": [prm["scales"].get(str(g), 0.0) / group.count(g) for g in group], "bias": prm["bias"]} for q, prm in params.items()}
    recipe_map3 = [score(p) for p in probs]
    return result | {"weights": share(weights.tolist()), "member_map3": [recipe_map3[g] for g in group], "map3": map3}
