"""`mapbuild verify`: the bundle's own notebook in a twin of Kaggle's image, its files checked before and after."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.data import InputError, has_labels, labels_of, read_rows
from runtime.labels import LabelSpace, top3
from runtime.manifest import BundleError, check_files, hash_tree, load_manifest
from runtime.metrics import map_at_3
from runtime.predict import prior
from runtime.submission import COLUMNS, check_submission

from .errors import MapbuildError
from .twin import DEFAULT_IMAGE, IMAGES, run_notebook

SAMPLE_TEST = Path(__file__).parent / "data" / "sample_test.csv"
FALLBACKS = ("SKIPPED", "DROPPED", "NO MEMBER LEFT", "NOT ENGAGED")


def check_tree(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file present with its sha256, and nothing unlisted."""
    extra = sorted(set(hash_tree(bundle)) - set(manifest["files"]))
    return check_files(bundle, manifest, list(manifest["files"])) + [f"{f}: not in the manifest" for f in extra]


def prior_map3(manifest: dict, df: pd.DataFrame) -> float:
    """MAP@3 of the training label prior through the kernel's mask: the floor any model must beat."""
    space = LabelSpace.from_json(manifest["label_space"])
    ranked = np.array(space.labels)[top3(prior(space, len(df)), space.candidate_mask(df))]
    return map_at_3(labels_of(df).tolist(), ranked.tolist())


def verify(bundle: str | os.PathLike, test: str | os.PathLike | None = None, image: str = DEFAULT_IMAGE) -> dict:
    """Run the bundle's notebook in the twin of `image` and check what it wrote; with labelled test rows, its
    MAP@3 must reach the label prior's."""
    bundle = Path(bundle).resolve()
    try:
        manifest = load_manifest(bundle)
        df = read_rows(test or SAMPLE_TEST)
    except (BundleError, InputError) as e:
        raise MapbuildError(str(e)) from None
    problems = check_tree(bundle, manifest)
    if problems:
        raise MapbuildError(f"{bundle}: {problems[0]} ({len(problems)} problem(s)); package it again")
    where = f"the {image} twin (Python {IMAGES[image].python})"
    with tempfile.TemporaryDirectory(prefix="mapbuild-verify-") as tmp:
        run = run_notebook(bundle, Path(test or SAMPLE_TEST).resolve(), Path(tmp), image)
        if run.returncode:
            raise MapbuildError(f"verify: the notebook stopped in {where}: {run.last_line}")
        fallbacks = [line.strip() for line in run.output.splitlines() if any(w in line for w in FALLBACKS)]
        if fallbacks:
            raise MapbuildError(f"verify: the kernel run fell back in {where}: {fallbacks[0]}")
        if run.submission is None:
            raise MapbuildError(f"verify: the notebook exited 0 in {where} but wrote no submission.csv")
        problems = check_submission(run.submission, df["row_id"].tolist()) + check_tree(bundle, manifest)
        if problems:
            raise MapbuildError(f"verify: {problems[0]}")
        predictions = pd.read_csv(run.submission, dtype=str, keep_default_na=False)[COLUMNS[1]].str.split(" ").tolist()
    result = {"image": image, "rows": len(df), "seconds": round(run.seconds, 1), "map3": None, "prior_map3": None}
    if has_labels(df):
        result.update(map3=map_at_3(labels_of(df).tolist(), predictions), prior_map3=prior_map3(manifest, df))
        if result["map3"] < result["prior_map3"]:
            raise MapbuildError(
                f"verify: MAP@3 {result['map3']:.4f} on {test or SAMPLE_TEST} is below the label prior's {result['prior_map3']:.4f}: "
                "the bundle's models do not fit these rows"
            )
    return result
