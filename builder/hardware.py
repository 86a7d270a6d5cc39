"""The training device and the precision it gets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from runtime.errors import MapbuildError

from .options import one_of

TRAIN_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The dtype a model's weights are loaded in, by training precision; never the checkpoint's own (transformers 5 loads
# "auto", so a bf16 hub checkpoint would train in bf16 on a CPU). fp16 keeps fp32 master weights under autocast: the
# GradScaler refuses to unscale fp16 gradients. bf16 needs no scaler, and halves the weights' memory.
TRAIN_DTYPES = {"fp32": "float32", "fp16": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Hardware:
    device: str  # cuda, mps or cpu
    name: str
    capability: tuple[int, int] | None  # CUDA compute capability
    count: int  # visible devices of that kind

    def to_json(self) -> dict:
        return asdict(self)


def detect() -> Hardware:
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return Hardware("mps", "Apple MPS", None, 1)
    return Hardware("cpu", "CPU", None, 1)


def choose_precision(hw: Hardware, requested: str = "auto") -> str:
    """fp16 below compute capability 8.0, bf16 from Ampere on, fp32 elsewhere.

    torch reports bf16 as supported on a T4 (7.5) through emulation, which is slow, so the capability decides, not
    `torch.cuda.is_bf16_supported()`. MPS mixed precision is still patchy in the HF Trainer: it stays fp32."""
    one_of(requested, TRAIN_PRECISIONS, "--precision")
    if requested == "auto":
        if hw.device != "cuda":
            return "fp32"
        return "bf16" if hw.capability and hw.capability >= (8, 0) else "fp16"
    if requested == "bf16" and hw.device == "cuda" and hw.capability and hw.capability < (8, 0):
        raise MapbuildError(f"--precision bf16: {hw.name} (compute capability {hw.capability[0]}.{hw.capability[1]}) has no native bf16; use fp16")
    if requested != "fp32" and hw.device != "cuda":
        raise MapbuildError(f"--precision {requested} needs a CUDA GPU; this machine trains on {hw.device}: use fp32 or auto")
    return requested
