"""The versions of Python, mapbuild and its stack: what a stage folder's provenance, a bundle's manifest and
`mapbuild env` record. Below every other builder module, so any may import it."""

import platform
from importlib.metadata import PackageNotFoundError, version

import runtime
from runtime.errors import MapbuildError

PACKAGES = ("numpy", "pandas", "tokenizers", "onnxruntime", "onnx", "torch", "transformers", "peft", "accelerate", "bitsandbytes")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "mapbuild": runtime.__version__}
    for p in PACKAGES:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            continue
    return found


def installed(package: str) -> str:
    """The version of `package` installed here, which wrote what the bundle will carry its wheel for."""
    try:
        return version(package)
    except PackageNotFoundError:
        raise MapbuildError(f"{package} is not installed here, so package cannot tell which wheel its members need; pip install {package}") from None
