"""A torch member on a base outside the bundle (runtime.base_model, issue 42): the bundle carries the LoRA adapter and
head, the notebook attaches the base as a Kaggle Model, and the kernel checks the base's sha256 before trusting it."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from builder.cli import cli
from builder.export import export
from builder.package import package
from runtime.data import read_rows
from runtime.errors import EnvironmentFault
from runtime.labels import LabelSpace
from runtime.manifest import load_manifest
from runtime.member import TORCH, Member
from runtime.predict import predict
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, rewrite_record, run_kernel
from .test_torch_engine import ENGINES, exported

SOURCE = "tester/tiny-llama/transformers/base/1"  # a Kaggle Model handle: OWNER/MODEL/FRAMEWORK/VARIATION/VERSION
MOUNTED = "tiny-llama/transformers/base/1"  # where Kaggle mounts it under /kaggle/input


@pytest.fixture(scope="module")
def adapter_bundle(merged_family, tmp_path_factory):
    """The tiny Llama's run exported as an fp32 adapter on its base, packaged; and the base attached under an input root."""
    root = merged_family("llama")
    out = tmp_path_factory.mktemp("adapter")
    export(root / "run", out / "member", "fp32", rows=32, engine=TORCH, base_source=SOURCE)
    package([str(out / "member")], out / "bundle", "tester/adapter-bundle", wheels=False)
    shutil.copytree(root / "base", out / "input" / MOUNTED)
    return root, out


def scores(bundle, input_root=None):
    manifest = load_manifest(bundle)
    return predict(bundle, manifest, LabelSpace.from_json(manifest["label_space"]), read_rows(SAMPLE_TEST), **({"input_root": input_root} if input_root else {}))


def test_an_adapter_on_an_attached_base_gives_the_merged_members_probabilities_and_the_bundle_holds_no_base(adapter_bundle, tmp_path):
    root, out = adapter_bundle
    member = out / "member"
    assert sorted(p.name for p in member.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "config.json", "mapbuild.json", "tokenizer.json"]
    assert json.loads((member / "adapter_config.json").read_text())["base_model_name_or_path"] == SOURCE  # not this machine's path
    record = json.loads((member / "mapbuild.json").read_text())
    assert record["base"]["source"] == SOURCE and sorted(record["base"]["files"]) == ["config.json", "model.safetensors"]
    assert record["drift"]["max_abs_logit_diff"] < 1e-4 and record["drift"]["masked_top1_agreement"] == 1.0
    manifest = load_manifest(out / "bundle")
    (m,) = manifest["members"]
    assert m["base"] == record["base"] and sorted(m["files"]) == ["adapter", "adapter_config", "card", "config", "tokenizer"]
    assert not any(f.endswith("model.safetensors") and "adapter" not in f for f in manifest["files"])
    metadata = json.loads((out / "bundle" / "kernel-metadata.json").read_text())
    assert metadata["model_sources"] == [SOURCE] and metadata["dataset_sources"] == ["tester/adapter-bundle"]  # `kernel --push` attaches it
    exported(root, TORCH)
    package([str(root / ENGINES[TORCH])], tmp_path / "merged", "tester/merged-bundle", wheels=False)
    on_base, used = scores(out / "bundle", out / "input")
    merged, _ = scores(tmp_path / "merged")
    assert used == [m["name"]] and np.abs(on_base - merged).max() < 1e-5


def test_a_missing_or_swapped_base_stops_the_run_in_one_line_naming_its_source(adapter_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, out = adapter_bundle
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvironmentFault, match=f"its base model is not attached .*; add {SOURCE} to the notebook's inputs$"):
        scores(out / "bundle", tmp_path / "empty")
    swapped = tmp_path / "swapped" / MOUNTED  # same config, other weights: a fine-tuned sibling, a new version
    shutil.copytree(out / "input" / MOUNTED, swapped)
    weights = load_file(swapped / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, swapped / "model.safetensors")
    with pytest.raises(EnvironmentFault, match=rf"is not the one its adapter was trained on \(model.safetensors: sha256 differs\); attach {SOURCE} as it was"):
        scores(out / "bundle", tmp_path / "swapped")
    # the kernel's own stack, which lacks torch: the base is checked before any member runs or is skipped
    run = run_kernel(out / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "sub.csv"), "--input-root", str(tmp_path / "empty"))
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith(f"add {SOURCE} to the notebook's inputs"), run.stderr[-600:]
    assert not (tmp_path / "sub.csv").exists()  # never a prior that hides a missing model
    run = run_kernel(out / "bundle", "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "sub.csv"), "--input-root", str(out / "input"))
    assert run.returncode == 0 and "SKIPPED member m0-llama-fp32: ImportError: the torch engine needs torch" in run.stderr, run.stderr[-600:]
    assert check_submission(tmp_path / "sub.csv", read_rows(SAMPLE_TEST)["row_id"]) == []


def test_a_base_lacking_a_weight_beyond_the_head_is_refused_when_it_loads(adapter_bundle, tmp_path):
    """Past the hashes (a base named in no record, as load_model sees it): a checkpoint of another shape would
    otherwise load with random layers where its weights are missing."""
    from safetensors.numpy import load_file, save_file

    from runtime.errors import MapbuildError
    from runtime.torch_engine import load_model

    _, out = adapter_bundle
    base = tmp_path / "base"
    shutil.copytree(out / "input" / MOUNTED, base)
    weights = load_file(base / "model.safetensors")
    lost = sorted(k for k in weights if "layers.1." in k)[0]
    save_file({k: v for k, v in weights.items() if k != lost}, base / "model.safetensors")
    assert load_model(out / "member", "fp32", "cpu", out / "input" / MOUNTED) is not None  # the real base loads
    with pytest.raises(MapbuildError, match=f"{base}: lacks .*{lost.split('.', 1)[-1]} and 0 more weights of the model its adapter was trained on"):
        load_model(out / "member", "fp32", "cpu", base)


def test_the_placement_counts_the_bases_parameters_at_the_members_precision(adapter_bundle):
    from transformers import AutoModel

    from runtime.torch_engine import weight_bytes

    root, out = adapter_bundle
    params = sum(p.numel() for p in AutoModel.from_pretrained(root / "base").parameters())
    adapter = (out / "member" / "adapter_model.safetensors").stat().st_size
    assert weight_bytes(out / "member", "fp16", out / "input" / MOUNTED) == 2 * params + adapter
    assert weight_bytes(out / "member", "nf4", out / "input" / MOUNTED) == int(0.5625 * params) + adapter


def test_export_refuses_a_base_source_it_cannot_honour_in_one_line(merged_family, tmp_path):
    root = merged_family("llama")
    refusals = {
        ("--base-source", SOURCE): "--base-source needs --engine torch",
        ("--engine", "torch", "--base-source", "qwen-3/8b"): "",  # a dataset handle: well formed, but a merged folder is no run
        ("--engine", "torch", "--base-source", "a/b/c"): "give a Kaggle Model as OWNER/MODEL/FRAMEWORK/VARIATION/VERSION, or a dataset as OWNER/SLUG",
    }
    for args, said in refusals.items():
        got = CliRunner().invoke(cli, ["export", str(root / "merged"), "--out", str(tmp_path / "x"), "--quantize", "fp32", *args])
        assert got.exit_code == 1 and len(got.output.strip().splitlines()) == 1, got.output
        assert said in got.output and (said or "is a 'merged' folder, expected 'run'" in got.output), got.output
    # a base that changed since the run trained on it: its config edited
    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(root / "run", run)
    shutil.copytree(root / "base", base)
    meta = json.loads((run / "mapbuild.json").read_text())
    meta["base_model"], meta["read"]["base_model"]["path"] = str(base), str(base)
    rewrite_record(run, meta)
    (base / "config.json").write_text((base / "config.json").read_text().replace("{", '{"note": 1,', 1))
    got = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "x"), "--quantize", "fp32", "--engine", "torch", "--base-source", SOURCE])
    assert got.exit_code == 1 and "config.json: changed since train read it; put back the base the run trained on" in got.output, got.output
    assert not (tmp_path / "x").exists()


def test_a_members_base_record_is_checked_before_it_is_trusted():
    digest = "0" * 64
    member = dict(name="m0", files={"card": "c"}, weight=1.0, engine=TORCH, base={"source": SOURCE, "files": {"config.json": digest}})
    assert Member(**member).base["source"] == SOURCE
    for change, said in (
        ({"engine": None}, "base: only a 'torch' member runs on a base outside the bundle"),
        ({"base": {"source": SOURCE, "files": {"model.safetensors": digest}}}, "base: needs files, a sha256 for each file of it, config.json among them"),
        ({"base": {"source": SOURCE, "files": {"config.json": "beef"}}}, "base: needs files, a sha256"),
        ({"base": {"source": SOURCE, "files": {"config.json": digest, "../x": digest}}}, "base: files must name files at the top of its folder"),
        ({"base": {"files": {"config.json": digest}}}, "base: needs source"),
    ):
        with pytest.raises(ValueError, match=said.replace("(", r"\(").replace(")", r"\)")):
            Member(**member | change)


@pytest.mark.slow
def test_verify_runs_an_nf4_adapter_on_its_attached_base_in_the_python_312_twin_with_kaggles_torch(adapter_bundle, merged_family, wheel_folder, tmp_path):
    """The whole notebook in the Python 3.12 twin carrying the image's torch 2.10 (CUDA 12.8 build), transformers
    5.0.0, peft 0.19.1 and accelerate 1.13.0: the bundle's bitsandbytes wheel installed offline (and no onnxruntime,
    which a bundle of torch members alone neither brings nor needs), the base attached where Kaggle mounts the
    Model, the adapter put on its 4-bit weights. A swapped base stops it in one line; a twin without torch skips the
    member loudly, which verify refuses."""
    from builder.verify import verify
    from builder.versions import installed
    from builder.wheels import BITSANDBYTES, fetch_any

    root, out = adapter_bundle
    export(root / "run", tmp_path / "nf4", "nf4", rows=32, engine=TORCH, base_source=SOURCE, force=True)  # a random 2-layer model
    fetch_any(wheel_folder, BITSANDBYTES, installed(BITSANDBYTES))  # from the cache, downloaded once
    package([str(tmp_path / "nf4")], tmp_path / "bundle", "tester/nf4-adapter", find_links=str(wheel_folder))
    assert [w["name"] for w in load_manifest(tmp_path / "bundle")["wheels"]] == [BITSANDBYTES]  # no onnxruntime, as in the image
    rows = tmp_path / "rows.csv"  # unlabelled: a random 2-layer model's MAP@3 against the prior is a coin toss
    read_rows(SAMPLE_TEST).drop(columns=["Category", "Misconception"], errors="ignore").to_csv(rows, index=False)
    result = verify(tmp_path / "bundle", rows, attach=(str(root / "base"),))
    assert result["members_run"] == ["m0-llama-nf4"] and result["map3"] is None, result
    swapped = tmp_path / "swapped" / "base"
    shutil.copytree(root / "base", swapped)
    config = json.loads((swapped / "config.json").read_text())
    (swapped / "config.json").write_text(json.dumps(config | {"rms_norm_eps": config["rms_norm_eps"] * 2}))  # another model
    with pytest.raises(Exception, match=f"the notebook stopped .*: member m0-llama-nf4: its base model is not attached .*; add {SOURCE} to the notebook's inputs$"):
        verify(tmp_path / "bundle", rows, attach=(str(swapped),))
    with pytest.raises(Exception, match="fell back .*: SKIPPED member m0-llama-nf4: ImportError: the torch engine needs torch"):
        verify(tmp_path / "bundle", rows, attach=(str(root / "base"),), torch=False)
