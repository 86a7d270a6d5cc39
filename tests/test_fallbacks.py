"""The fallback chain under real fault injection: each fault costs accuracy, never the submission.
(Checksum mismatch: test_pipeline.py; a slow member against a deadline: test_plan.py.)"""

import json
import logging
import shutil
from dataclasses import replace

from runtime.data import read_rows
from runtime.labels import LabelSpace
from runtime.manifest import MANIFEST, bundle_members, hash_tree, load_manifest
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, run_kernel


def damaged(tiny_pipeline, tmp_path, damage, rehash: bool):
    """A copy of the bundle with `damage` done to its member; `rehash` re-signs it, so only the damage is tested."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    manifest = load_manifest(bundle)
    damage(bundle, manifest["members"][0]["files"])
    if rehash:
        manifest["files"] = hash_tree(bundle)
        (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


def kernel_submits(bundle, tmp_path, *needles):
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    for n in needles:
        assert n in done.stderr, done.stderr[-2000:]
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []


def test_a_corrupted_onnx_file_whose_checksum_matches_is_skipped(tiny_pipeline, tmp_path):
    def truncate(bundle, files):
        model = bundle / files["model"]
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])

    kernel_submits(damaged(tiny_pipeline, tmp_path, truncate, rehash=True), tmp_path, "SKIPPED member", "NO MEMBER LEFT")


def test_a_missing_tokenizer_skips_its_member(tiny_pipeline, tmp_path):
    bundle = damaged(tiny_pipeline, tmp_path, lambda b, files: (b / files["tokenizer"]).unlink(), rehash=False)
    kernel_submits(bundle, tmp_path, "tokenizer.json: missing", "NO MEMBER LEFT")


def test_a_failing_cuda_provider_moves_inference_to_cpu(tiny_pipeline, monkeypatch, caplog):
    import onnxruntime as ort

    from runtime.predict import predict

    real = ort.InferenceSession

    def no_gpu(path, opts=None, providers=None, **kw):
        if providers and "CUDA" in str(providers[0]):
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real(path, opts, providers=providers, **kw)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # CUDA is asked for only where a GPU is visible
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", no_gpu)
    manifest = load_manifest(tiny_pipeline["bundle"])
    df = read_rows(SAMPLE_TEST)
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        probs, used = predict(tiny_pipeline["bundle"], manifest, LabelSpace.from_json(manifest["label_space"]), df)
    assert used == [manifest["members"][0]["name"]] and probs.shape[0] == len(df)
    assert "CUDA session failed (CUDA failure 100" in caplog.text and "on CPUExecutionProvider" in caplog.text
    assert "CUDA NOT ENGAGED" in caplog.text


def inf_logits(monkeypatch, rows: list[int]):
    """The member's ONNX outputs with an inf logit in `rows`, as fp16 overflow gives."""
    import runtime.predict

    real = runtime.predict.onnx_outputs

    def overflowing(*args, **kwargs):
        logits, provider = real(*args, **kwargs)
        logits[rows, 0] = float("inf")
        return logits, provider

    monkeypatch.setattr(runtime.predict, "onnx_outputs", overflowing)


def test_a_few_rows_of_nan_fall_back_to_the_prior_and_a_member_with_many_is_skipped(tiny_pipeline, monkeypatch, caplog):
    """One inf logit makes its row's softmax NaN, which a geo or pool blend spreads to every label, and top-3 then
    falls back to label order; never silently."""
    import numpy as np
    import pandas as pd

    from runtime.predict import MAX_BAD_ROWS, predict

    manifest = load_manifest(tiny_pipeline["bundle"])
    space = LabelSpace.from_json(manifest["label_space"])
    once = read_rows(SAMPLE_TEST)
    df = pd.concat([once.assign(row_id=once["row_id"] + f"-{i}") for i in range(10)], ignore_index=True)
    clean, _ = predict(tiny_pipeline["bundle"], manifest, space, df)
    assert 1 / len(df) <= MAX_BAD_ROWS < 3 / len(df)

    inf_logits(monkeypatch, [3])
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        probs, used = predict(tiny_pipeline["bundle"], manifest, space, df)
    assert used == [manifest["members"][0]["name"]] and np.isfinite(probs).all()
    assert np.allclose(probs[3], space.prior(1)[0]) and np.allclose(np.delete(probs, 3, 0), np.delete(clean, 3, 0))
    assert "1 of 160 rows have NaN or inf scores; they get the label prior's" in caplog.text

    caplog.clear()
    monkeypatch.undo()
    inf_logits(monkeypatch, [0, 1, 2])
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        probs, used = predict(tiny_pipeline["bundle"], manifest, space, df)
    assert used == [] and "SKIPPED member" in caplog.text and "3 of 160 rows have NaN or inf scores (more than 1%)" in caplog.text


def test_an_int8_member_runs_on_a_cpu_session_where_a_gpu_is_visible(tiny_pipeline, monkeypatch, caplog):
    """int8 is a CPU precision (dynamic int8's uint8 nodes had no CUDA kernels, and a CUDA session ran them on the
    CPU node by node while saying CUDA). It gets a CPU session, and says so."""
    import onnxruntime as ort

    from runtime.predict import onnx_outputs

    real, asked = ort.InferenceSession, []

    def recorded(path, opts=None, providers=None, **kw):
        asked.append([p[0] if isinstance(p, tuple) else p for p in providers])
        return real(path, opts, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", recorded)
    (member,) = bundle_members(load_manifest(tiny_pipeline["bundle"]))
    texts = read_rows(SAMPLE_TEST)["StudentExplanation"].tolist()
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        onnx_outputs(tiny_pipeline["bundle"], replace(member, precision="int8"), texts, 8, devices=2)
    assert asked == [["CPUExecutionProvider"]] and "int8, a CPU precision: it runs on a CPU session" in caplog.text
    asked.clear()
    onnx_outputs(tiny_pipeline["bundle"], replace(member, precision="fp16"), texts, 8, devices=1)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
