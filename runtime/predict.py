"""Ensemble prediction over a bundle's members; a failing member costs accuracy, never the submission."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .engine import encode, load_tokenizer, onnx_forward, run_batches, softmax
from .labels import LabelSpace
from .manifest import check_files
from .prompts import render

log = logging.getLogger("mapbuild")


def member_probs(bundle: Path, member: dict, df: pd.DataFrame, space: LabelSpace, batch_size: int) -> np.ndarray:
    tok = load_tokenizer(bundle / member["files"]["tokenizer"], member["max_length"])
    seqs = encode(tok, render(df, member["template"], space))
    forward = onnx_forward(bundle / member["files"]["model"])
    return softmax(run_batches(forward, seqs, member["pad_token_id"], batch_size, desc=member["name"]))


def prior(space: LabelSpace, rows: int) -> np.ndarray:
    """Training label frequencies for every row; the candidate mask makes them per question and correctness."""
    p = np.asarray(space.counts, dtype=np.float32) + 1.0
    return np.tile(p / p.sum(), (rows, 1))


def predict(
    bundle: str | Path, manifest: dict, space: LabelSpace, df: pd.DataFrame, batch_size: int = 64
) -> tuple[np.ndarray, list[str]]:
    """Weighted mean of member probabilities, and the names of the members that ran."""
    bundle = Path(bundle)
    total, weights, used = np.zeros((len(df), len(space.labels)), dtype=np.float32), 0.0, []
    if df.empty:
        log.warning("no test rows: nothing to predict")
        return total, used
    for m in manifest["members"]:
        problems = check_files(bundle, manifest, list(m["files"].values()))
        if problems:
            log.error("SKIPPED member %s: %s", m["name"], "; ".join(problems))
            continue
        try:
            probs = member_probs(bundle, m, df, space, batch_size)
        except Exception as e:  # noqa: BLE001 - any member failure must leave the others and the prior
            log.error("SKIPPED member %s: %s: %s", m["name"], type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            continue
        total += m["weight"] * probs
        weights += m["weight"]
        used.append(m["name"])
    if not used:
        log.error("NO MEMBER LEFT: predicting the training label prior per question and correctness")
        return prior(space, len(df)), used
    return total / weights, used
