"""`mapbuild tfidf`: one TF-IDF + logistic-regression model per question, written straight as an ONNX member folder.

It trains in about two minutes on the full data and, blended with a fine-tuned encoder, adds what the encoder misses."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from runtime.data import labels_of
from runtime.labels import fit_label_space
from runtime.plan import KERNEL_THREADS
from runtime.tfidf import grams, tfidf_probs

from .folds import SplitConfig, check_rows, record_validation
from .options import require
from .stages import StageMeta, atomic_dir, provenance, write_meta

FILES = {"model": "model.onnx", "vocab": "tfidf.json"}  # the member folder, by role: what the bundle carries
PAD_BIAS = -1e4  # logit of the padding classes of questions with fewer labels than the widest


@dataclass
class TfidfConfig(SplitConfig):
    """A per-question TF-IDF + logistic-regression member, on the same folds as `mapbuild train`."""

    c: float = field(default=10.0, metadata={"help": "Inverse L2 strength of each question's logistic regression."})
    min_df: int = field(default=2, metadata={"help": "Keep n-grams seen in at least this many of a question's rows."})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            (self.c > 0, f"--c must be positive, got {self.c}"),
            (self.min_df >= 1, f"--min-df must be at least 1, got {self.min_df}"),
        )


class QuestionModel(NamedTuple):
    vec: Any  # TfidfVectorizer
    clf: Any  # LogisticRegression, or None for a question with a single label
    classes: np.ndarray  # label indices, in the order of the weights' rows
    coef: np.ndarray  # (classes, features)
    intercept: np.ndarray  # (classes,)


def docs(rows: pd.DataFrame) -> list[list[str]]:
    return [grams(t, a) for t, a in zip(rows["StudentExplanation"], rows["MC_Answer"])]


def fit_question(rows: pd.DataFrame, y: np.ndarray, cfg: TfidfConfig) -> QuestionModel:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer=lambda doc: doc, sublinear_tf=True, min_df=min(cfg.min_df, len(rows)))
    x = vec.fit_transform(docs(rows))
    classes = np.unique(y)
    if len(classes) == 1:
        return QuestionModel(vec, None, classes, np.zeros((1, x.shape[1])), np.zeros(1))
    clf = LogisticRegression(C=cfg.c, max_iter=3000).fit(x, y)
    if len(classes) == 2:  # one logit z: softmax([0, z]) gives the same two probabilities
        return QuestionModel(vec, clf, classes, np.vstack([np.zeros_like(clf.coef_), clf.coef_]), np.r_[0.0, clf.intercept_])
    return QuestionModel(vec, clf, classes, clf.coef_, clf.intercept_)


def scorer(fitted: dict[str, QuestionModel]) -> tuple[bytes, dict]:
    """The ONNX scorer over every question's columns, and the vocabulary file the runtime reads.

    Inputs: `columns` and `tf` (rows, k), a row's known n-grams, padded with the zero column; `question` (rows,).
    logits = l2_normalise(tf x idf) . W[columns] + bias[question], as scikit-learn's pipeline computes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = max(len(m.classes) for m in fitted.values())
    weights, idf, bias, questions, offset = [], [], [], {}, 0
    for q, (vec, _, classes, coef, intercept) in fitted.items():
        w = np.zeros((coef.shape[1], width), dtype=np.float32)
        w[:, : len(classes)] = coef.T
        weights.append(w)
        idf.append(vec.idf_.astype(np.float32))
        bias.append(np.r_[intercept, np.full(width - len(classes), PAD_BIAS)].astype(np.float32))
        questions[q] = {"offset": offset, "classes": classes.tolist(), "vocab": vec.get_feature_names_out().tolist()}
        offset += coef.shape[1]
    tables = {
        "W": np.vstack([*weights, np.zeros((1, width), dtype=np.float32)]),
        "IDF": np.r_[np.concatenate(idf), np.float32(0)].astype(np.float32),
        "BIAS": np.stack(bias),
        "AXIS1": np.array([1], dtype=np.int64),
        "AXIS2": np.array([2], dtype=np.int64),
        "EPS": np.array(1e-12, dtype=np.float32),
    }
    node = helper.make_node
    graph = helper.make_graph(
        [
            node("Gather", ["IDF", "columns"], ["idf"]),
            node("Mul", ["tf", "idf"], ["v"]),
            node("Mul", ["v", "v"], ["v2"]),
            node("ReduceSum", ["v2", "AXIS1"], ["sq"], keepdims=1),
            node("Sqrt", ["sq"], ["norm"]),
            node("Max", ["norm", "EPS"], ["safe"]),
            node("Div", ["v", "safe"], ["x"]),
            node("Unsqueeze", ["x", "AXIS2"], ["x3"]),
            node("Gather", ["W", "columns"], ["w"]),
            node("Mul", ["w", "x3"], ["wx"]),
            node("ReduceSum", ["wx", "AXIS1"], ["dot"], keepdims=0),
            node("Gather", ["BIAS", "question"], ["b"]),
            node("Add", ["dot", "b"], ["logits"]),
        ],
        "tfidf",
        [
            helper.make_tensor_value_info("columns", TensorProto.INT64, ["rows", "k"]),
            helper.make_tensor_value_info("tf", TensorProto.FLOAT, ["rows", "k"]),
            helper.make_tensor_value_info("question", TensorProto.INT64, ["rows"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", width])],
        [numpy_helper.from_array(v, k) for k, v in tables.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mapbuild")
    model.ir_version = 8  # onnxruntime 1.20, the oldest the kernel may have, reads IR 8-10
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(), {"pad_column": offset, "questions": questions}


def train_tfidf(cfg: TfidfConfig, out: str | os.PathLike) -> dict:
    """Fit every question's model on the training folds, export, validate through the runtime; returns the metrics."""
    split = cfg.split()
    tr, labels = split.train, split.labels
    index = {lab: i for i, lab in enumerate(labels)}
    y = labels_of(tr).map(index).to_numpy()
    start = time.perf_counter()
    fitted = {str(q): fit_question(rows, y[tr["QuestionId"].to_numpy() == q], cfg) for q, rows in tr.groupby("QuestionId")}
    seconds = time.perf_counter() - start
    model, vocab = scorer(fitted)
    with atomic_dir(out, "onnx") as tmp:
        (tmp / FILES["model"]).write_bytes(model)
        (tmp / FILES["vocab"]).write_text(json.dumps(vocab, ensure_ascii=False))
        check = check_rows(split, cfg.seed)
        start = time.perf_counter()
        probs = tfidf_probs(tmp / FILES["model"], tmp / FILES["vocab"], check, len(labels), threads=KERNEL_THREADS)
        rows_per_s = len(check) / (time.perf_counter() - start)
        metrics = record_validation(tmp, probs, split, seconds)
        write_meta(tmp, StageMeta(
            stage="onnx",
            kind="tfidf",
            provenance=provenance(cfg.data, len(split.rows)),
            run=str(Path(out).resolve()),  # its own out-of-fold file: there is no separate run folder
            model_type="tfidf",
            precision="fp32",
            label_space=fit_label_space(split.rows, labels).to_json(),
            config=asdict(cfg),
            metrics=metrics,
            drift={"max_abs_prob_diff": sklearn_drift(fitted, check, probs), "rows": len(check)},
            cpu_rows_per_s=round(rows_per_s, 1),
            cpu_threads=KERNEL_THREADS,
            # Estimated like a dense pass over every weight: a gather touches far fewer, so this is an upper bound.
            params=int(sum(m.coef.size for m in fitted.values())),
            mean_tokens=1.0,
        ))
    return metrics


def sklearn_drift(fitted: dict[str, QuestionModel], rows: pd.DataFrame, probs: np.ndarray) -> float:
    """The largest difference between the runtime's probabilities and scikit-learn's `predict_proba`."""
    worst = 0.0
    for q, part in rows[rows["QuestionId"].isin(list(fitted))].groupby("QuestionId"):
        m = fitted[q]
        p = m.clf.predict_proba(m.vec.transform(docs(part))) if m.clf else np.ones((len(part), 1))
        worst = max(worst, float(np.abs(probs[rows.index.get_indexer(part.index)][:, m.classes] - p).max()))
    return worst
