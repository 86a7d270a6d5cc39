"""A twin of Kaggle's kernel image: the bundle's own submit.ipynb, executed cell by cell in a Jupyter kernel
(nbclient and ipykernel, as Kaggle runs a notebook) under the image's Python and packages.

The twin has no onnxruntime (the image has none), no network and no training stack; `/kaggle/input` and
`/kaggle/working` become temporary folders laid out as Kaggle mounts them. Where it may differ from Kaggle: no GPU,
no CUDA libraries, only the packages the runtime touches (the image has hundreds more), and Kaggle's own runner
around the kernel, which we do not have: we take a cell's error output, SystemExit included, as a failed run.
kaggle-2027, the Python 3.13 twin, copies an image Kaggle has not published: its package versions and kernel pins
are a guess (see IMAGES), and the real one may bring pandas 3 or a newer IPython."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from runtime.errors import MapbuildError
from runtime.manifest import sha256_file
from runtime.member import TORCH
from runtime.plan import LIMIT_HOURS
from runtime.preflight import COMPETITION

from .wheels import cache_dir, link_or_copy

if TYPE_CHECKING:
    import nbformat

# Kaggle stops a notebook at its 9 hours and nothing sooner: a whole fold of a large member on this CPU may take
# hours, and a shorter limit would fail it as a timeout, not a result. A dead kernel is noticed at once anyway.
CELL_TIMEOUT = int(LIMIT_HOURS * 3600)
SANDBOX = Path(__file__).parent / "data" / "sandbox"  # sitecustomize: no torch, transformers, peft, builder, sockets
SANDBOX_TORCH = "MAPBUILD_SANDBOX_TORCH"  # set: the sandbox lets torch, transformers and peft import (a torch twin)
ROOTS = {"INPUT": "/kaggle/input", "WORKING": "/kaggle/working"}


@dataclass(frozen=True)
class Image:
    python: str
    packages: tuple[str, ...]
    source: str
    torch: tuple[str, ...] = ()  # the image's PyTorch stack, installed for a bundle with a torch member; () where unknown


# pip, packaging, protobuf and flatbuffers are what onnxruntime's wheel needs and its --no-deps install leaves out.
# The kernel: Colab's google-colab 1.0.0 pins ipykernel==6.17.1 and ipython==7.34.0 (its pip conflict reports), and
# Kaggle's image has been built on Colab's since 2024-12 (Kaggle/docker-python#1444). Both declare no upper Python
# bound and install and run cells on CPython 3.13.0.
KERNEL = ("ipykernel==6.17.1", "ipython==7.34.0")
COMMON = ("tqdm", "packaging", "protobuf", "flatbuffers", *KERNEL)
IMAGES = {
    # Kaggle's next image, expected in 2027 and not out yet, so a guess at it: today's series of numpy, pandas and
    # tokenizers from the releases with cp313 wheels (numpy 2.1 on, pandas 2.2.3 alone), and the same kernel pins.
    "kaggle-2027": Image(
        "3.13",
        ("numpy>=2.1,<3", "pandas==2.2.3", "tokenizers==0.22.*", *COMMON),
        "Colab's runtime on Python 3.13 (2026-08-19), which Kaggle's image follows (#1444); no Kaggle image yet",
    ),
    "kaggle-2026": Image(
        "3.12",
        ("numpy>=2,<3", "pandas==2.2.*", "tokenizers==0.22.*", *COMMON),
        "Kaggle/docker-python: Python 3.12 on a Colab base (#1516, 2025-12-12); no onnxruntime in kaggle_requirements.txt",
        # PyPI's torch 2.10.0 is the CUDA 12.8 build the image ships (about 7 GB with its NVIDIA libraries, which load
        # and find no GPU here); the image's own pins of transformers, peft and accelerate (docs/kernel.md)
        ("torch==2.10.0", "transformers==5.0.0", "peft==0.19.1", "accelerate==1.13.0"),
    ),
    "kaggle-2025": Image(
        "3.11",
        ("numpy==1.26.4", "pandas==2.2.3", "tokenizers==0.21.4", *COMMON),
        "the Python 3.11 image the competition ran on (2025), numpy 1.26",
    ),
}
DEFAULT_IMAGE = "kaggle-2026"


@dataclass(frozen=True)
class Run:
    returncode: int  # 0, or 1 where a cell raised (SystemExit included) or the kernel died
    output: str  # the cells' outputs, stdout and stderr together, as the notebook shows them
    submission: Path | None
    seconds: float
    result: dict | None  # the runtime's JSON result, when it got that far
    error: str | None = None  # the exception that stopped the notebook: a SystemExit's message as it is

    @property
    def last_line(self) -> str:
        last = next((line.strip() for line in reversed(self.output.splitlines()) if line.strip()), "no output")
        return self.error or last


def interpreter(python: str) -> Path:
    """CPython `python` (e.g. 3.12) from pyenv, else from PATH; a one-line error naming the fix when neither runs."""
    candidates = []
    if shutil.which("pyenv"):
        listed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        version = next((v for v in reversed(listed) if v.startswith(f"{python}.")), None)
        if version:
            env = {**os.environ, "PYENV_VERSION": version}
            candidates.append(subprocess.run(["pyenv", "which", f"python{python}"], capture_output=True, text=True, env=env).stdout.strip())
    candidates.append(shutil.which(f"python{python}") or "")
    for found in filter(None, candidates):
        probe = subprocess.run([found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == python:
            return Path(found)
    raise MapbuildError(f"the twin needs CPython {python}: install it (pyenv install {python}) or put python{python} on PATH")


def image_env(name: str, torch: bool = False) -> Path:
    """The image's clean virtual environment, built once into the cache, with its PyTorch stack where `torch`; every
    run works on a copy of it."""
    image = IMAGES[name]
    packages = (*image.packages, *(image.torch if torch else ()))
    key = hashlib.sha256(repr((image.python, packages)).encode()).hexdigest()[:8]  # other packages, another venv
    venv = cache_dir() / f"twin-{name}{'-torch' if torch else ''}-{key}"
    if (venv / ".installed").exists():
        return venv
    click.echo(f"twin: creating {venv} (Python {image.python}: {', '.join(packages)})")
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".twin-{name}.", dir=cache_dir()))
    try:
        subprocess.run([str(interpreter(image.python)), "-m", "venv", "--clear", str(tmp)], check=True, capture_output=True)
        done = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True)
        if done.returncode:
            raise MapbuildError(f"twin {name}: pip install failed: {done.stderr.strip().splitlines()[-1]}")
        shutil.rmtree(venv, ignore_errors=True)
        tmp.rename(venv)  # complete or absent; moving a venv breaks only its bin/ scripts, and the twin runs `python -m`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (venv / ".installed").touch()
    return venv


def twin_notebook(bundle: Path, roots: dict[str, Path]) -> nbformat.NotebookNode:
    """The bundle's submit.ipynb, with Kaggle's two folders mapped to `roots` in its code."""
    import nbformat

    nb = nbformat.read(bundle / "submit.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for name, kaggle in ROOTS.items():
        line = f'{name} = "{kaggle}"'
        holding = [c for c in code if line in c.source]
        if len(holding) != 1 or holding[0].source.count(line) != 1:
            raise MapbuildError(f"{bundle}/submit.ipynb: expected one line {line}; package it again")
        holding[0].source = holding[0].source.replace(line, f"{name} = {str(roots[name])!r}")
    return nb


def execute(nb: nbformat.NotebookNode, python: Path, cwd: Path, env: dict[str, str], log: Path) -> tuple[str | None, str]:
    """Run every cell of `nb` in an ipykernel of `python`, in order, stopping at the first that raises; returns
    that exception (None if none) and the cells' outputs as text. The kernel's own stdout and stderr, which a
    notebook never shows, go to `log`."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager  # nbclient polls its liveness: with the sync one a dead kernel hangs the run
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    specs = cwd.parent / "kernels"
    (specs / "twin").mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (specs / "twin" / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "twin", "language": "python"}))
    km = AsyncKernelManager(kernel_name="twin", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(cwd)}})
    error = None
    with open(log, "w") as out:
        try:
            client.execute(env=env, stdout=out, stderr=subprocess.STDOUT)
        except CellExecutionError as e:
            if e.ename == "KeyboardInterrupt":  # nbclient interrupts the kernel on Ctrl-C: the user's, not the bundle's
                raise KeyboardInterrupt from None
            error = f"{e.ename}: {e.evalue}" if e.ename != "SystemExit" else e.evalue
        except CellTimeoutError:
            error = f"a cell ran past Kaggle's {LIMIT_HOURS:.0f} h"
        except DeadKernelError:  # `log` goes with verify's temporary folder: say its last line here
            error = "the kernel died: " + next((x.strip() for x in reversed(log.read_text().splitlines()) if x.strip()), "no output")
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                text.append(o.text)
            elif o.output_type == "error":
                text.append(f"{o.ename}: {o.evalue}\n")
    return error, "".join(text)


def carries_torch(manifest: dict, image: str) -> bool:
    """Whether the twin of `image` runs a bundle with its PyTorch stack: when a member needs it and the stack is known."""
    return bool(IMAGES[image].torch) and any(m.get("engine") == TORCH for m in manifest["members"])


def mount(folder: Path, manifest: dict, input_root: Path) -> Path:
    """Where Kaggle mounts an attached model folder: at the Kaggle Model path (INPUT/MODEL/FRAMEWORK/VARIATION/VERSION)
    or dataset path (INPUT/datasets/OWNER/SLUG) of the member base whose config.json it holds, else under its own
    name (a folder no member knows, which the runtime then refuses as it would on Kaggle)."""
    config = folder / "config.json"
    digest = sha256_file(config) if config.is_file() else None
    source = next((m["base"]["source"] for m in manifest["members"] if m.get("base") and m["base"]["files"].get("config.json") == digest), None)
    if source is None:
        return input_root / folder.name
    parts = source.split("/")
    return input_root.joinpath(*parts[1:]) if len(parts) == 5 else input_root / "datasets" / source


def run_notebook(
    bundle: str | os.PathLike, test: str | os.PathLike, root: Path, image: str = DEFAULT_IMAGE, layout: str = "datasets",
    attach: tuple[Path, ...] = (), torch: bool | None = None,
) -> Run:
    """Run the bundle's notebook in the twin of `image`, laid out under the empty folder `root`: the bundle attached
    as a dataset, `test` as the competition's test.csv, each `attach` folder as a Kaggle Model (mount). `layout`:
    "datasets" (INPUT/datasets/OWNER/SLUG and INPUT/competitions/COMP) or "flat" (INPUT/SLUG and INPUT/COMP), Kaggle's
    two mount layouts. `torch`: with the image's PyTorch stack, and torch, transformers and peft importable (default:
    carries_torch)."""
    bundle = Path(bundle).resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    dataset_id = manifest["dataset_id"]
    torch = carries_torch(manifest, image) if torch is None else torch
    if torch and not IMAGES[image].torch:
        raise MapbuildError(f"twin {image}: its PyTorch stack is not known, so it cannot carry torch; verify on {DEFAULT_IMAGE}")
    python_env = image_env(image, torch)
    roots = {"INPUT": root / "input", "WORKING": root / "working"}
    nested = layout == "datasets"
    attached = roots["INPUT"] / ("datasets/" + dataset_id if nested else dataset_id.split("/")[1])
    competition = roots["INPUT"] / ("competitions/" if nested else "") / COMPETITION
    shutil.copytree(bundle, attached, copy_function=link_or_copy)  # as uploaded: a __pycache__ in it too
    for folder in attach:
        shutil.copytree(folder, mount(Path(folder), manifest, roots["INPUT"]), copy_function=link_or_copy)
    competition.mkdir(parents=True)
    shutil.copy(test, competition / "test.csv")
    roots["WORKING"].mkdir()
    env_copy = root / "python"
    shutil.copytree(python_env, env_copy, symlinks=True, copy_function=link_or_copy)  # pip installs into this copy
    nb = twin_notebook(attached, roots)
    # PYTEST_CURRENT_TEST turns off ipykernel's capture of what subprocesses print (the runtime's log): not on Kaggle.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "JPY_", "PYTEST_"))}
    # No index and none of this machine's pip configuration: only what the bundle brings can be installed.
    env.update(PYTHONPATH=str(SANDBOX), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    if torch:
        env[SANDBOX_TORCH] = "1"  # the image ships torch, transformers and peft: the sandbox lets them import
    start = time.perf_counter()
    error, output = execute(nb, env_copy / "bin" / "python", roots["WORKING"], env, root / "kernel.log")
    written, result = roots["WORKING"] / "submission.csv", roots["WORKING"] / "mapbuild_result.json"
    found = json.loads(result.read_text()) if result.exists() else None
    return Run(int(error is not None), output, written if written.exists() else None, time.perf_counter() - start, found, error)
