"""Runtime (ONNX bundle, length-sorted batches, duplicates run once) against the PyTorch fp32 model (input order, batch 32), same rows.

    python bench/speed.py --bundle BUNDLE_DIR --merged MERGED_DIR [--rows 2000] [--threads N] [--repeat 3]

Rows are the run's held-out fold; both paths start from the raw rows, tokenization included. The two are timed in
turn `--repeat` times, and each path's best run is compared: on a 2-core machine a second's interference from
elsewhere moves one run by 15%, and either path alike. Prints each run's rows/s, the best-of ratio and MAP@3 of
each with the bundle's candidate mask.

The runtime runs on the onnxruntime this interpreter imports. On Kaggle that is the bundle's onnxruntime-gpu wheel
(builder.wheels.ORT_GPU, 1.26.0 for CUDA 12), whose CPU kernels a dynamic int8 member runs on; the builder's venv may
hold a newer one (1.32's SkipLayerNormalization took 3x 1.26's time here). docs/results.md gives the command that
runs it on the kernel's version.
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
    parser.add_argument("--repeat", type=int, default=3, help="times each path is timed, in turn; the best of each is compared")
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

    def baseline() -> np.ndarray:
        ids = training_ids(tok, render(rows, meta["template"], space, meta.get("chat")), meta["max_length"])
        return softmax(torch_logits(model, ids, meta["pad_token_id"], batch_size=32, sort=False, dedupe=False, desc="baseline"))

    def runtime() -> np.ndarray:
        return predict(args.bundle, manifest, space, rows, threads=args.threads)[0]

    rates: dict[str, list[float]] = {"baseline": [], "runtime": []}
    scores: dict[str, float] = {}  # MAP@3, the same every run
    for k in range(args.repeat):
        for name, path in (("baseline", baseline), ("runtime", runtime)):
            start = time.perf_counter()
            probs = path()
            rates[name].append(len(rows) / (time.perf_counter() - start))
            scores[name] = masked_map3(truth, probs, labels, mask)
        print(f"run {k + 1}: baseline {rates['baseline'][-1]:.1f} rows/s, runtime {rates['runtime'][-1]:.1f} rows/s: {rates['runtime'][-1] / rates['baseline'][-1]:.2f}x")

    base, run = max(rates["baseline"]), max(rates["runtime"])
    print(f"baseline torch fp32, input order, batch 32: {base:8.1f} rows/s  MAP@3 {scores['baseline']:.4f}  (best of {args.repeat})")
    print(f"runtime  bundle, sorted batches:           {run:8.1f} rows/s  MAP@3 {scores['runtime']:.4f}  (best of {args.repeat})")
    print(f"speed-up {run / base:.2f}x, MAP@3 difference {scores['runtime'] - scores['baseline']:+.4f}")


if __name__ == "__main__":
    main()
