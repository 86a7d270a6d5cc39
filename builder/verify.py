"""`mapbuild verify`: the bundle's own notebook in a twin of Kaggle's image, its files checked before and after."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from runtime.data import labels_of, read_rows
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace
from runtime.manifest import check_files, hash_tree, load_manifest
from runtime.metrics import masked_map3
from runtime.predict import prior
from runtime.submission import check_submission

from .twin import DEFAULT_IMAGE, IMAGES, run_notebook

SAMPLE_TEST = Path(__file__).parent / "data" / "sample_test.csv"


def check_tree(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file present with its sha256, and nothing unlisted."""
    extra = sorted(set(hash_tree(bundle)) - set(manifest["files"]))
    return check_files(bundle, manifest, list(manifest["files"])) + [f"{f}: not in the manifest" for f in extra]


def prior_map3(manifest: dict, df: pd.DataFrame) -> float:
    """MAP@3 of the training label prior through the kernel's mask: the floor any model must beat."""
    space = LabelSpace.from_json(manifest["label_space"])
    return masked_map3(labels_of(df), prior(space, len(df)), space.labels, space.candidate_mask(df))


def verify(bundle: str | os.PathLike, test: str | os.PathLike | None = None, image: str = DEFAULT_IMAGE) -> dict:
    """Run the bundle's notebook in the twin of `image` and check what it wrote; with labelled test rows, its
    MAP@3 must reach the label prior's."""
    bundle = Path(bundle).resolve()
    manifest = load_manifest(bundle)
    df = read_rows(test or SAMPLE_TEST)
    problems = check_tree(bundle, manifest)
    if problems:
        raise MapbuildError(f"{bundle}: {problems[0]} ({len(problems)} problem(s)); package it again")
    where = f"the {image} twin (Python {IMAGES[image].python})"
    with tempfile.TemporaryDirectory(prefix="mapbuild-verify-") as tmp:
        run = run_notebook(bundle, Path(test or SAMPLE_TEST).resolve(), Path(tmp), image)
        if run.returncode:
            raise MapbuildError(f"verify: the notebook stopped in {where}: {run.last_line}")
        if run.submission is None or run.result is None:
            raise MapbuildError(f"verify: the notebook exited 0 in {where} but wrote no submission.csv and result")
        if run.result["faults"]:
            raise MapbuildError(f"verify: the kernel run fell back in {where}: {run.result['faults'][0]}")
        problems = check_submission(run.submission, df["row_id"].tolist()) + check_tree(bundle, manifest)
        if problems:
            raise MapbuildError(f"verify: {problems[0]}")
    result = {"image": image, "rows": run.result["rows"], "seconds": round(run.seconds, 1), "members_run": run.result["members_run"], "map3": run.result["map3"], "prior_map3": None}
    if result["map3"] is not None:
        result["prior_map3"] = prior_map3(manifest, df)
        if result["map3"] < result["prior_map3"]:
            raise MapbuildError(
                f"verify: MAP@3 {result['map3']:.4f} on {test or SAMPLE_TEST} is below the label prior's {result['prior_map3']:.4f}: "
                "the bundle's models do not fit these rows"
            )
    return result
