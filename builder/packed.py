"""The packed forward pass of a decoder classifier in PyTorch: for export, training and validation alike.

transformers uses a 4-D attention mask as it is given (masking_utils returns it untouched), so the model's own
backbone runs a pack with runtime.packing's mask and positions; the classifier head then reads each row's last
token. Its additive form (0 or the dtype's minimum) works under eager attention and SDPA alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.errors import MapbuildError
from runtime.packing import Row, pack_feed, run_packs


def parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone and the classifier head of a decoder classifier, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise MapbuildError(f"{type(base).__name__}: no `score` head, so no packed forward; train with --pack-tokens 0")
    return getattr(base, base.base_model_prefix), head


def packed_logits_of(model, input_ids, position_ids, attention_mask, last) -> torch.Tensor:
    """Logits [packs, rows per pack, labels] of a packed batch (runtime.packing.PACKED_INPUTS; the mask is bool)."""
    backbone, head = parts(model)
    dtype = backbone.get_input_embeddings().weight.dtype  # QLoRA's packed 4-bit weights are not its compute dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(~attention_mask, torch.finfo(dtype).min)
    hidden = backbone(input_ids=input_ids, attention_mask=additive, position_ids=position_ids).last_hidden_state
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

