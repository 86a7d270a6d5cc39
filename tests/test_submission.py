from runtime.submission import check_submission, write_submission


def test_written_submission_passes_the_check(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, ["3", "1"], [["A:NA", "B:NA", "C:x"], ["B:NA", "A:NA", "C:x"]])
    assert path.read_text().splitlines()[0] == "row_id,Category:Misconception"
    assert check_submission(path, ["3", "1"]) == []
    assert not list(tmp_path.glob(".*tmp"))


def test_check_catches_order_and_label_problems(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, ["1", "2"], [["A:NA", "A:NA", "C:x"], ["A:NA", "B:NA"]])
    problems = check_submission(path, ["2", "1"])
    assert len(problems) == 3 and "order" in problems[0]
