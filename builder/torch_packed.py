"""The packed forward pass of a decoder classifier in PyTorch, and its training batches: for export, training and
validation alike.

transformers uses a 4-D attention mask as it is given (masking_utils returns it untouched), so the model's own
backbone runs a pack with runtime.packing's mask and positions; the classifier head then reads each row's last
token. Its additive form (0 or the dtype's minimum) works under eager attention and SDPA alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.errors import MapbuildError
from runtime.packing import Row, make_packs, pack_feed, run_packs


def parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone and the classifier head of a decoder classifier, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise MapbuildError(f"{type(base).__name__}: no `score` head, so no packed forward; train with --pack-tokens 0")
    return getattr(base, base.base_model_prefix), head


def packed_masks(config, attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive masks of a pack for the attention patterns the model's layers use. A 4-D mask reaches every layer
    as it is, so a sliding-window layer gets the pack's mask cut to its window, by the rows' own positions as
    transformers cuts a whole row (key > query - window): by layer type where the config names them, else alone."""
    additive = lambda allowed: torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)  # noqa: E731
    window, types = getattr(config, "sliding_window", None), set(getattr(config, "layer_types", None) or ())
    if not window or (types and "sliding_attention" not in types):
        return additive(attention_mask)
    near = position_ids[:, None, :, None] - position_ids[:, None, None, :] < window  # [packs, 1, query, key]
    sliding = additive(attention_mask & near)
    return {"full_attention": additive(attention_mask), "sliding_attention": sliding} if types else sliding


def packed_logits_of(model, input_ids, position_ids, attention_mask, last) -> torch.Tensor:
    """Logits [packs, rows per pack, labels] of a packed batch (runtime.packing.PACKED_INPUTS; the mask is bool)."""
    backbone, head = parts(model)
    dtype = backbone.get_input_embeddings().weight.dtype  # QLoRA's packed 4-bit weights are not its compute dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    masks = packed_masks(backbone.config, attention_mask, position_ids, dtype)
    hidden = backbone(input_ids=input_ids, attention_mask=masks, position_ids=position_ids, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return head(hidden[rows, last])


class PackedClassifier(torch.nn.Module):
    """A decoder classifier as a module of the packed inputs to fp32 logits [B, R, labels], for the exporter."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, last):
        return packed_logits_of(self.model, input_ids, position_ids, attention_mask, last).float()


def example_inputs() -> tuple[torch.Tensor, ...]:
    """Two packs of different widths and rows, padding included, to trace the exporter's graph."""
    rows = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([7, 8], [9, 10, 11])]
    return tuple(torch.from_numpy(a) for a in pack_feed(rows, [((1, 2, 3), [0, 1]), ((7, 8), [2])], pad_id=0))


def torch_packed_logits(model, rows: Sequence[Row], pad_id: int, pack_tokens: int, batch_rows: int = 32, desc: str = "torch packed") -> np.ndarray:
    """Logits of every row, packed, through PyTorch (wherever the model sits), as the kernel's ONNX graph runs them."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(*feed: np.ndarray) -> np.ndarray:
        return packed_logits_of(model, *(torch.from_numpy(a).to(device) for a in feed)).float().cpu().numpy()

    return run_packs(forward, rows, pad_id, pack_tokens, batch_rows, desc=desc)



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
