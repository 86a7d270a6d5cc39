"""A bundle's member, one typed record from the stage folder to the kernel.

`MemberSpec` holds what a model is and how the kernel runs it. The builder's stage record (builder.stages.StageMeta)
extends it with what a stage knows; `Member` extends it with its place in a bundle (name, files, weight). `package`
copies every MemberSpec field from the export's record to the member, the manifest holds `Member.to_json()`, the
member card holds the fields marked `card`, and the kernel reads the attributes: a new field is added here, once.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

PACKED = "packed"  # a member's `inputs` when its rows are (head, tail) and its graph takes runtime.packing.PACKED_INPUTS
MEMBER_KINDS = ("transformer", "tfidf", "knn")  # the kinds of member a bundle may hold: runtime.predict.SCORERS scores each
TORCH = "torch"  # a transformer member's `engine` when PyTorch runs it (runtime.torch_engine); None: onnxruntime
TORCH_PRECISIONS = ("fp32", "fp16", "nf4")  # the torch engine's weights: nf4 is bitsandbytes' 4-bit NormalFloat
ENGINES = ("onnx", TORCH)  # a member's engine by name, as `export --engine` and a config's `engine` give it
SHA256 = re.compile(r"[0-9a-f]{64}")


def described(text: str, default: object = None, card: bool = False) -> typing.Any:
    """A field with its help; `card`: it changes what the scores mean, so the member card holds it too."""
    return field(default=default, metadata={"help": text, "card": card})


def type_problem(record: object) -> str | None:
    """The first field of a dataclass whose value is not of its annotated type (None always passes; an int passes
    for a float, a bool for nothing else), or None."""
    hints = typing.get_type_hints(type(record))
    for f in fields(record):
        value, hint = getattr(record, f.name), hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        want = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None))
        want += (int,) if float in want else ()
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            return f"{f.name} {value!r} is a {type(value).__name__}, not {' or '.join(t.__name__ for t in want)}"
    return None


def base_problem(base: dict, engine: str | None) -> str | None:
    """What breaks a member's `base` record: only the torch engine loads an adapter on a base, which it finds and
    checks by its files' sha256 (a config.json among them)."""
    files = base.get("files")
    if engine != TORCH:
        return f"only a {TORCH!r} member runs on a base outside the bundle"
    if not isinstance(base.get("source"), str) or not base["source"]:
        return "needs source, the Kaggle Model or dataset that holds it"
    if not isinstance(files, dict) or "config.json" not in files or not all(isinstance(v, str) and SHA256.fullmatch(v) for v in files.values()):
        return "needs files, a sha256 for each file of it, config.json among them"
    if not all(isinstance(k, str) and k and "/" not in k and k not in (".", "..") for k in files):
        return "files must name files at the top of its folder"
    return None


def moved(record: dict) -> dict:
    """A record as this version reads it: one written before `cpu_threads` had a field of its own (bundle format 2,
    stage folders exported on 2026-12-07) kept it in `drift`."""
    drift = record.get("drift")
    if not isinstance(drift, dict) or "cpu_threads" not in drift or "cpu_threads" in record:
        return record
    return record | {"cpu_threads": drift["cpu_threads"], "drift": {k: v for k, v in drift.items() if k != "cpu_threads"}}


@dataclass(kw_only=True)
class MemberSpec:
    """What a model is and how the kernel runs it. Fields left None are left out of the JSON, so a record written
    before a field existed reads the same."""

    kind: str = described("the member kind: transformer, knn or tfidf", "transformer", card=True)
    model_type: str | None = described("the family's model_type (llama, bert, ...), or knn / tfidf")
    base_model: str | None = described("the base model it was fine-tuned from (in a bundle, its last two path parts)")
    template: str | None = described("the prompt template's name (runtime.prompts)", card=True)
    chat: dict | None = described("the chat wrapping around each prompt, from the tokenizer's chat template", card=True)
    max_length: int | None = described("tokens a row is cut to", card=True)
    inputs: str | None = described(f"'{PACKED}': rows as head + tail, packed behind a shared head; None: whole rows", card=True)
    engine: str | None = described(f"'{TORCH}': PyTorch runs its safetensors weights (runtime.torch_engine); None: onnxruntime its ONNX graph")
    base: dict | None = described(
        "a torch member whose files are a LoRA adapter and head: its base model outside the bundle, as "
        "{'source': the Kaggle Model or dataset to attach, 'files': {file: sha256}} (runtime.base_model)"
    )
    pack_tokens: int | None = described("tokens a pack holds, for a packed member (the kernel's default when None)")
    pad_token_id: int | None = described("the tokenizer's pad id", card=True)
    knn: dict | None = described("the kNN member's settings (runtime.knn.SETTINGS)", card=True)
    precision: str | None = described("the weights' precision: fp32, fp16, int8 or int4")
    max_batch: int | None = described(
        "the most rows one run of its graph may hold: 1 where a run's rows share an activation scale (dynamic int8), so "
        "the kernel runs each row alone and its scores never depend on its batch mates; None: any", card=True,
    )
    drift: dict | None = described("the exported outputs against the reference implementation on held-out rows")
    cpu_rows_per_s: float | None = described("rows a second the export ran at on a CPU session")
    cpu_threads: int | None = described("the onnxruntime threads cpu_rows_per_s was timed on (None: every core of the build machine)")
    cuda_rows_per_s: float | None = described("rows a second the export ran at on a CUDA session")
    params: int | None = described("parameters a row passes through, for the time plan")
    mean_tokens: float | None = described("tokens a row costs the kernel (its share of a pack, where packed)")

    def __post_init__(self) -> None:
        if problem := self.problem():
            raise ValueError(problem)

    def problem(self) -> str | None:
        """The first way this record breaks what its readers rely on, or None."""
        if problem := type_problem(self):
            return problem
        if self.kind not in MEMBER_KINDS:
            return f"kind {self.kind!r} is not one of {', '.join(MEMBER_KINDS)}"
        if self.inputs not in (None, PACKED):  # a newer builder's way of feeding a graph this runtime lacks
            return f"inputs {self.inputs!r} is not {PACKED!r}; package it with this runtime's mapbuild"
        if self.engine not in (None, TORCH) or (self.engine and self.kind != "transformer"):
            return f"engine {self.engine!r} is not {TORCH!r} for a transformer; package it with this runtime's mapbuild"
        if self.base is not None and (problem := base_problem(self.base, self.engine)):
            return f"base: {problem}"
        for name, unit in (("max_length", "tokens"), ("cpu_threads", "threads"), ("max_batch", "rows")):
            if (value := getattr(self, name)) is not None and value < 1:
                return f"{name} {value} is not a positive number of {unit}"
        return None

    @classmethod
    def from_json(cls, record: object) -> typing.Self:
        """The record of its JSON; keys this version does not know (a newer one's) are ignored."""
        if not isinstance(record, dict):
            raise ValueError(f"holds a {type(record).__name__}, not an object")
        if missing := [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in record]:
            raise ValueError(f"needs {', '.join(missing)}")
        record = moved(record)
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def on_onnxruntime(self) -> bool:
        """Whether onnxruntime runs it: every member but a torch one (a kNN member's encoder and a TF-IDF member's
        sums are ONNX graphs too). A bundle of torch members alone needs no onnxruntime wheel: Kaggle's image has
        none, and its PyTorch runs them."""
        return self.engine != TORCH

    def spec(self) -> dict:
        """Its MemberSpec fields alone, by name: what a stage record hands on to a bundle's member."""
        return {f.name: getattr(self, f.name) for f in fields(MemberSpec)}


CARD_FIELDS = tuple(f.name for f in fields(MemberSpec) if f.metadata["card"])


@dataclass(kw_only=True)
class Member(MemberSpec):
    """A model in a bundle: its MemberSpec, and its name, files and ensemble weight."""

    name: str = field(metadata={"help": "its name in the bundle, m<index>-<model_type>-<precision>", "card": False})
    files: dict = field(default_factory=dict, metadata={"help": "its files by role (model, tokenizer, card, ...), as paths in the bundle", "card": False})
    weight: float = field(metadata={"help": "its ensemble weight", "card": False})
    oof_map3: float | None = described("its out-of-fold MAP@3, where ensemble selection had one")

    def problem(self) -> str | None:
        if problem := super().problem():
            return problem
        if not all(isinstance(f, str) for f in self.files.values()):
            return "files must be paths, its card (files.card) among them"
        if not math.isfinite(self.weight) or self.weight <= 0:
            return f"weight {self.weight!r} must be a finite number above 0"
        if self.pack_tokens is not None and self.pack_tokens < 0:
            return f"pack_tokens {self.pack_tokens!r} must be an integer of 0 or more"
        return None
