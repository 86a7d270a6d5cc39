"""`mapbuild verify`: the kernel's own code path on a bundle, in a clean environment, with the network blocked."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from runtime.data import read_rows
from runtime.manifest import BundleError, check_files, hash_tree, load_manifest
from runtime.submission import check_submission

from .errors import MapbuildError

SANDBOX = Path(__file__).parent / "data" / "sandbox"  # sitecustomize: no torch, transformers, peft, builder, sockets
SAMPLE_TEST = Path(__file__).parent / "data" / "sample_test.csv"
CACHE = Path(os.environ.get("MAPBUILD_CACHE", Path.home() / ".cache" / "mapbuild"))


def kernel_python(bundle: Path) -> Path:
    """A virtual environment with only runtime/requirements.txt and the bundle's wheels, cached by their names."""
    reqs = [r for r in (bundle / "runtime" / "requirements.txt").read_text().splitlines() if r.strip() and not r.startswith("#")]
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if any(w.name.startswith("onnxruntime_gpu") for w in wheels):  # one module, two distributions: never both
        reqs = [r for r in reqs if not re.match(r"onnxruntime\b", r)]
    venv = CACHE / ("verify-" + hashlib.sha256("\n".join(reqs + [w.name for w in wheels]).encode()).hexdigest()[:12])
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        click.echo(f"verify: creating {venv} ({', '.join(reqs + [w.name for w in wheels])})")
        for cmd in ([sys.executable, "-m", "venv", "--clear", str(venv)], [str(python), "-m", "pip", "install", "-q", *reqs]):
            subprocess.run(cmd, check=True)
        if wheels:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels)], check=True)
        (venv / ".installed").touch()
    return python


def check_tree(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file present with its sha256, and nothing unlisted."""
    extra = sorted(set(hash_tree(bundle)) - set(manifest["files"]))
    return check_files(bundle, manifest, list(manifest["files"])) + [f"{f}: not in the manifest" for f in extra]


def verify(bundle: str | os.PathLike, test: str | os.PathLike | None = None, python: str | os.PathLike | None = None) -> dict:
    """Run the bundle as the kernel would and check its files before and after; returns what the run printed."""
    bundle = Path(bundle).resolve()
    try:
        manifest = load_manifest(bundle)
    except BundleError as e:
        raise MapbuildError(str(e)) from None
    problems = check_tree(bundle, manifest)
    if problems:
        raise MapbuildError(f"{bundle}: {problems[0]} ({len(problems)} problem(s)); package it again")
    test = Path(test or SAMPLE_TEST).resolve()
    python = Path(python) if python else kernel_python(bundle)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(SANDBOX), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "submission.csv"
        cmd = [str(python), "-m", "runtime.submit", "--bundle", ".", "--test", str(test), "--out", str(out)]
        done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True)
        lines = done.stderr.splitlines()
        if done.returncode:
            raise MapbuildError(f"verify: the kernel run failed: {next((l for l in reversed(lines) if l.strip()), 'no output')}")
        # CPU for a missing CUDA is expected on a build machine; a lost member never is.
        fallbacks = [l.strip() for l in lines if any(w in l for w in ("SKIPPED", "DROPPED", "NO MEMBER LEFT"))]
        if fallbacks:
            raise MapbuildError(f"verify: the kernel run fell back: {fallbacks[0]}")
        problems = check_submission(out, read_rows(test)["row_id"].tolist()) + check_tree(bundle, manifest)
        if problems:
            raise MapbuildError(f"verify: {problems[0]}")
    score = re.search(r"MAP@3 on labelled rows: ([0-9.]+)", done.stdout)
    speed = re.search(r"(\d+) rows in ([0-9.]+) s", done.stderr)
    return {"python": str(python), "rows": int(speed.group(1)) if speed else None, "seconds": float(speed.group(2)) if speed else None,
            "map3": float(score.group(1)) if score else None}
