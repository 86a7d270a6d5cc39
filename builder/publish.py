"""`mapbuild upload` and `mapbuild kernel`: a verified bundle to Kaggle through the official client."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import click

from runtime.errors import MapbuildError
from runtime.manifest import load_manifest
from runtime.preflight import COMPETITION

from .package import exposure
from .stages import atomic_dir
from .verify import check_tree

ACCELERATOR = "NvidiaTeslaT4"


def client():
    """An authenticated KaggleApi. Without credentials the client prints a page of help and exits: silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError:
            raise MapbuildError("the kaggle client is not installed: pip install kaggle six") from None
        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:
            raise MapbuildError("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or save ~/.kaggle/kaggle.json") from None
    return api


def checked(bundle: Path) -> dict:
    """The manifest of an intact bundle holding no credentials."""
    manifest = load_manifest(bundle)
    problems = check_tree(bundle, manifest) + [p for p in [exposure(bundle, manifest["files"])] if p]
    if problems:
        raise MapbuildError(f"{bundle}: {problems[0]}; package it again")
    return manifest


@contextlib.contextmanager
def kaggle_errors(what: str, metadata: Path):
    """The client's own validation (ValueError) names the metadata file; network trouble is one line too."""
    import requests

    try:
        yield
    except ValueError as e:
        raise MapbuildError(f"{metadata}: {e}") from None
    except requests.RequestException as e:
        raise MapbuildError(f"{what}: could not reach Kaggle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def refused(what: str, resp) -> None:
    error = getattr(resp, "error", None)
    if error:
        raise MapbuildError(f"{what}: Kaggle refused it: {error}")


def upload(bundle: str | os.PathLike, message: str | None = None) -> str:
    """Create the dataset, or a new version when its slug exists, with sub-folders zipped. Returns its URL."""
    bundle = Path(bundle)
    manifest = checked(bundle)
    api = client()
    with kaggle_errors("upload", bundle / "dataset-metadata.json"):
        resp = api.dataset_create_new(str(bundle), public=False, dir_mode="zip")
        if "already in use" in (getattr(resp, "error", None) or ""):
            notes = message or f"mapbuild bundle of {manifest['created']}"
            resp = api.dataset_create_version(str(bundle), version_notes=notes, dir_mode="zip")
    refused("upload", resp)
    return getattr(resp, "url", "") or f"https://www.kaggle.com/datasets/{manifest['dataset_id']}"


def kernel(bundle: str | os.PathLike, push: bool = False, api=None) -> dict:
    """The kernel metadata; with push, push the notebook to run on a T4 (`version`: the version Kaggle gave it)."""
    bundle = Path(bundle)
    checked(bundle)
    meta = json.loads((bundle / "kernel-metadata.json").read_text())
    if push:
        api = api or client()
        with kaggle_errors("kernel", bundle / "kernel-metadata.json"):
            resp = api.kernels_push(str(bundle), acc=ACCELERATOR)
        refused("kernel", resp)
        meta["url"], meta["version"] = getattr(resp, "url", ""), getattr(resp, "version_number", None)
    return meta


def status_name(resp) -> str:
    """A KernelWorkerStatus (an enum in the client, a string in older ones) as a lowercase word: complete, error..."""
    status = getattr(resp, "status", resp)
    return str(getattr(status, "name", status)).rsplit(".", 1)[-1].lower()


ENDED = ("complete", "error", "cancel_acknowledged")


MISSED_POLLS = 10  # in a row, at `poll` apart, before --wait gives up on the network: one blip must not end hours


def wait(api, kernel_id: str, timeout: float, poll: float = 60.0) -> str:
    """Poll the kernel's latest run until it ends; a run that did not complete is a one-line error with Kaggle's
    failure message, so the command's exit status is the run's. A poll the network loses is tried again."""
    import requests

    start, missed = time.monotonic(), 0
    while True:
        with kaggle_errors("kernel --wait", Path("kernel-metadata.json")):
            try:
                resp, missed = api.kernels_status(kernel_id), 0
            except requests.RequestException as e:
                missed += 1
                if missed >= MISSED_POLLS:
                    raise
                resp = None
                click.echo(f"kernel --wait: could not reach Kaggle ({type(e).__name__}); trying again in {poll:.0f} s ({missed} of {MISSED_POLLS} in a row)", err=True)
        if resp is None:
            time.sleep(poll)
            continue
        status = status_name(resp)
        if status == "complete":
            return status
        if status in ENDED:
            why = getattr(resp, "failure_message", "") or "no failure message"
            raise MapbuildError(f"kernel {kernel_id}: the run ended {status}: {why}; see its log on Kaggle, fix, and push again")
        if time.monotonic() - start > timeout:
            raise MapbuildError(f"kernel {kernel_id}: still {status} after {timeout / 3600:.1f} h; wait again with `mapbuild kernel BUNDLE --wait`")
        time.sleep(poll)


def fetch_output(api, kernel_id: str, out: str | os.PathLike) -> Path:
    """The run's output files into OUT (a new folder, written whole or not at all), its submission checked: the
    notebook writes mapbuild_result.json beside submission.csv, and a run that fell back says so there."""
    with atomic_dir(out) as tmp:
        with kaggle_errors("kernel --output", Path("kernel-metadata.json")):
            api.kernels_output(kernel_id, path=str(tmp), quiet=True)
        if not (tmp / "submission.csv").is_file():
            raise MapbuildError(f"kernel {kernel_id}: its output has no submission.csv; see its log on Kaggle")
        result = tmp / "mapbuild_result.json"
        faults = json.loads(result.read_text()).get("faults", []) if result.is_file() else []
        if faults:
            raise MapbuildError(f"kernel {kernel_id}: the run fell back: {faults[0]}; fix it before submitting")
    return Path(out)


def submit(api, kernel_id: str, version: int | None, message: str) -> str:
    """Submit the kernel's submission.csv to the code competition (`kaggle competitions submit -k ID -v N`)."""
    with kaggle_errors("kernel --submit", Path("kernel-metadata.json")):
        resp = api.competition_submit_code(file_name="submission.csv", message=message, competition=COMPETITION, kernel=kernel_id, kernel_version=version)
    refused("kernel --submit", resp)
    return getattr(resp, "message", "") or "submitted"


def round_trip(bundle: str | os.PathLike, push: bool, timeout: float, output: str | None, submit_message: str | None, poll: float = 60.0, api=None) -> dict:
    """`kernel`: show; push; wait for the run; fetch its output; submit it. Each step needs the one before."""
    if output and Path(output).exists():  # before hours of waiting, not after
        raise MapbuildError(f"--output {output}: exists; choose a new folder (nothing is overwritten)")
    api = api or (client() if push or timeout else None)
    meta = kernel(bundle, push, api)
    if timeout:
        meta["status"] = wait(api, meta["id"], timeout, poll)
        if output:
            meta["output"] = str(fetch_output(api, meta["id"], output))
        if submit_message:
            if not output:  # its result is checked for fallbacks all the same: a run that fell back is no submission
                with tempfile.TemporaryDirectory(prefix="mapbuild-output-") as tmp:
                    fetch_output(api, meta["id"], Path(tmp) / "output")
            meta["submitted"] = submit(api, meta["id"], meta.get("version"), submit_message)
    return meta
