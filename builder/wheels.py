"""`package --wheels`: the wheels the runtime needs and Kaggle's image lacks, fetched for the kernel's platform."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .errors import MapbuildError

# onnxruntime-gpu 1.31.1 is the newest on PyPI (CPU onnxruntime is 1.32.0); Kaggle's image has numpy and protobuf,
# so dependencies stay out: pip would otherwise upgrade the image's numpy.
KERNEL_WHEELS = ("onnxruntime-gpu==1.31.1",)
TARGET = (
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
)


def fetch(dest: Path, requirements: tuple[str, ...] = KERNEL_WHEELS, find_links: str | None = None) -> list[Path]:
    """`pip download --only-binary` for CPython 3.11 on manylinux x86_64 into dest; from find_links alone when given."""
    dest.mkdir(parents=True, exist_ok=True)
    source = ["--no-index", "--find-links", str(find_links)] if find_links else []
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", *TARGET, *source, "-d", str(dest), *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        why = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "pip failed")
        raise MapbuildError(f"--wheels: pip download {' '.join(requirements)} failed: {why.strip()}")
    return sorted(dest.glob("*.whl"))


def describe(wheel: Path) -> dict:
    """Name and version from a wheel's file name (PEP 427), for the manifest's pins."""
    name, version = wheel.name.split("-")[:2]
    return {"file": wheel.name, "name": name.replace("_", "-").lower(), "version": version}
