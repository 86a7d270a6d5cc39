"""The README's commands are the CLI's: every `mapbuild` line in its code blocks names a command and options that
exist, and parses as written (the options are checked, not the paths); the quick analyze line also runs."""

import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from builder.cli import cli

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.startswith("mapbuild ")]


def test_the_readme_shows_the_workflow():
    assert {shlex.split(c)[1] for c in readme_commands()} >= {"analyze", "cv", "package", "verify", "upload", "kernel"}
    make = re.findall(r"^make (\w+)", README.read_text(), flags=re.M)
    targets = re.findall(r"^(\w[\w-]*):", (README.parent / "Makefile").read_text(), flags=re.M)
    assert make == ["demo", "test"] and set(make) <= set(targets)


@pytest.mark.parametrize("line", readme_commands())
def test_each_readme_command_parses_as_written(line):
    args = shlex.split(line)[1:]
    group = cli.make_context("mapbuild", list(args), resilient_parsing=True)
    name, command, rest = cli.resolve_command(group, group.protected_args + group.args)
    try:
        command.make_context(name, rest, parent=group)  # unknown options, missing values and bad choices raise here
    except click.BadParameter as e:  # a path that does not exist here (train.csv, bundle) is the user's, not ours
        assert "does not exist" in str(e), f"{line}: {e}"


def test_the_readme_analyze_line_runs_as_written_on_the_sample(tmp_path, monkeypatch):
    """The quick one, run: its train.csv and test.csv are the embedded sample's, its --out a temporary folder."""
    line = next(c for c in readme_commands() if shlex.split(c)[1] == "analyze")
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLE_TRAIN, "train.csv")
    shutil.copy(SAMPLE_TEST, "test.csv")
    result = CliRunner().invoke(cli, shlex.split(line)[1:])
    assert result.exit_code == 0, result.output
    out = shlex.split(line)[shlex.split(line).index("--out") + 1]
    assert (tmp_path / out / "report.md").stat().st_size > 1000 and list((tmp_path / out).glob("*.png"))
