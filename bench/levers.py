"""Issue 16's levers on existing out-of-fold files: combine in log space (geo), pool per question, or stack.

    python bench/levers.py [--root build/cpu] [--members tfidf minilm] [--C 1 0.1 0.03 0.01] [--blend tfidf+knn ...]

A member is a model folder under --root, or any folder with an oof.npz (such as bench/cheap_members.py's
build/levers/knn); the first must be under --root: its cv metadata gives the data, folds and label spaces.
`--blend a+b`: the prob, geo and pool blends of those members alone (folder names); `--C` with no value skips the stackers.

On the rows every member has out-of-fold probabilities for (with configs/cpu.toml's `mapbuild cv`: folds 0 and 1),
MAP@3 with candidate masks per fold, and mean ± std over folds, for each member alone; the prob and geo blends with
weights chosen by greedy selection (builder.ensemble.select); the per-question log-linear pool over every member
(builder.ensemble.fit_pool, as `--ensemble pool` ships it); a per-question stacker (multinomial logistic regression
over every member's log-probabilities of the question's candidate labels); and the stacker averaged half and half
with the geo blend, once per stacker strength C. Weights and stackers are fitted on the other folds' rows, never
on the rows they are scored on. Each fold is scored with the candidate mask of the label space in its fold's
metadata: builder/tfidf.py records one fitted on every labelled row, not on the other folds alone as training does;
on train.csv their masks agree on every held-out row (checked for the 5 TF-IDF folds), so the figures are the same.
Choosing C by these rows' figures flatters the stacker: the rows that pick C are the rows it is scored on.
A member with one fold (a lever tried on fold 0) leaves one shared fold: its two random halves stand in for folds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from builder.ensemble import fit_pool, select
from builder.folds import assign_folds, load_labelled, scheme_of
from runtime.data import labels_of
from runtime.ensemble import FLOOR, combine, parts, pool
from runtime.labels import LabelSpace, top3
from runtime.metrics import map_at_3

ROOT = Path(__file__).resolve().parents[1]


def meta(root: Path, name: str, fold: int) -> dict:
    return json.loads((root / name / f"fold{fold}" / "onnx" / "mapbuild.json").read_text())


def oof_dir(root: Path, name: str) -> Path:
    """A member's folder: `name` under root, else `name` itself (a bench member's folder, with its oof.npz alone)."""
    return root / name if (root / name / "oof.npz").exists() else Path(name)


def load(root: Path, names: list[str]) -> tuple[pd.DataFrame, list[np.ndarray], dict[int, LabelSpace]]:
    """The shared out-of-fold rows (with their fold), each member's probabilities on them, and each fold's label
    space (the same for every member: they share data, folds and seed)."""
    oofs = [np.load(oof_dir(root, n) / "oof.npz") for n in names]
    shared = sorted(set.intersection(*(set(z["row_id"].tolist()) for z in oofs)))
    cfg = meta(root, names[0], 0)["config"]
    df = load_labelled(cfg["data"], cfg.get("sample"), cfg["seed"])
    df = df.assign(_fold=assign_folds(df, cfg["folds"], cfg["seed"], scheme_of(cfg))).drop_duplicates("row_id").set_index("row_id", drop=False)
    rows = df.loc[shared]
    probs = [z["probs"][pd.Index(z["row_id"]).get_indexer(shared)] for z in oofs]
    spaces = {f: LabelSpace.from_json(meta(root, names[0], f)["label_space"]) for f in sorted(rows["_fold"].unique())}
    return rows, probs, spaces


def stack(logs: list[np.ndarray], y: np.ndarray, q: np.ndarray, cand: dict[str, np.ndarray], fit_on: np.ndarray, test: np.ndarray, C: float) -> np.ndarray:
    """Per question, a multinomial logistic regression on the fit rows over every member's log-probabilities of the
    question's candidate labels, predicting the test rows; its probabilities scattered back over the full label list.
    A question with under two labels among its fit rows keeps zeros (the caller falls back)."""
    out = np.zeros((test.sum(), logs[0].shape[1]))
    for question, cols in cand.items():
        cols = np.flatnonzero(cols)
        x = np.hstack([lp[:, cols] for lp in logs])
        tr = fit_on & (q == question) & np.isin(y, cols)  # a fit row whose label is no candidate teaches nothing here
        te = (q == question)[test]
        if len(set(y[tr])) < 2 or not te.any():
            continue
        model = LogisticRegression(C=C, max_iter=2000).fit(x[tr], y[tr])
        out[np.ix_(te, model.classes_)] = model.predict_proba(x[test][te])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "build" / "cpu", help="a `mapbuild cv` output folder")
    parser.add_argument("--members", nargs="+", default=["tfidf", "minilm"])
    parser.add_argument("--C", type=float, nargs="*", default=[1.0, 0.1, 0.03, 0.01], help="the stacker's inverse L2 strengths (sklearn's C), one row each")
    parser.add_argument("--blend", nargs="*", default=[], help="member subsets, names joined by +, each blended alone (prob and geo)")
    args = parser.parse_args()
    short = [Path(n).parent.name if Path(n).name.startswith("fold") else Path(n).name for n in args.members]  # what --blend and the table call a member

    rows, probs, spaces = load(args.root, args.members)
    labels = np.array(spaces[min(spaces)].labels)
    truth = labels_of(rows).to_numpy()
    y = pd.Index(labels).get_indexer(truth)
    q = rows["QuestionId"].to_numpy()
    folds = rows["_fold"].to_numpy()
    mask = np.zeros((len(rows), len(labels)), dtype=bool)
    for f, space in spaces.items():
        mask[folds == f] = space.candidate_mask(rows[folds == f])
    # A question's candidate labels: every label its rows' masks allow (both correctness prefixes), per held-out
    # fold's label space; from inputs alone, as at prediction time.
    cand = {}
    for f, space in spaces.items():
        m = space.candidate_mask(rows)
        cand[f] = {question: m[q == question].any(0) for question in np.unique(q)}
    logs = [parts(p, "geo") for p in probs]
    score = lambda p, at: map_at_3(truth[at].tolist(), labels[top3(p, mask[at])].tolist())
    norm = lambda p, at: p * mask[at] / np.maximum((p * mask[at]).sum(1, keepdims=True), FLOOR)  # over the row's candidates

    def blend(method: str, fit_on: np.ndarray, test: np.ndarray, use: list[int] | None = None) -> np.ndarray:
        fallback = use is None  # a stacker's fallback: every member, its weights not printed
        use = list(range(len(probs))) if fallback else use
        w = select([(logs if method == "geo" else probs)[i][fit_on] for i in use], lambda p: score(p, fit_on))
        if not fallback:
            weights.setdefault((method, tuple(use)), []).append(w)
        return combine([probs[i][test] for i in use], w, method)

    def stacked(fit_on: np.ndarray, test: np.ndarray, C: float) -> np.ndarray:
        s = stack(logs, y, q, cand[folds[test][0]], fit_on, test, C)
        if (missing := ~s.any(1)).any():
            s[missing] = blend("geo", fit_on, test)[missing]
        return s

    def pooled(fit_on: np.ndarray, test: np.ndarray, use: list[int]) -> np.ndarray:
        names = [short[i] for i in use]
        params = fit_pool([logs[i][fit_on] for i in use], y[fit_on], q[fit_on], mask[fit_on], names)
        w = select([logs[i][fit_on] for i in use], lambda p: score(p, fit_on))  # geo stands in for a question without parameters
        return pool([probs[i][test] for i in use], names, q[test], params, w)

    weights: dict[tuple, list[np.ndarray]] = {}  # the weights each blend chose per fold, printed after the table
    levers = {n: lambda fit_on, test, p=p: p[test] for n, p in zip(short, probs)}
    every = list(range(len(probs)))
    levers |= {f"{m} blend": lambda fit_on, test, m=m: blend(m, fit_on, test, every) for m in ("prob", "geo")}
    levers["pool, per question"] = lambda fit_on, test: pooled(fit_on, test, every)
    for subset in args.blend:
        use = [short.index(n) for n in subset.split("+")]
        for method in ("prob", "geo"):
            levers[f"{method} {subset}"] = lambda fit_on, test, m=method, u=use: blend(m, fit_on, test, u)
        levers[f"pool {subset}"] = lambda fit_on, test, u=use: pooled(fit_on, test, u)
    for C in args.C:
        levers[f"stacker, C={C:g}"] = lambda fit_on, test, C=C: stacked(fit_on, test, C)
        levers[f"stacker+geo 1:1, C={C:g}"] = lambda fit_on, test, C=C: 0.5 * norm(stacked(fit_on, test, C), test) + 0.5 * norm(blend("geo", fit_on, test), test)
    fs = sorted(spaces)
    sizes = ", ".join(f"fold {f} {(folds == f).sum()}" for f in fs)
    print(f"MAP@3 on {len(rows)} rows every member covers ({sizes}); fitted on the other folds, scored on the fold")
    if len(fs) == 1:  # a lever trained on one fold: its two random halves stand in for folds (one label space)
        only, folds = fs[0], np.random.default_rng(0).permutation(np.arange(len(rows)) % 2)
        fs, spaces, cand = [0, 1], {h: spaces[only] for h in (0, 1)}, {h: cand[only] for h in (0, 1)}
        print(f"one fold only: its two random halves ({(folds == 0).sum()} and {(folds == 1).sum()} rows) are 'fold 0' and 'fold 1' below")
    width = max(26, *(len(n) + 1 for n in levers))
    print(f"{'lever':{width}s}" + "".join(f"{'fold ' + str(f):>9s}" for f in fs) + f"{'mean':>9s}{'± std':>9s}{'seconds':>9s}")
    for name, predict in levers.items():
        start = time.perf_counter()
        s = [score(predict(folds != f, folds == f), folds == f) for f in fs]
        took = time.perf_counter() - start
        std = np.std(s, ddof=1) if len(s) > 1 else float("nan")
        print(f"{name:{width}s}" + "".join(f"{x:9.4f}" for x in s) + f"{np.mean(s):9.4f}{std:9.4f}{took:9.1f}")

    for (method, use), ws in weights.items():
        shares = " | ".join("/".join(f"{x:.2f}" for x in w) for w in ws)
        print(f"weights {method} {'+'.join(short[i] for i in use)}, per fold: {shares}")


if __name__ == "__main__":
    main()
