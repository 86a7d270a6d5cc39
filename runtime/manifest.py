"""The bundle manifest: what a bundle holds, and the sha256 of every file, checked before anything is trusted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "mapbuild-bundle/1"


class BundleError(ValueError):
    """A bundle that cannot be used at all."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by POSIX relative path."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    }


def load_manifest(bundle: str | os.PathLike) -> dict:
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest; pass --bundle a folder written by `mapbuild package`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {found!r}, this runtime reads {FORMAT!r}")
    return manifest


def check_files(bundle: str | os.PathLike, manifest: dict, paths: list[str]) -> list[str]:
    """Problems with the given manifest paths: escaping the bundle, missing, or a checksum mismatch."""
    root = Path(bundle).resolve()
    problems = []
    for rel in paths:
        path = (root / rel).resolve()
        expected = manifest["files"].get(rel)
        if not path.is_relative_to(root):
            problems.append(f"{rel}: path escapes the bundle")
        elif expected is None:
            problems.append(f"{rel}: not listed in the manifest")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
