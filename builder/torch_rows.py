"""PyTorch inference with the runtime's own batching, for validation, drift checks and baselines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.engine import run_batches
from runtime.member import PACKED, MemberSpec
from runtime.packing import Encode, Row, split_ids


def training_ids(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids as training sees them: the transformers tokenizer, truncated at `max_length`, unpadded."""
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


def hf_encoder(tok) -> Encode:
    """`Encode` of a transformers tokenizer: training's, where the kernel has runtime.packing.kernel_encoder."""
    return lambda texts, special: tok(list(texts), add_special_tokens=special)["input_ids"]


def training_rows(tok, spec: MemberSpec, texts: Sequence) -> list[list[int]] | list[Row]:
    """The training tokenizer's twin of runtime.predict.kernel_rows: one list a row, or (head ids, tail ids) for a
    packed member."""
    if spec.inputs == PACKED:
        return split_ids(hf_encoder(tok), texts, spec.max_length)
    return training_ids(tok, texts, spec.max_length)


def whole(spec: MemberSpec, rows: list) -> list[list[int]]:
    """Each row's ids as one sequence, head then tail for a packed member: what an unpacked forward takes."""
    return [h + t for h, t in rows] if spec.inputs == PACKED else rows


def torch_logits(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    sort: bool = True,
    dedupe: bool = True,
    desc: str = "torch",
) -> np.ndarray:
    """Logits of every row in input order (fp32 numpy), wherever the model sits: inputs go to its device, logits
    come back to the CPU (after training on a GPU the model is on the GPU)."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        return out.logits.float().cpu().numpy()

    return run_batches(forward, seqs, pad_id, batch_size, sort=sort, dedupe=dedupe, desc=desc)
