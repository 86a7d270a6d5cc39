import pandas as pd
import pytest

from runtime.submission import check_submission, write_submission

from .conftest import SAMPLE_TEST


def test_written_submission_passes_the_check(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, ["3", "1"], [["A:NA", "B:NA", "C:x"], ["B:NA", "A:NA", "C:x"]])
    assert path.read_text().splitlines()[0] == "row_id,Category:Misconception"
    assert check_submission(path, ["3", "1"]) == []
    assert not list(tmp_path.glob(".*tmp"))


def test_check_catches_order_and_label_problems(tmp_path):
    path = tmp_path / "submission.csv"
    pd.DataFrame({"row_id": ["1", "2"], "Category:Misconception": ["A:NA A:NA C:x", "A:NA B:NA"]}).to_csv(path, index=False)
    problems = check_submission(path, ["2", "1"])
    assert len(problems) == 3 and "order" in problems[0]


def test_an_invalid_submission_is_never_left_where_the_notebook_expects_one(tmp_path):
    from runtime.manifest import BundleError

    path = tmp_path / "submission.csv"
    write_submission(path, ["1"], [["True_Correct:NA", "True_Neither:NA", "False_Neither:NA"]])
    good = path.read_bytes()
    with pytest.raises(BundleError, match="not written, the predictions are invalid: row_id 1"):
        write_submission(path, ["1"], [["True_Correct:NA", "has space:NA", "False_Neither:NA"]])
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


@pytest.mark.parametrize("args, flag", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--hours", "0"], "--hours must be positive"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--out", ""], "--out '.': give a file path"),
    (["--out", "{tmp}"], "give a file path"),
    (["--out", "{tmp}/missing/submission.csv"], "does not exist"),
    (["--test", "{tmp}"], "--test {tmp}: not a file"),
])
def test_runtime_arguments_are_checked_before_any_work(tiny_pipeline, tmp_path, capsys, args, flag):
    """Before: --batch-size 0 predicted the label prior silently; a folder as --out or --test was a traceback."""
    from runtime.submit import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--bundle", str(tiny_pipeline["bundle"]), "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag.replace("{tmp}", str(tmp_path)) in err and err.strip().count("\n") == 0
    assert not (tmp_path / "s.csv").exists()


def test_question_ids_spelled_as_floats_keep_their_rules_and_unseen_ones_are_counted(tiny_pipeline, tmp_path, caplog):
    """Before: `31772.0` lost the per-question rules silently (6 of 40 rows changed prediction)."""
    from runtime.data import read_rows
    from runtime.submit import run

    rows = pd.read_csv(SAMPLE_TEST, dtype=str, keep_default_na=False)
    run(tiny_pipeline["bundle"], SAMPLE_TEST, tmp_path / "plain.csv", batch_size=8)
    rows.assign(QuestionId=rows["QuestionId"] + ".0").to_csv(tmp_path / "floats.csv", index=False)
    with caplog.at_level("WARNING", logger="mapbuild"):
        run(tiny_pipeline["bundle"], tmp_path / "floats.csv", tmp_path / "floats-sub.csv", batch_size=8)
    assert (tmp_path / "floats-sub.csv").read_text() == (tmp_path / "plain.csv").read_text() and "never saw" not in caplog.text
    unseen = rows.copy()
    unseen.loc[unseen.index[:6], "QuestionId"] = "777"  # past the handful that is normal, short of half
    unseen.to_csv(tmp_path / "unseen.csv", index=False)
    with caplog.at_level("WARNING", logger="mapbuild"):
        run(tiny_pipeline["bundle"], tmp_path / "unseen.csv", tmp_path / "unseen-sub.csv", batch_size=8)
    assert f"6 of {len(read_rows(SAMPLE_TEST))} rows have a question or answer the bundle never saw" in caplog.text
