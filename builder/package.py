"""`mapbuild package`: exported models + runtime + kernel notebook -> a Kaggle dataset folder."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import string
from datetime import datetime, timezone
from collections.abc import Iterable
from pathlib import Path

import runtime
from runtime.ensemble import METHODS
from runtime.errors import MapbuildError
from runtime.cards import CARD, card
from runtime.data import LABEL
from runtime.manifest import FORMAT, MANIFEST, hash_tree, sha256_file
from runtime.member import Member
from runtime.plan import CPU_KINDS, LIMIT_HOURS, MARGIN_HOURS, TEST_ROWS, manifest_plan, on_gpu, verdict
from runtime.preflight import COMPETITION

from .ensemble import fit
from .export import check_recorded_drift
from .kinds import KINDS
from .options import one_of
from .stages import BUNDLE, StageMeta, atomic_dir, read_meta
from .versions import installed, versions
from .wheels import BITSANDBYTES, CUDA, PYTHONS, fetch, fetch_any

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
# The kaggle client's own rules (kaggle 2.2.5, KaggleApi._validate_slug_syntax and dataset_create_new): lowercase
# letters and digits joined by single dashes (owners may use underscores too), dataset slugs of 6-50 characters.
OWNER = re.compile(r"[a-z0-9]+(?:[_-][a-z0-9]+)*")
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
KERNEL_SUFFIX = "-submit"
log = logging.getLogger("mapbuild")
RUNTIME_DIR = Path(runtime.__file__).parent
# Credentials must never reach a public dataset: kaggle.json, .env files, netrc, files named for keys or secrets.
SECRET = re.compile(r"kaggle\.json|\.env(\..*)?|.*\.env|\.?netrc|\.git-credentials|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|.*(secret|credential|api[_-]?key|access[_-]?token).*", re.I)
# ... and inside files: Kaggle keys, AWS access keys, private keys, GitHub and Hugging Face tokens.
SECRET_TEXT = re.compile(
    rb"KAGGLE_KEY\s*[=:]\s*\S{8}|\"key\"\s*:\s*\"[0-9a-f]{32}\"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}"
)
UNSCANNED = (".whl", ".onnx", ".data", ".safetensors")  # PyPI's wheels and the exported weights: binary, and not ours to hold keys


def dataset_metadata(dataset_id: str, title: str, description: str) -> dict:
    """dataset-metadata.json, for `kaggle datasets create`."""
    return {
        "title": title, "id": dataset_id, "licenses": [{"name": "other"}], "subtitle": "Offline submission bundle built by mapbuild",
        "description": description, "keywords": [],
    }


def kernel_metadata(dataset_id: str, kernel_id: str, bases: list[str] = ()) -> dict:
    """kernel-metadata.json, for `kaggle kernels push`: a private notebook on a GPU with internet off, the bundle, the
    competition and the members' base models (`bases`: Kaggle Models or datasets, BASE_SOURCE) attached, on the image
    it was written for. Its title is its slug: Kaggle warns when a title does not slugify to the id."""
    models = sorted({b for b in bases if b.count("/") == 4})
    return {
        "id": kernel_id, "title": kernel_id.split("/")[1], "code_file": "submit.ipynb", "language": "python", "kernel_type": "notebook",
        "is_private": True, "enable_gpu": True, "enable_tpu": False, "enable_internet": False,
        "dataset_sources": [dataset_id, *sorted(set(bases) - set(models))], "competition_sources": [COMPETITION], "kernel_sources": [],
        "docker_image_pinning_type": "original", "model_sources": models,
    }


def check_dataset_id(dataset_id: str) -> tuple[str, str]:
    owner, _, slug = dataset_id.partition("/")
    if not OWNER.fullmatch(owner) or not SLUG.fullmatch(slug) or not 6 <= len(slug) <= 50:
        raise MapbuildError(
            f"--dataset-id {dataset_id!r}: use OWNER/SLUG, a slug of 6-50 lowercase letters and digits joined by single dashes"
        )
    return owner, slug


def exposure(root: Path, files: Iterable[str]) -> str | None:
    """The first file of the bundle that is or holds a credential, or sits in a hidden folder. An ONNX file's
    metadata and doc strings are scanned; its weights are not."""
    for rel in files:
        path = root / rel
        if any(part.startswith(".") for part in Path(rel).parts[:-1]):
            return f"{rel} is in a hidden folder"
        if SECRET.fullmatch(path.name):
            return f"{rel} looks like a credential"
        if rel.endswith(".onnx") and SECRET_TEXT.search(onnx_text(path)):
            return f"{rel} holds what looks like a credential in its metadata"
        if not rel.endswith(UNSCANNED) and SECRET_TEXT.search(path.read_bytes()):
            return f"{rel} holds what looks like a credential"
    return None


def onnx_text(path: Path) -> bytes:
    """An ONNX model's free text (metadata_props, doc strings, producer), without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    texts = [model.doc_string, model.graph.doc_string, model.producer_name, model.producer_version, model.domain]
    texts += [t for prop in model.metadata_props for t in (prop.key, prop.value)]
    return "\n".join(texts).encode()


def public(path: str | os.PathLike, parts: int = 2) -> str:
    """What a public dataset may say of a build machine's path: a hub id as it is, a local folder by its last `parts`
    parts (a bundle must not publish /home/you/...)."""
    p = Path(path)
    return p.as_posix() if not p.is_absolute() and not p.exists() else "/".join(p.resolve().parts[-parts:])


def kernel_slug(slug: str) -> str:
    """The submission notebook's slug: a valid slug of at most 50 characters, ending in -submit."""
    return slug[: 50 - len(KERNEL_SUFFIX)].rstrip("-") + KERNEL_SUFFIX


def notebook(dataset_id: str, title: str) -> str:
    """submit.ipynb: a title cell and templates/kernel.py as its one code cell, written and validated by nbformat."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    code = string.Template((TEMPLATE_DIR / "kernel.py").read_text()).substitute(dataset_id=dataset_id, bundle_format=FORMAT).rstrip("\n")
    intro = f"# {title}\n\nOffline submission built by mapbuild from the dataset `{dataset_id}`."
    kernelspec = {"display_name": "Python 3", "language": "python", "name": "python3"}
    cells = [new_markdown_cell(intro, id="about"), new_code_cell(code, id="submit")]  # fixed ids: same inputs, same file
    nb = new_notebook(cells=cells, metadata={"kernelspec": kernelspec, "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nbformat.writes(nb)


CPU_ADVICE_SECONDS = 3600  # a CPU member planned past this would gain hours as fp16 on a T4


def check_plan(members: list[Member]) -> dict:
    """The kernel-time plan for 2x T4 and 40,000 rows: a warning inside the safety margin, refused past the limit."""
    plan = manifest_plan(members)
    for m in members:
        seconds = plan["t4_seconds"][m.name]
        if on_gpu(m) or m.kind in CPU_KINDS:
            continue
        if seconds > CPU_ADVICE_SECONDS:  # the README's own int8 MiniLM takes minutes there: advice only where it costs hours
            log.warning(
                "package: member %s is %s, a CPU precision: beside Kaggle's T4s it runs on the CPU, planned at %.1f h; "
                "export it with --quantize fp16 to run it on the GPUs", m.name, m.precision, seconds / 3600,
            )
        else:
            log.info("package: member %s (%s) runs on the kernel's CPU, planned at %.0f s", m.name, m.precision, seconds)
    total = plan["t4_total_seconds"]
    hours = f"{total / 3600:.1f} h on 2x T4 for {TEST_ROWS:,} rows"
    if verdict(total) == "over":
        raise MapbuildError(f"package: the plan needs {hours}, past the {LIMIT_HOURS:.0f} h limit; drop or shrink members (see `mapbuild plan`)")
    if verdict(total) == "warn":
        log.warning("package: the plan needs %s, inside the %.0f h safety margin of the %.0f h limit", hours, MARGIN_HOURS, LIMIT_HOURS)
    return plan


def pool_params(fitted: dict, named: dict[int, str]) -> dict:
    """A pool's per-question parameters with its scales keyed by member name ({} for other methods)."""
    if fitted["method"] != "pool":
        return {}
    scales = lambda prm: {name: prm["scales"][i] for i, name in named.items()}
    return {"questions": {q: {"scales": scales(prm), "bias": prm["bias"]} for q, prm in fitted["questions"].items()}}


def check_members(onnx_dirs: list[str]) -> list[StageMeta]:
    """The members' records, refused where they cannot make one bundle: a label list they do not share, an export
    that drifted, or a label the kernel would refuse."""
    if not onnx_dirs:
        raise MapbuildError("package: give at least one ONNX_DIR written by `mapbuild export`")
    metas = [StageMeta.from_json(read_meta(d, "onnx")) for d in onnx_dirs]
    labels = metas[0].label_space["labels"]
    for d, m in zip(onnx_dirs, metas):
        if m.label_space["labels"] != labels:
            raise MapbuildError(f"{d}: its label list differs from {onnx_dirs[0]}'s; ensemble members must share one")
        check_recorded_drift(m.drift, d)
    bad = next((x for x in labels if not LABEL.fullmatch(x)), None)
    if bad is not None:  # the kernel refuses it, and packaging again cannot mend what the model was trained on
        raise MapbuildError(f"{onnx_dirs[0]}: label {bad!r} is not Category:Misconception without whitespace; fix the training data's labels and train again")
    return metas


def copy_member(tmp: Path, name: str, d: str, m: StageMeta, weight: float, oof_map3: float) -> Member:
    """Copy one member's files from its ONNX folder `d` into tmp/models/NAME; returns the member, with every field
    of its export's record, whose card it writes beside them."""
    (tmp / "models" / name).mkdir(parents=True)
    files = KINDS[m.kind].present(Path(d), m.engine, m.base is not None)
    for f in files.values():
        if (Path(d) / f).is_symlink():
            raise MapbuildError(f"package: {Path(d) / f} is a symlink; a bundle holds real files only")
        shutil.copy(Path(d) / f, tmp / "models" / name / f)
    member = Member(
        **m.spec() | {"base_model": m.base_model and public(m.base_model)},  # a tfidf member has no base model
        name=name, weight=weight, oof_map3=oof_map3,
        files={k: f"models/{name}/{f}" for k, f in files.items()} | {"card": f"models/{name}/{CARD}"},
    )  # fmt: skip
    tokenizer = tmp / member.files["tokenizer"] if "tokenizer" in files else None
    (tmp / member.files["card"]).write_text(
        json.dumps(card(member, m.label_space, tokenizer and sha256_file(tokenizer)), indent=1, ensure_ascii=False)
    )
    return member


def copy_members(tmp: Path, onnx_dirs: list[str], metas: list[StageMeta], fitted: dict) -> tuple[list[Member], list[dict], dict[int, str]]:
    """The members the ensemble weighs, copied in; those it gave weight 0, left out; each kept one's name by index."""
    members, dropped, named = [], [], {}
    for i, (d, m, weight, oof_map3) in enumerate(zip(onnx_dirs, metas, fitted["weights"], fitted["member_map3"])):
        if weight == 0:
            dropped.append({"dir": public(d, parts=3), "oof_map3": oof_map3})  # NAME/foldK/onnx: the fold alone names no member
            continue
        name = named[i] = f"m{len(members)}-{m.model_type}-{m.precision}"
        members.append(copy_member(tmp, name, d, m, weight, oof_map3))
    return members, dropped, named


def write_kernel(tmp: Path, dataset_id: str, title: str, kernel_id: str, members: list[Member]) -> None:
    """What runs the members on Kaggle: the runtime's code, the dataset's and kernel's metadata, and the notebook."""
    (tmp / "runtime").mkdir()
    for f in sorted(RUNTIME_DIR.glob("*.py")) + [RUNTIME_DIR / "requirements.txt"]:  # the code, nothing else
        shutil.copy(f, tmp / "runtime" / f.name)
    description = f"Offline MAP submission bundle with {len(members)} model(s), built by mapbuild {runtime.__version__}."
    bases = [m.base["source"] for m in members if m.base]
    metadata = {"dataset-metadata.json": dataset_metadata(dataset_id, title, description), "kernel-metadata.json": kernel_metadata(dataset_id, kernel_id, bases)}
    for name, content in metadata.items():
        (tmp / name).write_text(json.dumps(content, indent=1))
    (tmp / "submit.ipynb").write_text(notebook(dataset_id, title))


def package(
    onnx_dirs: list[str],
    out: str | os.PathLike,
    dataset_id: str,
    title: str | None = None,
    wheels: bool = True,
    find_links: str | None = None,
    ensemble: str = "pool",
    pythons: tuple[str, ...] = PYTHONS,
    cuda: int = CUDA,
) -> dict:
    """Write the bundle folder; returns its manifest. `wheels`: bring onnxruntime-gpu for each CPython in `pythons`
    built for CUDA major `cuda` in BUNDLE/wheels where a member runs on onnxruntime (a bundle of torch members
    alone runs on the image's PyTorch), and bitsandbytes where a member is nf4 (the version that quantized it,
    installed here), from the `find_links` folder alone or from PyPI through a cache.
    Several members are weighted by ensemble selection on their shared out-of-fold rows; a member that never
    raises the OOF MAP@3 gets weight 0 and stays out of the bundle."""
    owner, slug = check_dataset_id(dataset_id)
    metas = check_members(onnx_dirs)
    one_of(ensemble, METHODS, "--ensemble")
    fitted = fit(onnx_dirs, ensemble)
    title = title or f"mapbuild {slug}"[:50]
    if not 6 <= len(title) <= 50:
        raise MapbuildError(f"--title {title!r}: Kaggle needs a dataset title of 6-50 characters")
    with atomic_dir(out, BUNDLE) as tmp:
        members, dropped, named = copy_members(tmp, onnx_dirs, metas, fitted)
        wheel_entries = fetch(tmp / "wheels", pythons, cuda, find_links) if wheels and any(m.on_onnxruntime for m in members) else []
        if wheels and any(m.precision == "nf4" for m in members):
            wheel_entries.append(fetch_any(tmp / "wheels", BITSANDBYTES, installed(BITSANDBYTES), find_links))
        write_kernel(tmp, dataset_id, title, f"{owner}/{kernel_slug(slug)}", members)
        manifest = {
            "format": FORMAT,
            "dataset_id": dataset_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "label_space": metas[0].label_space,
            "members": [m.to_json() for m in members],
            "ensemble": {k: fitted[k] for k in ("method", "rows", "recipes", "map3", "map3_held_out")} | {"dropped": dropped} | pool_params(fitted, named),
            "versions": versions(),
            "wheels": wheel_entries,
            "estimate": check_plan(members),
            "files": hash_tree(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        problem = exposure(tmp, [*manifest["files"], MANIFEST])  # last, over what is written: the manifest quotes members' base models and chat wrappers
        if problem:
            raise MapbuildError(f"package: {problem}; a bundle is uploaded as a dataset, remove it and package again")
    return manifest
