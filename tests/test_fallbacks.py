"""The fallback chain under real fault injection: each fault costs accuracy, never the submission.
(Checksum mismatch: test_pipeline.py; a slow member against a deadline: test_plan.py.)"""

import json
import logging
import shutil

from runtime.data import read_rows
from runtime.labels import LabelSpace
from runtime.manifest import MANIFEST, hash_tree, load_manifest
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
