"""The prepared benchmark scripts: they fail cleanly where they cannot run, and run through on CPU."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, SAMPLE_TRAIN, make_tiny


def test_gpu_check_stops_with_one_line_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run bench/gpu_check.py itself")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr, done.stderr


@pytest.mark.slow
def test_gpu_check_runs_through_on_cpu(tmp_path):
    """Every step of the GPU check but CUDA itself, with a tiny decoder on the sample data."""
    base = make_tiny("llama", tmp_path / "base")
    args = ["--cpu", "--model", str(base), "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "check"), "--rows", "40", "--force",
            "--epochs", "3", "--save-steps", "2", "--big-params-m", "40", "--template", "context", "--pack-tokens", "256"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "check" / "figures.json").read_text())
    assert figures["device"] == "cpu" and figures["hardware"]["precision"] == "fp32"
    run = json.loads((tmp_path / "check" / "run" / "mapbuild.json").read_text())  # trained packed, killed and resumed
    assert (run["config"]["pack_tokens"], run["template"]) == (256, "context") and run["metrics"]["train_tokens_per_row"] > 0
    assert figures["rows"] == 40 and figures["members_run"] and figures["torch_rows_per_s"] > 0 and figures["runtime_rows_per_s"] > 0
    assert figures["providers_requested"] == ["CPUExecutionProvider"] and figures["provider_session"] == "CPUExecutionProvider"
    assert figures["cuda_engaged"] is False
    assert figures["killed_after"].startswith("checkpoint-") and figures["resumed_from"].startswith("checkpoint-")
    assert int(figures["resumed_from"].split("-")[1]) >= int(figures["killed_after"].split("-")[1]) >= 2
    assert figures["fp16_drift"]["rows"] > 0 and (tmp_path / "check" / "bundle" / "manifest.json").is_file()
    assert abs(figures["runtime_map3"] - figures["torch_map3"]) < 0.1  # fp16 ONNX against fp32 PyTorch, same rows
    assert figures["unpacked"]["max_abs_prob_diff"] < 1e-2 and figures["unpacked"]["rows_per_s"] > 0  # same fp16 graph, one row a pack
    two = figures["two_workers"]
    assert two["members_run"] == figures["members_run"] and two["max_abs_prob_diff"] == 0.0 and two["rows_per_s"] > 0
    assert sum(figures["node_providers"]["CPUExecutionProvider"].values()) > 10 and figures["cpu_fallback"] is None
    [big] = figures["big_export"]["exports"]
    assert big["exit"] == 0 and big["drift"]["onnx_provider"] == "CPUExecutionProvider", big


def test_speed_times_both_paths_in_turn_and_compares_the_best_of_each(tiny_pipeline):
    """bench/speed.py on the tiny fp32 bundle: every run of each path printed, the ratio of the best ones, and the
    same MAP@3 for the bundle as for PyTorch fp32 (one model, two engines)."""
    args = ["--bundle", str(tiny_pipeline["bundle"]), "--merged", str(tiny_pipeline["merged"]), "--rows", "40", "--repeat", "2"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    runs = [line for line in lines if line.startswith("run ")]
    assert [r.split(":")[0] for r in runs] == ["run 1", "run 2"]
    rate = lambda line, path: float(line.split(f"{path} ")[1].split(" rows/s")[0])  # noqa: E731
    best = {path: max(rate(r, path) for r in runs) for path in ("baseline", "runtime")}
    [ratio] = [line for line in lines if line.startswith("speed-up")]
    assert abs(float(ratio.split()[1].rstrip("x,")) - best["runtime"] / best["baseline"]) < 0.01  # rates print rounded
    assert abs(float(ratio.split("difference ")[1])) < 0.02


def test_refit_then_pool_transfer_run_through_on_the_sample(tmp_path):
    """bench/refit.py's fold models and refits of two TF-IDF recipes, then bench/pool_transfer.py over them. No
    question of the sample has the 100 out-of-fold rows a pool needs, so the pool must rank as geo does."""
    config = tmp_path / "two.toml"
    config.write_text('dataset_id = "me/two-tfidf"\n' + "".join(f'[[models]]\nname = "{n}"\nkind = "tfidf"\nfolds = 3\nmin_df = 1\nc = {c}\n' for n, c in (("soft", 1.0), ("sharp", 10.0))))
    bench = lambda name, *args: subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    done = bench("refit.py", "--data", str(SAMPLE_TRAIN), "--config", str(config), "--out", str(tmp_path / "refit"))
    assert done.returncode == 0, done.stderr[-2000:]
    cv = tmp_path / "refit" / "cv"
    done = bench("pool_transfer.py", str(cv / "soft"), str(cv / "sharp"), "--data", str(SAMPLE_TRAIN), "--out", str(tmp_path / "transfer"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines() if " geo " in line and " pool " in line}
    assert set(lines) == {"one fold model (fold 0)", "3 fold models, geo mean", "refit on all rows"}, done.stdout
    for line in lines.values():
        geo, pool = float(line.rsplit(" geo ", 1)[1].split()[0]), float(line.rsplit(" pool ", 1)[1].split()[0])
        assert 0 < geo <= 1 and pool == geo, line
    assert len(list((tmp_path / "transfer" / "probs").glob("*.npy"))) == 2 * 4  # each recipe's 3 folds and refit, cached
    other = tmp_path / "other.csv"  # not the data refit.py split: its set-aside rows could be training rows
    other.write_text("".join(SAMPLE_TRAIN.read_text().splitlines(keepends=True)[:200]))
    done = bench("pool_transfer.py", str(cv / "soft"), str(cv / "sharp"), "--data", str(other), "--out", str(tmp_path / "transfer"))
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and f"--data {other}" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_model_over_2_gib_exports_with_its_weights_in_one_data_file(tmp_path):
    """protobuf cannot serialize 2 GiB: `ByteSize()` of the whole model raised there, so every fp32 decoder over
    about 0.5B parameters (fp16 over 1B) crashed at the end of its export. A random Llama of 587M parameters."""
    from builder.merge import merge
    from builder.train import TrainConfig, train

    base = make_tiny("llama", tmp_path / "base")
    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=0.2, lora_r=4), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    (tmp_path / "theirs" / "grown").mkdir(parents=True)  # a folder the script did not grow is never replaced
    args = ["--merged", str(tmp_path / "merged"), "--out", str(tmp_path / "theirs"), "--params-m", "560", "--precisions", "fp32"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "export_memory.py"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "was not grown by this script" in done.stderr and (tmp_path / "theirs" / "grown").is_dir()
    args = ["--merged", str(tmp_path / "merged"), "--out", str(tmp_path / "bench"), "--params-m", "560", "--precisions", "fp32", "--rows", "4"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "export_memory.py"), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "bench" / "figures.json").read_text())
    [fp32] = figures["exports"]
    assert figures["fp32_gib"] > 2.0 and fp32["exit"] == 0, fp32
    assert fp32["files_gib"]["model.onnx.data"] > 2.0 and fp32["files_gib"]["model.onnx"] < 0.01
    assert fp32["drift"]["max_abs_logit_diff"] < 1e-4 and fp32["peak_rss_gib"] > 2.0


@pytest.mark.slow
def test_batch_independence_finds_fp32_scores_independent_of_the_batch(shared_train, tmp_path):
    """bench/batch_independence.py on 64 held-out rows and a 600-row neighbour table: each option's flips between
    batch 1 and the default batch, its speed and MAP@3; fp32 and the int8 export must score every row alike at both
    sizes."""
    args = ["--data", str(shared_train), "--out", str(tmp_path / "bi"), "--rows", "64", "--table-rows", "600", "--options", "int8-dynamic,int8-per-row", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "batch_independence.py"), *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "bi" / "figures.json").read_text())
    assert figures["rows"] == 64 and 0 < figures["table_rows"] <= 600 and figures["batch"] == 64
    assert set(figures["options"]) == {"fp32", "int8-dynamic", "int8-per-row"}
    for o in figures["options"].values():
        assert 0 <= o["top1_flips"] <= o["top3_flips"] <= 64 and o["rows_per_s_default"] > 0 and o["rows_per_s_batch1"] > 0
        assert 0 < o["map3_default"] <= 1 and 0 < o["map3_batch1"] <= 1
    fp32, export_int8 = figures["options"]["fp32"], figures["options"]["int8-per-row"]
    assert fp32["top3_flips"] == 0 and fp32["max_abs_embedding_diff"] < 1e-5 and fp32["speed_vs_fp32_default"] == 1.0
    assert export_int8["top3_flips"] == 0 and export_int8["max_abs_embedding_diff"] < 1e-5
    assert fp32["map3_default"] == fp32["map3_batch1"]
    assert (tmp_path / "bi" / "figures.png").stat().st_size > 10_000


def test_int8_candidates_score_and_time_every_candidate_on_a_classifier(tiny_pipeline, tmp_path):
    """bench/int8_candidates.py on the tiny classifier: `make` exports every candidate once, `time` scores each at
    batch 64 and batch 1 and on single-threaded sessions, under this onnxruntime; fp32 scores every row alike at
    both batch sizes, and so does static int8, whose activation scales were fixed by calibration."""
    bench = [sys.executable, str(ROOT / "bench" / "int8_candidates.py")]
    done = subprocess.run([*bench, "make", "--merged", str(tiny_pipeline["merged"]), "--out", str(tmp_path), "--rows", "40"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*bench, "time", "--out", str(tmp_path), "--threads", "1", "--repeats", "1", "--no-torch"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = tmp_path.glob("time-*.json")
    figures = json.loads(found.read_text())
    assert figures["threads"] == 1 and figures["pytorch_fp32_rows_per_s"] is None
    assert set(figures["candidates"]) == {
        "fp32", "nbits8-b32-acc4", "nbits8-b64-acc4", "nbits8-b128-acc4", "dynamic", "dynamic-s8", "dynamic-s8-rr", "static-qdq", "static-qdq-weights", "static-qop-weights",
    }  # fmt: skip
    for c in figures["candidates"].values():
        assert min(c["rows_per_s_b64"], c["rows_per_s_b1"], c["rows_per_s_b1x"]) > 0 and 0 < c["map3_b64"] <= 1 and 0 <= c["top3_flips_b64_vs_b1"] <= figures["rows"]
    for n in ("fp32", "static-qdq"):
        assert figures["candidates"][n]["top3_flips_b64_vs_b1"] == 0 and figures["candidates"][n]["map3_b64"] == figures["candidates"][n]["map3_b1"], n
