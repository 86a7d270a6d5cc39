"""Shared-prefix packing for decoders: many rows of a question in one token stream behind the head they share.

A row of a decoder member is tokenized in two parts, `ids(head) + ids(tail)`, in training and in the kernel, packed
or not (split_ids). A pack is one head followed by the tails of several rows; each tail's positions restart where
the head ends, and the mask lets a token see the head and its own row, never another row (pack_feed). A causal
decoder's head states never depend on what follows them, so a row's last-token state is the one an unpacked run
computes, up to float rounding, and the head's tokens are computed once per pack instead of once per row.

Bidirectional encoders are not exact under packing (the head would see the tails): they keep the padded path."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from .engine import Forward, run_feeds

log = logging.getLogger("mapbuild")

# texts, add_special_tokens -> token ids: the kernel's tokenizers.Tokenizer and the builder's transformers
# tokenizer behind one signature, so both tokenize by the same function.
Encode = Callable[[list[str], bool], list[list[int]]]
Row = tuple[list[int], list[int]]  # (head ids, tail ids)

# The packed graph's inputs, in order, and its output: logits [packs, rows per pack, labels].
PACKED_INPUTS = ("input_ids", "position_ids", "attention_mask", "last")
# Tokens a pack holds at most, by default: the head once and tails after it. Attention over a pack costs T^2, so
# longer packs spend more of it on masked pairs (docs/packing.md has the measurement behind this choice).
PACK_TOKENS = 512
# The share of max_length a row's head may take at most. A longer head (a question text far longer than training's)
# would leave its rows little or no tail, and they would all be one input. At 3/4 no head of the shared data is cut
# but one question's under the `context` template at max_length 256 (docs/packing.md).
HEAD_SHARE = 0.75


def kernel_encoder(tok) -> Encode:
    """`Encode` of a tokenizers.Tokenizer (the bundle's tokenizer.json), loaded without truncation: split_ids cuts,
    as it does training's tokenizer's whole parts, and a head cut in its middle keeps its end."""
    return lambda texts, special: [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=special)]


def special_ends(encode: Encode) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (a BOS, say), found around a bare word."""
    marked, bare = encode(["a"], True)[0], encode(["a"], False)[0]
    for i in range(len(marked) - len(bare) + 1):
        if marked[i : i + len(bare)] == bare:
            return marked[:i], marked[i + len(bare) :]
    raise ValueError("the tokenizer rewrites a text when it adds special tokens: its rows cannot be split into head and tail")


def cut_middle(ids: list[int], keep: int) -> list[int]:
    """`keep` of `ids`: its start (special tokens, instruction) and its end (the last lines before the row's own)."""
    start = keep // 2
    return ids[:start] + ids[len(ids) - (keep - start) :]


def split_ids(encode: Encode, parts: Sequence[tuple[str, str]], max_length: int) -> list[Row]:
    """Each (head, tail) text as (head ids, tail ids): the special tokens once, around the whole, each part
    tokenized alone, then cut at `max_length` tokens from the end (as whole-prompt truncation cuts). A head over
    HEAD_SHARE of `max_length` first loses its middle, so its rows keep tokens of their own (logged)."""
    before, after = special_ends(encode)
    heads = {h: None for h, _ in parts}  # a question's head is tokenized once
    head_ids = dict(zip(heads, encode(list(heads), False)))
    tails = encode([t for _, t in parts], False)
    room = int(max_length * HEAD_SHARE)
    out, cut = [], 0
    for (h, _), t in zip(parts, tails):
        head, tail = before + head_ids[h], t + after
        if len(head) > room:
            head, cut = cut_middle(head, room), cut + 1
        out.append((head, tail[: max_length - len(head)]))
    if cut:
        log.warning(
            "%d of %d rows have a head (question) of over %d of their %d tokens: its middle is cut, so their own tokens fit",
            cut, len(parts), room, max_length,
        )
    return out


def make_packs(rows: Sequence[Row], pack_tokens: int, by_length: bool = True) -> list[tuple[tuple[int, ...], list[int]]]:
    """(head, row indices) per pack: the rows of one head, shortest tails first (in input order without
    `by_length`), as many as fit in `pack_tokens` (a pack holds at least one row; 0 packs every row alone, which is
    the unpacked run)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (head, _) in enumerate(rows):
        groups.setdefault(tuple(head), []).append(i)
    packs = []
    for head, members in groups.items():
        if by_length:
            members.sort(key=lambda i: len(rows[i][1]))
        current: list[int] = []
        used = len(head)
        for i in members:
            n = len(rows[i][1])
            if current and (pack_tokens <= 0 or used + n > pack_tokens):
                packs.append((head, current))
                current, used = [], len(head)
            current.append(i)
            used += n
        packs.append((head, current))
    return packs


def pack_length(rows: Sequence[Row], pack: tuple[tuple[int, ...], list[int]]) -> int:
    head, members = pack
    return len(head) + sum(len(rows[i][1]) for i in members)


def pack_feed(rows: Sequence[Row], packs: Sequence[tuple[tuple[int, ...], list[int]]], pad_id: int) -> tuple[np.ndarray, ...]:
    """A batch of packs as the packed graph's inputs (PACKED_INPUTS): input_ids and position_ids [B, T], the
    attention mask [B, 1, T, T] (True: the query may see the key) and each row's last token [B, R].

    A token sees the keys before it in the head and in its own row. Padding sees itself alone (a query with no key
    would make NaN, and NaN values reach every later layer, even through a weight of 0); unused `last` slots
    point at token 0 and are not read."""
    width = max(pack_length(rows, p) for p in packs)
    slots = max(len(m) for _, m in packs)
    ids = np.full((len(packs), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(packs), width), dtype=np.int64)
    seg = np.full((len(packs), width), -1, dtype=np.int64)  # 0: the head, k: the pack's k-th row, -1: padding
    last = np.zeros((len(packs), slots), dtype=np.int64)
    for b, (head, members) in enumerate(packs):
        h = len(head)
        ids[b, :h], pos[b, :h], seg[b, :h] = head, np.arange(h), 0
        at = h
        for k, i in enumerate(members, start=1):
            tail = rows[i][1]
            ids[b, at : at + len(tail)], pos[b, at : at + len(tail)], seg[b, at : at + len(tail)] = tail, np.arange(h, h + len(tail)), k
            at += len(tail)
            last[b, k - 1] = at - 1  # a tail cut away entirely: the row reads the head's last token
    q = np.arange(width)
    causal = q[None, :] <= q[:, None]
    sees = ((seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] >= 0)) | (seg[:, None, :] == 0)
    mask = (causal & sees) | np.eye(width, dtype=bool)
    return ids, pos, mask[:, None], last


def packed_tokens(rows: Sequence[Row], pack_tokens: int) -> int:
    """The tokens a packed run computes for `rows`, padding aside."""
    return sum(pack_length(rows, p) for p in make_packs(rows, pack_tokens))


def pack_batches(rows: Sequence[Row], pack_tokens: int, batch_rows: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Packs sorted by length, in batches of consecutive packs holding at most `batch_rows` rows (at least one pack):
    similar lengths share a batch, so padding nearly vanishes, and a batch costs about what `batch_rows` rows do."""
    packs = sorted(make_packs(rows, pack_tokens), key=lambda p: pack_length(rows, p))
    out: list[list] = []
    held = 0
    for p in packs:
        if out and held + len(p[1]) <= batch_rows:
            out[-1].append(p)
            held += len(p[1])
        else:
            out.append([p])
            held = len(p[1])
    return out


def batch_tokens(rows: Sequence[Row], batch: Sequence[tuple[tuple[int, ...], list[int]]]) -> int:
    """The padded tokens of a batch's input_ids (pack_feed's [B, T]), known without building its mask."""
    return len(batch) * max(pack_length(rows, p) for p in batch)


def run_batched(
    forward: Forward,
    rows: Sequence[Row],
    batched: list[list[tuple[tuple[int, ...], list[int]]]],
    pad_id: int,
    desc: str,
    deadline: float | None,
    warmup: int,
) -> np.ndarray:
    """Logits of every row of `rows`, running the batches of packs `batched` (each fed by pack_feed as it comes)."""
    order = [np.array([i for _, members in b for i in members], dtype=np.int64) for b in batched]

    def filled(k: int, logits: np.ndarray) -> np.ndarray:  # row-major over [packs, slots]: `order`'s rows
        used = np.array([len(m) for _, m in batched[k]])
        return logits[np.arange(logits.shape[1])[None, :] < used[:, None]]

    cost = [batch_tokens(rows, b) for b in batched]
    build = lambda k: pack_feed(rows, batched[k], pad_id)  # noqa: E731
    return run_feeds(forward, build, order, cost, len(rows), desc, deadline, warmup, take=filled)


def run_packs(
    forward: Forward,
    rows: Sequence[Row],
    pad_id: int,
    pack_tokens: int,
    batch_rows: int,
    desc: str = "packed",
    deadline: float | None = None,
    warmup: int = 1,
) -> np.ndarray:
    """Logits of every row in input order, from a packed graph (or a DevicePool of its sessions); identical rows
    run once. Deadline and out-of-memory retries as in engine.run_batches.

    A row of NaN or inf logits in a pack of several is run again alone: NaN in one row's states reaches its pack
    mates through attention (a weight of 0 times NaN is NaN), and would cost them too (predict.checked)."""
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    inverse = np.array([first.setdefault((tuple(h), tuple(t)), len(first)) for h, t in rows], dtype=np.int64)
    todo = [(list(h), list(t)) for h, t in first]
    batched = pack_batches(todo, pack_tokens, batch_rows)
    out = run_batched(forward, todo, batched, pad_id, desc, deadline, warmup)
    bad = ~np.isfinite(out).all(axis=1)
    again = [i for b in batched for _, members in b if len(members) > 1 for i in members if bad[i]]
    if again:
        alone = [todo[i] for i in again]
        out[again] = run_batched(forward, alone, pack_batches(alone, 0, batch_rows), pad_id, f"{desc} alone", deadline, 1)
        log.warning(
            "%s: %d rows of packs with NaN or inf logits run again one a pack; %d of them still have NaN or inf",
            desc, len(again), int((~np.isfinite(out[again]).all(axis=1)).sum()),
        )
    return out[inverse] if len(todo) else out
