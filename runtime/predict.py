"""Ensemble prediction over a bundle's members; a failing member costs accuracy, never the submission."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .base_model import attached_bases
from .cards import check_card
from .engine import CPU, DevicePool, SessionThreads, cores, encode, gpu_count, load_kernel_tokenizer, onnx_forward, run_batches, softmax
from .ensemble import combine, pool
from .external_data import problem as external_problem
from .knn import check_settings, knn_text, load_table, vote
from .labels import LabelSpace
from .manifest import bundle_members, check_files
from .member import PACKED, TORCH, Member, MemberSpec
from .packing import PACK_TOKENS, Row, kernel_encoder, packed_tokens, run_packs, split_ids
from .plan import drop, on_gpu, planned_seconds
from .preflight import KAGGLE_INPUT
from .prompts import render, render_parts
from .tfidf import tfidf_probs

log = logging.getLogger("mapbuild")


def prompts(spec: MemberSpec, df: pd.DataFrame, space: LabelSpace) -> list[str] | list[tuple[str, str]]:
    """The member's prompt of every row: whole, or as (head, tail) for a packed member."""
    how = render_parts if spec.inputs == PACKED else render
    return how(df, spec.template, space, spec.chat)


def kernel_rows(tokenizer_json: Path, spec: MemberSpec, texts: list[str] | list[tuple[str, str]]) -> list[list[int]] | list[Row]:
    """The kernel's token ids of `prompts`: one list a row, or (head ids, tail ids) for a packed member."""
    if spec.inputs == PACKED:
        return split_ids(kernel_encoder(load_kernel_tokenizer(tokenizer_json, None)), texts, spec.max_length)
    return encode(load_kernel_tokenizer(tokenizer_json, spec.max_length), texts)


def own_pack(spec: MemberSpec) -> int:
    """The pack size a packed member was exported and checked for."""
    return PACK_TOKENS if spec.pack_tokens is None else spec.pack_tokens


def repacked_cost(bundle: Path, member: Member, df: pd.DataFrame, space: LabelSpace, pack_tokens: int) -> float:
    """How many times the tokens of its own pack size a packed member computes for these rows at `pack_tokens`: its
    plan was made at its own (--pack-tokens 0 cost a packed member about 2.6x the tokens it was planned at, issue 39)."""
    rows = kernel_rows(bundle / member.files["tokenizer"], member, prompts(member, df, space))
    return packed_tokens(rows, pack_tokens) / max(packed_tokens(rows, own_pack(member)), 1)


def pack_size(member: Member, pack_tokens: int | None) -> int:
    """The pack size a packed member runs at under --pack-tokens. Its own `pack_tokens` is the largest it was
    exported and checked for, and a longer pack's [T, T] mask and attention may not fit the device: a larger
    --pack-tokens is capped there (logged), a smaller one (0 included) is taken."""
    own = own_pack(member)
    if pack_tokens is not None and pack_tokens > own:
        log.warning("%s: --pack-tokens %d capped at %d, the largest pack it was exported and checked for", member.name, pack_tokens, own)
    return own if pack_tokens is None else min(pack_tokens, own)


def run_rows(forward, spec: MemberSpec, rows: list, batch_size: int, desc: str, deadline: float | None = None) -> np.ndarray:
    """The member's graph over its `kernel_rows`: padded batches of `batch_size` rows (at most its `max_batch`), or
    packs of up to the member's `pack_tokens` in batches of as many rows (packing is exact, so the pack size moves the
    pace, not the scores). The first batch of each of a pool's workers is its warm-up, outside the pace."""
    batch_size = min(batch_size, spec.max_batch or batch_size)
    warmup = getattr(forward, "workers", 1)
    if spec.inputs == PACKED:
        return run_packs(forward, rows, spec.pad_token_id, own_pack(spec), batch_size, desc, deadline, warmup)
    return run_batches(forward, rows, spec.pad_token_id, batch_size, desc=desc, deadline=deadline, warmup=warmup)


@contextmanager
def shut(forward) -> Iterator:
    """`forward`; a pool's workers (DevicePool, SessionThreads) shut down after it, queued batches cancelled: past a
    deadline they must not run on."""
    try:
        yield forward
    finally:
        if isinstance(forward, Executor):
            forward.shutdown(cancel_futures=True)


def onnx_session(model: Path, spec: MemberSpec, devices: int = 1, threads: int = 0):
    """A member's ONNX model as a Forward: one session of `threads` onnxruntime threads (0: its default), or one
    worker per device for a GPU precision on several. A CPU member whose rows run alone (max_batch 1) gets one
    session of one thread a run, run from a thread a core (`threads` of them where given): a row is too small a run
    to keep several threads busy, and a run a core keeps them all busy (docs/batch-independence.md)."""
    gpu = on_gpu(spec)
    if spec.max_batch == 1 and not gpu:
        workers = threads or cores()
        log.info("%s: each row alone, %d at once on a session of one thread a run", model, workers)
        return SessionThreads(onnx_forward(model, 1, gpu=False), workers)
    if devices <= 1 or not gpu:
        return onnx_forward(model, threads, gpu=gpu)
    log.info("%s: %d worker processes, one per device", model, devices)
    return DevicePool(partial(onnx_forward, str(model)), devices)


def onnx_outputs(
    bundle: Path, member: Member, texts: list, batch_size: int, devices: int = 1, deadline: float | None = None, threads: int = 0
) -> tuple[np.ndarray, str | None]:
    """The member's ONNX model over `texts` (its `prompts`, or plain texts), on its `onnx_session`: its output rows
    and the provider its sessions ran on (the CPU if any worker's did)."""
    rows = kernel_rows(bundle / member.files["tokenizer"], member, texts)
    model = bundle / member.files["model"]
    data = member.files.get("data")
    beside = {Path(data).name} if data and Path(data).parent == Path(member.files["model"]).parent else set()
    refused = external_problem(model, beside)
    if refused:  # onnxruntime would read any path a location names, hashed or not
        raise ValueError(f"{member.files['model']}: {refused}")
    if not on_gpu(member) and gpu_count():  # a CPU precision: on CUDA, nodes without kernels there would fall back one by one
        log.warning("%s: %s, a CPU precision: it runs on a CPU session, at the pace measured at export", member.name, member.precision)
    with shut(onnx_session(model, member, devices, threads)) as forward:
        return run_rows(forward, member, rows, batch_size, member.name, deadline), forward.provider


def torch_outputs(
    bundle: Path, member: Member, texts: list, batch_size: int, deadline: float | None = None, base: Path | None = None
) -> tuple[np.ndarray, str | None]:
    """The member's PyTorch classifier (runtime.torch_engine, imported here: torch only for its own members) over
    `texts`, in the same batches or packs as an ONNX member's, placed on the GPUs by its size and its longest batch:
    its output rows and where it ran. `base`: its base's folder, for a member that has one (runtime.base_model)."""
    from .torch_engine import placed_forward

    rows = kernel_rows(bundle / member.files["tokenizer"], member, texts)
    packed = member.inputs == PACKED
    longest = max(sum(map(len, r)) if packed else len(r) for r in rows)
    span = max(own_pack(member), longest) if packed else longest
    folder = bundle / Path(member.files["config"]).parent
    with shut(placed_forward(folder, member.precision, batch_size * longest, -(-batch_size * longest // span), span, base)) as forward:
        return run_rows(forward, member, rows, batch_size, member.name, deadline), forward.provider


def transformer_probs(
    bundle: Path, member: Member, df: pd.DataFrame, space: LabelSpace, batch_size: int, devices: int = 1, deadline: float | None = None,
    threads: int = 0, base: Path | None = None,
) -> tuple[np.ndarray, str | None]:
    """A classifier over rendered prompts, by its engine: onnxruntime (on `threads` CPU threads, 0: all), or PyTorch
    (on `base` where it has one)."""
    texts = prompts(member, df, space)
    if member.engine == TORCH:
        logits, provider = torch_outputs(bundle, member, texts, batch_size, deadline, base)
    else:
        logits, provider = onnx_outputs(bundle, member, texts, batch_size, devices, deadline, threads)
    return softmax(logits), provider


def knn_member_probs(
    bundle: Path, member: Member, df: pd.DataFrame, space: LabelSpace, batch_size: int, devices: int = 1, deadline: float | None = None, threads: int = 0
) -> tuple[np.ndarray, str | None]:
    """An ONNX sentence encoder, then the votes of each question's nearest training rows."""
    settings = check_settings(member.knn)
    table = load_table(bundle / member.files["neighbours"], len(space.labels))
    emb, provider = onnx_outputs(bundle, member, knn_text(df), batch_size, devices, deadline, threads)
    if emb.shape[1] != table["emb"].shape[1]:
        raise ValueError(f"the encoder gives {emb.shape[1]} dimensions, the neighbours have {table['emb'].shape[1]}")
    return vote(emb, df["QuestionId"].to_numpy(str), space.candidate_mask(df), table, len(space.labels), **settings), provider


def tfidf_member_probs(
    bundle: Path, member: Member, df: pd.DataFrame, space: LabelSpace, batch_size: int, devices: int = 1, deadline: float | None = None, threads: int = 0
) -> tuple[np.ndarray, str | None]:
    """Per-question TF-IDF models: thousands of rows a second on one CPU core, so no devices and no deadline checks."""
    return tfidf_probs(bundle / member.files["model"], bundle / member.files["vocab"], df, len(space.labels), desc=member.name, threads=threads), None


# kind -> its probabilities and the provider its sessions ran on (None: a CPU member). The
# builder's side of this table is builder.kinds.KINDS.
SCORERS = {"transformer": transformer_probs, "tfidf": tfidf_member_probs, "knn": knn_member_probs}


# A member with more rows of NaN or inf scores than this is numerically broken (fp16 overflow in every long row,
# say), and its finite rows are not to be trusted either; a few bad rows are bad luck, and cost only those rows.
MAX_BAD_ROWS = 0.01


def checked(p: np.ndarray, rows: int, space: LabelSpace, name: str) -> np.ndarray:
    """A member's scores with its rows of NaN or inf replaced by the label prior's (one inf logit makes a row's
    softmax NaN, and a NaN spreads to every label of a geo or pool blend); raises when more than MAX_BAD_ROWS are."""
    if p.shape != (rows, len(space.labels)):  # a head wider or narrower than the label list ranks wrong labels
        raise ValueError(f"it gives {p.shape[1]} scores per row for {len(space.labels)} labels")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.mean() > MAX_BAD_ROWS:
        raise ValueError(f"{bad.sum()} of {len(p)} rows have NaN or inf scores (more than {MAX_BAD_ROWS:.0%})")
    if bad.any():
        log.error("member %s: %d of %d rows have NaN or inf scores; they get the label prior's", name, bad.sum(), len(p))
        p = p.copy()
        p[bad] = space.prior(int(bad.sum()))
    return p


def predict(
    bundle: str | Path,
    manifest: dict,
    space: LabelSpace,
    df: pd.DataFrame,
    batch_size: int = 64,
    devices: int = 1,
    deadline: float | None = None,
    pack_tokens: int | None = None,
    input_root: str | Path = KAGGLE_INPUT,
    threads: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """The members' combined scores (the manifest's ensemble method), and the names of the members that ran.
    `pack_tokens`: the pack size of packed members instead of their own, at most their own (pack_size);
    `input_root`: where the bases of members that have one are attached (runtime.base_model), each found and checked
    before any member runs: a missing or different base stops the run (EnvironmentFault), never a prior; `threads`:
    the CPU threads of CPU members (0: every core, as in the kernel).

    Members run heaviest weight first. With a `deadline` (plan.now()), a member whose own plan needs more than the
    time left is dropped, and a running one stops as soon as its own pace says it would overrun (runtime.plan).
    The plan is the bundle's T4 one where a GPU is visible, until a GPU member's session lands on the CPU; then,
    and without a GPU, the CPU one measured at export."""
    bundle = Path(bundle)
    probs, weights, used = [], [], []
    if df.empty:
        log.warning("no test rows: nothing to predict")
        return np.zeros((0, len(space.labels)), dtype=np.float32), used
    members = bundle_members(manifest)
    for m in members:  # before any member runs: a manifest that disagrees with an intact card stops the run
        if not check_files(bundle, manifest, [m.files["card"]]):
            check_card(bundle, manifest, m)
    bases = attached_bases(input_root, members)
    gpus = gpu_count()
    on_cpu = not gpus
    for m in sorted(members, key=lambda m: -m.weight):
        planned = planned_seconds(manifest.get("estimate", {}), m.name, len(df), on_cpu)
        size = pack_size(m, pack_tokens) if m.inputs == PACKED else None
        if size is not None and size != own_pack(m):
            cost = repacked_cost(bundle, m, df, space, size)
            log.info("%s: packs of %d tokens, not its own %d: planned at %.2fx its tokens", m.name, size, own_pack(m), cost)
            planned, m = planned * cost, replace(m, pack_tokens=size)
        if drop(m.name, m.weight, planned, deadline):
            continue
        problems = check_files(bundle, manifest, list(m.files.values()))
        if problems:
            log.error("SKIPPED member %s: %s", m.name, "; ".join(problems))
            continue
        try:
            p, provider = SCORERS[m.kind](bundle, m, df, space, batch_size, devices, deadline, threads, **({"base": bases[m.name]} if m.base else {}))
            p = checked(p, len(df), space, m.name)
        except Exception as e:  # noqa: BLE001 - any member failure must leave the others and the prior
            log.error("SKIPPED member %s: %s: %s", m.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            continue
        probs.append(p)
        if not on_cpu and provider == CPU and on_gpu(m):
            on_cpu = True
            log.error("RE-PLANNED at the CPU pace: %d GPU(s) visible, %s ran on the CPU", gpus, m.name)
        weights.append(m.weight)
        used.append(m.name)
    if not used:
        log.error("NO MEMBER LEFT: predicting the training label prior per question and correctness")
        return space.prior(len(df)), used
    method = manifest.get("ensemble", {}).get("method", "prob")
    if method == "pool":
        if len(used) == len(members):
            return pool(probs, used, df["QuestionId"], manifest["ensemble"]["questions"], weights), used
        log.error("POOL needs every member, %d of %d ran: the geo blend of those instead", len(used), len(members))
        method = "geo"
    return combine(probs, weights, method), used
