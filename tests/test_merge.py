"""merge: the LoRA adapter folded into its base model."""

import json

import numpy as np
import torch

from builder.torch_rows import torch_logits
from builder.merge import load_trained_model

from .conftest import SAMPLE_TRAIN, sample_ids


def test_merged_model_matches_lora_model(tiny_pipeline):
    from transformers import AutoModelForSequenceClassification

    lora = load_trained_model(tiny_pipeline["run"])
    trained = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in trained), "LoRA B is still zero: the merge test would prove nothing"
    merged = AutoModelForSequenceClassification.from_pretrained(tiny_pipeline["merged"]).eval()
    meta = json.loads((tiny_pipeline["merged"] / "mapbuild.json").read_text())
    ids = sample_ids(tiny_pipeline["merged"], meta)
    a, b = torch_logits(lora, ids, meta["pad_token_id"]), torch_logits(merged, ids, meta["pad_token_id"])
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a).max() > 1e-3  # the head survived: logits are not all zero


def test_full_fine_tuning_trains_every_weight_and_merges_as_it_is(tiny_bert, tmp_path):
    """--lora-r 0: no adapter; the run keeps whole weights, which moved from the base model's, and merge keeps them."""
    from transformers import AutoModelForSequenceClassification

    from builder.merge import merge
    from builder.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), epochs=1, batch_size=16, learning_rate=1e-3, lora_r=0)
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / "adapter").exists()
    merge(tmp_path / "run", tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(base.state_dict()[name], merged.state_dict()[name])  # LoRA would leave it for the adapter
    meta = json.loads((tmp_path / "merged" / "mapbuild.json").read_text())
    ids = sample_ids(tmp_path / "merged", meta)
    trained = load_trained_model(tmp_path / "run")
    assert np.abs(torch_logits(trained, ids, meta["pad_token_id"]) - torch_logits(merged, ids, meta["pad_token_id"])).max() < 1e-5
