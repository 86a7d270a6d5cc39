"""The wheels a bundle brings because Kaggle's image lacks them: onnxruntime-gpu for the kernel's CPython and CUDA,
and bitsandbytes (one wheel for every CPython) where a member is nf4.

Chosen by the CUDA version each wheel records about itself, fetched once into a cache, linked into the bundle."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from runtime.errors import MapbuildError
from runtime.preflight import ONNXRUNTIME_GPU

# Today's Kaggle image runs CPython 3.12 (Kaggle/docker-python, "Upgrade to Python 3.12 (#1516)", 2025-12-12); Colab,
# which Kaggle's image is built on, moved to 3.13 on 2026-08-19. A wheel for each (277 MB apiece), so a bundle made
# today runs on either image, the week Kaggle follows included.
PYTHONS = ("3.12", "3.13")
# Kaggle's T4 image had an NVIDIA driver 560 (CUDA <= 12.6, onnxruntime #26073, 2025-09); PyPI's CUDA 13 builds of
# onnxruntime-gpu (1.27 on) need a newer driver. So CUDA 12 unless asked otherwise.
CUDA = 12
# The onnxruntime-gpu pinned for each CUDA major. A pin is only a guess until the wheel it
# fetches records the same CUDA major in onnxruntime/capi/build_and_package_info.py, which `choose` checks.
ORT_GPU = {12: "1.26.0", 13: "1.31.1"}
NAME = ONNXRUNTIME_GPU
BITSANDBYTES = "bitsandbytes"  # nf4 members' (runtime.torch_engine); the wheel carries its CUDA kernels
ANY_PYTHON = "any"  # a wheel entry's `python` where one wheel serves every CPython
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
INFO = "onnxruntime/capi/build_and_package_info.py"


def cache_dir() -> Path:
    return Path(os.environ.get("MAPBUILD_CACHE", Path.home() / ".cache" / "mapbuild"))


def cp_tag(python: str) -> str:
    """'3.12' -> 'cp312'; a one-line error for anything that is not a CPython 3.x version."""
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise MapbuildError(f"--python {python!r}: give CPython versions such as 3.12 or 3.11,3.12")
    return "cp3" + python.split(".")[1]


def cuda_version(wheel: Path) -> str | None:
    """The CUDA version an onnxruntime wheel was built for, as it records it; None for CPU builds."""
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.read(INFO).decode()
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    found = re.search(r"^cuda_version\s*=\s*['\"]([0-9.]+)['\"]", info, re.M)
    return found.group(1) if found else None


def choose(wheels: Iterable[Path], python: str, cuda: int) -> Path | None:
    """The newest onnxruntime-gpu wheel for CPython `python` on x86-64 Linux whose recorded CUDA major is `cuda`."""
    tag, best = cp_tag(python), None
    for wheel in wheels:
        try:
            name, version, _, tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if name != NAME or not any(t.interpreter == tag and t.platform in PLATFORMS for t in tags):
            continue
        recorded = cuda_version(wheel)
        if recorded and recorded.split(".")[0] == str(cuda) and (best is None or version > best[0]):
            best = (version, wheel)
    return best[1] if best else None


def download(python: str, cuda: int, dest: Path) -> None:
    """`pip download` of the pinned release for one CPython, without dependencies: the image has numpy and protobuf,
    and pip would otherwise replace its numpy."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    target = ["--python-version", python, "--implementation", "cp", "--abi", cp_tag(python), *platforms]
    requirement = f"{NAME}=={ORT_GPU[cuda]}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", *target, "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        why = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "pip failed")
        raise MapbuildError(f"--wheels: pip download {requirement} for CPython {python} failed: {why.strip()}; offline, pass --find-links DIR")


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link where the file system allows one (wheels are 277 MB), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fetch(dest: Path, pythons: Iterable[str] = PYTHONS, cuda: int = CUDA, find_links: str | os.PathLike | None = None) -> list[dict]:
    """One onnxruntime-gpu wheel per CPython version into dest, from the find_links folder alone, or else from the
    cache, downloading what it lacks. Returns the manifest's entries."""
    if cuda not in ORT_GPU:
        raise MapbuildError(f"--cuda {cuda}: onnxruntime-gpu is on PyPI for CUDA {' and '.join(map(str, ORT_GPU))}")
    source = Path(find_links) if find_links else cache_dir() / "wheels"
    source.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    for python in dict.fromkeys(pythons):
        wheel = choose(source.glob("*.whl"), python, cuda)
        if wheel is None and not find_links:
            download(python, cuda, source)
            wheel = choose(source.glob("*.whl"), python, cuda)
        if wheel is None:
            where = f"--find-links {find_links}" if find_links else f"{NAME}=={ORT_GPU[cuda]} from PyPI"
            raise MapbuildError(f"{where}: no {NAME} wheel for CPython {python} on x86-64 Linux built for CUDA {cuda}.x")
        link_or_copy(wheel, dest / wheel.name)
        version = str(parse_wheel_filename(wheel.name)[1])
        entries.append({"file": wheel.name, "name": NAME, "version": version, "python": python, "cuda": cuda_version(wheel)})
    return entries


def choose_any(wheels: Iterable[Path], name: str, version: str) -> Path | None:
    """The `name`==`version` wheel for every CPython 3 (py3-none) on x86-64 Linux, if one is there."""
    for wheel in wheels:
        try:
            found, got, _, tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if found == name and str(got) == version and any(t.interpreter == "py3" and re.fullmatch(r"manylinux.*_x86_64", t.platform) for t in tags):
            return wheel
    return None


def fetch_any(dest: Path, name: str, version: str, find_links: str | os.PathLike | None = None) -> dict:
    """The one `name`==`version` wheel for every CPython (choose_any) into dest, from the find_links folder alone, or
    else from the cache, downloading it once. Returns its manifest entry (`python`: ANY_PYTHON)."""
    source = Path(find_links) if find_links else cache_dir() / "wheels"
    source.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = choose_any(source.glob("*.whl"), name, version)
    if wheel is None and not find_links:
        # pip takes --platform tags as they are: every glibc from the image's 2.28 down to manylinux2014's 2.17
        platforms = [a for minor in range(28, 16, -1) for a in ("--platform", f"manylinux_2_{minor}_x86_64")]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "--python-version", PYTHONS[0], *platforms, "-d", str(source), f"{name}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            why = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "pip failed")
            raise MapbuildError(f"--wheels: pip download {name}=={version} failed: {why.strip()}; offline, pass --find-links DIR")
        wheel = choose_any(source.glob("*.whl"), name, version)
    if wheel is None:
        where = f"--find-links {find_links}" if find_links else f"{name}=={version} from PyPI"
        raise MapbuildError(f"{where}: no {name} {version} wheel for CPython 3 on x86-64 Linux")
    if not (dest / wheel.name).exists():  # a second call into the same folder finds it there already
        link_or_copy(wheel, dest / wheel.name)
    return {"file": wheel.name, "name": name, "version": version, "python": ANY_PYTHON, "cuda": None}
