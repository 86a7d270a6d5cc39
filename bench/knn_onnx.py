"""What shipping bench/cheap_members.py's kNN member offline would take: all-MiniLM-L6-v2 with mean pooling and L2
normalisation exported to ONNX (fp32, and int8 as builder/export.py quantizes), run through the runtime's own path
(tokenizers + onnxruntime: runtime.engine), its embeddings' drift from torch's, the kNN's MAP@3 on them, and the
sizes of what a bundle would carry.

    nice -n 15 python bench/knn_onnx.py [--text ans --k 10 --p 32 --pool cand]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cheap_members import OUT, TEXTS, knn_probs, score, split_config, splits  # noqa: E402

from builder.folds import load_labelled  # noqa: E402
from runtime.data import labels_of  # noqa: E402
from runtime.engine import encode, load_kernel_tokenizer, onnx_forward, run_batches  # noqa: E402


def export(folder: Path) -> dict[str, Path]:
    """model.onnx whose "logits" output is the (batch, 384) unit embedding: runtime.engine.onnx_forward reads it."""
    import onnx
    import torch
    from transformers import AutoModel

    from builder.export import int8_weights
    from builder.models import resolve

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)

    folder.mkdir(parents=True, exist_ok=True)
    model = Pooled(AutoModel.from_pretrained(resolve("minilm").path)).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # trace the padded path too
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    paths = {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx"}
    torch.onnx.export(model, (torch.ones(2, 8, dtype=torch.long), mask), str(paths["fp32"]), dynamo=False, opset_version=17,
                      dynamic_axes=axes, input_names=["input_ids", "attention_mask"], output_names=["logits"])
    onnx.save_model(int8_weights(onnx.load(str(paths["fp32"])), folder), str(paths["int8"]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="ans", choices=list(TEXTS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--p", type=float, default=32.0)
    parser.add_argument("--pool", default="cand", choices=["question", "cand"])
    args = parser.parse_args()

    from builder.models import resolve

    c = split_config()
    df = load_labelled(c["data"], c["sample"], c["seed"])
    texts = TEXTS[args.text](df).tolist()
    ref = np.load(OUT / f"emb_{args.text}.npz")["emb"].astype(np.float32)  # torch's, from cheap_members.py embed
    tok = load_kernel_tokenizer(str(Path(resolve("minilm").path) / "tokenizer.json"), 256)
    ids = encode(tok, texts)
    ss = splits()
    print(f"{'embedder':10s}{'MB':>8s}{'seconds':>9s}{'rows/s':>8s}{'min cos':>9s}" + "".join(f"{'fold ' + str(f):>9s}" for f in range(len(ss))) + f"{'mean':>9s}")
    for name, path in export(OUT / "onnx").items():
        start = time.perf_counter()
        emb = run_batches(onnx_forward(str(path), threads=2), ids, pad_id=0, batch_size=64, desc=name)
        took = time.perf_counter() - start
        table = pd.DataFrame(emb, index=df["row_id"].to_numpy(str))
        scores = [score(s, knn_probs(s, table, args.k, args.p, args.pool)) for s in ss]
        cos = (emb * ref).sum(1).min()  # both unit vectors
        print(f"{name:10s}{path.stat().st_size / 2**20:8.1f}{took:9.1f}{len(df) / took:8.0f}{cos:9.4f}" + "".join(f"{x:9.4f}" for x in scores) + f"{np.mean(scores):9.4f}")
    # What a bundle would store besides the encoder: every training row's embedding (fp16) and label index (int16),
    # grouped by question; the full refit's rows, deduplicated as training deduplicates them.
    full = df.drop_duplicates(["QuestionId", "MC_Answer", "StudentExplanation", "Category", "Misconception"])
    keep = df.index.get_indexer(full.index)
    label = pd.Index(sorted(labels_of(df).unique())).get_indexer(labels_of(full)).astype(np.int16)
    np.savez_compressed(OUT / "onnx" / "store.npz", emb=ref[keep].astype(np.float16), label=label, question=full["QuestionId"].to_numpy(str))
    print(f"store: {len(full)} rows x {ref.shape[1]} fp16 = {len(full) * ref.shape[1] * 2 / 2**20:.1f} MB raw, "
          f"{(OUT / 'onnx' / 'store.npz').stat().st_size / 2**20:.1f} MB compressed npz; "
          f"tokenizer.json {(Path(resolve('minilm').path) / 'tokenizer.json').stat().st_size / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
