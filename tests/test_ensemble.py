"""Ensembles: combining members, fitting their weights on OOF rows, and the bundle that carries them."""

import json

import numpy as np
import pytest

from builder.ensemble import fit_pool, recipe, select
from runtime.data import read_rows
from runtime.ensemble import combine, parts, pool, rank_rows
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, run_kernel

RNG = np.random.default_rng(0)


def top1_score(truth):
    return lambda p: float((p.argmax(1) == truth).mean())


def test_combine_weights_probabilities_or_ranks():
    a = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    b = np.array([[0.0, 0.1, 0.9]], dtype=np.float32)
    assert np.allclose(combine([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    assert rank_rows(a).tolist() == [[1.0, 0.5, 0.0]]
    # b's confident 0.9 outweighs a under probability averaging, not under rank averaging
    assert combine([a, b], [1, 1]).argmax() == 2 and combine([a, b], [1, 1], "rank").argmax() == 0
    with pytest.raises(ValueError, match="prob, rank"):
        combine([a], [1], "vote")


def test_geo_is_the_renormalised_weighted_geometric_mean():
    a = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    b = np.array([[0.0, 0.1, 0.9]], dtype=np.float32)
    # weights 3 : 1 -> 0.75 : 0.25; b's 0 is floored at 1e-9 before the log
    u = [0.7**0.75 * 1e-9**0.25, 0.2**0.75 * 0.1**0.25, 0.1**0.75 * 0.9**0.25]
    assert np.allclose(combine([a, b], [3, 1], "geo"), [[x / sum(u) for x in u]], rtol=1e-5)
    # selection sums weighted log-probs (votes); they rank labels as the geometric mean does
    rng = np.random.default_rng(1)  # its own: RNG's draws pin the selection test's data
    p, q = rng.dirichlet(np.ones(8), 50), rng.dirichlet(np.ones(8), 50)
    votes = 3 * parts(p, "geo") + parts(q, "geo")
    assert (votes.argsort(1) == combine([p, q], [3, 1], "geo").argsort(1)).all()


def test_geo_prefers_a_label_both_members_find_plausible():
    a = np.array([[0.9, 0.1, 0.0]], dtype=np.float32)
    b = np.array([[0.05, 0.5, 0.45]], dtype=np.float32)
    # the mean follows a's confidence in label 0; the geometric mean, b's near veto of it
    assert combine([a, b], [1, 1]).argmax() == 0 and combine([a, b], [1, 1], "geo").argmax() == 1


def test_pool_is_a_softmax_of_scaled_log_probabilities_plus_bias_per_question():
    a = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], dtype=np.float32)
    b = np.array([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]], dtype=np.float32)
    params = {"1": {"scales": {"a": 2.0, "b": 0.5}, "bias": [0.0, 1.0, -1.0]}}
    got = pool([a, b], ["a", "b"], ["1", "2"], params, [1, 1])
    u = [0.7**2 * 0.2**0.5, 0.2**2 * 0.2**0.5 * np.e, 0.1**2 * 0.6**0.5 / np.e]
    v = [(0.5 * 0.1) ** 0.5, (0.3 * 0.1) ** 0.5, (0.2 * 0.8) ** 0.5]  # question 2 has no parameters: geo, 1 : 1
    assert np.allclose(got, [[x / sum(u) for x in u], [x / sum(v) for x in v]], rtol=1e-5)
    with pytest.raises(ValueError, match="use pool"):
        combine([a, b], [1, 1], "pool")


def test_fit_pool_learns_each_questions_members_and_label_offsets():
    rng = np.random.default_rng(2)
    n, labels = 4000, 4
    questions = np.repeat(["1", "2"], n // 2)
    y = np.where(questions == "1", rng.choice(labels, n, p=[0.7, 0.1, 0.1, 0.1]), rng.integers(0, labels, n))
    sharp = lambda rows: np.where(rows[:, None], np.eye(labels)[y] * 2 + rng.random((n, labels)), rng.random((n, labels)) * 3)
    a, b = sharp(questions == "1"), sharp(questions == "2")  # a knows question 1, b question 2, each guesses on the other
    logs = [np.log(p / p.sum(1, keepdims=True)) for p in (a, b)]
    mask = np.ones((n, labels), dtype=bool)
    params = fit_pool(logs, y, questions, mask, ["a", "b"])
    assert params["1"]["scales"]["a"] > 2 * params["1"]["scales"]["b"] and params["2"]["scales"]["b"] > 2 * params["2"]["scales"]["a"]
    # a member that knows nothing leaves only the labels' offsets: at the optimum they are the log-ratios of the
    # label counts, shrunk a little towards 0 by the L2 penalty
    flat = [np.full((n, labels), -np.log(labels))]
    bias = np.array(fit_pool(flat, y, questions, mask, ["flat"])["1"]["bias"])
    counts = np.bincount(y[questions == "1"], minlength=labels)
    offsets, ratios = bias - bias[1], np.log(counts / counts[1])
    assert np.allclose(offsets, ratios, atol=0.03) and 0 < offsets[0] < ratios[0]
    # a row whose label its mask rules out is left out, not fitted towards an impossible label
    ruled_out = mask.copy()
    ruled_out[:10, y[:10]] = False
    assert fit_pool(logs, y, questions, ruled_out, ["a", "b"])["1"]["bias"] == fit_pool([lp[10:] for lp in logs], y[10:], questions[10:], mask[10:], ["a", "b"])["1"]["bias"]


def test_a_recipe_is_the_same_whether_its_numbers_came_as_ints_or_floats():
    meta = lambda **config: {"kind": "transformer", "model_type": "bert", "precision": "int8", "config": {"seed": 42, "dedupe": True, **config}}
    assert recipe(meta(fold=0, epochs=3.0)) == recipe(meta(fold=2, epochs=3))
    assert recipe(meta(fold=0, epochs=3.0)) != recipe(meta(fold=0, epochs=2))
    assert recipe(meta(dedupe=True)) != recipe(meta(dedupe=1.0))


@pytest.mark.parametrize("kind, option", [("transformer", "candidate_loss"), ("tfidf", "dedupe")])
def test_a_fold_recorded_before_an_option_existed_is_the_same_recipe(kind, option):
    from dataclasses import asdict

    from builder.kinds import KINDS

    spec = KINDS[kind].config(data=str(SAMPLE_TRAIN), fold=1)
    old = {k: v for k, v in asdict(spec).items() if k != option}  # written before `option` was added, at its default
    meta = lambda config, fold: {"kind": kind, "model_type": "bert", "precision": "int8", "config": {**config, "fold": fold}}
    assert spec.matches(old) and recipe(meta(old, 0)) == recipe(meta(asdict(spec), 1))
    other = {**asdict(spec), option: not getattr(spec, option)}
    assert not spec.matches(other) and recipe(meta(other, 0)) != recipe(meta(asdict(spec), 1))

def test_selection_drops_a_useless_member_and_mixes_complementary_ones():
    truth = RNG.integers(0, 5, 400)
    good = np.eye(5)[truth] * 0.5 + RNG.random((400, 5)) * 0.6
    noise = RNG.random((400, 5))
    weights = select([good, noise], top1_score(truth))
    assert weights.tolist() == [1.0, 0.0]
    # each member knows half the rows: together they beat either alone
    half = np.arange(400) < 200
    left = np.where(half[:, None], np.eye(5)[truth], 0.2) + RNG.random((400, 5)) * 0.1
    right = np.where(~half[:, None], np.eye(5)[truth], 0.2) + RNG.random((400, 5)) * 0.1
    weights = select([left, right], top1_score(truth))
    score = top1_score(truth)
    assert (weights > 0).all() and score(combine([left, right], weights)) > max(score(left), score(right)) + 0.3


def test_the_kernel_ranks_by_the_manifests_pool(tiny_pipeline, tmp_path):
    import shutil

    import pandas as pd

    from runtime.labels import LabelSpace

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    labels, (member,) = manifest["label_space"]["labels"], manifest["members"]
    rows = read_rows(SAMPLE_TEST)
    # the member's scale 0 leaves the biases alone: each row's candidates in label-list order
    order = {"scales": {member["name"]: 0.0}, "bias": [-float(i) for i in range(len(labels))]}
    manifest["ensemble"] |= {"method": "pool", "questions": {q: order for q in rows["QuestionId"]}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "SKIPPED" not in done.stderr and "POOL" not in done.stderr, done.stderr[-2000:]
    mask = LabelSpace.from_json(manifest["label_space"]).candidate_mask(rows)
    first = [labels[np.flatnonzero(m)[0]] for m in mask]
    got = pd.read_csv(out, dtype=str).set_index("row_id").loc[rows["row_id"]].iloc[:, 0].str.split().str[0]
    assert got.tolist() == first
    # scales fitted with every member: with one lost (here a second copy whose model is broken), geo of the rest
    shutil.copytree(bundle / "models" / member["name"], bundle / "models" / "m1-copy")
    copy = member | {"name": "m1-copy", "files": {k: f.replace(member["name"], "m1-copy") for k, f in member["files"].items()}}
    manifest["files"] |= {copy["files"][k]: manifest["files"][f] for k, f in member["files"].items()}
    manifest["members"].append(copy)
    manifest["ensemble"]["questions"] = {q: order | {"scales": {member["name"]: 0.0, "m1-copy": 0.0}} for q in rows["QuestionId"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / copy["files"]["model"]).write_bytes(b"not a model")
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "SKIPPED member m1-copy" in done.stderr, done.stderr[-2000:]
    assert "POOL needs every member, 1 of 2 ran: the geo blend of those instead" in done.stderr
    assert check_submission(out, rows["row_id"].tolist()) == []


@pytest.mark.parametrize("method", ["rank", "pool"])
def test_two_run_bundle_reports_weights_and_runs_in_the_kernel(tiny_pipeline, tiny_bert, tmp_path, method, monkeypatch):
    from builder.export import export
    from builder.merge import merge
    from builder.package import package
    from builder.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), epochs=3, batch_size=16, learning_rate=3e-3, lora_r=4, seed=42, template="basic")
    train(cfg, tmp_path / "run")  # same fold as tiny_pipeline's run (same seed), another template
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32")
    dirs = [str(tiny_pipeline["onnx"]), str(tmp_path / "onnx")]
    if method == "pool":  # the sample's questions have 11-20 out-of-fold rows each: too few, so geo stands in
        assert package(dirs, tmp_path / "geo", "tester/tiny-ensemble", wheels=False, ensemble=method)["ensemble"]["method"] == "geo"
        monkeypatch.setattr("builder.ensemble.POOL_MIN_ROWS", 1)
    manifest = package(dirs, tmp_path / "bundle", "tester/tiny-ensemble", wheels=False, ensemble=method)
    e, members = manifest["ensemble"], manifest["members"]
    run_metrics = [json.loads((d / "metrics.json").read_text()) for d in (tiny_pipeline["run"], tmp_path / "run")]
    assert e["method"] == method and e["rows"] == run_metrics[0]["rows_valid"]
    assert sum(m["weight"] for m in members) == pytest.approx(1.0)
    assert len(members) + len(e["dropped"]) == 2
    assert all(0 < m["oof_map3"] <= 1 for m in members + e["dropped"])
    assert e["map3"] >= max(m["oof_map3"] for m in members) - 1e-9  # selection never ends below its best member
    assert 0 < e["map3_held_out"] <= 1  # one shared fold: fitted on one half of its rows, scored on the other
    out = tmp_path / "submission.csv"
    done = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "SKIPPED" not in done.stderr, done.stderr[-2000:]
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []
    if method == "pool":  # parameters for questions of the sample, each for every member the bundle kept
        assert e["questions"] and set(e["questions"]) <= set(read_rows(SAMPLE_TRAIN, labelled=True)["QuestionId"])
        assert all(set(prm["scales"]) == {m["name"] for m in members} for prm in e["questions"].values())


@pytest.mark.parametrize("method", ["prob", "rank", "geo"])
def test_weights_near_the_float_limit_blend_as_their_ratio(method):
    """Before: 1e308 + 1e308 summed to inf, every weight became 0, and the blend went uniform (or NaN)."""
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(6), size=20).astype(np.float32) for _ in range(2)]
    np.testing.assert_allclose(combine(probs, [1e308, 5e307], method), combine(probs, [2, 1], method), rtol=1e-6)
