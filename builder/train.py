"""`mapbuild train`: fine-tune a model as a LoRA classifier on one fold."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.data import labels_of
from runtime.engine import softmax
from runtime.errors import MapbuildError
from runtime.labels import fit_label_space
from runtime.member import PACKED, MemberSpec
from runtime.packing import PACK_TOKENS
from runtime.predict import prompts
from runtime.progress import bars_off
from runtime.prompts import TEMPLATES

from .chat import chat_parts
from .folds import SplitConfig, absolute, validate
from .hardware import TRAIN_DTYPES, TRAIN_PRECISIONS, choose_precision, detect
from .models import check_model, family_of, load_classifier, load_hf_tokenizer, quantization_config, resolve
from .options import one_of, require
from .stages import ADAPTER, FULL, StageMeta, atomic_dir, base_files, check_out, disk_full, provenance, size_of, write_meta

log = logging.getLogger("mapbuild")
REPORTERS = ("none", "tensorboard", "wandb")  # the module each integration imports is named as it is
STATE = "trainer_state.json"  # the last file of a checkpoint the Trainer writes: one without it is partial


@dataclass
class TrainConfig(SplitConfig):
    """One training run: a model, its prompt, its LoRA and its fold."""

    model: str = field(default="minilm", metadata={"help": "Alias (minilm), local HF folder or hub id."})
    template: str | None = field(default=None, metadata={"help": f"Prompt template: {', '.join(TEMPLATES)} (default: the family's)."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    max_length: int | None = field(default=None, metadata={"help": "Maximum prompt tokens (default: the family's)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per device per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step (effective batch = batch x accum x devices)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward: less memory, about 30% slower."})
    precision: str = field(default="auto", metadata={"help": f"{', '.join(TRAIN_PRECISIONS)}; auto: bf16 on Ampere+, fp16 on older GPUs (T4), fp32 on CPU/MPS."})
    qlora: bool = field(default=False, metadata={"help": "Load the base model in 4-bit NF4 (bitsandbytes): for models too big for the GPU in 16 bits."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 fine-tunes every weight (no adapter), for small models such as MiniLM."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    warmup: float = field(default=0.06, metadata={"help": "Share of steps spent warming up."})
    chat_template: bool = field(default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one (instruct decoders)."})
    candidate_loss: bool = field(default=True, metadata={"help": "Softmax over each row's candidate labels only, the set the kernel's mask keeps."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N optimizer steps; `train --resume` continues from the last one."})
    report_to: str = field(default="none", metadata={"help": f"Also log the run to {', '.join(REPORTERS[1:])} (the Trainer's own integrations; TensorBoard's logs end in OUT/tensorboard, and are in OUT.checkpoints/runs while it trains), or none."})
    pack_tokens: int = field(default=0, metadata={"help": "Decoders: train on packs of a question's rows behind their shared head, up to N tokens (0: each row alone). Exact, so a model trained packed runs unpacked and the other way round; one process only."})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.max_length is None or self.max_length >= 16, f"--max-length must be at least 16, got {self.max_length}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}"),
            (self.lora_r >= 0, f"--lora-r must be at least 0, got {self.lora_r}"),
            (self.lora_r >= 1 or not self.qlora, "--qlora trains an adapter: give --lora-r 1 or more"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (0 <= self.warmup < 1, f"--warmup must be in [0, 1), got {self.warmup}"),
            (self.save_steps >= 1, f"--save-steps must be at least 1, got {self.save_steps}"),
            (self.pack_tokens >= 0, f"--pack-tokens must be at least 0, got {self.pack_tokens}"),
        )
        one_of(self.precision, TRAIN_PRECISIONS, "--precision")
        check_model(self.model)
        one_of(self.report_to, REPORTERS, "--report-to")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise MapbuildError(f"--report-to {self.report_to}: the {self.report_to} package is not installed: pip install {self.report_to}")
        if self.template is not None:
            one_of(self.template, TEMPLATES, "--template")
        self.model = absolute(self.model) if Path(self.model).exists() else self.model  # an alias or hub id stays


def save_curve(history: list[dict], valid: list[dict], path: Path) -> None:
    """Training loss per epoch, raw and smoothed, beside the validation MAP@3 after each epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if pts:
        epoch, loss = map(np.asarray, zip(*pts))
        ax.plot(epoch, loss, color="tab:blue", alpha=0.3, linewidth=1, label="training loss")
        ax.plot(epoch, pd.Series(loss).ewm(alpha=0.2).mean(), color="tab:blue", label="smoothed (EMA, alpha 0.2)")
    ax.set(xlabel="epoch", ylabel="training loss", title="Training curve")
    ax.grid(alpha=0.3)
    if valid:
        right = ax.twinx()
        right.plot([v["epoch"] for v in valid], [v["map3"] for v in valid], "o-", color="tab:orange", label="validation MAP@3")
        right.axhline(valid[-1]["map3_prior"], color="tab:orange", linestyle=":", label="label prior's MAP@3")
        right.set_ylabel("validation MAP@3")
        for v in valid:
            right.annotate(f"{v['map3']:.4f}", (v["epoch"], v["map3"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
        ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="best")
    elif pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def candidate_trainer():
    """The HF Trainer with cross-entropy restricted to each row's `allowed` labels."""
    import torch
    from transformers import Trainer

    from runtime.torch_engine import packed_logits

    class CandidateTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            allowed, labels = inputs.pop("allowed"), inputs.pop("labels")
            if "last" in inputs:  # a batch of packs (builder.torch_packed.collate_packs): logits [packs, slots, labels]
                filled = labels >= 0
                # accelerate autocasts model.forward alone, and the packed forward calls the backbone past it: its
                # mixed precision (fp16 on a T4) is entered here, or every packed step runs in fp32.
                with self.accelerator.autocast():
                    outputs = {"logits": packed_logits(model, **inputs)[filled]}
                allowed, labels = allowed[filled], labels[filled]
            else:
                outputs = model(**inputs)
            logits = outputs["logits"].float().masked_fill(~allowed, torch.finfo(torch.float32).min)
            # The Trainer leaves the division by accumulation steps to the loss exactly when it hands over the rows
            # of the whole accumulated batch (num_items_in_batch): then it is a sum over them, else a batch mean.
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
                # That count covers every DDP process, and DDP then averages the gradients over them: scale back up
                # by the world size, as Trainer.compute_loss does, or every step is 1/world_size of the update.
                if self.args.average_tokens_across_devices:
                    loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
            return (loss, outputs) if return_outputs else loss

    return CandidateTrainer


def prompting_of(cfg: TrainConfig, family, tok) -> MemberSpec:
    """How a run's rows become tokens, as the kernel will do it: its template, chat wrapping and max_length, and
    for a causal decoder `inputs: packed` (rows as head + tail, which the kernel packs behind the shared head; a
    bidirectional encoder's stay whole, as packing is not exact for it)."""
    return MemberSpec(
        template=cfg.template or family.template, chat=chat_parts(tok) if cfg.chat_template else None,
        max_length=cfg.max_length or family.max_length, inputs=PACKED if family.kind == "decoder" else None,
    )  # fmt: skip


def epoch_validation(score, epochs: float):
    """A TrainerCallback that records the validation MAP@3 after each whole epoch but the last (which the run
    validates anyway), on the main process, for the training curve. `score()` returns validate()'s figures."""
    from transformers import TrainerCallback

    class EpochValidation(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict] = []

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and state.epoch < epochs - 1e-6:
                model.eval()
                self.points.append({"epoch": round(state.epoch, 3), **score()})
                model.train()

    return EpochValidation()


DDP_TIMEOUT = 4 * 3600  # seconds a rank waits in a collective; see train's TrainingArguments


def leave_process_group() -> None:
    """Under DDP, every rank waits for rank 0 to validate and write, then leaves the process group. A rank that
    exits with its gloo group alive aborts ("terminate called without an active exception", exit -6), and torchrun
    then fails the whole run. Waiting is what DDP_TIMEOUT must outlast; a rank 0 that fails ends the wait, as
    torchrun stops every rank when one fails."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def quiet_progress(trainer) -> None:
    """Keep the Trainer's progress bar (none under -q) but not the loss dict it prints at every logging step
    (thousands of lines a fold, on stdout, which is for results): the losses are in metrics.json,
    training_curve.png and --report-to."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.pop_callback(PrinterCallback)  # the Trainer's printer where there is no bar
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints until its folder is written: beside it, so a crash leaves them."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def last_checkpoint(ckpt: Path) -> str | None:
    """The newest whole checkpoint: the Trainer writes STATE last, so a kill mid-save leaves no match."""
    whole = [p.parent for p in ckpt.glob(f"checkpoint-*/{STATE}")]
    return str(max(whole, key=lambda p: int(p.name.split("-")[1]))) if whole else None


def can_resume(cfg: TrainConfig, out: str | os.PathLike) -> bool:
    """Whether OUT.checkpoints holds a whole checkpoint of a run with exactly these options."""
    ckpt = checkpoint_dir(out)
    recipe = ckpt / "config.json"
    return recipe.is_file() and json.loads(recipe.read_text()) == asdict(cfg) and last_checkpoint(ckpt) is not None


def prepare_checkpoints(cfg: TrainConfig, out: str | os.PathLike, resume: bool) -> tuple[Path, str | None]:
    """OUT.checkpoints, made ready for this run, and its last whole checkpoint. Refusals come here, before the hours
    of training: a resume with nothing or other options to continue, or a fresh run over an earlier one's work."""
    ckpt = checkpoint_dir(out)
    recipe = ckpt / "config.json"
    last = last_checkpoint(ckpt)
    check_out(out, "run")  # before the hours of training, not after
    if resume and not can_resume(cfg, out):
        why = f"no checkpoint in {ckpt}; train without --resume" if last is None else f"{recipe} was written for other options; resume with the same ones, or remove {ckpt} to train afresh"
        raise MapbuildError(f"--resume: {why}")
    if not resume and last is not None:  # hours of training: never deleted unasked
        how = "add --resume to continue it" if can_resume(cfg, out) else f"its {recipe.name} holds other options: resume with those"
        raise MapbuildError(f"{ckpt}: holds {Path(last).name} of an earlier run; {how}, or remove the folder to train afresh")
    if os.environ.get("RANK", "0") == "0":  # under DDP, one process prepares the folder
        if not resume and ckpt.exists():
            shutil.rmtree(ckpt)  # an earlier crash's partial checkpoints and options must not leak into this run
        ckpt.mkdir(parents=True, exist_ok=True)
        recipe.write_text(json.dumps(asdict(cfg), indent=1))
    return ckpt, last


def training_data(cfg: TrainConfig, tok, prompting: dict, tr: pd.DataFrame, labels: list[str], space_tr) -> tuple[list[dict], int, int, object]:
    """The training set as the Trainer takes it (rows, or with --pack-tokens packs of them), with the items per
    device step, the tokens it holds and its collator. Each row's loss is over the candidates the kernel keeps."""
    from transformers import DataCollatorWithPadding

    from .torch_rows import training_rows, whole
    from .torch_packed import collate_packs, training_packs

    y = labels_of(tr).map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    allowed = space_tr.candidate_mask(tr) if cfg.candidate_loss else np.ones((len(tr), len(labels)), dtype=bool)
    allowed[np.arange(len(tr)), y] = True  # the few rows whose label contradicts their answer's correctness
    rows_tr = training_rows(tok, prompting, prompts(prompting, tr, space_tr))
    if cfg.pack_tokens:
        train_set = training_packs(rows_tr, y, allowed, cfg.pack_tokens, cfg.seed)
        # Packs per device step, so that a step still holds about --batch-size rows, as an unpacked step does.
        per_device = max(1, round(cfg.batch_size * len(train_set) / len(tr)))
        tokens = sum(len(it["head"]) + sum(map(len, it["tails"])) for it in train_set)
        return train_set, per_device, tokens, partial(collate_packs, pad_id=tok.pad_token_id)
    train_set = [{"input_ids": ids, "labels": int(t), "allowed": a.tolist()} for ids, t, a in zip(whole(prompting, rows_tr), y, allowed)]
    return train_set, cfg.batch_size, sum(len(r["input_ids"]) for r in train_set), DataCollatorWithPadding(tok)


def training_model(cfg: TrainConfig, source, family, labels: list[str], pad_token_id: int, precision: str) -> tuple[object, str]:
    """The classifier to train, seeded, with its LoRA adapter unless --lora-r 0; and the dtype its weights loaded in."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(cfg.seed)
    # Modules the checkpoint lacks (the head; ModernBERT's `head` too) start random: LoRA on them would be lost
    # at merge, which re-creates them, so they train fully and are saved whole instead.
    model, fresh = load_classifier(source, labels, pad_token_id, TRAIN_DTYPES[precision], quantization_config(cfg.qlora, precision))
    dtype = str(model.dtype).removeprefix("torch.")  # what really trains: the weights' dtype as loaded
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_r:
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
    return model, dtype


def training_arguments(cfg: TrainConfig, ckpt: Path, device: str, precision: str, per_device: int, items: int):
    """The Trainer's arguments: checkpoints in `ckpt`, `items` rows or packs trained `per_device` at a time."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ckpt),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=device == "cpu",  # also what makes torchrun on CPU start gloo DDP
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup,
        weight_decay=0.01,
        # Rows of similar lengths share a batch; packs are all about --pack-tokens long, so random order costs nothing.
        train_sampling_strategy="random" if cfg.pack_tokens else "group_by_length",
        logging_steps=max(1, items // (per_device * cfg.grad_accum) // 20),
        save_strategy="steps",
        save_steps=cfg.save_steps,  # the Trainer also saves at the last step: the adapter is safe before validation
        save_total_limit=1,
        remove_unused_columns=False,  # keeps `allowed` for the loss
        report_to=cfg.report_to,
        seed=cfg.seed,
        # Under DDP rank 0 validates each epoch while the other ranks wait in the next all-reduce: the process
        # group's timeout (the Trainer's default 30 min) must outlast a fold's validation, which for a 14B model on
        # a slow GPU can take longer. A rank that is really hung costs this long to notice, not the run.
        ddp_timeout=DDP_TIMEOUT,
        disable_tqdm=bars_off(),
    )


def scorer(cfg: TrainConfig, model, tok, prompting: dict, va: pd.DataFrame, space_tr):
    """`score()`: the fold's validation probabilities and validate()'s figures for them, as the model stands."""
    from .torch_rows import torch_logits, training_rows, whole
    from .torch_packed import torch_packed_logits

    rows_va = training_rows(tok, prompting, prompts(prompting, va, space_tr)) if len(va) else []

    def score() -> tuple[np.ndarray, dict]:
        # As the kernel runs the member: packed at its default pack size (exact, and the head computed once a pack).
        if prompting.inputs == PACKED:
            logits = torch_packed_logits(model, rows_va, tok.pad_token_id, PACK_TOKENS, desc="validate")
        else:
            logits = torch_logits(model, whole(prompting, rows_va), tok.pad_token_id, desc="validate")
        probs = softmax(logits)
        return probs, validate(probs, va, space_tr, unmasked=not cfg.candidate_loss)

    return score


def run(trainer, ckpt: Path, last: str | None) -> float:
    """Train from `last` (None: from the start); returns the seconds it took. A disk that fills mid-save raises
    why, after removing the checkpoint it cut short: the last whole one stays for --resume."""
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=last)
    except Exception as e:
        cut = [p for p in ckpt.glob("checkpoint-*") if not (p / STATE).is_file()]
        if (full := disk_full(e, ckpt, sum(map(size_of, cut)))) is None:
            raise
        for p in cut:
            shutil.rmtree(p, ignore_errors=True)
        raise full from None
    return time.perf_counter() - start


def write_run(out: str | os.PathLike, tok, model, log_history: list[dict], probs: np.ndarray, va: pd.DataFrame, ckpt: Path, meta: StageMeta) -> None:
    """The run folder, atomically: the trained weights, tokenizer, out-of-fold probabilities, curve, logs and meta."""
    with atomic_dir(out, "run") as tmp:
        model.save_pretrained(tmp / (ADAPTER if meta.config["lora_r"] else FULL))
        tok.save_pretrained(tmp / "tokenizer")
        np.savez(tmp / "oof.npz", row_id=va["row_id"].to_numpy(str), probs=probs.astype(np.float32))
        save_curve(log_history, meta.metrics.get("valid_curve", []), tmp / "training_curve.png")
        (tmp / "metrics.json").write_text(json.dumps(meta.metrics, indent=1))
        (tmp / "log_history.json").write_text(json.dumps(log_history, indent=1))
        if (ckpt / "runs").is_dir():  # --report-to tensorboard logs beside the checkpoints, which go below
            shutil.copytree(ckpt / "runs", tmp / "tensorboard")
        write_meta(tmp, meta)


def train(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False) -> dict | None:
    """Train, validate and save a run folder; returns its metrics (None on DDP ranks other than 0).

    Checkpoints go to OUT.checkpoints every `save_steps` and at the end, before validation; `resume` continues from
    the last one (a finished training only validates again). They are removed once the run folder is written, and
    never without it: a whole checkpoint there stops a run without `resume`."""
    CandidateTrainer = candidate_trainer()
    if cfg.pack_tokens and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The packed forward calls the backbone itself, past DDP's forward, so DDP would not average its gradients.
        raise MapbuildError("--pack-tokens trains on one process: give --pack-tokens 0 under torchrun or accelerate")
    df, tr, va, labels, space_tr, cleaning = cfg.split()
    # The model first: a mistyped alias or an option the model cannot take stops before OUT.checkpoints is made.
    source = resolve(cfg.model)
    model_type, family = family_of(source)
    tok = load_hf_tokenizer(source)
    prompting = prompting_of(cfg, family, tok)
    if cfg.pack_tokens and family.kind != "decoder":
        raise MapbuildError(f"--pack-tokens: {model_type} is a bidirectional encoder, and packing is exact for causal decoders only; give --pack-tokens 0")
    ckpt, last = prepare_checkpoints(cfg, out, resume)
    train_set, per_device, tokens, collator = training_data(cfg, tok, prompting, tr, labels, space_tr)
    hw = detect()
    precision = choose_precision(hw, cfg.precision)
    model, dtype = training_model(cfg, source, family, labels, tok.pad_token_id, precision)
    args = training_arguments(cfg, ckpt, hw.device, precision, per_device, len(train_set))
    score = scorer(cfg, model, tok, prompting, va, space_tr)
    each_epoch = epoch_validation(lambda: score()[1], cfg.epochs)
    trainer = CandidateTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator, callbacks=[each_epoch] if len(va) else None)
    quiet_progress(trainer)
    seconds = run(trainer, ckpt, last if resume else None)
    if not trainer.is_world_process_zero():  # under torchrun / accelerate, rank 0 alone validates and writes
        leave_process_group()
        return None
    model.eval()
    metrics = {
        **cleaning,
        "rows_train": len(tr),
        "rows_valid": len(va),
        "train_seconds": round(seconds, 1),
        "train_rows_per_s": round(len(tr) * cfg.epochs / seconds, 2),
        "train_tokens_per_row": round(tokens / max(len(tr), 1), 1),  # packed: the head once a pack
        "resumed_from": Path(last).name if resume else None,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    probs = np.zeros((0, len(labels)), dtype=np.float32)
    if len(va):
        probs, scores = score()
        metrics.update(scores)
        metrics["valid_curve"] = each_epoch.points + [{"epoch": cfg.epochs, **scores}]
        if warning := learned_little(metrics):
            log.warning(warning)
    meta = StageMeta(
        stage="run", provenance=provenance(cfg.data, len(df)), base_model=source.path, gguf_file=source.gguf_file,
        read={"base_model": base_files(source)}, model_type=model_type, **prompting.to_json(), pad_token_id=tok.pad_token_id,
        label_space=fit_label_space(df, labels).to_json(), config=asdict(cfg),
        hardware={**hw.to_json(), "precision": precision, "dtype": dtype, "world_size": args.world_size}, metrics=metrics,
    )  # fmt: skip
    write_run(out, tok, model, trainer.state.log_history, probs, va, ckpt, meta)
    shutil.rmtree(ckpt, ignore_errors=True)
    leave_process_group()
    return metrics
