"""`mapbuild tokens`: prompt token lengths for a model and template, and what they mean for max_length, padding and
shared-prefix packing (runtime/packing.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.data import has_labels
from runtime.engine import batches
from runtime.files import atomic_write
from runtime.labels import LabelSpace, fit_label_space
from runtime.packing import Row, make_packs, pack_length, split_ids
from runtime.prompts import render, render_parts

from .chat import chat_parts
from .models import load_hf_tokenizer, resolve

CANDIDATES = (64, 96, 128, 192, 256, 384, 512)
# --pack-tokens values the packing table compares; 0 packs every row alone, so its row is the unpacked run.
PACK_SIZES = (0, 256, 512, 1024, 2048, 4096)
# split_ids' max_length when counting: long enough that no row is cut, so the counts are the prompts' own.
UNCUT = 10**6


def label_space_for(df: pd.DataFrame) -> LabelSpace:
    """Correctness from the rows' own labels; unlabelled rows (test.csv) render with an unknown verdict."""
    if has_labels(df):
        return fit_label_space(df)
    return LabelSpace(labels=[], correct={}, answers={}, misconceptions={}, counts=[])


def padding_waste(lengths: np.ndarray, batch_size: int, sort: bool, seed: int = 0) -> float:
    """Share of the padded batch cells that are padding, for shuffled or length-sorted batches."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    shuffled = lengths[order]
    padded = sum(len(b) * shuffled[b].max() for b in batches(shuffled, batch_size, sort=sort))
    return 1 - shuffled.sum() / padded


def token_lengths(df: pd.DataFrame, model: str, template: str, chat: bool = True) -> np.ndarray:
    """Untruncated token count of each row's prompt, special tokens included (one batch call to the fast tokenizer)."""
    tok = load_hf_tokenizer(resolve(model))
    texts = render(df, template, label_space_for(df), chat_parts(tok) if chat else None)
    return np.array([len(ids) for ids in tok(texts)["input_ids"]])


def split_rows(df: pd.DataFrame, model: str, template: str, chat: bool = True) -> list[Row]:
    """Each row's (head ids, tail ids), untruncated, split as training and the kernel split a packed member's rows."""
    from .torch_rows import hf_encoder  # imports torch: only for this count

    tok = load_hf_tokenizer(resolve(model))
    parts = render_parts(df, template, label_space_for(df), chat_parts(tok) if chat else None)
    return split_ids(hf_encoder(tok), parts, UNCUT)


def pack_report(rows: list[Row], sizes: tuple[int, ...] = PACK_SIZES) -> dict:
    """Tokens and attention per row, unpacked and at each pack size. Packing computes a question's head once per
    pack instead of once per row, but attention costs T^2 per pack of T tokens, and in a long pack most of those
    pairs are masked (rows never see each other): the table shows where larger packs stop paying."""
    lengths = np.array([len(h) + len(t) for h, t in rows], dtype=np.int64)
    tokens, attention = int(lengths.sum()), int((lengths**2).sum())
    packed = []
    for size in sizes:
        t = np.array([pack_length(rows, p) for p in make_packs(rows, size)], dtype=np.int64)
        packed.append({
            "pack_tokens": size,
            "packs": len(t),
            "tokens_per_row": float(t.sum() / len(rows)),
            "token_ratio": float(tokens / t.sum()),  # unpacked / packed: the saving in tokens computed
            "attention_per_row": float((t**2).sum() / len(rows)),
            "attention_ratio": float((t**2).sum() / attention),  # packed / unpacked: above 1, packing costs attention
        })
    return {"rows": len(rows), "tokens_per_row": float(tokens / len(rows)), "attention_per_row": float(attention / len(rows)), "packed": packed}


def token_report(lengths: np.ndarray, batch_size: int = 32) -> dict:
    """Percentiles, the share truncated at each candidate max_length, a recommendation and padding waste."""
    pct = {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 95, 99)}
    # Cover 99.5% of rows, rounded up to a multiple of 16 (tensor-core friendly); longer tails are truncated.
    recommended = int(math.ceil(np.percentile(lengths, 99.5) / 16) * 16)
    return {
        "rows": len(lengths),
        **pct,
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
        "truncated": {n: float((lengths > n).mean()) for n in CANDIDATES},
        "recommended_max_length": recommended,
        "padding_waste": {
            "random": round(padding_waste(lengths, batch_size, sort=False), 4),
            "sorted": round(padding_waste(lengths, batch_size, sort=True), 4),
        },
    }


def histogram(lengths: np.ndarray, report: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.hist(lengths, bins=min(60, int(lengths.max() - lengths.min()) + 1))
    for key, style in (("p50", ":"), ("p95", "--"), ("p99", "-.")):
        ax.axvline(report[key], color="k", linestyle=style, label=f"{key} {report[key]:.0f}")
    ax.axvline(report["recommended_max_length"], color="r", label=f"recommended max_length {report['recommended_max_length']}")
    ax.set(title=title, xlabel="tokens per prompt", ylabel="rows")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
