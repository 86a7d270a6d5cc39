"""Validation figures of a run, without training one."""

import json
from pathlib import Path

import numpy as np
import pytest

from builder.folds import validate
from builder.train import TrainConfig, checkpoint_dir, learned_little, train
from runtime.data import labels_of, read_rows
from runtime.errors import MapbuildError
from runtime.labels import fit_label_space

from .conftest import SAMPLE_TRAIN, input_device
from .first_step import first_step


def test_the_label_prior_scores_its_own_baseline():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = fit_label_space(df, sorted(labels_of(df).unique()))
    scores = validate(space.prior(len(df)), df, space, unmasked=False)
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


def test_inputs_go_to_the_models_device_and_logits_come_back_to_the_cpu():
    """What a GPU model needs, checked without one: a model on the meta device must receive its inputs there, and
    logits that, like CUDA ones, refuse .numpy() must be moved with .cpu() first."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from builder.torch_rows import torch_logits

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3)
    meta = BertForSequenceClassification(cfg).to("meta")
    assert input_device(meta, lambda: torch_logits(meta, [[1, 2, 3]], pad_id=0)) == torch.device("meta")

    class OnGPU(torch.Tensor):
        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

        def cpu(self, *args, **kwargs):
            return torch.Tensor.cpu(self).as_subclass(torch.Tensor)

    model = BertForSequenceClassification(cfg).eval()
    model.register_forward_hook(lambda module, args, out: out.__class__(logits=out.logits.as_subclass(OnGPU)))
    logits = torch_logits(model, [[1, 2, 3], [4, 5]], pad_id=0)
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_gradient_accumulation_gives_the_same_first_update_as_one_big_batch(tiny_bert, tmp_path):
    """batch 2 x accumulation 2 must step like batch 4 x accumulation 1: a loss that averaged each micro-batch
    while the Trainer skipped its division by the accumulation steps would double the step."""
    big, big_log = first_step(tiny_bert, 4, 1, tmp_path)
    accumulated, accumulated_log = first_step(tiny_bert, 2, 2, tmp_path)
    assert big.keys() == accumulated.keys() and any(np.abs(step).max() > 1e-4 for step in big.values())
    for name in big:
        assert np.allclose(big[name], accumulated[name], atol=1e-6, rtol=1e-4), name
    assert accumulated_log == pytest.approx(big_log, abs=1e-5)


def test_two_ddp_processes_give_the_first_step_of_one_process_on_the_same_global_batch(tiny_bert, tmp_path):
    """Under DDP the Trainer counts the rows of every process (num_items_in_batch) and DDP averages the gradients:
    a loss that is a sum over this process's rows divided by that count must be scaled by the world size, as
    Trainer.compute_loss does, or each step is halved (loss 0.6 for 1.2, grad norm 0.3 for 0.7)."""
    import os
    import socket
    import subprocess
    import sys

    big, big_log = first_step(tiny_bert, 4, 1, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(Path(__file__).with_name("first_step.py")), str(tiny_bert), str(tmp_path / "ddp.npz"), "--batch-size", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = np.load(tmp_path / "ddp.npz")
    assert float(ddp["loss"]) == pytest.approx(big_log["loss"], abs=1e-5)
    assert float(ddp["grad_norm"]) == pytest.approx(big_log["grad_norm"], abs=1e-5)
    assert {k.removeprefix("update/") for k in ddp.files if k.startswith("update/")} == big.keys()
    for name, step in big.items():
        assert np.allclose(ddp[f"update/{name}"], step, atol=1e-6, rtol=1e-4), name


class Crash(Exception):
    """Stands for a killed process or a lost GPU."""


def test_a_crash_costs_at_most_one_checkpoint_interval_and_resume_gives_the_same_run(tiny_bert, tmp_path, monkeypatch):
    import transformers

    from builder.train import can_resume

    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=1, batch_size=16, lora_r=2, save_steps=4)
    whole = train(cfg, tmp_path / "whole")
    real_step, steps, crashed = transformers.Trainer.training_step, [], []

    def crash_after_six(self, *args, **kwargs):
        steps.append(self.state.global_step)
        if self.state.global_step == 6 and not crashed:
            crashed.append(True)
            raise Crash
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_after_six)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and (checkpoint_dir(tmp_path / "run") / "checkpoint-4").is_dir()
    assert can_resume(cfg, tmp_path / "run") and not can_resume(TrainConfig(**{**cfg.__dict__, "lora_r": 4}), tmp_path / "run")
    (checkpoint_dir(tmp_path / "run") / "checkpoint-8").mkdir()  # killed while saving: no trainer_state.json yet
    with pytest.raises(MapbuildError, match="--resume: .* other options"):
        train(TrainConfig(**{**cfg.__dict__, "lora_r": 4}), tmp_path / "run", resume=True)
    steps.clear()
    resumed = train(cfg, tmp_path / "run", resume=True)
    assert resumed["resumed_from"] == "checkpoint-4" and steps[0] == 4  # steps 5 and 6 again, not from 0
    assert resumed["map3"] == pytest.approx(whole["map3"], abs=1e-6) and resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-4)
    assert not checkpoint_dir(tmp_path / "run").exists()  # the run folder is written: checkpoints go
    with pytest.raises(MapbuildError, match="--resume: no checkpoint"):
        train(cfg, tmp_path / "run", resume=True)


def test_a_crash_in_validation_keeps_the_trained_adapter(tiny_bert, tmp_path, monkeypatch):
    import transformers

    import builder.torch_rows

    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=1, batch_size=16, lora_r=2, save_steps=100)

    def lost_gpu(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(builder.torch_rows, "torch_logits", lost_gpu)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run")
    monkeypatch.undo()
    real_step, steps = transformers.Trainer.training_step, []
    monkeypatch.setattr(transformers.Trainer, "training_step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    metrics = train(cfg, tmp_path / "run", resume=True)
    assert steps == [] and metrics["resumed_from"].startswith("checkpoint-") and 0 < metrics["map3"] <= 1


def test_sample_is_stratified_seeded_and_paths_are_stored_absolute(tmp_path, monkeypatch, shared_train):
    from builder.folds import load_labelled

    full = load_labelled(str(shared_train))
    picked = load_labelled(str(shared_train), sample=3000, seed=42)
    assert abs(len(picked) - 3000) <= 40 and picked["QuestionId"].nunique() == full["QuestionId"].nunique() == 15
    assert load_labelled(str(shared_train), sample=3000, seed=42).equals(picked)
    assert not load_labelled(str(shared_train), sample=3000, seed=7).equals(picked)
    share = labels_of(picked).value_counts(normalize=True)
    assert (share - labels_of(full).value_counts(normalize=True)).abs().max() < 0.005
    assert set(labels_of(full)) == set(labels_of(picked))  # every label keeps at least one row
    monkeypatch.chdir(shared_train.parent)
    assert TrainConfig(data="train.csv").data == str(shared_train.resolve())


def test_a_rerun_keeps_an_earlier_runs_checkpoints_and_a_foreign_out_is_refused_before_training(tiny_bert, tmp_path, monkeypatch):
    import json
    from dataclasses import asdict

    import transformers

    monkeypatch.setattr(transformers.Trainer, "train", lambda *a, **k: pytest.fail("trained"))  # every refusal comes first
    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=1, lora_r=2)
    ckpt = checkpoint_dir(tmp_path / "run")
    (ckpt / "checkpoint-4").mkdir(parents=True)
    (ckpt / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (ckpt / "config.json").write_text(json.dumps(asdict(cfg)))
    with pytest.raises(MapbuildError, match=r"run\.checkpoints: holds checkpoint-4 of an earlier run; add --resume to continue it"):
        train(cfg, tmp_path / "run")
    with pytest.raises(MapbuildError, match=r"holds checkpoint-4 of an earlier run; its config\.json holds other options: resume with those, or remove the folder"):
        train(TrainConfig(**{**cfg.__dict__, "lora_r": 4}), tmp_path / "run")
    assert (ckpt / "checkpoint-4" / "trainer_state.json").is_file() and json.loads((ckpt / "config.json").read_text()) == asdict(cfg)
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "mapbuild.json").write_text('{"stage": "onnx"}')
    with pytest.raises(MapbuildError, match=r"--out .*onnx: holds a 'onnx' folder, which writing a 'run' folder there would delete"):
        train(cfg, onnx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "run.checkpoints"]


def test_the_run_records_validation_map3_after_every_epoch_for_its_curve(tiny_bert, tmp_path):
    metrics = train(TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=2, lora_r=2, learning_rate=3e-3), tmp_path / "run")
    curve = metrics["valid_curve"]
    assert [p["epoch"] for p in curve] == [1.0, 2.0] and curve[-1]["map3"] == metrics["map3"] and all(0 < p["map3"] <= 1 for p in curve)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["valid_curve"] == curve
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 10_000


def test_report_to_tensorboard_leaves_its_logs_in_the_run_folder(tiny_bert, tmp_path):
    """Before: the Trainer wrote them under OUT.checkpoints/runs, which the run removes when it is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=1, lora_r=2, report_to="tensorboard")
    train(cfg, tmp_path / "run")
    (events,) = (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload()
    assert "train/loss" in logged.Tags()["scalars"] and len(logged.Scalars("train/loss")) >= 2
    assert not checkpoint_dir(tmp_path / "run").exists()


def test_report_to_names_its_choices_and_a_missing_integration(monkeypatch):
    import importlib.util

    with pytest.raises(MapbuildError, match="--report-to must be one of none, tensorboard, wandb"):
        TrainConfig(data=str(SAMPLE_TRAIN), report_to="mlflow2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MapbuildError, match="pip install wandb"):
        TrainConfig(data=str(SAMPLE_TRAIN), report_to="wandb")
