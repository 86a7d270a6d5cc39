"""Writing a file whole or not at all, under a name no other run shares."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary file beside `path`; it replaces `path` only when the block succeeds. Two runs writing
    one path each get their own temporary file, so the path always holds one run's whole file. A write that fails
    (a full disk, a folder that turned read-only) leaves no temporary file and is one InputError naming `path`."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise InputError(f"{path}: cannot be written in {path.parent} ({e.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a kernel's other users
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
