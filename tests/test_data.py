import codecs
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
ENCODINGS = ["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]  # utf-16 writes its byte-order mark
SAFE = ["", "because 1/2 > 1/3", "é ü ß", "NaN", "half of it"]  # no quote, comma or line break


def generated(rng: random.Random, path) -> tuple[list[str], list[str], bool]:
    """One random CSV: its intended row_ids and explanations, and whether it was written valid. Faults: an extra or a
    missing field, a trailing comma, a stray quote, a quote opened in one row's field and closed at the end of the
    same field of the next (the rows merge with the header's field count), a header field dropped, a header repeated
    mid-file (two files joined, with or without a BOM), text in an 8-bit encoding; valid variety: quoting, embedded
    newlines, doubled quotes, CRLF, blank lines, records of commas or spaces only, UTF-8 with or without BOM, UTF-16
    with BOM, id spellings."""
    n = rng.randint(1, 12)
    ids = [str(rng.choice([rng.randint(1, 40_000), rng.randint(1, 9)])) + rng.choice(["", "", "a"]) for _ in range(n)]
    texts = [rng.choice(SAFE + ['she said "half"', "line one\nline two", "a, b and c"]) for _ in range(n)]
    quote = lambda t: '"' + t.replace('"', '""') + '"' if rng.random() < 0.5 or any(c in t for c in ',"\n') else t
    rows = [[i, rng.choice(ID_SPELLINGS), quote("Which is larger?"), quote("\\( \\frac{1}{2} \\)"), quote(t)] for i, t in zip(ids, texts)]
    header = HEADER.split(",")
    fault = rng.choice(["none"] * 7 + ["extra", "missing", "trailing", "stray", "header"] + ["merged", "joined"] * (n > 1))
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
    elif fault == "merged":  # field k of row `at` opens a quote that closes at the end of field k of the next row
        at, k = rng.randrange(n - 1), rng.randrange(5)
        texts[at], texts[at + 1] = rng.choice(SAFE), rng.choice(SAFE)
        for r, t, i in ((rows[at], texts[at], ids[at]), (rows[at + 1], texts[at + 1], ids[at + 1])):
            r[:] = [i, "31772", "Which is larger?", "half", t]
        rows[at][k], rows[at + 1][k] = '"' + rows[at][k], rows[at + 1][k] + '"'
    elif fault == "header":
        header = header[:-1]
    newline = rng.choice(["\n", "\r\n"])
    lines = [",".join(header)] + [",".join(r) for r in rows]
    if fault == "joined":
        lines.insert(rng.randint(2, len(lines)), rng.choice(["", "\ufeff"]) + ",".join(header))
    for _ in range(rng.choice([0, 0, 1, 2])):  # blank lines and blank records are not rows
        lines.insert(rng.randint(1, len(lines)), rng.choice(["", ",,,,", " , , , , ", "   "]))
    encoding = rng.choice(ENCODINGS)
    path.write_bytes(newline.join(lines).encode(encoding, errors="replace") + newline.encode(encoding)[-len(newline.encode("utf-8")) * (2 if encoding == "utf-16" else 1):])
    eight_bit = encoding in ("latin-1", "cp1252") and not all(t.isascii() for t in texts)
    return ids, texts, fault == "none" and not eight_bit


def test_generated_files_give_their_rows_in_order_or_one_line(tmp_path):
    """Over 600 generated files: either a one-line InputError naming the file, or exactly the intended row_ids in
    order, the one question id, and each explanation exactly as written. A file written valid must read. Before:
    8-bit text read with replaced characters, merged rows, repeated headers and blank records read as rows."""
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
        assert df["StudentExplanation"].tolist() == [t.strip() for t in texts], path.read_bytes()[:400]
        outcomes["read"] += 1
    assert outcomes["read"] > 250 and outcomes["refused"] > 150, outcomes


def real_rows(shared_train, n: int = 40) -> pd.DataFrame:
    """n real rows, some of them with text outside ASCII that cp1252 can still encode (’, ¬, é)."""
    df = pd.read_csv(shared_train, dtype=str, keep_default_na=False)
    odd = df[~df["StudentExplanation"].map(str.isascii)]
    odd = odd[odd["StudentExplanation"].map(lambda t: t.encode("cp1252", errors="ignore").decode("cp1252") == t)]
    return pd.concat([df.head(n - 10), odd.head(10)])[list(HEADER.split(","))]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le"])
def test_unicode_files_read_exactly_as_written(shared_train, tmp_path, encoding):
    rows = real_rows(shared_train)
    path = tmp_path / "test.csv"
    text = rows.to_csv(index=False)
    path.write_bytes((codecs.BOM_UTF16_LE if encoding == "utf-16-le" else b"") + text.encode(encoding))  # utf-16: BOM written
    got = read_rows(path)
    assert got["StudentExplanation"].tolist() == rows["StudentExplanation"].str.strip().tolist()


@pytest.mark.parametrize("how", ["cp1252 file", "one cp1252 character"])
def test_text_that_is_not_utf8_is_refused_naming_its_line(shared_train, tmp_path, how):
    """Before: decoded with errors="replace" and predicted on U+FFFD, with no warning."""
    rows = real_rows(shared_train)
    path = tmp_path / "test.csv"
    text = rows.to_csv(index=False)
    if how == "cp1252 file":
        path.write_bytes(text.encode("cp1252"))
    else:
        lines = text.encode("utf-8").split(b"\n")
        lines[5] = lines[5].replace(b"e", b"\xe9", 1)
        path.write_bytes(b"\n".join(lines))
    first_bad = next(i for i, line in enumerate(path.read_bytes().split(b"\n"), 1) if not is_utf8(line))
    with pytest.raises(InputError, match=rf"line {first_bad} is not valid UTF-8 \(byte 0x[0-9a-f]{{2}}\); save the file as UTF-8") as e:
        read_rows(path)
    assert str(path) in str(e.value)


def is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("extra, error", [
    ("\ufeff" + HEADER, "record 4 repeats the header (two files joined?)"),
    (HEADER, "record 4 repeats the header"),
    (",,q,a,text", "record 4 has no row_id"),
])
def test_joined_files_and_rows_without_id_are_refused(tmp_path, extra, error):
    """Before: the repeated header became a row predicted as row_id 'row_id', and an id-less row was predicted."""
    path = write(tmp_path, HEADER, "1,31772,q,a,x", "2,31772,q,a,y", extra, "3,31772,q,a,z")
    with pytest.raises(InputError, match=re.escape(error)):
        read_rows(path)


def test_records_of_commas_or_spaces_are_blank_lines(tmp_path):
    path = write(tmp_path, HEADER, "1,31772,q,a,x", ",,,,", " , , , , ", "2,31772,q,a,y")
    assert read_rows(path)["row_id"].tolist() == ["1", "2"]


def test_a_duplicated_header_column_is_one_line(tmp_path):
    path = write(tmp_path, HEADER + ",MC_Answer", "1,31772,q,a,x,b")
    with pytest.raises(InputError, match="column 'MC_Answer' appears more than once"):
        read_rows(path)


@pytest.mark.parametrize("k", range(5))
def test_a_quote_closed_in_the_same_field_of_the_next_row_is_refused(tmp_path, k):
    """The merged record has the header's field count, so only its content shows the merge."""
    a, b = ["1", "31772", "q", "a", "x"], ["2", "31772", "q", "a", "y"]
    a[k], b[k] = '"' + a[k], b[k] + '"'
    path = write(tmp_path, HEADER, ",".join(a), ",".join(b), "3,31772,q,a,z")
    with pytest.raises(InputError, match="holds another row inside a quoted field"):
        read_rows(path)


@pytest.mark.parametrize("column, value", [("Category", "Incomplete answer"), ("Misconception", "Wrong:fraction"), ("Misconception", "")])
def test_labels_the_submission_cannot_write_are_refused_when_read(tmp_path, column, value):
    """A label with a space or a second ':' passed tfidf and package, and only the kernel refused it (advising to
    package again, which cannot help); an empty one is the label NA after a pandas round trip."""
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    df.loc[df.index[5], column] = value
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=rf"row_id '{df['row_id'].iloc[5]}'") as e:
        read_rows(tmp_path / "t.csv", labelled=True)
    assert "\n" not in str(e.value) and ("1 of" in str(e.value) or "1 rows" in str(e.value))
    with pytest.raises(InputError):  # verify's labelled --test and the kernel read it without labelled=True
        read_rows(tmp_path / "t.csv")
