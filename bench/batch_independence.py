"""Issue 28: does a row's score depend on the rest of its batch? The kNN member (all-MiniLM-L6-v2, mean pooled, as
`mapbuild knn` exports it) at each precision, on the same held-out rows at the runtime's default batch (length
sorted, duplicates run once: runtime.engine.run_batches) and at batch 1.

    nice -n 15 python bench/batch_independence.py --data ../shared/data/map/train.csv --out /tmp/batch-independence

`--rows` rows are held out with `--seed`; the neighbour table holds the other rows (none with a held-out row's input),
cleaned as `mapbuild knn` cleans them, embedded by each option's own encoder at the default batch, as the builder
does. Models and tables are cached under --out (delete it after changing a recipe): the first run embeds the table
once per option, about 30 minutes on 2 busy cores; the scoring and the timing run every time, so speed ratios are
always against the fp32 baseline of the same run (5 minutes for 2,000 rows, best of 3).
Writes figures.json and figures.png under --out, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from tqdm.auto import tqdm

from builder.dataset import clean
from builder.export import int8_weights, write_onnx
from builder.folds import input_key, load_labelled
from builder.models import family_of, resolve
from runtime.data import labels_of
from runtime.engine import encode, load_kernel_tokenizer, onnx_forward, pad, run_batches
from runtime.knn import knn_text, vote
from runtime.labels import fit_label_space, top3
from runtime.metrics import masked_map3

SETTINGS = {"k": 10, "power": 32.0, "prior_share": 0.05}  # `mapbuild knn`'s defaults
MAX_LENGTH, CALIBRATION_ROWS = 256, 256


def weight_only(fp32: Path, out: Path, calibration: list[list[int]]) -> None:
    """MatMulNBits, 8-bit weights in blocks of 32 (symmetric), the activations left fp32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(str(fp32), bits=8, block_size=32, is_symmetric=True)
    q.process()
    onnx.save_model(q.model.model, str(out))


def per_row(fp32: Path, out: Path, calibration: list[list[int]]) -> None:
    """What `mapbuild export --quantize int8` wrote from issue 28 to 43, and writes for packed decoders still:
    builder.export.int8_weights of a packed graph, on the fused fp32 graph."""
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        onnx.save_model(int8_weights(fp32, Path(scratch), packed=True), str(out))


def dynamic(fp32: Path, out: Path, calibration: list[list[int]]) -> None:
    """What `--quantize int8` wrote before issue 28: quantize_dynamic, u8 weights per channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out, weight_type=QuantType.QUInt8, per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def static(fp32: Path, out: Path, calibration: list[list[int]]) -> None:
    """QDQ with fixed activation scales (MinMax over training rows, padded to one width). The FFN's down projections
    stay fp32: quantizing their GELU outputs with one fixed scale took the worst row's cosine to fp32 to 0.90."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    typed = SymbolicShapeInference.infer_shapes(onnx.load(str(fp32)), auto_merge=True)  # types the fused ops' outputs
    weights = {t.name: t for t in typed.graph.initializer}
    down = [n.name for n in typed.graph.node if n.op_type == "MatMul" and n.input[1] in weights and weights[n.input[1]].dims[0] > weights[n.input[1]].dims[1]]
    width = max(map(len, calibration))

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            padded = (pad(calibration[i : i + 32] + [[0] * width], 0) for i in range(0, len(calibration), 32))
            self.batches = iter({"input_ids": ids[:-1], "attention_mask": mask[:-1]} for ids, mask in padded)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(typed, str(out), Rows(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Attention"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=down,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip


OPTIONS = {  # name -> (what it is, how it is made from the fused fp32 graph; None: that graph itself)
    "fp32": ("fp32, fused (export --quantize fp32)", None),
    "int8-dynamic": ("quantize_dynamic, u8 weights per channel, one activation scale per batch tensor (--quantize int8 before issue 28)", dynamic),
    "int8-weight-only": ("MatMulNBits bits=8, fp32 activations", weight_only),
    "int8-per-row": ("MatMulNBits bits=8, accuracy_level=4: int8 activations per row, blocks of 32 (export --quantize int8 of packed decoders)", per_row),
    "int8-static": ("QDQ, fixed activation scales calibrated on 256 training rows (FFN down projections fp32)", static),
}


def split(data: str, rows: int, seed: int, table_rows: int | None):
    """(held-out rows, neighbour-table rows, label space, labels): no table row shares a held-out row's input."""
    df = load_labelled(data)
    held = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), rows, replace=False))]
    train = df[~input_key(df).isin(set(input_key(held)))]
    if table_rows and table_rows < len(train):
        train = train.iloc[np.sort(np.random.default_rng(seed + 1).choice(len(train), table_rows, replace=False))]
    labels = sorted(labels_of(df).unique())
    space = fit_label_space(train, labels)
    train, _ = clean(train, space, dedupe=True)
    return held.reset_index(drop=True), train.reset_index(drop=True), space, labels


def timed(forward, ids: list[list[int]], pad_id: int, batch: int, desc: str) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = run_batches(forward, ids, pad_id, batch, desc=desc)
    return out, len(ids) / (time.perf_counter() - start)


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = result["options"]
    names, x = list(opts), np.arange(len(opts))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    ax[0].bar_label(ax[0].bar(x, [opts[n]["top3_flips"] for n in names], color="tab:red"))
    ax[0].set_title(f"rows whose top-3 differs, batch 1 vs {result['batch']}\n(of {result['rows']} held-out rows)")
    for b, (key, shift) in enumerate((("rows_per_s_default", -0.2), ("rows_per_s_batch1", 0.2))):
        ax[1].bar(x + shift, [opts[n][key] for n in names], 0.4, label=f"batch {result['batch'] if b == 0 else 1}")
    ax[1].axhline(opts["fp32"]["rows_per_s_default"], color="gray", ls="--", lw=1, label=f"fp32, batch {result['batch']}")
    ax[1].set_title(f"rows/s (best of {result['repeats']}, {result['cpu']['cores']} cores)")
    ax[1].legend(fontsize=8)
    ax[2].bar(x - 0.2, [opts[n]["map3_default"] for n in names], 0.4, label=f"batch {result['batch']}")
    ax[2].bar(x + 0.2, [opts[n]["map3_batch1"] for n in names], 0.4, label="batch 1")
    lo = min(min(o["map3_default"], o["map3_batch1"]) for o in opts.values())
    ax[2].set_ylim(lo - 0.01, max(max(o["map3_default"], o["map3_batch1"]) for o in opts.values()) + 0.005)
    ax[2].set_title("MAP@3, held-out rows (candidate mask)")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(x, names, rotation=20, ha="right")
    fig.suptitle(f"kNN member (all-MiniLM-L6-v2), onnxruntime {result['onnxruntime']}, {result['cpu']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="labelled train.csv")
    p.add_argument("--out", required=True, help="folder for figures.json, figures.png and the cached models and tables")
    p.add_argument("--rows", type=int, default=2000, help="held-out rows scored")
    p.add_argument("--table-rows", type=int, default=None, help="cap on the neighbour table's rows (quick runs); default: every other row")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, among {', '.join(OPTIONS)}; fp32 always runs")
    p.add_argument("--batch", type=int, default=64, help="the runtime's default batch size")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per option and batch size, round robin; the best counts")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    names = ["fp32", *[n for n in args.options.split(",") if n and n != "fp32"]]
    if unknown := set(names) - set(OPTIONS):
        p.error(f"--options: unknown {', '.join(sorted(unknown))}")
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    source = resolve("minilm")
    _, family = family_of(source)
    held, train, space, labels = split(args.data, args.rows, args.seed, args.table_rows)
    tok = load_kernel_tokenizer(Path(source.path) / "tokenizer.json", MAX_LENGTH)
    held_ids, train_ids = encode(tok, knn_text(held)), encode(tok, knn_text(train))
    calibration = [train_ids[i] for i in np.random.default_rng(args.seed).choice(len(train_ids), CALIBRATION_ROWS, replace=False)]
    key = hashlib.sha1("\x1e".join(input_key(train)).encode()).hexdigest()[:10]  # the table's rows name its cache

    models = {n: out / "models" / f"{n}.onnx" for n in names}
    if not models["fp32"].is_file():
        write_onnx(source.path, models["fp32"], "fp32", family.ort_fusion, pooled=True)
    for n in tqdm(names[1:], desc="export", unit="model"):
        if not models[n].is_file():
            OPTIONS[n][1](models["fp32"], models[n], calibration)
    forwards = {n: onnx_forward(models[n], gpu=False) for n in names}
    truth, mask, questions = labels_of(held).tolist(), space.candidate_mask(held), held["QuestionId"].to_numpy(str)
    index = {lab: i for i, lab in enumerate(labels)}
    tables = {}
    for n in names:  # embedded as `mapbuild knn` embeds it: this encoder, the default batch, stored fp16
        cache = out / "tables" / f"{n}-{key}.npy"
        if not cache.is_file():
            cache.parent.mkdir(exist_ok=True)
            np.save(cache, run_batches(forwards[n], train_ids, 0, args.batch, desc=f"table {n}").astype(np.float16))
        tables[n] = {"emb": np.load(cache), "label": labels_of(train).map(index).to_numpy(np.int32), "question": train["QuestionId"].to_numpy(str)}

    emb, speed = {}, {}
    for _ in range(args.repeats):  # round robin: a burst of load on a shared machine slows one pass, not one option
        for n in names:
            forwards[n](*pad(held_ids[:8], 0))  # warm the session
            for b in (args.batch, 1):
                e, rate = timed(forwards[n], held_ids, 0, b, f"{n} batch {b}")
                emb.setdefault((n, b), e)
                speed[n, b] = max(speed.get((n, b), 0.0), rate)
    base = {b: speed["fp32", b] for b in (args.batch, 1)}
    result = {"rows": len(held), "table_rows": len(train), "batch": args.batch, "repeats": args.repeats, "seed": args.seed,
              "onnxruntime": ort.__version__, "cpu": cpu(), "knn": SETTINGS, "options": {}}  # fmt: skip
    for n in names:
        probs = {b: vote(emb[n, b], questions, mask, tables[n], len(labels), **SETTINGS) for b in (args.batch, 1)}
        top = {b: top3(probs[b], mask) for b in probs}
        result["options"][n] = {
            "what": OPTIONS[n][0],
            "top3_flips": int((top[args.batch] != top[1]).any(1).sum()),
            "top1_flips": int((top[args.batch][:, 0] != top[1][:, 0]).sum()),
            "max_abs_score_diff": float(np.abs(probs[args.batch] - probs[1]).max()),
            "max_abs_embedding_diff": float(np.abs(emb[n, args.batch] - emb[n, 1]).max()),
            "min_cosine_to_fp32": float((emb[n, args.batch] * emb["fp32", args.batch]).sum(1).min()),
            "map3_default": masked_map3(truth, probs[args.batch], labels, mask),
            "map3_batch1": masked_map3(truth, probs[1], labels, mask),
            "rows_per_s_default": round(speed[n, args.batch], 1),
            "rows_per_s_batch1": round(speed[n, 1], 1),
            "speed_vs_fp32_default": round(speed[n, args.batch] / base[args.batch], 3),
            "speed_vs_fp32_batch1": round(speed[n, 1] / base[args.batch], 3),  # against fp32 at the default batch
            "model_mb": round(models[n].stat().st_size / 2**20, 1),
        }
    fp32 = result["options"]["fp32"]
    for o in result["options"].values():
        o["map3_vs_fp32"] = round(o["map3_default"] - fp32["map3_default"], 4)
    (out / "figures.json").write_text(json.dumps(result, indent=1))
    figure(result, out / "figures.png")
    print(f"{len(held)} held-out rows, table of {len(train)}, batch {args.batch} vs 1, best of {args.repeats}; {result['cpu']['model']}")
    print(f"{'option':17s} {'flips':>5s} {'top1':>4s} {'max|dp|':>8s} {'b' + str(args.batch) + ' r/s':>8s} {'b1 r/s':>7s} {'vs fp32':>7s} {'MAP@3':>7s} {'b1 MAP@3':>8s}")
    for n, o in result["options"].items():
        print(f"{n:17s} {o['top3_flips']:5d} {o['top1_flips']:4d} {o['max_abs_score_diff']:8.1e} {o['rows_per_s_default']:8.0f} {o['rows_per_s_batch1']:7.0f} "
              f"{o['speed_vs_fp32_default']:7.2f} {o['map3_default']:7.4f} {o['map3_batch1']:8.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
