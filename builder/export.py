"""`mapbuild export`: a merged model to ONNX (dynamic batch and sequence), optionally int8, with its drift measured."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.engine import encode, load_tokenizer, onnx_forward, run_batches
from runtime.labels import LabelSpace
from runtime.prompts import render

from .errors import MapbuildError
from .folds import assign_folds
from .stages import atomic_dir, read_meta, write_meta
from .train import load_labelled

PRECISIONS = ("fp32", "int8")


def held_out_rows(meta: dict, n: int) -> pd.DataFrame:
    """Up to n rows of the run's validation fold: real rows the model never trained on."""
    cfg = meta["config"]
    df = load_labelled(cfg["data"], cfg["limit"])
    return df[assign_folds(df, cfg["folds"], cfg["seed"]) == cfg["fold"]].head(n)


def to_onnx(model, path: Path) -> None:
    """TorchScript export with dynamic batch and sequence axes; inputs are input_ids and attention_mask."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    # The exporter restores the wrapper's training flag, and a fresh module trains: eval() keeps dropout off.
    wrapper = Logits(model).eval()
    dummy = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    torch.onnx.export(
        wrapper, dummy, str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes,
    )


def export(merged: str | os.PathLike, out: str | os.PathLike, quantize: str = "fp32", rows: int = 256) -> dict:
    """Write ONNX_DIR with model.onnx, tokenizer.json and the drift against PyTorch on held-out rows."""
    from transformers import AutoModelForSequenceClassification

    from .infer import torch_logits
    from .models import load_tokenizer as load_hf_tokenizer

    if quantize not in PRECISIONS:
        raise MapbuildError(f"--quantize must be one of {', '.join(PRECISIONS)}, got {quantize}")
    meta = read_meta(merged, "merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    sample = held_out_rows(meta, rows)
    texts = render(sample, meta["template"], LabelSpace.from_json(meta["label_space"]))
    hf_ids = load_hf_tokenizer(str(merged))(texts, truncation=True, max_length=meta["max_length"])["input_ids"]
    with atomic_dir(out) as tmp:
        shutil.copy(Path(merged) / "tokenizer.json", tmp / "tokenizer.json")
        ids = encode(load_tokenizer(tmp / "tokenizer.json", meta["max_length"]), texts)
        mismatched = sum(a != b for a, b in zip(ids, hf_ids))
        if mismatched:
            raise MapbuildError(f"{merged}/tokenizer.json: runtime tokenizer disagrees with the training tokenizer on {mismatched} of {len(ids)} rows")
        to_onnx(model, tmp / "model.onnx")
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(tmp / "model.onnx", tmp / "model.int8.onnx", weight_type=QuantType.QInt8)
            (tmp / "model.int8.onnx").replace(tmp / "model.onnx")
        pad_id = meta["pad_token_id"]
        reference = torch_logits(model, ids, pad_id, desc="torch")
        forward = onnx_forward(tmp / "model.onnx")
        start = time.perf_counter()
        got = run_batches(forward, ids, pad_id, 32, desc="onnx")
        seconds = time.perf_counter() - start
        drift = {
            "rows": len(ids),
            "max_abs_logit_diff": float(np.abs(got - reference).max()),
            "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
        }
        write_meta(tmp, {
            **meta,
            "stage": "onnx",
            "merged": str(Path(merged).resolve()),
            "precision": quantize,
            "drift": drift,
            "cpu_rows_per_s": round(len(ids) / seconds, 1),
        })
    return drift
