"""upload and kernel push: everything up to the network runs for real, the client's validation included;
requests.Session.send is the boundary, where the test records the request and stops it."""

import json
import shutil

import pytest
import requests
from click.testing import CliRunner

from builder.cli import cli
from runtime.manifest import MANIFEST, hash_tree

from .test_cli import assert_one_line_error


@pytest.fixture
def network(monkeypatch, tmp_path):
    sent = []

    def boundary(session, request, **kwargs):
        sent.append(request)
        raise requests.ConnectionError("stopped at the network boundary by the test")

    monkeypatch.setattr(requests.Session, "send", boundary)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    return sent


def copy_with(tiny_pipeline, tmp_path, **metadata):
    """The tiny bundle with dataset-metadata.json fields overridden and the manifest re-signed."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    meta = json.loads((bundle / "dataset-metadata.json").read_text())
    (bundle / "dataset-metadata.json").write_text(json.dumps({**meta, **metadata}))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = hash_tree(bundle)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


def test_upload_validates_then_reaches_kaggle(tiny_pipeline, network):
    result = CliRunner().invoke(cli, ["upload", str(tiny_pipeline["bundle"])])
    assert_one_line_error(result, "upload: could not reach Kaggle (ConnectionError")
    assert network and all("kaggle.com" in r.url for r in network)


def test_the_clients_own_validation_stops_a_bad_title_before_the_network(tiny_pipeline, tmp_path, network):
    bundle = copy_with(tiny_pipeline, tmp_path, title="MAP")
    result = CliRunner().invoke(cli, ["upload", str(bundle)])
    assert_one_line_error(result, "dataset-metadata.json", "title must be between 6 and 50")
    assert network == []


def test_upload_refuses_a_tampered_bundle_and_missing_credentials(tiny_pipeline, tmp_path, network, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    (bundle / "kaggle.json").write_text('{"username": "me", "key": "secret"}')
    assert_one_line_error(CliRunner().invoke(cli, ["upload", str(bundle)]), "kaggle.json: not in the manifest")
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    assert_one_line_error(CliRunner().invoke(cli, ["upload", str(tiny_pipeline["bundle"])]), "no Kaggle credentials")
    assert network == []


def test_kernel_shows_its_settings_and_pushes_to_the_network(tiny_pipeline, network):
    shown = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"])])
    assert shown.exit_code == 0 and "GPU True, internet False" in shown.output and "not pushed" in shown.output, shown.output
    assert network == []
    pushed = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--push"])
    assert_one_line_error(pushed, "kernel: could not reach Kaggle")  # one line: the title resolves to the id, no warning
    assert network and "kaggle.com" in network[0].url
