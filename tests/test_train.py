"""Validation figures of a run, without training one."""

import numpy as np
import pytest

from builder.train import learned_little, validate
from runtime.data import labels_of, read_rows
from runtime.labels import fit_label_space
from runtime.predict import prior

from .conftest import SAMPLE_TRAIN


def test_the_label_prior_scores_its_own_baseline():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = fit_label_space(df, sorted(labels_of(df).unique()))
    scores = validate(prior(space, len(df)), df, space, unmasked=False)
    assert scores["map3"] == scores["map3_prior"]
    # By hand: each row's candidates by training count (then label order), other labels only to fill up to 3.
    mask, score = space.candidate_mask(df), 0.0
    for allowed, truth in zip(mask, labels_of(df)):
        ranked = sorted(range(len(space.labels)), key=lambda i: (not allowed[i], -space.counts[i], i))
        top = [space.labels[i] for i in ranked[:3]]
        score += 1 / (top.index(truth) + 1) if truth in top else 0.0
    assert scores["map3_prior"] == pytest.approx(score / len(df)) and 0 < scores["map3_prior"] < 1
    truth = np.array([space.labels.index(lab) for lab in labels_of(df)])
    perfect = np.eye(len(space.labels), dtype=np.float32)[truth]
    reachable = space.candidate_mask(df)[np.arange(len(df)), truth].mean()  # the planted disagreeing row is masked out
    assert validate(perfect, df, space, unmasked=False)["map3"] == pytest.approx(reachable) and reachable > scores["map3_prior"]


@pytest.mark.parametrize(
    "map3, warns",
    [(0.7871, True), (0.9123, False), (0.7594, True), (0.8197, False)],  # collapsed run, default, the prior itself, 6k sample
)
def test_a_run_near_the_label_prior_is_flagged(map3, warns):
    warning = learned_little({"map3": map3, "map3_prior": 0.7594})
    assert (warning is not None) == warns
    assert warning is None or "--learning-rate" in warning and f"{map3:.4f}" in warning
