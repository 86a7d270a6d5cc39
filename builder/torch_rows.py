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


def logits_and_peaks(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32, desc: str = "torch") -> tuple[np.ndarray, list[str], np.ndarray]:
    """torch_logits, and in the same pass the largest |value| each module's output reaches on each row, pads left
    out: the module names in the order their outputs are first computed (a layer's parts before the layer) and
    peaks [rows, modules] (0 where a module's output is not a row's tensor). What an fp16 run of the same rows would
    overflow (export.check_activations)."""
    device = next(model.parameters()).device
    names = [name for name, _ in model.named_modules() if name]
    peaks: dict[str, torch.Tensor] = {}
    batch: dict[str, torch.Tensor] = {}
    done: dict[str, int] = {}  # name -> when its output was first computed

    def watch(name: str):
        def hook(module, args, out) -> None:
            done.setdefault(name, len(done))
            out = out[0] if isinstance(out, tuple) and out else out
            mask = batch["mask"]
            if not torch.is_tensor(out) or not out.is_floating_point() or out.shape[0] != mask.shape[0]:
                return
            size = out.abs()
            if out.ndim >= 2 and out.shape[1] == mask.shape[1]:  # [rows, tokens, ...]: a pad's value is nobody's
                size = size * mask.view(*mask.shape, *[1] * (out.ndim - 2))
            peak = size.reshape(len(size), -1).amax(1)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        return hook

    @torch.inference_mode()
    def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        peaks.clear()
        batch["mask"] = torch.from_numpy(mask).to(device)
        logits = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=batch["mask"]).logits.float()
        table = torch.stack([peaks.get(n, torch.zeros(len(ids), device=device)).float() for n in names], 1)
        return torch.cat([logits, table], 1).cpu().numpy()

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        both = run_batches(forward, seqs, pad_id, batch_size, desc=desc)
    finally:
        for h in handles:
            h.remove()
    labels = both.shape[1] - len(names)
    order = sorted(range(len(names)), key=lambda i: done.get(names[i], len(names)))
    return both[:, :labels], [names[i] for i in order], both[:, labels:][:, order]
