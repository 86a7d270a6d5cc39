"""A TF-IDF + logistic-regression member, one model per question: n-grams and vocabulary here, the scorer in ONNX.

The builder fits scikit-learn on `grams` below, so training and the kernel count the same features."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .engine import softmax
from .progress import progress

WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def grams(explanation: str, answer: str) -> list[str]:
    """Word 1-2 grams and in-word character 2-5 grams of the lowercased explanation, plus the chosen answer."""
    text = explanation.lower()
    words = WORD.findall(text)
    out = [f"w {w}" for w in words] + [f"w {a} {b}" for a, b in zip(words, words[1:])]
    for w in text.split():
        w = f" {w} "
        out += [f"c {w[i:i + n]}" for n in range(2, 6) for i in range(len(w) - n + 1)]
    return out + [f"a {answer}"]


def features(df: pd.DataFrame, vocab: dict[str, dict[str, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: the scorer's column of each known n-gram and its sublinear term frequency, 1 + log(count)."""
    rows = []
    for q, text, answer in zip(df["QuestionId"], df["StudentExplanation"], df["MC_Answer"]):
        known = vocab.get(q, {})
        counts = [(known[g], n) for g, n in Counter(grams(text, answer)).items() if g in known]
        cols, tf = zip(*counts) if counts else ((), ())
        rows.append((np.array(cols, dtype=np.int64), 1.0 + np.log(np.array(tf, dtype=np.float32))))
    return rows


def load(path: str | Path) -> dict:
    """The vocabulary file: per question its first column, n-grams in column order, and label indices."""
    spec = json.loads(Path(path).read_text())
    for q in spec["questions"].values():
        q["index"] = {g: q["offset"] + j for j, g in enumerate(q["vocab"])}
    return spec


def tfidf_probs(
    model: str | Path, vocab: str | Path, df: pd.DataFrame, labels: int, batch_size: int = 256, desc: str = "tfidf", threads: int = 0
) -> np.ndarray:
    """(rows, labels) probabilities. A question the member never saw gets a uniform row: it adds nothing to the
    ranking of an ensemble, and alone it leaves the ranking to the candidate mask and the tie order."""
    import onnxruntime as ort

    spec = load(vocab)
    questions = spec["questions"]
    feats = features(df, {q: s["index"] for q, s in questions.items()})
    probs = np.full((len(df), labels), 1.0 / labels, dtype=np.float32)
    seen = np.flatnonzero(df["QuestionId"].isin(list(questions)).to_numpy())
    position = {q: k for k, q in enumerate(questions)}
    classes = [s["classes"] for s in questions.values()]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])  # a gather and a sum: no GPU needed
    pad_col = spec["pad_column"]
    order = seen[np.argsort([len(feats[i][0]) for i in seen], kind="stable")]
    for start in progress(range(0, len(order), batch_size), desc):
        idx = order[start : start + batch_size]
        width = max(1, max(len(feats[i][0]) for i in idx))
        cols = np.full((len(idx), width), pad_col, dtype=np.int64)
        tf = np.zeros((len(idx), width), dtype=np.float32)
        for r, i in enumerate(idx):
            c, t = feats[i]
            cols[r, : len(c)], tf[r, : len(t)] = c, t
        question = np.array([position[df["QuestionId"].iat[i]] for i in idx], dtype=np.int64)
        local = softmax(sess.run(["logits"], {"columns": cols, "tf": tf, "question": question})[0])
        probs[idx] = 0.0
        for r, i in enumerate(idx):
            own = classes[question[r]]
            probs[i, own] = local[r, : len(own)]
    return probs

