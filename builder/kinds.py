"""Member kinds as one table: each kind's config, the stages that build its ONNX folder, and the files in it.
The kernel's side of the same table is runtime.predict.SCORERS."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from runtime.errors import MapbuildError
from runtime.member import TORCH
from runtime.torch_engine import ADAPTER_FILES, TORCH_FILES

from . import export, knn, tfidf
from .folds import SplitConfig
from .knn import KnnConfig, train_knn
from .stages import META, read_meta
from .tfidf import TfidfConfig, train_tfidf
from .train import TrainConfig, can_resume, train


def build_transformer(name: str, spec: TrainConfig, dest: Path, quantize: str, force: bool, engine: str = "onnx") -> dict:
    """train -> merge -> export into dest/run, dest/merged and dest/onnx; a killed run resumes where it stopped."""
    from .merge import merge

    what, run = "full refit" if spec.full else f"fold {spec.fold}", dest / "run"
    if (run / META).is_file() and spec.matches(read_meta(run, "run")["config"]):  # an export refused after training
        click.echo(f"== {name}, {what}: trained before, kept", err=True)
        metrics = json.loads((run / "metrics.json").read_text())
    else:
        click.echo(f"== {name}, {what}: train", err=True)
        metrics = train(spec, run, resume=can_resume(spec, run))
    merge(run, dest / "merged")
    click.echo(f"== {name}, {what}: export {quantize} for {engine}", err=True)
    export.export(dest / "merged", dest / "onnx", quantize, force=force, engine=engine)
    return metrics


def build_tfidf(name: str, spec: TfidfConfig, dest: Path, quantize: str, force: bool, engine: str = "onnx") -> dict:
    """One stage: the fitted per-question models are written as dest/onnx directly (always fp32)."""
    return train_tfidf(spec, dest / "onnx")


def build_knn(name: str, spec: KnnConfig, dest: Path, quantize: str, force: bool, engine: str = "onnx") -> dict:
    """One stage: the pooled encoder and the embedded training rows are written as dest/onnx directly."""
    what = "full refit" if spec.full else f"fold {spec.fold}"
    click.echo(f"== {name}, {what}: embed the training rows ({quantize} encoder)", err=True)
    return train_knn(spec, dest / "onnx", quantize)


@dataclass(frozen=True)
class Kind:
    config: type[SplitConfig]  # its `[[models]]` keys and `mapbuild` options
    build: Callable[[str, SplitConfig, Path, str, bool, str], dict]  # (name, config, dest, quantize, force, engine) -> metrics
    files: dict[str, str]  # role -> file of its ONNX folder that the bundle carries
    engines: dict[str, dict[str, str]] = field(default_factory=dict)  # the files of its folder for another `engine`
    on_base: dict[str, str] = field(default_factory=dict)  # the files of its folder for a member on a base outside the bundle
    optional: frozenset[str] = frozenset()  # roles of `files` a folder may lack; every other one it must hold
    precision: str | None = None  # the one precision its folder is written at, whatever `quantize` says

    def present(self, folder: Path, engine: str | None = None, on_base: bool = False) -> dict[str, str]:
        """The files of `folder` the bundle carries for the member's `engine`, or for one `on_base` (its adapter); a
        required one missing is refused, as its member would score nothing and the kernel fall back on the prior."""
        files = self.on_base if on_base else self.engines[engine] if engine else self.files
        if lost := next((f for k, f in files.items() if k not in self.optional and not (folder / f).is_file()), None):
            raise MapbuildError(f"{folder}: {lost} is missing, and its member needs it; write the folder again with the command that made it")
        return {k: f for k, f in files.items() if (folder / f).is_file()}


KINDS: dict[str, Kind] = {
    # the .data file is written only for weights over export.EXTERNAL_DATA_BYTES
    "transformer": Kind(TrainConfig, build_transformer, export.FILES, {TORCH: TORCH_FILES}, ADAPTER_FILES, frozenset({"data"})),
    "tfidf": Kind(TfidfConfig, build_tfidf, tfidf.FILES, precision="fp32"),
    "knn": Kind(KnnConfig, build_knn, knn.FILES),
}
