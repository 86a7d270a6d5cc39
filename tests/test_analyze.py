"""`mapbuild analyze` and `mapbuild tokens` on the sample and the shared data, checked against independent counts."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from builder.cli import cli
from runtime.data import read_rows

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, SHARED_TRAIN, make_tiny
from .test_dataset import by_hand, correct_by_hand

PNG = b"\x89PNG\r\n\x1a\n"


def candidates_by_hand(df) -> dict[str, list[int]]:
    """Per question, the distinct counts of labels a row may take: prefix from correctness, its question's misconceptions."""
    correct = correct_by_hand(df)
    labels = set(df["Category"] + ":" + df["Misconception"])
    own = {q: set(g["Misconception"]) - {"NA"} for q, g in df.groupby("QuestionId")}
    counts: dict[str, set[int]] = {}
    for q, a in zip(df["QuestionId"], df["MC_Answer"]):
        prefix = "True" if a == correct[q] else "False"
        n = sum(lab.split("_")[0] == prefix and lab.split(":")[1] in own[q] | {"NA"} for lab in labels)
        counts.setdefault(q, set()).add(n)
    return {q: sorted(c) for q, c in counts.items()}


@pytest.mark.parametrize("which", ["sample", "shared"])
def test_analyze_writes_a_report_with_correct_figures(which, tmp_path, request):
    train, test = (SAMPLE_TRAIN, SAMPLE_TEST) if which == "sample" else (request.getfixturevalue("shared_train"), SHARED_TRAIN.with_name("test.csv"))
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["analyze", str(train), "--test", str(test), "--out", str(out)])
    assert result.exit_code == 0, result.output

    report = (out / "report.md").read_text()
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == sorted(["categories.png", "misconceptions.png", "labels.png", "per_question.png", "explanation_length.png"])
    assert f"(no length plot from {len(read_rows(test))} rows: it takes 100)" in report  # 16 sample and 3 public test rows
    for name in plots:
        assert f"]({name})" in report and (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 5000

    df = read_rows(train, labelled=True)
    copies, clashing, bad = by_hand(df)
    f = json.loads((out / "summary.json").read_text())
    assert (f["rows"], f["exact_duplicates"], f["conflict_groups"], f["disagreeing_rows"]) == (len(df), copies, clashing, len(bad))
    assert {q: d["candidates_per_row"] for q, d in f["questions_detail"].items()} == candidates_by_hand(df)
    assert sum(f["label"].values()) == len(df) and f["test"]["rows"] == len(read_rows(test))
    assert f"{copies} exact duplicates" in result.output
    questions = list(f["questions_detail"])
    assert questions == sorted(questions, key=int) and [line.split(":")[0] for line in report.splitlines() if line.startswith("### ")] == [f"### {q}" for q in questions]


def test_report_tables_survive_newlines_and_pipes_and_sample_rows_at_random(tmp_path):
    import re

    from builder.analyze import cell, question_order

    assert cell("two\nlines | and a pipe") == "two lines \\| and a pipe"
    assert cell("word " * 50, width=22) == "word word word word …"  # cut between words
    assert question_order(["109465", "31772", "x"]) == ["31772", "109465", "x"]
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    df.loc[df.index[0], "StudentExplanation"] = "first line\nsecond | line"
    df.to_csv(tmp_path / "train.csv", index=False)
    for samples in ("1000", "2"):
        assert CliRunner().invoke(cli, ["analyze", str(tmp_path / "train.csv"), "--out", str(tmp_path / samples), "--samples", samples]).exit_code == 0
    everything = (tmp_path / "1000" / "report.md").read_text()
    assert "first line second \\| line" in everything
    for block in re.findall(r"(?:^\|.*\n)+", everything, flags=re.M):  # each table: every line as many cells as its header
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in block.splitlines()}) == 1, block
    sample = (tmp_path / "2" / "report.md").read_text().split("## Sample rows")[1]
    firsts = [cell(g["StudentExplanation"].iloc[0]) for _, g in df.groupby("QuestionId")]
    assert sum(text in sample for text in firsts) < len(firsts)  # not each question's first rows in file order


def test_analyze_names_a_missing_column(tmp_path):
    bad = tmp_path / "train.csv"
    read_rows(SAMPLE_TRAIN, labelled=True).drop(columns="Category").to_csv(bad, index=False)
    result = CliRunner().invoke(cli, ["analyze", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "missing column Category" in result.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize("which", ["sample", "shared"])
def test_tokens_report_matches_a_row_by_row_count(which, tmp_path, tiny_bert, request):
    from builder.models import load_hf_tokenizer
    from builder.tokens import label_space_for
    from runtime.prompts import render

    data = SAMPLE_TRAIN if which == "sample" else request.getfixturevalue("shared_train")
    plot = tmp_path / "lengths.png"
    result = CliRunner().invoke(cli, ["tokens", str(data), "--model", str(tiny_bert), "--template", "basic", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == PNG

    df = read_rows(data)
    tok = load_hf_tokenizer(str(tiny_bert))
    lengths = np.array([len(tok(t)["input_ids"]) for t in render(df, "basic", label_space_for(df))])  # one row at a time
    p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
    assert f"p50 {p50:.0f}, p95 {p95:.0f}, p99 {p99:.0f}, max {lengths.max()}" in result.output
    assert f"128: {(lengths > 128).mean():.2%}" in result.output
    recommended = int(result.output.split("recommended --max-length ")[1].split()[0])
    assert (lengths <= recommended).mean() >= 0.995 and recommended % 16 == 0
    random, sorted_ = (float(result.output.split(f"{k} ")[1].split("%")[0]) for k in ("random", "length-sorted"))
    assert sorted_ < random
    assert "packing: does not apply to encoders" in result.output


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_packing_at_size_0_counts_every_row_whole_and_one_pack_a_question_counts_each_head_once(tiny_llama):
    from builder.tokens import pack_report, split_rows

    df = read_rows(SAMPLE_TRAIN, labelled=True)
    rows = split_rows(df, str(tiny_llama), "context")
    assert len(rows) == len(df) and df["QuestionId"].value_counts().min() > 1
    r = pack_report(rows, (0, 4096, 10**9))
    alone, usual, whole = r["packed"]
    split = [len(h) + len(t) for h, t in rows]
    assert alone["tokens_per_row"] == r["tokens_per_row"] == sum(split) / len(rows)
    assert alone["attention_per_row"] == sum(n * n for n in split) / len(rows) and alone["attention_ratio"] == 1
    # Counted independently: one pack a question holds its head once and every tail.
    heads = {tuple(h) for h, _ in rows}
    assert whole["packs"] == len(heads) == df["QuestionId"].nunique()
    assert whole["tokens_per_row"] * len(rows) == sum(map(len, heads)) + sum(len(t) for _, t in rows)
    assert usual["tokens_per_row"] < alone["tokens_per_row"] and usual["token_ratio"] > 1


def test_tokens_cli_shows_packed_beside_unpacked_tokens_for_a_decoder(tiny_llama, tmp_path):
    from builder.tokens import PACK_SIZES, split_rows

    args = ["tokens", str(SAMPLE_TRAIN), "--model", str(tiny_llama), "--template", "context", "--plot", str(tmp_path / "l.png")]
    text, as_json = CliRunner().invoke(cli, args), CliRunner().invoke(cli, [*args, "--json"])
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
    r = json.loads(as_json.stdout)
    rows = split_rows(read_rows(SAMPLE_TRAIN), str(tiny_llama), "context")
    unpacked = sum(len(h) + len(t) for h, t in rows) / len(rows)
    assert [s["pack_tokens"] for s in r["packing"]["packed"]] == list(PACK_SIZES)
    assert r["packing"]["packed"][0]["tokens_per_row"] == unpacked > r["packing"]["packed"][-1]["tokens_per_row"]
    assert f"p50 {r['p50']:.0f}" in text.output and f"unpacked {unpacked:.1f} tokens/row" in text.output
    table = text.output.split("--pack-tokens")[1].splitlines()[1:]
    assert [line.split()[0] for line in table] == [str(n) for n in PACK_SIZES]
    assert table[-1].split()[2] == f"{r['packing']['packed'][-1]['tokens_per_row']:.1f}"


def test_sorted_batches_waste_less_padding_than_a_hand_count():
    from builder.tokens import padding_waste

    lengths = np.array([5, 50, 6, 49, 7, 48, 8, 47])
    # Sorted pairs: (5,6) (7,8) (47,48) (49,50): padding 1+1+1+1 cells of 2*(6+8+48+50) = 224.
    assert padding_waste(lengths, 2, sort=True) == pytest.approx(4 / 224)
    assert padding_waste(lengths, 2, sort=False) > padding_waste(lengths, 2, sort=True)


def test_analyze_a_file_without_conflicting_labels(tmp_path):
    """A cleaned file or a small subset has no conflicting-label group: the report says 0 (it raised ValueError)."""
    from builder.dataset import conflicts

    df = read_rows(SAMPLE_TRAIN, labelled=True)
    clean = df[~df.index.isin(df.groupby(["QuestionId", "MC_Answer", "StudentExplanation"]).filter(lambda g: len(g) > 1).index)]
    assert len(conflicts(clean)) == 0 and len(clean) > 50
    clean.to_csv(tmp_path / "clean.csv", index=False)
    result = CliRunner().invoke(cli, ["analyze", str(tmp_path / "clean.csv"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    f = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert (f["conflict_groups"], f["conflict_rows"], f["rows"]) == (0, 0, len(clean))
    assert "0 groups, 0 rows" in (tmp_path / "report" / "report.md").read_text()
