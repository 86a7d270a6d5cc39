"""One optimizer step of the CandidateTrainer on 4 fixed rows, in this process or, run as a script under torchrun,
split over its processes: the update of every trainable weight, and the step's logged loss and gradient norm.

    python -m torch.distributed.run --nproc_per_node 2 tests/first_step.py TINY_BERT OUT.npz --batch-size 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def first_step(tiny_bert: Path, batch_size: int, grad_accum: int, out_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(update per trainable weight, the step's log: loss and grad_norm) after one SGD step, no shuffling."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from builder.train import candidate_trainer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, lora_dropout=0.0))
    texts = ["one two three", "four five", "six seven eight nine", "ten"]  # different lengths: padding differs by batch
    # label i % 5; label 4 is never a candidate, label 2 not for row 1: the mask shapes the loss
    rows = [{"input_ids": tok(t)["input_ids"], "labels": i % 5, "allowed": [True, True, i != 1, True, False]} for i, t in enumerate(texts)]
    args = TrainingArguments(
        output_dir=str(out_dir / f"b{batch_size}a{grad_accum}"), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=1, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, use_cpu=True, logging_steps=1,
        train_sampling_strategy="sequential", remove_unused_columns=False, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    trainer = candidate_trainer()(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer.train()
    update = {k: (v.detach() - before[k]).numpy() for k, v in model.named_parameters() if v.requires_grad}
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return update, {"loss": log["loss"], "grad_norm": float(log["grad_norm"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tiny_bert", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    update, log = first_step(args.tiny_bert, args.batch_size, 1, args.out.parent)
    if os.environ.get("RANK", "0") == "0":
        np.savez(args.out, **{f"update/{k}": v for k, v in update.items()}, loss=log["loss"], grad_norm=log["grad_norm"])


if __name__ == "__main__":
    main()
