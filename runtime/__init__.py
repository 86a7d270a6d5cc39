"""mapbuild runtime: the code that ships inside a bundle and runs in the offline Kaggle kernel.

Only numpy, pandas, tokenizers and onnxruntime at module level: the builder imports this package for
everything that must be identical at training time and in the kernel.
"""

import sys
from importlib.util import find_spec

__version__ = "0.1.0"

# What every runtime module may import from the image; onnxruntime, which the bundle brings, is preflight's check.
# Checked here, before any module imports them, so that a kernel in an image without one stops with one line
# naming it rather than a ModuleNotFoundError traceback from whichever module came first.
REQUIRES = ("numpy", "pandas", "tokenizers", "tqdm")


def missing_packages() -> list[str]:
    return [name for name in REQUIRES if find_spec(name) is None]


if missing_packages():
    sys.stderr.write(
        f"error: this Python ({sys.executable}) has no {', '.join(missing_packages())}, which the mapbuild runtime "
        f"needs; pip install {' '.join(missing_packages())} (runtime/requirements.txt names the oldest versions it supports)\n"
    )
    raise SystemExit(2)
