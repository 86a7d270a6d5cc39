"""The versions of Python, mapbuild and its stack: what a stage folder's provenance, a bundle's manifest and
`mapbuild env` record. Below every other builder module, so any may import it."""

import platform
from importlib.metadata import PackageNotFoundError, version

import runtime

PACKAGES = ("numpy", "pandas", "tokenizers", "onnxruntime", "onnx", "torch", "transformers", "peft")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "mapbuild": runtime.__version__}
    for p in PACKAGES:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            continue
    return found
