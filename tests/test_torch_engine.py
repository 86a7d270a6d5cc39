"""The torch engine (runtime.torch_engine): a transformer member run by PyTorch in the kernel, against the ONNX engine
on the same rows, and through export, package and the kernel (issue 42)."""

import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from builder.export import export
from builder.folds import across_questions
from builder.stages import StageMeta
from runtime.data import read_rows
from runtime.engine import CPU
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace
from runtime.member import TORCH, Member
from runtime.predict import onnx_outputs, prompts, torch_outputs
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, run_kernel

ENGINES = {"onnx": "onnx-fp32", TORCH: "torch-fp32"}  # engine -> its fp32 export in a merged_family folder


def exported(root, engine: str) -> Member:
    """The family's fp32 export for `engine`, as a bundle member whose files are paths under `root`."""
    folder = root / ENGINES[engine]
    if not folder.exists():
        export(root / "merged", folder, "fp32", rows=32, engine=engine)
    record = StageMeta.from_json(json.loads((folder / "mapbuild.json").read_text()))
    roles = {"model": "model.safetensors", "config": "config.json"} if engine == TORCH else {"model": "model.onnx"}
    files = {role: f"{folder.name}/{f}" for role, f in (roles | {"tokenizer": "tokenizer.json"}).items()}
    return Member(**record.spec(), name=f"m0-{engine}", files=files, weight=1.0)


def top3(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :3]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_the_torch_engine_gives_the_onnx_engines_top3_on_300_real_rows_packed_and_unpacked(merged_family, shared_train, model_type):
    root = merged_family(model_type)
    onnx, torch = exported(root, "onnx"), exported(root, TORCH)
    assert torch.engine == TORCH and torch.drift["torch_provider"] == CPU and torch.drift["max_abs_logit_diff"] < 1e-4
    df = across_questions(read_rows(shared_train, labelled=True), 300, seed=0)
    texts = prompts(onnx, df, LabelSpace.from_json(json.loads((root / "merged" / "mapbuild.json").read_text())["label_space"]))
    for pack_tokens in (None, 0):  # the member's own packs (512 tokens), then one row a pack
        by_onnx, _ = onnx_outputs(root, replace(onnx, pack_tokens=pack_tokens), texts, 16)
        by_torch, provider = torch_outputs(root, replace(torch, pack_tokens=pack_tokens), texts, 16)
        assert provider == CPU and by_torch.shape == by_onnx.shape == (300, by_onnx.shape[1])
        assert np.abs(by_torch - by_onnx).max() < 1e-4, (model_type, pack_tokens)
        assert (top3(by_torch) == top3(by_onnx)).all(), (model_type, pack_tokens)


def test_a_torch_member_travels_through_package_to_the_kernel_and_a_kernel_without_torch_skips_it_loudly(merged_family, tmp_path):
    from builder.package import package
    from runtime.manifest import load_manifest
    from runtime.predict import predict

    root = merged_family("llama")
    exported(root, TORCH), exported(root, "onnx")
    scores = {}
    for engine, folder in ENGINES.items():
        package([str(root / folder)], tmp_path / engine, f"tester/{engine}-bundle", wheels=False)
        manifest = load_manifest(tmp_path / engine)
        df = read_rows(SAMPLE_TEST)
        scores[engine], used = predict(tmp_path / engine, manifest, LabelSpace.from_json(manifest["label_space"]), df)
        assert used == [manifest["members"][0]["name"]]
    (member,) = manifest["members"]
    assert member["engine"] == TORCH and sorted(member["files"]) == ["card", "config", "model", "tokenizer"]
    assert member["files"]["model"].endswith("/model.safetensors") and member["precision"] == "fp32"
    assert np.abs(scores[TORCH] - scores["onnx"]).max() < 1e-5  # probabilities, through the bundle's own files
    out = tmp_path / "submission.csv"
    run = run_kernel(tmp_path / TORCH, "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out))  # the kernel's stack: no torch
    assert run.returncode == 0, run.stderr[-800:]
    skipped = f"SKIPPED member {member['name']}: ImportError: the torch engine needs torch and transformers"
    assert skipped in run.stderr and "NO MEMBER LEFT" in run.stderr, run.stderr[-800:]
    assert check_submission(out, read_rows(SAMPLE_TEST)["row_id"]) == []


def test_a_bundle_of_torch_members_alone_brings_no_onnxruntime_wheel_and_is_kaggle_ready(merged_family, tmp_path):
    """Kaggle's image has PyTorch and no onnxruntime: a bundle whose members all run on the image's PyTorch brings no
    onnxruntime-gpu wheel (277 MB a CPython) and its preflight asks for none. Before, package fetched one for any
    bundle, and the notebook stopped without it. From an empty wheel folder, the ONNX member's bundle is refused."""
    from click.testing import CliRunner

    from builder.cli import cli

    root = merged_family("llama")
    exported(root, TORCH), exported(root, "onnx")
    empty = tmp_path / "wheels"
    empty.mkdir()
    args = lambda engine: ["package", str(root / ENGINES[engine]), "--out", str(tmp_path / engine), "--dataset-id", f"tester/{engine}-bundle", "--find-links", str(empty)]  # noqa: E731
    ok = CliRunner().invoke(cli, args(TORCH))
    assert ok.exit_code == 0 and ok.output.strip().splitlines()[-1] == "Kaggle-ready: its members run on the image's own PyTorch", ok.output
    assert json.loads((tmp_path / TORCH / "manifest.json").read_text())["wheels"] == [] and not (tmp_path / TORCH / "wheels").exists()
    refused = CliRunner().invoke(cli, args("onnx"))
    assert refused.exit_code != 0 and "no onnxruntime-gpu wheel for CPython 3.12" in refused.output and not (tmp_path / "onnx").exists()


GIB = 2**30
T4 = 15 * GIB  # Kaggle's T4, as its kernel's nvidia-smi gives it


def test_placement_puts_a_copy_on_each_t4_when_one_fits_else_splits_one_else_refuses_in_one_line():
    from runtime.errors import MapbuildError
    from runtime.torch_engine import place

    batch = GIB  # a batch's activations
    assert place(int(4.5e9), batch, [T4, T4]).copies == 2  # a 2B in fp16
    split = place(int(16.4e9), batch, [T4, T4])  # Qwen3-8B in fp16: over one T4
    assert split.copies == 0 and sorted(split.max_memory) == [0, 1] and sum(split.max_memory.values()) >= 16.4e9
    assert all(room < 16.4e9 for room in split.max_memory.values())
    assert place(int(4.5e9), batch, []).describe() == "the CPU"
    for weights, gpus in ((16.4e9, [T4]), (29e9, [T4, T4])):  # 8B on one T4; Qwen3-14B in fp16 on two
        with pytest.raises(MapbuildError, match=r"^\d+\.\d GiB of weights and 1\.0 GiB of activations a batch fit neither one of") as e:
            place(int(weights), batch, gpus)
        assert "\n" not in str(e.value)


def test_a_device_map_reads_in_one_line_with_layers_as_ranges():
    from runtime.torch_engine import describe_map

    layers = {f"model.layers.{i}": 0 if i < 14 else 1 for i in range(28)}
    device_map = {"model.embed_tokens": 0, **layers, "model.norm": 1, "score": 1}
    assert describe_map(device_map) == "0: model.embed_tokens, model.layers.0-13; 1: model.layers.14-27, model.norm, score"


def packed_and_padded(root, member: Member, forward) -> dict:
    """The member's logits over the sample's rows through `forward`, in its own packs and unpacked."""
    from runtime.predict import kernel_rows, run_rows

    texts = prompts(member, read_rows(SAMPLE_TRAIN, labelled=True), LabelSpace.from_json(json.loads((root / "merged" / "mapbuild.json").read_text())["label_space"]))
    out = {}
    for pack_tokens in (None, 0):
        spec = replace(member, pack_tokens=pack_tokens)
        out[pack_tokens] = run_rows(forward, spec, kernel_rows(root / member.files["tokenizer"], spec, texts), 8, "test")
    return out


@pytest.mark.parametrize("model_type", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_a_member_split_in_two_parts_hands_its_hidden_states_over_and_gives_the_one_part_logits(merged_family, tmp_path, model_type):
    """The kernel's split placement on a CPU: the device map the kernel computes for two GPUs (split_map), its part
    on GPU 1 put on "disk" instead, so accelerate's hooks run the model in two parts (transformers installs none on a
    single device): part two's weights stay on disk until its turn, its inputs (hidden states, positions, the packed
    masks) handed to it by the hooks, as they are handed from cuda:0 to cuda:1 on a T4 pair."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from runtime.torch_engine import model_forward, split_map, torch_forward

    root = merged_family(model_type)
    member = exported(root, TORCH)
    folder = root / ENGINES[TORCH]
    weights = (folder / "model.safetensors").stat().st_size
    device_map = split_map(folder, "float32", {0: int(weights * 0.9), 1: weights})  # GPU 0 cannot hold all of it
    assert set(device_map.values()) == {0, 1}, device_map
    twin = {name: "cpu" if device == 0 else "disk" for name, device in device_map.items()}
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, device_map=twin, offload_folder=tmp_path / "offload").eval()
    second = [model.get_submodule(name) for name, device in device_map.items() if device == 1]
    assert all(hasattr(m, "_hf_hook") for m in second)
    assert {p.device.type for m in second for p in m.parameters()} == {"meta"}  # on disk, loaded by the hooks in turn
    handed = []
    second[0].register_forward_pre_hook(lambda module, args, kwargs: handed.append(args[0] if args else next(iter(kwargs.values()))), with_kwargs=True)
    split = packed_and_padded(root, member, model_forward(model))
    whole = packed_and_padded(root, member, torch_forward(folder, "fp32"))
    assert handed and all(torch.isfinite(h).all() for h in handed if torch.is_tensor(h))
    for pack_tokens in whole:
        assert np.abs(split[pack_tokens] - whole[pack_tokens]).max() < 1e-5, (model_type, pack_tokens)
        assert (top3(split[pack_tokens]) == top3(whole[pack_tokens])).all()


def test_two_torch_copies_in_worker_processes_give_the_one_copys_logits(merged_family, monkeypatch, caplog):
    """placed_forward where a copy fits each GPU: a DevicePool of two torch workers (on the CPU here, two T4s of
    free memory pretended), the rows split over them by whole batches."""
    import logging

    import runtime.torch_engine as torch_engine

    root = merged_family("llama")
    member = exported(root, TORCH)
    folder = root / ENGINES[TORCH]
    whole = packed_and_padded(root, member, torch_engine.torch_forward(folder, "fp32"))
    monkeypatch.setattr(torch_engine, "gpu_memory", lambda: [T4, T4])
    caplog.clear()  # the one copy's line
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        pool = torch_engine.placed_forward(folder, "fp32", tokens=8 * 300, packs=8, span=300)
        try:
            assert pool.workers == 2 and "2 whole copies, one per GPU" in caplog.text
            pooled = packed_and_padded(root, member, pool)
        finally:
            pool.shutdown()
    assert pool.provider == CPU and caplog.text.count(f"{folder}: PyTorch float32 on cpu") == 2  # each worker's line
    for pack_tokens in whole:
        assert np.array_equal(pooled[pack_tokens], whole[pack_tokens])


def test_build_runs_a_config_whose_member_has_engine_torch_through_to_a_submission(tmp_path):
    """`engine = "torch"` in a [[models]] table: train, merge, export for the torch engine, package, and the kernel
    (this Python, which has torch) runs it: the member is used, not skipped, and the submission is valid."""
    from .conftest import make_tiny
    from .test_cli import invoke

    base = make_tiny("llama", tmp_path / "base")
    config = tmp_path / "build.toml"
    config.write_text(
        f'dataset_id = "me/tiny-torch"\ntest = "{SAMPLE_TEST}"\nwheels = false\n'
        f'[[models]]\nname = "tiny"\nmodel = "{base}"\ndata = "{SAMPLE_TRAIN}"\nepochs = 1\nlora_r = 2\nquantize = "fp32"\nengine = "torch"\n'
    )
    result = invoke("build", str(config), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "== tiny, fold 0: export fp32 for torch" in result.output
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    (member,) = manifest["members"]
    assert member["engine"] == TORCH and member["files"]["model"].endswith("model.safetensors")
    assert check_submission(tmp_path / "out" / "submission.csv", read_rows(SAMPLE_TEST)["row_id"]) == []
    from runtime.manifest import load_manifest
    from runtime.predict import predict

    bundle = tmp_path / "out" / "bundle"
    _, used = predict(bundle, load_manifest(bundle), LabelSpace.from_json(manifest["label_space"]), read_rows(SAMPLE_TEST))
    assert used == [member["name"]]  # run by the torch engine, not skipped for the prior
    again = invoke("build", str(config), "--out", str(tmp_path / "out"))  # the finished fold is kept, engine and all
    assert again.exit_code == 0 and "== tiny, fold 0: done before, kept" in again.output
    config.write_text(config.read_text().replace('engine = "torch"', 'engine = "onnx"'))
    changed = invoke("build", str(config), "--out", str(tmp_path / "out"))
    assert changed.exit_code == 1 and "exported for torch, but the config now asks engine = 'onnx'" in changed.output


def test_an_nf4_member_is_a_quarter_of_fp16_runs_packed_like_the_others_and_a_kernel_without_bitsandbytes_skips_it(merged_family, tmp_path, monkeypatch, caplog):
    """bitsandbytes' 4-bit NormalFloat on the torch engine: quantized at export (on this CPU), gated against
    PyTorch fp32 like every export, its 4-bit weights reloaded by the kernel. Kaggle's image has no bitsandbytes
    and the bundle does not bring it yet: such a kernel skips the member in one line."""
    import logging
    import sys

    from builder.package import package
    from runtime.manifest import load_manifest
    from runtime.predict import predict

    root = merged_family("llama")
    nf4_member(root)
    export(root / "merged", root / "torch-fp16", "fp16", rows=32, engine=TORCH)
    record = json.loads((root / "torch-nf4" / "mapbuild.json").read_text())
    assert record["engine"] == TORCH and record["precision"] == "nf4" and record["drift"]["torch_provider"] == CPU
    assert 0 < record["drift"]["max_abs_logit_diff"] < 1  # rounded, not broken
    config = json.loads((root / "torch-nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    nf4, fp16 = ((root / f"torch-{p}" / "model.safetensors").stat().st_size for p in ("nf4", "fp16"))
    assert nf4 < fp16  # the tiny model's embedding and head stay 16-bit, so well under half, not a quarter
    package([str(root / "torch-nf4")], tmp_path / "b", "tester/nf4-bundle", wheels=False)
    manifest = load_manifest(tmp_path / "b")
    space, df = LabelSpace.from_json(manifest["label_space"]), read_rows(SAMPLE_TEST)
    scores, used = predict(tmp_path / "b", manifest, space, df)
    assert used == [manifest["members"][0]["name"]] and np.isfinite(scores).all()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    with caplog.at_level(logging.ERROR, logger="mapbuild"):
        _, used = predict(tmp_path / "b", manifest, space, df)
    assert used == [] and "ImportError: an nf4 member needs bitsandbytes, which Kaggle's image lacks and this bundle does not bring" in caplog.text


def nf4_member(root):
    """The family's nf4 torch export (forced: a random tiny model's MAP@3 moves past the gate under 4-bit rounding)."""
    if not (root / "torch-nf4").exists():
        export(root / "merged", root / "torch-nf4", "nf4", rows=32, engine=TORCH, force=True)
    return root / "torch-nf4"


def test_a_bundle_with_an_nf4_member_brings_the_bitsandbytes_wheel_that_quantized_it(merged_family, tmp_path):
    """Kaggle's image has no bitsandbytes: the bundle brings the one wheel, for every CPython, of the version
    installed here (and no onnxruntime, which no member runs on); a bundle of fp32 torch members brings no wheel at
    all, and a folder without bitsandbytes is a one-line error."""
    from importlib.metadata import version

    from builder.package import package
    from builder.wheels import BITSANDBYTES

    from .test_kaggle_image import fake_ort_wheel

    root = merged_family("llama")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for python in ("cp312", "cp313"):
        fake_ort_wheel(wheels, python=python)
    ours = version(BITSANDBYTES)
    with pytest.raises(MapbuildError, match=rf"^--find-links {wheels}: no bitsandbytes {ours} wheel for CPython 3 on x86-64 Linux$"):
        package([str(nf4_member(root))], tmp_path / "refused", "tester/nf4-bundle", find_links=str(wheels))
    assert not (tmp_path / "refused").exists()
    for name in (f"bitsandbytes-0.0.1-py3-none-manylinux_2_24_x86_64.whl", f"bitsandbytes-{ours}-py3-none-macosx_14_0_arm64.whl", f"bitsandbytes-{ours}-py3-none-manylinux_2_24_x86_64.whl"):
        zipfile.ZipFile(wheels / name, "w").close()
    manifest = package([str(nf4_member(root))], tmp_path / "nf4", "tester/nf4-bundle", find_links=str(wheels))
    assert [(w["name"], w["python"]) for w in manifest["wheels"]] == [(BITSANDBYTES, "any")]  # onnxruntime's in the folder, not needed
    assert manifest["wheels"][-1]["file"] == f"bitsandbytes-{ours}-py3-none-manylinux_2_24_x86_64.whl"
    assert (tmp_path / "nf4" / "wheels" / manifest["wheels"][-1]["file"]).is_file() and manifest["versions"][BITSANDBYTES] == ours
    exported(root, TORCH)
    plain = package([str(root / ENGINES[TORCH])], tmp_path / "fp32", "tester/fp32-bundle", find_links=str(wheels))
    assert plain["wheels"] == []


@pytest.mark.slow
def test_the_notebook_installs_the_bundles_bitsandbytes_offline_in_the_kaggle_twin(merged_family, wheel_folder, tmp_path):
    """The real bitsandbytes wheel, installed by submit.ipynb with pip --no-index in the Python 3.12 twin, which
    carries the image's torch for a torch member: the nf4 member runs on it, no fallback."""
    from builder.package import package
    from builder.twin import run_notebook
    from builder.versions import installed
    from builder.wheels import BITSANDBYTES, fetch_any

    fetch_any(wheel_folder, BITSANDBYTES, installed(BITSANDBYTES))  # from the cache, downloaded once
    package([str(nf4_member(merged_family("llama")))], tmp_path / "bundle", "tester/nf4-bundle", find_links=str(wheel_folder))
    run = run_notebook(tmp_path / "bundle", SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert "pip could not install" not in run.output and run.returncode == 0, run.output[-1500:]
    assert run.result["members_run"] == ["m0-llama-nf4"] and run.result["faults"] == [] and run.submission, run.output[-1500:]
