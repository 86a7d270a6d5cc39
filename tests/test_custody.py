"""Issue 40: each stage checks what it reads against what wrote it. A base model, run, merged folder or data file
changed since the stage that read it stops the next stage in one line naming what changed; a folder the user added
files to, or a symlinked --out, is never quietly emptied."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from builder.cli import cli
from builder.stages import META, atomic_dir

from .conftest import SAMPLE_TRAIN


def one_line(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.strip().count("\n") == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """train -> merge -> export on copies of the tiny base and the sample data, which the tests change and restore."""
    from builder.export import export
    from builder.merge import merge
    from builder.train import TrainConfig, train

    root = tmp_path_factory.mktemp("custody")
    shutil.copytree(tiny_bert, root / "base")
    shutil.copy(SAMPLE_TRAIN, root / "train.csv")
    train(TrainConfig(model=str(root / "base"), data=str(root / "train.csv"), epochs=1, batch_size=16, lora_r=4), root / "run")
    merge(root / "run", root / "merged")
    export(root / "merged", root / "onnx", "fp32")
    return {k: root / k for k in ("base", "train.csv", "run", "merged", "onnx")}


@pytest.fixture
def changed(request):
    """Change a file's bytes for the test, and put them back after it."""
    saved: dict[Path, bytes] = {}

    def change(path: Path, content: bytes | None = None) -> None:
        saved.setdefault(path, path.read_bytes())
        data = bytearray(saved[path])
        data[-1] ^= 1  # the last byte: a safetensors weight, a JSON's closing brace's neighbour, a CSV's newline
        path.write_bytes(content if content is not None else bytes(data))

    yield change
    for path, data in saved.items():
        path.write_bytes(data)


def test_merge_refuses_a_base_model_changed_since_training(chain, changed, tmp_path):
    """Point 1: held-out MAP@3 fell from 0.7240 to 0.5208 when the base held other weights by merge time."""
    changed(chain["base"] / "model.safetensors")
    line = one_line("merge", str(chain["run"]), "--out", str(tmp_path / "m"))
    assert f"{chain['base'] / 'model.safetensors'}: changed since train read it" in line and "train again" in line
    assert not (tmp_path / "m").exists()


def test_merge_names_a_base_model_that_is_gone(chain, tmp_path):
    gone = chain["base"].with_name("base-away")
    chain["base"].rename(gone)
    try:
        line = one_line("merge", str(chain["run"]), "--out", str(tmp_path / "m"))
    finally:
        gone.rename(chain["base"])
    assert f"base model {chain['base']}: not found" in line


def test_merge_refuses_a_run_whose_adapter_changed_since_training(chain, changed, tmp_path):
    changed(chain["run"] / "adapter" / "adapter_model.safetensors")
    line = one_line("merge", str(chain["run"]), "--out", str(tmp_path / "m"))
    assert "adapter_model.safetensors: changed since train wrote it" in line and "mapbuild train" in line


def edit_record(folder: Path, **changes) -> None:
    meta = json.loads((folder / META).read_text())
    (folder / META).write_text(json.dumps(meta | changes))


@pytest.mark.parametrize("how, needle", [
    ("tokenizer", "tokenizer.json: changed since merge wrote it"),  # 127 of 1,000 rows' top-3 differed
    ("template", f"{META}: edited since merge wrote it"),  # 24 rows differed
    ("labels", f"{META}: edited since merge wrote it"),  # MAP@3 0.4792 against 0.7240
    ("config", "config.json: changed since merge wrote it"),  # the base's config.json: a traceback
])
def test_export_refuses_a_merged_folder_changed_since_merge(chain, tmp_path, how, needle):
    """Point 2 and a traceback: a merged folder whose tokenizer, template, label order or config changed after merge."""
    merged = tmp_path / "merged"
    shutil.copytree(chain["merged"], merged)
    meta = json.loads((merged / META).read_text())
    if how == "tokenizer":
        tok = json.loads((merged / "tokenizer.json").read_text())
        tok["model"]["vocab"] = {k: (v + 1) % len(tok["model"]["vocab"]) for k, v in tok["model"]["vocab"].items()}
        (merged / "tokenizer.json").write_text(json.dumps(tok))
    elif how == "template":
        edit_record(merged, template="plain" if meta["template"] != "plain" else "detailed")
    elif how == "labels":
        edit_record(merged, label_space=meta["label_space"] | {"labels": meta["label_space"]["labels"][::-1]})
    else:
        shutil.copy(chain["base"] / "config.json", merged / "config.json")
    line = one_line("export", str(merged), "--out", str(tmp_path / "onnx"))
    assert f"{merged}/{needle}" in line and "mapbuild merge" in line
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_a_data_file_changed_since_training(chain, changed, tmp_path):
    """Its held-out rows would no longer be the ones the run held out."""
    data = chain["train.csv"]
    df = pd.read_csv(data, keep_default_na=False)
    changed(data, df.iloc[::-1].to_csv(index=False).encode())  # the same rows, reordered: other folds
    line = one_line("export", str(chain["merged"]), "--out", str(tmp_path / "onnx"))
    assert f"{data}: changed since train read it" in line and "restore the file" in line


def test_package_refuses_a_run_trained_again_since_it_was_merged(chain, changed, tmp_path):
    """The bundle would weigh the member by another model's out-of-fold rows."""
    with np.load(chain["run"] / "oof.npz") as z:
        other = {"row_id": z["row_id"], "probs": z["probs"][::-1].copy()}
    changed(chain["run"] / "oof.npz", b"")
    np.savez(chain["run"] / "oof.npz", **other)
    line = one_line("package", str(chain["onnx"]), "--out", str(tmp_path / "bundle"), "--dataset-id", "tester/custody", "--no-wheels")
    assert f"{chain['run'] / 'oof.npz'}: changed since merge read it" in line and "restore the run" in line


def test_package_refuses_an_onnx_folder_changed_since_export(chain, changed, tmp_path):
    changed(chain["onnx"] / "model.onnx")
    line = one_line("package", str(chain["onnx"]), "--out", str(tmp_path / "bundle"), "--dataset-id", "tester/custody", "--no-wheels")
    assert f"{chain['onnx'] / 'model.onnx'}: changed since export wrote it" in line


def write_stage(out: Path, stage: str = "onnx", body: str = "x") -> None:
    with atomic_dir(out, stage) as tmp:
        (tmp / "model.onnx").write_text(body)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.bin").write_text(body)
        (tmp / META).write_text(json.dumps({"stage": stage}))


def test_a_stage_replaces_its_own_folder_but_never_a_file_the_user_added_there(tmp_path):
    """Point 11: package (or any stage) over a folder it wrote before deleted the README added since."""
    out = tmp_path / "onnx"
    write_stage(out)
    write_stage(out, body="y")  # its own files alone: replaced
    assert (out / "model.onnx").read_text() == "y"
    (out / "sub" / "README.md").write_text("my notes")
    with pytest.raises(Exception, match=r"holds sub/README.md, which the 'onnx' folder's writer did not write"):
        write_stage(out, body="z")
    assert (out / "sub" / "README.md").read_text() == "my notes" and (out / "model.onnx").read_text() == "y"


def test_package_again_keeps_a_file_the_user_added_to_the_bundle(tiny_pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pipeline["bundle"], bundle)
    (bundle / "NOTES.md").write_text("what I submitted")
    line = one_line("package", str(tiny_pipeline["onnx"]), "--out", str(bundle), "--dataset-id", "tester/tiny-bundle", "--no-wheels")
    assert "holds NOTES.md" in line and (bundle / "NOTES.md").is_file()


def test_analyze_again_keeps_a_file_the_user_added_to_the_report(tmp_path):
    out = tmp_path / "report"
    CliRunner().invoke(cli, ["analyze", str(SAMPLE_TRAIN), "--out", str(out)], catch_exceptions=False)
    assert CliRunner().invoke(cli, ["analyze", str(SAMPLE_TRAIN), "--out", str(out)]).exit_code == 0
    (out / "mine.txt").write_text("mine")
    assert "holds mine.txt" in one_line("analyze", str(SAMPLE_TRAIN), "--out", str(out))


def test_a_symlinked_out_is_written_where_it_points(tmp_path):
    """Point 12: the link was renamed to a hidden .NAME.old, the output landed beside it, its target stayed empty."""
    target, link = tmp_path / "disk" / "onnx", tmp_path / "onnx"
    target.mkdir(parents=True)
    link.symlink_to(target)
    write_stage(link)
    write_stage(link, body="y")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "model.onnx").read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "onnx"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["onnx"]  # no temporary or .old folder left
