"""`mapbuild build CONFIG.toml`: train -> merge -> export for each model, then package them into one bundle."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import click

from runtime.ensemble import METHODS
from runtime.errors import MapbuildError

from .export import EXPORT_PRECISIONS
from .folds import SplitConfig
from .kinds import KINDS
from .launch import launch
from .options import check_types, known_keys, one_of
from .package import check_dataset_id, package
from .wheels import CUDA, ORT_GPU, PYTHONS, cp_tag

DEMO = Path(__file__).parent / "data" / "demo.toml"
SAMPLE_TRAIN = Path(__file__).parent / "data" / "sample_train.csv"


@dataclass
class BuildConfig:
    """A whole build: where stage folders go, the bundle's dataset id, and one entry per model."""

    out: str = field(metadata={"help": "Folder for every stage: <name>/run, <name>/merged, <name>/onnx and bundle/."})
    dataset_id: str = field(metadata={"help": "Kaggle dataset id of the bundle, OWNER/SLUG."})
    models: list[dict] = field(metadata={"help": "[[models]] tables: `name`, `quantize`, `force` and any `mapbuild train` option; with `kind = \"tfidf\"` or `\"knn\"`, any `mapbuild tfidf` or `mapbuild knn` option."})
    test: str | None = field(default=None, metadata={"help": "A test CSV to run the finished bundle on, as the kernel would."})
    title: str | None = field(default=None, metadata={"help": "Dataset title, 6-50 characters (default: 'mapbuild SLUG')."})
    ensemble: str = field(default="pool", metadata={"help": "How members combine: pool (log-linear, member scales and label biases fitted per question; the default: best in cross-validation, geo where a question has under 100 out-of-fold rows), geo (weighted geometric mean), prob (weighted probabilities) or rank."})
    wheels: bool = field(default=True, metadata={"help": "Bring onnxruntime-gpu wheels: Kaggle's image has no onnxruntime."})
    python: list[str] = field(default_factory=lambda: list(PYTHONS), metadata={"help": "Kernel CPython versions to bring a wheel for."})
    cuda: int = field(default=CUDA, metadata={"help": "CUDA major of the kernel image; picks the onnxruntime-gpu build."})
    find_links: str | None = field(default=None, metadata={"help": "Take the wheels from this folder alone, not PyPI."})

    def __post_init__(self) -> None:
        check_dataset_id(self.dataset_id)
        try:
            for python in self.python:
                cp_tag(python)
        except MapbuildError:
            raise MapbuildError(f'build config: python = {self.python!r}: give CPython versions such as ["3.11", "3.12"]') from None
        if self.cuda not in ORT_GPU:
            raise MapbuildError(f"build config: cuda must be one of {', '.join(map(str, ORT_GPU))}, got {self.cuda!r}")
        one_of(self.ensemble, METHODS, "build config: ensemble")
        if not self.models:
            raise MapbuildError("build config: add at least one [[models]] table")
        names = [m.get("name") for m in self.models]
        if None in names or len(set(names)) != len(names):
            raise MapbuildError("build config: every [[models]] table needs a unique `name`")


class Member(NamedTuple):
    name: str
    kind: str  # a key of KINDS
    config: SplitConfig
    quantize: str
    force: bool  # keep a quantized export that fails the drift gate


def load_config(path: str | os.PathLike, **overrides) -> tuple[BuildConfig, list[Member]]:
    """Parse CONFIG.toml; relative paths are relative to the file. `overrides` (the command line's, None for unset)
    replace the file's top-level keys; their paths are relative to the working folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MapbuildError(f"{path}: {e}") from None
    here = path.resolve().parent
    known_keys(raw, (f.name for f in fields(BuildConfig)), str(path))
    check_types(BuildConfig, raw, str(path))
    raw["out"] = str(here / raw.get("out", "build"))
    for key in ("test", "find_links"):
        if raw.get(key):
            raw[key] = str(here / raw[key])
    given = {k: v for k, v in overrides.items() if v is not None}
    raw.update({k: str(Path(v).resolve()) if k in ("out", "test", "find_links") else v for k, v in given.items()})
    try:
        cfg = BuildConfig(**raw)
    except TypeError as e:
        raise MapbuildError(f"{path}: {e}") from None
    members = []
    for m in cfg.models:
        m = dict(m)
        name, quantize, force = m.pop("name"), m.pop("quantize", "int8"), m.pop("force", False)
        if not isinstance(force, bool):
            raise MapbuildError(f"{path}: [[models]] {name}: force must be true or false, got {force!r}")
        kind = m.pop("kind", "transformer")
        where = f"{path}: [[models]] {name}"
        try:
            one_of(kind, KINDS, "kind")
            one_of(quantize, EXPORT_PRECISIONS, "quantize")
        except MapbuildError as e:
            raise MapbuildError(f"{where}: {e}") from None
        config = KINDS[kind].config
        known_keys(m, (f.name for f in fields(config)), where)
        check_types(config, m, where)
        if "data" not in m:
            raise MapbuildError(f"{where}: set `data` to a labelled train.csv")
        m["data"] = str(here / m["data"])
        members.append(Member(name, kind, config(**m), quantize, force))
    return cfg, members


def build_member(member: Member, dest: Path) -> tuple[Path, dict]:
    """One model's stages into dest (run, merged, onnx; a TF-IDF member writes onnx alone). Returns its ONNX folder
    and its training metrics."""
    name, kind, spec, quantize, force = member
    what = "full refit" if spec.full else f"fold {spec.fold}"
    metrics = KINDS[kind].build(name, spec, dest, quantize, force)
    score = f"MAP@3 {metrics['map3']:.4f}" if "map3" in metrics else "no held-out rows"
    click.echo(f"== {name}, {what}: {score}", err=True)  # progress: stdout is for results
    return dest / "onnx", metrics


def build(config: str | os.PathLike, **overrides) -> Path:
    """Run every stage; returns the bundle folder (and writes submission.csv beside it when `test` is set).
    `overrides`: top-level config keys from the command line."""
    cfg, members = load_config(config, **overrides)
    root = Path(cfg.out)
    onnx_dirs = [str(build_member(m, root / m.name)[0]) for m in members]
    bundle = root / "bundle"
    package(onnx_dirs, bundle, cfg.dataset_id, cfg.title, wheels=cfg.wheels, find_links=cfg.find_links, ensemble=cfg.ensemble, pythons=tuple(cfg.python), cuda=cfg.cuda)
    click.echo(f"== bundle -> {bundle}")
    if cfg.test:
        submission = root / "submission.csv"
        done = launch(bundle, "--bundle", ".", "--test", cfg.test, "--out", str(submission.resolve()), capture=False)
        if done.returncode:
            raise MapbuildError(f"{bundle}: the runtime failed on {cfg.test} (exit {done.returncode})")
        click.echo(f"== submission -> {submission}")
    return bundle
