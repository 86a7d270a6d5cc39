"""K fold models averaged, or one refit on all rows? Scored on rows neither has seen.

    python bench/refit.py [--data ../shared/data/map/train.csv] [--out build/refit] [--config configs/cpu.toml --only tfidf]

One fold of the data (fold 4 of 5, seed 42) is set aside as a test set. `mapbuild cv --full` runs on the other rows,
then both bundles (the fold models, and the refit) predict the set-aside rows through the runtime. Prints MAP@3 and
the runtime's seconds for each, and writes OUT/refit.json.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def set_aside(df: pd.DataFrame) -> np.ndarray:
    """The rows neither the fold models nor the refit train on: fold 4 of 5, seed 42 (bench/pool_transfer.py too)."""
    from builder.folds import assign_folds

    return assign_folds(df, 5, 42) == 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "map" / "train.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "refit")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu.toml", help="recipes to compare")
    parser.add_argument("--only", action="append", default=None, help="recipe names from --config (default: all)")
    args = parser.parse_args()


    from builder.cv import cv
    from builder.folds import load_labelled
    from builder.package import package
    from runtime.data import labels_of
    from runtime.labels import LabelSpace
    from runtime.manifest import load_manifest
    from runtime.metrics import masked_map3
    from runtime.predict import predict

    out = args.out.resolve()  # the dev config names its paths, which `cv` reads relative to the config
    out.mkdir(parents=True, exist_ok=True)
    df = load_labelled(str(args.data))
    test = set_aside(df)
    df[~test].to_csv(out / "dev.csv", index=False)
    rows = df[test].reset_index(drop=True)
    raw = tomllib.loads(args.config.read_text())
    models = [m | {"data": str(out / "dev.csv")} for m in raw["models"] if not args.only or m["name"] in args.only]
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"dataset_id": raw["dataset_id"], "out": str(out / "cv"), "wheels": False}.items())
    for m in models:
        toml += "\n[[models]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in m.items())
    (out / "dev.toml").write_text(toml + "\n")
    report = cv(out / "dev.toml", full=True)

    figures = {"test_rows": len(rows), "cv": report["recipes"]}
    for choice, pattern in (("folds", "fold*"), ("refit", "full")):
        dirs = sorted(str(p) for m in models for p in (out / "cv" / m["name"]).glob(f"{pattern}/onnx"))
        bundle = out / f"bundle-{choice}"
        package(dirs, bundle, raw["dataset_id"], wheels=False)
        manifest = load_manifest(bundle)
        space = LabelSpace.from_json(manifest["label_space"])
        start = time.perf_counter()
        probs, used = predict(bundle, manifest, space, rows)
        seconds = time.perf_counter() - start
        map3 = masked_map3(labels_of(rows), probs, space.labels, space.candidate_mask(rows))
        figures[choice] = {"models": len(used), "map3": round(map3, 4), "seconds": round(seconds, 1)}
    (out / "refit.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: figures[k] for k in ("test_rows", "folds", "refit")}, indent=1))


if __name__ == "__main__":
    main()
