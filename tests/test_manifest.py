"""The manifest's structure, checked once at load: a broken manifest is one line, a broken member is skipped."""

import json
import shutil

import pytest

from runtime.manifest import MANIFEST

from .conftest import SAMPLE_TEST, run_kernel


def with_manifest(tiny_pipeline, tmp_path, edit):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps(edit(manifest)))
    return bundle


def without(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def relabel(m, labels):
    m["label_space"]["labels"] = labels
    m["label_space"]["counts"] = [1] * len(labels)
    return m


@pytest.mark.parametrize("edit, error", [
    (lambda m: [m], "format 'list'"),
    (without("members"), "needs label_space (an object), members (a non-empty list) and files"),
    (without("label_space"), "needs label_space"),
    (without("files"), "needs label_space"),
    (lambda m: m | {"estimate": m["estimate"] | {"rows": 0}}, "estimate.rows 0 must be a positive integer"),
    (lambda m: m | {"ensemble": m["ensemble"] | {"method": "vote"}}, "ensemble method 'vote' is not one of prob, rank"),
    (lambda m: m | {"members": [m["members"][0] | {"weight": float("nan")}]}, "weight nan must be a finite number above 0"),
    (lambda m: m | {"members": [m["members"][0] | {"weight": 0}]}, "weight 0 must be"),
    (lambda m: relabel(m, m["label_space"]["labels"][:-1] + ["True_Correct:has space"]), "label 'True_Correct:has space' is not Category:Misconception"),
    (lambda m: relabel(m, ["A:x", "A:x", "B:y"]), "at least 3 distinct labels"),
    (lambda m: relabel(m, ["A:x", "B:y"]), "at least 3 distinct labels"),
])
def test_a_broken_manifest_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path, edit, error):
    """Before: each of these was a traceback, or (the label with a space) an invalid file left at --out."""
    bundle = with_manifest(tiny_pipeline, tmp_path, edit)
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 2 and error in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr[-1500:]
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_member_wider_than_the_label_list_is_skipped_loudly(tiny_pipeline, tmp_path):
    bundle = with_manifest(tiny_pipeline, tmp_path, lambda m: relabel(m, m["label_space"]["labels"][:-1]))
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    n = len(json.loads((bundle / MANIFEST).read_text())["label_space"]["labels"])
    assert done.returncode == 0 and f"SKIPPED member m0-bert-fp32: ValueError: it gives {n + 1} scores per row for {n} labels" in done.stderr


def test_a_public_bundle_names_no_build_machine_path(tiny_pipeline, tmp_path):
    """Before: base_model and dropped members' dir were the build machine's absolute paths."""
    from builder.package import package

    manifest = package([str(tiny_pipeline["onnx"]), str(tiny_pipeline["onnx"])], tmp_path / "bundle", "me/no-paths", wheels=False)
    text = (tmp_path / "bundle" / MANIFEST).read_text()
    assert '": "/' not in text and str(tmp_path) not in text and str(tiny_pipeline["onnx"]) not in text
    base = manifest["members"][0]["base_model"]
    assert not base.startswith("/") and base.count("/") == 1 and base.split("/")[1].startswith("tiny-bert")  # the fixture's folder
