"""Every registered family through train -> merge -> export -> runtime, as a tiny random model built in code."""

import json

import numpy as np
import pytest

from builder.export import export
from builder.infer import torch_logits
from builder.merge import load_lora_model, merge
from builder.models import FAMILIES
from builder.models import load_tokenizer as load_hf_tokenizer
from builder.train import TrainConfig, train
from runtime.data import read_rows
from runtime.engine import encode, load_tokenizer, onnx_forward, run_batches
from runtime.labels import LabelSpace
from runtime.prompts import render

from .conftest import SAMPLE_TRAIN, make_tiny

EDGE_TEXTS = ["", "x " * 400, "Ünïcödé ½ + ⅓ = ? 🙂", "  spaces  and\ttabs\nnewlines  "]


def fp16_fragile_nodes(path) -> list[str]:
    """Softmax, Tanh and LayerNormalization nodes that still compute in fp16."""
    import onnx

    from builder.export import FRAGILE_OPS

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    return [n.name for n in graph.node if n.op_type in FRAGILE_OPS and types.get(n.input[0]) == onnx.TensorProto.FLOAT16]


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - {"bert"}))  # bert: test_pipeline.py
def test_family_through_the_pipeline(model_type, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = make_tiny(model_type, tmp_path / "base")
    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=32)
    meta = json.loads((tmp_path / "onnx" / "mapbuild.json").read_text())
    assert meta["drift"]["max_abs_logit_diff"] < 1e-4 and meta["drift"]["top1_agreement"] == 1.0

    df = read_rows(SAMPLE_TRAIN, labelled=True).head(24)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat")) + EDGE_TEXTS
    hf_ids = load_hf_tokenizer(str(tmp_path / "merged"))(texts, truncation=True, max_length=meta["max_length"])["input_ids"]
    ids = encode(load_tokenizer(tmp_path / "onnx" / "tokenizer.json", meta["max_length"]), texts)
    assert ids == hf_ids

    lora = load_lora_model(tmp_path / "run")
    assert any(p.abs().max() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    pad_id = meta["pad_token_id"]
    batched = torch_logits(merged, ids, pad_id, batch_size=16, sort=False)
    assert np.abs(torch_logits(lora, ids, pad_id, batch_size=16, sort=False) - batched).max() < 1e-4
    assert np.abs(torch_logits(merged, ids, pad_id, batch_size=1) - batched).max() < 1e-4
    forward = onnx_forward(tmp_path / "onnx" / "model.onnx")
    onnx_batched = run_batches(forward, ids, pad_id, 16, sort=False)
    assert np.abs(run_batches(forward, ids, pad_id, 1) - onnx_batched).max() < 1e-4
    assert np.abs(onnx_batched - batched).max() < 1e-4

    # Quantized: a tiny random model's logits nearly tie, so the drift gate is forced off; its numbers are still
    # recorded, and padding must still change next to nothing. Dynamic int8 quantizes activations with one scale per
    # tensor, so batch mates move a row by up to about one quantization step: hence its looser bound.
    for precision, tolerance in (("fp16", 1e-2), ("int8", 5e-2), ("int4", 1e-2)):
        export(tmp_path / "merged", tmp_path / precision, precision, rows=32, force=True)
        drift = json.loads((tmp_path / precision / "mapbuild.json").read_text())["drift"]
        assert drift["rows"] == 32 and 0 < drift["max_abs_logit_diff"] < (0.05 if precision == "fp16" else 1.0), (precision, drift)
        forward = onnx_forward(tmp_path / precision / "model.onnx")
        quantized = run_batches(forward, ids, pad_id, 16, sort=False)
        assert np.abs(run_batches(forward, ids, pad_id, 1) - quantized).max() < tolerance, precision
        if precision == "fp16":
            assert not fp16_fragile_nodes(tmp_path / precision / "model.onnx")


def test_qlora_run_merges_into_the_weights_it_trained_on(tmp_path):
    """QLoRA through bitsandbytes' CPU kernels: the same code path as on CUDA, without a GPU."""
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from builder.models import Source, load_classifier
    from builder.stages import read_meta
    from builder.train import quantization_config

    base = make_tiny("llama", tmp_path / "base")
    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4, qlora=True), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    meta = read_meta(tmp_path / "run", "run")
    assert meta["config"]["qlora"] and meta["hardware"]["precision"] == "fp32"

    def with_adapter(quant):
        model, _ = load_classifier(Source(str(base)), meta["label_space"]["labels"], meta["pad_token_id"], quant)
        return PeftModel.from_pretrained(model, tmp_path / "run" / "adapter").eval()

    trained = with_adapter(quantization_config(True, "fp32"))  # the function training optimised: adapter on NF4 weights
    assert any(isinstance(m, Linear4bit) for m in trained.modules())
    for m in trained.modules():  # on AVX512-BF16 CPUs, eval-mode Linear4bit repacks to a bf16 kernel training never ran
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(24)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat"))
    ids = load_hf_tokenizer(str(tmp_path / "merged"))(texts, truncation=True, max_length=meta["max_length"])["input_ids"]
    pad_id = meta["pad_token_id"]
    expected = torch_logits(trained, ids, pad_id, batch_size=8)
    assert np.abs(torch_logits(merged, ids, pad_id, batch_size=8) - expected).max() < 1e-4
    # Merging into the original, unrounded weights would have moved the logits: the dequantized merge matters.
    assert np.abs(torch_logits(with_adapter(None), ids, pad_id, batch_size=8) - expected).max() > 1e-3
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=24)
    assert json.loads((tmp_path / "onnx" / "mapbuild.json").read_text())["drift"]["max_abs_logit_diff"] < 1e-4
