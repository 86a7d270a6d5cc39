"""The 9-hour guard's arithmetic: kernel seconds per member from its FLOPs, for the package check and the kernel."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MapbuildError

LIMIT_HOURS = 9.0
MARGIN_HOURS = 1.0  # notebook start, installs, reading data, writing the submission
TEST_ROWS = 40_000  # the competition's largest hidden test set
# T4 peaks: fp16 tensor cores 65 TFLOPS, fp32 8.1. int8/int4 weight-only kernels dequantize to fp16 on the GPU.
T4_FLOPS = {"fp16": 65e12, "int4": 65e12, "int8": 65e12, "fp32": 8.1e12}


@dataclass(frozen=True)
class Estimate:
    name: str
    params: int
    mean_tokens: float
    seconds: float


def added_member(spec: str, params_m: dict[str, float], mean_tokens: float) -> dict:
    """A member to plan that no bundle holds yet, from `ALIAS[:PRECISION]` (fp16 by default)."""
    alias, _, precision = spec.partition(":")
    precision = precision or "fp16"
    if alias not in params_m or precision not in T4_FLOPS:
        raise MapbuildError(f"--add {spec}: use ALIAS[:PRECISION] with an alias from `mapbuild models` and one of {', '.join(T4_FLOPS)}")
    return {"name": spec, "params": int(params_m[alias] * 1e6), "mean_tokens": mean_tokens, "precision": precision}


def estimate(members: list[dict], rows: int = TEST_ROWS, gpus: int = 2, efficiency: float = 0.25) -> list[Estimate]:
    """2 x params x tokens FLOPs per row (a forward pass), at the T4's peak for the member's precision x efficiency,
    split over `gpus` devices."""
    return [
        Estimate(m["name"], m["params"], m["mean_tokens"], 2 * m["params"] * m["mean_tokens"] * rows / (T4_FLOPS[m["precision"]] * efficiency * gpus))
        for m in members
    ]


def verdict(total_seconds: float, limit_hours: float = LIMIT_HOURS, margin_hours: float = MARGIN_HOURS) -> str:
    """ok, warn (inside the safety margin) or over (past the hard limit)."""
    if total_seconds > limit_hours * 3600:
        return "over"
    return "warn" if total_seconds > (limit_hours - margin_hours) * 3600 else "ok"
