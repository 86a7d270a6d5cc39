import json

import numpy as np
import pytest

from builder.export import check_drift, measure_drift
from builder.torch_rows import training_ids
from runtime.data import read_rows
from runtime.engine import encode, load_kernel_tokenizer, onnx_forward, pad
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace
from runtime.prompts import render
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, rewrite_record, run_kernel, sample_ids

REF = np.tile(np.array([[3.0, 2.0, 0.0]], dtype=np.float32), (100, 1))


LABELS = ["a", "b", "c"]


def test_drift_gate_refuses_a_quantized_model_that_loses_map3_not_one_that_only_flips():
    got = REF.copy()
    got[:2] = [2.0, 3.0, 0.0]  # 2 of 100 rows now rank label b first
    allowed = np.ones_like(REF, dtype=bool)
    drift = measure_drift(got, REF, allowed, ["a"] * 100, LABELS)  # a is right: those 2 rows score 1/2, not 1
    assert drift["masked_top1_agreement"] == pytest.approx(0.98) and drift["max_abs_logit_diff"] == 1.0
    assert drift["map3_reference"] == 1.0 and drift["map3_onnx"] == pytest.approx(0.99)
    with pytest.raises(MapbuildError, match=r"--quantize int8 lowers MAP@3 from 1.0000 to 0.9900 on 100 .*--force"):
        check_drift(drift, "int8", force=False)
    check_drift(drift, "int8", force=True)
    with pytest.raises(MapbuildError, match=r"--quantize fp32 lowers MAP@3 .* report it"):  # fp32 is gated too
        check_drift(drift, "fp32", force=False)
    check_drift(measure_drift(got, REF, allowed, ["b"] * 2 + ["a"] * 98, LABELS), "int8", force=False)  # the same flips, now right
    check_drift(measure_drift(got, REF, allowed, ["a"] * 100, LABELS), "int8", force=False, max_drop=0.011)


def test_an_fp32_export_that_moves_the_kernels_top_label_is_refused_even_where_map3_holds():
    got = REF.copy()
    got[:2] = [2.0, 3.0, 0.0]
    truth = ["b"] * 2 + ["a"] * 98  # the flips land on the right label: MAP@3 rises
    drift = measure_drift(got, REF, np.ones_like(REF, dtype=bool), truth, LABELS)
    check_drift(drift, "int8", force=False)
    with pytest.raises(MapbuildError, match=r"^the fp32 export agrees with PyTorch fp32 on the top label of 0.980 of 100 .*--force"):
        check_drift(drift, "fp32", force=False)
    check_drift(drift, "fp32", force=True)
    got[1] = REF[1]  # one flip in 100: rounding's share
    check_drift(measure_drift(got, REF, np.ones_like(REF, dtype=bool), truth, LABELS), "fp32", force=False)


def test_flips_between_labels_the_mask_removes_do_not_count():
    got = REF.copy()
    got[:50] = [2.0, 3.0, 0.0]
    allowed = np.zeros_like(REF, dtype=bool)
    allowed[:, [0, 2]] = True  # label b is never a candidate: the kernel still predicts label a
    drift = measure_drift(got, REF, allowed, ["a"] * 100, LABELS)
    assert drift["top1_agreement"] == 0.5 and drift["masked_top1_agreement"] == 1.0
    assert drift["map3_onnx"] == drift["map3_reference"] == 1.0
    check_drift(drift, "int8", force=False)


def test_held_out_rows_of_a_sampled_run_go_on_past_its_fold_to_inputs_it_never_saw(tmp_path):
    import pandas as pd

    from builder.export import held_out_rows
    from builder.folds import input_key, split_fold

    df = pd.read_csv(SAMPLE_TRAIN, dtype=str, keep_default_na=False)
    data = tmp_path / "train.csv"  # every input twice, so some copies outside the sample repeat a training row; sorted by question as train.csv is
    pd.concat([df, df.assign(row_id=df["row_id"].astype(int) + 10_000)]).sort_values("QuestionId", kind="stable").to_csv(data, index=False)
    cfg = {"data": str(data), "sample": 60, "folds": 5, "fold": 0, "seed": 42, "fold_scheme": "stratified-group"}
    split = split_fold(str(data), 60, 5, 0, 42, dedupe=False)
    outside = read_rows(data, labelled=True).query("row_id not in @split.rows.row_id")
    assert input_key(outside).isin(set(input_key(split.train))).any()

    rows = held_out_rows({"config": cfg}, 400)
    assert rows["row_id"].head(len(split.valid)).tolist() == split.valid["row_id"].tolist()
    assert len(split.valid) < len(rows) < len(split.valid) + len(outside) and rows["row_id"].is_unique
    assert not input_key(rows).isin(set(input_key(split.train))).any()
    beyond = held_out_rows({"config": cfg}, len(split.valid) + 20).iloc[len(split.valid) :]
    assert len(beyond) == 20 and beyond["QuestionId"].nunique() == 4  # the rows outside the sample span its questions too
    few = held_out_rows({"config": cfg}, 5)
    assert few["row_id"].isin(split.valid["row_id"]).all() and few["QuestionId"].nunique() == min(5, split.valid["QuestionId"].nunique())


def test_the_export_sample_spans_every_question_of_the_fold_or_of_a_full_refit(tmp_path):
    """train.csv is sorted by question: the first rows of a fold are one or two questions, and the drift gate, the
    paces and the tokens per row were measured on them alone."""
    import pandas as pd

    from builder.export import held_out_rows
    from builder.folds import split_fold

    data = tmp_path / "train.csv"
    pd.read_csv(SAMPLE_TRAIN, dtype=str, keep_default_na=False).sort_values("QuestionId", kind="stable").to_csv(data, index=False)
    cfg = {"data": str(data), "folds": 5, "fold": 0, "seed": 42, "fold_scheme": "stratified-group"}
    valid = split_fold(str(data), None, 5, 0, 42, dedupe=False).valid
    assert valid["QuestionId"].nunique() == 4 and valid.head(12)["QuestionId"].nunique() == 1
    for full in (False, True):
        rows = held_out_rows({"config": {**cfg, "full": full}}, 12)
        assert len(rows) == 12 and rows["QuestionId"].nunique() == 4 and rows["row_id"].isin(valid["row_id"]).all() != full


def test_the_export_sample_of_the_real_data_holds_every_question_of_fold_0(shared_train):
    from builder.export import held_out_rows
    from builder.folds import split_fold

    cfg = {"data": str(shared_train), "folds": 5, "fold": 0, "seed": 42, "fold_scheme": "stratified-group"}
    valid = split_fold(str(shared_train), None, 5, 0, 42, dedupe=False).valid
    rows = held_out_rows({"config": cfg}, 1024)  # export's default --rows: questions 31772 and 31774 alone before
    assert len(rows) == 1024 and rows["row_id"].isin(valid["row_id"]).all()
    assert set(rows["QuestionId"]) == set(valid["QuestionId"]) and len(set(valid["QuestionId"])) == 15
    full = held_out_rows({"config": {**cfg, "full": True}}, 1024)  # question 31772 alone before
    assert full["QuestionId"].nunique() == 15


def test_a_cpu_pace_names_the_kernel_threads_it_was_timed_on(tiny_pipeline):
    from builder.build_plan import pace_notes
    from runtime.manifest import bundle_members, load_manifest
    from runtime.plan import KERNEL_THREADS

    for folder in ("onnx", "onnx-int8"):
        meta = json.loads((tiny_pipeline[folder] / "mapbuild.json").read_text())
        assert meta.get("cpu_threads") == (KERNEL_THREADS if meta.get("cpu_rows_per_s") else None)  # a CUDA pace has no threads
    (member,) = bundle_members(load_manifest(tiny_pipeline["bundle"]))  # the plan reads it from the bundle
    assert pace_notes({member.name: member}) == ([f"{member.name}: planned on the CPU at {member.cpu_rows_per_s:g} rows/s, timed on {KERNEL_THREADS} threads "
                                                 f"(the kernel has {KERNEL_THREADS} vCPUs)"] if member.cpu_rows_per_s else [])


def test_fragile_ops_run_in_fp32_inside_an_fp16_graph():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from builder.export import keep_fp32

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Softmax", ["t"], ["s"]), helper.make_node("Identity", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 4]) for n in ("t", "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert keep_fp32(proto) == 2
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.op_type in ("Tanh", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT and types[node.output[0]] == TensorProto.FLOAT
    assert inferred.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    value = np.array([[0.1, 2.0, -3.0, 9.5], [4.0, 4.0, 4.0, 4.0]], dtype=np.float16)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": value})[0]
    t = np.tanh(value.astype(np.float32))
    want = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    assert got.dtype == np.float16 and np.abs(got - want).max() < 1e-3


def test_onnx_matches_torch_and_padding_changes_nothing(tiny_pipeline):
    meta = json.loads((tiny_pipeline["onnx"] / "mapbuild.json").read_text())
    assert meta["drift"]["max_abs_logit_diff"] < 1e-4 and meta["drift"]["top1_agreement"] == 1.0
    int8 = json.loads((tiny_pipeline["onnx-int8"] / "mapbuild.json").read_text())
    assert int8["precision"] == "int8" and int8["drift"]["rows"] > 0
    assert (tiny_pipeline["onnx-int8"] / "model.onnx").stat().st_size < (tiny_pipeline["onnx"] / "model.onnx").stat().st_size
    forward = onnx_forward(tiny_pipeline["onnx"] / "model.onnx")
    seqs = sample_ids(tiny_pipeline["onnx"], meta)[:8]
    batch = forward(*pad(seqs, meta["pad_token_id"]))
    alone = np.concatenate([forward(*pad([s], meta["pad_token_id"])) for s in seqs])
    assert len({len(s) for s in seqs}) > 1  # the batch really is padded
    assert np.abs(batch - alone).max() < 1e-4


def test_run_records_its_hardware_and_bert_exports_fused_attention(tiny_pipeline):
    import onnx

    from builder.hardware import choose_precision, detect

    run = json.loads((tiny_pipeline["run"] / "mapbuild.json").read_text())
    assert run["hardware"]["device"] == detect().device and run["hardware"]["world_size"] == 1
    assert run["hardware"]["precision"] == choose_precision(detect())
    ops = lambda d: {n.op_type for n in onnx.load(d / "model.onnx").graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops(tiny_pipeline["onnx"])
    assert {"QAttention", "DynamicQuantizeLinear"} <= ops(tiny_pipeline["onnx-int8"])  # dynamic int8, its rows run alone


def test_external_data_fp16_model_ships_and_runs_in_the_kernel(tiny_pipeline, tmp_path, monkeypatch):
    """Over 2 GiB a model keeps its weights in one model.onnx.data; shrink the limit to see the whole path."""
    import builder.export
    from builder.package import package

    monkeypatch.setattr(builder.export, "EXTERNAL_DATA_BYTES", 0)
    builder.export.export(tiny_pipeline["merged"], tmp_path / "onnx", "fp16", rows=16, force=True)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["mapbuild.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    # Past the limit the exporter's data file is kept as it is and only the graph is edited: fp32 islands included.
    drift = json.loads((tmp_path / "onnx" / "mapbuild.json").read_text())["drift"]
    assert drift["max_abs_logit_diff"] < 1e-2 and drift["masked_top1_agreement"] == 1.0, drift
    builder.export.export(tiny_pipeline["merged"], tmp_path / "int4", "int4", rows=16, force=True)  # quantized from that file
    assert json.loads((tmp_path / "int4" / "mapbuild.json").read_text())["drift"]["max_abs_logit_diff"] < 1e-2
    assert sorted(p.name for p in (tmp_path / "int4").iterdir()) == ["mapbuild.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    manifest = package([str(tmp_path / "onnx")], tmp_path / "bundle", "tester/tiny-external", wheels=False)
    member = manifest["members"][0]
    assert member["precision"] == "fp16" and member["files"]["data"] in manifest["files"]
    result = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "sub.csv"))
    assert result.returncode == 0 and "SKIPPED" not in result.stderr, result.stderr[-2000:]
    assert check_submission(tmp_path / "sub.csv", read_rows(SAMPLE_TEST)["row_id"].tolist()) == []


def test_runtime_tokenizer_matches_training_tokenizer(tiny_pipeline):
    from builder.models import load_hf_tokenizer

    meta = json.loads((tiny_pipeline["merged"] / "mapbuild.json").read_text())
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat")) + ["x " * 500, ""]
    hf = training_ids(load_hf_tokenizer(str(tiny_pipeline["merged"])), texts, meta["max_length"])
    assert encode(load_kernel_tokenizer(tiny_pipeline["merged"] / "tokenizer.json", meta["max_length"]), texts) == hf


def test_a_rows_scores_do_not_depend_on_its_batch_mates(tiny_pipeline):
    """fp32: each of 40 rows alone, then all of them in one padded batch in random order."""
    meta = json.loads((tiny_pipeline["onnx"] / "mapbuild.json").read_text())
    seqs = sample_ids(tiny_pipeline["onnx"], meta)
    forward = onnx_forward(str(tiny_pipeline["onnx"] / "model.onnx"), gpu=False)
    alone = np.concatenate([forward(*pad([s], meta["pad_token_id"])) for s in seqs])
    order = np.random.default_rng(0).permutation(len(seqs))
    together = np.empty_like(alone)
    together[order] = forward(*pad([seqs[i] for i in order], meta["pad_token_id"]))
    assert len({len(s) for s in seqs}) > 5  # the batch really pads
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_the_kernel_runs_an_int8_members_rows_alone_so_no_batch_mate_moves_them(tiny_pipeline):
    """Dynamic int8 quantizes a run's activations with one scale, so its graph's scores move with a row's batch
    mates and their padding. The export records max_batch 1, and the kernel runs each row alone whatever
    --batch-size asks, on single-threaded sessions side by side: its scores are each row's alone, to the bit."""
    from runtime.engine import SessionThreads
    from runtime.member import Member, MemberSpec
    from runtime.predict import onnx_outputs, onnx_session, shut

    folder = tiny_pipeline["onnx-int8"]
    meta = json.loads((folder / "mapbuild.json").read_text())
    member = Member(name="int8", files={"model": "model.onnx", "tokenizer": "tokenizer.json"}, weight=1.0, **MemberSpec.from_json(meta).spec())
    assert member.max_batch == 1
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(40)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat"))
    seqs = sample_ids(folder, meta)
    forward = onnx_forward(str(folder / "model.onnx"), gpu=False)
    alone = np.concatenate([forward(*pad([s], meta["pad_token_id"])) for s in seqs])
    assert not np.allclose(forward(*pad(seqs, meta["pad_token_id"])), alone, atol=1e-5)  # the graph itself depends on its batch
    for batch_size in (64, 7, 1):
        got, provider = onnx_outputs(folder, member, texts, batch_size, threads=2)
        assert np.array_equal(got, alone) and provider == "CPUExecutionProvider", batch_size
    with shut(onnx_session(folder / "model.onnx", member, threads=2)) as threads:
        assert isinstance(threads, SessionThreads) and threads.workers == 2  # one session, two rows at once


def test_an_int8_bundle_runs_its_rows_alone_on_the_kernels_oldest_stack(tiny_pipeline, tmp_path):
    """The kernel's own process (runtime.submit on .venv-kernel: onnxruntime 1.22, no torch) runs a dynamic int8
    member a row a run from a thread per core, and writes a valid submission."""
    from builder.package import package

    package([str(tiny_pipeline["onnx-int8"])], tmp_path / "bundle", "tester/tiny-int8", wheels=False)
    result = run_kernel(tmp_path / "bundle", "--bundle", ".", "--test", str(SAMPLE_TRAIN), "--out", str(tmp_path / "sub.csv"))
    assert result.returncode == 0 and "SKIPPED" not in result.stderr and "each row alone" in result.stderr, result.stderr[-2000:]
    assert check_submission(tmp_path / "sub.csv", read_rows(SAMPLE_TRAIN)["row_id"].tolist()) == []


def test_an_all_nan_model_fails_the_export_gate_even_forced(tiny_pipeline, tmp_path):
    """Before: NaN compares false against every threshold, so int8 reported top-1 agreement 1.000 and passed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from builder.export import export

    merged = tmp_path / "merged"
    shutil.copytree(tiny_pipeline["merged"], merged)
    weights = load_file(merged / "model.safetensors")
    weights["classifier.bias"] = torch.full_like(weights["classifier.bias"], float("nan"))
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    rewrite_record(merged, json.loads((merged / "mapbuild.json").read_text()))  # as a merge of a run that diverged
    with pytest.raises(MapbuildError, match=f"^{merged}: .*NaN or inf") as e:
        export(merged, tmp_path / "onnx", "int8", rows=64, force=True)
    assert "\n" not in str(e.value) and not (tmp_path / "onnx").exists()


def test_package_refuses_a_member_whose_recorded_drift_is_not_finite(tiny_pipeline, tmp_path):
    import shutil

    from builder.package import package

    member = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], member)
    meta = json.loads((member / "mapbuild.json").read_text())
    meta["drift"]["max_abs_logit_diff"] = float("nan")
    rewrite_record(member, meta)
    with pytest.raises(MapbuildError, match=f"^{member}: its recorded drift has max_abs_logit_diff = nan"):
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)


def test_inf_in_either_logits_is_refused_and_a_nan_drop_fails_the_gate():
    from builder.export import check_finite

    bad = REF.copy()
    bad[3, 1] = np.inf
    for got, ref, what in [(bad, REF, "ONNX"), (REF, bad, "PyTorch fp32")]:
        with pytest.raises(MapbuildError, match=f"^m: its {what} logits hold NaN or inf on 1 of 100"):
            check_finite(got, ref, "m")
    with pytest.raises(MapbuildError, match="lowers MAP@3"):
        check_drift({"map3_reference": 1.0, "map3_onnx": float("nan"), "rows": 1}, "int8", force=False)


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_a_model_whose_fp16_activations_overflow_is_refused_in_one_line_naming_the_layer(merged_family, tmp_path, engine):
    """A tiny Llama whose layer 1 MLP writes values past fp16's 65,504 into the residual stream, which the final
    norm scales back: fp32 logits stay finite, so only the activations show that a T4 would compute inf there
    (this CPU computes fp16 torch weights in fp32, so the export's own run cannot show it). Its fp16 export is
    refused naming that module; fp32 passes (the same rows, no limit)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from builder.export import export

    merged = tmp_path / "merged"
    shutil.copytree(merged_family("llama") / "merged", merged)
    weights = load_file(merged / "model.safetensors")
    for proj in ("gate", "up", "down"):  # x200 each: the MLP's output x8e6, its weights still inside fp16 (under 20)
        weights[f"model.layers.1.mlp.{proj}_proj.weight"] *= 200
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    rewrite_record(merged, json.loads((merged / "mapbuild.json").read_text()))
    with pytest.raises(MapbuildError, match=r"^--quantize fp16: model\.layers\.1\.mlp\.down_proj reaches \d\.\d+e\+0[5-9] on \d+ of \d+ held-out rows \(row_id \d+") as e:
        export(merged, tmp_path / "fp16", "fp16", rows=64, engine=engine)
    assert "\n" not in str(e.value) and "past fp16's largest 65,504" in str(e.value) and not (tmp_path / "fp16").exists()
    export(merged, tmp_path / "fp32", "fp32", rows=64, engine=engine)
