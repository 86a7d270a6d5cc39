"""A stage's --out replaces only a missing or empty folder or one of its own stage, and a full disk is one line."""

import errno
import json
from pathlib import Path

import pytest

from builder.stages import META, atomic_dir, disk_full, stage_of
from runtime.errors import MapbuildError
from runtime.manifest import FORMAT, MANIFEST

from .conftest import SAMPLE_TRAIN


def stage_folder(path: Path, stage: str) -> Path:
    path.mkdir(parents=True)
    (path / META).write_text(json.dumps({"stage": stage}))
    (path / "weights.bin").write_bytes(b"hours of training")
    return path


def write(out: Path, marked: str, stage: str | None) -> None:
    """A block that writes a `marked` folder, declared to atomic_dir as `stage`."""
    with atomic_dir(out, stage) as tmp:
        (tmp / META).write_text(json.dumps({"stage": marked}))


def left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_missing_empty_or_same_stage_folder_is_replaced(tmp_path):
    write(tmp_path / "new", "onnx", "onnx")
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "onnx", "onnx")
    stage_folder(tmp_path / "old", "onnx")
    write(tmp_path / "old", "onnx", "onnx")
    assert left(tmp_path / "old") == [META]  # the earlier onnx folder's files went with it
    assert left(tmp_path) == ["empty", "new", "old"]


@pytest.mark.parametrize("stage", ["onnx", None])  # None: what the block wrote decides (builder/package.py's call)
def test_another_stages_folder_is_refused_and_kept(tmp_path, stage):
    run = stage_folder(tmp_path / "run", "run")
    with pytest.raises(MapbuildError, match=r"^--out .*run: holds a 'run' folder, .*choose another --out$"):
        write(run, "onnx", stage)
    assert left(run) == [META, "weights.bin"] and left(tmp_path) == ["run"]  # no temporary folder left


def test_a_users_folder_or_file_is_refused_and_kept(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(MapbuildError, match=r"files mapbuild did not write \(notes.txt\)"):
        write(notes, "bundle", "bundle")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(MapbuildError, match="is a file"):
        write(tmp_path / "file", "run", "run")
    assert (notes / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert left(tmp_path) == ["file", "notes"]


def test_a_bundle_is_known_by_its_manifest_in_any_format_version(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / MANIFEST).write_text(json.dumps({"format": FORMAT.rpartition("/")[0] + "/1"}))
    assert stage_of(bundle) == "bundle"
    with atomic_dir(bundle) as tmp:  # package's call, stage unnamed: its manifest says bundle
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    assert json.loads((bundle / MANIFEST).read_text())["format"] == FORMAT


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "onnx"
    with pytest.raises(MapbuildError) as e:
        with atomic_dir(out, "onnx") as tmp:
            (tmp / "model.onnx").write_bytes(b"\0" * 2**20)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"{out}: no space left on the disk (") and " free, over 1.0 MiB needed); free some space or choose another --out" in str(e.value)
    assert "\n" not in str(e.value) and left(tmp_path) == []


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_full_disks_are_recognised_however_the_writer_says_it(tmp_path, error):
    assert str(disk_full(error, tmp_path)).startswith(f"{tmp_path}: no space left on the disk")
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = error
    assert disk_full(wrapped, tmp_path) is not None


def test_other_errors_are_not_a_full_disk(tmp_path):
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full(RuntimeError("PytorchStreamReader failed reading zip archive"), tmp_path) is None


def test_a_run_records_versions_the_data_sha256_and_the_git_commit(tmp_path):
    import hashlib
    import subprocess

    from builder.tfidf import TfidfConfig, train_tfidf

    train_tfidf(TfidfConfig(data=str(SAMPLE_TRAIN), folds=3, min_df=1), tmp_path / "words")
    p = json.loads((tmp_path / "words" / "mapbuild.json").read_text())["provenance"]
    assert p["data"]["sha256"] == hashlib.sha256(SAMPLE_TRAIN.read_bytes()).hexdigest() and p["data"]["rows_used"] > 100
    assert {"python", "mapbuild", "numpy"} <= set(p["versions"])
    head = subprocess.run(["git", "-C", str(SAMPLE_TRAIN.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert p["git_commit"] is None if head.returncode else p["git_commit"].removesuffix("+dirty") == head.stdout.strip()
