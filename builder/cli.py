"""The `mapbuild` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import click
from tabulate import tabulate

from runtime.ensemble import METHODS
from runtime.errors import MapbuildError
from runtime.manifest import bundle_members
from runtime.member import ENGINES, TORCH_PRECISIONS
from runtime.plan import LIMIT_HOURS, MARGIN_HOURS, TEST_ROWS, added_member, estimate, verdict
from runtime.preflight import ONNXRUNTIME_GPU
from runtime.prompts import TEMPLATES

from .export import EXPORT_PRECISIONS, MAX_MAP3_DROP
from .knn import KnnConfig
from .options import config_options, did_you_mean
from .stages import disk_full, remove_pending
from .tfidf import TfidfConfig
from .train import TrainConfig
from .twin import DEFAULT_IMAGE, IMAGES
from .wheels import BITSANDBYTES, CUDA, ORT_GPU, PYTHONS


class Group(click.Group):
    """Every command's MapbuildError becomes a one-line ClickException here, once; so does a full disk that no stage
    folder's writer named (stages.disk_full), and, as the kernel does, any other exception: a line naming it, with
    the traceback under -v."""

    VERBOSITY = ("-v", "--verbose", "-q", "--quiet")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Take -v/-q anywhere before a `--`, as `mapbuild train -v ...` reads: they are the group's flags."""
        end = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:end] if a in self.VERBOSITY]
        return super().parse_args(ctx, flags + [a for a in args[:end] if a not in self.VERBOSITY] + args[end:])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: a usage error, a command's --help, a declined prompt
        except MapbuildError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:  # click's own handling says "Aborted!" and exits 1; the convention is 128 + SIGINT
            click.echo("Interrupted: no half-written folder is left; `train --resume` continues a run from its last checkpoint.", err=True)
            ctx.exit(130)
        except Exception as e:
            if (full := disk_full(e, None)) is not None:
                raise click.ClickException(str(full)) from None
            if ctx.params.get("verbose"):
                raise
            what = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise click.ClickException(f"internal error ({type(e).__name__}) {what}; run again with -v for the traceback, and please report it") from None


def json_stdout(ctx: click.Context, param: click.Parameter, as_json: bool) -> bool:
    """Under --json, whatever the command or a library prints while it works (the Trainer's loss lines, progress,
    a twin being built) goes to stderr until the command ends: stdout holds the JSON alone."""
    if as_json:
        ctx.meta["json_stdout"] = ctx.with_resource(stdout_to_stderr())
    return as_json


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Point stdout at stderr, and yield the real stdout. At the file descriptor too where stdout has one: a child
    process writes there itself (the kernel that `build` and `demo` run on test rows prints its MAP@3)."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        try:
            fd, err = real.fileno(), sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):  # CliRunner's streams: no descriptor, and no child writes there
            yield real
            return
        real.flush()
        saved = os.dup(fd)
        os.dup2(err, fd)
        try:
            with open(saved, "w", encoding=real.encoding, closefd=False) as json_out:
                yield json_out
        finally:
            os.dup2(saved, fd)
            os.close(saved)


# One --json for every command with a report (simonw/llm's style): the whole result on stdout, nothing else there.
# No command reads the flag: `emit` does, so no command can print its JSON where the text would go.
json_option = click.option("--json", is_flag=True, expose_value=False, callback=json_stdout, help="Print the result as JSON instead of text lines.")
# plan, cv and build: a shipped config runs unchanged wherever the data is
data_option = click.option("--data", type=click.Path(dir_okay=False), help="Labelled train.csv for every [[models]] table, replacing the config's `data`.")


def emit(result: Any, text: Callable[[Any], str]) -> None:
    """Print a command's one result: as JSON on the real stdout under --json, otherwise as `text(result)`. Both come
    from the same object, so a figure cannot be in one and missing from the other."""
    ctx = click.get_current_context()
    if "json_stdout" in ctx.meta:
        click.echo(json.dumps(result, indent=1, default=str), file=ctx.meta["json_stdout"])
    else:
        click.echo(text(result))


def fit_text(m: dict, took: str = "") -> str:
    """What train, tfidf and knn say of the member folder they wrote."""
    if "map3" not in m:
        return f"full refit on {m['rows_train']} rows{took} -> {m['out']}"
    unmasked = f" (unmasked {m['map3_unmasked']:.4f})" if "map3_unmasked" in m else ""
    return f"fold MAP@3 {m['map3']:.4f}{unmasked}, label prior alone {m['map3_prior']:.4f}{took} -> {m['out']}"


def unready(manifest: dict) -> str | None:
    """Why the bundle cannot run on Kaggle's image, which has neither onnxruntime nor bitsandbytes; None when it can."""
    members, brought = bundle_members(manifest), {w["name"] for w in manifest.get("wheels") or []}
    if any(m.on_onnxruntime for m in members) and ONNXRUNTIME_GPU not in brought:
        return "no onnxruntime wheel in the bundle, and Kaggle's image has none"
    if any(m.precision == "nf4" for m in members) and BITSANDBYTES not in brought:
        return "no bitsandbytes wheel for its nf4 members, and Kaggle's image has none"
    return None


def kaggle_ready(r: dict) -> str:
    """The line that says whether a bundle_result's bundle can run on Kaggle's image, and on what."""
    if r["unready"]:
        return f"NOT Kaggle-ready: {r['unready']}; package again with --wheels"
    if not r["wheels"]:
        return "Kaggle-ready: its members run on the image's own PyTorch"
    return "Kaggle-ready for " + ", ".join(f"Python {w['python']} ({w['name']} {w['version']}" + (f", CUDA {w['cuda']})" if w["cuda"] else ")") for w in r["wheels"])


def terminate(signum: int, frame: object) -> None:
    """On SIGTERM, leave no half-written stage folder behind."""
    remove_pending()
    os._exit(128 + signum)


OURS = (str(Path(__file__).parent), str(Path(__file__).parents[1] / "runtime"))


def ours_or_errors(record: logging.LogRecord) -> bool:
    """What the console shows without -v: our logs, and other packages' errors. Their warnings are noise here
    (bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" on every import offline), and so
    are the root logger's records of libraries that log through it (onnxruntime's quantizer)."""
    if record.levelno >= logging.ERROR or record.name.split(".")[0] == "mapbuild":
        return True
    return record.name == "root" and record.pathname.startswith(OURS)


def quiet_third_parties() -> None:
    """Hide other packages' load reports, weight-loading bars and warnings (FutureWarning, TracerWarning, ...): `-v`
    shows them. Training and inference bars are ours or the Trainer's, and stay."""
    warnings.filterwarnings("ignore", module=r"(?!builder|runtime)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar follows it
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mapbuild")
@click.option("-v", "--verbose", is_flag=True, help="Also show other packages' logs and warnings.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors.")
def cli(verbose: bool, quiet: bool) -> None:
    """Build offline Kaggle submission bundles for MAP: Charting Student Math Misunderstandings.

    Stages read and write folders: train -> merge -> export -> package. `build` chains them from a TOML file.
    """
    console = logging.StreamHandler()
    if not verbose:
        console.addFilter(ours_or_errors)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[console])
    # ours at INFO; onnxruntime's quantizer logs every tensor at INFO, so only -v shows the others'
    logging.getLogger("mapbuild").setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:  # every bar is tqdm's, ours, the Trainer's and the kernel's (a child process inherits it) alike
        os.environ["TQDM_DISABLE"] = "1"
    if not verbose:
        quiet_third_parties()
    signal.signal(signal.SIGTERM, terminate)


@cli.command()
@config_options(TrainConfig, required=("data",))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT.checkpoints, with the same options.")
@json_option
def train(out: str, resume: bool, **kwargs) -> None:
    """Fine-tune MODEL as a LoRA classifier on one fold (or, with --full, all rows) and save the run folder.

    Checkpoints every --save-steps go to OUT.checkpoints, so a crash or timeout costs at most that many steps; a
    rerun continues them with --resume, and without it stops rather than delete them.
    Runs unchanged under `torchrun --nproc_per_node N -m builder train ...` or `accelerate launch -m builder train ...`
    (DDP); rank 0 validates and writes the run folder."""
    from .train import train as run

    metrics = run(TrainConfig(**kwargs), out, resume)
    if metrics is not None:  # None on DDP ranks other than 0: rank 0 alone reports
        emit({**metrics, "out": out}, fit_text)


@cli.command()
@config_options(TfidfConfig, required=("data",))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Member folder to write (an ONNX folder for `package`).")
@json_option
def tfidf(out: str, **kwargs) -> None:
    """Fit one TF-IDF + logistic-regression model per question and write it as an ONNX member folder.

    Word 1-2 grams and in-word character 2-5 grams of the explanation, plus the chosen answer. No merge or export
    step: package OUT beside the exported transformers, on the same folds, and the ensemble weighs it."""
    from .tfidf import train_tfidf

    emit({**train_tfidf(TfidfConfig(**kwargs), out), "out": out}, lambda m: fit_text(m, f" ({m['train_seconds']:.0f} s)"))


@cli.command()
@config_options(KnnConfig, required=("data",))
@click.option("--quantize", type=click.Choice(list(EXPORT_PRECISIONS)), default="int8", show_default=True, help="Precision of the exported encoder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Member folder to write (an ONNX folder for `package`).")
@json_option
def knn(out: str, quantize: str, **kwargs) -> None:
    """Embed the training rows with a sentence encoder and write a nearest-neighbours ONNX member folder.

    In the kernel, each row's K most similar training rows of its question, among those with a candidate label, vote
    with their similarity to the power --power. No training, merge or export step: package OUT beside the others,
    on the same folds, and the ensemble weighs it."""
    from .knn import train_knn

    emit({**train_knn(KnnConfig(**kwargs), out, quantize), "out": out}, lambda m: fit_text(m, f" ({m['train_seconds']:.0f} s to embed)"))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged model folder to write.")
def merge(run_dir: str, out: str) -> None:
    """Merge RUN_DIR's LoRA adapter into its base model: a plain HF folder (safetensors) with the tokenizer.

    A fully fine-tuned run (--lora-r 0) is copied into the same layout."""
    from .merge import merge as run

    click.echo(f"merged -> {run(run_dir, out)}")


@cli.command()
@click.argument("merged_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="ONNX folder to write.")
@click.option(
    "--quantize", type=click.Choice(list(dict.fromkeys([*EXPORT_PRECISIONS, *TORCH_PRECISIONS]))), default="int8", show_default=True,
    help="fp32 and int8 (fastest on CPU), fp16 (the T4), int4 weight-only (models too big for a T4 in fp16). The torch engine takes fp32, fp16 or nf4 (bitsandbytes' 4-bit).",
)
@click.option("--engine", type=click.Choice(ENGINES), default="onnx", show_default=True, help="What runs it in the kernel: onnxruntime (an ONNX graph), or the PyTorch of Kaggle's image (safetensors weights).")
@click.option(
    "--base-source", metavar="SOURCE",
    help="Carry the LoRA adapter and head alone, on the base the notebook attaches as this Kaggle Model (OWNER/MODEL/FRAMEWORK/VARIATION/VERSION) "
    "or dataset (OWNER/SLUG); MERGED_DIR is then the run folder, and --engine torch. The kernel checks the base's sha256 before it trusts it.",
)
@click.option("--rows", type=int, default=1024, show_default=True, help="Held-out rows for the drift check.")
@click.option("--force", is_flag=True, help=f"Keep a model that loses more than {MAX_MAP3_DROP} MAP@3 on the held-out rows, or an fp32 one whose top labels differ from PyTorch's.")
@json_option
def export(merged_dir: str, out: str, quantize: str, engine: str, base_source: str | None, rows: int, force: bool) -> None:
    """Export MERGED_DIR for the kernel's engine and record its logit drift against PyTorch fp32 on held-out rows.

    A model that scores lower than PyTorch fp32 on the held-out rows (MAP@3 with the kernel's masks) by more than the
    limit is refused unless --force, and so is an fp32 one whose top label differs from PyTorch fp32's on over 1%
    of them (it computes another model)."""
    from .export import export as run

    emit({**run(merged_dir, out, quantize, rows, force, engine, base_source), "precision": quantize, "engine": engine, "out": out}, lambda d: (
        f"{d['precision']} {d['engine']} -> {d['out']}: max |logit diff| {d['max_abs_logit_diff']:.2e}, top-1 agreement "
        f"{d['top1_agreement']:.3f} ({d['masked_top1_agreement']:.3f} masked), MAP@3 {d['map3_onnx']:.4f} against "
        f"{d['map3_reference']:.4f} on {d['rows']} rows"
    ))


@cli.command()
@click.argument("onnx_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--dataset-id", required=True, help="Kaggle dataset id, OWNER/SLUG.")
@click.option("--title", help="Dataset title (default: 'mapbuild SLUG').")
@click.option("--wheels/--no-wheels", default=True, show_default=True, help="Bring the wheels Kaggle's image lacks in BUNDLE/wheels: onnxruntime-gpu where a member runs on it, bitsandbytes where one is nf4.")
@click.option("--python", "pythons", default=",".join(PYTHONS), show_default=True, help="Kernel CPython versions to bring a wheel for, comma-separated (e.g. 3.11,3.12).")
@click.option("--cuda", type=click.Choice([str(c) for c in ORT_GPU]), default=str(CUDA), show_default=True, help="CUDA major of the kernel image; picks the onnxruntime-gpu build.")
@click.option("--find-links", type=click.Path(file_okay=False, exists=True), help="Take the wheels from this folder alone, not PyPI (offline builds).")
@click.option("--ensemble", type=click.Choice(METHODS), default="pool", show_default=True, help="Average member probabilities (prob), per-row ranks (rank) or log-probabilities (geo: a weighted geometric mean), or pool log-probabilities with member scales and label biases fitted per question (pool; geo for a question with under 100 out-of-fold rows).")
@json_option
def package(
    onnx_dirs: tuple[str, ...], out: str, dataset_id: str, title: str | None, wheels: bool, pythons: str, cuda: str, find_links: str | None, ensemble: str,
) -> None:
    """Package ONNX_DIRS with the runtime, a kernel notebook and the wheels Kaggle's image lacks into a Kaggle dataset folder.

    Several ONNX_DIRS make an ensemble, weighted to maximise MAP@3 on the out-of-fold rows their runs share.
    Wheels are cached (MAPBUILD_CACHE, default ~/.cache/mapbuild), so a second build fetches nothing.
    Upload the folder with `kaggle datasets create -p OUT --dir-mode zip`.
    """
    from .package import package as run

    manifest = run(list(onnx_dirs), out, dataset_id, title, wheels, find_links, ensemble, tuple(pythons.split(",")), int(cuda))
    emit(bundle_result(manifest, out), bundle_text)


def bundle_result(manifest: dict, out: str | os.PathLike) -> dict:
    """What `package`, `build` and `demo` report of a bundle: each member's weight, what was dropped and why, the
    ensemble's MAP@3, the size, and the wheels that make it Kaggle-ready."""
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    keep = ("name", "weight", "oof_map3", "precision", "inputs", "pack_tokens")
    problem = unready(manifest)
    return {
        "bundle": str(out), "members": [{k: m[k] for k in keep if k in m} for m in manifest["members"]], "ensemble": manifest["ensemble"],
        "files": len(manifest["files"]), "mib": round(size / 2**20, 1), "kaggle_ready": problem is None, "unready": problem, "wheels": manifest.get("wheels") or [],
    }


def bundle_text(r: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"  {m['name']:32s} weight {m['weight']:.2f}  OOF MAP@3 {fmt(m['oof_map3'])}" for m in r["members"]]
    e = r["ensemble"]
    lines += [f"  dropped {d['dir']}: weight 0, OOF MAP@3 {fmt(d['oof_map3'])} (adding it never raised the ensemble's)" for d in e["dropped"]]
    held = f"; {e['map3_held_out']:.4f} held out (fitted on the other folds' rows, or the other half of one fold's)" if e.get("map3_held_out") is not None else ""
    lines.append(f"  {e['method']} ensemble of {e['recipes']} recipe(s): OOF MAP@3 {fmt(e['map3'])} on {e['rows']} shared rows{held}")
    lines.append(f"bundle -> {r['bundle']}: {len(r['members'])} member(s), {r['files']} files, {r['mib']:.1f} MiB")
    return "\n".join([*lines, kaggle_ready(r)])


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--test", type=click.Path(dir_okay=False, exists=True), help="Test CSV to run (default: the embedded sample test rows).")
@click.option("--image", type=click.Choice(list(IMAGES)), default=DEFAULT_IMAGE, show_default=True, help="Which Kaggle image the twin copies.")
@click.option("--attach", multiple=True, type=click.Path(file_okay=False, exists=True), help="A model folder to attach as Kaggle mounts a Model: a member's base (export --base-source). Repeatable.")
@click.option("--torch/--no-torch", default=None, help="Carry the image's PyTorch stack (torch 2.10 for CUDA 12.8, transformers, peft, accelerate; about 7 GB, built once). Default: when a member runs on torch.")
@json_option
def verify(bundle_dir: str, test: str | None, image: str, attach: tuple[str, ...], torch: bool | None) -> None:
    """Run BUNDLE_DIR's own notebook in a twin of Kaggle's image, before you upload it.

    The twin has the image's Python and packages but no onnxruntime (the bundle brings it), no network, and the
    builder blocked; torch, transformers and peft too unless it carries them (--torch); /kaggle/input and
    /kaggle/working are temporary folders, the --attach folders mounted in the first where Kaggle mounts a Model.
    It fails if the notebook stops, if any member is skipped, if the submission is malformed, if a file differs
    from the manifest, or, with labelled --test rows, if MAP@3 falls below the label prior's. Without --test it
    runs the embedded sample rows, and scores them only for a bundle trained on the sample's questions."""
    from .verify import verify as run

    emit(run(bundle_dir, test, image, attach, torch), lambda r: f"verified {bundle_dir} in the {image} twin: {r['rows']} rows, notebook {r['seconds']} s{verify_score(r)}, checksums intact")


def verify_score(r: dict) -> str:
    if r["unscored"]:
        return f", unscored ({r['unscored']}: give --test with labelled rows of its data to score it)"
    return f", MAP@3 {r['map3']:.4f} (label prior {r['prior_map3']:.4f})" if r["map3"] is not None else ""


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--message", "-m", help="Version notes when the dataset already exists.")
def upload(bundle_dir: str, message: str | None) -> None:
    """Upload BUNDLE_DIR as a private Kaggle dataset, or as a new version of it (sub-folders zipped).

    Needs KAGGLE_USERNAME and KAGGLE_KEY or ~/.kaggle/kaggle.json; the bundle's checksums are checked first, and a
    bundle holding anything like a credential is refused. Run `mapbuild verify` before."""
    from .publish import upload as run

    click.echo(f"uploaded {bundle_dir} -> {run(bundle_dir, message)}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--push", is_flag=True, help="Push the notebook to Kaggle to run on a T4 (otherwise only show it).")
@click.option("--wait", "wait_hours", type=float, is_flag=False, flag_value=10.0, default=None, metavar="[HOURS]", help="Wait for the run to end (up to 10 h, or --wait=H hours); exit 1 if it did not complete.")
@click.option("--output", type=click.Path(file_okay=False), help="After --wait, fetch the run's output into this new folder and check it.")
@click.option("--submit", "message", metavar="MESSAGE", help="After --wait, submit the run's submission.csv to the competition with this description.")
@json_option
def kernel(bundle_dir: str, push: bool, wait_hours: float | None, output: str | None, message: str | None) -> None:
    """Show BUNDLE_DIR's submission notebook settings; with --push, push it to run with a T4, internet off.

    Then --wait polls the run until it ends, --output fetches its files, and --submit enters it in the
    competition, as `kaggle kernels status`, `kernels output` and `competitions submit -k ... -v N` would."""
    from .publish import round_trip

    if (output or message) and not wait_hours:
        raise MapbuildError("--output and --submit need a finished run: add --wait")
    emit(round_trip(bundle_dir, push, (wait_hours or 0) * 3600, output, message), lambda meta: "\n".join([
        f"kernel {meta['id']}: {meta['code_file']}, GPU {meta['enable_gpu']}, internet {meta['enable_internet']}, "
        f"datasets {', '.join(meta['dataset_sources'])}, competitions {', '.join(meta['competition_sources'])}"
        + (f" -> pushed {meta['url']} (version {meta['version']})" if push else " (not pushed: add --push)"),
        *(f"{what} {meta[key]}" for key, what in (("status", "run"), ("output", "output ->"), ("submitted", "submission:")) if key in meta),
    ]))


@cli.command()
@click.argument("source", required=False, type=click.Path(exists=True))
@click.option(
    "--add", "extra", multiple=True, metavar="ALIAS[:PRECISION[:ENGINE]]",
    help="Also plan a registry model (e.g. qwen3-8b:int4, qwen3-8b:fp16:torch; default fp16 on onnx).",
)
@click.option("--tokens", type=float, default=80.0, show_default=True, help="Mean prompt tokens per row for --add models (and members whose tokenizer is not here).")
@click.option("--rows", type=int, default=TEST_ROWS, show_default=True, help="Test rows to plan for.")
@click.option("--gpus", type=int, default=2, show_default=True, help="GPUs sharing the rows.")
@click.option("--efficiency", type=float, default=0.25, show_default=True, help="Share of the T4's peak FLOPs reached.")
@data_option
@json_option
def plan(source: str | None, extra: tuple[str, ...], tokens: float, rows: int, gpus: int, efficiency: float, data: str | None) -> None:
    """Estimate kernel time per member of SOURCE (a bundle folder, or a CONFIG.toml before training) and --add
    models on T4s against the 9-hour limit.

    FLOPs are 2 x parameters x mean prompt tokens per row; the rate is the T4's peak for the member's precision
    (fp16 and int4 on tensor cores 65 TFLOPS, fp32 8.1) times --efficiency. What runs on the CPU (TF-IDF, and int8,
    whose kernels onnxruntime's CUDA provider lacks) is planned at the rows/s it ran at on the build machine; for a
    CONFIG.toml, whose members have not run, at their FLOPs on Kaggle's CPU, with tokens counted on their data.

    Where a GPU member's model shape is known (a registry decoder of 2B and up, a local config, a torch member's
    folder), it is placed on the T4s as the kernel places it: a copy on each, or (torch) one copy split over both,
    the rows divided over the copies; GiB/GPU is its weights, a 64-row batch's activations and a CUDA context. A
    member that fits nowhere is refused, with the precisions that would fit."""
    if not 0 < efficiency <= 1 or gpus < 1 or rows < 0:
        raise MapbuildError("--efficiency must be in (0, 1], --gpus at least 1 and --rows not negative")
    echo_plan(source, extra, tokens, rows, gpus, efficiency, data)


def echo_plan(source: str | None, extra: tuple[str, ...], tokens: float, rows: int, gpus: int, efficiency: float, data: str | None = None) -> None:
    """What `plan` and `build --dry-run` print: a table, or JSON, of each member's hours and weights."""
    from .models import ALIASES, FAMILIES

    for spec in extra:  # first, before the planning stack loads; runtime.plan has no did-you-mean
        if (alias := spec.partition(":")[0]) not in ALIASES:
            raise MapbuildError(f"--add {spec}: {alias} is not an alias (`mapbuild models`){did_you_mean(alias, ALIASES)}")
    from runtime.manifest import bundle_members, load_manifest

    from runtime.packing import PACK_TOKENS

    from .build import load_config
    from .build_plan import bundle_shapes, pace_notes, planned_members

    members, sizes, notes, shapes = {}, {}, [], {}
    config = bool(source) and Path(source).is_file()
    if data and not config:
        raise MapbuildError("--data replaces a CONFIG.toml's data: plan a CONFIG.toml with it, not a bundle")
    if config:
        members, sizes, notes, shapes = planned_members(load_config(source, data=data)[1], tokens)
    elif source:
        members = {m.name: m for m in bundle_members(load_manifest(source))}
        notes = pace_notes(members)  # a pace timed on the build machine's every core may be one Kaggle's CPU cannot keep
        shapes = bundle_shapes(source, members.values())
    for spec in extra:
        alias = ALIASES[spec.partition(":")[0]]
        members[spec] = added_member(spec, {a: m.params_m for a, m in ALIASES.items()}, tokens, PACK_TOKENS if FAMILIES[alias.family].kind == "decoder" else None)
        if shape := alias.config():
            shapes[spec] = shape
    if not members and not config:  # a config of TF-IDF members alone plans to nothing, and its notes say why
        raise MapbuildError("plan: give a bundle folder, a CONFIG.toml or at least one --add ALIAS")
    plan = estimate(members, rows, gpus, efficiency, shapes)
    total = sum(e.seconds for e in plan)
    emit({
        "rows": rows, "gpus": gpus, "efficiency": efficiency, "limit_hours": LIMIT_HOURS, "total_hours": total / 3600, "verdict": verdict(total),
        "members": [
            {**asdict(e), "precision": members[e.name].precision, "engine": members[e.name].engine or "onnx", "hours": e.seconds / 3600, "size_mib": sizes.get(e.name)}
            for e in plan
        ],
        "notes": notes,
    }, plan_text)


def plan_text(p: dict) -> str:
    mib = lambda m: "-" if m["size_mib"] is None else f"{m['size_mib']:.0f}"  # noqa: E731
    gib = lambda m: "-" if m["gib_per_gpu"] is None else f"{m['gib_per_gpu']:.1f}"  # noqa: E731
    table = [
        (m["name"], m["precision"], m["engine"] if m["device"] == "T4" else "-", m["device"], m["placement"] or "-", f"{m['params'] / 1e6:.1f}M", mib(m), gib(m),
         f"{m['mean_tokens']:.1f}", f"{m['hours']:.3f}")
        for m in p["members"]
    ]
    table.append(("total", "", "", "", "", "", "", "", "", f"{p['total_hours']:.3f}"))
    note = {"ok": "fits", "warn": f"inside the {MARGIN_HOURS:.0f} h safety margin", "over": "OVER the limit"}[p["verdict"]]
    return "\n".join([
        tabulate(table, headers=("member", "precision", "engine", "runs on", "placement", "params", "MiB", "GiB/GPU", "tokens", "hours"), tablefmt="plain", disable_numparse=True),
        *(f"note: {n}" for n in p["notes"]),
        f"{p['rows']:,} rows, {p['gpus']}x T4: {note}, limit {LIMIT_HOURS:.0f} h",
    ])


def read_data(path: str, labelled: bool = False):
    from runtime.data import read_rows

    return read_rows(path, labelled=labelled)


def pick_row(df, row: int, path: str):
    if not 0 <= row < len(df):
        raise MapbuildError(f"--row {row}: {path} has {len(df)} rows, so use 0..{len(df) - 1}")
    return df.iloc[row]


@cli.command()
@click.argument("train_csv", type=click.Path(dir_okay=False))
@click.option("--test", type=click.Path(dir_okay=False), help="Compare a test CSV with the training data.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder to write.")
@click.option("--samples", type=int, default=3, show_default=True, help="Sample rows shown per question.")
@json_option
def analyze(train_csv: str, test: str | None, out: str, samples: int) -> None:
    """Write a data report: report.md with PNG plots, and summary.json with every figure.

    Label distributions overall and per question, the misconceptions each question admits and each row's candidate
    count, explanation lengths, duplicates and conflicting labels, and the correctness rule's agreement."""
    from .analyze import analyze as run

    emit(run(train_csv, out, test, samples), lambda f: (
        f"{f['rows']} rows, {f['questions']} questions, {f['labels']} labels; {f['exact_duplicates']} exact duplicates, "
        f"{f['conflict_groups']} conflicting inputs, {f['disagreeing_rows']} rows disagree with correctness -> {Path(out) / 'report.md'}"
    ))


@cli.command()
@click.argument("data_csv", type=click.Path(dir_okay=False))
@click.option("--model", default="minilm", show_default=True, help="Alias, local HF folder or hub id whose tokenizer counts.")
@click.option("--template", type=click.Choice(list(TEMPLATES)), default="compact", show_default=True, help="Prompt template to render.")
@click.option("--no-chat-template", "chat", flag_value=False, default=True, help="Do not wrap prompts in the tokenizer's chat template.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size for the padding figures.")
@click.option("--plot", type=click.Path(dir_okay=False), default="token_lengths.png", show_default=True, help="Histogram PNG to write.")
@json_option
def tokens(data_csv: str, model: str, template: str, chat: bool, batch_size: int, plot: str) -> None:
    """Token lengths of DATA_CSV's prompts: percentiles, truncation per max_length, a recommendation, padding waste.

    For a decoder, also the tokens and attention per row that shared-prefix packing computes at each --pack-tokens
    size: the rows of a question share their head once per pack, but attention grows with the square of a pack's
    length, so the table shows which pack size pays."""
    from .models import family_of, resolve
    from .tokens import histogram, pack_report, split_rows, token_lengths, token_report

    df = read_data(data_csv)
    lengths = token_lengths(df, model, template, chat)
    r = token_report(lengths, batch_size)
    # Packing is exact for causal decoders only: an encoder's head would see the tails (runtime/packing.py).
    decoder = family_of(resolve(model))[1].kind == "decoder"
    r["packing"] = pack_report(split_rows(df, model, template, chat)) if decoder else None
    histogram(lengths, r, f"{Path(data_csv).name}: {model}, {template}", Path(plot))
    emit({**r, "model": model, "template": template, "batch_size": batch_size, "histogram": plot}, tokens_text)


def tokens_text(r: dict) -> str:
    w = r["padding_waste"]
    return "\n".join([
        f"{r['rows']} prompts ({r['model']}, {r['template']}): p50 {r['p50']:.0f}, p95 {r['p95']:.0f}, p99 {r['p99']:.0f}, max {r['max']}",
        "truncated at max_length " + ", ".join(f"{n}: {share:.2%}" for n, share in r["truncated"].items()),
        f"recommended --max-length {r['recommended_max_length']} (covers 99.5% of rows)",
        f"padding waste at batch {r['batch_size']}: random {w['random']:.1%}, length-sorted {w['sorted']:.1%}",
        f"histogram -> {r['histogram']}",
        packing_text(r["packing"]) if r["packing"] else "packing: does not apply to encoders (their head would see the tails); rows run unpacked",
    ])


def packing_text(p: dict) -> str:
    """The packing table: per --pack-tokens size, what a packed run computes per row against the unpacked run."""
    table = [
        (s["pack_tokens"], s["packs"], f"{s['tokens_per_row']:.1f}", f"{s['token_ratio']:.2f}x", f"{s['attention_per_row']:,.0f}", f"{s['attention_ratio']:.2f}x")
        for s in p["packed"]
    ]
    headers = ("--pack-tokens", "packs", "tokens/row", "fewer tokens", "attention/row", "attention vs unpacked")
    return (
        f"shared-prefix packing (rows split head + tail, untruncated): unpacked {p['tokens_per_row']:.1f} tokens/row, attention {p['attention_per_row']:,.0f}/row\n"
        + tabulate(table, headers=headers, tablefmt="plain", disable_numparse=True)
    )


@cli.group()
def prompts() -> None:
    """Browse the prompt templates training and the kernel share."""


@prompts.command("list")
def prompts_list() -> None:
    """Each template with the first line it renders for the embedded sample's first row."""
    from runtime.labels import fit_label_space
    from runtime.prompts import render

    from .build import SAMPLE_TRAIN

    df = read_data(str(SAMPLE_TRAIN), labelled=True)
    space = fit_label_space(df)
    for name in TEMPLATES:
        first = render(df.head(1), name, space)[0].splitlines()[0]
        click.echo(f"{name:14s} {first[:90]}")


@prompts.command("show")
@click.option("--template", type=click.Choice(list(TEMPLATES)), required=True, help="Template to render.")
@click.option("--row", type=int, default=0, show_default=True, help="Row position in --data (0-based).")
@click.option("--data", type=click.Path(dir_okay=False), help="CSV to take the row from (default: the embedded sample).")
@click.option("--model", help="Also wrap in this model's chat template and count its tokens.")
def prompts_show(template: str, row: int, data: str | None, model: str | None) -> None:
    """Print one row's prompt exactly as training and the kernel render it."""
    from runtime.prompts import render

    from .build import SAMPLE_TRAIN
    from .tokens import label_space_for

    data = data or str(SAMPLE_TRAIN)
    df = read_data(data)
    picked = df.iloc[[pick_row(df, row, data).name]]
    from .chat import chat_parts
    from .models import load_hf_tokenizer, resolve

    tok = load_hf_tokenizer(resolve(model)) if model else None
    text = render(picked, template, label_space_for(df), chat_parts(tok) if tok else None)[0]
    click.echo(f"{text}\n--- {len(tok(text)['input_ids'])} tokens for {model}" if tok else text)


def stream(text: str) -> None:
    click.echo(text, nl=False)


@cli.command()
@click.argument("question", required=False)
@click.option("--model", default="smollm2", show_default=True, help="Causal LM: alias, local folder or hub id.")
@click.option("--template", type=click.Choice(list(TEMPLATES)), help="Wrap the question (or --data row) in a prompt template.")
@click.option("--data", type=click.Path(dir_okay=False), help="Take a row of this CSV instead of QUESTION.")
@click.option("--row", type=int, default=0, show_default=True, help="Row position in --data (0-based).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 decodes greedily.")
def generate(question: str | None, model: str, template: str | None, data: str | None, row: int, max_new_tokens: int, temperature: float) -> None:
    """Answer QUESTION step by step through the model's chat template, streaming tokens as they come."""
    import pandas as pd

    from runtime.prompts import render

    from .generate import generate as run
    from .generate import load_causal_lm
    from .tokens import label_space_for

    if (question is None) == (data is None):
        raise MapbuildError("give a QUESTION or --data CSV --row N, not both")
    if data:
        df = read_data(data)
        pick_row(df, row, data)
        rows, space = df.iloc[[row]], label_space_for(df)
    else:
        rows = pd.DataFrame([{"QuestionId": "", "QuestionText": question, "MC_Answer": "", "StudentExplanation": ""}])
        space = label_space_for(rows)
    prompt = render(rows, template or "step_by_step", space)[0] if template or data else question
    lm, tok = load_causal_lm(model)
    run(lm, tok, prompt, max_new_tokens, temperature, on_text=stream)
    click.echo()


@cli.command()
@click.option("--model", default="smollm2", show_default=True, help="Causal LM: alias, local folder or hub id.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="CSV in the competition's format.")
@click.option("--row", type=int, required=True, help="Row position in --data (0-based).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 decodes greedily.")
def explain(model: str, data: str, row: int, max_new_tokens: int, temperature: float) -> None:
    """Ask the model what misconception one row's explanation shows (a debugging aid, not a classifier)."""
    from runtime.data import has_labels

    from .generate import explain_prompt, load_causal_lm
    from .generate import generate as run
    from .tokens import label_space_for

    df = read_data(data)
    picked = pick_row(df, row, data)
    prompt = explain_prompt(picked, label_space_for(df))
    click.echo(prompt + "\n---")
    lm, tok = load_causal_lm(model)
    run(lm, tok, prompt, max_new_tokens, temperature, on_text=stream)
    click.echo()
    if has_labels(df):
        click.echo(f"--- label in the data: {picked['Category']}:{picked['Misconception']}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="Override the config's `out` folder.")
@click.option("--dataset-id", help="Override the config's Kaggle dataset id, OWNER/SLUG.")
@click.option("--title", help="Override the config's dataset title.")
@click.option("--wheels/--no-wheels", default=None, help="Override whether the bundle brings the wheels Kaggle's image lacks (onnxruntime-gpu, bitsandbytes).")
@click.option("--python", "pythons", help="Override the kernel CPython versions, comma-separated (e.g. 3.11,3.12).")
@click.option("--cuda", type=click.Choice([str(c) for c in ORT_GPU]), help="Override the kernel image's CUDA major.")
@click.option("--find-links", type=click.Path(file_okay=False, exists=True), help="Take the wheels from this folder alone, not PyPI.")
@click.option("--ensemble", type=click.Choice(METHODS), help="Override how members combine.")
@click.option("--dry-run", is_flag=True, help="Only print the members' kernel plan and weight sizes (as `plan CONFIG.toml`); train nothing.")
@data_option
@json_option
def build(config: str, pythons: str | None, cuda: str | None, dry_run: bool, **overrides) -> None:
    """Run every stage from CONFIG.toml: train, merge and export each model, then package the bundle.

    Options given here replace the file's top-level keys (--data every model's too). A model's fold that `cv`
    (or an earlier build) finished with the same options is kept, not trained again."""
    if dry_run:
        return echo_plan(config, (), 80.0, TEST_ROWS, 2, 0.25, data=overrides["data"])
    from runtime.manifest import load_manifest

    from .build import build as run

    bundle = run(config, python=pythons.split(",") if pythons else None, cuda=int(cuda) if cuda else None, **overrides)
    emit(bundle_result(load_manifest(bundle), bundle), bundle_text)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="Override the config's `out` folder.")
@click.option("--folds", "which", help="Train only these folds, comma-separated (default: all); finished folds are never redone.")
@click.option("--full", is_flag=True, help="Then refit every recipe on all rows, weighted in ensembles by its folds' out-of-fold rows.")
@click.option("--only", multiple=True, metavar="NAME", help="Train only this [[models]] recipe (repeatable); the report still covers all.")
@data_option
@json_option
def cv(config: str, out: str | None, which: str | None, full: bool, only: tuple[str, ...], data: str | None) -> None:
    """Cross-validate every recipe of CONFIG.toml: train each missing fold, report MAP@3 per fold, mean and standard
    deviation, per question, and for the ensemble; write OUT/cv.json.

    Package the fold models (`OUT/NAME/fold*/onnx`) or, after --full, the refits (`OUT/NAME/full/onnx`)."""
    from .cv import cv as run

    try:
        folds = [int(k) for k in which.split(",")] if which else None
    except ValueError:
        raise click.BadParameter(f"{which!r}: give fold numbers such as 0,1", param_hint="--folds") from None
    emit(run(config, out, folds, full, list(only) or None, data), cv_text)


def cv_text(report: dict) -> str:
    lines = []
    for name, r in report["recipes"].items():
        spread = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        lines.append(f"{name:16s} folds {','.join(map(str, r['folds']))}: MAP@3 {r['mean']:.4f}{spread} ({', '.join(f'{x:.4f}' for x in r['fold_map3'])}) on {r['rows']} rows")
    if e := report.get("ensemble"):
        held = f", {e['map3_held_out']:.4f} held out (fitted on the other folds, or the other half of one)" if e["map3_held_out"] is not None else ""
        map3 = f"{e['map3']:.4f}" if e["map3"] is not None else "-"
        lines.append(f"{'ensemble':16s} {e['method']}: MAP@3 {map3} on {e['rows']} shared rows{held}; weights {e['weights']}")
    return "\n".join(lines)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="build/demo", show_default=True, help="Where the stages go.")
@json_option
def demo(out: str) -> None:
    """Build a bundle from the embedded default (MiniLM, TF-IDF and kNN on the shipped sample) and run it on the sample test rows."""
    from .build import DEMO
    from .build import build as run

    bundle = run(DEMO, out=out)
    result = {**bundle_result(json.loads((bundle / "manifest.json").read_text()), bundle), "submission": str(Path(out) / "submission.csv")}
    emit(result, lambda r: f"{bundle_text(r)}\nsubmission -> {r['submission']}")


@cli.command()
@json_option
def env() -> None:
    """Versions of Python, mapbuild and its stack, the GPUs and the cache folders: paste them into a bug report."""
    import onnxruntime
    import torch

    from .hardware import detect
    from .versions import versions
    from .wheels import cache_dir

    hw = detect()
    rows = [("platform", platform.platform()), *versions().items()]
    rows += [("torch CUDA", torch.version.cuda or "none"), ("onnxruntime providers", ", ".join(onnxruntime.get_available_providers()))]
    capability = f", compute capability {hw.capability[0]}.{hw.capability[1]}" if hw.capability else ""
    rows += [("training device", f"{hw.count} x {hw.name}{capability}" if hw.device == "cuda" else hw.device)]
    rows += [("mapbuild cache", str(cache_dir())), ("Hugging Face cache", os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")))]
    emit(dict(rows), lambda r: "\n".join(f"- {k}: {v}" for k, v in r.items()))


@cli.command()
@json_option
def models() -> None:
    """List model aliases: hub id, family, size, and whether a copy fits one T4 (15 GiB) at fp16 and int4, as `plan` places it."""
    from .models import ALIASES, fits_t4, weights_gib

    emit([
        {"alias": name, "hub_id": a.hub_id, "family": a.family, "params_m": a.params_m, "fp16_gib": round(weights_gib(a.params_m, 16), 2),
         "t4_fp16": fits_t4(a, "fp16"), "int4_gib": round(weights_gib(a.params_m, 4), 2), "t4_int4": fits_t4(a, "int4"), "wheel": a.wheel}
        for name, a in ALIASES.items()
    ], models_text)  # fmt: skip


def models_text(models: list[dict]) -> str:
    header = ("alias", "hub id", "family", "params", "fp16 GiB", "T4 fp16", "int4 GiB", "T4 int4", "weights from")
    rows = [
        (
            m["alias"], m["hub_id"], m["family"], f"{m['params_m'] / 1000:.2f}B" if m["params_m"] >= 1000 else f"{m['params_m']:.1f}M",
            f"{m['fp16_gib']:.2f}", "yes" if m["t4_fp16"] else "no", f"{m['int4_gib']:.2f}", "yes" if m["t4_int4"] else "no",
            f"pip: {m['wheel']}" if m["wheel"] else "hub",
        )
        for m in models
    ]
    return tabulate(rows, headers=header, tablefmt="plain", disable_numparse=True)
