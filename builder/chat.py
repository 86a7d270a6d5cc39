"""Chat templates, cut into the text before and after the user's message so the kernel can render them alone."""

from __future__ import annotations

from runtime.errors import MapbuildError

SLOT = "MAPBUILD_USER_MESSAGE"


def chat_parts(tok) -> dict | None:
    """{"prefix", "suffix"} around a user message, with the assistant's turn opened; None without a chat template.

    A BOS that the template writes as text is dropped when the tokenizer adds it anyway, so prompts get one BOS.
    """
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": SLOT}], tokenize=False, add_generation_prompt=True)
    if text.count(SLOT) != 1:
        raise MapbuildError(f"{tok.name_or_path}: its chat template rewrites the user's message; train with --no-chat-template")
    prefix, suffix = text.split(SLOT)
    bos = tok.bos_token
    if bos and prefix.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        prefix = prefix[len(bos):]
    return {"prefix": prefix, "suffix": suffix}
