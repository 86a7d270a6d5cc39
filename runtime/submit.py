"""Kernel entry point: python -m runtime.submit [--bundle DIR] [--test CSV] [--out submission.csv]."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from .data import duplicate_row_ids, has_labels, labels_of, read_rows
from .engine import CUDA, gpu_count
from .errors import BundleError, InputError, MapbuildError
from .files import atomic_write
from .labels import LabelSpace, top3
from .manifest import MANIFEST, READS, load_manifest
from .metrics import map_at_3
from .plan import LIMIT_HOURS, MARGIN_HOURS, now
from .predict import predict
from .preflight import KAGGLE_INPUT, find_test, onnxruntime_providers
from .submission import write_submission

log = logging.getLogger("mapbuild")
UNSEEN_OK = 5  # a handful of rows outside the training data is normal; more suggests mangled ids
UNSEEN_MAX = 0.5  # past this share of unseen rows, the bundle is not for this data: stop, do not submit the prior


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work, in one line naming the flag."""
    out, result = args.out, args.result
    folder = Path(result or ".").parent  # the messages below are built whether or not they apply
    try:  # a folder the process may not search raises here, not False
        problems = [
            (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
            (args.pack_tokens is not None and args.pack_tokens < 0, f"--pack-tokens must be 0 or more, got {args.pack_tokens}"),
            (args.devices is not None and args.devices < 1, f"--devices must be at least 1, got {args.devices}"),
            (not args.hours > 0, f"--hours must be positive, got {args.hours}"),
            (not str(out).strip() or out.is_dir(), f"--out {str(out)!r}: give a file path such as /kaggle/working/submission.csv"),
            (not out.parent.is_dir(), f"--out {out}: folder {out.parent} does not exist"),
            (out.parent.is_dir() and not os.access(out.parent, os.W_OK), f"--out {out}: folder {out.parent} is not writable"),
            (args.test is not None and not args.test.is_file(), f"--test {args.test}: not a file; pass the test CSV"),
            (result is not None and result.is_dir(), f"--result {result}: is a folder; give a file path such as mapbuild_result.json"),
            (result is not None and not result.parent.is_dir(), f"--result {result}: folder {folder} does not exist"),
            (result is not None and result.parent.is_dir() and not os.access(result.parent, os.W_OK), f"--result {result}: folder {folder} is not writable"),
            (result is not None and os.path.realpath(result) == os.path.realpath(out), f"--result {result} is --out too; give the result JSON its own file"),
        ]
    except OSError as e:
        raise InputError(f"{e.filename}: cannot be looked at ({e.strerror}); check the permissions of its folders") from None
    for bad, message in problems:
        if bad:
            raise InputError(message)


def find_bundle(root: str) -> Path:
    """The one folder under root holding a mapbuild manifest (Kaggle's mount layout has changed over time). Two
    bundles (an old version attached beside a new one) are refused: sort order must not pick the models."""
    found = []
    for path in sorted(Path(root).rglob(MANIFEST)):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") in READS:
            found.append(path.parent)
    if len(found) > 1:
        raise BundleError(f"{len(found)} mapbuild bundles under {root} ({found[0]} and {found[1]}); detach one or pass --bundle")
    if not found:
        raise BundleError(f"no mapbuild bundle under {root}; attach the bundle dataset or pass --bundle")
    return found[0]


def run(
    bundle: Path, test: Path, out: Path, batch_size: int, devices: int = 1, deadline: float | None = None, pack_tokens: int | None = None,
    input_root: str | Path = KAGGLE_INPUT,
) -> dict:
    """Write the submission; returns what ran: rows, members, seconds, and MAP@3 when the test rows carry labels.
    `deadline`: the plan.now() by which predictions must be done; `pack_tokens`: packed members' pack size, instead
    of the one each was exported with (at most that one); `input_root`: where members' bases are attached."""
    manifest = load_manifest(bundle)
    df = read_rows(test)
    dups = duplicate_row_ids(df)
    if dups:
        log.warning("%s: %d duplicate row_id values (e.g. %s); every row is kept", test, len(dups), ", ".join(dups[:5]))
    space = LabelSpace.from_json(manifest["label_space"])
    unseen = [q not in space.answers or a not in space.answers[q] for q, a in zip(df["QuestionId"], df["MC_Answer"])]
    if sum(unseen) > UNSEEN_MAX * len(df):
        raise InputError(
            f"{test}: {sum(unseen)} of {len(df)} rows have a question or answer the bundle never saw; is {bundle} the bundle for this data?"
        )
    if sum(unseen) > UNSEEN_OK:
        log.warning("%s: %d of %d rows have a question or answer the bundle never saw; they keep all labels", test, sum(unseen), len(df))
    start = time.perf_counter()
    probs, used = predict(bundle, manifest, space, df, batch_size, devices, deadline, pack_tokens, input_root)
    seconds = time.perf_counter() - start
    labels = np.array(space.labels)
    preds = labels[top3(probs, space.candidate_mask(df))].tolist()
    write_submission(out, df["row_id"], preds)
    log.info("%d rows in %.1f s (%.1f rows/s) with %s -> %s", len(df), seconds, len(df) / max(seconds, 1e-9), ", ".join(used) or "no model", out)
    score = map_at_3(labels_of(df).tolist(), preds) if has_labels(df) else None
    return {"rows": len(df), "members_run": used, "predict_seconds": round(seconds, 3), "map3": score}


class Faults(logging.Handler):
    """Every error line the run logs (a member skipped or dropped, CUDA not engaged, the prior used): the run's
    fallbacks, for the JSON result."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def write_result(path: Path, result: dict) -> None:
    """The run's JSON result, written whole or not at all."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


def say(line: str, stream: str = "stderr") -> None:
    """A line on stderr or stdout, which may be closed or a pipe nobody reads: that must not turn an answer into a
    traceback (print to a stream of None would write to stdout instead)."""
    try:
        if getattr(sys, stream) is not None:
            print(line, file=getattr(sys, stream))
    except (OSError, ValueError):
        pass


def fill_standard_fds() -> None:
    """Open /dev/null on a closed fd 0-2. Else the next file this process opens takes that number, and onnxruntime's
    C++ log lines, written straight to fd 2, would land in it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.submit", description=__doc__)
    parser.add_argument("--bundle", type=Path, help=f"bundle folder (default: search {KAGGLE_INPUT})")
    parser.add_argument("--test", type=Path, help="test.csv (default: the competition's, under --input-root)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission to write")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per inference batch")
    parser.add_argument(
        "--pack-tokens", type=int,
        help="tokens per pack for packed (decoder) members, 0 for one row a pack; at most each member's own, set at export (the default)",
    )
    parser.add_argument("--result", type=Path, help="also write what ran as JSON: rows, members run, fallbacks, seconds, MAP@3, error")
    parser.add_argument("--input-root", default=KAGGLE_INPUT, help="where to search for the bundle, the competition and members' base models")
    parser.add_argument("--devices", type=int, help="ONNX worker processes, worker i on GPU i modulo the GPUs (default: one per visible GPU, else 1); a torch member places itself")
    parser.add_argument(
        "--hours", type=float, default=LIMIT_HOURS - MARGIN_HOURS,
        help="time budget for predictions from now; members that would overrun are dropped (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    fill_standard_fds()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    faults = Faults()
    log.addHandler(faults)
    start = time.perf_counter()
    result: dict = {"error": None}
    try:
        check_args(args)
        bundle = args.bundle or find_bundle(args.input_root)
        gpus = gpu_count()
        providers = onnxruntime_providers(load_manifest(bundle), gpus)  # no onnxruntime must never become a prior
        test = args.test or find_test(args.input_root)
        deadline = now() + args.hours * 3600
        devices = args.devices or (max(gpus, 1) if CUDA in providers else 1)
        result.update(run(bundle, test, args.out, args.batch_size, devices, deadline, args.pack_tokens, args.input_root))
    except MapbuildError as e:
        result["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - the last guard: a bug is one line too, never a traceback
        result["error"] = f"internal error, {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}; please report it with the bundle's manifest"
    finally:
        log.removeHandler(faults)
    if args.result and os.path.realpath(args.result) != os.path.realpath(args.out):  # never over the submission
        try:
            write_result(args.result, result | {"faults": faults.lines, "seconds": round(time.perf_counter() - start, 3)})
        except MapbuildError as e:
            result["error"] = result["error"] or str(e)
    if result["error"]:
        say(f"error: {result['error']}")
        return 2
    if result["map3"] is not None:
        say(f"MAP@3 on labelled rows: {result['map3']:.4f}", "stdout")
    return 0

if __name__ == "__main__":
    sys.exit(main())
