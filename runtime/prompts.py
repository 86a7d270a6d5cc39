"""Prompt templates: one renderer for training and the kernel, so the two cannot drift."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from .labels import LabelSpace

Row = dict[str, str]


def _verdict(is_correct: bool | None) -> str:
    return {True: "correct", False: "incorrect"}.get(is_correct, "unknown")


def basic(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    return (
        f"Question: {row['QuestionText']}\nAnswer: {row['MC_Answer']}\n"
        f"Is the answer correct? {_verdict(is_correct)}\nExplanation: {row['StudentExplanation']}"
    )


def detailed(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    # Answer, verdict and explanation come first: truncation then cuts the question, which the model also
    # knows from its answers, rather than the student's words.
    return (
        f"Student answer: {row['MC_Answer']} ({_verdict(is_correct)}; the correct answer is "
        f"{correct_answer or 'unknown'})\nStudent explanation: {row['StudentExplanation']}\n"
        f"Question: {row['QuestionText']}"
    )


def instruction(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    return (
        "Classify the student's mathematical reasoning: is the explanation correct, does it show a "
        "misconception, or neither?\n"
        f"Question: {row['QuestionText']}\n"
        f"Student's answer: {row['MC_Answer']} (this answer is {_verdict(is_correct)})\n"
        f"Student's explanation: {row['StudentExplanation']}"
    )


def compact(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    # No question text: the candidate mask already narrows the labels to the question's own, and leaving out its
    # ~31 tokens makes training and inference about 1.7x faster. The id still tells the questions apart.
    return (
        f"Question {row['QuestionId']}; answer {row['MC_Answer']} is {_verdict(is_correct)} (correct: "
        f"{correct_answer or 'unknown'})\nExplanation: {row['StudentExplanation']}"
    )


def _lines(*parts: tuple[str, str]) -> str:
    # Gemma-style templates also wrap a bare question (`mapbuild generate`): parts with no value are left out.
    return "\n".join(f"{head}{value}" for head, value in parts if value)


def math_question(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    return _lines(
        ("<math_question>\n", row["QuestionText"]),
        ("<student_answer> ", row["MC_Answer"] and f"{row['MC_Answer']} ({_verdict(is_correct)})"),
        ("<student_reasoning>\n", row["StudentExplanation"]),
    )


def comparison(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    return _lines(
        ("Question: ", row["QuestionText"]),
        ("Correct answer: ", correct_answer),
        ("Student's answer: ", row["MC_Answer"] and f"{row['MC_Answer']} ({_verdict(is_correct)})"),
        ("Compare the student's reasoning with the correct method.\nStudent's reasoning: ", row["StudentExplanation"]),
    )


def fraction(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    # Most MAP questions are about fractions and decimals: name the usual traps so the model looks for them.
    return _lines(
        ("Fractions and decimals problem: ", row["QuestionText"]),
        ("The student chose ", row["MC_Answer"] and f"{row['MC_Answer']}, which is {_verdict(is_correct)}."),
        ("Watch for: adding numerators and denominators, ignoring place value, wrong whole.\nStudent's working: ", row["StudentExplanation"]),
    )


def step_by_step(row: Row, is_correct: bool | None, correct_answer: str) -> str:
    return _lines(
        ("Solve step by step, then judge the student's reasoning.\nStep 1, the problem: ", row["QuestionText"]),
        ("Step 2, the student's answer: ", row["MC_Answer"] and f"{row['MC_Answer']} ({_verdict(is_correct)})"),
        ("Step 3, the student's explanation: ", row["StudentExplanation"]),
    )


TEMPLATES: dict[str, Callable[[Row, bool | None, str], str]] = {
    "basic": basic,
    "compact": compact,
    "detailed": detailed,
    "instruction": instruction,
    "math_question": math_question,
    "comparison": comparison,
    "fraction": fraction,
    "step_by_step": step_by_step,
}


def wrap(text: str, chat: dict | None) -> str:
    """A prompt inside a chat template, stored as the text before and after the user's message.

    The builder cuts `prefix` and `suffix` from the tokenizer's own chat template (builder/chat.py), so the kernel
    renders exactly what training saw without jinja or transformers.
    """
    return f"{chat['prefix']}{text}{chat['suffix']}" if chat else text


def render(df: pd.DataFrame, template: str, space: LabelSpace, chat: dict | None = None) -> list[str]:
    """The prompt of every row, with answer correctness from the label space, in the chat template when given."""
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    fn = TEMPLATES[template]
    verdicts = space.is_correct(df)
    rows = df[["QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]].to_dict("records")
    return [wrap(fn(r, v, space.correct.get(r["QuestionId"], "")), chat) for r, v in zip(rows, verdicts)]
