"""The bundle on today's Kaggle image: wheel choice, the environment checks, and the notebook itself in the twins."""

import copy
import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile

import nbformat
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import builder.wheels
from builder.cli import cli
from builder.package import package
from builder.twin import IMAGES, image_env, run_notebook
from builder.wheels import choose, cuda_version, fetch
from runtime.data import InputError, labels_of, read_rows
from runtime.engine import CPU, CUDA, not_engaged, onnx_forward, requested_providers
from runtime.errors import MapbuildError
from runtime.labels import LabelSpace, top3
from runtime.manifest import load_manifest
from runtime.predict import predict
from runtime.preflight import COMPETITION, EnvironmentFault, find_test, onnxruntime_providers
from runtime.submission import check_submission

from .conftest import SAMPLE_TEST, SAMPLE_TRAIN, run_kernel
from .test_cli import assert_one_line_error

LINUX = "manylinux_2_27_x86_64.manylinux_2_28_x86_64"


def fake_ort_wheel(folder, version="1.26.0", python="cp312", platform=LINUX, cuda="12.8", name="onnxruntime_gpu"):
    """A wheel named like onnxruntime's that records a CUDA version the way the real ones do."""
    path = folder / f"{name}-{version}-{python}-{python}-{platform}.whl"
    with zipfile.ZipFile(path, "w") as z:
        info = f"package_name = 'onnxruntime-gpu'\n__version__ = '{version}'\n" + (f"cuda_version = '{cuda}'\n" if cuda else "")
        z.writestr("onnxruntime/capi/build_and_package_info.py", info)
    return path


def test_wheel_choice_reads_python_tag_platform_and_recorded_cuda(tmp_path):
    cu12_312 = fake_ort_wheel(tmp_path)
    cu12_311 = fake_ort_wheel(tmp_path, python="cp311")
    older = fake_ort_wheel(tmp_path, version="1.25.1")
    cu13 = fake_ort_wheel(tmp_path, version="1.31.1", cuda="13.0")
    fake_ort_wheel(tmp_path, version="1.40.0", platform="win_amd64")
    fake_ort_wheel(tmp_path, version="1.40.0", cuda=None)  # a CPU build: no cuda_version
    fake_ort_wheel(tmp_path, version="1.40.0", name="onnxruntime")
    wheels = list(tmp_path.glob("*.whl"))
    assert cuda_version(cu13) == "13.0" and cuda_version(fake_ort_wheel(tmp_path, version="0.1", cuda=None)) is None
    assert choose(wheels, "3.12", 12) == cu12_312  # the newest CUDA 12 build, not 1.25.1, not the CUDA 13 one
    assert choose(wheels, "3.11", 12) == cu12_311 and choose(wheels, "3.12", 13) == cu13
    assert choose(wheels, "3.13", 12) is None and choose([older], "3.12", 13) is None
    with pytest.raises(MapbuildError, match="--python '312'"):
        choose(wheels, "312", 12)


def test_fetch_caches_downloads_and_records_python_and_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPBUILD_CACHE", str(tmp_path / "cache"))
    downloads = []

    def download(python, cuda, dest):  # PyPI stands in: what pip download would leave in the cache
        downloads.append(python)
        fake_ort_wheel(dest, version=builder.wheels.ORT_GPU[cuda], python="cp3" + python.split(".")[1])

    monkeypatch.setattr(builder.wheels, "download", download)
    first = fetch(tmp_path / "a", ("3.11", "3.12"))
    again = fetch(tmp_path / "b", ("3.12",))
    assert downloads == ["3.11", "3.12"] and again == first[1:]
    assert first[1] == {"file": first[1]["file"], "name": "onnxruntime-gpu", "version": "1.26.0", "python": "3.12", "cuda": "12.8"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(e["file"] for e in first)


def test_a_pin_whose_wheel_records_another_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builder.wheels, "download", lambda python, cuda, dest: fake_ort_wheel(dest, cuda="13.0"))
    with pytest.raises(MapbuildError, match=r"^onnxruntime-gpu==1.26.0 from PyPI: no onnxruntime-gpu wheel for CPython 3.12 .* CUDA 12.x$"):
        fetch(tmp_path / "a")


def test_a_folder_without_the_wheel_is_one_line_and_leaves_no_bundle(tiny_pipeline, tmp_path):
    fake_ort_wheel(tmp_path, python="cp311")
    result = CliRunner().invoke(cli, ["package", str(tiny_pipeline["onnx"]), "--out", str(tmp_path / "b"), "--dataset-id", "me/abcdef", "--find-links", str(tmp_path)])
    assert_one_line_error(result, f"--find-links {tmp_path}: no onnxruntime-gpu wheel for CPython 3.12")
    assert not (tmp_path / "b").exists()


def test_requested_providers_and_the_engagement_check():
    assert requested_providers([CUDA, CPU], gpus=2, device_id=1) == [(CUDA, {"device_id": 1}), CPU]
    assert requested_providers([CUDA, CPU], gpus=0) == [CPU]  # onnxruntime-gpu on a CPU machine
    assert requested_providers([CPU], gpus=2) == [CPU]
    assert not_engaged([(CUDA, {"device_id": 0}), CPU], [CUDA, CPU]) is None
    assert "CUDA NOT ENGAGED" in not_engaged([(CUDA, {"device_id": 0}), CPU], [CPU])
    assert not_engaged([CPU], [CPU]) is None


def member(**spec) -> dict:
    return {"name": "m0", "weight": 1.0, "files": {"card": "m0/card.json"}} | spec


def test_preflight_stops_on_a_missing_onnxruntime_or_cuda_provider_where_a_member_runs_on_it(monkeypatch):
    import onnxruntime

    wheel = {"file": "onnxruntime_gpu-1.26.0-cp312-cp312-x.whl", "name": "onnxruntime-gpu", "version": "1.26.0", "python": "3.12"}
    bitsandbytes = {"file": "bitsandbytes-0.50.2-py3-none-x.whl", "name": "bitsandbytes", "version": "0.50.2", "python": "any"}
    onnx = {"members": [member(kind="tfidf"), member(kind="transformer", engine="torch")]}  # TF-IDF's sums are an ONNX graph
    torch_alone = {"members": [member(kind="transformer", engine="torch", precision="nf4")]}
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    assert onnxruntime_providers(onnx, gpus=0) == [CPU]
    with pytest.raises(EnvironmentFault, match=f"1 GPU.* visible but onnxruntime .* has no {CUDA} .*pip uninstall -y onnxruntime"):
        onnxruntime_providers(onnx, gpus=1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    assert onnxruntime_providers(onnx, gpus=1) == [CUDA, CPU]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(EnvironmentFault, match="onnxruntime does not import .*package it again with --wheels"):
        onnxruntime_providers(onnx | {"wheels": [bitsandbytes]}, gpus=0)
    with pytest.raises(EnvironmentFault, match="--find-links BUNDLE/wheels onnxruntime-gpu==1.26.0"):
        onnxruntime_providers(onnx | {"wheels": [bitsandbytes, wheel]}, gpus=0)
    assert onnxruntime_providers(torch_alone | {"wheels": [bitsandbytes]}, gpus=2) == []  # the image's PyTorch runs it


def test_a_session_that_misses_cuda_is_loud_and_replans_at_the_cpu_pace(tiny_pipeline, monkeypatch, caplog):
    """A visible GPU and a CUDA provider that does not engage (here: the CPU build asked for CUDA, as a CUDA
    install without its libraries would do): the loud line, and the next member is planned with CPU seconds."""
    import onnxruntime

    preloaded = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: preloaded.append(1), raising=False)
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        forward = onnx_forward(tiny_pipeline["onnx"] / "model.onnx")
    assert forward.provider == CPU and preloaded == [1] and "CUDA NOT ENGAGED" in caplog.text

    manifest = copy.deepcopy(load_manifest(tiny_pipeline["bundle"]))
    first, second = copy.deepcopy(manifest["members"][0]), copy.deepcopy(manifest["members"][0])
    first.update(name="first", weight=0.7)
    second.update(name="second", weight=0.3)
    manifest["members"] = [first, second]
    rows = manifest["estimate"]["rows"]
    manifest["estimate"]["t4_seconds"] = {"first": 1e-3 * rows, "second": 1e-3 * rows}  # both fit at the T4 pace
    manifest["estimate"]["cpu_seconds"] = {"first": 1e-3 * rows, "second": 1e6 * rows}  # the second not on a CPU
    df = read_rows(SAMPLE_TEST)
    space = LabelSpace.from_json(manifest["label_space"])
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        _, used = predict(tiny_pipeline["bundle"], manifest, space, df, deadline=time.monotonic() + 600)
    assert used == ["first"] and "RE-PLANNED at the CPU pace" in caplog.text and "DROPPED member second" in caplog.text


def test_find_test_takes_the_competition_folder_in_either_layout_and_never_guesses(tmp_path):
    (tmp_path / "datasets" / "me" / "bundle").mkdir(parents=True)
    (tmp_path / "datasets" / "me" / "bundle" / "test.csv").write_text("a stray test.csv in a dataset")
    with pytest.raises(InputError, match=f"no {COMPETITION}/test.csv under"):
        find_test(tmp_path)
    for layout in (tmp_path / COMPETITION, tmp_path / "competitions" / COMPETITION):
        layout.mkdir(parents=True)
        (layout / "test.csv").write_text("row_id\n")
    with pytest.raises(InputError, match="2 competition folders under .*; pass --test"):
        find_test(tmp_path)
    (tmp_path / COMPETITION / "test.csv").unlink()
    assert find_test(tmp_path) == tmp_path / "competitions" / COMPETITION / "test.csv"


def test_a_manifest_that_is_not_an_object_is_skipped_by_the_kernel(tiny_pipeline, tmp_path):
    root = tmp_path / "input"
    (root / "aaa-list").mkdir(parents=True)
    (root / "aaa-list" / "manifest.json").write_text("[]")  # found first: sorted before the bundle
    shutil.copytree(tiny_pipeline["bundle"], root / "datasets" / "tester" / "tiny-bundle")
    (root / "competitions" / COMPETITION).mkdir(parents=True)
    shutil.copy(SAMPLE_TEST, root / "competitions" / COMPETITION / "test.csv")
    done = run_kernel(root / "datasets" / "tester" / "tiny-bundle", "--input-root", str(root), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 0, done.stderr
    bad = run_kernel(tiny_pipeline["bundle"], "--bundle", str(root / "aaa-list"), "--test", str(SAMPLE_TEST), "--out", str(tmp_path / "t.csv"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "format 'list'" in bad.stderr


# The twins: real onnxruntime-gpu wheels (277 MB each, fetched once into the cache; conftest's wheel_folder and
# kaggle_bundle) in clean CPython 3.11 to 3.13.
def assert_model_submission(run, rows_csv):
    assert run.returncode == 0, run.output
    assert run.submission and check_submission(run.submission, read_rows(rows_csv)["row_id"].tolist()) == []
    assert "with m0-bert-fp32" in run.output and "NO MEMBER LEFT" not in run.output and "SKIPPED" not in run.output


@pytest.mark.slow
@pytest.mark.parametrize("image", ["kaggle-2026", "kaggle-2027"])
def test_the_default_bundle_runs_its_notebook_on_python_312_and_313_without_onnxruntime(kaggle_bundle, tmp_path, image):
    """Today's image (3.12) and the one Kaggle moves to next (3.13, Colab's since 2026-08-19): one bundle for both."""
    manifest = load_manifest(kaggle_bundle)
    assert [(w["python"], w["cuda"].split(".")[0]) for w in manifest["wheels"]] == [("3.12", "12"), ("3.13", "12")]
    (tmp_path / "input" / "aaa-list").mkdir(parents=True)
    (tmp_path / "input" / "aaa-list" / "manifest.json").write_text("[]")  # another dataset's JSON, found first
    run = run_notebook(kaggle_bundle, SAMPLE_TEST, tmp_path, image)
    assert_model_submission(run, SAMPLE_TEST)
    frozen = (tmp_path / "python").glob(f"lib/python{IMAGES[image].python}/site-packages/*.dist-info")
    names = {p.name.split("-")[0].lower() for p in frozen}
    assert "onnxruntime_gpu" in names and not names & {"onnxruntime", "torch", "transformers"}  # what the notebook installed


@pytest.mark.slow
def test_verify_scores_the_default_bundle_alike_in_the_312_and_313_twins(kaggle_bundle):
    results = []
    for image in ("kaggle-2026", "kaggle-2027"):
        done = CliRunner().invoke(cli, ["verify", str(kaggle_bundle), "--test", str(SAMPLE_TRAIN), "--image", image, "--json"])
        assert done.exit_code == 0, done.output
        results.append({k: v for k, v in json.loads(done.stdout).items() if k != "seconds"})
    assert results[1] == {**results[0], "image": "kaggle-2027"} and results[0]["map3"] > results[0]["prior_map3"]


@pytest.mark.slow
def test_modules_at_the_bundle_root_never_shadow_installed_ones(kaggle_bundle, tmp_path):
    """Before: the runtime ran with the bundle's root first on sys.path, so a stray tqdm.py there ran."""
    bundle = tmp_path / "bundle"
    shutil.copytree(kaggle_bundle, bundle)
    for module in ("tqdm.py", "numpy.py", "onnxruntime/__init__.py"):
        (bundle / module).parent.mkdir(exist_ok=True)
        (bundle / module).write_text("raise SystemExit('shadowed')")
    run = run_notebook(bundle, SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert_model_submission(run, SAMPLE_TEST)


@pytest.mark.slow
def test_the_notebook_refuses_edited_runtime_code(kaggle_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(kaggle_bundle, bundle)
    (bundle / "runtime" / "labels.py").write_text("# edited after packaging\n")
    run = run_notebook(bundle, SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert run.returncode == 1 and run.submission is None
    assert run.last_line.startswith("mapbuild: runtime/labels.py differs from the manifest's sha256")


PLANTED = """
import importlib._bootstrap_external as bx, os, sys
source = sys.argv[1]
st = os.stat(source)
code = compile("raise SystemExit('the planted .pyc ran')", source, "exec")
pyc = bx.cache_from_source(source)
os.makedirs(os.path.dirname(pyc), exist_ok=True)
open(pyc, "wb").write(bx._code_to_timestamp_pyc(code, st.st_mtime, st.st_size))
"""


@pytest.mark.slow
def test_the_notebook_runs_the_checked_sources_not_a_pyc_beside_them(kaggle_bundle, tmp_path):
    """A __pycache__ no hash covers, valid for the source's mtime and size (what running the runtime inside the
    bundle before upload leaves): before, Python imported it in place of runtime/labels.py."""
    bundle = tmp_path / "bundle"
    shutil.copytree(kaggle_bundle, bundle)
    planted = tmp_path / "plant.py"
    planted.write_text(PLANTED)
    python = image_env("kaggle-2026") / "bin" / "python"
    subprocess.run([str(python), str(planted), str(bundle / "runtime" / "labels.py")], check=True)
    assert list((bundle / "runtime" / "__pycache__").glob("labels.cpython-312.pyc"))
    run = run_notebook(bundle, SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert_model_submission(run, SAMPLE_TEST)
    assert "planted" not in run.output


@pytest.mark.slow
def test_two_attached_versions_of_the_bundle_stop_the_notebook_naming_both(kaggle_bundle, tmp_path):
    """Before: sort order picked one."""
    twin = tmp_path / "twin"
    shutil.copytree(kaggle_bundle, twin / "input" / "aaa-old-version")
    run = run_notebook(kaggle_bundle, SAMPLE_TEST, twin, "kaggle-2026")
    assert run.returncode == 1 and run.submission is None
    assert run.last_line.startswith("mapbuild: dataset tester/tiny-bundle is attached 2 times (") and "aaa-old-version" in run.last_line


@pytest.mark.slow
def test_the_twin_runs_cells_in_a_jupyter_kernel_as_kaggle_does(kaggle_bundle, tmp_path):
    """Before, the twin joined the code cells into a script, where `__file__` exists and a SystemExit is an exit
    code: a notebook that only worked as a script passed. In a kernel, a cell's exception stops the run, and later
    cells never run."""
    bundle = tmp_path / "bundle"
    shutil.copytree(kaggle_bundle, bundle)
    nb = nbformat.read(bundle / "submit.ipynb", as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell("import os\nprint('kernel', type(get_ipython()).__name__)\nhere = os.path.dirname(__file__)"))
    nb.cells.append(nbformat.v4.new_code_cell("open('after.txt', 'w').write('ran')"))
    nbformat.write(nb, bundle / "submit.ipynb")
    run = run_notebook(bundle, SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert run.returncode == 1 and run.error == "NameError: name '__file__' is not defined" and run.last_line == run.error
    assert "kernel ZMQInteractiveShell" in run.output and run.submission is None and not (tmp_path / "twin" / "working" / "after.txt").exists()


@pytest.mark.slow
def test_a_kernel_that_dies_fails_the_run_at_once(kaggle_bundle, tmp_path):
    """Before: with jupyter_client's sync KernelManager, nbclient never saw the kernel die and waited out the
    cell's 1800 s."""
    bundle = tmp_path / "bundle"
    shutil.copytree(kaggle_bundle, bundle)
    nb = nbformat.read(bundle / "submit.ipynb", as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell("import os\nos._exit(9)  # as the OOM killer would"))
    nbformat.write(nb, bundle / "submit.ipynb")
    run = run_notebook(bundle, SAMPLE_TEST, tmp_path / "twin", "kaggle-2026")
    assert run.returncode == 1 and run.submission is None and run.error.startswith("the kernel died: ") and run.seconds < 120


@pytest.mark.slow
def test_no_wheel_for_the_interpreter_stops_the_notebook_in_one_line(kaggle_bundle, tmp_path):
    run = run_notebook(kaggle_bundle, SAMPLE_TEST, tmp_path, "kaggle-2025")
    assert run.returncode == 1 and run.submission is None
    assert run.last_line == (
        "mapbuild: the bundle has no onnxruntime-gpu wheel for Python 3.11 (it holds "
        f"{', '.join(w['file'] for w in load_manifest(kaggle_bundle)['wheels'])}); package it again with --python 3.11"
    )


@pytest.mark.slow
def test_the_older_image_runs_a_bundle_that_brings_its_wheel_in_the_flat_layout(tiny_pipeline, wheel_folder, tmp_path):
    package([str(tiny_pipeline["onnx"])], tmp_path / "bundle", "tester/tiny-bundle", find_links=str(wheel_folder), pythons=("3.11", "3.12"))
    run = run_notebook(tmp_path / "bundle", SAMPLE_TRAIN, tmp_path / "twin", "kaggle-2025", layout="flat")
    assert_model_submission(run, SAMPLE_TRAIN)


@pytest.mark.slow
def test_the_runtime_without_onnxruntime_stops_instead_of_predicting_the_prior(tiny_pipeline, tmp_path):
    out = tmp_path / "submission.csv"
    python = image_env("kaggle-2026") / "bin" / "python"  # the clean twin: no onnxruntime
    done = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out), "--devices", "1", python=python)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines()[-1].startswith("error: onnxruntime does not import") and "--wheels" in done.stderr


@pytest.mark.slow
def test_verify_fails_a_bundle_without_wheels_naming_the_flag(tiny_pipeline):
    result = CliRunner().invoke(cli, ["verify", str(tiny_pipeline["bundle"])])
    assert_one_line_error(result, "the notebook stopped in the kaggle-2026 twin", "onnxruntime does not import", "--wheels")


@pytest.mark.slow
def test_verify_scores_labelled_rows_and_refuses_a_bundle_below_the_label_prior(kaggle_bundle, tmp_path):
    ok = CliRunner().invoke(cli, ["verify", str(kaggle_bundle), "--test", str(SAMPLE_TRAIN)])
    assert ok.exit_code == 0 and "in the kaggle-2026 twin" in ok.output and "label prior" in ok.output, ok.output
    # Relabel every row with the prior's own first choice: the prior scores 1.0, and the model, which ranks some
    # rows otherwise (checked first), falls below it.
    manifest = load_manifest(kaggle_bundle)
    space = LabelSpace.from_json(manifest["label_space"])
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    favourite = np.array(space.labels)[top3(space.prior(len(df)), space.candidate_mask(df))[:, 0]]
    done = run_kernel(kaggle_bundle, "--bundle", ".", "--test", str(SAMPLE_TRAIN), "--out", str(tmp_path / "model.csv"))
    assert done.returncode == 0, done.stderr
    model_first = pd.read_csv(tmp_path / "model.csv", dtype=str)["Category:Misconception"].str.split(" ").str[0].tolist()
    assert len(model_first) == len(df) and model_first != favourite.tolist()
    df["Category"], df["Misconception"] = zip(*(label.split(":") for label in favourite))
    assert (labels_of(df) == favourite).all()
    df.to_csv(tmp_path / "prior_labels.csv", index=False)
    refused = CliRunner().invoke(cli, ["verify", str(kaggle_bundle), "--test", str(tmp_path / "prior_labels.csv")])
    assert_one_line_error(refused, "is below the label prior's 1.0000")


@pytest.mark.slow
def test_verify_without_test_checks_a_real_data_bundle_on_the_sample_rows_unscored(shared_train, tiny_bert, wheel_folder, tmp_path):
    """The embedded sample's questions are invented: a bundle of the real data is not judged by them (it once
    failed every real bundle, "MAP@3 0.1562 below the label prior's 0.2708"), but its notebook still runs them."""
    from builder.export import export
    from builder.merge import merge
    from builder.train import TrainConfig, train
    from builder.verify import probe_rows

    train(TrainConfig(model=str(tiny_bert), data=str(shared_train), sample=300, epochs=1, lora_r=2), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", force=True)  # a random tiny model may fail the drift gate
    package([str(tmp_path / "onnx")], tmp_path / "bundle", "tester/real-data-bundle", find_links=str(wheel_folder))
    done = CliRunner().invoke(cli, ["verify", str(tmp_path / "bundle")])
    assert done.exit_code == 0, done.output
    probes = probe_rows(load_manifest(tmp_path / "bundle"), read_rows(SAMPLE_TEST))
    assert set(probes["QuestionId"]) == set(read_rows(shared_train)["QuestionId"])  # every question the bundle knows
    assert f"unscored (the embedded sample's questions are not this bundle's, so it ran {len(probes)} probe rows" in done.output
    assert f"{len(probes)} rows" in done.output and "MAP@3" not in done.output
    as_json = json.loads(CliRunner().invoke(cli, ["verify", str(tmp_path / "bundle"), "--json"]).stdout)
    assert as_json["rows"] == len(probes) and as_json["map3"] is None and as_json["unscored"].startswith("the embedded sample's")


def test_kaggle_client_slug_rules_are_ours(monkeypatch, tmp_path):
    """check_dataset_id agrees with the kaggle client's own validation on ids it must refuse or accept."""
    from builder.package import check_dataset_id, kernel_slug

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()

    def client_accepts(dataset_id):
        owner, _, slug = dataset_id.partition("/")
        try:
            api._validate_slug_syntax(owner, allow_underscore=True)
            api._validate_slug_syntax(slug)
        except ValueError:
            return False
        return 6 <= len(slug) <= 50

    def ours_accepts(dataset_id):
        try:
            check_dataset_id(dataset_id)
        except MapbuildError:
            return False
        return True

    ids = ["me/abcdef", "me/ab--cdef", "me/-abcdef", "me/abcdef-", "me/ABCDEF", "me/ab_cdef", "my_name/abcdef", "_me/abcdef",
           "me/abcde", "me/" + "a" * 50, "me/" + "a" * 51, "me/" + "a-" * 24 + "b"]
    assert [ours_accepts(i) for i in ids] == [client_accepts(i) for i in ids]
    assert [ours_accepts(i) for i in ids[:2]] == [True, False]
    for slug in ("abcdef", "a" * 49, "a" * 42 + "-b" * 3, "a" * 50):
        kernel = kernel_slug(slug)
        api._validate_slug_syntax(kernel)
        assert len(kernel) <= 50 and kernel.endswith("-submit")
