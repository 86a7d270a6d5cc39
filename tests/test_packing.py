"""Shared-prefix packing is exact for every decoder family: packed logits equal unpacked ones, in PyTorch and in
the exported ONNX graph, at several pack sizes, with rows of different lengths and packs of one row."""

import numpy as np
import pytest

from builder.chat import chat_parts
from builder.infer import hf_encoder, torch_logits
from builder.models import FAMILIES, load_hf_tokenizer
from builder.packed import PackedClassifier, example_inputs, torch_packed_logits
from runtime.data import read_rows
from runtime.engine import load_kernel_tokenizer, onnx_forward
from runtime.labels import fit_label_space
from runtime.packing import PACKED_INPUTS, kernel_encoder, make_packs, pack_feed, run_packs, split_ids
from runtime.prompts import render_parts

from .conftest import SAMPLE_TRAIN, make_tiny

DECODERS = sorted(t for t, f in FAMILIES.items() if f.kind == "decoder")
PACK_SIZES = (0, 96, 256, 4096)  # 0: every row alone; 4096: every question's rows in one pack


def test_packs_group_rows_by_head_and_respect_the_budget():
    rows = [([1, 2], [3] * n) for n in (5, 1, 9, 2)] + [([7], [8, 8])]
    packs = make_packs(rows, 10)
    assert sorted(i for _, m in packs for i in m) == list(range(5))
    assert all(len(h) + sum(len(rows[i][1]) for i in m) <= 10 or len(m) == 1 for h, m in packs)
    assert {h for h, _ in packs} == {(1, 2), (7,)} and all(len(m) == 1 for _, m in make_packs(rows, 0))


def test_a_packed_row_sees_the_head_and_itself_only():
    rows = [([1, 2], [3, 4]), ([1, 2], [5])]
    ids, pos, mask, last = pack_feed(rows, [((1, 2), [0, 1])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5]] and pos.tolist() == [[0, 1, 2, 3, 2]] and last.tolist() == [[3, 4]]
    assert mask[0, 0, 4].tolist() == [True, True, False, False, True]  # row 2 sees the head, not row 1
    assert mask[0, 0, 1].tolist() == [True, True, False, False, False]  # causal


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built = {}

    def get(model_type):
        if model_type not in built:
            import torch
            from transformers import AutoModelForSequenceClassification

            folder = make_tiny(model_type, tmp_path_factory.mktemp(model_type))
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=7).eval()
            tok = load_hf_tokenizer(str(folder))
            model.config.pad_token_id = tok.pad_token_id
            built[model_type] = folder, model, tok
        return built[model_type]

    return get


def sample_rows(tok, encode, n=40, max_length=250):
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(n)
    return split_ids(encode, render_parts(df, "basic", fit_label_space(df), chat_parts(tok)), max_length)


def packed_onnx(model, path):
    """The packed forward as ONNX, exported as the fp32 and int8 members are (TorchScript, opset 17)."""
    import torch

    axes = {"input_ids": {0: "packs", 1: "tokens"}, "position_ids": {0: "packs", 1: "tokens"},
            "attention_mask": {0: "packs", 2: "tokens", 3: "tokens"}, "last": {0: "packs", 1: "rows"}, "logits": {0: "packs", 1: "rows"}}
    torch.onnx.export(PackedClassifier(model).eval(), example_inputs(), str(path), dynamo=False, opset_version=17,
                      input_names=list(PACKED_INPUTS), output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("model_type", DECODERS)
def test_packed_logits_equal_unpacked_in_pytorch_and_onnx(family_model, model_type, tmp_path):
    import torch

    folder, model, tok = family_model(model_type)
    rows = sample_rows(tok, hf_encoder(tok))
    assert len({len(t) for _, t in rows}) > 5  # rows of different lengths
    pad = tok.pad_token_id
    unpacked = torch_logits(model, [h + t for h, t in rows], pad, batch_size=8)
    for size in PACK_SIZES:
        assert np.abs(torch_packed_logits(model, rows, pad, size, batch_rows=16) - unpacked).max() < 1e-4, size

    forward = onnx_forward(packed_onnx(model, tmp_path / "packed.onnx"))
    tok.save_pretrained(tmp_path / "tok")
    kernel_rows = sample_rows(tok, kernel_encoder(load_kernel_tokenizer(tmp_path / "tok" / "tokenizer.json", 250)))
    assert kernel_rows == rows  # the kernel's tokenizer splits exactly as training's
    for size in PACK_SIZES:
        assert np.abs(run_packs(forward, rows, pad, size, 16) - unpacked).max() < 1e-4, size


def test_a_decoder_bundle_runs_packed_and_scores_the_same_at_any_pack_size(tmp_path, caplog):
    """train -> merge -> export -> package -> kernel on a tiny llama in the context template: the member is packed
    from training on, and the kernel's pack size moves no score."""
    from builder.export import export
    from builder.merge import merge
    from builder.package import package
    from builder.train import TrainConfig, train
    from runtime.labels import LabelSpace
    from runtime.manifest import load_manifest, schema_problem
    from runtime.packing import PACK_TOKENS, PACKED
    from runtime.predict import predict

    base = make_tiny("llama", tmp_path / "base")
    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4, template="context"), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=32)
    package([str(tmp_path / "onnx")], tmp_path / "bundle", "tester/packed", wheels=False)
    manifest = load_manifest(tmp_path / "bundle")
    member = manifest["members"][0]
    assert (member["inputs"], member["pack_tokens"]) == (PACKED, PACK_TOKENS)
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = LabelSpace.from_json(manifest["label_space"])
    packed, used = predict(tmp_path / "bundle", manifest, space, df)
    alone, _ = predict(tmp_path / "bundle", manifest, space, df, pack_tokens=0)
    assert used == [member["name"]] and np.abs(packed - alone).max() < 1e-5
    assert member["mean_tokens"] < np.mean([len(h) + len(t) for h, t in split_ids(
        kernel_encoder(load_kernel_tokenizer(tmp_path / "onnx" / "tokenizer.json", 256)),
        render_parts(df, "context", space, member["chat"]), member["max_length"])])  # the plan counts packed tokens
    assert "inputs 'ragged'" in schema_problem(manifest | {"members": [member | {"inputs": "ragged"}]})

    # --pack-tokens 0 is re-planned at its own cost: a deadline its own pack size meets drops it before it starts
    import logging
    import time

    from runtime.packing import packed_tokens
    rows = split_ids(kernel_encoder(load_kernel_tokenizer(tmp_path / "onnx" / "tokenizer.json", 256)), render_parts(df, "context", space, member["chat"]), member["max_length"])
    cost = packed_tokens(rows, 0) / packed_tokens(rows, PACK_TOKENS)
    assert cost > 1.5
    planned = 600.0
    for plan in ("t4_seconds", "cpu_seconds"):
        manifest["estimate"][plan] = {member["name"]: planned * manifest["estimate"]["rows"] / len(df)}
    deadline = time.monotonic() + planned * (1 + cost) / 2
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        assert predict(tmp_path / "bundle", manifest, space, df, deadline=deadline)[1] == [member["name"]]
        assert predict(tmp_path / "bundle", manifest, space, df, deadline=deadline, pack_tokens=0)[1] == []
    assert f"planned at {cost:.2f}x its tokens" in caplog.text and f"DROPPED member {member['name']}" in caplog.text


def test_int8_moves_with_pack_mates_only_as_its_rounding_moves_with_last_bit_noise(family_model, tmp_path):
    """int8 packed logits differ from unpacked by about 1e-3 where fp32 ones differ by 1e-7: each row's activations
    are rounded to 8 bits, and a value by a rounding edge flips on fp32's reordering noise. Scaling the fp32
    embedding table by 1 + 1e-7 N(0, 1) and running unpacked moves int8 as far: the move is int8's, not packing's
    (a packing bug, a wrong mask say, moves logits by 1e-2 and more)."""
    import onnx

    from builder.export import int8_weights

    folder, model, tok = family_model("llama")
    rows, pad = sample_rows(tok, hf_encoder(tok), n=80), tok.pad_token_id
    fp32 = packed_onnx(model, tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    onnx.save(int8_weights(fp32, tmp_path), str(int8))

    def noisy(path, seed):
        m = onnx.load(str(path))
        table = next(i for i in m.graph.initializer if "embed_tokens" in i.name)
        w = onnx.numpy_helper.to_array(table)
        table.CopyFrom(onnx.numpy_helper.from_array(w * (1 + 1e-7 * np.random.default_rng(seed).standard_normal(w.shape)).astype(np.float32), table.name))
        onnx.save(m, str(out := tmp_path / f"noisy-{path.stem}-{seed}.onnx"))
        return out

    run = lambda path, size: run_packs(onnx_forward(path), rows, pad, size, 16)  # noqa: E731
    moves = {}
    for path in (fp32, int8):
        alone = run(path, 0)
        moves[path.stem] = (max(np.abs(run(path, size) - alone).max() for size in PACK_SIZES[1:]),
                            max(np.abs(run(noisy(path, seed), 0) - alone).max() for seed in range(3)))  # fmt: skip
    (fp32_packed, fp32_noise), (int8_packed, int8_noise) = moves["fp32"], moves["int8"]
    assert fp32_packed < 1e-5 and fp32_noise < 1e-5, moves
    assert int8_noise > 100 * fp32_noise and int8_packed <= 2 * int8_noise, moves
