"""The torch engine: a transformer member run by PyTorch and transformers, as Kaggle's image ships them (issue 42).

runtime.predict imports this module only for a member whose `engine` is TORCH, and this module imports torch and
transformers only inside its functions: every other path of the kernel stays free of them. It is also the one
decoder forward of the whole tool: training, validation and the ONNX export run `packed_logits` from here, so a
torch member in the kernel computes what was trained and what the export's drift gate measured.

A packed batch goes through the model's own backbone with runtime.packing's mask and positions (transformers uses a
4-D mask as it is given), then the classifier head reads each row's last token. The mask's additive form (0 or the
dtype's minimum) works under eager attention and SDPA alike."""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import numpy as np

from .engine import CPU, CUDA, DevicePool, Forward
from .errors import MapbuildError
from .packing import PACKED_INPUTS
from .member import TORCH_PRECISIONS
from .plan import BYTES, GIB, WEIGHT_BYTES, activation_bytes, place, splits

log = logging.getLogger("mapbuild")

# What a torch member's folder holds, by role: `save_pretrained`'s weights (one file, whatever the size) and config;
# or, for a member on a base outside the bundle (runtime.base_model), peft's adapter (the LoRA weights and the head)
# and the classifier's config, which the base's own lacks (its labels, its pad id).
TORCH_FILES = {"model": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
ADAPTER_FILES = {"adapter": "adapter_model.safetensors", "adapter_config": "adapter_config.json", "config": "config.json", "tokenizer": "tokenizer.json"}


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


def require_torch(precision: str, adapter: bool = False) -> None:
    """ImportError in one line where torch or transformers is missing, peft for a member on a base (an `adapter`),
    or bitsandbytes for an nf4 member: a kernel without them skips the member."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if adapter:
            import peft  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the torch engine needs torch and transformers (peft too, for an adapter), which Kaggle's image ships and this Python lacks ({e})") from None
    if precision == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(f"an nf4 member needs bitsandbytes, which Kaggle's image lacks and this bundle does not bring ({e})") from None


def compute_dtype(precision: str, gpu: bool) -> str:
    """The dtype a member of `precision` computes in: fp16 weights (and nf4's, dequantized) run in fp16 on a GPU
    (never bf16, which a T4, of compute capability 7.5, lacks) and in fp32 on a CPU, where PyTorch's fp16 kernels
    are slow or missing."""
    return "float16" if precision in ("fp16", "nf4") and gpu else "float32"


def split_map(folder: Path, dtype: str, max_memory: dict[int, int]) -> dict[str, int]:
    """accelerate's device map of the member's modules over GPUs 0, 1, ...: each filled in turn to its `max_memory`,
    a decoder layer never cut, from the config alone (no weight is read). It needs no GPU, so a CPU test computes
    the map the kernel uses. Not balanced: a split model runs one part at a time, and `place` kept each GPU's room
    for a batch already."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import infer_auto_device_map
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder), dtype=getattr(torch, dtype))
    device_map = infer_auto_device_map(model, max_memory, no_split_module_classes=model._no_split_modules or [], dtype=dtype)
    if left := sorted(name for name, device in device_map.items() if not isinstance(device, int)):
        raise MapbuildError(f"{folder}: {', '.join(left)} fit on no GPU of {max_memory}; export it at a smaller precision")
    return device_map


def describe_map(device_map: dict) -> str:
    """A device map in one line, numbered layers as ranges: "0: model.embed_tokens, model.layers.0-13; 1: ..."."""
    by_device: dict = {}
    for name, device in device_map.items():
        head, _, index = name.rpartition(".")
        runs = by_device.setdefault(device, [])
        if index.isdigit() and runs and runs[-1][0] == head and runs[-1][2] == int(index) - 1:
            runs[-1][2] = int(index)
        else:
            runs.append([head, int(index), int(index)] if index.isdigit() else [name, None, None])
    spell = lambda h, a, b: h if a is None else f"{h}.{a}" if a == b else f"{h}.{a}-{b}"  # noqa: E731
    return "; ".join(f"{device}: {', '.join(spell(*r) for r in runs)}" for device, runs in by_device.items())


def load_model(folder: Path, precision: str, device: str | dict, base: Path | None = None):
    """The member's classifier from its folder (TORCH_FILES), in eval mode, on `device` or over a device map (split
    by accelerate's hooks, which move each part's inputs to it); or, with `base`, the base's weights under the
    member's config, its adapter (ADAPTER_FILES) folded in, as `merge` folds it (kept apart over nf4 weights, as
    QLoRA trains). An nf4 member's 4-bit weights are placed as they load (bitsandbytes' layers do not move) and
    compute in fp16 on a GPU (nf4_settings). No remote code: a config naming its own classes is refused by
    transformers, as it should be."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    split = isinstance(device, dict)
    dtype = getattr(torch, compute_dtype(precision, split or device != "cpu"))
    kwargs: dict = {"dtype": dtype}
    if precision == "nf4" or split:
        kwargs["device_map"] = device if split else {"": device}
    if base is not None:
        kwargs["config"] = AutoConfig.from_pretrained(folder)  # a merged nf4 member's config carries its quantization
        if precision == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(**nf4_settings(dtype))
    if base is None:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    else:
        from peft import PeftModel

        from transformers.utils import logging as hf_logging

        said = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its report of the head it lacks, which the adapter brings: checked here instead
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(base, **kwargs, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(said)
        head = {f"{name}.weight" for name, module in model.named_modules() if module is parts(model)[1]}
        if lost := sorted(set(loading["missing_keys"]) - head):  # the head is the adapter's; anything else is a base of another shape
            raise MapbuildError(f"{base}: lacks {lost[0]} and {len(lost) - 1} more weights of the model its adapter was trained on")
        model = PeftModel.from_pretrained(model, folder)
        model = model if precision == "nf4" else model.merge_and_unload()
    return (model if "device_map" in kwargs else model.to(device)).eval()


def weight_bytes(folder: Path, precision: str, base: Path | None = None) -> int:
    """What the member's weights take on a GPU: its safetensors file, stored as it runs; or, on a `base`, the base's
    parameters at `precision` (runtime.plan.WEIGHT_BYTES), read from the files' headers, less the language-model head
    a classifier drops, plus the adapter."""
    if base is None:
        return (folder / TORCH_FILES["model"]).stat().st_size
    from safetensors import safe_open

    params = 0
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("lm_head."))
    return int(params * WEIGHT_BYTES[precision]) + (folder / ADAPTER_FILES["adapter"]).stat().st_size


def nf4_settings(compute_dtype) -> dict:
    """bitsandbytes' 4-bit NormalFloat as an nf4 member is stored and run: blocks of 64 with an fp32 absmax each (no
    double quantization: runtime.plan.WEIGHT_BYTES), computing in `compute_dtype` (the export stores fp16, a T4's;
    the config carries it, and a load cannot change it)."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": compute_dtype}


def model_forward(model) -> Forward:
    """A Forward of a loaded classifier, wherever it sits: a packed batch (PACKED_INPUTS) through `packed_logits`, a
    padded one (input_ids, attention_mask) through the model's own head, fp32 logits out. Its `provider` says where
    it runs, in runtime.engine's words. A model split over devices takes its inputs where its embeddings are."""
    import torch

    device = model.get_input_embeddings().weight.device

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


def torch_forward(
    folder: Path, precision: str, device_id: int | None = None, max_memory: dict[int, int] | None = None, base: Path | None = None
) -> Forward:
    """`model_forward` of the member in `folder`: on GPU `device_id` (default 0) when torch sees a GPU, else the CPU;
    or split over the GPUs with at most `max_memory` bytes each (place); on `base` where it has one (load_model).
    Logs where its layers sit and what each GPU holds. A module function of picklable arguments, so `partial(torch_forward, folder, precision)` opens a worker's
    copy in a DevicePool."""
    require_torch(precision, base is not None)
    import torch

    gpu = torch.cuda.is_available()
    if max_memory:
        device = split_map(folder, compute_dtype(precision, True), max_memory)
    else:
        device = f"cuda:{device_id or 0}" if gpu else "cpu"
    model = load_model(folder, precision, device, base)
    where = describe_map(model.hf_device_map) if max_memory else device
    log.info("%s: PyTorch %s on %s%s", folder, compute_dtype(precision, gpu or bool(max_memory)), where, f", its base {base}" if base else "")
    if gpu:
        held = ", ".join(f"GPU {i} {torch.cuda.memory_allocated(i) / GIB:.2f} GiB" for i in range(torch.cuda.device_count()))
        log.info("%s: memory held after loading: %s", folder, held)
    return model_forward(model)


def gpu_memory() -> list[int]:
    """Bytes of each GPU torch sees (none: the CPU). Their total, not what is free: asking that opens a CUDA context
    in this process, a few hundred MiB of each GPU for the whole run where copies run in worker processes; members run
    one at a time and free theirs, and `place` keeps a context's share and a tenth of each GPU aside."""
    import torch

    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def placed_forward(folder: Path, precision: str, tokens: int, packs: int, span: int, base: Path | None = None) -> Forward:
    """The member in `folder` placed on the GPUs (place) by its weights' size and a batch's activations (`tokens`
    tokens in `packs` sequences of at most `span`): a DevicePool of one copy a GPU, one copy split over them, or one
    copy on the one GPU or the CPU. `base`: the folder of its base, outside the bundle (load_model)."""
    require_torch(precision, base is not None)
    gpus = gpu_memory()
    dtype = compute_dtype(precision, bool(gpus))
    weights = weight_bytes(folder, precision, base)
    config = json.loads((folder / TORCH_FILES["config"]).read_text())
    placement = place(weights, activation_bytes(config, tokens, packs, span, BYTES[dtype]), gpus, split=splits(precision, True))
    log.info("%s: %.2f GiB of weights on %s", folder, weights / GIB, placement.describe())
    if placement.copies > 1:
        return DevicePool(partial(torch_forward, folder, precision, base=base), placement.copies)
    return torch_forward(folder, precision, max_memory=placement.max_memory, base=base)
