"""Issue 43: int8 candidates for a fine-tuned classifier on the CPU, each against the fused fp32 graph and PyTorch fp32
on the same held-out rows, with its rows/s at batch 64 and batch 1, its MAP@3, and its top-3 flips between the two.

    python bench/int8_candidates.py make --merged RUN/merged --out /tmp/int8 [--rows 2000]     # the builder's venv
    python bench/int8_candidates.py time --out /tmp/int8 [--threads 2] [--repeats 2]            # any venv with onnxruntime

`make` exports the fused fp32 graph (builder.export.write_onnx, as `export --quantize fp32` does) and the unfused one,
quantizes each candidate from one of them, and stores the held-out rows' kernel token ids, labels and masks
(builder.export.held_out_rows). Static candidates are calibrated on CALIBRATION of the run's training rows.
`time` needs only the runtime and onnxruntime, so the same models run under each onnxruntime version (a venv each);
where torch and transformers import it also times PyTorch fp32 as bench/speed.py does (input order, batch 32), in
the same run. Speeds are best of --repeats passes taken round robin; ratios are against the same run's baselines.
Writes OUT/time-ORTVERSION.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.engine import SessionThreads, onnx_forward, run_batches
from runtime.metrics import masked_map3


CALIBRATION = 256  # training rows a static candidate's activation ranges are taken on, each alone


@dataclass
class Sources:
    """What a candidate is made from: the fused fp32 graph, the unfused one, and the calibration rows' token ids."""

    fused: Path
    plain: Path
    calibration: list[list[int]]


def nbits(block: int, level: int):
    def make(src: Sources, out: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(str(src.fused), bits=8, block_size=block, is_symmetric=True, accuracy_level=level)
        q.process()
        onnx.save_model(q.model.model, str(out))

    return make


def dynamic(signed: bool, reduce_range: bool = False):
    """quantize_dynamic: one activation scale per batch tensor (batch-dependent but at batch 1, where a row is alone),
    weights per channel, u8 (what --quantize int8 wrote before issue 28) or s8 (u8 x s8: the VNNI path on x86)."""

    def make(src: Sources, out: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weights = QuantType.QInt8 if signed else QuantType.QUInt8
        quantize_dynamic(src.fused, out, weight_type=weights, per_channel=True, reduce_range=reduce_range, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    return make


def static(operators: bool = False, weights_only: bool = False):
    """quantize_static: activations u8 with one scale per tensor, fixed by min-max calibration on CALIBRATION training
    rows, weights s8 per channel in 7 bits. No scale depends on a batch, so a row's scores are its own at any batch.
    Made from the unfused graph: onnx's shape inference types no output of the fused graph's contrib ops (Attention,
    SkipLayerNormalization), and the quantizer leaves what it cannot type in fp32. `operators`: QLinearMatMul nodes
    instead of QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses; `weights_only`: the MatMuls of a weight
    (MatMulConstBOnly), not the attention's two MatMuls of activations."""

    def make(src: Sources, out: Path) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Rows(CalibrationDataReader):  # each row alone, unpadded, as the kernel runs it
            def __init__(self) -> None:
                self.rows = iter(src.calibration)

            def get_next(self) -> dict | None:
                row = next(self.rows, None)
                return row and {"input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64)}

        typed = out.with_suffix(".typed.onnx")  # onnx's shape inference only: onnxruntime's symbolic one fails on this graph
        quant_pre_process(src.plain, typed, skip_symbolic_shape=True)
        quantize_static(typed, out, Rows(), quant_format=QuantFormat.QOperator if operators else QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options={"MatMulConstBOnly": weights_only})  # fmt: skip
        typed.unlink()

    return make


# name -> (what it is, how it is made; None: the fused fp32 graph itself)
CANDIDATES = {
    "fp32": ("fp32, fused (export --quantize fp32)", None),
    "nbits8-b32-acc4": ("MatMulNBits 8-bit, blocks of 32, accuracy_level 4: int8 activations per row (export --quantize int8 today)", nbits(32, 4)),
    "nbits8-b64-acc4": ("MatMulNBits 8-bit, blocks of 64, accuracy_level 4", nbits(64, 4)),
    "nbits8-b128-acc4": ("MatMulNBits 8-bit, blocks of 128, accuracy_level 4", nbits(128, 4)),
    "dynamic": ("quantize_dynamic, u8 weights per channel, one activation scale per batch tensor (--quantize int8 before issue 28)", dynamic(False)),
    "dynamic-s8": ("quantize_dynamic, s8 weights per channel (u8 x s8)", dynamic(True)),
    "dynamic-s8-rr": ("quantize_dynamic, s8 weights per channel, 7-bit range (no u8 x s8 saturation without VNNI)", dynamic(True, True)),
    "static-qdq": ("quantize_static QDQ, every MatMul, u8 activations per tensor calibrated, s8 weights per channel in 7 bits", static()),
    "static-qdq-weights": ("quantize_static QDQ, the MatMuls of a weight only", static(weights_only=True)),
    "static-qop-weights": ("quantize_static QOperator (QLinearMatMul), the MatMuls of a weight only", static(operators=True, weights_only=True)),
}


def make(args: argparse.Namespace) -> None:
    from builder.export import FILES, held_out_rows, write_onnx
    from builder.folds import across_questions, scheme_of, split_fold
    from builder.models import FAMILIES
    from runtime.data import labels_of
    from runtime.labels import LabelSpace
    from runtime.predict import kernel_rows, prompts
    from runtime.member import MemberSpec

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    meta = json.loads((args.merged / "mapbuild.json").read_text())
    spec = MemberSpec(**{k: meta[k] for k in ("template", "chat", "max_length", "pad_token_id", "model_type") if meta.get(k) is not None})
    rows = held_out_rows(meta, args.rows)
    space = LabelSpace.from_json(meta["label_space"])
    tokenizer = args.merged / FILES["tokenizer"]
    ids = kernel_rows(tokenizer, spec, prompts(spec, rows, space))
    cfg = meta["config"]
    train = split_fold(cfg["data"], cfg.get("sample"), cfg["folds"], cfg["fold"], cfg["seed"], dedupe=False, scheme=scheme_of(cfg)).train
    src = Sources(out / "models" / "fp32.onnx", out / "plain.onnx", kernel_rows(tokenizer, spec, prompts(spec, across_questions(train, CALIBRATION, cfg["seed"]), space)))
    for path, fusion in ((src.fused, FAMILIES[meta["model_type"]].ort_fusion), (src.plain, "")):
        if not path.is_file():
            write_onnx(args.merged, path, "fp32", fusion)
    for name, (_, quantize) in CANDIDATES.items():
        if quantize and not (out / "models" / f"{name}.onnx").is_file():
            with tempfile.TemporaryDirectory(dir=out) as scratch:
                quantize(src, Path(scratch) / "m.onnx")
                (Path(scratch) / "m.onnx").rename(out / "models" / f"{name}.onnx")
    # ragged ids as one flat array and each row's end: npz holds no object arrays without pickles
    np.savez(out / "rows.npz", ids=np.concatenate(ids), ends=np.cumsum(list(map(len, ids))), mask=space.candidate_mask(rows),
             truth=labels_of(rows).to_numpy(str), labels=np.array(space.labels), pad=meta["pad_token_id"])  # fmt: skip
    (out / "merged.txt").write_text(str(args.merged.resolve()))
    print(f"{len(ids)} held-out rows, {len(CANDIDATES)} models under {out}")


def torch_rate(merged: Path, ids: list[list[int]], pad_id: int) -> float | None:
    """PyTorch fp32 rows/s as bench/speed.py times it (input order, batch 32), or None where torch is not installed."""
    try:
        import torch
        from transformers import AutoModelForSequenceClassification
    except ImportError:
        return None
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), 32):
            chunk = ids[i : i + 32]
            width = max(map(len, chunk))
            x = torch.tensor([r + [pad_id] * (width - len(r)) for r in chunk])
            model(input_ids=x, attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk]))
    return len(ids) / (time.perf_counter() - start)


def timed(forward, ids, pad_id: int, batch: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    got = run_batches(forward, ids, pad_id, batch, desc=f"batch {batch}", warmup=getattr(forward, "workers", 1))
    return got, len(ids) / (time.perf_counter() - start)


def time_all(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    out = Path(args.out)
    data = np.load(out / "rows.npz")
    ids = [r.tolist() for r in np.split(data["ids"], data["ends"][:-1])]
    mask, truth, labels, pad_id = data["mask"], data["truth"].tolist(), data["labels"], int(data["pad"])
    names = [n for n in CANDIDATES if n in args.candidates.split(",")] if args.candidates else list(CANDIDATES)
    # each candidate: one session on every thread at batch 64 and at batch 1; and batch 1 on one single-threaded session
    # run from a thread per --threads (SessionThreads, the kernel's path for a member that runs a row at a time)
    speed: dict = {}
    logits: dict = {}
    for _ in range(args.repeats):
        for n in names:
            model = str(out / "models" / f"{n}.onnx")
            one = onnx_forward(model, args.threads, gpu=False)
            one(np.ones((1, 8), np.int64), np.ones((1, 8), np.int64))
            for how, forward, batch in (("b64", one, 64), ("b1", one, 1)):
                got, rate = timed(forward, ids, pad_id, batch)
                logits.setdefault((n, how), got)
                speed[n, how] = max(speed.get((n, how), 0.0), rate)
            with SessionThreads(onnx_forward(model, 1, gpu=False), args.threads) as pool:
                got, rate = timed(pool, ids, pad_id, 1)
                logits.setdefault((n, "b1x"), got)
                speed[n, "b1x"] = max(speed.get((n, "b1x"), 0.0), rate)
    pytorch = torch_rate(Path((out / "merged.txt").read_text()), ids, pad_id) if args.torch else None
    top3 = lambda z: np.argsort(-np.where(mask, z, -np.inf), axis=1, kind="stable")[:, :3]  # noqa: E731
    result = {"onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats, "rows": len(ids), "cpu": platform.processor() or platform.machine(),
              "pytorch_fp32_rows_per_s": pytorch and round(pytorch, 1), "candidates": {}}  # fmt: skip
    base = speed["fp32", "b64"]
    for n in names:
        best = max(("b64", "b1", "b1x"), key=lambda how: speed[n, how])
        result["candidates"][n] = {
            "what": CANDIDATES[n][0],
            **{f"rows_per_s_{how}": round(speed[n, how], 1) for how in ("b64", "b1", "b1x")},
            "top3_flips_b64_vs_b1": int((top3(logits[n, "b64"]) != top3(logits[n, "b1"])).any(1).sum()),
            "max_logit_diff_b64_vs_b1": float(np.abs(logits[n, "b64"] - logits[n, "b1"]).max()),
            "map3_b64": masked_map3(truth, logits[n, "b64"], labels, mask),
            "map3_b1": masked_map3(truth, logits[n, "b1"], labels, mask),
            "best": best,
            "best_vs_fp32_b64": round(speed[n, best] / base, 3),
            "best_vs_pytorch": pytorch and round(speed[n, best] / pytorch, 3),
        }
    path = out / f"time-{ort.__version__}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {len(ids)} rows, best of {args.repeats}; PyTorch fp32 {pytorch and round(pytorch, 1)} rows/s")
    print(f"{'candidate':18s} {'b64':>6s} {'b1':>6s} {'b1 x' + str(args.threads):>6s} {'flips':>5s} {'max diff':>7s} {'MAP@3':>7s} {'b1 MAP':>7s} {'vs fp32':>7s} {'vs torch':>8s}")
    for n, c in result["candidates"].items():
        print(f"{n:18s} {c['rows_per_s_b64']:6.0f} {c['rows_per_s_b1']:6.0f} {c['rows_per_s_b1x']:6.0f} {c['top3_flips_b64_vs_b1']:5d} {c['max_logit_diff_b64_vs_b1']:7.1e} {c['map3_b64']:7.4f} "
              f"{c['map3_b1']:7.4f} {c['best_vs_fp32_b64']:7.2f} {c['best_vs_pytorch'] or float('nan'):8.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="export the candidates and the held-out rows")
    m.add_argument("--merged", type=Path, required=True, help="a merged classifier folder (mapbuild merge)")
    m.add_argument("--out", required=True)
    m.add_argument("--rows", type=int, default=2000)
    t = sub.add_parser("time", help="time and score every candidate under this onnxruntime")
    t.add_argument("--out", required=True)
    t.add_argument("--threads", type=int, default=2, help="threads of the one session; single-threaded sessions of the batch-1 pool")
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--candidates", default="", help=f"comma-separated among {', '.join(CANDIDATES)} (default: all)")
    t.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="also time PyTorch fp32 where it imports")
    args = p.parse_args()
    make(args) if args.command == "make" else time_all(args)


if __name__ == "__main__":
    main()
