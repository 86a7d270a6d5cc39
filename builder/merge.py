"""`mapbuild merge`: fold the LoRA weights into the base model (or take a fully fine-tuned run as it is), leaving a
plain HF folder."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from .models import Source, load_classifier, quantization_config
from .stages import ADAPTER, FULL, StageMeta, atomic_dir, base_files, check_read, folder_files, read_meta, write_meta


def load_trained_model(run: str | os.PathLike):
    """The run's model in eval mode: the base model with its adapter, or the fully fine-tuned weights (--lora-r 0)."""
    from peft import PeftModel

    meta = read_meta(run, "run")
    if (Path(run) / FULL).is_dir():
        return load_classifier(Source(str(Path(run) / FULL)), meta["label_space"]["labels"], meta["pad_token_id"])[0].eval()
    # Merged in fp32, whatever the run trained in: export starts from exact weights at every precision.
    source = Source(meta["base_model"], meta.get("gguf_file"))
    # A QLoRA adapter learned against the NF4-rounded weights: merge into those, dequantized, not the originals.
    qlora = meta["config"].get("qlora", False)
    quant = quantization_config(qlora, meta["hardware"]["precision"]) if qlora else None
    base, _ = load_classifier(source, meta["label_space"]["labels"], meta["pad_token_id"], quantization_config=quant)
    if quant:
        base = base.dequantize().float()  # dequantized in the compute dtype, which may be 16-bit
    return PeftModel.from_pretrained(base, Path(run) / ADAPTER).eval()


def merge(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The merged folder of a run whose files (read_meta) and base model (check_read) are what training left: an
    adapter merged into other weights than it learned against is a quietly worse model."""
    meta = read_meta(run, "run")
    if not (Path(run) / FULL).is_dir():
        check_read(meta, "base_model", base_files(Source(meta["base_model"], meta.get("gguf_file")))["files"])
    with atomic_dir(out, "merged") as tmp:  # OUT is checked before the model loads
        model = load_trained_model(run)
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(Path(run) / "tokenizer", tmp, dirs_exist_ok=True)
        # the run as merge read it, its record included: package checks the out-of-fold file it weighs by against it
        ran = {"path": str(Path(run).resolve()), "files": meta.get("files") or folder_files(Path(run))}
        write_meta(tmp, replace(StageMeta.from_json(meta), stage="merged", run=ran["path"], read={**(meta.get("read") or {}), "run": ran}))
    return Path(out)
