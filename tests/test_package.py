"""package: the bundle describes itself and carries only what it should."""

import json
import shutil

import nbformat
import pytest

from builder.stages import META
from runtime.manifest import check_files, load_manifest

from .conftest import rewrite_record


def test_bundle_describes_itself(tiny_pipeline):
    bundle = tiny_pipeline["bundle"]
    manifest = load_manifest(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert check_files(bundle, manifest, on_disk) == []
    member = manifest["members"][0]
    assert {"model", "tokenizer", "card"} == set(member["files"]) and member["template"] == "compact"
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
    from runtime.errors import MapbuildError

    runtime_copy = tmp_path / "runtime"
    shutil.copytree(builder.package.RUNTIME_DIR, runtime_copy, ignore=shutil.ignore_patterns("__pycache__"))
    (runtime_copy / "labels.py").write_text((runtime_copy / "labels.py").read_text() + f"\n# {KEYS[what]}\n")
    monkeypatch.setattr(builder.package, "RUNTIME_DIR", runtime_copy)
    with pytest.raises(MapbuildError, match="runtime/labels.py holds what looks like a credential"):
        builder.package.package([str(tiny_pipeline["onnx"])], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runtime"]  # nothing half-written


def test_package_refuses_a_member_file_that_is_a_symlink(tiny_pipeline, tmp_path):
    from builder.package import package
    from runtime.errors import MapbuildError

    member = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], member)
    (tmp_path / "kaggle.json").write_text(KEYS["kaggle.json"])
    (member / "tokenizer.json").unlink()
    (member / "tokenizer.json").symlink_to(tmp_path / "kaggle.json")
    rewrite_record(member, json.loads((member / META).read_text()))  # else refused as changed since export
    with pytest.raises(MapbuildError, match="tokenizer.json is a symlink"):
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("where", ["onnx metadata", "base_model", "chat prefix"])
def test_package_refuses_a_credential_in_what_it_writes_last(tiny_pipeline, tmp_path, where):
    """Before: .onnx files were never scanned, and base_model and the chat wrapper reached manifest.json after the
    scan."""
    import json

    import onnx

    from builder.package import package
    from runtime.cards import CARD
    from runtime.errors import MapbuildError

    member = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], member)
    if where == "onnx metadata":
        model = onnx.load(str(member / "model.onnx"))
        onnx.helper.set_model_props(model, {"note": KEYS["hugging face"]})
        onnx.save(model, str(member / "model.onnx"))
        rewrite_record(member, json.loads((member / META).read_text()))  # else refused as changed since export
    else:
        meta = json.loads((member / META).read_text())
        meta |= {"base_model": "org/" + KEYS["hugging face"]} if where == "base_model" else {"chat": {"prefix": KEYS["github"], "suffix": ""}}
        rewrite_record(member, meta)
    expected = {"onnx metadata": "model.onnx holds what looks like a credential in its metadata", "base_model": "manifest.json holds",
                "chat prefix": f"m0-bert-fp32/{CARD} holds"}[where]
    with pytest.raises(MapbuildError, match=expected):
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert not (tmp_path / "bundle").exists()


def test_fp16_advice_only_for_a_cpu_member_that_costs_hours(caplog):
    """The README's int8 MiniLM runs in minutes on the kernel's CPU: advising fp16 for it (as package did for every
    int8 member) is noise; an int8 member planned at hours there is worth the advice."""
    import logging

    from builder.package import check_plan
    from runtime.member import Member

    member = {"weight": 1.0, "precision": "int8", "params": 22 * 10**6, "mean_tokens": 60.0}
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        check_plan([Member(**member, name="minilm", cpu_rows_per_s=100.0), Member(**member, name="slow", cpu_rows_per_s=5.0)])
    advice = [r for r in caplog.records if "--quantize fp16" in r.getMessage()]
    assert [r.levelname for r in advice] == ["WARNING"] and "member slow" in advice[0].getMessage() and "2.2 h" in advice[0].getMessage()
    assert "member minilm (int8) runs on the kernel's CPU, planned at 400 s" in caplog.text


@pytest.mark.parametrize("lost", ["model.onnx", "tokenizer.json"])
def test_package_refuses_a_member_folder_missing_a_file_its_kind_needs(tiny_pipeline, tmp_path, lost):
    """Before: the filter meant for the optional .data file dropped any missing file, and the kernel ran on the prior."""
    from builder.package import package
    from runtime.errors import MapbuildError

    member = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], member)
    (member / lost).unlink()
    with pytest.raises(MapbuildError, match=f"^{member / lost}: missing since export wrote it"):
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    meta = json.loads((member / META).read_text())
    del meta["files"]  # a folder exported before custody records: its kind's list of files still holds
    rewrite_record(member, meta)
    with pytest.raises(MapbuildError, match=f"^{member}: {lost} is missing") as e:
        package([str(member)], tmp_path / "bundle", "tester/tiny-bundle", wheels=False)
    assert "\n" not in str(e.value) and not (tmp_path / "bundle").exists()
