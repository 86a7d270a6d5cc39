"""The one way the builder and the tests start the kernel's runtime: as the notebook does, `python -P -m
runtime.submit` importing the bundle's own runtime from a folder that holds nothing else, with a JSON result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Launched:
    returncode: int
    stdout: str  # empty unless captured
    stderr: str
    result: dict | None  # runtime.submit's --result JSON: rows, members_run, faults, map3, seconds, error


def launch(bundle: str | os.PathLike, *args: str, python: str | os.PathLike = sys.executable, path: tuple[str, ...] = (),
           env: dict | None = None, capture: bool = True, timeout: float | None = None) -> Launched:
    """Run `runtime.submit ARGS` from inside `bundle` on `python`; `path` goes first on PYTHONPATH (a sandbox), and
    `env` replaces the environment (default: this one, without PYTHONPATH)."""
    bundle = Path(bundle).resolve()
    base = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory(prefix="mapbuild-code-") as code:
        (Path(code) / "runtime").mkdir()  # copies of the sources alone: a __pycache__ beside them would run instead
        for source in (bundle / "runtime").glob("*.py"):
            shutil.copy(source, Path(code) / "runtime" / source.name)
        result = Path(code) / "result.json"
        base.update(PYTHONPATH=os.pathsep.join([*map(str, path), code]), PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run(
            [str(python), "-P", "-m", "runtime.submit", *args, "--result", str(result)],
            cwd=bundle, env=base, capture_output=capture, text=True, timeout=timeout,
        )
        found = json.loads(result.read_text()) if result.exists() else None
    return Launched(done.returncode, done.stdout or "", done.stderr or "", found)
