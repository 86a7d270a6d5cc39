"""What runtime.submit leaves at --out and --result: one run's whole file or none, and one line for every way a
path can fail (issue 28)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import runtime.files
from runtime.data import read_rows
from runtime.submission import check_submission
from runtime.submit import main

from .conftest import ROOT, SAMPLE_TEST, SAMPLE_TRAIN, run_kernel


def submit(bundle, test, out, *extra):
    return main(["--bundle", str(bundle), "--test", str(test), "--out", str(out), "--devices", "1", *extra])


def one_line(err: str) -> str:
    """The one error line a run ends with (a progress bar may precede it), with no traceback."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    return last


def test_runs_with_one_out_leave_the_whole_file_of_a_run_that_succeeded(tiny_pipeline, tmp_path):
    """Three runs at once on three test files, five times. Before: all wrote .submission.csv.tmp; one run's rename
    took another's file away (a traceback), or left its rows under the other's exit 0."""
    rows = pd.read_csv(SAMPLE_TRAIN, dtype=str, keep_default_na=False)
    rows = pd.concat([rows] * 8, ignore_index=True).assign(row_id=lambda d: d.index.astype(str))  # writes long enough to overlap
    tests = [tmp_path / f"{k}.csv" for k in range(3)]
    for k, t in enumerate(tests):
        rows.iloc[k::3].to_csv(t, index=False)
    ids = [read_rows(t)["row_id"].tolist() for t in tests]
    out = tmp_path / "submission.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(5):
        runs = [subprocess.Popen([sys.executable, "-m", "runtime.submit", "--bundle", str(tiny_pipeline["bundle"]), "--test", str(t), "--out", str(out)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for t in tests]
        errs = [r.communicate(timeout=300)[1] for r in runs]
        assert [r.returncode for r in runs] == [0, 0, 0], [e[-300:] for e in errs]
        assert any(check_submission(out, i) == [] for i in ids)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("case, error", [
    ("same", "is --out too; give the result JSON its own file"),
    ("folder", "is a folder; give a file path such as mapbuild_result.json"),
])
def test_a_result_path_that_cannot_hold_the_json_is_one_line_before_any_work(tiny_pipeline, tmp_path, capsys, case, error):
    """Before: --result equal to --out left the JSON at --out with exit 0; a folder gave a traceback after the
    submission was written."""
    out = tmp_path / "submission.csv"
    result = out if case == "same" else tmp_path / "result"
    result.mkdir() if case == "folder" else None
    assert submit(tiny_pipeline["bundle"], SAMPLE_TEST, out, "--result", str(result)) == 2
    assert error in one_line(capsys.readouterr().err)
    assert not out.exists()  # refused before any work: no submission either


def test_a_full_disk_is_one_line_and_leaves_no_file(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """Before: a traceback, and a 0-byte temporary file beside --out."""
    def full(self, path, *args, **kwargs):
        open(path, "w").write("row_id,Cat")  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    out = tmp_path / "submission.csv"
    assert submit(tiny_pipeline["bundle"], SAMPLE_TEST, out) == 2
    assert f"{out}: cannot be written (No space left on device)" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_turns_read_only_is_one_line_and_still_tries_nothing_else(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """Before: the error line, then a traceback from writing the result JSON into the same folder."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(runtime.files.tempfile, "mkstemp", read_only)
    out = tmp_path / "submission.csv"
    assert submit(tiny_pipeline["bundle"], SAMPLE_TEST, out, "--result", str(tmp_path / "r.json")) == 2
    err = one_line(capsys.readouterr().err)
    assert "cannot be written in" in err and "Read-only file system" in err and list(tmp_path.iterdir()) == []


def test_a_folder_the_process_may_not_search_is_one_line(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """Root may search any folder, so the refusal is faked where pathlib meets it."""
    real = os.stat

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    assert submit(tiny_pipeline["bundle"], tmp_path / "locked" / "test.csv", tmp_path / "s.csv") == 2
    assert "locked/test.csv: cannot be looked at (Permission denied)" in one_line(capsys.readouterr().err)


def test_two_bundles_under_the_input_root_are_refused_naming_both(tiny_pipeline, tmp_path, capsys):
    """Before: sort order picked one, an old version as readily as the new."""
    for name in ("old", "new"):
        shutil.copytree(tiny_pipeline["bundle"], tmp_path / "input" / name)
    code = main(["--input-root", str(tmp_path / "input"), "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv")])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "2 mapbuild bundles under" in err and "input/new and" in err and "input/old)" in err and "pass --bundle" in err


def test_a_test_file_of_mostly_unseen_questions_stops(tiny_pipeline, tmp_path, capsys):
    """Before: predicted with a warning only; it most likely means the wrong bundle or the wrong competition."""
    rows = pd.read_csv(SAMPLE_TEST, dtype=str, keep_default_na=False)
    rows.loc[rows.index[: len(rows) // 2 + 1], "QuestionId"] = "999999"
    test = tmp_path / "test.csv"
    rows.to_csv(test, index=False)
    out = tmp_path / "s.csv"
    assert submit(tiny_pipeline["bundle"], test, out) == 2
    assert f"{len(rows) // 2 + 1} of {len(rows)} rows have a question or answer the bundle never saw" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_model_file_that_is_a_symlink_loop_costs_its_member_not_a_traceback(tiny_pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    model = bundle / json.loads((bundle / "manifest.json").read_text())["members"][0]["files"]["model"]
    model.unlink()
    os.symlink(model.name, model)  # points at itself
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 0 and "SKIPPED member m0-bert-fp32: models/m0-bert-fp32/model.onnx: cannot be opened" in done.stderr, done.stderr[-1000:]
    assert "Traceback" not in done.stderr


def test_a_bug_is_one_line_too(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import runtime.submit

    monkeypatch.setattr(runtime.submit, "read_rows", lambda path: 1 / 0)
    assert submit(tiny_pipeline["bundle"], SAMPLE_TEST, tmp_path / "s.csv") == 2
    assert "internal error, ZeroDivisionError: division by zero" in one_line(capsys.readouterr().err)
