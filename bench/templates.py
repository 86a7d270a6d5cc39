"""Template choice as an experiment: train MiniLM briefly with each template on the same rows and fold, report MAP@3.

    python bench/templates.py --data ../shared/data/map/train.csv [--templates compact basic] [--rows 3000] [--epochs 1]

The rows are a seeded random sample (train.csv is ordered by question). Each run is a normal `mapbuild train` run
folder under --out, so the winner can go on to merge and export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from builder.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--templates", nargs="+", default=["compact", "basic"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rows", type=int, default=3000, help="random rows of --data to use")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("build/bench-templates"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sample = args.out / "sample.csv"
    df = pd.read_csv(args.data, dtype=str, keep_default_na=False)
    df.sample(min(args.rows, len(df)), random_state=0).to_csv(sample, index=False)
    results = {}
    for template in args.templates:
        cfg = TrainConfig(model=args.model, data=str(sample), template=template, epochs=args.epochs)
        m = train(cfg, args.out / template)
        results[template] = m
        print(f"{template:14s} MAP@3 {m['map3']:.4f} on {m['rows_valid']} held-out rows, train {m['train_seconds']:.0f} s", flush=True)
    best = max(results, key=lambda t: results[t]["map3"])
    print(f"best: {best}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
