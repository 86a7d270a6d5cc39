"""The configs shipped for the real competition: they load, type-check, and their plan lines are what `plan` says."""

import re
from pathlib import Path

import pytest

from builder.build import load_config
from runtime.plan import estimate

from .conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_there_is_a_cpu_default_and_two_gpu_recipes():
    names = [c.name for c in CONFIGS]
    assert "cpu.toml" in names and len([n for n in names if n.startswith("gpu-")]) >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_points_at_the_shared_data(config):
    cfg, members = load_config(config)
    assert members and all(Path(m.config.data) == (ROOT.parent / "shared" / "data" / "map" / "train.csv").resolve() for m in members)
    assert cfg.wheels and cfg.python == ["3.12"]


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name.startswith("gpu-")], ids=lambda p: p.name)
def test_gpu_config_states_its_plan_and_gpu(config):
    from builder.models import ALIASES

    text = config.read_text()
    found = re.search(r"# plan: ([0-9.]+) h on 2x T4 for 40,000 rows \(mapbuild plan --add ([\w.-]+):(\w+) --tokens (\d+)\)", text)
    assert found and re.search(r"# Training: one GPU", text)
    hours, alias, precision, tokens = float(found[1]), found[2], found[3], float(found[4])
    member = {"name": alias, "params": ALIASES[alias].params_m * 1e6, "mean_tokens": tokens, "precision": precision}
    assert estimate([member])[0].seconds / 3600 == pytest.approx(hours, abs=1e-3)
    _, members = load_config(config)
    assert members[0].quantize == precision and members[0].config.model == alias


@pytest.mark.parametrize(("config", "alias", "qlora"), [("gpu-qwen3-8b.toml", "qwen3-8b", False), ("gpu-qwen3-14b-qlora.toml", "qwen3-14b", True)])
def test_qwen3_recipes_use_the_context_template_and_int4(config, alias, qlora):
    _, (member,) = load_config(ROOT / "configs" / config)
    spec = member.config
    assert (spec.model, spec.template, spec.qlora, member.quantize) == (alias, "context", qlora, "int4")
    assert spec.max_length == 320 and spec.gradient_checkpointing
    assert spec.precision == ("auto" if qlora else "fp16")
