import pytest

from runtime.data import read_rows
from runtime.labels import fit_label_space
from runtime.prompts import TEMPLATES, render

from .conftest import SAMPLE_TRAIN


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_carries_the_row_and_its_correctness(template):
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(20)
    space = fit_label_space(df)
    texts = render(df, template, space)
    for text, (_, row), ok in zip(texts, df.iterrows(), space.is_correct(df)):
        assert row["StudentExplanation"] in text and row["MC_Answer"] in text
        # compact names the question by id: its mask already holds the question's labels
        assert (row["QuestionId"] if template == "compact" else row["QuestionText"]) in text
        assert ("incorrect" in text) == (not ok)


def test_unknown_question_renders_unknown_correctness():
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(3)
    space = fit_label_space(df.iloc[1:])
    df.loc[0, "QuestionId"] = "123456"
    assert "unknown" in render(df, "basic", space)[0]


def test_unknown_template_is_refused():
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(1)
    with pytest.raises(KeyError, match="basic"):
        render(df, "nope", fit_label_space(df))
