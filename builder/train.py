"""`mapbuild train`: fine-tune a model as a LoRA classifier on one fold."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from runtime.data import InputError, labels_of, read_rows
from runtime.engine import softmax
from runtime.labels import LabelSpace, fit_label_space, top3
from runtime.metrics import map_at_3
from runtime.predict import prior
from runtime.prompts import TEMPLATES, render

from .chat import chat_parts
from .dataset import clean
from .errors import MapbuildError, require
from .folds import assign_folds
from .hardware import PRECISIONS, choose_precision, detect
from .models import family_of, load_classifier, load_tokenizer, resolve
from .stages import atomic_dir, write_meta

log = logging.getLogger("mapbuild")


@dataclass
class TrainConfig:
    """One training run: a model, its prompt, its LoRA and its fold."""

    model: str = field(default="minilm", metadata={"help": "Alias (minilm), local HF folder or hub id."})
    data: str = field(default="", metadata={"help": "Labelled train.csv in the competition's format."})
    template: str | None = field(default=None, metadata={"help": f"Prompt template: {', '.join(TEMPLATES)} (default: the family's)."})
    folds: int = field(default=5, metadata={"help": "Number of cross-validation folds."})
    fold: int = field(default=0, metadata={"help": "The fold held out for validation."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    max_length: int | None = field(default=None, metadata={"help": "Maximum prompt tokens (default: the family's)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per device per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step (effective batch = batch x accum x devices)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward: less memory, about 30% slower."})
    precision: str = field(default="auto", metadata={"help": f"{', '.join(PRECISIONS)}; auto: bf16 on Ampere+, fp16 on older GPUs (T4), fp32 on CPU/MPS."})
    qlora: bool = field(default=False, metadata={"help": "Load the base model in 4-bit NF4 (bitsandbytes): for models too big for the GPU in 16 bits."})
    # 1e-3 collapsed two of three full MiniLM fold-0 runs to the label prior (MAP@3 0.787), once with LoRA dropout.
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    warmup: float = field(default=0.06, metadata={"help": "Share of steps spent warming up."})
    chat_template: bool = field(default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one (instruct decoders)."})
    dedupe: bool = field(default=True, metadata={"help": "Train on one copy of rows that are exact duplicates (same input and label)."})
    relabel: bool = field(default=False, metadata={"help": "Fix training labels that contradict the data: the True_/False_ prefix to the answer's correctness, conflicting duplicates to their majority label."})
    candidate_loss: bool = field(default=True, metadata={"help": "Softmax over each row's candidate labels only, the set the kernel's mask keeps."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick runs)."})
    seed: int = field(default=42, metadata={"help": "Seed for folds, initialisation and shuffling."})

    def __post_init__(self) -> None:
        require(
            (self.folds >= 2, f"--folds must be at least 2, got {self.folds}"),
            (0 <= self.fold < self.folds, f"--fold must be in 0..{self.folds - 1}, got {self.fold}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.template is None or self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}, got {self.template}"),
            (self.max_length is None or self.max_length >= 16, f"--max-length must be at least 16, got {self.max_length}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision}"),
            (self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}"),
            (self.lora_r >= 1, f"--lora-r must be at least 1, got {self.lora_r}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (0 <= self.warmup < 1, f"--warmup must be in [0, 1), got {self.warmup}"),
            (self.limit is None or self.limit >= 2 * self.folds, f"--limit must be at least 2 x folds, got {self.limit}"),
        )


def load_labelled(path: str, limit: int | None = None) -> pd.DataFrame:
    try:
        df = read_rows(path, labelled=True)
    except InputError as e:
        raise MapbuildError(str(e)) from None
    return df.head(limit) if limit else df


class FoldSplit(NamedTuple):
    rows: pd.DataFrame  # every labelled row
    train: pd.DataFrame  # the training folds, cleaned
    valid: pd.DataFrame  # the held-out fold, as the test set would have it
    labels: list[str]  # the sorted label list: a model's head order
    space: LabelSpace  # fitted on the training folds alone: validation sees only what training saw
    cleaning: dict  # what cleaning changed, for metrics.json


def split_fold(data: str, limit: int | None, folds: int, fold: int, seed: int, dedupe: bool, relabel: bool = False) -> FoldSplit:
    """The rows every member trains and validates on: the same held-out fold for the same data, folds and seed, so
    an ensemble's members share their out-of-fold rows."""
    df = load_labelled(data, limit)
    which = assign_folds(df, folds, seed)
    tr, va = df[which != fold], df[which == fold]
    labels = sorted(labels_of(df).unique())
    space = fit_label_space(tr, labels)
    tr, cleaning = clean(tr, space, dedupe=dedupe, relabel_rows=relabel)
    return FoldSplit(df, tr, va, labels, space, cleaning)


def save_curve(history: list[dict], path: Path) -> None:
    """Training loss per step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts), marker=".")
    ax.set(xlabel="step", ylabel="training loss", title="Training curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validate(probs: np.ndarray, rows: pd.DataFrame, space: LabelSpace, unmasked: bool) -> dict:
    """MAP@3 with the kernel's candidate mask; also without it for a model trained over all labels (a model trained
    on candidates alone never learned to rank the others, so that figure would mean nothing)."""
    truth = labels_of(rows).tolist()
    lab = np.array(space.labels)
    mask = space.candidate_mask(rows)
    scores = {
        "map3": map_at_3(truth, lab[top3(probs, mask)].tolist()),
        "map3_prior": map_at_3(truth, lab[top3(prior(space, len(rows)), mask)].tolist()),
    }
    if unmasked:
        scores["map3_unmasked"] = map_at_3(truth, lab[top3(probs, np.ones_like(probs, dtype=bool))].tolist())
    return scores


def learned_little(metrics: dict) -> str | None:
    """A warning when the model closes under a quarter of the gap from the label prior's MAP@3 to a perfect 1.

    A run at too high a learning rate can collapse to the prior midway and still finish without an error."""
    base = metrics["map3_prior"]
    closed = (metrics["map3"] - base) / (1 - base) if base < 1 else 1.0
    if closed >= 0.25:
        return None
    return (
        f"fold MAP@3 {metrics['map3']:.4f} closes only {closed:.0%} of the gap from the label prior alone ({base:.4f}) to 1: "
        "the run learned little or collapsed; see training_curve.png, and try more rows or epochs, or a lower --learning-rate"
    )


def quantization_config(qlora: bool, precision: str):
    """QLoRA's 4-bit NF4 base, or None. bitsandbytes runs it on CPU too: slow, but the same path as on CUDA."""
    if not qlora:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MapbuildError("--qlora needs bitsandbytes: pip install bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def candidate_trainer():
    """The HF Trainer with cross-entropy restricted to each row's `allowed` labels."""
    import torch
    from transformers import Trainer

    class CandidateTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            allowed, labels = inputs.pop("allowed"), inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return (loss, outputs) if return_outputs else loss

    return CandidateTrainer


def train(cfg: TrainConfig, out: str | os.PathLike) -> dict | None:
    """Train, validate and save a run folder; returns its metrics (None on DDP ranks other than 0)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, TrainingArguments

    from .infer import torch_logits

    CandidateTrainer = candidate_trainer()

    df, tr, va, labels, space_tr, cleaning = split_fold(cfg.data, cfg.limit, cfg.folds, cfg.fold, cfg.seed, cfg.dedupe, cfg.relabel)
    source = resolve(cfg.model)
    model_type, family = family_of(source)
    template = cfg.template or family.template
    max_length = cfg.max_length or family.max_length
    tok = load_tokenizer(source)
    chat = chat_parts(tok) if cfg.chat_template else None

    def encode(rows: pd.DataFrame) -> list[list[int]]:
        return tok(render(rows, template, space_tr, chat), truncation=True, max_length=max_length)["input_ids"]

    y = labels_of(tr).map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    allowed = space_tr.candidate_mask(tr) if cfg.candidate_loss else np.ones((len(tr), len(labels)), dtype=bool)
    allowed[np.arange(len(tr)), y] = True  # the few rows whose label contradicts their answer's correctness
    train_set = [{"input_ids": ids, "labels": int(t), "allowed": a.tolist()} for ids, t, a in zip(encode(tr), y, allowed)]
    hw = detect()
    precision = choose_precision(hw, cfg.precision)
    torch.manual_seed(cfg.seed)
    # Modules the checkpoint lacks (the head; ModernBERT's `head` too) start random: LoRA on them would be lost
    # at merge, which re-creates them, so they train fully and are saved whole instead.
    model, fresh = load_classifier(source, labels, tok.pad_token_id, quantization_config(cfg.qlora, precision))
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(family.target_modules) if isinstance(family.target_modules, tuple) else family.target_modules,
        modules_to_save=sorted(set(family.modules_to_save) | set(fresh)) or None,
        exclude_modules=fresh or None,
    )
    model = get_peft_model(model, lora)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            gradient_checkpointing=cfg.gradient_checkpointing,
            use_cpu=hw.device == "cpu",  # also what makes torchrun on CPU start gloo DDP
            fp16=precision == "fp16",
            bf16=precision == "bf16",
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=cfg.warmup,
            weight_decay=0.01,
            train_sampling_strategy="group_by_length",
            logging_steps=max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum) // 20),
            save_strategy="no",
            remove_unused_columns=False,  # keeps `allowed` for the loss
            report_to="none",
            seed=cfg.seed,
            disable_tqdm=False,
        )
        trainer = CandidateTrainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():  # under torchrun / accelerate, rank 0 alone validates and writes
        return None
    world = args.world_size
    model.eval()
    probs = softmax(torch_logits(model, encode(va), tok.pad_token_id, desc="validate"))
    metrics = {
        **validate(probs, va, space_tr, unmasked=not cfg.candidate_loss),
        **cleaning,
        "rows_train": len(tr),
        "rows_valid": len(va),
        "train_seconds": round(seconds, 1),
        "train_rows_per_s": round(len(tr) * cfg.epochs / seconds, 2),
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    if warning := learned_little(metrics):
        log.warning(warning)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "adapter")
        tok.save_pretrained(tmp / "tokenizer")
        np.savez(tmp / "oof.npz", row_id=va["row_id"].to_numpy(str), probs=probs.astype(np.float32))
        save_curve(trainer.state.log_history, tmp / "training_curve.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        write_meta(tmp, {
            "stage": "run",
            "base_model": source.path,
            "gguf_file": source.gguf_file,
            "model_type": model_type,
            "template": template,
            "chat": chat,
            "max_length": max_length,
            "pad_token_id": tok.pad_token_id,
            "label_space": fit_label_space(df, labels).to_json(),
            "config": asdict(cfg),
            "hardware": {**hw.to_json(), "precision": precision, "world_size": world},
            "metrics": metrics,
        })
    return metrics
