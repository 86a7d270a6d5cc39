"""upload and kernel push: everything up to the network runs for real, the client's validation included;
requests.Session.send is the boundary, where the test records the request and stops it."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

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


class FakeKaggle:
    """The kaggle client's calls the round trip makes, recorded; nothing reaches the network."""

    def __init__(self, statuses, outputs=None, failure=""):
        self.statuses, self.outputs, self.failure, self.calls = list(statuses), outputs or {}, failure, []

    def kernels_push(self, folder, acc):
        self.calls.append(("push", acc))
        return SimpleNamespace(url="https://www.kaggle.com/code/tester/k", version_number=7, error=None)

    def kernels_status(self, kernel_id):
        self.calls.append(("status", kernel_id))
        status = self.statuses.pop(0)
        if isinstance(status, Exception):  # the network lost this poll
            raise status
        return SimpleNamespace(status=SimpleNamespace(name=status), failure_message=self.failure)

    def kernels_output(self, kernel_id, path, quiet):
        self.calls.append(("output", kernel_id))
        for name, text in self.outputs.items():
            (Path(path) / name).write_text(text)
        return list(self.outputs), ""

    def competition_submit_code(self, **kwargs):
        self.calls.append(("submit", kwargs))
        return SimpleNamespace(message="Successfully submitted", error=None)


@pytest.fixture
def fake_kaggle(monkeypatch):
    import builder.publish

    def install(fake):
        monkeypatch.setattr(builder.publish, "client", lambda: fake)
        monkeypatch.setattr(builder.publish.time, "sleep", lambda s: fake.calls.append(("sleep", s)))
        return fake

    return install


def test_push_wait_fetch_and_submit_round_trip(tiny_pipeline, tmp_path, fake_kaggle):
    outputs = {"submission.csv": "row_id,Category:Misconception\n1,True_Correct:NA\n", "mapbuild_result.json": '{"faults": []}'}
    fake = fake_kaggle(FakeKaggle(["QUEUED", "RUNNING", "COMPLETE"], outputs))
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--push", "--wait", "--output", str(out), "--submit", "first try"])
    assert done.exit_code == 0, done.output
    kernel_id = json.loads((tiny_pipeline["bundle"] / "kernel-metadata.json").read_text())["id"]
    assert [c[0] for c in fake.calls] == ["push", "status", "sleep", "status", "sleep", "status", "output", "submit"]
    assert fake.calls[-1][1] == {"file_name": "submission.csv", "message": "first try", "competition": "map-charting-student-math-misunderstandings",
                                 "kernel": kernel_id, "kernel_version": 7}  # fmt: skip
    assert (out / "submission.csv").read_text() == outputs["submission.csv"] and "(version 7)" in done.output and "run complete" in done.output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    again = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait", "--output", str(out)])
    assert_one_line_error(again, f"--output {out}: exists")


def test_a_failed_kernel_run_exits_non_zero_in_one_line_and_submits_nothing(tiny_pipeline, tmp_path, fake_kaggle):
    fake = fake_kaggle(FakeKaggle(["RUNNING", "ERROR"], failure="CUDA out of memory"))
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--push", "--wait", "--submit", "x"])
    assert_one_line_error(done, "the run ended error: CUDA out of memory", "push again")
    assert "submit" not in [c[0] for c in fake.calls]
    fell_back = fake_kaggle(FakeKaggle(["COMPLETE"], {"submission.csv": "x", "mapbuild_result.json": '{"faults": ["m0 SKIPPED: lost"]}'}))
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait", "--output", str(tmp_path / "o"), "--submit", "x"])
    assert_one_line_error(done, "the run fell back: m0 SKIPPED: lost")
    assert "submit" not in [c[0] for c in fell_back.calls] and not (tmp_path / "o").exists()
    assert_one_line_error(CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--submit", "x"]), "add --wait")


def test_submit_without_output_still_refuses_a_run_that_fell_back(tiny_pipeline, fake_kaggle):
    """Without --output the result was never read, and a run whose members fell back was submitted."""
    fake = fake_kaggle(FakeKaggle(["COMPLETE"], {"submission.csv": "x", "mapbuild_result.json": '{"faults": ["m0 SKIPPED: lost"]}'}))
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait", "--submit", "x"])
    assert_one_line_error(done, "the run fell back: m0 SKIPPED: lost")
    assert [c[0] for c in fake.calls] == ["status", "output"]
    clean = fake_kaggle(FakeKaggle(["COMPLETE"], {"submission.csv": "x", "mapbuild_result.json": '{"faults": []}'}))
    assert CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait", "--submit", "x"]).exit_code == 0
    assert [c[0] for c in clean.calls] == ["status", "output", "submit"]


def test_wait_outlasts_a_network_blip_but_not_an_outage(tiny_pipeline, fake_kaggle):
    """One transient network error ended hours of --wait with exit 1."""
    import requests

    from builder.publish import MISSED_POLLS

    lost = requests.ConnectionError("Connection reset by peer")
    fake = fake_kaggle(FakeKaggle(["RUNNING", lost, lost, "RUNNING", "COMPLETE"]))
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait"])
    assert done.exit_code == 0 and "trying again" in done.output, done.output
    assert [c[0] for c in fake.calls].count("status") == 5
    down = fake_kaggle(FakeKaggle(["RUNNING"] + [lost] * MISSED_POLLS))
    done = CliRunner().invoke(cli, ["kernel", str(tiny_pipeline["bundle"]), "--wait"])
    assert done.exit_code == 1 and done.output.strip().splitlines()[-1].startswith("Error: kernel --wait: could not reach Kaggle (ConnectionError")
    assert [c[0] for c in down.calls].count("status") == 1 + MISSED_POLLS
