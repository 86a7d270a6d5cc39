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
from .member import Member, MemberSpec

log = logging.getLogger("mapbuild")
now = time.monotonic  # the guard's clock (tests replace it)

LIMIT_HOURS = 9.0
MARGIN_HOURS = 1.0  # notebook start, installs, reading data, writing the submission
TEST_ROWS = 40_000  # the competition's largest hidden test set
# T4 peaks of the precisions whose every node onnxruntime's CUDA provider runs: fp16 tensor cores 65 TFLOPS (int4's
# MatMulNBits dequantizes to fp16 and runs there too), fp32 8.1. int8 (8-bit MatMulNBits with int8 activations,
# accuracy_level 4) is built for the CPU's integer kernels and measured there only: it runs on a CPU session, and
# is planned at its CPU pace.
T4_FLOPS = {"fp16": 65e12, "int4": 65e12, "fp32": 8.1e12}
CPU_KINDS = ("tfidf",)  # members that never touch a GPU


class DeadlineError(RuntimeError):
    """Finishing would overrun the kernel's time limit."""


@dataclass(frozen=True)
class Estimate:
    name: str
    params: int
    mean_tokens: float
    seconds: float
    device: str  # where it runs: "T4" or "CPU"


def on_gpu(spec: MemberSpec) -> bool:
    return spec.kind not in CPU_KINDS and spec.precision in T4_FLOPS


def estimate(specs: dict[str, MemberSpec], rows: int = TEST_ROWS, gpus: int = 2, efficiency: float = 0.25) -> list[Estimate]:
    """Each member's kernel seconds on `gpus` T4s, by name: a forward pass is 2 x params x tokens FLOPs per row, at
    the T4 peak for its precision x efficiency, the rows split over the GPUs; a CPU member's rows at its measured
    rows/s."""
    out = []
    for name, m in specs.items():
        if on_gpu(m):
            seconds, device = 2 * m.params * m.mean_tokens * rows / (T4_FLOPS[m.precision] * efficiency * gpus), "T4"
        else:
            seconds, device = cpu_seconds(m, rows), "CPU"
        out.append(Estimate(name, m.params, m.mean_tokens, seconds, device))
    return out


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


def added_member(spec: str, params_m: dict[str, float], mean_tokens: float) -> MemberSpec:
    """A member to plan that no bundle holds yet, from `ALIAS[:PRECISION]` (fp16 by default)."""
    alias, _, precision = spec.partition(":")
    precision = precision or "fp16"
    if alias not in params_m or precision not in T4_FLOPS:
        raise MapbuildError(f"--add {spec}: use ALIAS[:PRECISION] with an alias from `mapbuild models` and one of {', '.join(T4_FLOPS)}")
    return MemberSpec(params=int(params_m[alias] * 1e6), mean_tokens=mean_tokens, precision=precision)


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
