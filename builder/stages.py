"""Stage folders: each stage reads one folder and writes the next, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import MapbuildError

META = "mapbuild.json"
ADAPTER, FULL = "adapter", "model"  # a run folder keeps a LoRA adapter, or the fully fine-tuned weights (--lora-r 0)
_PENDING: set[Path] = set()  # temporary folders being written, for the signal handler


def remove_pending() -> None:
    """Remove every temporary folder still being written. For signal handlers: an exception raised there can land
    in a `__del__` and be swallowed, so they cannot rely on unwinding."""
    for tmp in list(_PENDING):
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(folder: str | os.PathLike, stage: str) -> dict:
    """The metadata of a stage folder, checked to be of the stage `stage` expects as input."""
    path = Path(folder) / META
    if not path.is_file():
        raise MapbuildError(f"{folder}: not a mapbuild stage folder (no {META})")
    meta = json.loads(path.read_text())
    if meta.get("stage") != stage:
        raise MapbuildError(f"{folder}: is a '{meta.get('stage')}' folder, expected '{stage}'")
    return meta


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False))


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; it replaces `out` only when the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    _PENDING.add(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _PENDING.discard(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
