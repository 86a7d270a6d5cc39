"""End to end on the competition data with real MiniLM: the offline kernel run matches PyTorch."""

import json

import pandas as pd
import pytest

from builder.export import export, held_out_rows
from builder.torch_rows import torch_logits, training_ids
from builder.merge import merge
from builder.models import load_hf_tokenizer
from builder.package import package
from builder.train import TrainConfig, train
from runtime.data import labels_of, read_rows
from runtime.engine import softmax
from runtime.labels import LabelSpace
from runtime.metrics import map_at_3, masked_map3
from runtime.prompts import render
from runtime.submission import check_submission

from .conftest import run_kernel


@pytest.mark.slow
def test_offline_bundle_matches_pytorch_on_shared_data(shared_train, tmp_path):
    from transformers import AutoModelForSequenceClassification

    # A random sample: the file's first rows come from few questions, where the label prior is already strong.
    data = tmp_path / "train.csv"
    read_rows(shared_train, labelled=True).sample(1500, random_state=0).to_csv(data, index=False)
    train(TrainConfig(model="minilm", data=str(data), epochs=3, learning_rate=1e-3), tmp_path / "run")  # 1,200 rows: a short run
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=64)
    package([str(tmp_path / "onnx")], tmp_path / "bundle", "tester/minilm-e2e", wheels=False)

    meta = json.loads((tmp_path / "merged" / "mapbuild.json").read_text())
    rows = held_out_rows(meta, 200)
    test = tmp_path / "test.csv"
    rows.to_csv(test, index=False)
    out = tmp_path / "submission.csv"
    done = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(test), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, rows["row_id"].tolist()) == []
    truth = labels_of(read_rows(test, labelled=True)).tolist()
    kernel_map = map_at_3(truth, [p.split(" ") for p in pd.read_csv(out, dtype=str)["Category:Misconception"]])

    space = LabelSpace.from_json(meta["label_space"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = training_ids(load_hf_tokenizer(str(tmp_path / "merged")), render(rows, meta["template"], space, meta.get("chat")), meta["max_length"])
    probs = softmax(torch_logits(model, ids, meta["pad_token_id"]))
    torch_map = masked_map3(truth, probs, space.labels, space.candidate_mask(rows))
    assert abs(kernel_map - torch_map) <= 0.002, (kernel_map, torch_map)
    prior_map = masked_map3(truth, space.prior(len(rows)), space.labels, space.candidate_mask(rows))
    assert kernel_map > prior_map + 0.02, (kernel_map, prior_map)  # the model learned more than the label prior
