"""`mapbuild knn`: a k-nearest-neighbours member. A sentence encoder, exported to ONNX with its mean pooling, embeds
the training rows; in the kernel each row's nearest training rows of its question vote (runtime.knn).

Nothing is trained: the member costs one pass of the encoder over the data, about two minutes for MiniLM on
2 cores, and it errs differently from a fine-tuned classifier."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.data import labels_of
from runtime.errors import MapbuildError
from runtime.knn import SETTINGS, bad_setting, knn_text
from runtime.labels import fit_label_space
from runtime.member import Member
from runtime.plan import KERNEL_THREADS
from runtime.predict import knn_member_probs, onnx_outputs

from .export import EXPORT_PRECISIONS, checked_kernel_rows, max_batch_of, reference_model, write_onnx
from .folds import SplitConfig, across_questions, check_rows, record_validation
from .models import check_model, family_of, resolve
from .options import one_of, require
from .stages import StageMeta, atomic_dir, provenance, write_meta

FILES = {"model": "model.onnx", "tokenizer": "tokenizer.json", "neighbours": "neighbours.npz"}
DRIFT_ROWS = 256


@dataclass
class KnnConfig(SplitConfig):
    """A per-question nearest-neighbours member over sentence embeddings, on the same folds as `mapbuild train`."""

    model: str = field(default="minilm", metadata={"help": "Sentence-embedding encoder: an alias (`mapbuild models`) or a local folder; mean pooled."})
    k: int = field(default=10, metadata={"help": "Neighbours that vote, among the question's training rows with a candidate label."})
    power: float = field(default=32.0, metadata={"help": "A neighbour's vote is its cosine similarity to this power: near-duplicates dominate."})
    prior_share: float = field(default=0.05, metadata={"help": "Share of the question's label frequencies mixed into the votes: no candidate gets 0."})
    max_length: int = field(default=256, metadata={"help": "Tokens embedded per row (the encoder's own training length for all-MiniLM-L6-v2)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = bad_setting(self.settings())
        require((bad is None, bad and f"--{bad[0].replace('_', '-')} {bad[1]}"), (self.max_length >= 8, f"--max-length must be at least 8, got {self.max_length}"))
        check_model(self.model)

    def settings(self) -> dict:
        """The vote settings the manifest records and the kernel uses."""
        return {name: getattr(self, name) for name in SETTINGS}


def torch_embeddings(model, ids: list[list[int]], pad_id: int) -> np.ndarray:
    """The reference the ONNX encoder is checked against: the same pooling in PyTorch fp32, on the model's device."""
    import torch

    from runtime.engine import run_batches

    from .export import wrapped

    head = wrapped(model, pooled=True)
    device = next(head.parameters()).device
    with torch.inference_mode():
        forward = lambda i, m: head(torch.from_numpy(i).to(device), torch.from_numpy(m).to(device)).cpu().numpy()
        return run_batches(forward, ids, pad_id, 32, desc="torch")


def train_knn(cfg: KnnConfig, out: str | os.PathLike, quantize: str = "int8") -> dict:
    """Export the encoder, embed the training rows, validate the kernel's scorer on the held-out rows; the metrics."""
    one_of(quantize, EXPORT_PRECISIONS, "--quantize")
    source = resolve(cfg.model)
    model_type, family = family_of(source)
    if family.kind != "encoder" or source.gguf_file:
        raise MapbuildError(f"--model {cfg.model}: a kNN member needs an encoder (a sentence-embedding model), not a {model_type} decoder")
    split = cfg.split()
    tr, labels = split.train, split.labels
    encoder, _ = reference_model(source.path, pooled=True)  # the drift reference, and its pad id and size
    pad_id = encoder.config.pad_token_id or 0
    with atomic_dir(out, "onnx") as tmp:
        shutil.copy(Path(source.path) / "tokenizer.json", tmp / FILES["tokenizer"])
        check = check_rows(split, cfg.seed)
        drifted = across_questions(check, DRIFT_ROWS, cfg.seed)  # also where its tokens per row are counted
        member = Member(
            name="knn", kind="knn", files=FILES, weight=1.0, max_length=cfg.max_length, pad_token_id=pad_id, knn=cfg.settings(),
            precision=quantize, max_batch=max_batch_of(quantize, packed=False),  # the table's rows run as the kernel's will
        )
        ids = checked_kernel_rows(tmp / FILES["tokenizer"], source.path, member, knn_text(drifted))
        write_onnx(source.path, tmp / FILES["model"], quantize, family.ort_fusion, pooled=True)
        start = time.perf_counter()
        emb, _ = onnx_outputs(tmp, member, knn_text(tr), batch_size=64)
        seconds = time.perf_counter() - start
        index = {lab: i for i, lab in enumerate(labels)}
        np.savez(tmp / FILES["neighbours"], emb=emb.astype(np.float16), label=labels_of(tr).map(index).to_numpy(np.int32), question=tr["QuestionId"].to_numpy(str))
        start = time.perf_counter()
        probs, _ = knn_member_probs(tmp, member, check, split.space, batch_size=64, threads=KERNEL_THREADS)
        rows_per_s = len(check) / (time.perf_counter() - start)
        metrics = record_validation(tmp, probs, split, seconds)
        got, _ = onnx_outputs(tmp, member, knn_text(drifted), batch_size=32)
        cosine = (got * torch_embeddings(encoder, ids, pad_id)).sum(1)
        write_meta(tmp, StageMeta(
            stage="onnx",
            kind="knn",
            provenance=provenance(cfg.data, len(split.rows)),
            run=str(Path(out).resolve()),  # its own out-of-fold file: there is no separate run folder
            base_model=source.path,
            model_type="knn",
            precision=quantize,
            max_batch=member.max_batch,
            max_length=cfg.max_length,
            pad_token_id=pad_id,
            knn=member.knn,
            label_space=fit_label_space(split.rows, labels).to_json(),
            config=asdict(cfg),
            metrics=metrics,
            drift={"rows": len(got), "min_cosine_to_torch": float(cosine.min()), "mean_cosine_to_torch": float(cosine.mean())},
            cpu_rows_per_s=round(rows_per_s, 1),
            cpu_threads=KERNEL_THREADS,
            params=sum(p.numel() for p in encoder.parameters()),
            mean_tokens=round(float(np.mean([len(i) for i in ids])), 1),
        ))
    return metrics

