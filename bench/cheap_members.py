"""Issue 16, lever "diverse cheap members": out-of-fold files for a per-question kNN over all-MiniLM-L6-v2 sentence
embeddings (a settings grid for the `knn` member kind, whose vote it calls) and for TF-IDF variants, on the 5 folds
of build/cpu/tfidf, for bench/levers.py to blend.

    nice -n 15 python bench/cheap_members.py embed   # build/levers/emb_{expl,ans}.npz, and the seconds it took
    nice -n 15 python bench/cheap_members.py knn     # the settings grid, MAP@3 per fold; build/levers/knn/oof.npz
    nice -n 15 python bench/cheap_members.py tfidf   # build/levers/tfidf_{c3,c30,word,char}/oof.npz via train_tfidf

Every member trains on split_fold's training rows (cleaned as the real members are) and is scored on its held-out
fold with that fold's candidate mask (its label space fitted on the training folds alone).
The kNN settings are picked on the same rows they are scored on: a small grid, so a small optimism.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from builder.folds import FoldSplit, load_labelled, scheme_of, split_fold
from runtime.data import labels_of
from runtime.knn import vote
from runtime.metrics import masked_map3

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "levers"
EPS = 0.05  # share of the question's label prior mixed into kNN votes: no zero probabilities for geo blends
TEXTS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "expl": lambda df: df["StudentExplanation"],
    "ans": lambda df: df["MC_Answer"] + " | " + df["StudentExplanation"],
}


def split_config() -> dict:
    """Data, folds and seed of the existing cv runs: members must share them for their rows to line up."""
    cfg = json.loads((ROOT / "build/cpu/tfidf/fold0/onnx/mapbuild.json").read_text())["config"]
    return {k: cfg[k] for k in ("data", "folds", "seed", "sample", "dedupe")}


def splits() -> list[FoldSplit]:
    c = split_config()
    return [split_fold(c["data"], c["sample"], c["folds"], f, c["seed"], c["dedupe"], scheme=scheme_of(c)) for f in range(c["folds"])]


def embed(texts: list[str], batch: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised MiniLM embeddings (as sentence-transformers computes them), batches of similar length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from builder.models import resolve

    torch.set_num_threads(2)
    path = resolve("minilm").path
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts])  # little padding per batch
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            at = order[i : i + batch]
            enc = tok([texts[j] for j in at], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out[at] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    return out


def cmd_embed() -> None:
    c = split_config()
    df = load_labelled(c["data"], c["sample"], c["seed"])
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in TEXTS.items():
        unique, inverse = np.unique(text(df).to_numpy(str), return_inverse=True)  # duplicates embed once
        start = time.perf_counter()
        emb = embed(unique.tolist())
        took = time.perf_counter() - start
        np.savez(OUT / f"emb_{name}.npz", row_id=df["row_id"].to_numpy(str), emb=emb[inverse].astype(np.float16))
        print(f"{name}: {len(df)} rows, {len(unique)} unique texts embedded in {took:.1f} s ({len(unique) / took:.0f} texts/s)")


def knn_probs(s: FoldSplit, emb: pd.DataFrame, k: int, p: float, pool: str, eps: float = EPS) -> np.ndarray:
    """Held-out rows' probabilities from the kNN member's own vote (runtime.knn.vote) over these embeddings.
    pool "question": any training row of the question may vote; "cand" (what the member does): only those whose
    label is a candidate for the row (its correctness prefix), so that k is not spent on neighbours the mask drops."""
    index = {lab: i for i, lab in enumerate(s.labels)}
    table = {"emb": emb.loc[s.train["row_id"]].to_numpy(np.float32), "label": labels_of(s.train).map(index).to_numpy(), "question": s.train["QuestionId"].to_numpy(str)}
    cand = s.space.candidate_mask(s.valid) if pool == "cand" else np.ones((len(s.valid), len(s.labels)), dtype=bool)
    query = emb.loc[s.valid["row_id"]].to_numpy(np.float32)
    return vote(query, s.valid["QuestionId"].to_numpy(str), cand, table, len(s.labels), k, p, eps)


def score(s: FoldSplit, probs: np.ndarray) -> float:
    return masked_map3(labels_of(s.valid), probs, s.labels, s.space.candidate_mask(s.valid))


def row(name: str, scores: list[float], seconds: float) -> str:
    return f"{name:28s}" + "".join(f"{x:9.4f}" for x in scores) + f"{np.mean(scores):9.4f}{np.std(scores, ddof=1):9.4f}{seconds:9.1f}"


def header(n: int) -> str:
    return f"{'member':28s}" + "".join(f"{'fold ' + str(f):>9s}" for f in range(n)) + f"{'mean':>9s}{'± std':>9s}{'seconds':>9s}"


def save_oof(name: str, ss: list[FoldSplit], probs: list[np.ndarray]) -> None:
    (OUT / name).mkdir(parents=True, exist_ok=True)
    ids = np.concatenate([s.valid["row_id"].to_numpy(str) for s in ss])
    np.savez(OUT / name / "oof.npz", row_id=ids, probs=np.vstack(probs).astype(np.float32))


def cmd_knn(ks: list[int], ps: list[float], pools: list[str], texts: list[str], eps: float, out: str) -> None:
    ss = splits()
    print(header(len(ss)))
    best = (-1.0, "")
    for text in texts:
        z = np.load(OUT / f"emb_{text}.npz")
        emb = pd.DataFrame(z["emb"], index=z["row_id"])
        for pool in pools:
            for k in ks:
                for p in ps:
                    start = time.perf_counter()
                    probs = [knn_probs(s, emb, k, p, pool, eps) for s in ss]
                    took = time.perf_counter() - start
                    scores = [score(s, pr) for s, pr in zip(ss, probs)]
                    name = f"knn {text} {pool} k={k} p={p:g}" + (f" eps={eps:g}" if eps != EPS else "")
                    print(row(name, scores, took), flush=True)
                    if np.mean(scores) > best[0]:
                        best = (float(np.mean(scores)), name)
                        save_oof(out, ss, probs)
                        (OUT / out / "settings.txt").write_text(name + "\n")
    print(f"best: {best[1]} ({best[0]:.4f}), written to {OUT / out / 'oof.npz'}")


def cmd_tfidf(variants: list[str]) -> None:
    import builder.tfidf as tf

    full_docs = tf.docs
    # grams() prefixes word n-grams "w ", character n-grams "c ", the answer "a ": dropping a kind from the fitted
    # documents drops it from the vocabulary, and the runtime only counts n-grams in the vocabulary.
    keep = {"word": "wa", "char": "ca"}
    c = split_config()
    print(header(c["folds"]))
    for v in variants:
        C = 10.0 if v in keep else float(v[1:])
        tf.docs = (lambda rows, kinds=keep[v]: [[g for g in d if g[0] in kinds] for d in full_docs(rows)]) if v in keep else full_docs
        scores, fits, start = [], [], time.perf_counter()
        for f in range(c["folds"]):
            cfg = tf.TfidfConfig(data=c["data"], folds=c["folds"], fold=f, seed=c["seed"], sample=c["sample"], dedupe=c["dedupe"], c=C)
            m = tf.train_tfidf(cfg, OUT / f"tfidf_{v}" / f"fold{f}")
            scores.append(m["map3"])
            fits.append(m["train_seconds"])
        took = time.perf_counter() - start
        tf.docs = full_docs
        zs = [np.load(OUT / f"tfidf_{v}" / f"fold{f}" / "oof.npz") for f in range(c["folds"])]
        np.savez(OUT / f"tfidf_{v}" / "oof.npz", row_id=np.concatenate([z["row_id"] for z in zs]), probs=np.vstack([z["probs"] for z in zs]))
        print(row(f"tfidf {v}", scores, took) + f"   (fits alone: {sum(fits):.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["embed", "knn", "tfidf"])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 4.0, 16.0], help="similarity exponents of the votes")
    parser.add_argument("--pool", nargs="+", default=["question", "cand"], choices=["question", "cand"])
    parser.add_argument("--text", nargs="+", default=list(TEXTS), choices=list(TEXTS), help="what is embedded: the explanation, or answer | explanation")
    parser.add_argument("--eps", type=float, default=EPS, help="share of the question's label prior in the kNN's probabilities")
    parser.add_argument("--out", default="knn", help="folder under build/levers for the best kNN's oof.npz")
    parser.add_argument("--variants", nargs="+", default=["c3", "c30", "word", "char"], help="cC (a C, all n-grams) or word / char (C=10)")
    args = parser.parse_args()
    if args.step == "embed":
        cmd_embed()
    elif args.step == "knn":
        cmd_knn(args.k, args.p, args.pool, args.text, args.eps, args.out)
    else:
        cmd_tfidf(args.variants)


if __name__ == "__main__":
    main()
