"""The bundle manifest: what a bundle holds, and the sha256 of every file, checked before anything is trusted."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .data import LABEL
from .ensemble import METHODS
from .errors import BundleError
from .member import Member

MANIFEST = "manifest.json"
# 2: every member carries its card (runtime.cards); 3: members are runtime.member.Member records, cpu_threads a
# field of its own (in format 2 it sat in drift, where Member.from_json still finds it).
FORMAT = "mapbuild-bundle/3"
READS = ("mapbuild-bundle/2", FORMAT)

def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    except IsADirectoryError:
        raise BundleError(f"{path}: is a folder, not the bundle's manifest; package the bundle again") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, and nesting past Python's stack
        raise BundleError(f"{path}: unreadable manifest ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {found!r}, this runtime reads {' and '.join(map(repr, READS))}")
    problem = schema_problem(manifest)
    if problem:
        raise BundleError(f"{path}: {problem}; package the bundle again")
    return manifest


def schema_problem(m: dict) -> str | None:
    """The first way the manifest's structure breaks what the runtime relies on, or None."""
    space, members, files = m.get("label_space"), m.get("members"), m.get("files")
    if not isinstance(space, dict) or not isinstance(members, list) or not members or not isinstance(files, dict):
        return "needs label_space (an object), members (a non-empty list) and files (an object)"
    labels = space.get("labels")
    if not isinstance(labels, list) or len(labels) < 3 or len(set(labels)) != len(labels):
        return "label_space.labels must be at least 3 distinct labels"
    bad = next((x for x in labels if not isinstance(x, str) or not LABEL.fullmatch(x)), None)
    if bad is not None:
        return f"label {bad!r} is not Category:Misconception without whitespace"
    if not all(isinstance(space.get(k), dict) for k in ("correct", "answers", "misconceptions")) or not is_list(space.get("counts"), int, len(labels)):
        return "label_space needs correct, answers and misconceptions objects and one integer count per label"
    for q, answer in space["correct"].items():
        if not isinstance(answer, str) or not is_list(space["answers"].get(q), str) or not is_list(space["misconceptions"].get(q), str):
            return f"label_space: question {q} needs its correct answer, and lists of its answers and misconceptions"
    for i, member in enumerate(members):
        try:
            member = Member.from_json(member)
        except ValueError as e:
            name = member.get("name") if isinstance(member, dict) else None
            return f"member {name if isinstance(name, str) else i}: {e}"
        if not isinstance(member.files.get("card"), str):
            return f"member {member.name}: files must be paths, its card (files.card) among them"
    for key in ("ensemble", "estimate"):
        if not isinstance(m.get(key, {}), dict):
            return f"{key} must be an object"
    plan = m.get("estimate", {})
    for key in ("t4_seconds", "cpu_seconds"):
        if not isinstance(plan.get(key, {}), dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in plan.get(key, {}).values()):
            return f"estimate.{key} must map member names to seconds"
    if m.get("ensemble", {}).get("method", "prob") not in METHODS:
        return f"ensemble method {m['ensemble']['method']!r} is not one of {', '.join(METHODS)}"
    if m.get("ensemble", {}).get("method") == "pool":
        problem = pool_problem(m["ensemble"].get("questions"), [x["name"] for x in members], len(labels))
        if problem:
            return f"ensemble.questions: {problem}"
    rows = m.get("estimate", {}).get("rows", 1)
    if not isinstance(rows, int) or rows < 1:
        return f"estimate.rows {rows!r} must be a positive integer"
    return None


def bundle_members(manifest: dict) -> list[Member]:
    """The members of a manifest that load_manifest read."""
    return [Member.from_json(m) for m in manifest["members"]]


def is_list(x: object, of: type, n: int | None = None) -> bool:
    return isinstance(x, list) and all(isinstance(v, of) and not isinstance(v, bool) for v in x) and (n is None or len(x) == n)


def pool_problem(questions: object, names: list[str], n_labels: int) -> str | None:
    """What breaks a pool's parameters: each question needs a finite scale per member and a finite bias per label."""
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    if not isinstance(questions, dict):  # empty: no question had rows enough to fit, so every row gets geo
        return "a pool needs an object of per-question parameters"
    for q, prm in questions.items():
        scales, bias = (prm.get("scales"), prm.get("bias")) if isinstance(prm, dict) else (None, None)
        if not isinstance(scales, dict) or set(scales) != set(names) or not all(map(finite, scales.values())):
            return f"question {q}: scales must give one finite number per member ({', '.join(names)})"
        if not isinstance(bias, list) or len(bias) != n_labels or not all(map(finite, bias)):
            return f"question {q}: bias must be {n_labels} finite numbers, one per label"
    return None


def check_files(bundle: str | os.PathLike, manifest: dict, paths: list[str]) -> list[str]:
    """Problems with the given manifest paths: escaping the bundle, missing, or a checksum mismatch."""
    root = Path(bundle).resolve()
    problems = []
    for rel in paths:
        try:
            path = (root / rel).resolve()
            path.is_file()
        except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13, OSError after
            problems.append(f"{rel}: cannot be opened ({e})")
            continue
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
