"""runtime.submit: the kernel run on a tiny bundle, its inputs and its fallbacks."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from builder.launch import launch
from runtime.data import read_rows
from runtime.manifest import load_manifest
from runtime.submission import check_submission

from .conftest import ROOT, SAMPLE_TEST, SANDBOX, run_kernel


def test_kernel_run_writes_a_valid_submission(tiny_pipeline, tmp_path):
    out = tmp_path / "submission.csv"
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []
    assert "MAP@3 on labelled rows" in done.stdout and "SKIPPED" not in done.stderr
    r, rows = done.result, read_rows(SAMPLE_TEST)
    assert r["error"] is None and r["faults"] == [] and r["rows"] == len(rows) and r["members_run"] == ["m0-bert-fp32"]
    assert f"MAP@3 on labelled rows: {r['map3']:.4f}" in done.stdout and r["seconds"] >= r["predict_seconds"] > 0


def test_kernel_sandbox_really_blocks_the_training_stack(tiny_pipeline):
    """With the builder's interpreter, which has all of them: each imports without the sandbox, none with it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("torch", "transformers", "peft", "builder"):
        run = lambda extra: subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env | extra, capture_output=True)
        assert run({}).returncode == 0, name
        assert run({"PYTHONPATH": str(SANDBOX)}).returncode != 0, name


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
    assert not (tmp_path / "s.csv").exists() and "missing column StudentExplanation" in done.result["error"]


def test_corrupted_model_falls_back_to_the_prior(tiny_pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    model = bundle / load_manifest(bundle)["members"][0]["files"]["model"]
    model.write_bytes(model.read_bytes()[:1000])
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 0 and "sha256 mismatch" in done.stderr and "NO MEMBER LEFT" in done.stderr
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"].tolist()) == []
    faults = done.result["faults"]
    assert done.result["members_run"] == [] and faults[0].startswith("SKIPPED member m0-bert-fp32") and faults[-1].startswith("NO MEMBER LEFT")


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


@pytest.mark.parametrize("package", ["pandas", "tokenizers", "tqdm"])
def test_an_image_without_a_package_the_runtime_needs_stops_in_one_line(package, tiny_pipeline, tmp_path):
    """The kernel's own entry (python -P -m runtime.submit from the bundle) in a Python where PACKAGE is absent:
    one line naming it and exit 2, not a ModuleNotFoundError traceback from whichever module imported it first."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None  # as if not installed\n")
    done = launch(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"), path=(str(site),))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and f"has no {package}," in done.stderr and f"pip install {package}" in done.stderr
