"""A stage's --out replaces only a missing or empty folder or one of its own stage, a full disk is one line, and
every stage folder says what it is in one checked record."""

import errno
import json
import re
from pathlib import Path

import numpy as np

import pytest

from builder.stages import META, StageMeta, atomic_dir, disk_full, read_meta, stage_of, write_meta
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


def tfidf_record(**changes) -> StageMeta:
    fields = dict(stage="onnx", kind="tfidf", model_type="tfidf", label_space={}, config={}, metrics={}, run="/runs/words",
                  precision="fp32", drift={}, params=10, mean_tokens=1.0, cpu_rows_per_s=5.0)  # fmt: skip
    return StageMeta(**{**fields, **changes})


def test_every_stage_of_a_pipeline_reads_back_as_the_record_it_wrote(tiny_pipeline):
    for stage, folder in [("run", "run"), ("merged", "merged"), ("onnx", "onnx"), ("onnx", "onnx-int8")]:
        meta = read_meta(tiny_pipeline[folder], stage)
        assert StageMeta.from_json(meta).to_json() == meta and meta["stage"] == stage
    run, onnx = read_meta(tiny_pipeline["run"], "run"), read_meta(tiny_pipeline["onnx"], "onnx")
    assert "gguf_file" not in run and "chat" not in run  # None is left out, as a folder written before the field reads
    own = ("files", "read")  # each folder's own files, and what its stage read
    assert {k: v for k, v in onnx.items() if k in run and k not in own} == {k: v for k, v in run.items() if k not in own} | {"stage": "onnx"}  # export adds to merge's, which adds to train's
    assert onnx["read"] == {**run["read"], "run": {"path": str(tiny_pipeline["run"].resolve()), "files": run["files"]}}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(run["read"]["base_model"]["files"]) and "adapter/adapter_model.safetensors" in run["files"]


@pytest.mark.parametrize("changes, problem", [
    (dict(stage="merged"), "a tfidf member writes its onnx folder directly, not a 'merged' one"),
    (dict(kind="transformer", model_type="bert"), "a transformer 'onnx' folder needs base_model, template, max_length, pad_token_id, hardware, merged"),
    (dict(kind="forest"), "kind 'forest' is not one of transformer, tfidf, knn"),
    (dict(kind="transformer", model_type="gpt9"), "model_type 'gpt9' is not a family this mapbuild knows"),  # issue 40: a KeyError at export
    (dict(max_length=0), "max_length 0 is not a positive number of tokens"),  # issue 40: exported without a word
    (dict(params=np.int64(10)), "params np.int64(10) is a int64, not int"),  # json.dumps would fail on it after hours of training
    (dict(mean_tokens="1"), "mean_tokens '1' is a str, not float or int"),
    (dict(cpu_rows_per_s=None), "an onnx folder needs cpu_rows_per_s or cuda_rows_per_s"),
    (dict(inputs="ragged"), "inputs 'ragged' is not 'packed'"),
    (dict(pack_tokens=512), "pack_tokens 512 needs inputs 'packed' and at least 1 token"),
])
def test_a_record_that_breaks_what_readers_rely_on_is_refused_when_written(changes, problem):
    with pytest.raises(ValueError, match=f"^{re.escape(f'{META}: {problem}')}"):
        tfidf_record(**changes)
    assert tfidf_record(inputs="packed", pack_tokens=512).pack_tokens == 512


def test_a_folder_from_a_newer_mapbuild_reads_and_a_broken_one_is_one_line(tmp_path):
    folder = tmp_path / "words"
    folder.mkdir()
    write_meta(folder, tfidf_record())
    newer = {**json.loads((folder / META).read_text()), "field_to_come": 1}
    (folder / META).write_text(json.dumps(newer))
    assert read_meta(folder, "onnx") == newer  # as written: the unknown key is kept for whoever reads it
    for broken, says in [({k: v for k, v in newer.items() if k != "metrics"}, "needs metrics"), (["onnx"], "holds a list, not an object"),
                         ({**newer, "drift": None, "params": None}, "a tfidf 'onnx' folder needs drift, params"), ('{"stage": "on', "Unterminated string")]:  # fmt: skip
        (folder / META).write_text(broken if isinstance(broken, str) else json.dumps(broken))
        with pytest.raises(MapbuildError, match=rf"^{folder / META}: {says}.*; write the folder again with this mapbuild$"):
            read_meta(folder, "onnx")
    (folder / META).write_text(json.dumps({**newer, "stage": "run"}))
    with pytest.raises(MapbuildError, match=r"words: is a 'run' folder, expected 'onnx'$"):
        read_meta(folder, "onnx")
