"""Every command with a report prints it whole as JSON under --json, on stdout and alone there: what a library or the
Trainer prints while it works goes to stderr. (`tokens --json` printed its JSON on stderr, stdout empty, and its test
read both mixed.)"""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from builder.cli import cli

from .conftest import ROOT, SAMPLE_TRAIN

Fixture = Callable[[str], Any]  # request.getfixturevalue: a case builds only the session fixtures it uses


def config(tmp: Path, recipe: str = 'kind = "tfidf"\nmin_df = 1', top: str = "") -> str:
    """A one-recipe config on the sample, by default one that trains in a second: TF-IDF, no wheels to fetch."""
    path = tmp / "c.toml"
    path.write_text(f'dataset_id = "me/json-cases"\nout = "{tmp / "out"}"\nwheels = false\n{top}\n[[models]]\nname = "m"\ndata = "{SAMPLE_TRAIN}"\nfolds = 3\n{recipe}\n')
    return str(path)


# Each command with --json and the cheapest arguments that run it for real, --json left off.
CASES: dict[str, Callable[[Fixture, Path], list[str]]] = {
    "models": lambda f, tmp: ["models"],
    "env": lambda f, tmp: ["env"],
    "plan": lambda f, tmp: ["plan", "--add", "minilm", "--add", "qwen3-8b:int4"],
    "tokens": lambda f, tmp: ["tokens", str(SAMPLE_TRAIN), "--model", str(f("tiny_bert")), "--plot", str(tmp / "lengths.png")],
    "analyze": lambda f, tmp: ["analyze", str(SAMPLE_TRAIN), "--out", str(tmp / "report")],
    "train": lambda f, tmp: ["train", "--model", str(f("tiny_bert")), "--data", str(SAMPLE_TRAIN), "--epochs", "1", "--lora-r", "2", "--out", str(tmp / "run")],
    "tfidf": lambda f, tmp: ["tfidf", "--data", str(SAMPLE_TRAIN), "--min-df", "1", "--out", str(tmp / "words")],
    "knn": lambda f, tmp: ["knn", "--model", str(f("tiny_bert")), "--data", str(SAMPLE_TRAIN), "--quantize", "fp32", "--out", str(tmp / "near")],
    "export": lambda f, tmp: ["export", str(f("tiny_pipeline")["merged"]), "--quantize", "fp32", "--rows", "64", "--out", str(tmp / "onnx")],
    "package": lambda f, tmp: ["package", str(f("tiny_pipeline")["onnx"]), "--out", str(tmp / "b"), "--dataset-id", "me/abcdef", "--no-wheels"],
    "kernel": lambda f, tmp: ["kernel", str(f("tiny_pipeline")["bundle"])],  # shown, not pushed: no Kaggle client
    "cv": lambda f, tmp: ["cv", config(tmp), "--folds", "0"],
    "build": lambda f, tmp: ["build", config(tmp)],
    "build --dry-run": lambda f, tmp: ["build", config(tmp, f'model = "{f("tiny_bert")}"'), "--dry-run"],  # a plan: TF-IDF alone has no kernel time
}
NOT_RUN = {
    "verify": "builds a twin of Kaggle's image and runs the notebook there (minutes); tests/test_kaggle_image.py reads verify --json's stdout",
    "demo": "trains MiniLM from the hub: minutes, and a network",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_json_is_all_of_stdout(case, request, tmp_path):
    result = CliRunner().invoke(cli, [*CASES[case](request.getfixturevalue, tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict | list), result.stdout  # json.loads refuses anything around it


def test_json_is_all_of_stdout_when_a_child_process_prints_there(tmp_path):
    """The kernel `build` runs on its `test` rows is a child process: it prints its MAP@3 on the stdout it inherits,
    the file descriptor, which redirecting sys.stdout does not move (CliRunner has no descriptor: a real process)."""
    cmd = [sys.executable, "-m", "builder", "build", config(tmp_path, top=f'test = "{SAMPLE_TRAIN}"'), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["members"] and "MAP@3 on labelled rows" in done.stderr, done.stdout


def test_json_where_a_command_has_none_is_a_usage_error():
    """Not "internal error (NoSuchOption)", nor "internal error (Exit)" after a command's --help."""
    refused = CliRunner().invoke(cli, ["merge", "run", "--out", "merged", "--json"])
    assert refused.exit_code == 2 and "--json" in refused.output and "internal error" not in refused.output, refused.output
    helped = CliRunner().invoke(cli, ["merge", "--help"])
    assert helped.exit_code == 0 and "internal error" not in helped.output, helped.output


def commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    """Every command by its full name, a group's ("prompts show") included."""
    found = {}
    for name, command in group.commands.items():
        found[prefix + name] = command
        if isinstance(command, click.Group):
            found |= commands(command, f"{prefix}{name} ")
    return found


def test_every_command_with_json_is_a_case():
    """A new command given --json must be added to CASES (or to NOT_RUN, saying why)."""
    with_json = {name for name, command in commands(cli).items() if any("--json" in p.opts for p in command.params)}
    assert with_json == {case.removesuffix(" --dry-run") for case in CASES} | set(NOT_RUN)
