"""The `mapbuild` command line."""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import click

from .errors import MapbuildError
from .options import config_options
from .stages import remove_pending
from .train import TrainConfig


def friendly(fn: Callable) -> Callable:
    """Turn MapbuildError into a one-line ClickException."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MapbuildError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def terminate(signum: int, frame: object) -> None:
    """On SIGTERM, leave no half-written stage folder behind."""
    remove_pending()
    os._exit(128 + signum)


@click.group()
@click.version_option(package_name="mapbuild")
def cli() -> None:
    """Build offline Kaggle submission bundles for MAP: Charting Student Math Misunderstandings.

    Stages read and write folders: train -> merge -> export -> package. `build` chains them from a TOML file.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, terminate)


@cli.command()
@config_options(TrainConfig, skip=("data",))
@click.option("--data", required=True, type=click.Path(dir_okay=False), help=TrainConfig.__dataclass_fields__["data"].metadata["help"])
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@friendly
def train(out: str, **kwargs) -> None:
    """Fine-tune MODEL as a LoRA classifier on one fold and save the run folder."""
    from .train import train as run

    metrics = run(TrainConfig(**kwargs), out)
    click.echo(f"fold MAP@3 {metrics['map3']:.4f} (unmasked {metrics['map3_unmasked']:.4f}) -> {out}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged model folder to write.")
@friendly
def merge(run_dir: str, out: str) -> None:
    """Merge RUN_DIR's LoRA adapter into its base model: a plain HF folder (safetensors) with the tokenizer."""
    from .merge import merge as run

    click.echo(f"merged -> {run(run_dir, out)}")


@cli.command()
@click.argument("merged_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="ONNX folder to write.")
@click.option("--quantize", type=click.Choice(["fp32", "int8"]), default="int8", show_default=True, help="Weight precision.")
@click.option("--rows", type=int, default=256, show_default=True, help="Held-out rows for the drift check.")
@friendly
def export(merged_dir: str, out: str, quantize: str, rows: int) -> None:
    """Export MERGED_DIR to ONNX and record its logit drift against PyTorch on held-out rows."""
    from .export import export as run

    d = run(merged_dir, out, quantize, rows)
    click.echo(f"{quantize} ONNX -> {out}: max |logit diff| {d['max_abs_logit_diff']:.2e}, top-1 agreement {d['top1_agreement']:.3f} on {d['rows']} rows")


@cli.command()
@click.argument("onnx_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--dataset-id", required=True, help="Kaggle dataset id, OWNER/SLUG.")
@click.option("--title", help="Dataset title (default: 'mapbuild SLUG').")
@click.option("--wheels", type=click.Path(file_okay=False, exists=True), help="Folder of .whl files (e.g. onnxruntime-gpu) for the kernel to install offline.")
@friendly
def package(onnx_dirs: tuple[str, ...], out: str, dataset_id: str, title: str | None, wheels: str | None) -> None:
    """Package ONNX_DIRS (members averaged) with the runtime and a kernel notebook into a Kaggle dataset folder.

    Upload it with `kaggle datasets create -p OUT --dir-mode zip`.
    """
    from .package import package as run

    manifest = run(list(onnx_dirs), out, dataset_id, title, wheels)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    click.echo(f"bundle -> {out}: {len(manifest['members'])} member(s), {len(manifest['files'])} files, {size / 2**20:.1f} MiB")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="Override the config's `out` folder.")
@friendly
def build(config: str, out: str | None) -> None:
    """Run every stage from CONFIG.toml: train, merge and export each model, then package the bundle."""
    from .build import build as run

    run(config, out)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="build/demo", show_default=True, help="Where the stages go.")
@friendly
def demo(out: str) -> None:
    """Build a bundle from the embedded default (MiniLM on the shipped sample) and run it on the sample test rows."""
    from .build import DEMO, build as run

    bundle = run(DEMO, out)
    click.echo(f"\nbundle:     {bundle}\nsubmission: {Path(out) / 'submission.csv'}")


@cli.command()
def models() -> None:
    """List model aliases: hub id, family, size, and whether the weights fit one T4 (15 GiB) at fp16 and int4."""
    from .models import ALIASES, fits_t4, weights_gib

    header = ("alias", "hub id", "family", "params", "fp16 GiB", "T4 fp16", "int4 GiB", "T4 int4", "weights from")
    rows = [header]
    for name, a in ALIASES.items():
        size = f"{a.params_m / 1000:.2f}B" if a.params_m >= 1000 else f"{a.params_m:.1f}M"
        rows.append((
            name, a.hub_id, a.family, size,
            f"{weights_gib(a.params_m, 16):.2f}", "yes" if fits_t4(a.params_m, 16) else "no",
            f"{weights_gib(a.params_m, 4):.2f}", "yes" if fits_t4(a.params_m, 4) else "no",
            f"pip: {a.wheel}" if a.wheel else "hub",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    cli()
