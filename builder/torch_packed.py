"""The packed forward of a decoder classifier (runtime.torch_engine.packed_logits, the one home of it) as the
exporter's module and over many rows, and packed training batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.packing import Row, make_packs, pack_feed, run_packs
from runtime.torch_engine import model_forward, packed_logits


class PackedClassifier(torch.nn.Module):
    """A decoder classifier as a module of the packed inputs to fp32 logits [B, R, labels], for the exporter."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, last):
        return packed_logits(self.model, input_ids, position_ids, attention_mask, last).float()


def example_inputs() -> tuple[torch.Tensor, ...]:
    """Two packs of different widths and rows, padding included, to trace the exporter's graph."""
    rows = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([7, 8], [9, 10, 11])]
    return tuple(torch.from_numpy(a) for a in pack_feed(rows, [((1, 2, 3), [0, 1]), ((7, 8), [2])], pad_id=0))


def torch_packed_logits(model, rows: Sequence[Row], pad_id: int, pack_tokens: int, batch_rows: int = 32, desc: str = "torch packed") -> np.ndarray:
    """Logits of every row, packed, through PyTorch (wherever the model sits), as the kernel runs them."""
    return run_packs(model_forward(model), rows, pad_id, pack_tokens, batch_rows, desc=desc)


def training_packs(rows: Sequence[Row], labels: Sequence[int], allowed: np.ndarray, pack_tokens: int, seed: int) -> list[dict]:
    """Training items, one a pack: a head, the tails of its rows, their labels and candidate masks.

    A question's rows go into packs in a seeded random order, not by length as the kernel packs them, so that a
    pack is a sample of its question's rows rather than its explanations of one length. The packs stay fixed over
    the epochs; the Trainer shuffles their order."""
    order = np.random.default_rng(seed).permutation(len(rows))
    packs = make_packs([rows[i] for i in order], pack_tokens, by_length=False)
    items = []
    for head, members in packs:
        idx = [int(order[i]) for i in members]
        items.append({"head": list(head), "tails": [rows[i][1] for i in idx], "labels": [int(labels[i]) for i in idx], "allowed": allowed[idx].tolist()})
    return items


def collate_packs(items: list[dict], pad_id: int, packed: bool = True) -> dict[str, torch.Tensor]:
    """A training batch of `training_packs` items: the packed graph's inputs (runtime.packing.PACKED_INPUTS), with
    `labels` [packs, slots] that are -100 in empty slots, so the Trainer's row count (num_items_in_batch) counts
    rows. With `packed` False, the same rows whole, padded one a sequence: the unpacked twin of the same batch."""
    rows = [(it["head"], t) for it in items for t in it["tails"]]
    labels = [y for it in items for y in it["labels"]]
    allowed = np.array([a for it in items for a in it["allowed"]], dtype=bool)
    if not packed:
        seqs = [h + t for h, t in rows]
        ids = np.full((len(seqs), max(map(len, seqs))), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.tensor(labels), "allowed": torch.from_numpy(allowed)}
    starts = np.cumsum([0] + [len(it["tails"]) for it in items])
    packs = [(tuple(it["head"]), list(range(starts[k], starts[k + 1]))) for k, it in enumerate(items)]
    feed = dict(zip(("input_ids", "position_ids", "attention_mask", "last"), map(torch.from_numpy, pack_feed(rows, packs, pad_id))))
    slots = feed["last"].shape[1]
    slot_labels = torch.full((len(items), slots), -100, dtype=torch.int64)
    slot_allowed = torch.ones((len(items), slots, allowed.shape[1]), dtype=torch.bool)
    for k, (_, members) in enumerate(packs):
        slot_labels[k, : len(members)] = torch.tensor(labels[starts[k] : starts[k + 1]])
        slot_allowed[k, : len(members)] = torch.from_numpy(allowed[starts[k] : starts[k + 1]])
    return {**feed, "labels": slot_labels, "allowed": slot_allowed}
