"""Member cards: what a member's scores mean, in a file of the member's own folder that the manifest hashes.

The manifest says how to run a member; its card, written beside the model by `mapbuild package`, says what the
outputs are: their label order, the label space they were trained on, and the prompt and tokenizer they need. A
bundle runs only where every intact card agrees with the manifest, so an edited manifest (labels swapped, a
correct answer changed, another template) is refused, never scored.

A card whose label order differs is refused too, not mapped: `mapbuild package` gives every member of a bundle
one label list, and a pool's label biases are in the manifest's order, which a mapping could not vouch for.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BundleError
from .member import CARD_FIELDS, Member

CARD = "member.json"
SPACE_KEYS = ("correct", "answers", "misconceptions")


def card(member: Member, label_space: dict, tokenizer_sha256: str | None) -> dict:
    """The card of a member, trained on `label_space` (its labels in the model's order): its fields that change
    what the scores mean (runtime.member.CARD_FIELDS)."""
    return {"label_space": label_space, **{k: getattr(member, k) for k in CARD_FIELDS}, "tokenizer_sha256": tokenizer_sha256}


def check_card(bundle: Path, manifest: dict, member: Member) -> None:
    """Raise a BundleError naming what differs where the member's card and the manifest disagree. A card field
    missing from the card (one added since it was written) reads as None, as the member's does."""
    rel, name = member.files["card"], member.name
    try:
        own = json.loads((bundle / rel).read_text())
        space = own["label_space"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{rel}: unreadable member card ({type(e).__name__}); package the bundle again") from None
    differs = lambda what: BundleError(f"manifest.json: {what} differs from {rel}; package the bundle again")
    for k in CARD_FIELDS:
        if own.get(k) != getattr(member, k):
            raise differs(f"member {name}'s {k}")
    if "tokenizer" in member.files and own.get("tokenizer_sha256") != manifest["files"].get(member.files["tokenizer"]):
        raise differs(f"member {name}'s tokenizer")
    ours = manifest["label_space"]
    if not isinstance(space, dict) or space.get("labels") != ours["labels"]:
        raise differs("the label list or its order")
    for k in SPACE_KEYS:
        q = next((q for q in sorted(set(space.get(k) or {}) | set(ours[k])) if (space.get(k) or {}).get(q) != ours[k].get(q)), None)
        if q is not None:
            raise differs(f"question {q}'s {k.replace('correct', 'correct answer')}")
    if space.get("counts") != ours["counts"]:
        raise differs("label_space.counts")
