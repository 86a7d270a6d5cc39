"""Where an ONNX model's tensors say their external data lives, read from the protobuf wire format: the kernel has
no `onnx` package, and onnxruntime opens whatever path a location names, inside the bundle or not."""

from __future__ import annotations

import mmap
import os

# The messages that can hold a TensorProto, field number -> message (onnx.proto); every other field is skipped.
SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # external_data: repeated StringStringEntryProto
}


class WireError(ValueError):
    """Bytes that are not a protobuf message."""


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: memoryview, start: int, end: int):
    """(field number, (start, end) of a length-delimited value or None) for each field of one message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
            span = None
        elif wire in (1, 5):
            i, span = i + (8 if wire == 1 else 4), None
        elif wire == 2:
            n, i = _varint(buf, i)
            i, span = i + n, (i, i + n)
        else:
            raise WireError(f"wire type {wire}")
        if i > end:
            raise WireError("field runs past its message")
        yield field, span


def _entry(buf: memoryview, start: int, end: int) -> tuple[str | None, str | None]:
    got: dict[int, str] = {}
    for field, span in _fields(buf, start, end):
        if span and field in (1, 2):
            got[field] = bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")
    return got.get(1), got.get(2)


def locations(path: str | os.PathLike) -> set[str]:
    """Every external-data location named anywhere in the model: graphs, subgraphs, functions, sparse tensors."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise WireError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                found: set[str] = set()
                todo = [("model", 0, len(buf))]
                while todo:
                    kind, start, end = todo.pop()
                    for field, span in _fields(buf, start, end):
                        child = SCHEMA[kind].get(field)
                        if child == "entry" and span:
                            key, value = _entry(buf, *span)
                            if key == "location" and value is not None:
                                found.add(value)
                        elif child and span:
                            todo.append((child, *span))
                return found
            finally:
                buf.release()


def problem(model: str | os.PathLike, allowed: set[str]) -> str | None:
    """The first external-data location of `model` that is not one of `allowed` (names beside the model), or None."""
    try:
        found = locations(model)
    except WireError as e:
        return f"not an ONNX model ({e})"
    bad = sorted(found - allowed)
    return f"external data at {bad[0]!r}, outside its listed files" if bad else None
