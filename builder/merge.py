"""`mapbuild merge`: fold the LoRA weights into the base model, leaving a plain HF folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .stages import atomic_dir, read_meta, write_meta


def load_lora_model(run: str | os.PathLike):
    """The base model with the run's adapter, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta = read_meta(run, "run")
    labels = meta["label_space"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(
        meta["base_model"], num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)}
    )
    base.config.pad_token_id = meta["pad_token_id"]
    return PeftModel.from_pretrained(base, Path(run) / "adapter").eval()


def merge(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    meta = read_meta(run, "run")
    model = load_lora_model(run).merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(Path(run) / "tokenizer", tmp, dirs_exist_ok=True)
        write_meta(tmp, {**meta, "stage": "merged", "run": str(Path(run).resolve())})
    return Path(out)
