"""A manifest that no longer says what its members' scores mean is refused in one line, before any member runs."""

import json
import shutil

import pytest

from runtime.cards import CARD
from runtime.manifest import MANIFEST, sha256_file

from .conftest import SAMPLE_TEST, run_kernel


def edited(tiny_pipeline, tmp_path, edit, card_edit=None):
    """A copy of the tiny bundle with its manifest (and, re-hashed, its member's card) edited."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    m = json.loads((bundle / MANIFEST).read_text())
    if card_edit:
        rel = m["members"][0]["files"]["card"]
        card = json.loads((bundle / rel).read_text())
        (bundle / rel).write_text(json.dumps(card_edit(card)))
        m["files"][rel] = sha256_file(bundle / rel)
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m))
    return bundle


def swap(xs, i=0, j=1):
    xs[i], xs[j] = xs[j], xs[i]


def first_question(m):
    return sorted(m["label_space"]["correct"])[0]


EDITS = {
    "labels swapped": (lambda m: swap(m["label_space"]["labels"]), "the label list or its order"),
    "labels and counts swapped": (lambda m: (swap(m["label_space"]["labels"]), swap(m["label_space"]["counts"])), "the label list or its order"),
    "a label renamed": (lambda m: m["label_space"]["labels"].__setitem__(0, "True_Correct:Renamed"), "the label list"),
    "a correct answer": (lambda m: m["label_space"]["correct"].__setitem__(first_question(m), "something else"), "'s correct answer differs"),
    "a misconception list": (lambda m: m["label_space"]["misconceptions"][first_question(m)].append("Made_up"), "'s misconceptions differs"),
    "the counts": (lambda m: m["label_space"]["counts"].__setitem__(0, 10**6), "label_space.counts"),
    "the template": (lambda m: m["members"][0].__setitem__("template", "bare"), "member m0-bert-fp32's template"),
    "the chat wrapper": (lambda m: m["members"][0].__setitem__("chat", {"prefix": "<s>", "suffix": ""}), "member m0-bert-fp32's chat"),
    "max_length": (lambda m: m["members"][0].__setitem__("max_length", 7), "member m0-bert-fp32's max_length"),
    "pad_token_id": (lambda m: m["members"][0].__setitem__("pad_token_id", 3), "member m0-bert-fp32's pad_token_id"),
}


@pytest.mark.parametrize("what", EDITS)
def test_a_manifest_that_disagrees_with_its_members_card_is_refused(tiny_pipeline, tmp_path, what):
    """Before: the same models ranked other labels, with exit 0 (only a member's output width was checked)."""
    edit, error = EDITS[what]
    bundle = edited(tiny_pipeline, tmp_path, edit)
    out = tmp_path / "submission.csv"
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))
    assert done.returncode == 2 and error in done.stderr and f"models/m0-bert-fp32/{CARD}" in done.stderr, done.stderr[-800:]
    assert done.stderr.strip().count("\n") == 0 and not out.exists()


def test_a_tokenizer_swapped_under_a_new_hash_is_refused(tiny_pipeline, tmp_path):
    def retokenize(m):
        rel = m["members"][0]["files"]["tokenizer"]
        path = tmp_path / "bundle" / rel
        path.write_text(json.dumps(json.loads(path.read_text()) | {"truncation": None}))
        m["files"][rel] = sha256_file(path)

    bundle = edited(tiny_pipeline, tmp_path, retokenize)
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "member m0-bert-fp32's tokenizer differs" in done.stderr, done.stderr[-800:]


def test_a_member_of_another_label_order_is_refused_not_averaged(tiny_pipeline, tmp_path):
    """The card of a member packaged from a run with another label order: the bundle stops, it is never blended."""
    def reorder(card):
        swap(card["label_space"]["labels"], 2, 3)
        swap(card["label_space"]["counts"], 2, 3)
        return card

    bundle = edited(tiny_pipeline, tmp_path, lambda m: None, reorder)
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "the label list or its order differs from" in done.stderr, done.stderr[-800:]


def test_a_card_that_fails_its_hash_costs_only_its_member(tiny_pipeline, tmp_path):
    bundle = edited(tiny_pipeline, tmp_path, lambda m: None)
    (bundle / "models" / "m0-bert-fp32" / CARD).write_text("{}")
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 0 and f"SKIPPED member m0-bert-fp32: models/m0-bert-fp32/{CARD}: sha256 mismatch" in done.stderr


def test_a_member_wider_than_its_labels_is_skipped_loudly(tiny_pipeline, tmp_path):
    """Card and manifest agree on one label fewer than the model's head: the width check still catches it."""
    def shorter(space):
        space["labels"], space["counts"] = space["labels"][:-1], space["counts"][:-1]

    bundle = edited(tiny_pipeline, tmp_path, lambda m: shorter(m["label_space"]), lambda c: (shorter(c["label_space"]), c)[1])
    done = run_kernel(bundle, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "s.csv"))
    n = len(json.loads((bundle / MANIFEST).read_text())["label_space"]["labels"])
    assert done.returncode == 0 and f"SKIPPED member m0-bert-fp32: ValueError: it gives {n + 1} scores per row for {n} labels" in done.stderr


def test_every_member_folder_carries_its_card(tiny_pipeline):
    m = json.loads((tiny_pipeline["bundle"] / MANIFEST).read_text())
    for member in m["members"]:
        card = json.loads((tiny_pipeline["bundle"] / member["files"]["card"]).read_text())
        assert card["label_space"] == m["label_space"] and card["template"] == member["template"]
        assert card["tokenizer_sha256"] == m["files"][member["files"]["tokenizer"]] and member["files"]["card"] in m["files"]
