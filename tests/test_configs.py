"""The configs shipped for the real competition: they load, type-check, and their plan lines are what `plan` says;
they run from a fresh clone with the data elsewhere (`--data`), and say which key to fix when it is missing."""

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from builder.build import load_config
from runtime.member import MemberSpec
from runtime.plan import estimate

from .conftest import ROOT, SAMPLE_TRAIN, SHARED_TRAIN
from .test_cli import assert_one_line_error, invoke

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_there_is_a_cpu_default_and_two_gpu_recipes():
    names = [c.name for c in CONFIGS]
    assert "cpu.toml" in names and len([n for n in names if n.startswith("gpu-")]) >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_points_at_the_shared_data_once(config):
    raw = tomllib.loads(config.read_text())
    assert (config.parent / raw["data"]).resolve() == SHARED_TRAIN.resolve() and not any("data" in m for m in raw["models"])
    cfg, members = load_config(config, data=str(SAMPLE_TRAIN))  # the shared data need not be here
    assert members and all(m.config.data == str(SAMPLE_TRAIN) for m in members)
    assert cfg.wheels and cfg.python == ["3.12", "3.13"]


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name.startswith("gpu-")], ids=lambda p: p.name)
def test_gpu_config_states_its_plan_and_gpu(config):
    from builder.models import ALIASES

    text = config.read_text()
    found = re.search(r"# plan: ([0-9.]+) h on 2x T4 for 40,000 rows \(mapbuild plan --add ([\w.-]+):(\w+)(?::(torch))? --tokens (\d+)\)", text)
    assert found and re.search(r"# Training: one GPU", text)
    hours, alias, precision, engine, tokens = float(found[1]), found[2], found[3], found[4], float(found[5])
    member = MemberSpec(params=int(ALIASES[alias].params_m * 1e6), mean_tokens=tokens, precision=precision, engine=engine)
    assert estimate({alias: member}, shapes={alias: ALIASES[alias].config()})[0].seconds / 3600 == pytest.approx(hours, abs=1e-3)
    _, members = load_config(config, data=str(SAMPLE_TRAIN))
    assert (members[0].quantize, members[0].engine, members[0].config.model) == (precision, engine or "onnx", alias)


@pytest.mark.parametrize(
    ("config", "alias", "qlora", "quantize", "engine"),
    [
        ("gpu-qwen3-8b.toml", "qwen3-8b", False, "fp16", "torch"),
        ("gpu-qwen3-8b-onnx-int4.toml", "qwen3-8b", False, "int4", "onnx"),
        ("gpu-qwen3-14b-qlora.toml", "qwen3-14b", True, "nf4", "torch"),
    ],
)
def test_qwen3_recipes_use_the_context_template_and_their_engine(config, alias, qlora, quantize, engine):
    _, (member,) = load_config(ROOT / "configs" / config, data=str(SAMPLE_TRAIN))
    spec = member.config
    assert (spec.model, spec.template, spec.qlora, member.quantize, member.engine) == (alias, "context", qlora, quantize, engine)
    assert spec.max_length == 320 and spec.gradient_checkpointing
    assert spec.precision == ("auto" if qlora else "fp16")


@pytest.mark.parametrize("command", ["plan", "cv", "build"])
def test_a_recipe_that_fits_no_placement_on_the_t4s_is_refused_before_any_work(tmp_path, command):
    """Qwen3-14B in fp16 on the torch engine: 27.5 GiB of weights fit not even both T4s. Refused by name, before a
    tokenizer, a weight or a training step is needed (none of them is on this machine)."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'dataset_id = "me/abcdef"\ndata = "{SAMPLE_TRAIN}"\nout = "out"\n'
        '[[models]]\nname = "big"\nmodel = "qwen3-14b"\nquantize = "fp16"\nengine = "torch"\n'
    )
    result = invoke(command, str(config))
    assert result.exit_code == 1 and result.output.startswith("Error: big: fp16: 27.5 GiB of weights and ") and result.output.count("\n") == 1, result.output
    assert "fit neither one of 2 GPU(s) of 15.0 GiB nor all of them together" in result.output and not (tmp_path / "out").exists()


def test_a_config_engine_is_checked_by_name(tmp_path):
    from runtime.errors import MapbuildError

    config = tmp_path / "c.toml"
    for extra, error in (
        ('engine = "tensorrt"', "engine"),
        ('engine = "torch"\nquantize = "int4"', "quantize (engine = 'torch')"),
        ('kind = "tfidf"\nengine = "torch"', "engine = 'torch' runs transformer members; a tfidf member runs on onnx"),
    ):
        config.write_text(f'dataset_id = "me/abcdef"\ndata = "{SAMPLE_TRAIN}"\n[[models]]\nname = "m"\n{extra}\n')
        with pytest.raises(MapbuildError, match=re.escape(f"{config}: [[models]] m: {error}")):
            load_config(config)


def fresh_clone(tmp_path: Path) -> Path:
    """configs/cpu.toml as a fresh clone holds it: no shared data beside the clone."""
    config = tmp_path / "clone" / "configs" / "cpu.toml"
    config.parent.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "cpu.toml", config)
    return config


@pytest.mark.parametrize("command", ["plan", "cv", "build"])
def test_a_fresh_clone_names_the_config_the_table_and_the_key_of_missing_data(tmp_path, command):
    """Before: `file not found` naming neither the config nor the key, and only once a stage read the data."""
    config = fresh_clone(tmp_path)
    error = f"{config}: top level: data = '../../shared/data/map/train.csv': file not found"
    assert_one_line_error(invoke(command, str(config)), error, "or pass --data PATH")
    assert not (tmp_path / "clone" / "build").exists()  # stopped before any work


def test_a_members_own_data_and_no_data_at_all_name_the_table(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('dataset_id = "me/abcdef"\ndata = "x.csv"\n[[models]]\nname = "words"\nkind = "tfidf"\ndata = "y.csv"\n')
    assert_one_line_error(invoke("plan", str(config)), f"{config}: [[models]] words: data = 'y.csv': file not found", "or pass --data PATH")
    config.write_text('dataset_id = "me/abcdef"\n[[models]]\nname = "words"\nkind = "tfidf"\n')
    assert_one_line_error(invoke("cv", str(config)), f"{config}: [[models]] words: no data, in it or at the top level", "or pass --data PATH")
    assert_one_line_error(invoke("build", str(config), "--data", "nope.csv"), "--data nope.csv: file not found")


def test_a_config_without_a_required_top_level_key_names_it(tmp_path):
    """Before: "BuildConfig.__init__() missing 1 required positional argument: 'dataset_id'"."""
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "words"\nkind = "tfidf"\n')
    assert_one_line_error(invoke("plan", str(config), "--data", str(SAMPLE_TRAIN)), f"{config}: needs dataset_id at the top level")


def test_members_inherit_the_top_level_data_unless_they_set_their_own(tmp_path):
    tmp_path = tmp_path.resolve()
    for csv in ("top.csv", "own.csv"):
        shutil.copy(SAMPLE_TRAIN, tmp_path / csv)
    config = tmp_path / "configs" / "c.toml"
    config.parent.mkdir()
    config.write_text('dataset_id = "me/abcdef"\ndata = "../top.csv"\n[[models]]\nname = "a"\nkind = "tfidf"\n[[models]]\nname = "b"\nkind = "tfidf"\ndata = "../own.csv"\n')
    _, (a, b) = load_config(config)
    assert (a.config.data, b.config.data) == (str(tmp_path / "top.csv"), str(tmp_path / "own.csv"))
    cfg, members = load_config(config, data=str(SAMPLE_TRAIN))  # --data replaces both
    assert cfg.data == str(SAMPLE_TRAIN) and [m.config.data for m in members] == [str(SAMPLE_TRAIN)] * 2


def test_a_shipped_config_plans_and_cross_validates_from_a_fresh_clone_with_the_data_elsewhere(tmp_path, monkeypatch):
    """`--data` is relative to the working folder, and replaces every member's data: cpu.toml runs unchanged."""
    tmp_path = tmp_path.resolve()
    config = fresh_clone(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(SAMPLE_TRAIN, tmp_path / "data" / "train.csv")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    plan = invoke("plan", str(config), "--data", "../data/train.csv", "--json")
    assert plan.exit_code == 0, plan.output
    assert [m["name"] for m in json.loads(plan.stdout)["members"]] == ["minilm", "knn"]  # TF-IDF is a note
    cv = invoke("cv", str(config), "--data", "../data/train.csv", "--only", "tfidf", "--folds", "0", "--json")
    assert cv.exit_code == 0, cv.output
    assert json.loads(cv.stdout)["recipes"]["tfidf"]["folds"] == [0]
    meta = json.loads((tmp_path / "clone" / "build" / "cpu" / "tfidf" / "fold0" / "onnx" / "mapbuild.json").read_text())
    assert meta["config"]["data"] == str(tmp_path / "data" / "train.csv")


@pytest.mark.parametrize("name", ['"./t"', '"../t"', '"a/b"', '".t"', '""', '"t "', "3"])
def test_a_member_name_is_a_plain_folder_name(tmp_path, name):
    """Before: `t` and `./t` shared one folder (the second overwrote the first) and `name = 3` was a traceback."""
    config = tmp_path / "c.toml"
    config.write_text(f'dataset_id = "me/abcdef"\n[[models]]\nname = "t"\nkind = "tfidf"\n[[models]]\nname = {name}\nkind = "tfidf"\n')
    assert_one_line_error(invoke("plan", str(config), "--data", str(SAMPLE_TRAIN)), f"{config}: [[models]] table 2: name", "plain folder name")
