"""The member kinds table: what each kind's build keeps of an earlier, interrupted one, and one list of kinds."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

import builder.kinds as kinds
from builder.train import TrainConfig
from runtime.member import MEMBER_KINDS
from runtime.predict import SCORERS


class Trained(Exception):
    pass


def refuse_training(*args, **kwargs):
    raise Trained


def test_a_finished_run_is_kept_when_its_export_was_refused(tiny_pipeline, tmp_path, monkeypatch):
    """An export refused by the drift gate must not cost the training: the rerun (say with --force) starts at merge."""
    dest = tmp_path / "member"
    shutil.copytree(tiny_pipeline["run"], dest / "run")
    spec = TrainConfig.recorded(json.loads((dest / "run" / "mapbuild.json").read_text())["config"])
    monkeypatch.setattr(kinds, "train", refuse_training)
    metrics = kinds.build_transformer("bert", spec, dest, "fp32", force=False)
    assert metrics == json.loads((dest / "run" / "metrics.json").read_text())
    assert json.loads((dest / "onnx" / "mapbuild.json").read_text())["stage"] == "onnx"
    with pytest.raises(Trained):  # a run of other options is never taken for this one
        kinds.build_transformer("bert", dataclasses.replace(spec, epochs=spec.epochs + 1), dest, "fp32", force=False)


def test_the_builder_the_manifest_and_the_kernel_know_the_same_kinds():
    assert tuple(kinds.KINDS) == tuple(SCORERS) == MEMBER_KINDS
    # the manifest is read before any member is scored, so it must not need the kernel's scorers (no import loop)
    loaded = subprocess.run([sys.executable, "-c", "import sys, runtime.manifest; print('runtime.predict' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"
