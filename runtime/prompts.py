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


TEMPLATES: dict[str, Callable[[Row, bool | None, str], str]] = {
    "basic": basic,
    "compact": compact,
    "detailed": detailed,
    "instruction": instruction,
}


def render(df: pd.DataFrame, template: str, space: LabelSpace) -> list[str]:
    """The prompt of every row, with answer correctness from the label space."""
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    fn = TEMPLATES[template]
    verdicts = space.is_correct(df)
    rows = df[["QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]].to_dict("records")
    return [fn(r, v, space.correct.get(r["QuestionId"], "")) for r, v in zip(rows, verdicts)]
