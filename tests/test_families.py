"""Every registered family through train -> merge -> export -> runtime, as a tiny random model built in code."""

import json
from dataclasses import replace

import numpy as np
import pytest

from builder.export import export
from builder.torch_rows import torch_logits, training_ids, training_rows, whole
from builder.merge import load_trained_model, merge
from builder.models import FAMILIES, load_hf_tokenizer
from builder.train import TrainConfig, train
from runtime.data import read_rows
from runtime.engine import onnx_forward
from runtime.labels import LabelSpace
from runtime.member import PACKED, MemberSpec
from runtime.packing import PACKED_INPUTS
from runtime.predict import kernel_rows, prompts, run_rows
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


def kernel_feed(root, meta) -> list:
    """The kernel's rows of 24 sample prompts and the edge texts (as tails of a real head, for a packed member),
    checked against training's tokenizer."""
    df, spec = read_rows(SAMPLE_TRAIN, labelled=True).head(24), MemberSpec.from_json(meta)
    texts = prompts(spec, df, LabelSpace.from_json(meta["label_space"]))
    texts += [(texts[0][0], t) for t in EDGE_TEXTS] if spec.inputs == PACKED else EDGE_TEXTS
    rows = kernel_rows(root / "onnx-fp32" / "tokenizer.json", spec, texts)
    assert rows == training_rows(load_hf_tokenizer(str(root / "merged")), spec, texts)
    return rows


def onnx_logits(forward, meta, rows, batch_size, pack_tokens=4096):
    """Through the graph as the kernel feeds it: packs of up to `pack_tokens` for a packed member (0: one row a pack)."""
    return run_rows(forward, replace(MemberSpec.from_json(meta), pack_tokens=pack_tokens), rows, batch_size, "onnx")


# Quantized: a tiny random model's logits nearly tie, so the drift gate is forced off; its numbers are still
# recorded, and padding must still change next to nothing, in batches as the kernel runs them. An encoder's int8 is
# dynamic int8 (one scale a run: batched, it needed 5e-2), which the kernel runs a row at a time (max_batch 1); a
# decoder's, packed, quantizes each row's activations on its own, so batch mates move a row no more than in fp32.
TOLERANCE = {"fp16": 1e-2, "int8": 1e-3, "int4": 1e-2}
# `make test-fast`: every family but the Gemmas (their tiny models train slowest) in fp32, and every precision on
# one encoder and one decoder; the rest of the grid, Gemma 2's fp16 soft-capping trap included, is marked slow.
FAST = {(t, "fp32") for t in FAMILIES if not t.startswith("gemma")} | {(t, p) for t in ("modernbert", "llama") for p in TOLERANCE}
GRID = [
    pytest.param(t, p, marks=() if (t, p) in FAST else pytest.mark.slow)
    for t in sorted(set(FAMILIES) - {"bert"})  # bert: the tiny_pipeline fixture's tests
    for p in ("fp32", *TOLERANCE)
]


@pytest.mark.parametrize("model_type, precision", GRID)
def test_family_exports_at_each_precision(merged_family, model_type, precision):
    from transformers import AutoModelForSequenceClassification

    root = merged_family(model_type)
    if not (root / "onnx-fp32").exists():
        export(root / "merged", root / "onnx-fp32", "fp32", rows=32)
    meta = json.loads((root / "onnx-fp32" / "mapbuild.json").read_text())
    rows, pad_id = kernel_feed(root, meta), meta["pad_token_id"]
    ids = whole(MemberSpec.from_json(meta), rows)
    decoder = FAMILIES[model_type].kind == "decoder"
    assert (meta.get("inputs") == PACKED) == decoder  # decoders run packed, encoders padded
    if precision == "fp32":
        assert meta["drift"]["max_abs_logit_diff"] < 1e-4 and meta["drift"]["top1_agreement"] == 1.0
        lora = load_trained_model(root / "run")
        assert any(p.abs().max() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
        merged = AutoModelForSequenceClassification.from_pretrained(root / "merged").eval()
        batched = torch_logits(merged, ids, pad_id, batch_size=16, sort=False)
        assert np.abs(torch_logits(lora, ids, pad_id, batch_size=16, sort=False) - batched).max() < 1e-4
        assert np.abs(torch_logits(merged, ids, pad_id, batch_size=1) - batched).max() < 1e-4
        forward = onnx_forward(root / "onnx-fp32" / "model.onnx")
        assert forward.inputs == (PACKED_INPUTS if decoder else ("input_ids", "attention_mask"))
        onnx_batched = onnx_logits(forward, meta, rows, 16)
        assert np.abs(onnx_logits(forward, meta, rows, 1, pack_tokens=0) - onnx_batched).max() < 1e-4
        assert np.abs(onnx_batched - batched).max() < 1e-4  # packed ONNX against unpacked PyTorch
        return
    export(root / "merged", root / precision, precision, rows=32, force=True)
    drift = json.loads((root / precision / "mapbuild.json").read_text())["drift"]
    assert drift["rows"] == 32 and 0 < drift["max_abs_logit_diff"] < (0.05 if precision == "fp16" else 1.0), (precision, drift)
    own = json.loads((root / precision / "mapbuild.json").read_text())
    assert own.get("max_batch") == (1 if precision == "int8" and not decoder else None), own.get("max_batch")
    forward = onnx_forward(root / precision / "model.onnx")
    quantized = onnx_logits(forward, own, rows, 16)
    assert np.abs(onnx_logits(forward, own, rows, 1) - quantized).max() < TOLERANCE[precision], precision  # batch mates
    if decoder:  # pack mates: int8 moves a row by up to 4.5e-3 here (batch mates: 0.0), within its 5.6e-3 from fp32
        assert np.abs(onnx_logits(forward, meta, rows, 16, pack_tokens=0) - quantized).max() < 1e-2, precision
    if precision == "fp16":
        assert not fp16_fragile_nodes(root / precision / "model.onnx")


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
        model, _ = load_classifier(Source(str(base)), meta["label_space"]["labels"], meta["pad_token_id"], quantization_config=quant)
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
    ids = training_ids(load_hf_tokenizer(str(tmp_path / "merged")), texts, meta["max_length"])
    pad_id = meta["pad_token_id"]
    expected = torch_logits(trained, ids, pad_id, batch_size=8)
    assert np.abs(torch_logits(merged, ids, pad_id, batch_size=8) - expected).max() < 1e-4
    # Merging into the original, unrounded weights would have moved the logits: the dequantized merge matters.
    assert np.abs(torch_logits(with_adapter(None), ids, pad_id, batch_size=8) - expected).max() > 1e-3
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=24)
    assert json.loads((tmp_path / "onnx" / "mapbuild.json").read_text())["drift"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_a_16_bit_checkpoint_trains_merges_and_exports_in_the_dtypes_chosen_not_the_stored_one(tmp_path, stored):
    """transformers 5 loads a checkpoint in the dtype it stores: on a CPU a bf16 base trained in bf16, the run said
    fp32, and the fp32 export failed (ComplexDouble). fp16 training keeps fp32 master weights for the GradScaler."""
    import torch
    from safetensors import safe_open

    from builder.hardware import TRAIN_DTYPES
    from builder.models import Source, load_classifier
    from builder.stages import read_meta

    base = make_tiny("llama", tmp_path / "base", dtype=stored)
    assert json.loads((base / "config.json").read_text())["dtype"] == stored
    master, _ = load_classifier(Source(str(base)), ["a", "b"], 0, TRAIN_DTYPES["fp16"])
    assert {p.dtype for p in master.parameters()} == {torch.float32}

    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4), tmp_path / "run")
    hardware = read_meta(tmp_path / "run", "run")["hardware"]
    assert (hardware["precision"], hardware["dtype"]) == ("fp32", "float32")
    merge(tmp_path / "run", tmp_path / "merged")
    with safe_open(str(next((tmp_path / "merged").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    for precision, bound in (("fp32", 1e-4), ("fp16", 1e-2), ("int8", 5e-2)):
        export(tmp_path / "merged", tmp_path / precision, precision, rows=24, force=True)
        drift = json.loads((tmp_path / precision / "mapbuild.json").read_text())["drift"]
        assert drift["max_abs_logit_diff"] < bound and drift["reference"] == "PyTorch fp32 on cpu", (precision, drift)
