"""Runtime (ONNX bundle, length-sorted batches, duplicates run once) against the PyTorch fp32 model (input order, batch 32), same rows.

    python bench/speed.py --bundle BUNDLE_DIR --merged MERGED_DIR [--rows 2000] [--threads N]

Rows are the run's held-out fold; both paths start from the raw rows, tokenization included. Prints rows/s, the
ratio and MAP@3 of each with the bundle's candidate mask.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from builder.export import held_out_rows
from builder.torch_rows import torch_logits, training_ids
from builder.models import load_hf_tokenizer
from runtime.data import labels_of
from runtime.engine import softmax
from runtime.labels import LabelSpace
from runtime.manifest import load_manifest
from runtime.metrics import masked_map3
from runtime.predict import predict
from runtime.prompts import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--merged", type=Path, required=True, help="the merged HF folder the bundle was exported from")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of both paths, as Kaggle's 4 vCPUs (default 0: every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((args.merged / "mapbuild.json").read_text())
    manifest = load_manifest(args.bundle)
    space = LabelSpace.from_json(manifest["label_space"])
    rows = held_out_rows(meta, args.rows)
    truth, mask, labels = labels_of(rows).tolist(), space.candidate_mask(rows), np.array(space.labels)
    import onnxruntime

    print(f"{len(rows)} held-out rows, {torch.get_num_threads()} threads, onnxruntime {onnxruntime.__version__}, member {manifest['members'][0]['name']}")

    model = AutoModelForSequenceClassification.from_pretrained(args.merged, dtype=torch.float32).eval()
    tok = load_hf_tokenizer(str(args.merged))
    start = time.perf_counter()
    ids = training_ids(tok, render(rows, meta["template"], space, meta.get("chat")), meta["max_length"])
    base = softmax(torch_logits(model, ids, meta["pad_token_id"], batch_size=32, sort=False, dedupe=False, desc="baseline"))
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    probs, _ = predict(args.bundle, manifest, space, rows, threads=args.threads)
    run_s = time.perf_counter() - start

    base_map = masked_map3(truth, base, labels, mask)
    run_map = masked_map3(truth, probs, labels, mask)
    print(f"baseline torch fp32, input order, batch 32: {len(rows) / base_s:8.1f} rows/s  MAP@3 {base_map:.4f}")
    print(f"runtime  bundle, sorted batches:           {len(rows) / run_s:8.1f} rows/s  MAP@3 {run_map:.4f}")
    print(f"speed-up {base_s / run_s:.2f}x, MAP@3 difference {run_map - base_map:+.4f}")


if __name__ == "__main__":
    main()
