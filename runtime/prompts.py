"""Prompt templates: one renderer for training and the kernel, so the two cannot drift.

Every template renders in two parts. The head depends on the question alone (its text, and what the label space
knows of it: the correct answer, the answers and misconceptions seen); the tail on the row (the answer, its verdict,
the explanation). A prompt is head + tail. Decoders tokenize the two parts apart (runtime.packing.split_ids), so
every row of a question shares its head's tokens exactly, and the kernel can compute them once (packing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from .labels import LabelSpace

Row = dict[str, str]


@dataclass(frozen=True)
class Question:
    """What a head may say: the question's own columns and the label space's facts about it."""

    id: str
    text: str
    correct: str  # "" where the question never appeared in training
    answers: tuple[str, ...]
    misconceptions: tuple[str, ...]


@dataclass(frozen=True)
class Template:
    """A prompt in two parts: `head(question)`, shared by the question's rows, and `tail(row, verdict, question)`."""

    head: Callable[[Question], str]
    tail: Callable[[Row, str, Question], str]


def _verdict(is_correct: bool | None) -> str:
    return {True: "correct", False: "incorrect"}.get(is_correct, "unknown")


def _lines(*parts: tuple[str, str]) -> str:
    # Gemma-style templates also wrap a bare question (`mapbuild generate`): parts with no value are left out.
    return "\n".join(f"{head}{value}" for head, value in parts if value)


def _after(head: str, tail: str) -> str:
    """`tail` as the lines after a head of `_lines`: the newline between them belongs to the tail."""
    return f"\n{tail}" if head and tail else tail


def _answer(row: Row, verdict: str) -> str:
    return row["MC_Answer"] and f"{row['MC_Answer']} ({verdict})"


basic = Template(
    head=lambda q: f"Question: {q.text}\n",
    tail=lambda r, v, q: f"Answer: {r['MC_Answer']}\nIs the answer correct? {v}\nExplanation: {r['StudentExplanation']}",
)

# Answer, verdict and explanation come first: truncation then cuts the question, which the model also knows from its
# answers, rather than the student's words. So it has no head.
detailed = Template(
    head=lambda q: "",
    tail=lambda r, v, q: (
        f"Student answer: {r['MC_Answer']} ({v}; the correct answer is {q.correct or 'unknown'})\n"
        f"Student explanation: {r['StudentExplanation']}\nQuestion: {q.text}"
    ),
)

instruction = Template(
    head=lambda q: (
        "Classify the student's mathematical reasoning: is the explanation correct, does it show a misconception, or "
        f"neither?\nQuestion: {q.text}\n"
    ),
    tail=lambda r, v, q: f"Student's answer: {r['MC_Answer']} (this answer is {v})\nStudent's explanation: {r['StudentExplanation']}",
)

# No question text: the candidate mask already narrows the labels to the question's own, and leaving out its ~31
# tokens makes unpacked training and inference about 1.7x faster. The id still tells the questions apart.
compact = Template(
    head=lambda q: f"Question {q.id}; ",
    tail=lambda r, v, q: f"answer {r['MC_Answer']} is {v} (correct: {q.correct or 'unknown'})\nExplanation: {r['StudentExplanation']}",
)


def _lined(head: Callable[[Question], tuple], tail: Callable[[Row, str, Question], tuple]) -> Template:
    """A template of `_lines` parts, cut between the question's parts and the row's."""
    return Template(
        head=lambda q: _lines(*head(q)),
        tail=lambda r, v, q: _after(_lines(*head(q)), _lines(*tail(r, v, q))),
    )


math_question = _lined(
    lambda q: (("<math_question>\n", q.text),),
    lambda r, v, q: (("<student_answer> ", _answer(r, v)), ("<student_reasoning>\n", r["StudentExplanation"])),
)

comparison = _lined(
    lambda q: (("Question: ", q.text), ("Correct answer: ", q.correct)),
    lambda r, v, q: (
        ("Student's answer: ", _answer(r, v)),
        ("Compare the student's reasoning with the correct method.\nStudent's reasoning: ", r["StudentExplanation"]),
    ),
)

# Most MAP questions are about fractions and decimals: name the usual traps so the model looks for them.
fraction = _lined(
    lambda q: (("Fractions and decimals problem: ", q.text),),
    lambda r, v, q: (
        ("The student chose ", r["MC_Answer"] and f"{r['MC_Answer']}, which is {v}."),
        ("Watch for: adding numerators and denominators, ignoring place value, wrong whole.\nStudent's working: ", r["StudentExplanation"]),
    ),
)

step_by_step = _lined(
    lambda q: (("Solve step by step, then judge the student's reasoning.\nStep 1, the problem: ", q.text),),
    lambda r, v, q: (("Step 2, the student's answer: ", _answer(r, v)), ("Step 3, the student's explanation: ", r["StudentExplanation"])),
)

# For packed decoders: everything known of the question goes in the shared head, which packing computes once per
# pack, so the model gets the choices and the question's own misconceptions almost for free.
context = _lined(
    lambda q: (
        ("Classify the student's explanation: correct, showing one of the misconceptions below, or neither.\nQuestion: ", q.text),
        ("Choices: ", " | ".join(q.answers)),
        ("Correct answer: ", q.correct),
        ("Misconceptions seen for this question: ", ", ".join(q.misconceptions) or (q.correct and "none")),
    ),
    lambda r, v, q: (("Student's answer: ", _answer(r, v)), ("Student's explanation: ", r["StudentExplanation"])),
)

TEMPLATES: dict[str, Template] = {
    "basic": basic,
    "compact": compact,
    "detailed": detailed,
    "instruction": instruction,
    "math_question": math_question,
    "comparison": comparison,
    "fraction": fraction,
    "step_by_step": step_by_step,
    "context": context,
}


def wrap(text: str, chat: dict | None) -> str:
    """A prompt inside a chat template, stored as the text before and after the user's message.

    The builder cuts `prefix` and `suffix` from the tokenizer's own chat template (builder/chat.py), so the kernel
    renders exactly what training saw without jinja or transformers.
    """
    return f"{chat['prefix']}{text}{chat['suffix']}" if chat else text


def question_of(row: Row, space: LabelSpace) -> Question:
    q = row["QuestionId"]
    return Question(q, row["QuestionText"], space.correct.get(q, ""), tuple(space.answers.get(q, ())), tuple(space.misconceptions.get(q, ())))


def render_parts(df: pd.DataFrame, template: str, space: LabelSpace, chat: dict | None = None) -> list[tuple[str, str]]:
    """Every row's (head, tail), with answer correctness from the label space; in the chat template when given, its
    opening then belongs to the head and its closing to the tail."""
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    verdicts = space.is_correct(df)
    rows = df[["QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]].to_dict("records")
    before, after = (chat["prefix"], chat["suffix"]) if chat else ("", "")
    out = []
    for r, v in zip(rows, verdicts):
        q = question_of(r, space)
        out.append((before + t.head(q), t.tail(r, _verdict(v), q) + after))
    return out


def render(df: pd.DataFrame, template: str, space: LabelSpace, chat: dict | None = None) -> list[str]:
    """The prompt of every row: its head and tail as one text."""
    return [h + t for h, t in render_parts(df, template, space, chat)]
