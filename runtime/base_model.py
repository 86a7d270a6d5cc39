"""A torch member's base model outside the bundle (issue 42): the competitor attaches it to the notebook as a Kaggle
Model or dataset, and the bundle carries only the LoRA adapter and head (about 100 MB, not 16-28 GB).

The member records the base's Kaggle source and the sha256 of each file the model is built from (BASE_FILES). The
kernel finds the base by its config.json's sha256 wherever Kaggle mounts it (models and datasets have moved between
mount layouts), then trusts it only when every recorded file matches: an adapter on other weights than it learned
against is a quietly worse model, the worst kind of failure. A miss stops the run in one line naming the source."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import EnvironmentFault
from .manifest import sha256_file
from .member import Member

# What the kernel builds a base classifier from: its config and weights (the tokenizer is the bundle's own).
BASE_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")


def base_digests(folder: Path) -> dict[str, str]:
    """sha256 of each of BASE_FILES at the top of `folder`, by name."""
    paths = sorted({p for pattern in BASE_FILES for p in folder.glob(pattern) if p.is_file()})
    return dict(zip((p.name for p in paths), sha256s(paths)))


def sha256s(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once: hashlib releases the GIL, and a 16 GB base is minutes on one core."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(sha256_file, paths))


def find_base(root: str | os.PathLike, member: Member) -> Path:
    """The folder under `root` holding `member`'s base, every recorded file of it matching; else EnvironmentFault in
    one line naming the Kaggle source to attach."""
    want, source = member.base["files"], member.base["source"]
    configs = sorted(p.parent for p in Path(root).rglob("config.json") if p.is_file())
    found = [folder for folder in configs if sha256_file(folder / "config.json") == want["config.json"]]
    if not found:
        raise EnvironmentFault(
            f"member {member.name}: its base model is not attached (no config.json under {root} is its base's); add {source} to the notebook's inputs"
        )
    for folder in found:
        names = sorted(want)
        present = [n for n in names if (folder / n).is_file()]
        digests = dict(zip(present, sha256s([folder / n for n in present])))
        wrong = [n for n in names if digests.get(n) != want[n]]
        if not wrong:
            return folder
    raise EnvironmentFault(
        f"member {member.name}: the base model at {folder} is not the one its adapter was trained on ({wrong[0]}: "
        f"{'sha256 differs' if wrong[0] in digests else 'missing'}); attach {source} as it was when the bundle was built"
    )


def attached_bases(root: str | os.PathLike, members: list[Member]) -> dict[str, Path]:
    """Each base-carrying member's base folder under `root`, by member name, checked before any member runs."""
    return {m.name: find_base(root, m) for m in members if m.base}
