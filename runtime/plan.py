"""The 9-hour guard, in one place: the plan (each member's seconds before anything runs, for `package`, `mapbuild
plan` and the kernel), the pace (a running member's own, measured), and the decisions to drop or stop a member.

Rules: a member is planned from its own figures only, never scaled by how another member kept to its plan; what
runs on a GPU is planned from FLOPs at the precision's T4 peak, what runs on the CPU from the rows/s measured on
the build machine on the kernel's KERNEL_THREADS threads; a running member is judged by its own pace in padded
tokens, timed after a warm-up batch per worker, so session creation, worker spawn and CUDA's first-call set-up
never count as pace."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .errors import MapbuildError
from .member import ENGINES, TORCH, TORCH_PRECISIONS, Member, MemberSpec

log = logging.getLogger("mapbuild")
now = time.monotonic  # the guard's clock (tests replace it)

LIMIT_HOURS = 9.0
MARGIN_HOURS = 1.0  # notebook start, installs, reading data, writing the submission
TEST_ROWS = 40_000  # the competition's largest hidden test set
# T4 peaks of the precisions whose every node onnxruntime's CUDA provider runs: fp16 tensor cores 65 TFLOPS (int4's
# MatMulNBits dequantizes to fp16 and runs there too), fp32 8.1. int8 (dynamic int8 run a row at a time, or 8-bit
# MatMulNBits with int8 activations for a packed decoder) is built for the CPU's integer kernels and measured there
# only: it runs on CPU sessions, and is planned at its CPU pace. nf4 (bitsandbytes, the torch engine's alone) dequantizes to fp16 too: planned at the
# fp16 rate, which its dequantization keeps it under.
T4_FLOPS = {"fp16": 65e12, "int4": 65e12, "fp32": 8.1e12, "nf4": 65e12}
ONNX_GPU_PRECISIONS = ("fp16", "int4", "fp32")
CPU_KINDS = ("tfidf",)  # members that never touch a GPU
GIB = 2**30
T4_BYTES = 15 * GIB  # a T4 as Kaggle's kernel gives it
# What a process's CUDA context, cuBLAS's workspace and PyTorch's allocator take of a GPU before any weight (a few
# hundred MiB; not yet measured on a T4): never planned for weights.
CONTEXT_BYTES = GIB // 2
# The share of a GPU a placement fills: the allocator fragments, and a batch longer than its bound is retried in
# halves (runtime.engine.halving), not planned for.
USABLE = 0.9
BYTES = {"float32": 4, "float16": 2}  # an activation's, by compute dtype
# A weight's bytes on a GPU, by precision: int4 is MatMulNBits' 4 bits and an fp16 scale a block of 32; nf4 is 4 bits
# and an fp32 absmax a block of 64 (no double quantization).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5625, "nf4": 0.5625}
KERNEL_BATCH = 64  # rows a batch: the kernel's --batch-size default
ASSUMED_LENGTH = 256  # tokens a row is cut to, for a member that does not say


class DeadlineError(RuntimeError):
    """Finishing would overrun the kernel's time limit."""


@dataclass(frozen=True)
class Estimate:
    name: str
    params: int
    mean_tokens: float
    seconds: float
    device: str  # where it runs: "T4" or "CPU"
    placement: str = ""  # a GPU member's, where its model's shape is known (Placement.describe)
    gib_per_gpu: float | None = None  # its weights and a batch's activations on its fullest GPU


def on_gpu(spec: MemberSpec) -> bool:
    return spec.kind not in CPU_KINDS and spec.precision in T4_FLOPS


def estimate(
    specs: dict[str, MemberSpec], rows: int = TEST_ROWS, gpus: int = 2, efficiency: float = 0.25, shapes: dict[str, dict] | None = None
) -> list[Estimate]:
    """Each member's kernel seconds on `gpus` T4s, by name: a forward pass is 2 x params x tokens FLOPs per row, at
    the T4 peak for its precision x efficiency, the rows split over its copies (a copy a GPU, or one split over
    them: placed_on_t4s, where `shapes` gives its model's config); a CPU member's rows at its measured rows/s."""
    out = []
    for name, m in specs.items():
        if not on_gpu(m):
            out.append(Estimate(name, m.params, m.mean_tokens, cpu_seconds(m, rows), "CPU"))
            continue
        placement, gib = Placement(copies=gpus), None
        if shape := (shapes or {}).get(name):
            placement, gib = placed_on_t4s(name, m, shape, gpus)
        seconds = 2 * m.params * m.mean_tokens * rows / (T4_FLOPS[m.precision] * efficiency * max(placement.copies, 1))
        out.append(Estimate(name, m.params, m.mean_tokens, seconds, "T4", placement.describe() if shape else "", gib))
    return out


def batch_activations(spec: MemberSpec, shape: dict | None) -> int:
    """A kernel batch's activations on a T4: KERNEL_BATCH rows of the member's max_length, in its packs; 0 for a model
    of unknown shape (the registry gives one for every decoder of 2B and up: below, a batch is a few hundred MiB)."""
    if not shape:
        return 0
    length = spec.max_length or ASSUMED_LENGTH
    span = max(spec.pack_tokens or 0, length)
    tokens = KERNEL_BATCH * length
    return activation_bytes(shape, tokens, -(-tokens // span), span, BYTES["float32" if spec.precision == "fp32" else "float16"])


def placed_on_t4s(name: str, spec: MemberSpec, shape: dict, gpus: int) -> tuple[Placement, float]:
    """Where `place` puts the member on `gpus` T4s, and the GiB its fullest GPU holds; one that fits nowhere is a
    one-line refusal naming the precisions that would fit."""
    torch = spec.engine == TORCH
    weights, activations = int(spec.params * WEIGHT_BYTES[spec.precision]), batch_activations(spec, shape)
    try:
        placement = place(weights, activations, [T4_BYTES] * gpus, split=splits(spec.precision, torch))
    except MapbuildError as e:
        smaller = [p for p in (TORCH_PRECISIONS if torch else ONNX_GPU_PRECISIONS) if WEIGHT_BYTES[p] < WEIGHT_BYTES[spec.precision]]
        fits = [p for p in smaller if fits_somewhere(spec, p, shape, gpus, splits(p, torch))]
        if not torch and spec.precision in TORCH_PRECISIONS and fits_somewhere(spec, spec.precision, shape, gpus, splits(spec.precision, True)):
            fits.append(f"{spec.precision} on the torch engine")
        would = f" (would fit: {', '.join(fits)})" if fits else ""
        raise MapbuildError(f"{name}: {spec.precision}: {e}{would}") from None
    held = min(weights, placement.max_memory[0]) if placement.max_memory else weights  # a split fills GPU 0 first
    return placement, (held + activations + CONTEXT_BYTES) / GIB


def splits(precision: str, torch: bool) -> bool:
    """Whether a member may be split over GPUs: on the torch engine, in fp16 or fp32 (accelerate sizes a 4-bit model's
    layers as if unquantized, so an nf4 member runs as a copy a GPU)."""
    return torch and precision != "nf4"


def fits_somewhere(spec: MemberSpec, precision: str, shape: dict, gpus: int, split: bool) -> bool:
    other = MemberSpec(params=spec.params, mean_tokens=spec.mean_tokens, precision=precision, max_length=spec.max_length, pack_tokens=spec.pack_tokens)
    try:
        place(int(spec.params * WEIGHT_BYTES[precision]), batch_activations(other, shape), [T4_BYTES] * gpus, split=split)
    except MapbuildError:
        return False
    return True


@dataclass(frozen=True)
class Placement:
    """Where a GPU member runs: `copies` whole copies, one per GPU, the rows split over them by whole batches; or (the
    torch engine) one copy whose layers are split over the GPUs, at most `max_memory` bytes of weights on each; or,
    with neither, the CPU."""

    copies: int = 0
    max_memory: dict[int, int] | None = None

    def describe(self) -> str:
        if self.max_memory:
            return f"one copy, its layers split over {len(self.max_memory)} GPUs"
        return f"{self.copies} whole cop{'y' if self.copies == 1 else 'ies'}, one per GPU" if self.copies else "the CPU"


def activation_bytes(config: dict, tokens: int, packs: int, span: int, dtype_bytes: int) -> int:
    """An upper bound of a batch's activations at their peak in one layer: `tokens` tokens in `packs` sequences of at
    most `span` tokens. Residual stream and MLP (hidden x 4 + intermediate x 3 a token), attention scores and their
    softmax (heads x span^2 a sequence, twice: SDPA's math path under a custom mask) and the masks (full and
    sliding)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    inter = config.get("intermediate_size") or 4 * hidden
    return dtype_bytes * (tokens * (4 * hidden + 3 * inter) + packs * span**2 * (2 * heads + 2))


def place(weights: int, activations: int, gpus: list[int], split: bool = True) -> Placement:
    """Where a member of `weights` bytes, whose batches take `activations` bytes, runs on GPUs of `gpus` bytes each:
    a copy on each when one fits, else (where it can be `split`: the torch engine; one ONNX session holds one GPU)
    one copy split over all of them, each keeping room for a batch (a split model runs one part at a time, so each
    part sees the whole batch), else nowhere (one line, the sizes)."""
    if not gpus:
        return Placement()
    room = [int(free * USABLE) - CONTEXT_BYTES - activations for free in gpus]
    if weights <= min(room):
        return Placement(copies=len(gpus))
    if split and len(gpus) > 1 and weights <= sum(room):
        return Placement(max_memory=dict(enumerate(room)))
    raise MapbuildError(
        f"{weights / GIB:.1f} GiB of weights and {activations / GIB:.1f} GiB of activations a batch fit neither one of "
        f"{len(gpus)} GPU(s) of {min(gpus) / GIB:.1f} GiB{' nor all of them together' if split else ''}; export it at a smaller "
        "precision, or run it with a smaller --batch-size"
    )


# Kaggle's kernel has 4 vCPUs: the builder times a CPU pace on this many onnxruntime threads (intra_op_num_threads),
# so a many-core build machine does not plan a member at a pace the kernel's pace guard then stops mid-run.
KERNEL_THREADS = 4
# What a member exported on a GPU (its pace was measured there, not on a CPU) is planned at on Kaggle's CPU: its
# vCPUs at about 25 GFLOPS each in fp32. An assumption, not a measurement: it only decides what to drop once CUDA is lost.
KAGGLE_CPU_FLOPS = KERNEL_THREADS * 25e9


def cpu_seconds(spec: MemberSpec, rows: int) -> float:
    """Seconds on the CPU: at the rows/s the member ran at on the build machine's CPU (on its `cpu_threads`,
    KERNEL_THREADS since they are recorded), else from its FLOPs."""
    if spec.cpu_rows_per_s is not None:
        return rows / spec.cpu_rows_per_s
    return 2 * spec.params * spec.mean_tokens * rows / KAGGLE_CPU_FLOPS


def added_member(spec: str, params_m: dict[str, float], mean_tokens: float, pack_tokens: int | None = None) -> MemberSpec:
    """A member to plan that no bundle holds yet, from `ALIAS[:PRECISION[:ENGINE]]` (fp16 on onnx by default), in
    packs of `pack_tokens` (a decoder's) or whole rows."""
    parts = spec.split(":")
    alias, precision, engine = (parts + ["", ""])[:3]
    precision, engine = precision or "fp16", engine or "onnx"
    if alias not in params_m or len(parts) > 3 or engine not in ENGINES or precision not in (TORCH_PRECISIONS if engine == TORCH else ONNX_GPU_PRECISIONS):
        raise MapbuildError(
            f"--add {spec}: use ALIAS[:PRECISION[:ENGINE]] with an alias from `mapbuild models`, one of {', '.join(ONNX_GPU_PRECISIONS)} on onnx "
            f"or {', '.join(TORCH_PRECISIONS)} on torch"
        )
    return MemberSpec(params=int(params_m[alias] * 1e6), mean_tokens=mean_tokens, precision=precision, engine=engine if engine == TORCH else None, pack_tokens=pack_tokens)


def verdict(total_seconds: float, limit_hours: float = LIMIT_HOURS, margin_hours: float = MARGIN_HOURS) -> str:
    """ok, warn (inside the safety margin) or over (past the hard limit)."""
    if total_seconds > limit_hours * 3600:
        return "over"
    return "warn" if total_seconds > (limit_hours - margin_hours) * 3600 else "ok"


def manifest_plan(members: list[Member]) -> dict:
    """The plan a bundle carries: seconds per member for TEST_ROWS on 2x T4, and on the CPU alone (the kernel's
    plan once its sessions land on the CPU)."""
    plan = estimate({m.name: m for m in members})
    return {
        "rows": TEST_ROWS,
        "t4_seconds": {e.name: round(e.seconds, 1) for e in plan},
        "t4_total_seconds": round(sum(e.seconds for e in plan), 1),
        "cpu_seconds": {m.name: round(cpu_seconds(m, TEST_ROWS), 1) for m in members},
    }


def planned_seconds(plan: dict, name: str, rows: int, on_cpu: bool) -> float:
    """A member's planned seconds for this kernel's `rows`, from the bundle's plan (0 when it has none)."""
    seconds = plan.get("cpu_seconds" if on_cpu else "t4_seconds", {}).get(name, 0.0)
    return seconds * rows / plan.get("rows", rows) if rows else 0.0


def drop(name: str, weight: float, planned: float, deadline: float | None) -> bool:
    """Whether a member whose own plan needs more than the time left is dropped before it starts (loudly)."""
    if deadline is None:
        return False
    left = deadline - now()
    if planned <= left:
        return False
    log.error("DROPPED member %s (weight %.2f): its plan needs about %.0f s, %.0f s left", name, weight, planned, max(left, 0))
    return True


class Pace:
    """A running member's own pace in padded tokens per second, against a deadline. The clock starts once its first
    `warmup` batches are back (one per worker: each spends its first batch starting up); from then on, after every
    batch, finishing at that pace past the deadline raises DeadlineError."""

    def __init__(self, deadline: float, total_tokens: float, warmup: int = 1, name: str = "member") -> None:
        self.deadline, self.total, self.warmup, self.name = deadline, total_tokens, max(warmup, 1), name
        self.start: tuple[float, float] | None = None  # (clock, tokens done) when the warm-up ended

    def done(self, batches: int, tokens: float) -> None:
        """`batches` batches holding `tokens` padded tokens are back."""
        t = now()
        if batches == self.warmup:
            self.start = (t, tokens)
        elif self.start and batches > self.warmup and tokens < self.total:
            left = (t - self.start[0]) * (self.total - tokens) / (tokens - self.start[1])
            if t + left > self.deadline:
                raise DeadlineError(f"{self.name}: needs about {left:.0f} s more at its measured pace, {max(self.deadline - t, 0):.0f} s left")
