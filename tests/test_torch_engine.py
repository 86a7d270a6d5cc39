"""The torch engine (runtime.torch_engine): a transformer member run by PyTorch in the kernel, against the ONNX engine
on the same rows, and through export, package and the kernel (issue 42)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from builder.export import export
from builder.folds import across_questions
from builder.stages import StageMeta
from runtime.data import read_rows
from runtime.engine import CPU
from runtime.labels import LabelSpace
from runtime.member import TORCH, Member
from runtime.predict import onnx_outputs, prompts, torch_outputs
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, run_kernel

ENGINES = {"onnx": "onnx-fp32", TORCH: "torch-fp32"}  # engine -> its fp32 export in a merged_family folder


def exported(root, engine: str) -> Member:
    """The family's fp32 export for `engine`, as a bundle member whose files are paths under `root`."""
    folder = root / ENGINES[engine]
    if not folder.exists():
        export(root / "merged", folder, "fp32", rows=32, engine=engine)
    record = StageMeta.from_json(json.loads((folder / "mapbuild.json").read_text()))
    files = {role: f"{folder.name}/{f}" for role, f in {"model": "model.safetensors" if engine == TORCH else "model.onnx", "tokenizer": "tokenizer.json"}.items()}
    return Member(**record.spec(), name=f"m0-{engine}", files=files, weight=1.0)


def top3(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :3]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_the_torch_engine_gives_the_onnx_engines_top3_on_300_real_rows_packed_and_unpacked(merged_family, shared_train, model_type):
    root = merged_family(model_type)
    onnx, torch = exported(root, "onnx"), exported(root, TORCH)
    assert torch.engine == TORCH and torch.drift["torch_provider"] == CPU and torch.drift["max_abs_logit_diff"] < 1e-4
    df = across_questions(read_rows(shared_train, labelled=True), 300, seed=0)
    texts = prompts(onnx, df, LabelSpace.from_json(json.loads((root / "merged" / "mapbuild.json").read_text())["label_space"]))
    for pack_tokens in (None, 0):  # the member's own packs (512 tokens), then one row a pack
        by_onnx, _ = onnx_outputs(root, replace(onnx, pack_tokens=pack_tokens), texts, 16)
        by_torch, provider = torch_outputs(root, replace(torch, pack_tokens=pack_tokens), texts, 16)
        assert provider == CPU and by_torch.shape == by_onnx.shape == (300, by_onnx.shape[1])
        assert np.abs(by_torch - by_onnx).max() < 1e-4, (model_type, pack_tokens)
        assert (top3(by_torch) == top3(by_onnx)).all(), (model_type, pack_tokens)


def test_a_torch_member_travels_through_package_to_the_kernel_and_a_kernel_without_torch_skips_it_loudly(merged_family, tmp_path):
    from builder.package import package
    from runtime.manifest import load_manifest
    from runtime.predict import predict

    root = merged_family("llama")
    exported(root, TORCH), exported(root, "onnx")
    scores = {}
    for engine, folder in ENGINES.items():
        package([str(root / folder)], tmp_path / engine, f"tester/{engine}-bundle", wheels=False)
        manifest = load_manifest(tmp_path / engine)
        df = read_rows(SAMPLE_TEST)
        scores[engine], used = predict(tmp_path / engine, manifest, LabelSpace.from_json(manifest["label_space"]), df)
        assert used == [manifest["members"][0]["name"]]
    (member,) = manifest["members"]
    assert member["engine"] == TORCH and sorted(member["files"]) == ["card", "config", "model", "tokenizer"]
    assert member["files"]["model"].endswith("/model.safetensors") and member["precision"] == "fp32"
    assert np.abs(scores[TORCH] - scores["onnx"]).max() < 1e-5  # probabilities, through the bundle's own files
    out = tmp_path / "submission.csv"
    run = run_kernel(tmp_path / TORCH, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))  # the kernel's stack: no torch
    assert run.returncode == 0, run.stderr[-800:]
    skipped = f"SKIPPED member {member['name']}: ImportError: the torch engine needs torch and transformers"
    assert skipped in run.stderr and "NO MEMBER LEFT" in run.stderr, run.stderr[-800:]
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"]) == []
