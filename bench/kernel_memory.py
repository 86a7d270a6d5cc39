"""The kernel's peak memory in a packed member's run: 40,000 rows at pack 512 and 2,048, old code against new.

The memory at issue is the batches' inputs (a packed batch's mask is [B, 1, T, T] bools), not the model's, so the
forward is a fake one returning zeros. Each setting runs in a fresh subprocess and reports its ru_maxrss (the
process's peak resident set, which counts numpy's buffers and everything else) before and after run_packs, and
run_packs' wall seconds. The old code is `--old`'s runtime/packing.py and runtime/engine.py, laid over a copy of
this tree's runtime/ in a temp folder that goes first on the child's sys.path.

Rows: ../shared/data/map/train.csv under the `context` template (its heads are the longest), tokenized by a word
and punctuation encoder (about as many tokens as a subword tokenizer gives), the copies past its 29,224 rows made
distinct by one token so that run_packs' dedupe keeps them; synthetic lengths when the data is absent.

    .venv/bin/python bench/kernel_memory.py [--rows 40000] [--packs 512,2048] [--old 6525a48]
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "map" / "train.csv"
LABELS = 65  # about the MAP label space's size: the logits are tiny either way


def rows_of(n: int, max_length: int) -> tuple[list, str]:
    """`n` (head ids, tail ids) rows, as split_ids splits them, and where they came from."""
    import numpy as np

    from runtime.packing import split_ids

    vocab: dict[str, int] = {}

    def encode(texts, special):
        ids = [[vocab.setdefault(w, len(vocab) + 2) for w in re.findall(r"\w+|[^\w\s]", t)] for t in texts]
        return [[1] + i for i in ids] if special else ids  # 1: a BOS

    if DATA.is_file():
        from runtime.data import read_rows
        from runtime.labels import fit_label_space
        from runtime.prompts import render_parts

        df = read_rows(DATA, labelled=True)
        rows = split_ids(encode, render_parts(df, "context", fit_label_space(df), None), max_length)
        source = f"{len(df):,} rows of {DATA.name}, `context` template, word encoder"
    else:
        rng = np.random.default_rng(0)
        heads = [[1] + list(range(100 * q, 100 * q + int(rng.integers(60, 200)))) for q in range(15)]
        rows = [(heads[i % 15], [5] * int(min(rng.lognormal(3.7, 0.5), max_length - 200))) for i in range(n)]
        source = f"synthetic lengths ({DATA} not found)"
    # copies past the data's rows end in one more token of their own, so that run_packs' dedupe keeps them
    have = len(rows)
    return [(h, t + [10**6 + k // have] if k >= have else t) for k in range(n) for h, t in [rows[k % have]]], source


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.code)
    import numpy as np

    from runtime.packing import run_packs

    with open(args.rows_file, "rb") as f:
        rows = pickle.load(f)

    def forward(ids, pos, mask, last):
        return np.zeros((*last.shape, LABELS), dtype=np.float32)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run_packs(forward, rows, 0, args.pack, args.batch_rows, desc=f"pack {args.pack}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": seconds}))


def old_runtime(rev: str, into: Path) -> Path:
    """This tree's runtime/ with `rev`'s packing.py and engine.py, under `into`."""
    shutil.copytree(ROOT / "runtime", into / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("packing.py", "engine.py"):
        text = subprocess.run(["git", "show", f"{rev}:runtime/{name}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        (into / "runtime" / name).write_text(text)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--packs", default="512,2048", help="pack sizes, comma-separated")
    parser.add_argument("--batch-rows", type=int, default=64, help="rows a batch (the kernel's --batch-size default)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--old", default="6525a48", help="the commit whose packing.py and engine.py are the old code")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--pack", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        rows, source = rows_of(args.rows, args.max_length)
        rows_file = Path(tmp) / "rows.pkl"
        rows_file.write_bytes(pickle.dumps(rows))
        del rows
        codes = {f"old ({args.old})": old_runtime(args.old, Path(tmp) / "old"), "new (this tree)": ROOT}
        print(f"{args.rows:,} rows from {source}, batches of {args.batch_rows} rows, max_length {args.max_length}")
        print("| code | pack_tokens | peak RSS MiB | of it run_packs' MiB | seconds |\n|---|---|---|---|---|")
        for size in map(int, args.packs.split(",")):
            for name, code in codes.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--child", "--code", str(code), "--rows-file", str(rows_file), "--pack", str(size),
                     "--batch-rows", str(args.batch_rows)],
                    capture_output=True, text=True,
                )
                if done.returncode:
                    print(f"| {name} | {size} | failed: {done.stderr.strip().splitlines()[-1:]} | | |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {name} | {size} | {r['peak_mib']:,.0f} | {r['peak_mib'] - r['before_mib']:,.0f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
