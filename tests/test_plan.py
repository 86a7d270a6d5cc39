"""The 9-hour guard: the plan's arithmetic, the package check and the kernel's re-plan against a deadline."""

import json
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
from runtime.member import Member, MemberSpec
from runtime.plan import T4_FLOPS, estimate, verdict
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN


def test_estimate_is_forward_flops_over_the_t4_rate():
    m = MemberSpec(params=1_000_000_000, mean_tokens=100.0, precision="fp16")
    (e,) = estimate({"a": m}, rows=40_000, gpus=2, efficiency=0.25)
    assert e.seconds == pytest.approx(2 * 1e9 * 100 * 40_000 / (65e12 * 0.25 * 2))
    (e32,) = estimate({"a": MemberSpec(params=1_000_000_000, mean_tokens=100.0, precision="fp32")}, rows=40_000, gpus=2, efficiency=0.25)
    assert e32.seconds / e.seconds == pytest.approx(65 / 8.1)
    assert [verdict(h * 3600) for h in (7.9, 8.5, 9.1)] == ["ok", "warn", "over"]


def test_what_runs_on_the_cpu_is_planned_at_its_measured_cpu_pace_not_at_t4_flops():
    """TF-IDF was planned at about 0 s from FLOPs and took seconds, and int8 at the fp16 peak while its uint8 nodes
    have no CUDA kernels; a member exported on a GPU has no CPU pace of its own, and gets a FLOPs estimate."""
    from runtime.plan import KAGGLE_CPU_FLOPS, manifest_plan

    tfidf = Member(name="tfidf", weight=1.0, kind="tfidf", precision="fp32", params=10**6, mean_tokens=1.0, cpu_rows_per_s=2_000.0)
    int8 = Member(name="minilm", weight=1.0, precision="int8", params=22 * 10**6, mean_tokens=60.0, cpu_rows_per_s=100.0)
    fp16 = Member(name="qwen", weight=1.0, precision="fp16", params=8 * 10**9, mean_tokens=100.0, cuda_rows_per_s=50.0)
    plans = {e.name: e for e in estimate({m.name: m for m in (tfidf, int8, fp16)}, rows=40_000)}
    assert (plans["tfidf"].device, plans["tfidf"].seconds) == ("CPU", 20.0)
    assert (plans["minilm"].device, plans["minilm"].seconds) == ("CPU", 400.0)
    assert plans["qwen"].device == "T4" and plans["qwen"].seconds == pytest.approx(2 * 8e9 * 100 * 40_000 / (65e12 * 0.25 * 2))
    cpu = manifest_plan([tfidf, int8, fp16])["cpu_seconds"]
    assert cpu == {"tfidf": 20.0, "minilm": 400.0, "qwen": pytest.approx(2 * 8e9 * 100 * 40_000 / KAGGLE_CPU_FLOPS)}


def test_plan_command_prints_a_table_for_the_bundle(tiny_pipeline):
    result = CliRunner().invoke(cli, ["plan", str(tiny_pipeline["bundle"]), "--rows", "40000"])
    assert result.exit_code == 0, result.output
    name = load_manifest(tiny_pipeline["bundle"])["members"][0]["name"]
    assert name in result.output and "fits" in result.output and "2x T4" in result.output
    assert f"note: {name}: planned on the CPU at " in result.output and "timed on 4 threads" in result.output  # issue 41


def test_plan_adds_registry_models_and_flags_an_overrun():
    result = CliRunner().invoke(cli, ["plan", "--add", "minilm", "--add", "qwen3-8b:int4", "--tokens", "2000"])
    assert result.exit_code == 0, result.output
    qwen = next(line for line in result.output.splitlines() if line.startswith("qwen3-8b:int4"))
    hours = 2 * 8191e6 * 2000 * 40_000 / (65e12 * 0.25 * 2) / 3600
    assert float(qwen.split()[-1]) == pytest.approx(hours, abs=1e-3) and "OVER the limit" in result.output
    bad = CliRunner().invoke(cli, ["plan", "--add", "gpt5"])
    assert bad.exit_code == 1 and "--add gpt5" in bad.output


def test_plan_places_a_decoder_on_the_t4s_as_the_kernel_would_and_refuses_one_that_fits_nowhere():
    """Qwen3-8B: int4 on ONNX is a copy a T4 (rows split over two), fp16 on torch one copy split over both (the rows
    run through both in turn: half the throughput); fp16 on ONNX fits no T4 (15.3 GiB of weights), Qwen3-14B in
    fp16 not even two, each refused in one line with what would fit; Qwen3-14B in nf4 is a copy a T4."""
    result = CliRunner().invoke(cli, ["plan", "--add", "qwen3-8b:int4", "--add", "qwen3-8b:fp16:torch", "--tokens", "75", "--json"])
    assert result.exit_code == 0, result.output
    int4, fp16 = json.loads(result.stdout)["members"]
    assert int4["placement"] == "2 whole copies, one per GPU" and fp16["placement"] == "one copy, its layers split over 2 GPUs"
    assert int4["engine"] == "onnx" and fp16["engine"] == "torch"
    assert int4["hours"] == pytest.approx(2 * 8191e6 * 75 * 40_000 / (65e12 * 0.25 * 2) / 3600) and fp16["hours"] == pytest.approx(2 * int4["hours"])
    assert 4.6 < int4["gib_per_gpu"] < 15 * 0.9 and 13 < fp16["gib_per_gpu"] <= 15 * 0.9  # a split fills GPU 0 first
    for add, would in (("qwen3-8b", " (would fit: int4, fp16 on the torch engine)"), ("qwen3-14b:fp16:torch", " (would fit: nf4)"), ("qwen3-8b:fp32:torch", " (would fit: fp16, nf4)")):
        refused = CliRunner().invoke(cli, ["plan", "--add", add, "--tokens", "75"])
        assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
        assert refused.output.startswith(f"Error: {add}: ") and "GiB of weights and" in refused.output and refused.output.endswith(f"--batch-size{would}\n")
    nf4 = json.loads(CliRunner().invoke(cli, ["plan", "--add", "qwen3-14b:nf4:torch", "--tokens", "75", "--json"]).stdout)["members"][0]
    assert nf4["placement"] == "2 whole copies, one per GPU" and 8 < nf4["gib_per_gpu"] < 15 * 0.9  # never split: a copy a T4
    for bad in ("qwen3-8b:int4:torch", "qwen3-8b:nf4"):  # int4 is ONNX's MatMulNBits, nf4 bitsandbytes' on torch
        refused = CliRunner().invoke(cli, ["plan", "--add", bad])
        assert refused.exit_code == 1 and "ALIAS[:PRECISION[:ENGINE]]" in refused.output


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

        def run(ids, mask):
            calls.append(len(ids))
            time.sleep(seconds)
            return forward(ids, mask)

        run.provider = forward.provider
        return run

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
    for plan in ("t4_seconds", "cpu_seconds"):  # the kernel plans from cpu_seconds where no GPU is visible
        manifest["estimate"][plan] = {"heavy": 1e-3 * rows, "light": 1e6 * rows}
    df = read_rows(SAMPLE_TEST)
    space = LabelSpace.from_json(manifest["label_space"])
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        probs, used = predict(tiny_pipeline["bundle"], manifest, space, df, deadline=time.monotonic() + 60)
    assert used == ["heavy"] and "DROPPED member light (weight 0.30)" in caplog.text
    assert np.isfinite(probs).all() and probs.shape == (len(df), len(space.labels))


def kernel_day(tiny_pipeline, monkeypatch, plans: dict[str, float], hours: float):
    """A 40,000-row kernel on a fake clock: a light member weighted first, "cpu", planned at 1 s, whose first batch
    takes 60 s; then "big", whose first batch takes 30 s (session and CUDA start-up) and every row 0.06 s (2,400 s).
    `plans`: each member's planned seconds. Returns (members run, fake seconds used, big's batches run)."""
    import pandas as pd

    import runtime.plan
    import runtime.predict
    from runtime.predict import predict

    clock, calls = [0.0], []
    monkeypatch.setattr(runtime.plan, "now", lambda: clock[0])
    real = runtime.predict.onnx_forward

    def timed(path, *args, **kwargs):
        width = real(path)(*pad_one())[0].shape[0]
        start, per_row = (60.0, 1e-6) if not calls else (30.0, 0.06)
        calls.append(0)
        member = len(calls) - 1

        def forward(ids, mask):
            clock[0] += (start if not calls[member] else 0.0) + len(ids) * per_row
            calls[member] += 1
            return np.zeros((len(ids), width), dtype=np.float32)

        forward.provider = "CPUExecutionProvider"
        return forward

    monkeypatch.setattr(runtime.predict, "onnx_forward", timed)
    manifest = copy.deepcopy(load_manifest(tiny_pipeline["bundle"]))
    first, big = copy.deepcopy(manifest["members"][0]), copy.deepcopy(manifest["members"][0])
    first.update(name="cpu", weight=0.7)
    big.update(name="big", weight=0.3)
    manifest["members"], manifest["ensemble"] = [first, big], {"method": "prob"}
    manifest["estimate"] = {"rows": 40_000, "t4_seconds": dict(plans), "cpu_seconds": dict(plans)}
    once = read_rows(SAMPLE_TEST)
    df = pd.concat([once] * 2_500, ignore_index=True)
    df["row_id"] = [str(i) for i in range(len(df))]
    # every row its own tokens, so none is deduplicated (digit by digit: the tiny WordPiece vocabulary has digits)
    df["StudentExplanation"] = [f"{' '.join(str(i))} {e}" for i, e in enumerate(df["StudentExplanation"])]
    space = LabelSpace.from_json(manifest["label_space"])
    _, used = predict(tiny_pipeline["bundle"], manifest, space, df, deadline=hours * 3600)
    return used, clock[0], calls[1] if len(calls) > 1 else 0


def pad_one():
    return np.ones((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64)


def test_a_slow_first_batch_and_a_light_member_that_overran_its_plan_drop_nothing(tiny_pipeline, monkeypatch, caplog):
    """The first batch's time (session start, worker spawn) was multiplied by every batch after it (about 1,300 at
    40,000 sorted rows), and the light member's 60 s against its 1 s plan scaled every later plan by 60: each alone
    dropped the big member with hours to spare."""
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        used, seconds, _ = kernel_day(tiny_pipeline, monkeypatch, {"cpu": 1.0, "big": 2_500.0}, hours=8)
    assert used == ["cpu", "big"], caplog.text[-2000:]
    assert 2_000 < seconds < 8 * 3600 and "DROPPED" not in caplog.text and "DeadlineError" not in caplog.text


def test_a_deadline_that_is_really_too_short_drops_or_stops_the_member_that_cannot_finish(tiny_pipeline, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="mapbuild"):  # its own plan says 2,500 s, with about 940 s left
        used, _, big_batches = kernel_day(tiny_pipeline, monkeypatch, {"cpu": 1.0, "big": 2_500.0}, hours=1_000 / 3600)
    assert used == ["cpu"] and big_batches == 0
    assert "DROPPED member big (weight 0.30): its plan needs about 2500 s, 940 s left" in caplog.text
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="mapbuild"):  # planned too optimistically: its own pace stops it
        used, seconds, big_batches = kernel_day(tiny_pipeline, monkeypatch, {"cpu": 1.0, "big": 500.0}, hours=1_000 / 3600)
    assert used == ["cpu"] and 2 <= big_batches < 625 // 10 and seconds < 1_000
    assert "SKIPPED member big: DeadlineError: big: needs about" in caplog.text


def test_plan_of_a_config_counts_params_and_tokens_before_training(tiny_bert, tmp_path):
    import json

    from transformers import AutoModel

    from builder.torch_rows import training_ids
    from builder.models import load_hf_tokenizer
    from runtime.knn import knn_text

    config = tmp_path / "c.toml"
    config.write_text(
        f'dataset_id = "me/tiny-plan"\nout = "out"\n'
        f'[[models]]\nname = "bert"\nmodel = "{tiny_bert}"\ndata = "{SAMPLE_TRAIN}"\nquantize = "fp16"\n'
        f'[[models]]\nname = "near"\nkind = "knn"\nmodel = "{tiny_bert}"\ndata = "{SAMPLE_TRAIN}"\n'
        f'[[models]]\nname = "words"\nkind = "tfidf"\ndata = "{SAMPLE_TRAIN}"\n'
        f'[[models]]\nname = "big"\nmodel = "qwen3-8b"\ndata = "{SAMPLE_TRAIN}"\nquantize = "int4"\n'
    )
    result = CliRunner().invoke(cli, ["plan", str(config), "--json", "--tokens", "99"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    by = {m["name"]: m for m in plan["members"]}
    params = sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert).parameters())
    assert by["bert"]["params"] == by["near"]["params"] == params and by["bert"]["device"] == "T4" and by["near"]["device"] == "CPU"
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    assert by["near"]["mean_tokens"] == pytest.approx(np.mean([len(i) for i in training_ids(load_hf_tokenizer(str(tiny_bert)), knn_text(df), 256)]))
    assert by["big"]["mean_tokens"] == 99 and by["big"]["size_mib"] == pytest.approx(8191e6 * (4 + 16 / 32) / 8 / 2**20)  # 4 bits and an fp16 scale a block of 32
    assert "words" not in by and any(n.startswith("words: a TF-IDF member") for n in plan["notes"])
    assert any("no tokenizer for qwen3-8b" in n for n in plan["notes"])  # no hub call: the alias has no wheel
    dry = CliRunner().invoke(cli, ["build", str(config), "--dry-run"])
    assert dry.exit_code == 0 and "bert" in dry.output and "fits" in dry.output and not (tmp_path / "out").exists()


def test_the_plan_says_what_threads_a_cpu_pace_was_timed_on():
    from builder.build_plan import pace_notes
    from runtime.plan import KAGGLE_CPU_FLOPS, KERNEL_THREADS

    timed = MemberSpec(precision="int8", cpu_rows_per_s=100.0, cpu_threads=KERNEL_THREADS)
    moved = MemberSpec.from_json({"precision": "int8", "cpu_rows_per_s": 100.0, "drift": {"cpu_threads": KERNEL_THREADS}})  # bundle format 2
    before = MemberSpec(precision="int8", cpu_rows_per_s=250.0, drift={"rows": 1024})  # every core of the build box
    assert pace_notes({"minilm": timed, "moved": moved, "old": before, "gpu": MemberSpec(precision="fp16", cuda_rows_per_s=900.0)}) == [
        "minilm: planned on the CPU at 100 rows/s, timed on 4 threads (the kernel has 4 vCPUs)",
        "moved: planned on the CPU at 100 rows/s, timed on 4 threads (the kernel has 4 vCPUs)",
        "old: planned on the CPU at 250 rows/s, timed on every core of the build machine, not the kernel's 4: export it again",
    ]
    assert KAGGLE_CPU_FLOPS == 1e11  # the FLOPs plan of Kaggle's CPU is unchanged: 4 vCPUs at 25 GFLOPS


def test_a_config_of_tfidf_members_alone_plans_to_nothing_and_says_why(tmp_path):
    """Before: "plan: give a bundle folder, a CONFIG.toml or at least one --add ALIAS", though a config was given."""
    config = tmp_path / "c.toml"
    config.write_text(f'dataset_id = "me/abcdef"\ndata = "{SAMPLE_TRAIN}"\n[[models]]\nname = "words"\nkind = "tfidf"\n')
    for args in (["plan", str(config)], ["build", str(config), "--dry-run"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and "note: words: a TF-IDF member runs on the CPU" in result.output and "fits" in result.output, result.output
