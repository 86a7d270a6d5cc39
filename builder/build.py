"""`mapbuild build CONFIG.toml`: train -> merge -> export for each model, then package them into one bundle."""

from __future__ import annotations

import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import click

from runtime.ensemble import METHODS
from runtime.errors import MapbuildError
from runtime.member import ENGINES, TORCH, TORCH_PRECISIONS

from .build_plan import check_fits
from .export import EXPORT_PRECISIONS, check_drift
from .folds import SplitConfig
from .kinds import KINDS
from .launch import launch
from .options import check_types, known_keys, one_of
from .package import check_dataset_id, package
from .stages import META, check_data, read_meta, run_file
from .wheels import CUDA, ORT_GPU, PYTHONS, cp_tag

DEMO = Path(__file__).parent / "data" / "demo.toml"
SAMPLE_TRAIN = Path(__file__).parent / "data" / "sample_train.csv"


@dataclass
class BuildConfig:
    """A whole build: where stage folders go, the bundle's dataset id, and one entry per model."""

    out: str = field(metadata={"help": "Folder for every stage: <name>/fold<k>/{run,merged,onnx} (<name>/full/ for a full refit), as `cv` writes them, and bundle/."})
    dataset_id: str = field(metadata={"help": "Kaggle dataset id of the bundle, OWNER/SLUG."})
    models: list[dict] = field(metadata={"help": "[[models]] tables: `name`, `quantize`, `force`, `engine` (onnx, or torch: PyTorch runs its fp16 or fp32 weights in the kernel, split over both T4s where one cannot hold them) and any `mapbuild train` option; with `kind = \"tfidf\"` or `\"knn\"`, any `mapbuild tfidf` or `mapbuild knn` option."})
    data: str | None = field(default=None, metadata={"help": "Labelled train.csv of every [[models]] table that sets no `data` of its own."})
    test: str | None = field(default=None, metadata={"help": "A test CSV to run the finished bundle on, as the kernel would."})
    title: str | None = field(default=None, metadata={"help": "Dataset title, 6-50 characters (default: 'mapbuild SLUG')."})
    ensemble: str = field(default="pool", metadata={"help": "How members combine: pool (log-linear, member scales and label biases fitted per question; the default: best in cross-validation, geo where a question has under 100 out-of-fold rows), geo (weighted geometric mean), prob (weighted probabilities) or rank."})
    wheels: bool = field(default=True, metadata={"help": "Bring the wheels Kaggle's image lacks: onnxruntime-gpu where a member runs on it, bitsandbytes where one is nf4."})
    python: list[str] = field(default_factory=lambda: list(PYTHONS), metadata={"help": "Kernel CPython versions to bring a wheel for."})
    cuda: int = field(default=CUDA, metadata={"help": "CUDA major of the kernel image; picks the onnxruntime-gpu build."})
    find_links: str | None = field(default=None, metadata={"help": "Take the wheels from this folder alone, not PyPI."})

    def __post_init__(self) -> None:
        check_dataset_id(self.dataset_id)
        try:
            for python in self.python:
                cp_tag(python)
        except MapbuildError:
            raise MapbuildError(f'python = {self.python!r}: give CPython versions such as ["3.11", "3.12"]') from None
        if self.cuda not in ORT_GPU:
            raise MapbuildError(f"cuda must be one of {', '.join(map(str, ORT_GPU))}, got {self.cuda!r}")
        one_of(self.ensemble, METHODS, "ensemble")
        if not self.models:
            raise MapbuildError("add at least one [[models]] table")
        names = [m.get("name") for m in self.models]
        # a name is a folder under OUT and the bundle: `./t` would share `t`'s folder, `a/b` or `..` leave OUT's layout
        plain = lambda n: isinstance(n, str) and n[:1] not in ("", ".") and all(c.isascii() and (c.isalnum() or c in "-_.") for c in n)
        if bad := next((i for i, n in enumerate(names, 1) if n is not None and not plain(n)), None):
            raise MapbuildError(f"[[models]] table {bad}: name = {names[bad - 1]!r} is not a plain folder name; use letters, digits, -, _ and ., not starting with .")
        if None in names or len(set(names)) != len(names):
            raise MapbuildError("every [[models]] table needs a unique `name`")


class Recipe(NamedTuple):
    """One [[models]] table: how to build a member (runtime.member.Member is what the bundle then holds)."""

    name: str
    kind: str  # a key of KINDS
    config: SplitConfig
    quantize: str
    force: bool  # keep a quantized export that fails the drift gate
    engine: str = "onnx"  # the kernel's engine for it: onnx, or torch (runtime.torch_engine)


def existing(path: Path, what: str, fix: str) -> str:
    """`path` as a string; a one-line error naming `what` gave it, and the fix, when it is no file."""
    if not path.is_file():
        raise MapbuildError(f"{what}: file not found ({path}); {fix}")
    return str(path)


def member_data(config: Path, name: str, own: str | None, top: str | None, given: str | None) -> str:
    """The data a member trains on, checked on load so that plan, cv and build stop before any work: --data
    (relative to the working folder) over its own `data` over the top level's (relative to the config)."""
    fix = 'set data = "path/to/train.csv" (relative to the config) or pass --data PATH'
    if given is not None:
        return existing(Path(given).resolve(), f"--data {given}", "give a labelled train.csv")
    here = config.resolve().parent
    if own is not None:
        return existing((here / own).resolve(), f"{config}: [[models]] {name}: data = {own!r}", fix)
    if top is not None:
        return existing((here / top).resolve(), f"{config}: top level: data = {top!r}", fix)
    raise MapbuildError(f"{config}: [[models]] {name}: no data, in it or at the top level; {fix}")


def load_config(path: str | os.PathLike, **overrides) -> tuple[BuildConfig, list[Recipe]]:
    """Parse CONFIG.toml; relative paths are relative to the file. `overrides` (the command line's, None for unset)
    replace the file's top-level keys, `data` every member's too; their paths are relative to the working folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MapbuildError(f"{path}: {e}") from None
    here = path.resolve().parent
    known_keys(raw, (f.name for f in fields(BuildConfig)), str(path))
    check_types(BuildConfig, raw, str(path))
    top = raw.get("data")
    raw["out"] = str(here / raw.get("out", "build"))
    for key in ("test", "find_links", "data"):
        if raw.get(key):
            raw[key] = str(here / raw[key])
    given = {k: v for k, v in overrides.items() if v is not None}
    raw.update({k: str(Path(v).resolve()) if k in ("out", "test", "find_links", "data") else v for k, v in given.items()})
    if missing := [f.name for f in fields(BuildConfig) if f.default is MISSING and f.default_factory is MISSING and f.name not in raw]:
        raise MapbuildError(f"{path}: needs {', '.join(missing)} at the top level")
    try:
        cfg = BuildConfig(**raw)
    except (TypeError, MapbuildError) as e:  # its checks name the key; this names the file
        raise MapbuildError(f"{path}: {e}") from None
    members = []
    for m in cfg.models:
        m = dict(m)
        name, quantize, force = m.pop("name"), m.pop("quantize", "int8"), m.pop("force", False)
        if not isinstance(force, bool):
            raise MapbuildError(f"{path}: [[models]] {name}: force must be true or false, got {force!r}")
        kind, engine = m.pop("kind", "transformer"), m.pop("engine", "onnx")
        where = f"{path}: [[models]] {name}"
        try:
            one_of(kind, KINDS, "kind")
            one_of(engine, ENGINES, "engine")
            if engine == TORCH and TORCH not in KINDS[kind].engines:
                raise MapbuildError(f"engine = 'torch' runs transformer members; a {kind} member runs on onnx")
            one_of(quantize, TORCH_PRECISIONS if engine == TORCH else EXPORT_PRECISIONS, "quantize (engine = 'torch')" if engine == TORCH else "quantize")
        except MapbuildError as e:
            raise MapbuildError(f"{where}: {e}") from None
        config = KINDS[kind].config
        known_keys(m, (f.name for f in fields(config)), where)
        check_types(config, m, where)
        m["data"] = member_data(path, name, m.get("data"), top, given.get("data"))
        try:
            spec = config(**m)
        except MapbuildError as e:  # its checks name the option (--model ...): say which file and table set it
            raise MapbuildError(f"{where}: {e}") from None
        members.append(Recipe(name, kind, spec, quantize, force, engine))
    return cfg, members


def fold_dir(root: Path, name: str, fold: int | None) -> Path:
    """A member's folder under OUT, one layout for `cv` and `build`, so that each reuses what the other finished."""
    return root / name / ("full" if fold is None else f"fold{fold}")


def member_dir(root: Path, member: Recipe) -> Path:
    """The folder of the fold (or full refit) a member's config names."""
    return fold_dir(root, member.name, None if member.config.full else member.config.fold)


def done(dest: Path, member: Recipe) -> bool:
    """Whether dest holds a finished model of exactly `member` (its config, export precision and drift gate) on the
    data file as it is now, with the run files cv and package read; any other is an error, never reused."""
    if not (dest / "onnx" / META).is_file():  # stage folders appear whole or not at all
        return False
    meta, spec = read_meta(dest / "onnx", "onnx", f"remove {dest} to train the fold again"), member.config
    if not spec.matches(meta["config"]):
        raise MapbuildError(f"{dest}: trained with other options than the config's now; remove it, or give the changed recipe a new name or --out")
    wanted = KINDS[member.kind].precision or member.quantize
    if meta["precision"] != wanted:
        raise MapbuildError(f"{dest}: exported at {meta['precision']}, but the config now asks quantize = {member.quantize!r}; remove the folder, or set quantize back")
    if (meta.get("engine") or "onnx") != member.engine:
        raise MapbuildError(f"{dest}: exported for {meta.get('engine') or 'onnx'}, but the config now asks engine = {member.engine!r}; remove the folder, or set engine back")
    if "map3_onnx" in meta.get("drift", {}):  # a transformer's drift gate, which `force = true` may have overridden then
        try:
            check_drift(meta["drift"], meta["precision"], member.force)
        except MapbuildError:
            raise MapbuildError(f"{dest}: its {meta['precision']} export fails the drift gate and was kept with force = true, which the config no longer sets; remove the folder, or set force back") from None
    check_data(meta, spec.data, f"restore the file, or remove {dest} to train the fold again")
    run = Path(meta["run"])
    if missing := [run / f for f in ("oof.npz", "metrics.json") if not (run / f).is_file()]:
        raise MapbuildError(f"{missing[0]}: missing, and cv and package read it; remove {dest} to train the fold again")
    for f in ("oof.npz", "metrics.json"):
        run_file(meta, f)  # the run trained again since it was exported, say
    return True


def build_member(member: Recipe, root: Path) -> Path:
    """One model's stages into its fold folder under root (run, merged, onnx; a TF-IDF member writes onnx alone),
    unless that folder is done already. Returns its ONNX folder."""
    name, kind, spec, quantize, force, engine = member
    what = "full refit" if spec.full else f"fold {spec.fold}"
    dest = member_dir(root, member)
    if done(dest, member):
        click.echo(f"== {name}, {what}: done before, kept", err=True)  # progress: stdout is for results
        return dest / "onnx"
    metrics = KINDS[kind].build(name, spec, dest, quantize, force, engine)
    score = f"MAP@3 {metrics['map3']:.4f}" if "map3" in metrics else "no held-out rows"
    click.echo(f"== {name}, {what}: {score}", err=True)
    return dest / "onnx"


def refuse_old_layout(root: Path, member: Recipe) -> None:
    """Builds before `cv`'s layout was theirs wrote OUT/NAME/{run,merged,onnx}: say where that work belongs now, rather
    than train again beside it."""
    old = [p.name for p in (root / member.name / s for s in ("run", "merged", "onnx")) if p.exists()]
    if old:
        moved = member_dir(root, member)
        raise MapbuildError(f"{root / member.name}: holds {', '.join(old)} of an older build (builds now write {moved.name}/, as `cv` does); move them into {moved} or remove them")


def build(config: str | os.PathLike, **overrides) -> Path:
    """Run every stage; returns the bundle folder (and writes submission.csv beside it when `test` is set).
    `overrides`: top-level config keys from the command line."""
    cfg, members = load_config(config, **overrides)
    root = Path(cfg.out)
    for m in members:
        refuse_old_layout(root, m)
    check_fits(members)  # before hours of training
    onnx_dirs = [str(build_member(m, root)) for m in members]
    bundle = root / "bundle"
    package(onnx_dirs, bundle, cfg.dataset_id, cfg.title, wheels=cfg.wheels, find_links=cfg.find_links, ensemble=cfg.ensemble, pythons=tuple(cfg.python), cuda=cfg.cuda)
    click.echo(f"== bundle -> {bundle}")
    if cfg.test:
        submission = root / "submission.csv"
        ran = launch(bundle, "--bundle", ".", "--test", cfg.test, "--out", str(submission.resolve()), capture=False)
        if ran.returncode:
            raise MapbuildError(f"{bundle}: the runtime failed on {cfg.test} (exit {ran.returncode})")
        click.echo(f"== submission -> {submission}")
    return bundle
