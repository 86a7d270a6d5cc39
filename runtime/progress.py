"""The runtime's one progress bar. It is a diagnostic: no stderr, closed or broken, may ever cost the member it counts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Unfailing:
    """A text stream that passes writes on to `stream` and swallows whatever they raise: a pipe whose reader is gone
    (BrokenPipeError), a full disk, a closed file (ValueError)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        try:
            self.stream.write(s)
        except Exception:  # noqa: BLE001 - see the class
            pass
        return len(s)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except Exception:  # noqa: BLE001 - see the class
            pass

    @property
    def encoding(self) -> str | None:  # tqdm draws Unicode blocks only where the stream's encoding takes them
        return getattr(self.stream, "encoding", None)


def bars_off() -> bool:
    """Whether TQDM_DISABLE (`mapbuild -q` sets it) asks for no bars. Read at each call: tqdm itself reads it once, as
    it is imported, which in the CLI's process is before -q is parsed."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """`iterable`, with a bar of its batches on stderr; none under `bars_off()`, or where there is no stderr at all
    (Python makes sys.stderr None when it starts with file descriptor 2 closed)."""
    if sys.stderr is None or bars_off():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit="batch", mininterval=2, file=Unfailing(sys.stderr))
