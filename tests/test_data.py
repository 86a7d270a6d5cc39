import pandas as pd
import pytest

from runtime.data import InputError, duplicate_row_ids, read_rows

from .conftest import SAMPLE_TRAIN


def test_na_is_a_label_not_missing():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    assert (df["Misconception"] == "NA").sum() > 0
    assert not df.isna().any().any()


def test_missing_column_names_the_column(tmp_path):
    path = tmp_path / "test.csv"
    pd.read_csv(SAMPLE_TRAIN).drop(columns="MC_Answer").to_csv(path, index=False)
    with pytest.raises(InputError, match="missing column MC_Answer") as e:
        read_rows(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_nan_and_empty_text_become_empty_strings(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation\n1,9001,q,0.5,\n2,9001,q,0.5,NaN\n")
    df = read_rows(path)
    assert df["StudentExplanation"].tolist() == ["", "NaN"]  # "NaN" typed by a student is text


def test_duplicate_row_ids_are_reported():
    df = pd.DataFrame({"row_id": ["1", "2", "1", "3", "3"]})
    assert duplicate_row_ids(df) == ["1", "3"]
