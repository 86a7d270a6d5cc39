"""500 malformed test files through the kernel's entry point: a valid submission or a one-line error, never a traceback."""

import csv
import random

import pandas as pd
import pytest

from runtime.data import TEST_COLUMNS, read_rows
from runtime.submission import check_submission
from runtime.submit import main

from .conftest import SAMPLE_TEST

N = 500


def mutate(rng: random.Random, rows: list[dict], path) -> None:
    """Write one malformed variant of the sample test file."""
    rows = [dict(r) for r in rng.sample(rows, rng.randint(0, len(rows)))]
    columns = list(TEST_COLUMNS)
    kind = rng.choice(["drop", "extra", "blank", "nan", "huge", "bytes", "dup", "unseen", "empty", "garbage", "quote", "reorder"])
    if kind == "drop":
        columns.remove(rng.choice(columns))
    elif kind == "extra":
        columns.insert(rng.randint(0, len(columns)), rng.choice(["Category", "junk", "row_id2", ""]))
    for r in rows:
        col = rng.choice(TEST_COLUMNS)
        if kind == "blank":
            r[col] = ""
        elif kind == "nan":
            r[col] = rng.choice(["NaN", "nan", "NA", "None", "null"])
        elif kind == "huge":
            r["StudentExplanation"] = "because " * rng.randint(1_000, 20_000)
        elif kind == "unseen":
            r["QuestionId"], r["MC_Answer"] = str(rng.randint(1, 10**9)), rng.choice(["\\( 7 \\)", "", "Z"])
    if kind == "dup" and rows:
        rows += [dict(r) for r in rng.choices(rows, k=rng.randint(1, 5))]
    if kind == "empty":
        path.write_bytes(b"" if rng.random() < 0.5 else (",".join(columns) + "\n").encode())
    elif kind == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(rows)
        if kind == "bytes":  # invalid UTF-8 inside the text
            data = path.read_bytes()
            path.write_bytes(data.replace(b"e", b"\xe9\xff", rng.randint(1, 20)))
        elif kind == "quote":
            path.write_bytes(path.read_bytes() + b'\n"1,2,unterminated')
        elif kind == "reorder":
            pd.read_csv(path, dtype=str, keep_default_na=False).sample(frac=1, axis=1, random_state=rng.randint(0, 99)).to_csv(path, index=False)


@pytest.mark.slow
def test_malformed_test_files_never_end_in_a_traceback(tiny_pipeline, tmp_path, capsys):
    rng = random.Random(0)
    rows = pd.read_csv(SAMPLE_TEST, dtype=str, keep_default_na=False)[list(TEST_COLUMNS)].to_dict("records")
    outcomes = {"valid": 0, "error": 0}
    for i in range(N):
        test, out = tmp_path / f"test{i}.csv", tmp_path / f"sub{i}.csv"
        mutate(rng, rows, test)
        code = main(["--bundle", str(tiny_pipeline["bundle"]), "--test", str(test), "--out", str(out), "--devices", "1"])
        err = capsys.readouterr().err
        if code == 0:
            assert check_submission(out, read_rows(test)["row_id"].tolist()) == [], test.read_bytes()[:300]
            outcomes["valid"] += 1
        else:
            assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
            assert "Traceback" not in err and str(test) in err
            outcomes["error"] += 1
    assert outcomes["valid"] > 100 and outcomes["error"] > 50, outcomes
