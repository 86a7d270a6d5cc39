"""The whole pipeline on a tiny random BERT: merge and export parity, the bundle, and the kernel run."""

import json
import os
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest

from builder.infer import torch_logits
from builder.merge import load_lora_model
from runtime.data import read_rows
from runtime.engine import encode, load_tokenizer, onnx_forward, pad
from runtime.labels import LabelSpace
from runtime.manifest import check_files, load_manifest
from runtime.prompts import render
from runtime.submission import check_submission

from .conftest import KERNEL_PYTHON, SAMPLE_TEST, SAMPLE_TRAIN, SANDBOX, run_kernel


def sample_ids(folder, meta):
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(40)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat"))
    return encode(load_tokenizer(folder / "tokenizer.json", meta["max_length"]), texts)


def test_merged_model_matches_lora_model(tiny_pipeline):
    from transformers import AutoModelForSequenceClassification

    lora = load_lora_model(tiny_pipeline["run"])
    trained = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in trained), "LoRA B is still zero: the merge test would prove nothing"
    merged = AutoModelForSequenceClassification.from_pretrained(tiny_pipeline["merged"]).eval()
    meta = json.loads((tiny_pipeline["merged"] / "mapbuild.json").read_text())
    ids = sample_ids(tiny_pipeline["merged"], meta)
    a, b = torch_logits(lora, ids, meta["pad_token_id"]), torch_logits(merged, ids, meta["pad_token_id"])
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a).max() > 1e-3  # the head survived: logits are not all zero


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
    assert "QAttention" in ops(tiny_pipeline["onnx-int8"])


def test_external_data_fp16_model_ships_and_runs_in_the_kernel(tiny_pipeline, tmp_path, monkeypatch):
    """Over 2 GiB a model keeps its weights in one model.onnx.data; shrink the limit to see the whole path."""
    import builder.export
    from builder.package import package

    monkeypatch.setattr(builder.export, "EXTERNAL_DATA_BYTES", 0)
    builder.export.export(tiny_pipeline["merged"], tmp_path / "onnx", "fp16", rows=16, force=True)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["mapbuild.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
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
    from builder.models import load_tokenizer as load_hf_tokenizer

    meta = json.loads((tiny_pipeline["merged"] / "mapbuild.json").read_text())
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat")) + ["x " * 500, ""]
    hf = load_hf_tokenizer(str(tiny_pipeline["merged"]))(texts, truncation=True, max_length=meta["max_length"])["input_ids"]
    assert encode(load_tokenizer(tiny_pipeline["merged"] / "tokenizer.json", meta["max_length"]), texts) == hf


def test_bundle_describes_itself(tiny_pipeline):
    bundle = tiny_pipeline["bundle"]
    manifest = load_manifest(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert check_files(bundle, manifest, on_disk) == []
    member = manifest["members"][0]
    assert {"model", "tokenizer"} == set(member["files"]) and member["template"] == "compact"
    assert {"onnxruntime", "tokenizers", "numpy", "torch"} <= set(manifest["versions"])
    assert manifest["estimate"]["rows"] == 40_000 and manifest["estimate"]["cpu_seconds"][member["name"]] > 0
    assert manifest["estimate"]["t4_seconds"][member["name"]] > 0 and member["params"] > 0 and member["mean_tokens"] > 0
    run = json.loads((tiny_pipeline["run"] / "metrics.json").read_text())
    assert member["weight"] == 1.0 and manifest["ensemble"]["rows"] == run["rows_valid"]
    assert member["oof_map3"] == pytest.approx(run["map3"], abs=0.05)  # OOF scored with the full data's label space
    kernel = json.loads((bundle / "kernel-metadata.json").read_text())
    assert kernel["enable_internet"] is False and kernel["enable_gpu"] is True
    assert kernel["competition_sources"] == ["map-charting-student-math-misunderstandings"]
    assert kernel["dataset_sources"] == ["tester/tiny-bundle"] and kernel["code_file"] == "submit.ipynb"
    dataset = json.loads((bundle / "dataset-metadata.json").read_text())
    assert dataset["id"] == "tester/tiny-bundle" and 6 <= len(dataset["title"]) <= 50 and len(dataset["licenses"]) == 1
    assert kernel["id"] == "tester/tiny-bundle-submit" and kernel["docker_image_pinning_type"] == "original"
    nb = nbformat.read(bundle / "submit.ipynb", as_version=4)
    nbformat.validate(nb)
    assert all(cell.get("id") for cell in nb.cells)  # nbformat's cell ids
    code = nb.cells[1].source
    assert "--no-index" in code and "runtime.preflight" in code and "runtime.submit" in code and '"tester/tiny-bundle"' in code
    compile(code, "submit.ipynb", "exec")


def test_kernel_run_writes_a_valid_submission(tiny_pipeline, tmp_path):
    out = tmp_path / "submission.csv"
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []
    assert "MAP@3 on labelled rows" in done.stdout and "SKIPPED" not in done.stderr


def test_kernel_sandbox_really_blocks_the_training_stack(tiny_pipeline):
    python = str(KERNEL_PYTHON if KERNEL_PYTHON.exists() else sys.executable)
    env = {**os.environ, "PYTHONPATH": str(SANDBOX)}
    for name in ("torch", "transformers", "peft", "builder"):
        done = subprocess.run([python, "-c", f"import {name}"], cwd=tiny_pipeline["bundle"], env=env, capture_output=True)
        assert done.returncode != 0, name


def write_test(path, rows):
    pd.DataFrame(rows, columns=["row_id", "QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]).to_csv(path, index=False)


def test_bad_rows_still_yield_valid_rows(tiny_pipeline, tmp_path):
    test, out = tmp_path / "test.csv", tmp_path / "submission.csv"
    q = "What is 3 + 4 x 2?"
    write_test(test, [
        [1, 9003, q, "11", ""],
        [2, 9003, q, "11", None],
        [3, 9003, q, "14", "because " * 1250],
        [4, 424242, "An unseen question", "7", "no idea"],
        [5, 9003, q, "999", "an unseen answer"],
        [5, 9003, q, "11", "a duplicate row_id"],
    ])
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(test), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, ["1", "2", "3", "4", "5", "5"]) == []
    assert "1 duplicate row_id" in done.stderr


def test_empty_test_file_gives_an_empty_submission_without_blaming_a_member(tiny_pipeline, tmp_path):
    test, out = tmp_path / "test.csv", tmp_path / "submission.csv"
    write_test(test, [])
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(test), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, []) == [] and "SKIPPED" not in done.stderr and "NO MEMBER LEFT" not in done.stderr


def test_missing_column_is_one_line_naming_it(tiny_pipeline, tmp_path):
    test = tmp_path / "test.csv"
    pd.read_csv(SAMPLE_TEST).drop(columns="StudentExplanation").to_csv(test, index=False)
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(test), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "missing column StudentExplanation" in done.stderr
    assert not (tmp_path / "s.csv").exists()


def test_corrupted_model_falls_back_to_the_prior(tiny_pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    model = bundle / load_manifest(bundle)["members"][0]["files"]["model"]
    model.write_bytes(model.read_bytes()[:1000])
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "sha256 mismatch" in done.stderr and "NO MEMBER LEFT" in done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []


def test_kernel_finds_bundle_and_test_under_kaggle_input(tiny_pipeline, tmp_path):
    root = tmp_path / "input"
    shutil.copytree(tiny_pipeline["bundle"], root / "datasets" / "tester" / "tiny-bundle")
    (root / "competitions" / "map-charting-student-math-misunderstandings").mkdir(parents=True)
    shutil.copy(SAMPLE_TEST, root / "competitions" / "map-charting-student-math-misunderstandings" / "test.csv")
    out = tmp_path / "submission.csv"
    done = run_kernel(root / "datasets" / "tester" / "tiny-bundle", "--input-root", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []


@pytest.mark.parametrize("missing", ["--bundle", "--test"])
def test_nothing_to_find_is_a_one_line_error(tiny_pipeline, tmp_path, missing):
    args = ["--input-root", str(tmp_path), "--out", str(tmp_path / "s.csv")]
    args += ["--test", str(SAMPLE_TEST)] if missing == "--bundle" else ["--bundle", "."]
    done = run_kernel(tiny_pipeline["bundle"], *args)
    assert done.returncode == 2 and done.stderr.startswith("error: no ") and missing in done.stderr


def test_package_copies_only_the_runtime_code(tiny_pipeline, tmp_path, monkeypatch):
    """Before: all of runtime/ was copied, kaggle.json or a config.txt with a key included."""
    import builder.package

    runtime_copy = tmp_path / "runtime"
    shutil.copytree(builder.package.RUNTIME_DIR, runtime_copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("kaggle.json", ".env", "config.txt"):
        (runtime_copy / name).write_text(KEYS["kaggle"])
    monkeypatch.setattr(builder.package, "RUNTIME_DIR", runtime_copy)
    manifest = builder.package.package([str(tiny_pipeline["onnx"])], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    shipped = sorted(f for f in manifest["files"] if f.startswith("runtime/"))
    assert shipped == sorted([f"runtime/{p.name}" for p in builder.package.RUNTIME_DIR.glob("*.py")] + ["runtime/requirements.txt"])


FAKE_KEY = "0" * 32  # assembled here, so that secret scanners reading this file find no key in it
KEYS = {
    "kaggle": "KAGGLE_KEY=" + FAKE_KEY,
    "kaggle.json": '{"username": "me", "key": "' + FAKE_KEY + '"}',
    "aws": '{"aws": "AKIAIOSFODNN7EXAMPLE"}',
    "ssh": "-----BEGIN OPENSSH PRIVATE KEY-----",
    "github": "token ghp_" + "a1" * 18,
    "hugging face": "hf_" + "Ab" * 17,
}


@pytest.mark.parametrize("what", list(KEYS))
def test_package_refuses_a_credential_inside_any_file(tiny_pipeline, tmp_path, monkeypatch, what):
    import builder.package
    from builder.errors import MapbuildError

    runtime_copy = tmp_path / "runtime"
    shutil.copytree(builder.package.RUNTIME_DIR, runtime_copy, ignore=shutil.ignore_patterns("__pycache__"))
    (runtime_copy / "labels.py").write_text((runtime_copy / "labels.py").read_text() + f"\n# {KEYS[what]}\n")
    monkeypatch.setattr(builder.package, "RUNTIME_DIR", runtime_copy)
    with pytest.raises(MapbuildError, match="runtime/labels.py holds what looks like a credential"):
        builder.package.package([str(tiny_pipeline["onnx"])], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runtime"]  # nothing half-written


def test_package_refuses_a_member_file_that_is_a_symlink(tiny_pipeline, tmp_path):
    from builder.errors import MapbuildError
    from builder.package import package

    member = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], member)
    (tmp_path / "kaggle.json").write_text(KEYS["kaggle.json"])
    (member / "tokenizer.json").unlink()
    (member / "tokenizer.json").symlink_to(tmp_path / "kaggle.json")
    with pytest.raises(MapbuildError, match="tokenizer.json is a symlink"):
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert not (tmp_path / "bundle").exists()


def test_two_worker_processes_give_exactly_the_single_device_result(tiny_pipeline):
    """The 2x T4 path with CPU workers: whole batches go to workers, so every row's probabilities are unchanged."""
    from runtime.predict import predict

    manifest = load_manifest(tiny_pipeline["bundle"])
    space = LabelSpace.from_json(manifest["label_space"])
    df = pd.concat([read_rows(SAMPLE_TRAIN, labelled=True)] * 2, ignore_index=True)  # duplicates too
    one, used_one = predict(tiny_pipeline["bundle"], manifest, space, df, batch_size=16)
    two, used_two = predict(tiny_pipeline["bundle"], manifest, space, df, batch_size=16, devices=2)
    assert used_one == used_two == [m["name"] for m in manifest["members"]]
    assert np.array_equal(one, two)


def test_gpu_count_reads_cuda_visible_devices(monkeypatch):
    from runtime.engine import gpu_count

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_count() == 0
