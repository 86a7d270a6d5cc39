"""Before the runtime starts: onnxruntime imports and has the CUDA provider when a GPU is visible (for a bundle with
a member that runs on it), and the competition's test.csv is where Kaggle mounts it. A miss is an environment fault:
it stops the kernel with one line, never a label-prior submission that hides it.

    python -m runtime.preflight --bundle DIR [--input-root /kaggle/input]   # prints the test.csv to pass --test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine import CUDA, gpu_count
from .errors import EnvironmentFault, InputError, MapbuildError
from .manifest import bundle_members, load_manifest

COMPETITION = "map-charting-student-math-misunderstandings"  # its folder in both of Kaggle's mount layouts
KAGGLE_INPUT = "/kaggle/input"
ONNXRUNTIME_GPU = "onnxruntime-gpu"  # the wheel a bundle brings for onnxruntime (builder.wheels fetches it)


def find_test(root: str | Path) -> Path:
    """ROOT/…/map-charting-student-math-misunderstandings/test.csv: exactly one, or a one-line error."""
    hits = sorted(Path(root).rglob(f"{COMPETITION}/test.csv"))
    if not hits:
        raise InputError(f"no {COMPETITION}/test.csv under {root}; attach the competition to the notebook or pass --test")
    if len(hits) > 1:
        raise InputError(f"{len(hits)} competition folders under {root} ({', '.join(map(str, hits))}); pass --test")
    return hits[0]


def onnxruntime_providers(manifest: dict, gpus: int) -> list[str]:
    """The providers of the onnxruntime this interpreter imports; EnvironmentFault when it cannot serve the bundle.
    [] for a bundle of torch members alone: onnxruntime need not import."""
    if not any(m.on_onnxruntime for m in bundle_members(manifest)):
        return []
    wheels = [w for w in manifest.get("wheels") or [] if w.get("name") == ONNXRUNTIME_GPU]
    fix = (
        f"pip install --no-index --no-deps --find-links BUNDLE/wheels {wheels[0]['name']}=={wheels[0]['version']}"
        if wheels else "the bundle brings no onnxruntime wheel and Kaggle's image has none: package it again with --wheels"
    )
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EnvironmentFault(f"onnxruntime does not import ({e}); {fix}") from None
    available = ort.get_available_providers()
    if gpus and CUDA not in available:
        raise EnvironmentFault(
            f"{gpus} GPU(s) visible but onnxruntime {ort.__version__} has no {CUDA} (only {', '.join(available)}): "
            "pip uninstall -y onnxruntime, then install the bundle's onnxruntime-gpu wheel"
        )
    return available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.preflight", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--input-root", default=KAGGLE_INPUT, help="where the competition is mounted")
    args = parser.parse_args(argv)
    try:
        onnxruntime_providers(load_manifest(args.bundle), gpu_count())
        print(find_test(args.input_root))
    except MapbuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
