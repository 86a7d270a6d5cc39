"""Does a pool fitted on single-model out-of-fold rows carry over to averaged fold models, or to a refit?

    python bench/refit.py --only tfidf --only knn      # fold models and refits, fold 4 set aside
    python bench/pool_transfer.py build/refit/cv/tfidf build/refit/cv/knn

Each RECIPE folder is one `mapbuild cv --full` recipe of bench/refit.py (fold*/onnx, full/onnx, oof.npz). The geo
weights and the per-question pool are fitted as `package` fits them, on the recipes' out-of-fold rows, where each
model is scored on rows it never saw. A bundle then applies them to one fold model per recipe, to the geometric mean
of its fold models (what a bundle of fold models computes) or to its refit on all rows. Every model predicts
bench/refit.py's set-aside rows through the runtime, in a one-model bundle; its probabilities are kept in
OUT/probs, so a rerun only scores. Prints MAP@3 per member and blend, and each member's confidence and log-loss
on its candidates, out of fold and on the set-aside rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from refit import set_aside  # bench/refit.py, beside this script (its folder is on sys.path)

from builder.ensemble import fit_pool, select
from builder.folds import load_labelled
from builder.package import package
from runtime.data import labels_of
from runtime.ensemble import FLOOR, combine, parts, pool
from runtime.labels import LabelSpace, top3
from runtime.manifest import load_manifest
from runtime.metrics import map_at_3
from runtime.predict import predict

ROOT = Path(__file__).resolve().parents[1]


def model_probs(recipe: Path, model: str, rows: pd.DataFrame, out: Path) -> np.ndarray:
    """One model's probabilities on the set-aside rows, through a one-model bundle; cached in OUT/probs."""
    cache = out / "probs" / f"{recipe.name}-{model}.npy"
    if not cache.exists():
        bundle = out / "bundles" / f"{recipe.name}-{model}"
        if not bundle.exists():
            package([str(recipe / model / "onnx")], bundle, "you/pool-transfer", wheels=False, ensemble="geo")
        manifest = load_manifest(bundle)
        p, _ = predict(bundle, manifest, LabelSpace.from_json(manifest["label_space"]), rows)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, p)
    return np.load(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path, help="bench/refit.py's cv folders, one per member")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "map" / "train.csv", help="bench/refit.py's --data")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "pool_transfer")
    args = parser.parse_args()
    names = [r.name for r in args.recipes]

    for r in args.recipes:
        if not all((r / p).exists() for p in ("oof.npz", "fold0/onnx", "full/onnx")):
            raise SystemExit(f"{r}: not a recipe folder of bench/refit.py (it needs oof.npz, fold*/onnx and full/onnx)")
    metas = [json.loads((r / "fold0" / "onnx" / "mapbuild.json").read_text()) for r in args.recipes]
    if len({hashlib.sha256(Path(m["config"]["data"]).read_bytes()).hexdigest() for m in metas}) > 1:
        raise SystemExit(f"{', '.join(map(str, args.recipes))}: trained on different rows; give recipes of one bench/refit.py --data")
    df = load_labelled(str(args.data))
    rows = df[set_aside(df)].reset_index(drop=True)
    cfg, space = metas[0]["config"], LabelSpace.from_json(metas[0]["label_space"])
    labels = np.array(space.labels)
    dev = load_labelled(cfg["data"], cfg.get("sample"), cfg["seed"])
    if len(dev) + len(rows) != len(df):  # else the set-aside rows need not be unseen: figures that look right but flatter
        raise SystemExit(f"--data {args.data}: {len(df)} rows, but the recipes trained on {len(dev)} and {len(rows)} are set aside; give bench/refit.py's --data")
    dev = dev.drop_duplicates("row_id").set_index("row_id", drop=False)
    oofs = [np.load(r / "oof.npz") for r in args.recipes]
    shared = sorted(set.intersection(*(set(z["row_id"].tolist()) for z in oofs)))
    fit_rows = dev.loc[shared]
    oof = [z["probs"][pd.Index(z["row_id"]).get_indexer(shared)] for z in oofs]

    def score(p: np.ndarray, at: pd.DataFrame) -> float:
        return map_at_3(labels_of(at).tolist(), labels[top3(p, space.candidate_mask(at))].tolist())

    logs = [parts(p, "geo") for p in oof]
    y = pd.Index(labels).get_indexer(labels_of(fit_rows).to_numpy())
    w = select(logs, lambda p: score(p, fit_rows))
    params = fit_pool(logs, y, fit_rows["QuestionId"].to_numpy(str), space.candidate_mask(fit_rows), names)
    print(f"fitted on {len(shared)} out-of-fold rows (geo weights {', '.join(f'{n} {x:.2f}' for n, x in zip(names, w))}); scored on {len(rows)} set-aside rows")

    def confidence(p: np.ndarray, at: pd.DataFrame) -> str:
        """Mean top probability and log-loss of the truth, both over the row's candidates."""
        p = p * space.candidate_mask(at)
        p = p / p.sum(1, keepdims=True)
        t = pd.Index(labels).get_indexer(labels_of(at).to_numpy())
        known = t >= 0
        return f"top {p.max(1).mean():.3f}, log-loss {-np.log(np.maximum(p[known, t[known]], FLOOR)).mean():.3f}"

    print("out of fold: " + "; ".join(f"{n} {confidence(p, fit_rows)}" for n, p in zip(names, oof)))
    folds = sorted(p.parent.name for p in args.recipes[0].glob("fold*/onnx"))
    choices = {"one fold model (fold 0)": ["fold0"], f"{len(folds)} fold models, geo mean": folds, "refit on all rows": ["full"]}
    width = max(map(len, choices)) + 1
    for choice, models in choices.items():
        members = [np.exp(np.mean([parts(model_probs(r, m, rows, args.out), "geo") for m in models], 0)) for r in args.recipes]
        alone = "  ".join(f"{n} {score(p, rows):.4f}" for n, p in zip(names, members))
        geo, pooled = combine(members, w, "geo"), pool(members, names, rows["QuestionId"], params, w)
        print(f"{choice:{width}s} {alone}  geo {score(geo, rows):.4f}  pool {score(pooled, rows):.4f}")
        print(f"{'':{width}s} " + "; ".join(f"{n} {confidence(p, rows)}" for n, p in zip(names, members)))


if __name__ == "__main__":
    main()
