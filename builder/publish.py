"""`mapbuild upload` and `mapbuild kernel`: a verified bundle to Kaggle through the official client."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from runtime.errors import MapbuildError
from runtime.manifest import load_manifest

from .package import exposure
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


def kernel(bundle: str | os.PathLike, push: bool = False) -> dict:
    """The kernel metadata; with push, push the notebook to run on a T4."""
    bundle = Path(bundle)
    checked(bundle)
    meta = json.loads((bundle / "kernel-metadata.json").read_text())
    if push:
        api = client()
        with kaggle_errors("kernel", bundle / "kernel-metadata.json"):
            resp = api.kernels_push(str(bundle), acc=ACCELERATOR)
        refused("kernel", resp)
        meta["url"] = getattr(resp, "url", "")
    return meta
