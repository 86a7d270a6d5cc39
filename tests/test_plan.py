"""The 9-hour guard: the plan's arithmetic, the package check and the kernel's re-plan against a deadline."""

import copy
import logging
import time

import numpy as np
import pytest
from click.testing import CliRunner

from builder.cli import cli
from runtime.data import read_rows
from runtime.labels import LabelSpace
from runtime.manifest import load_manifest
from runtime.plan import T4_FLOPS, estimate, verdict
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN


def test_estimate_is_forward_flops_over_the_t4_rate():
    m = {"name": "a", "params": 1_000_000_000, "mean_tokens": 100.0, "precision": "fp16"}
    (e,) = estimate([m], rows=40_000, gpus=2, efficiency=0.25)
    assert e.seconds == pytest.approx(2 * 1e9 * 100 * 40_000 / (65e12 * 0.25 * 2))
    (e32,) = estimate([{**m, "precision": "fp32"}], rows=40_000, gpus=2, efficiency=0.25)
    assert e32.seconds / e.seconds == pytest.approx(65 / 8.1)
    assert [verdict(h * 3600) for h in (7.9, 8.5, 9.1)] == ["ok", "warn", "over"]


def test_plan_command_prints_a_table_for_the_bundle(tiny_pipeline):
    result = CliRunner().invoke(cli, ["plan", str(tiny_pipeline["bundle"]), "--rows", "40000"])
    assert result.exit_code == 0, result.output
    name = load_manifest(tiny_pipeline["bundle"])["members"][0]["name"]
    assert name in result.output and "fits" in result.output and "2x T4" in result.output


def test_plan_adds_registry_models_and_flags_an_overrun():
    result = CliRunner().invoke(cli, ["plan", "--add", "minilm", "--add", "qwen3-14b:fp32", "--tokens", "200"])
    assert result.exit_code == 0, result.output
    qwen = next(line for line in result.output.splitlines() if line.startswith("qwen3-14b:fp32"))
    hours = 2 * 14768e6 * 200 * 40_000 / (8.1e12 * 0.25 * 2) / 3600
    assert float(qwen.split()[-1]) == pytest.approx(hours, abs=1e-3) and "OVER the limit" in result.output
    bad = CliRunner().invoke(cli, ["plan", "--add", "gpt5"])
    assert bad.exit_code == 1 and "--add gpt5" in bad.output


def rate_for_hours(onnx_dir, hours):
    import json

    meta = json.loads((onnx_dir / "mapbuild.json").read_text())
    return 2 * meta["params"] * meta["mean_tokens"] * 40_000 / (0.25 * 2 * hours * 3600)


def test_package_warns_inside_the_margin_and_refuses_past_the_limit(tiny_pipeline, tmp_path, monkeypatch, caplog):
    from builder.package import package
    from runtime.errors import MapbuildError

    monkeypatch.setitem(T4_FLOPS, "fp32", rate_for_hours(tiny_pipeline["onnx"], 8.5))
    with caplog.at_level(logging.WARNING, logger="mapbuild"):
        manifest = package([str(tiny_pipeline["onnx"])], tmp_path / "warned", "tester/tiny-bundle", wheels=False)
    assert "inside the 1 h safety margin" in caplog.text
    assert manifest["estimate"]["t4_total_seconds"] == pytest.approx(8.5 * 3600, rel=1e-3)
    monkeypatch.setitem(T4_FLOPS, "fp32", rate_for_hours(tiny_pipeline["onnx"], 9.5))
    with pytest.raises(MapbuildError, match="past the 9 h limit"):
        package([str(tiny_pipeline["onnx"])], tmp_path / "refused", "tester/tiny-bundle", wheels=False)
    assert not (tmp_path / "refused").exists()


def slow(monkeypatch, seconds) -> list:
    """Fault injection: every batch of every member takes `seconds` longer. Returns the list of batches run."""
    import runtime.predict

    real, calls = runtime.predict.onnx_forward, []

    def slowed(*args, **kwargs):
        forward = real(*args, **kwargs)
        return lambda ids, mask: (calls.append(len(ids)), time.sleep(seconds), forward(ids, mask))[2]

    monkeypatch.setattr(runtime.predict, "onnx_forward", slowed)
    return calls


def test_a_member_too_slow_for_the_deadline_stops_early_and_the_prior_still_submits(tiny_pipeline, tmp_path, monkeypatch, caplog):
    from runtime.submit import run

    calls = slow(monkeypatch, 0.3)
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        run(tiny_pipeline["bundle"], SAMPLE_TRAIN, out, batch_size=8, deadline=time.monotonic() + 2.0)
    assert 0 < len(calls) < len(read_rows(SAMPLE_TRAIN)) // 8  # stopped after a few of its batches
    assert "DeadlineError" in caplog.text and "NO MEMBER LEFT" in caplog.text
    assert check_submission(out, read_rows(SAMPLE_TRAIN)["row_id"].tolist()) == []


def test_members_that_would_overrun_are_dropped_lowest_weight_first(tiny_pipeline, caplog):
    from runtime.predict import predict

    manifest = copy.deepcopy(load_manifest(tiny_pipeline["bundle"]))
    heavy, light = copy.deepcopy(manifest["members"][0]), copy.deepcopy(manifest["members"][0])
    heavy.update(name="heavy", weight=0.7)
    light.update(name="light", weight=0.3)
    manifest["members"] = [light, heavy]  # listed light first: the runtime orders by weight
    rows = manifest["estimate"]["rows"]
    manifest["estimate"]["t4_seconds"] = {"heavy": 1e-3 * rows, "light": 1e6 * rows}
    df = read_rows(SAMPLE_TEST)
    space = LabelSpace.from_json(manifest["label_space"])
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        probs, used = predict(tiny_pipeline["bundle"], manifest, space, df, deadline=time.monotonic() + 60)
    assert used == ["heavy"] and "DROPPED member light (weight 0.30)" in caplog.text
    assert np.isfinite(probs).all() and probs.shape == (len(df), len(space.labels))
