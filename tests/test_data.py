import random
import re

import pandas as pd
import pytest

from runtime.data import MAX_TEXT, InputError, duplicate_row_ids, read_rows

from .conftest import SAMPLE_TRAIN


def test_na_is_a_label_not_missing():
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    assert (df["Misconception"] == "NA").sum() > 0
    assert not df.isna().any().any()


def test_missing_column_names_the_column(tmp_path):
    path = tmp_path / "test.csv"
    pd.read_csv(SAMPLE_TRAIN).drop(columns="MC_Answer").to_csv(path, index=False)
    with pytest.raises(InputError, match="missing column MC_Answer") as e:
        read_rows(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_nan_and_empty_text_become_empty_strings(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation\n1,9001,q,0.5,\n2,9001,q,0.5,NaN\n")
    df = read_rows(path)
    assert df["StudentExplanation"].tolist() == ["", "NaN"]  # "NaN" typed by a student is text


def test_duplicate_row_ids_are_reported():
    df = pd.DataFrame({"row_id": ["1", "2", "1", "3", "3"]})
    assert duplicate_row_ids(df) == ["1", "3"]


HEADER = "row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation"


def write(tmp_path, *lines: str):
    path = tmp_path / "test.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, error", [
    ((HEADER, "1,31772,q,a,fine,EXTRA", "2,31772,q,a,fine"), "record 2 (row_id '1') has 6 fields, the header 5"),
    ((HEADER, "1,31772,q,a,fine,", "2,31772,q,a,fine,"), "record 2 (row_id '1') has 6 fields"),  # a trailing comma
    ((HEADER, "1,31772,q,a", "2,31772,q,a,fine"), "record 2 (row_id '1') has 4 fields"),
    ((HEADER, '1,31772,q,a,"never closed', "2,31772,q,a,fine", "3,31772,q,a,fine"), "not a readable CSV at line"),
    ((HEADER, '1,31772,q,a,"closed" then text', "2,31772,q,a,fine"), "not a readable CSV at line 2"),
    ((HEADER, '1,31772,q,a,"opened', '2,31772.0,q,a,closed"', "3,31772,q,a,fine"), "record 2 (row_id '1') holds another row inside a quoted field"),
])
def test_records_that_do_not_match_the_header_are_refused_in_one_line(tmp_path, lines, error):
    """Before: pandas took an extra first field as the index (every row_id became the QuestionId), dropped trailing
    commas' fields, and merged rows after an unclosed quote."""
    path = write(tmp_path, *lines)
    with pytest.raises(InputError, match=re.escape(error)) as e:
        read_rows(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_question_ids_in_another_spelling_are_the_same_question(tmp_path):
    path = write(tmp_path, HEADER, "1,31772.0,q,a,x", "2, 31772 ,q,a,x", "3,+031772,q,a,x", "4,31772,q,a,x", "5,abc,q,a,x", "6,3.5,q,a,x")
    assert read_rows(path)["QuestionId"].tolist() == ["31772"] * 4 + ["abc", "3.5"]


def test_a_huge_field_is_cut_and_counted(tmp_path, caplog):
    path = write(tmp_path, HEADER, f"1,31772,q,a,{'because ' * 10_000}", "2,31772,q,a,short")
    with caplog.at_level("WARNING", logger="mapbuild"):
        df = read_rows(path)
    assert df["StudentExplanation"].str.len().tolist() == [MAX_TEXT, 5] and "1 row(s) with a text field over 20000" in caplog.text


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        read_rows(tmp_path)


ID_SPELLINGS = ["31772", "31772.0", " 31772 ", "+31772", "031772", "31772.00"]
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "cp1252"]


def generated(rng: random.Random, path) -> tuple[list[str], list[str], bool]:
    """One random CSV: its intended row_ids and explanations, and whether it was written valid. Faults: an extra or a
    missing field, a trailing comma, a stray quote, a quote closed a row late, a header field dropped; valid variety: quoting, embedded
    newlines, doubled quotes, CRLF, blank lines, encodings, id spellings."""
    n = rng.randint(1, 12)
    ids = [str(rng.choice([rng.randint(1, 40_000), rng.randint(1, 9)])) + rng.choice(["", "", "a"]) for _ in range(n)]
    texts = [rng.choice(["", "because 1/2 > 1/3", 'she said "half"', "line one\nline two", "a, b and c", "é ü ß", "NaN"]) for _ in range(n)]
    quote = lambda t: '"' + t.replace('"', '""') + '"' if rng.random() < 0.5 or any(c in t for c in ',"\n') else t
    rows = [[i, rng.choice(ID_SPELLINGS), quote("Which is larger?"), quote("\\( \\frac{1}{2} \\)"), quote(t)] for i, t in zip(ids, texts)]
    header = HEADER.split(",")
    fault = rng.choice(["none"] * 6 + ["extra", "missing", "trailing", "stray", "header"] + ["unclosed"] * (n > 1))
    at = rng.randrange(n)
    if fault == "extra":
        rows[at].append("oops")
    elif fault == "missing":
        rows[at].pop(rng.randrange(1, 5))
    elif fault == "trailing":
        rows = [r + [""] for r in rows]
    elif fault == "stray":
        field = rng.randrange(5)
        rows[at][field] = '"' + rows[at][field]
    elif fault == "unclosed":  # a quote opened in one row closes at the end of the next: the rows merge
        at = rng.randrange(n - 1)
        rows[at][4] = '"' + texts[at].replace('"', '""')
        rows[at + 1][2:] = ["Which is larger?", "\\( \\frac{1}{2} \\)", texts[at + 1].replace('"', '""') + '"']
    elif fault == "header":
        header = header[:-1]
    newline = rng.choice(["\n", "\r\n"])
    lines = [",".join(header)] + [",".join(r) for r in rows]
    if rng.random() < 0.3:
        lines.insert(rng.randint(1, len(lines)), "")
    encoding = rng.choice(ENCODINGS)
    path.write_bytes(newline.join(lines).encode(encoding, errors="replace") + newline.encode())
    return ids, texts, fault == "none"


def test_generated_files_give_their_rows_in_order_or_one_line(tmp_path):
    """Over 600 generated files: either a one-line InputError naming the file, or exactly the intended row_ids in
    order, the one question id, and each explanation unshifted. A file written valid must read."""
    rng = random.Random(7)
    outcomes = {"read": 0, "refused": 0}
    for k in range(600):
        path = tmp_path / f"t{k}.csv"
        ids, texts, valid = generated(rng, path)
        try:
            df = read_rows(path)
        except InputError as e:
            assert not valid, (str(e), path.read_bytes()[:400])
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        assert df["row_id"].tolist() == ids, path.read_bytes()[:400]
        assert set(df["QuestionId"]) == {"31772"}
        ascii_only = [(got, want.strip()) for got, want in zip(df["StudentExplanation"], texts) if want.isascii()]  # other encodings decode the rest differently
        assert all(got == want for got, want in ascii_only), path.read_bytes()[:400]
        outcomes["read"] += 1
    assert outcomes["read"] > 250 and outcomes["refused"] > 150, outcomes
