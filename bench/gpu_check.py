"""One prepared check for a CUDA machine: the whole GPU path with SmolLM2 (a pip wheel: no hub needed) on the shared data,
as a T4 runs it.

    python bench/gpu_check.py [--data ../shared/data/map/train.csv] [--out build/gpu_check] [--sample 0] [--rows 4000]

Trains fold 0 (the whole fold by default) with `--precision fp16` forced (autocast with the gradient scaler, what a T4
runs, even on a GPU with bf16), in a `mapbuild train` process that is killed after its first checkpoint and finished
with `--resume`; merges, exports fp16 and packages. Then times the bundle's runtime (CUDA provider, sorted batches)
against PyTorch fp16 (input order, batch 32) on the same held-out rows, tokenization included; runs the kernel again
with two worker processes sharing the GPU (the 2x T4 path), which must give the same probabilities; counts where each
node of the session ran (from a profile of its first batch: a node without a CUDA kernel runs on the CPU under a
session that says CUDA); and exports a random Llama just over 2 GiB (bench/export_memory.py) whose drift check loads it
on CUDA. Then the torch engine (issue 42): the same merged model exported fp16 for PyTorch (its drift gate refuses
fp16 overflow naming the layer), packaged and run by the kernel on the same rows, against the ONNX fp16 bundle:
rows/s, MAP@3, the largest probability difference and top-3 agreement, and where its layers sat. Prints one JSON
object of figures and writes it to OUT/figures.json. Without CUDA it stops at once with a
one-line message. `--cpu` runs every step on CPU instead (PyTorch in fp32), a smoke test of the script whose figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interrupt(flags: list[str], checkpoints: Path) -> str:
    """Start `mapbuild train`, kill it (SIGKILL, as a lost machine would) once its first checkpoint is written, and
    return that checkpoint's name."""
    proc = subprocess.Popen([sys.executable, "-m", "builder", "train", *flags], start_new_session=True)
    while proc.poll() is None:
        done = sorted(checkpoints.glob("checkpoint-*/trainer_state.json"))  # written last: the checkpoint is whole
        if done:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done[0].parent.name
        time.sleep(0.2)
    sys.exit(f"gpu_check: training ended (exit {proc.returncode}) before its first checkpoint; lower --save-steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "map" / "train.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--rows", type=int, default=4000, help="rows to time that the model never trained on: its fold's, then inputs outside --sample")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sample", type=int, default=0, help="train on about N rows, stratified by label (0: the whole fold)")
    parser.add_argument("--precision", default="fp16", help="training precision (fp16: a T4's; --cpu trains in fp32)")
    parser.add_argument("--big-params-m", type=float, default=560.0, help="millions of parameters of the over-2 GiB export (0: skip it)")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint interval; the first run is killed after one")
    parser.add_argument("--force", action="store_true", help="package the fp16 export even past the drift gate")
    parser.add_argument("--template", help="prompt template (default: the family's); issue 29 compares context against compact")
    parser.add_argument("--pack-tokens", type=int, default=0, help="train a decoder packed (train --pack-tokens); its figures then hold train_rows_per_s packed")
    parser.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device on this machine; run it where `torch.cuda.is_available()` is true")
    if not args.cpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("gpu_check: onnxruntime has no CUDA provider; `pip uninstall -y onnxruntime && pip install onnxruntime-gpu`")
    if not args.data.is_file():
        sys.exit(f"gpu_check: --data {args.data}: file not found")

    import numpy as np
    from transformers import AutoModelForSequenceClassification

    from builder.export import export, held_out_rows
    from runtime.errors import MapbuildError
    from runtime.labels import top3
    from builder.torch_rows import training_rows, whole
    from builder.merge import merge
    from builder.models import load_hf_tokenizer
    from builder.package import package
    from builder.stages import read_meta
    from builder.train import checkpoint_dir
    from runtime.data import labels_of
    from runtime.engine import cpu_fallback, gpu_count, onnx_forward, requested_providers, run_batches, softmax
    from runtime.labels import LabelSpace
    from runtime.manifest import bundle_members, load_manifest
    from runtime.member import MemberSpec
    from runtime.metrics import masked_map3
    from runtime.predict import predict, prompts, run_rows

    out = args.out
    flags = ["--model", args.model, "--data", str(args.data), "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
             "--save-steps", str(args.save_steps), "--out", str(out / "run"), "--precision", "fp32" if args.cpu else args.precision]
    flags += ["--sample", str(args.sample)] if args.sample else []
    flags += (["--template", args.template] if args.template else []) + (["--pack-tokens", str(args.pack_tokens)] if args.pack_tokens else [])
    killed_at = interrupt(flags, checkpoint_dir(out / "run"))
    resumed = subprocess.run([sys.executable, "-m", "builder", "train", *flags, "--resume"])
    if resumed.returncode:
        sys.exit(f"gpu_check: `mapbuild train --resume` failed (exit {resumed.returncode})")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    merge(out / "run", out / "merged")
    drift = export(out / "merged", out / "onnx", "fp16", rows=512, force=args.force)
    package([str(out / "onnx")], out / "bundle", "mapbuild/gpu-check", wheels=False)  # this machine's onnxruntime-gpu runs it

    meta = read_meta(out / "merged", "merged")
    spec = MemberSpec.from_json(meta)
    manifest = load_manifest(out / "bundle")
    space = LabelSpace.from_json(manifest["label_space"])
    rows = held_out_rows(meta, args.rows)
    truth, mask, labels = labels_of(rows).tolist(), space.candidate_mask(rows), np.array(space.labels)
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.float16)
    model = AutoModelForSequenceClassification.from_pretrained(out / "merged", dtype=dtype).to(device).eval()
    tok = load_hf_tokenizer(str(out / "merged"))

    @torch.inference_mode()
    def forward(ids: np.ndarray, attention: np.ndarray) -> np.ndarray:
        logits = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(attention).to(device)).logits
        return logits.float().cpu().numpy()

    start = time.perf_counter()
    split = training_rows(tok, spec, prompts(spec, rows, space))  # (head, tail) for a packed decoder
    ids = whole(spec, split)
    base = softmax(run_batches(forward, ids, spec.pad_token_id, 32, sort=False, dedupe=False, desc=f"torch {dtype}"))
    base_s = time.perf_counter() - start
    start = time.perf_counter()
    probs, used = predict(out / "bundle", manifest, space, rows)
    run_s = time.perf_counter() - start
    start = time.perf_counter()
    two, used_two = predict(out / "bundle", manifest, space, rows, devices=2)  # two workers on the one GPU
    two_s = time.perf_counter() - start
    start = time.perf_counter()
    alone, _ = predict(out / "bundle", manifest, space, rows, pack_tokens=0)  # the same graph, one row a pack
    alone_s = time.perf_counter() - start
    # Did CUDA really engage? The providers asked for against the ones the session got, and where each node ran.
    member = bundle_members(manifest)[0]
    session = onnx_forward(out / "bundle" / member.files["model"], profile_first=True)
    run_rows(session, member, split[:8], 8, member.name)
    asked = [p[0] if isinstance(p, tuple) else p for p in requested_providers(ort.get_available_providers(), gpu_count())]
    big = None
    if args.big_params_m:
        cmd = [sys.executable, str(ROOT / "bench" / "export_memory.py"), "--merged", str(out / "merged"), "--out", str(out / "big"),
               "--params-m", str(args.big_params_m), "--precisions", "fp32", "--rows", "16"]  # fmt: skip
        done = subprocess.run(cmd)
        big = json.loads((out / "big" / "figures.json").read_text()) if done.returncode == 0 else {"exit": done.returncode}
    try:  # the torch engine on the same rows: the winners' engine against ours
        torch_drift = export(out / "merged", out / "torch", "fp16", rows=512, engine="torch", force=args.force)
        package([str(out / "torch")], out / "torch-bundle", "mapbuild/gpu-check-torch", wheels=False)
        start = time.perf_counter()
        by_torch, used_torch = predict(out / "torch-bundle", load_manifest(out / "torch-bundle"), space, rows)
        torch_s = time.perf_counter() - start
        engine = {
            "drift": torch_drift, "members_run": used_torch, "rows_per_s": round(len(rows) / torch_s, 1), "onnx_over_torch": round(torch_s / run_s, 2),
            "map3": masked_map3(truth, by_torch, labels, mask), "max_abs_prob_diff_vs_onnx": float(np.abs(by_torch - probs).max()),
            "top3_agreement_vs_onnx": float((top3(by_torch, mask) == top3(probs, mask)).all(1).mean()),
        }
    except MapbuildError as e:  # an fp16 overflow or a drift refusal is a finding, not a crash
        engine = {"refused": str(e)}
    figures = {
        "killed_after": killed_at,
        "resumed_from": metrics["resumed_from"],
        "providers_requested": asked,
        "provider_session": session.provider,
        "cuda_engaged": session.provider == "CUDAExecutionProvider",
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "hardware": json.loads((out / "run" / "mapbuild.json").read_text())["hardware"],
        "fold_map3": metrics["map3"],
        "train_rows_per_s": metrics["train_rows_per_s"],
        "fp16_drift": drift,
        "rows": len(rows),
        "torch_rows_per_s": round(len(rows) / base_s, 1),
        "runtime_rows_per_s": round(len(rows) / run_s, 1),
        "speedup": round(base_s / run_s, 2),
        "torch_map3": masked_map3(truth, base, labels, mask),
        "runtime_map3": masked_map3(truth, probs, labels, mask),
        "members_run": used,
        "unpacked": {"rows_per_s": round(len(rows) / alone_s, 1), "packed_speedup": round(alone_s / run_s, 2),
                     "max_abs_prob_diff": float(np.abs(alone - probs).max())},
        "two_workers": {"members_run": used_two, "rows_per_s": round(len(rows) / two_s, 1), "max_abs_prob_diff": float(np.abs(two - probs).max())},
        "node_providers": {p: dict(c) for p, c in session.placement.items()},
        "cpu_fallback": cpu_fallback(session.placement) if session.provider == "CUDAExecutionProvider" else None,
        "big_export": big,
        "torch_engine": engine,
        "bundle_mib": round(sum(f.stat().st_size for f in (out / "bundle").rglob("*") if f.is_file()) / 2**20, 1),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
