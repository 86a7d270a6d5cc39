"""One member record (runtime.member) from the export's stage record to the kernel: a field added there is carried
by package, the manifest, the member card and the kernel with no other change; bundles written before still run."""

import json
import shutil
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BundleError
from runtime.labels import LabelSpace
from runtime.manifest import MANIFEST, bundle_members, load_manifest
from runtime.member import CARD_FIELDS, PACKED, Member, MemberSpec

from .conftest import SAMPLE_TEST, rewrite_record

FORMAT_2 = Path(__file__).parent / "data" / "bundle-format-2"
# Values the package step checks or acts on; every other field gets a made-up value of its type (probe), so a new
# field is covered without touching this test.
# base: a torch member's alone (tests/test_base_model.py follows it from the export to the kernel)
CONSTRAINED = {"kind": "transformer", "model_type": "bert", "inputs": None, "engine": None, "base": None, "pack_tokens": None, "precision": "fp32"}


def probe(name: str) -> object:
    """A value of the field's type that no real record holds."""
    hint = typing.get_type_hints(MemberSpec)[name]
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    return {str: f"probe-{name}", int: 7, float: 0.25, dict: {"probe": name}}[kind]


def test_every_field_of_the_member_record_travels_from_the_export_to_the_kernel(tiny_pipeline, tmp_path):
    from builder.package import package

    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], onnx)
    meta = json.loads((onnx / "mapbuild.json").read_text())
    set_to = {f.name: CONSTRAINED.get(f.name, probe(f.name)) for f in fields(MemberSpec)}
    set_to["drift"] = meta["drift"] | {"probe": "drift"}  # package refuses a record without the drift gate's figures
    set_to["base_model"] = "probe/base"  # a bundle publishes a base model's last two path parts
    rewrite_record(onnx, {**meta, **{k: v for k, v in set_to.items() if v is not None}})
    manifest = package([str(onnx)], tmp_path / "bundle", "tester/member-record", wheels=False)
    (member,) = bundle_members(load_manifest(tmp_path / "bundle"))  # what the kernel reads
    assert member.spec() == set_to and manifest["members"][0] == member.to_json()
    card = json.loads((tmp_path / "bundle" / member.files["card"]).read_text())
    assert {k: card[k] for k in CARD_FIELDS} == {k: set_to[k] for k in CARD_FIELDS}


@pytest.mark.parametrize("name", CARD_FIELDS)
def test_a_manifest_that_changes_any_card_field_is_refused(tiny_pipeline, tmp_path, name):
    from runtime.cards import check_card

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    manifest = load_manifest(bundle)
    (member,) = bundle_members(manifest)
    check_card(bundle, manifest, member)
    changed = Member.from_json(member.to_json() | {name: {"kind": "knn", "inputs": PACKED}.get(name, probe(name))})
    with pytest.raises(BundleError, match=f"member {member.name}'s {name} differs from {member.files['card']}"):
        check_card(bundle, manifest, changed)


def test_a_bundle_written_before_the_member_record_still_runs():
    """tests/data/bundle-format-2: written by `mapbuild package` at commit fd9a33d (format 2, a tiny BERT exported
    before paces named their threads and a TF-IDF member whose drift holds cpu_threads), with the scores that
    commit's runtime gave on the sample test rows. Its runtime/, notebook and metadata are left out: the kernel
    checks each member's own files."""
    from runtime.data import read_rows
    from runtime.predict import predict

    manifest = load_manifest(FORMAT_2)
    assert manifest["format"] == "mapbuild-bundle/2"
    bert, tfidf = bundle_members(manifest)
    assert (bert.cpu_threads, tfidf.cpu_threads, "cpu_threads" in tfidf.drift) == (None, 4, False)
    probs, used = predict(FORMAT_2, manifest, LabelSpace.from_json(manifest["label_space"]), read_rows(SAMPLE_TEST))
    assert sorted(used) == [bert.name, tfidf.name] and np.allclose(probs, np.load(FORMAT_2 / "expected.npy", allow_pickle=False), atol=1e-6)


def test_a_format_this_runtime_does_not_read_is_one_line(tmp_path):
    shutil.copytree(FORMAT_2, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / MANIFEST).read_text())
    (tmp_path / "bundle" / MANIFEST).write_text(json.dumps(manifest | {"format": "mapbuild-bundle/1"}))
    with pytest.raises(BundleError, match="format 'mapbuild-bundle/1', this runtime reads 'mapbuild-bundle/2' and 'mapbuild-bundle/3'"):
        load_manifest(tmp_path / "bundle")
