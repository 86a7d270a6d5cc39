"""`mapbuild package`: exported models + runtime + kernel notebook -> a Kaggle dataset folder."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import string
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import runtime
from runtime.manifest import FORMAT, MANIFEST, hash_tree

from .errors import MapbuildError
from .stages import atomic_dir, read_meta

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$")
TEST_ROWS = 40_000  # the competition's largest hidden test set
PACKAGES = ("numpy", "pandas", "tokenizers", "onnxruntime", "onnx", "torch", "transformers", "peft")


def render_template(name: str, **values: str) -> str:
    """A JSON template with `$name` placeholders, filled with JSON-escaped values."""
    text = (TEMPLATES / name).read_text()
    filled = string.Template(text).substitute({k: json.dumps(v)[1:-1] for k, v in values.items()})
    json.loads(filled)  # a template that renders invalid JSON is our bug, caught here rather than on Kaggle
    return filled


def check_dataset_id(dataset_id: str) -> tuple[str, str]:
    owner, _, slug = dataset_id.partition("/")
    if not owner or not SLUG.match(slug):
        raise MapbuildError(f"--dataset-id {dataset_id!r}: use OWNER/SLUG with a slug of 6-50 lowercase letters, digits or dashes")
    return owner, slug


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "mapbuild": runtime.__version__}
    for p in PACKAGES:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            continue
    return found


def package(
    onnx_dirs: list[str], out: str | os.PathLike, dataset_id: str, title: str | None = None, wheels: str | None = None
) -> dict:
    """Write the bundle folder; returns its manifest. `wheels`: a folder of .whl files the kernel installs offline."""
    owner, slug = check_dataset_id(dataset_id)
    if not onnx_dirs:
        raise MapbuildError("package: give at least one ONNX_DIR written by `mapbuild export`")
    wheel_files = sorted(Path(wheels).glob("*.whl")) if wheels else []
    if wheels and not wheel_files:
        raise MapbuildError(f"--wheels {wheels}: no .whl files there; fill it with `pip download --only-binary=:all: ...`")
    metas = [read_meta(d, "onnx") for d in onnx_dirs]
    labels = metas[0]["label_space"]["labels"]
    for d, m in zip(onnx_dirs, metas):
        if m["label_space"]["labels"] != labels:
            raise MapbuildError(f"{d}: its label list differs from {onnx_dirs[0]}'s; ensemble members must share one")
    title = title or f"mapbuild {slug}"[:50]
    if not 6 <= len(title) <= 50:
        raise MapbuildError(f"--title {title!r}: Kaggle needs a dataset title of 6-50 characters")
    with atomic_dir(out) as tmp:
        members = []
        for i, (d, m) in enumerate(zip(onnx_dirs, metas)):
            name = f"m{i}-{m['model_type']}-{m['precision']}"
            (tmp / "models" / name).mkdir(parents=True)
            for f in ("model.onnx", "tokenizer.json"):
                shutil.copy(Path(d) / f, tmp / "models" / name / f)
            members.append({
                "name": name,
                "weight": 1.0,
                "files": {"model": f"models/{name}/model.onnx", "tokenizer": f"models/{name}/tokenizer.json"},
                **{k: m[k] for k in ("base_model", "model_type", "template", "max_length", "pad_token_id", "precision", "drift", "cpu_rows_per_s")},
                "valid_map3": m["metrics"]["map3"],
            })
        for w in wheel_files:
            (tmp / "wheels").mkdir(exist_ok=True)
            shutil.copy(w, tmp / "wheels" / w.name)
        shutil.copytree(Path(runtime.__file__).parent, tmp / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
        values = {"dataset_id": dataset_id, "title": title, "owner": owner, "kernel_slug": f"{slug}-submit"[:50], "kernel_title": f"{title} submit"}
        values["description"] = f"Offline MAP submission bundle with {len(members)} model(s), built by mapbuild {runtime.__version__}."
        for name in ("submit.ipynb", "kernel-metadata.json", "dataset-metadata.json"):
            (tmp / name).write_text(render_template(name, **values))
        manifest = {
            "format": FORMAT,
            "dataset_id": dataset_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "label_space": metas[0]["label_space"],
            "members": members,
            "versions": versions(),
            "wheels": [w.name for w in wheel_files],
            # Measured on the build machine's CPU at export: an upper bound, a T4 is far faster.
            "estimate": {"rows": TEST_ROWS, "cpu_seconds": round(sum(TEST_ROWS / m["cpu_rows_per_s"] for m in members))},
            "files": hash_tree(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
