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
    return masked_map3(labels_of(df), space.prior(len(df)), space.labels, space.candidate_mask(df))


def own_questions(manifest: dict, df: pd.DataFrame) -> bool:
    """Whether every row's question is one the bundle trained on: the embedded sample's invented questions are
    not, for a bundle of the real data, and its MAP@3 there would judge the bundle by rows it never could know."""
    return set(df["QuestionId"]) <= set(manifest["label_space"]["correct"])


def probe_rows(manifest: dict, sample: pd.DataFrame) -> pd.DataFrame:
    """Unlabelled rows of the bundle's own questions, one per answer it saw, with the sample's explanations: the
    kernel refuses a file whose every question is unknown, and these exercise every question's mask. The label
    space keeps no question text, so it is blank; the rows check the notebook and are never scored."""
    space = manifest["label_space"]
    pairs = [(q, a) for q in sorted(space["answers"]) for a in sorted(space["answers"][q])]
    texts = sample["StudentExplanation"].tolist()
    return pd.DataFrame({
        "row_id": [str(900000 + i) for i in range(len(pairs))], "QuestionId": [q for q, _ in pairs], "QuestionText": "",
        "MC_Answer": [a for _, a in pairs], "StudentExplanation": [texts[i % len(texts)] for i in range(len(pairs))],
    })  # fmt: skip


def verify(
    bundle: str | os.PathLike, test: str | os.PathLike | None = None, image: str = DEFAULT_IMAGE, attach: tuple[str, ...] = (), torch: bool | None = None
) -> dict:
    """Run the bundle's notebook in the twin of `image` and check what it wrote; with labelled test rows, its
    MAP@3 must reach the label prior's. Without `test` it runs the embedded sample rows, scored, for a bundle trained
    on the sample's questions; any other bundle runs probe rows of its own questions, unscored: they check the
    notebook, as Kaggle's three public rows do. `attach`: model folders mounted as Kaggle mounts its Models (members'
    bases); `torch`: with the image's PyTorch stack (default: when a member runs on torch)."""
    bundle = Path(bundle).resolve()
    manifest = load_manifest(bundle)
    df = read_rows(test or SAMPLE_TEST)
    problems = check_tree(bundle, manifest)
    if problems:
        raise MapbuildError(f"{bundle}: {problems[0]} ({len(problems)} problem(s)); package it again")
    where = f"the {image} twin (Python {IMAGES[image].python})"
    unscored = test is None and not own_questions(manifest, df)
    with tempfile.TemporaryDirectory(prefix="mapbuild-verify-") as tmp:
        rows = Path(test or SAMPLE_TEST).resolve()
        if unscored:  # without labels the kernel scores nothing
            df, rows = probe_rows(manifest, df), Path(tmp) / "rows.csv"
            df.to_csv(rows, index=False)
        run = run_notebook(bundle, rows, Path(tmp) / "twin", image, attach=tuple(map(Path, attach)), torch=torch)
        if run.returncode:  # the runtime's own line where it got that far, not the notebook's "the runtime stopped"
            raise MapbuildError(f"verify: the notebook stopped in {where}: {(run.result or {}).get('error') or run.last_line}")
        if run.submission is None or run.result is None:
            raise MapbuildError(f"verify: the notebook exited 0 in {where} but wrote no submission.csv and result")
        if run.result["faults"]:
            raise MapbuildError(f"verify: the kernel run fell back in {where}: {run.result['faults'][0]}")
        problems = check_submission(run.submission, df["row_id"].tolist()) + check_tree(bundle, manifest)
        if problems:
            raise MapbuildError(f"verify: {problems[0]}")
    result = {"image": image, "rows": run.result["rows"], "seconds": round(run.seconds, 1), "members_run": run.result["members_run"], "map3": run.result["map3"], "prior_map3": None,
              "unscored": f"the embedded sample's questions are not this bundle's, so it ran {len(df)} probe rows of its own" if unscored else None}
    if result["map3"] is not None:
        result["prior_map3"] = prior_map3(manifest, df)
        if result["map3"] < result["prior_map3"]:
            raise MapbuildError(
                f"verify: MAP@3 {result['map3']:.4f} on {test or SAMPLE_TEST} is below the label prior's {result['prior_map3']:.4f}: "
                "the bundle's models do not fit these rows"
            )
    return result
