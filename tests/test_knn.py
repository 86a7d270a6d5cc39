"""The kNN member: its vote against a hand computation, its stored table, the builder's export against PyTorch, and
a bundle with it run in the Kaggle twin."""

import json

import numpy as np
import pytest

from builder.knn import KnnConfig, torch_embeddings, train_knn
from builder.package import package
from runtime.data import read_rows
from runtime.errors import MapbuildError
from runtime.knn import check_settings, load_table, vote
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, input_device, run_kernel

TABLE = {
    "emb": np.array([[1.0, 0.0], [0.5, 0.866], [0.0, 1.0], [1.0, 0.0]], dtype=np.float16),
    "label": np.array([0, 1, 2, 1]),
    "question": np.array(["q1", "q1", "q1", "q2"]),
}


def test_vote_matches_a_hand_computation():
    query = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    questions = np.array(["q1", "q1", "q9"])
    candidates = np.array([[True, True, True], [False, True, True], [True, True, True]])
    got = vote(query, questions, candidates, TABLE, 3, k=2, power=2.0, prior_share=0.1)
    # Row 0: neighbours of similarity 1 (label 0) and 0.5 (label 1) weigh 1 and 0.25; q1's prior is a third each.
    prior = np.full(3, 1 / 3)
    np.testing.assert_allclose(got[0], 0.9 * np.array([1, 0.25, 0]) / 1.25 + 0.1 * prior, rtol=1e-5)
    # Row 1: label 0 is no candidate, so its row cannot vote; 0.5 (label 1) and 0 (label 2, weight 0) remain.
    np.testing.assert_allclose(got[1], 0.9 * np.array([0, 1, 0]) + 0.1 * prior, rtol=1e-5)
    # Row 2: a question never trained on is uniform (the candidate mask makes it per question).
    np.testing.assert_allclose(got[2], np.full(3, 1 / 3), rtol=1e-6)


def test_vote_without_a_positive_similarity_falls_back_to_the_prior():
    got = vote(np.array([[-1.0, 0.0]], dtype=np.float32), np.array(["q2"]), np.ones((1, 3), bool), TABLE, 3, k=5, power=1.0, prior_share=0.2)
    prior = (np.array([0, 1, 0]) + 1e-3) / (1 + 3e-3)
    np.testing.assert_allclose(got[0], prior, rtol=1e-5)


def test_table_and_settings_are_checked(tmp_path):
    np.savez(tmp_path / "ok.npz", **TABLE)
    assert load_table(tmp_path / "ok.npz", 3)["question"].dtype.kind == "U"
    with pytest.raises(ValueError, match="outside the 2 labels"):
        load_table(tmp_path / "ok.npz", 2)
    np.savez(tmp_path / "pickled.npz", emb=TABLE["emb"], label=TABLE["label"], question=np.array(["q1", 2, None, "q2"], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):  # numpy refuses to unpickle: nothing runs
        load_table(tmp_path / "pickled.npz", 3)
    assert check_settings({"k": 3, "power": 2, "prior_share": 0.1})
    for bad, word in [({"k": 0, "power": 2, "prior_share": 0.1}, "knn.k"), ({"k": 3, "power": 2, "prior_share": 1}, "prior_share"), ({"k": 3}, "exactly")]:
        with pytest.raises(ValueError, match=word):
            check_settings(bad)
    for bad, flag in [({"k": 0}, "--k 0 must"), ({"power": -1.0}, "--power -1.0 must"), ({"prior_share": 1.0}, "--prior-share 1.0 must")]:
        with pytest.raises(MapbuildError, match=flag):  # the builder's flags and the manifest share the bounds
            KnnConfig(data=str(SAMPLE_TRAIN), **bad)


@pytest.fixture(scope="module")
def member(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("knn") / "onnx"
    train_knn(KnnConfig(data=str(SAMPLE_TRAIN), model=str(tiny_bert), dedupe=False, max_length=64), out, quantize="fp32")
    return out


def test_member_folder_matches_pytorch_and_validates_through_the_kernel_scorer(member):
    meta = json.loads((member / "mapbuild.json").read_text())
    assert meta["kind"] == "knn" and meta["knn"] == {"k": 10, "power": 32.0, "prior_share": 0.05}
    assert meta["drift"]["min_cosine_to_torch"] > 0.9999  # fp32 ONNX: the same embedding as PyTorch
    table = load_table(member / "neighbours.npz", len(meta["label_space"]["labels"]))
    assert table["emb"].shape == (meta["metrics"]["rows_train"], 64) and np.load(member / "neighbours.npz")["emb"].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(table["emb"].astype(np.float32), axis=1), 1.0, atol=2e-3)
    oof = np.load(member / "oof.npz")
    assert oof["probs"].shape == (meta["metrics"]["rows_valid"], len(meta["label_space"]["labels"]))
    np.testing.assert_allclose(oof["probs"].sum(1), 1.0, atol=1e-5)
    assert meta["metrics"]["map3"] > meta["metrics"]["map3_prior"]  # neighbours carry the sample's labels


def test_a_decoder_is_refused(tmp_path):
    from .conftest import make_tiny

    llama = make_tiny("llama", tmp_path / "llama")
    with pytest.raises(MapbuildError, match="needs an encoder"):
        train_knn(KnnConfig(data=str(SAMPLE_TRAIN), model=str(llama)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embedding_inputs_go_to_the_models_device():
    """What a GPU encoder needs, checked without one: the ids reach a model on the meta device there."""
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).to("meta")
    assert input_device(model, lambda: torch_embeddings(model, [[1, 2, 3]], pad_id=0)) == torch.device("meta")


def test_bundle_with_a_knn_member_runs_in_the_kaggle_twin(member, tmp_path):
    bundle = tmp_path / "bundle"
    manifest = package([str(member)], bundle, "tester/knn-bundle", wheels=False)
    assert manifest["members"][0]["kind"] == "knn" and manifest["members"][0]["knn"]["k"] == 10
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.result["members_run"] == [manifest["members"][0]["name"]] and not done.result["faults"]
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"]) == []
    # A manifest whose vote settings were edited disagrees with the member's card: refused in one line.
    manifest["members"][0]["knn"]["k"] = 0
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out.unlink()
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 2 and "knn differs from models/" in done.stderr and not out.exists()


def test_two_worker_processes_give_exactly_the_single_device_votes(member, tmp_path):
    """The 2x T4 path (one encoder session per device), with CPU workers: the same embeddings, so the same votes."""
    from runtime.labels import LabelSpace
    from runtime.manifest import load_manifest
    from runtime.predict import predict

    package([str(member)], tmp_path / "bundle", "tester/knn-two", wheels=False)
    manifest = load_manifest(tmp_path / "bundle")
    space = LabelSpace.from_json(manifest["label_space"])
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    one, used_one = predict(tmp_path / "bundle", manifest, space, df, batch_size=16)
    two, used_two = predict(tmp_path / "bundle", manifest, space, df, batch_size=16, devices=2)
    assert used_one == used_two == [manifest["members"][0]["name"]]
    assert np.array_equal(one, two) and not np.allclose(one, one[:1])  # rows differ: the votes are real


def test_vote_with_power_0_gives_nothing_to_a_non_candidate():
    # 0 ** 0 == 1: a neighbour outside the candidates must still weigh 0, whatever the power
    candidates = np.array([[False, True, True]])
    got = vote(np.array([[1.0, 0.0]], dtype=np.float32), np.array(["q1"]), candidates, TABLE, 3, k=3, power=0, prior_share=0.1)
    # labels 1 and 2 vote 1 each (a plain majority at power 0); label 0 keeps its prior share alone
    np.testing.assert_allclose(got[0], 0.9 * np.array([0, 0.5, 0.5]) + 0.1 * np.full(3, 1 / 3), rtol=1e-5)


def test_its_cpu_pace_names_the_kernels_threads(member):
    from runtime.plan import KERNEL_THREADS

    meta = json.loads((member / "mapbuild.json").read_text())
    assert meta["cpu_rows_per_s"] > 0 and meta["cpu_threads"] == KERNEL_THREADS
