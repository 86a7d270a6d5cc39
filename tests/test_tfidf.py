"""The TF-IDF member: its n-grams, its ONNX scorer against scikit-learn, odd rows, and the kernel run."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from builder.folds import assign_folds, load_labelled
from builder.package import package
from builder.tfidf import TfidfConfig, train_tfidf
from runtime.data import labels_of, read_rows
from runtime.errors import MapbuildError
from runtime.submission import check_submission
from runtime.tfidf import grams, tfidf_probs

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, rewrite_record, run_kernel


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfidf") / "onnx"
    train_tfidf(TfidfConfig(data=str(SAMPLE_TRAIN), dedupe=False, min_df=1), out)
    return out


def score(member, df: pd.DataFrame) -> np.ndarray:
    labels = json.loads((member / "mapbuild.json").read_text())["label_space"]["labels"]
    return tfidf_probs(member / "model.onnx", member / "tfidf.json", df, len(labels))


def test_grams_are_words_word_pairs_in_word_characters_and_the_answer():
    assert grams("Ab cd", "1/2") == [
        "w ab", "w cd", "w ab cd",
        "c  a", "c ab", "c b ", "c  ab", "c ab ", "c  ab ",
        "c  c", "c cd", "c d ", "c  cd", "c cd ", "c  cd ",
        "a 1/2",
    ]  # fmt: skip
    assert grams("I", "x") == ["c  i", "c i ", "c  i ", "a x"]  # one letter is no word, but still characters
    assert grams("", "") == ["a "]


def test_scorer_matches_a_scikit_learn_pipeline_fitted_apart(member):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    df = load_labelled(str(SAMPLE_TRAIN))
    fold = assign_folds(df, 5, 42)
    tr, va = df[fold != 0], df[fold == 0]
    labels = sorted(labels_of(df).unique())
    probs = score(member, va)
    compared = 0
    for q, rows in tr.groupby("QuestionId"):
        docs = lambda d: [grams(t, a) for t, a in zip(d["StudentExplanation"], d["MC_Answer"])]
        y = labels_of(rows).map(labels.index)
        held = va["QuestionId"].to_numpy() == q
        if y.nunique() < 2 or not held.any():
            continue
        vec = TfidfVectorizer(analyzer=lambda doc: doc, sublinear_tf=True)
        clf = LogisticRegression(C=10.0, max_iter=3000).fit(vec.fit_transform(docs(rows)), y)
        expected = clf.predict_proba(vec.transform(docs(va[held])))
        np.testing.assert_allclose(probs[held][:, clf.classes_], expected, atol=1e-5)
        assert probs[held][:, clf.classes_].sum(axis=1) == pytest.approx(1.0, abs=1e-5)  # nothing leaks elsewhere
        compared += held.sum()
    assert compared >= 0.8 * len(va)
    meta = json.loads((member / "mapbuild.json").read_text())
    assert meta["drift"]["max_abs_prob_diff"] < 1e-5 and meta["drift"]["rows"] == len(va)
    assert meta["metrics"]["map3"] > meta["metrics"]["map3_prior"]  # the sample's words carry the labels


def test_odd_rows_still_score_and_unseen_questions_stay_uniform(member):
    df = read_rows(SAMPLE_TEST).head(4).copy()
    df.loc[0, "StudentExplanation"] = ""
    df.loc[1, "StudentExplanation"] = "half " * 2000
    df.loc[2, "MC_Answer"] = "an answer nobody gave"
    df.loc[3, "QuestionId"] = "999999"
    probs = score(member, df)
    assert np.isfinite(probs).all() and probs.sum(axis=1) == pytest.approx(np.ones(4), abs=1e-5)
    assert np.allclose(probs[3], probs[3, 0]) and not np.allclose(probs[0], probs[0, 0])


def test_bundle_with_a_tfidf_member_runs_in_the_kernel(tiny_pipeline, member, tmp_path):
    manifest = package([str(tiny_pipeline["onnx"]), str(member)], tmp_path / "bundle", "tester/tfidf-ensemble", wheels=False)
    kept = {m["kind"]: m for m in manifest["members"]}
    assert "tfidf" in kept and set(kept["tfidf"]["files"]) == {"model", "vocab", "card"}
    assert all(f in manifest["files"] for f in kept["tfidf"]["files"].values())
    assert manifest["ensemble"]["map3"] >= kept["tfidf"]["oof_map3"] - 1e-9
    out = tmp_path / "submission.csv"
    done = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "SKIPPED" not in done.stderr, done.stderr[-2000:]
    assert kept["tfidf"]["name"] in done.stdout + done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []


def test_package_refuses_a_tfidf_member_without_its_vocabulary(member, tmp_path):
    lost = tmp_path / "onnx"
    shutil.copytree(member, lost)
    (lost / "tfidf.json").unlink()
    with pytest.raises(MapbuildError, match=f"^{lost}/tfidf.json: missing since tfidf wrote it"):  # its custody record
        package([str(lost)], tmp_path / "bundle", "tester/tfidf-ensemble", wheels=False)
    meta = json.loads((lost / "mapbuild.json").read_text())
    rewrite_record(lost, {k: v for k, v in meta.items() if k != "files"})  # written before custody records: its kind's files
    with pytest.raises(MapbuildError, match=f"^{lost}: tfidf.json is missing"):
        package([str(lost)], tmp_path / "bundle", "tester/tfidf-ensemble", wheels=False)


def test_its_cpu_pace_is_timed_on_the_kernels_threads_and_says_so(tmp_path, monkeypatch):
    import onnxruntime as ort

    from runtime.plan import KERNEL_THREADS

    threads, session = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, opts=None, **kw: threads.append(opts and opts.intra_op_num_threads) or session(path, opts, **kw))
    train_tfidf(TfidfConfig(data=str(SAMPLE_TRAIN), dedupe=False, min_df=1), tmp_path / "onnx")
    assert threads == [KERNEL_THREADS] and json.loads((tmp_path / "onnx" / "mapbuild.json").read_text())["cpu_threads"] == KERNEL_THREADS
