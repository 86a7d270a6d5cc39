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
    (lambda m: m | {"ensemble": m["ensemble"] | {"method": "vote"}}, "ensemble method 'vote' is not one of prob, rank, geo, pool"),
    (lambda m: m | {"ensemble": m["ensemble"] | {"method": "pool"}}, "ensemble.questions: a pool needs an object of per-question parameters"),
    (lambda m: m | {"ensemble": m["ensemble"] | {"method": "pool", "questions": {"31772": {"scales": {"m9": 1.0}, "bias": [0.0] * len(m["label_space"]["labels"])}}}},
     "question 31772: scales must give one finite number per member (m0-bert-fp32)"),
    (lambda m: m | {"ensemble": m["ensemble"] | {"method": "pool", "questions": {"31772": {"scales": {"m0-bert-fp32": 1.0}, "bias": [0.0]}}}}, "question 31772: bias must be"),
    (lambda m: m | {"members": [m["members"][0] | {"weight": float("nan")}]}, "weight nan must be a finite number above 0"),
    (lambda m: m | {"members": [m["members"][0] | {"weight": 0}]}, "weight 0 must be"),
    (lambda m: relabel(m, m["label_space"]["labels"][:-1] + ["True_Correct:has space"]), "label 'True_Correct:has space' is not Category:Misconception"),
    (lambda m: relabel(m, ["A:x", "A:x", "B:y"]), "at least 3 distinct labels"),
    (lambda m: relabel(m, ["A:x", "B:y"]), "at least 3 distinct labels"),
    (lambda m: m["label_space"]["answers"].pop(sorted(m["label_space"]["correct"])[0]) and m, "needs its correct answer, and lists of its answers and misconceptions"),
    (lambda m: m["label_space"]["misconceptions"].pop(sorted(m["label_space"]["correct"])[0]) and m, "needs its correct answer, and lists of its answers"),
    (lambda m: m | {"ensemble": ["geo"]}, "ensemble must be an object"),
    (lambda m: m | {"estimate": "fast"}, "estimate must be an object"),
    (lambda m: m | {"estimate": m["estimate"] | {"t4_seconds": "1 hour"}}, "estimate.t4_seconds must map member names to seconds"),
    (lambda m: m | {"estimate": m["estimate"] | {"cpu_seconds": {"m0-bert-fp32": "1 hour"}}}, "estimate.cpu_seconds must map member names to seconds"),
    (lambda m: m | {"members": [m["members"][0] | {"files": {k: v for k, v in m["members"][0]["files"].items() if k != "card"}}]}, "its card (files.card) among them"),
    # each member is a runtime.member.Member, checked where it is defined
    (lambda m: m | {"members": [{k: v for k, v in m["members"][0].items() if k != "weight"}]}, "member m0-bert-fp32: needs weight"),
    (lambda m: m | {"members": [m["members"][0] | {"max_length": "160"}]}, "member m0-bert-fp32: max_length '160' is a str, not int"),
    (lambda m: m | {"members": [m["members"][0] | {"cpu_threads": 0}]}, "member m0-bert-fp32: cpu_threads 0 is not a positive number of threads"),
    (lambda m: m | {"members": [m["members"][0] | {"max_batch": 0}]}, "member m0-bert-fp32: max_batch 0 is not a positive number of rows"),
    (lambda m: m | {"members": [m["members"][0] | {"kind": "svm"}]}, "member m0-bert-fp32: kind 'svm' is not one of transformer, tfidf, knn"),
    (lambda m: m | {"members": ["m0"]}, "member 0: holds a str, not an object"),
])
def test_a_broken_manifest_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path, edit, error):
    """Before: each of these was a traceback, or (the label with a space) an invalid file left at --out."""
    bundle = with_manifest(tiny_pipeline, tmp_path, edit)
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 2 and error in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr[-1500:]
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_public_bundle_names_no_build_machine_path(tiny_pipeline, tmp_path):
    """Before: base_model and dropped members' dir were the build machine's absolute paths."""
    from builder.package import package

    manifest = package([str(tiny_pipeline["onnx"]), str(tiny_pipeline["onnx"])], tmp_path / "bundle", "me/no-paths", wheels=False)
    text = (tmp_path / "bundle" / MANIFEST).read_text()
    assert '": "/' not in text and str(tmp_path) not in text and str(tiny_pipeline["onnx"]) not in text
    base = manifest["members"][0]["base_model"]
    assert not base.startswith("/") and base.count("/") == 1 and base.split("/")[1].startswith("tiny-bert")  # the fixture's folder


def move_weights(bundle, location, place):
    """Re-save the member's model with its weights in one external file named `location`, written at `place`."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from runtime.manifest import sha256_file

    manifest = json.loads((bundle / MANIFEST).read_text())
    name = manifest["members"][0]["files"]["model"]
    proto = onnx.load(str(bundle / name))
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="w.data")
    onnx.save_model(proto, str(bundle / name))  # writes w.data beside the model, then the location is rewritten
    (bundle / name).parent.joinpath("w.data").rename(place)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (bundle / name).write_bytes(proto.SerializeToString())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return name


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_external_data_outside_the_members_files_is_refused(tiny_pipeline, tmp_path, where):
    """Before: onnxruntime opened a hash-verified model.onnx whose weights lay anywhere its location said."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    outside = tmp_path / "elsewhere.data"
    name = move_weights(bundle, str(outside) if where == "absolute" else "../elsewhere.data", outside)
    if where == "parent":
        outside.rename((bundle / name).parent.parent / "elsewhere.data")
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "SKIPPED member m0-bert-fp32" in done.stderr and "outside its listed files" in done.stderr, done.stderr[-1500:]
    assert "NO MEMBER LEFT" in done.stderr


def test_locations_are_found_in_subgraphs_and_sparse_tensors(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from runtime.external_data import locations

    def external(name, location):
        t = numpy_helper.from_array(np.zeros(2, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        return t

    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "b", [], [helper.make_tensor_value_info("y", 1, [2])], [external("c", "/etc/in-subgraph")])
    sparse = helper.make_sparse_tensor(external("v", "../sparse.data"), numpy_helper.from_array(np.array([0], np.int64), "i"), [2])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", 9, [])], [helper.make_tensor_value_info("y", 1, [2])],
                              [external("w", "model.onnx.data")], sparse_initializer=[sparse])
    (tmp_path / "m.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert locations(tmp_path / "m.onnx") == {"/etc/in-subgraph", "../sparse.data", "model.onnx.data"}
    (tmp_path / "junk.onnx").write_bytes(b"\x0f" * 10)
    from runtime.external_data import problem
    assert problem(tmp_path / "junk.onnx", set()).startswith("not an ONNX model")


@pytest.mark.parametrize("how, error", [
    ("folder", "is a folder, not the bundle's manifest"),
    ("deep", "unreadable manifest"),
    ("unreadable", "cannot be read"),
])
def test_a_manifest_that_cannot_be_read_is_one_line(tiny_pipeline, tmp_path, how, error):
    """Before: tracebacks (IsADirectoryError, RecursionError, PermissionError)."""
    import os

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    path = bundle / MANIFEST
    if how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        path.chmod(0)
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 2 and error in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr[-800:]
    assert not out.exists()
