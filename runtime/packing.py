"""Shared-prefix packing for decoders: many rows of a question in one token stream behind the head they share.

A row of a decoder member is tokenized in two parts, `ids(head) + ids(tail)`, in training and in the kernel, packed
or not (split_ids). A pack is one head followed by the tails of several rows; each tail's positions restart where
the head ends, and the mask lets a token see the head and its own row, never another row (pack_feed). A causal
decoder's head states never depend on what follows them, so a row's last-token state is the one an unpacked run
computes, up to float rounding, and the head's tokens are computed once per pack instead of once per row.

Bidirectional encoders are not exact under packing (the head would see the tails): they keep the padded path."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .engine import Forward, run_feeds

# texts, add_special_tokens -> token ids: the kernel's tokenizers.Tokenizer and the builder's transformers
# tokenizer behind one signature, so both tokenize by the same function.
Encode = Callable[[list[str], bool], list[list[int]]]
Row = tuple[list[int], list[int]]  # (head ids, tail ids)

# The packed graph's inputs, in order, and its output: logits [packs, rows per pack, labels].
PACKED_INPUTS = ("input_ids", "position_ids", "attention_mask", "last")
PACKED = "packed"  # a member's `inputs` when its rows are (head, tail) and its graph takes PACKED_INPUTS
# Tokens a pack holds at most, by default: the head once and tails after it. Attention over a pack costs T^2, so
# longer packs spend more of it on masked pairs (docs/packing.md has the measurement behind this choice).
PACK_TOKENS = 512


def kernel_encoder(tok) -> Encode:
    """`Encode` of a tokenizers.Tokenizer (the bundle's tokenizer.json)."""
    return lambda texts, special: [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=special)]


def special_ends(encode: Encode) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (a BOS, say), found around a bare word."""
    marked, bare = encode(["a"], True)[0], encode(["a"], False)[0]
    for i in range(len(marked) - len(bare) + 1):
        if marked[i : i + len(bare)] == bare:
            return marked[:i], marked[i + len(bare) :]
    raise ValueError("the tokenizer rewrites a text when it adds special tokens: its rows cannot be split into head and tail")


def split_ids(encode: Encode, parts: Sequence[tuple[str, str]], max_length: int) -> list[Row]:
    """Each (head, tail) text as (head ids, tail ids): the special tokens once, around the whole, each part
    tokenized alone, then cut at `max_length` tokens from the end (as whole-prompt truncation cuts)."""
    before, after = special_ends(encode)
    heads = {h: None for h, _ in parts}  # a question's head is tokenized once
    head_ids = dict(zip(heads, encode(list(heads), False)))
    tails = encode([t for _, t in parts], False)
    out = []
    for (h, _), t in zip(parts, tails):
        head, tail = before + head_ids[h], t + after
        cut = max(max_length - len(head), 0)
        out.append((head[:max_length], tail[:cut]))
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
    run once. Deadline and out-of-memory retries as in engine.run_batches."""
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    inverse = np.array([first.setdefault((tuple(h), tuple(t)), len(first)) for h, t in rows], dtype=np.int64)
    todo = [(list(h), list(t)) for h, t in first]
    batched = pack_batches(todo, pack_tokens, batch_rows)
    feeds = [pack_feed(todo, b, pad_id) for b in batched]
    order = [np.array([i for _, members in b for i in members], dtype=np.int64) for b in batched]
    # Row-major over [packs, slots]: the filled slots of each pack, in its rows' order, are `order`'s.
    filled = [np.array([[k < len(m) for k in range(f[3].shape[1])] for _, m in b]) for b, f in zip(batched, feeds)]
    out = run_feeds(forward, feeds, order, len(todo), desc, deadline, warmup, take=lambda k, logits: logits[filled[k]])
    return out[inverse] if len(todo) else out
