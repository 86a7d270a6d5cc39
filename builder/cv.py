"""`mapbuild cv CONFIG.toml`: every fold of every recipe, the cross-validated MAP@3, and the full refit.

Layout under OUT: <name>/fold<k>/{run,merged,onnx} (a TF-IDF recipe: onnx alone), <name>/oof.npz (the union of its
folds' out-of-fold rows), <name>/full/... for the refit, and cv.json; `build` writes and reuses the same folders. A
fold whose onnx folder exists is done and never trained again, so folds can be added run by run (`done`: unless
its recipe, export or data file changed since, which is refused)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from runtime.data import labels_of
from runtime.errors import MapbuildError
from runtime.files import atomic_write
from runtime.labels import LabelSpace, top3
from runtime.metrics import map_at_3

from .build import Recipe, build_member, done, fold_dir, load_config
from .build_plan import check_fits
from .ensemble import fit
from .folds import load_labelled
from .stages import read_meta, run_file

REPORT = "cv.json"


def fold_spec(member: Recipe, fold: int):
    return dataclasses.replace(member.config, fold=fold, full=False)


def union_oof(root: Path, member: Recipe, folds: list[int]) -> Path:
    """The recipe's out-of-fold probabilities over every finished fold, written to <name>/oof.npz."""
    parts = [np.load(run_file(read_meta(fold_dir(root, member.name, k) / "onnx", "onnx"), "oof.npz")) for k in folds]
    path = root / member.name / "oof.npz"
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, row_id=np.concatenate([z["row_id"] for z in parts]), probs=np.concatenate([z["probs"] for z in parts]))
    return path


def recipe_report(root: Path, member: Recipe, folds: list[int]) -> dict:
    """MAP@3 per fold (each with its own fold's candidate mask, as trained), their mean and standard deviation, and
    per question on the union of the folds' rows (with the label space of all rows)."""
    metas = [read_meta(fold_dir(root, member.name, k) / "onnx", "onnx") for k in folds]
    scores = [json.loads(run_file(m, "metrics.json").read_text())["map3"] for m in metas]
    z = np.load(union_oof(root, member, folds))
    cfg = member.config
    rows = load_labelled(cfg.data, cfg.sample, cfg.seed).drop_duplicates("row_id").set_index("row_id", drop=False)
    if lost := len(set(z["row_id"].tolist()) - set(rows.index)):  # folds older than provenance, whose data `done` cannot check
        raise MapbuildError(f"{root / member.name}: its folds hold {lost} rows that {cfg.data} no longer has; remove the folds, or restore the file")
    rows = rows.loc[z["row_id"].tolist()]
    space = LabelSpace.from_json(metas[0]["label_space"])
    ranked = np.array(space.labels)[top3(z["probs"], space.candidate_mask(rows))]
    truth = labels_of(rows).to_numpy()
    per_question = {
        str(q): round(map_at_3(truth[at].tolist(), ranked[at].tolist()), 4)
        for q in sorted(rows["QuestionId"].unique(), key=int)
        for at in [(rows["QuestionId"] == q).to_numpy()]
    }
    return {
        "folds": folds,
        "fold_map3": [round(s, 4) for s in scores],
        "mean": round(float(np.mean(scores)), 4),
        "std": round(float(np.std(scores, ddof=1)), 4) if len(scores) > 1 else None,
        "rows": len(rows),
        "per_question": per_question,
    }


def cv(
    config: str | os.PathLike, out: str | None = None, folds: list[int] | None = None, full: bool = False, only: list[str] | None = None, data: str | None = None
) -> dict:
    """Train the missing folds (all, or `folds`) of every recipe (or those named in `only`), then report on every
    recipe's finished folds; with `full`, also refit those recipes on every row. `data` replaces every recipe's.
    Returns the report, also written to OUT/cv.json."""
    cfg, members = load_config(config, out=out, data=data)
    unknown = set(only or ()) - {m.name for m in members}
    if unknown:
        raise MapbuildError(f"--only {sorted(unknown)[0]}: {config} has no such [[models]] name")
    chosen = [m for m in members if not only or m.name in only]
    check_fits(chosen)  # before hours of training
    root = Path(cfg.out)
    timing = {}
    for m in chosen:
        wanted = folds if folds is not None else list(range(m.config.folds))
        bad = [k for k in wanted if not 0 <= k < m.config.folds]
        if bad:
            raise MapbuildError(f"--folds {bad[0]}: {m.name} has folds 0..{m.config.folds - 1}")
        start = time.perf_counter()
        for k in wanted:
            build_member(m._replace(config=fold_spec(m, k)), root)
        timing[m.name] = round(time.perf_counter() - start, 1)
    report = {"recipes": {}, "seconds": timing}
    for m in members:
        finished = [k for k in range(m.config.folds) if done(fold_dir(root, m.name, k), m._replace(config=fold_spec(m, k)))]
        if finished:
            report["recipes"][m.name] = recipe_report(root, m, finished)
    dirs = [str(fold_dir(root, m.name, k) / "onnx") for m in members for k in report["recipes"].get(m.name, {}).get("folds", [])]
    if dirs:
        e = fit(dirs, cfg.ensemble)
        report["ensemble"] = {k: e[k] for k in ("method", "rows", "map3", "map3_held_out")}
        names = [m.name for m in members if m.name in report["recipes"]]
        weights = dict.fromkeys(names, 0.0)
        for d, w in zip(dirs, e["weights"]):
            weights[Path(d).parents[1].name] += w
        report["ensemble"]["weights"] = {n: round(w, 3) for n, w in weights.items()}
    if full:
        for m in chosen:
            if m.name not in report["recipes"]:
                raise MapbuildError(f"--full: {m.name} has no finished fold, whose out-of-fold rows would weigh its refit; run its folds first")
            spec = dataclasses.replace(m.config, full=True, oof=str(root / m.name / "oof.npz"))
            build_member(m._replace(config=spec), root)
    with atomic_write(root / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report
