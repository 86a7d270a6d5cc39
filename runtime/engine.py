"""Batched inference: tokenize, sort by length, pad each batch to its own longest row, run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

log = logging.getLogger("mapbuild")
Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
    """The bundled tokenizer.json, truncating like training and padding nothing (batches pad themselves)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts))]


def batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Row indices per batch; sorted by length, similar rows share a batch and padding nearly vanishes."""
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64, right-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def run_batches(
    forward: Forward, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, sort: bool = True, desc: str = "infer"
) -> np.ndarray:
    """Logits of every row in input order."""
    out: np.ndarray | None = None
    for idx in tqdm(batches([len(s) for s in seqs], batch_size, sort), desc=desc, unit="batch", mininterval=2):
        logits = forward(*pad([seqs[i] for i in idx], pad_id))
        if out is None:
            out = np.empty((len(seqs), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def onnx_forward(path: str, threads: int = 0) -> Forward:
    """An onnxruntime session on CUDA when available, else CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # a broken CUDA install must cost speed, not the submission
        if providers == ["CPUExecutionProvider"]:
            raise
        log.warning("CUDA session failed (%s); falling back to CPU", str(e).splitlines()[0])
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    log.info("%s on %s", path, sess.get_providers()[0])
    return lambda ids, mask: sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
