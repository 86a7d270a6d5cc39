"""Peak memory and wall time of `mapbuild export` per precision, on a random decoder grown to a chosen size.

    python bench/export_memory.py --merged MERGED_DIR [--params-m 560] [--precisions fp32,int8,fp16,int4] [--rows 8]

MERGED_DIR is any merged Llama-family folder (`mapbuild merge` of a smollm2 or tiny llama run), left as it is: OUT/grown
gets its tokenizer, labels and metadata, with a random LlamaForSequenceClassification of about --params-m million
parameters for weights (hidden 2048, 16 heads, 4 KV heads, MLP 5632, as many layers as the size needs). Each precision
is exported in its own `mapbuild export --force` process; its peak RSS comes from wait4, so no figure mixes two
exports. Prints one JSON object and writes it to OUT/figures.json. A random model's drift means little: these
figures are about memory, time and size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "GROWN_BY_EXPORT_MEMORY"  # the grown folder's mark: only a marked folder is ever replaced
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128}


def grow(merged: Path, out: Path, params_m: float) -> int:
    """A copy of `merged` whose weights are a random Llama of about `params_m` million parameters; returns the count."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(merged)
    if config.model_type != "llama":
        sys.exit(f"export_memory: --merged {merged}: a {config.model_type} model; give a merged llama folder (smollm2 or a tiny llama)")
    config.update(SHAPE)
    h, kv = SHAPE["hidden_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * SHAPE["intermediate_size"] + 2 * h
    config.num_hidden_layers = max(1, math.ceil((params_m * 1e6 - config.vocab_size * h) / per_layer))
    if out.exists() and not (out / MARK).is_file():  # never a folder this script did not grow: it may be the user's
        sys.exit(f"export_memory: {out} exists and was not grown by this script; give another --out")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(merged, out, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    (out / MARK).write_text("grown by bench/export_memory.py: random weights\n")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    sys.path.insert(0, str(ROOT))
    from builder.stages import seal

    seal(out)  # its record now lists the grown weights, which export checks the folder against
    return sum(p.numel() for p in model.parameters())


def rss_gib(pid: int) -> tuple[float, float]:
    """A live process's resident memory and the anonymous part of it, from /proc ((0, 0) once it has gone). The rest
    is file pages (safetensors and .data files are memory-mapped): the kernel can drop them, so anonymous memory is
    what a machine must really have."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS:", "RssAnon:"))}
    return kib.get("VmRSS", 0) / 2**20, kib.get("RssAnon", 0) / 2**20


def timed_export(merged: Path, out: Path, precision: str, rows: int) -> dict:
    """One `mapbuild export` process: its wall time, peak RSS (wait4, this child alone), the highest RSS and
    anonymous memory sampled (every 0.2 s) overall and in each phase (named by the last line it printed to stderr),
    exit code and file sizes."""
    cmd = [sys.executable, "-m", "builder", "export", str(merged), "--out", str(out), "--quantize", precision, "--rows", str(rows), "--force"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, tuple[float, float]]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            samples.append((time.monotonic(), rss_gib(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[tuple[float, str]] = []
    for line in proc.stderr:  # wait4 reaps the child: read its pipe to the end first
        text = f"{line.split(':')[0].strip()} batches" if "%|" in line else line.strip()  # a progress bar: its name
        if text and (not lines or lines[-1][1] != text):
            lines.append((time.monotonic(), text))
    _, status, usage = os.wait4(proc.pid, 0)
    sampling.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    phase_of = lambda at: next((text for t, text in reversed(lines) if t <= at), "start-up")[:120]
    phases: dict[str, list[float]] = {}
    for at, (rss, anon) in samples:
        high = phases.setdefault(phase_of(at), [0.0, 0.0])
        high[:] = [round(max(rss, high[0]), 2), round(max(anon, high[1]), 2)]
    figures = {
        "precision": precision,
        "exit": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "peak_anon_gib": round(max((anon for _, (_, anon) in samples), default=0.0), 2),
        "phase_peaks_gib": phases,  # sampled: [RSS, anonymous] at their highest while each phase's line was the last
    }
    if proc.returncode:
        figures["error"] = lines[-1][1] if lines else ""
        return figures
    meta = json.loads((out / "mapbuild.json").read_text())
    figures["files_gib"] = {p.name: round(p.stat().st_size / 2**30, 3) for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".data")}
    figures["drift"] = {k: meta["drift"][k] for k in ("rows", "max_abs_logit_diff", "masked_top1_agreement", "reference", "onnx_provider")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", type=Path, required=True, help="a merged llama folder to take tokenizer, labels and metadata from")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "export_memory")
    parser.add_argument("--params-m", type=float, default=560.0, help="millions of parameters (560: just over 2 GiB in fp32)")
    parser.add_argument("--precisions", default="fp32,int8,fp16,int4")
    parser.add_argument("--rows", type=int, default=8, help="held-out rows for the drift check (a big model on CPU is slow)")
    args = parser.parse_args()
    if not (args.merged / "mapbuild.json").is_file():
        sys.exit(f"export_memory: --merged {args.merged}: not a merged folder (no mapbuild.json); run `mapbuild merge` first")

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    params = grow(args.merged, args.out / "grown", args.params_m)
    figures = {"params": params, "fp32_gib": round(params * 4 / 2**30, 2), "grow_seconds": round(time.monotonic() - start, 1), "exports": []}
    for precision in args.precisions.split(","):
        figures["exports"].append(timed_export(args.out / "grown", args.out / f"onnx-{precision}", precision, args.rows))
        shutil.rmtree(args.out / f"onnx-{precision}", ignore_errors=True)  # GiBs each: keep the figures, not the files
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
