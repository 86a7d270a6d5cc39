"""`mapbuild merge`: fold the LoRA weights into the base model, leaving a plain HF folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .models import Source, load_classifier
from .stages import atomic_dir, read_meta, write_meta
from .train import quantization_config


def load_lora_model(run: str | os.PathLike):
    """The base model with the run's adapter, in eval mode."""
    from peft import PeftModel

    meta = read_meta(run, "run")
    source = Source(meta["base_model"], meta["gguf_file"])
    # A QLoRA adapter learned against the NF4-rounded weights: merge into those, dequantized, not the originals.
    qlora = meta["config"].get("qlora", False)
    quant = quantization_config(qlora, meta["hardware"]["precision"]) if qlora else None
    base, _ = load_classifier(source, meta["label_space"]["labels"], meta["pad_token_id"], quant)
    if quant:
        base = base.dequantize()
    return PeftModel.from_pretrained(base, Path(run) / "adapter").eval()


def merge(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    meta = read_meta(run, "run")
    model = load_lora_model(run).merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(Path(run) / "tokenizer", tmp, dirs_exist_ok=True)
        write_meta(tmp, {**meta, "stage": "merged", "run": str(Path(run).resolve())})
    return Path(out)
