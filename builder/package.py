"""`mapbuild package`: exported models + runtime + kernel notebook -> a Kaggle dataset folder."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import string
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import runtime
from runtime.ensemble import METHODS
from runtime.manifest import FORMAT, MANIFEST, hash_tree
from runtime.plan import LIMIT_HOURS, MARGIN_HOURS, TEST_ROWS, estimate, verdict

from .ensemble import fit
from .errors import MapbuildError
from .stages import atomic_dir, read_meta
from .wheels import describe, fetch

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$")
log = logging.getLogger("mapbuild")
RUNTIME_DIR = Path(runtime.__file__).parent
# Credentials must never reach a public dataset: kaggle.json, .env files, netrc, files named for keys or secrets.
SECRET = re.compile(r"kaggle\.json|\.env(\..*)?|.*\.env|\.?netrc|\.git-credentials|.*(secret|credential|api[_-]?key|access[_-]?token).*", re.I)
MEMBER_KEYS = ("base_model", "model_type", "template", "max_length", "pad_token_id", "precision", "drift", "cpu_rows_per_s", "params", "mean_tokens")
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


def check_plan(members: list[dict]) -> dict:
    """The kernel-time plan for 2x T4 and 40,000 rows: a warning inside the safety margin, refused past the limit."""
    plan = estimate(members)
    total = sum(e.seconds for e in plan)
    hours = f"{total / 3600:.1f} h on 2x T4 for {TEST_ROWS:,} rows"
    if verdict(total) == "over":
        raise MapbuildError(f"package: the plan needs {hours}, past the {LIMIT_HOURS:.0f} h limit; drop or shrink members (see `mapbuild plan`)")
    if verdict(total) == "warn":
        log.warning("package: the plan needs %s, inside the %.0f h safety margin of the %.0f h limit", hours, MARGIN_HOURS, LIMIT_HOURS)
    return {
        "rows": TEST_ROWS,
        "t4_seconds": {e.name: round(e.seconds, 1) for e in plan},
        "t4_total_seconds": round(total, 1),
        # measured on the build machine's CPU at export: the fallback when the kernel has no GPU
        "cpu_seconds": round(sum(TEST_ROWS / m["cpu_rows_per_s"] for m in members)),
    }


def package(
    onnx_dirs: list[str],
    out: str | os.PathLike,
    dataset_id: str,
    title: str | None = None,
    wheels: bool = False,
    find_links: str | None = None,
    ensemble: str = "prob",
) -> dict:
    """Write the bundle folder; returns its manifest. `wheels`: fetch the kernel's wheels (onnxruntime-gpu) into
    BUNDLE/wheels, from PyPI or from the `find_links` folder alone.
    Several members are weighted by ensemble selection on their shared out-of-fold rows; a member that never
    raises the OOF MAP@3 gets weight 0 and stays out of the bundle."""
    owner, slug = check_dataset_id(dataset_id)
    if not onnx_dirs:
        raise MapbuildError("package: give at least one ONNX_DIR written by `mapbuild export`")
    metas = [read_meta(d, "onnx") for d in onnx_dirs]
    labels = metas[0]["label_space"]["labels"]
    for d, m in zip(onnx_dirs, metas):
        if m["label_space"]["labels"] != labels:
            raise MapbuildError(f"{d}: its label list differs from {onnx_dirs[0]}'s; ensemble members must share one")
    if ensemble not in METHODS:
        raise MapbuildError(f"--ensemble must be one of {', '.join(METHODS)}, got {ensemble}")
    fitted = fit(onnx_dirs, ensemble)
    title = title or f"mapbuild {slug}"[:50]
    if not 6 <= len(title) <= 50:
        raise MapbuildError(f"--title {title!r}: Kaggle needs a dataset title of 6-50 characters")
    with atomic_dir(out) as tmp:
        members, dropped = [], []
        for d, m, weight, oof_map3 in zip(onnx_dirs, metas, fitted["weights"], fitted["member_map3"]):
            if weight == 0:
                dropped.append({"dir": str(d), "oof_map3": oof_map3})
                continue
            name = f"m{len(members)}-{m['model_type']}-{m['precision']}"
            (tmp / "models" / name).mkdir(parents=True)
            files = m.get("files", {"model": "model.onnx", "tokenizer": "tokenizer.json", "data": "model.onnx.data"})
            files = {k: f for k, f in files.items() if (Path(d) / f).is_file()}  # .data: external weights over 2 GiB
            for f in files.values():
                shutil.copy(Path(d) / f, tmp / "models" / name / f)
            members.append({
                "name": name,
                "weight": weight,
                "oof_map3": oof_map3,
                "files": {k: f"models/{name}/{f}" for k, f in files.items()},
                "kind": m.get("kind", "transformer"),
                "chat": m.get("chat"),  # folders exported before chat templates have none
                **{k: m[k] for k in MEMBER_KEYS if k in m},  # a tfidf member has no tokenizer, template or base model
            })
        wheel_files = fetch(tmp / "wheels", find_links=find_links) if wheels else []
        shutil.copytree(RUNTIME_DIR, tmp / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
        kernel_slug = f"{slug}-submit"[:50]  # also its title: Kaggle warns when a title does not slugify to the id
        values = {"dataset_id": dataset_id, "title": title, "owner": owner, "kernel_slug": kernel_slug, "kernel_title": kernel_slug}
        values["description"] = f"Offline MAP submission bundle with {len(members)} model(s), built by mapbuild {runtime.__version__}."
        for name in ("submit.ipynb", "kernel-metadata.json", "dataset-metadata.json"):
            (tmp / name).write_text(render_template(name, **values))
        manifest = {
            "format": FORMAT,
            "dataset_id": dataset_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "label_space": metas[0]["label_space"],
            "members": members,
            "ensemble": {k: fitted[k] for k in ("method", "rows", "map3")} | {"dropped": dropped},
            "versions": versions(),
            "wheels": [describe(w) for w in wheel_files],
            "estimate": check_plan(members),
            "files": hash_tree(tmp),
        }
        secrets = [f for f in manifest["files"] if SECRET.fullmatch(Path(f).name)]
        if secrets:
            raise MapbuildError(f"package: {secrets[0]} looks like a credential; a bundle is uploaded as a dataset, remove it and package again")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
