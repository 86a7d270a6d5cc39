"""The torch engine: a transformer member run by PyTorch and transformers, as Kaggle's image ships them (issue 42).

runtime.predict imports this module only for a member whose `engine` is TORCH, and this module imports torch and
transformers only inside its functions: every other path of the kernel stays free of them. It is also the one
decoder forward of the whole tool: training, validation and the ONNX export run `packed_logits` from here, so a
torch member in the kernel computes what was trained and what the export's drift gate measured.

A packed batch goes through the model's own backbone with runtime.packing's mask and positions (transformers uses a
4-D mask as it is given), then the classifier head reads each row's last token. The mask's additive form (0 or the
dtype's minimum) works under eager attention and SDPA alike."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .engine import CPU, CUDA, Forward
from .errors import MapbuildError
from .packing import PACKED_INPUTS

log = logging.getLogger("mapbuild")

# What a torch member's folder holds, by role: `save_pretrained`'s weights (one file, whatever the size) and config.
TORCH_FILES = {"model": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
TORCH_PRECISIONS = ("fp32", "fp16")


def parts(model):
    """The backbone and the classifier head of a decoder classifier, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise MapbuildError(f"{type(base).__name__}: no `score` head, so no packed forward; train with --pack-tokens 0")
    return getattr(base, base.base_model_prefix), head


def packed_masks(config, attention_mask, position_ids, dtype):
    """The additive masks of a pack for the attention patterns the model's layers use. A 4-D mask reaches every layer
    as it is, so a sliding-window layer gets the pack's mask cut to its window, by the rows' own positions as
    transformers cuts a whole row (key > query - window): by layer type where the config names them, else alone."""
    import torch

    additive = lambda allowed: torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)  # noqa: E731
    window, types = getattr(config, "sliding_window", None), set(getattr(config, "layer_types", None) or ())
    if not window or (types and "sliding_attention" not in types):
        return additive(attention_mask)
    near = position_ids[:, None, :, None] - position_ids[:, None, None, :] < window  # [packs, 1, query, key]
    sliding = additive(attention_mask & near)
    return {"full_attention": additive(attention_mask), "sliding_attention": sliding} if types else sliding


def packed_logits(model, input_ids, position_ids, attention_mask, last):
    """Logits [packs, rows per pack, labels] of a packed batch (runtime.packing.PACKED_INPUTS; the mask is bool)."""
    import torch

    backbone, head = parts(model)
    dtype = backbone.get_input_embeddings().weight.dtype  # QLoRA's packed 4-bit weights are not its compute dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    masks = packed_masks(backbone.config, attention_mask, position_ids, dtype)
    hidden = backbone(input_ids=input_ids, attention_mask=masks, position_ids=position_ids, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return head(hidden[rows, last.to(hidden.device)])


def compute_dtype(precision: str, device: str) -> str:
    """The dtype a member of `precision` computes in: fp16 weights run in fp16 on a GPU (never bf16, which a T4, of
    compute capability 7.5, lacks) and in fp32 on a CPU, where PyTorch's fp16 kernels are slow or missing."""
    return "float16" if precision == "fp16" and device != "cpu" else "float32"


def load_model(folder: Path, precision: str, device: str):
    """The member's classifier from its folder (TORCH_FILES), in eval mode on `device`. No remote code: a config
    naming its own classes is refused by transformers, as it should be."""
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = getattr(torch, compute_dtype(precision, device))
    return AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).to(device).eval()


def model_forward(model) -> Forward:
    """A Forward of a loaded classifier, wherever it sits: a packed batch (PACKED_INPUTS) through `packed_logits`, a
    padded one (input_ids, attention_mask) through the model's own head, fp32 logits out. Its `provider` says where
    it runs, in runtime.engine's words."""
    import torch

    device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(*feed: np.ndarray) -> np.ndarray:
        tensors = [torch.from_numpy(a).to(device) for a in feed]
        if len(feed) == len(PACKED_INPUTS):
            logits = packed_logits(model, *tensors)
        elif len(feed) == 2:
            logits = model(input_ids=tensors[0], attention_mask=tensors[1]).logits
        else:
            raise ValueError(f"a batch of {len(feed)} inputs is neither packed nor padded")
        return logits.float().cpu().numpy()

    forward.provider = CPU if device.type == "cpu" else CUDA
    return forward


def torch_forward(folder: Path, precision: str, device: str | None = None) -> Forward:
    """`model_forward` of the member in `folder`, on `device` (default: the first GPU when torch sees one, else the
    CPU)."""
    try:
        import torch
        import transformers  # noqa: F401 - load_model's, checked here to name both
    except ImportError as e:  # a kernel without them skips this member (runtime.predict), by this line
        raise ImportError(f"the torch engine needs torch and transformers, which Kaggle's image ships and this Python lacks ({e})") from None

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, precision, device)
    log.info("%s: PyTorch %s on %s", folder, compute_dtype(precision, device), device)
    return model_forward(model)
