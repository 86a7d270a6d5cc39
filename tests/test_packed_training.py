"""Training packed: the same rows a step give the same loss curve packed and unpacked, `train --pack-tokens` runs
and computes fewer tokens a row, and what packing cannot do is refused in one line."""

import numpy as np
import pytest

from builder.chat import chat_parts
from builder.torch_rows import hf_encoder
from builder.models import load_hf_tokenizer
from builder.torch_packed import collate_packs, training_packs
from builder.train import TrainConfig, candidate_trainer, train
from runtime.data import labels_of, read_rows
from runtime.errors import MapbuildError
from runtime.labels import fit_label_space
from runtime.member import PACKED, MemberSpec
from runtime.packing import split_ids
from runtime.prompts import render_parts

from .conftest import SAMPLE_TRAIN, make_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def pack_items(tok, pack_tokens: int, n: int = 96) -> list[dict]:
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(n)
    space = fit_label_space(df)
    rows = split_ids(hf_encoder(tok), render_parts(df, "context", space, chat_parts(tok)), 200)
    y = labels_of(df).map({lab: i for i, lab in enumerate(space.labels)}).to_numpy()
    return training_packs(rows, y, space.candidate_mask(df) | np.eye(len(space.labels), dtype=bool)[y], pack_tokens, seed=0)


def test_a_packed_batch_holds_the_rows_of_its_unpacked_twin():
    items = [{"head": [1, 2], "tails": [[3, 4], [5]], "labels": [0, 2], "allowed": [[True, False, True]] * 2},
             {"head": [7], "tails": [[8]], "labels": [1], "allowed": [[False, True, True]]}]  # fmt: skip
    packed, whole = collate_packs(items, pad_id=0), collate_packs(items, pad_id=0, packed=False)
    assert packed["labels"].tolist() == [[0, 2], [1, -100]]  # -100: the Trainer counts 3 rows, not 4 slots
    assert packed["labels"][packed["labels"] >= 0].tolist() == whole["labels"].tolist()
    assert (packed["allowed"][packed["labels"] >= 0] == whole["allowed"]).all()
    assert whole["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 5, 0], [7, 8, 0, 0]] and whole["attention_mask"].sum(1).tolist() == [4, 3, 2]
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]] and packed["last"].tolist() == [[3, 4], [1, 0]]


def test_training_packs_keep_every_row_once_in_a_seeded_order():
    rows = [([1, 2], [3] * n) for n in range(1, 13)] + [([7], [8] * n) for n in range(1, 5)]
    y, allowed = np.arange(len(rows)) % 3, np.ones((len(rows), 3), dtype=bool)
    items = training_packs(rows, y, allowed, 12, seed=0)
    assert sorted(len(t) + 10 * (it["head"] == [7]) for it in items for t in it["tails"]) == sorted(len(t) + 10 * (h == [7]) for h, t in rows)
    assert all(len(it["head"]) + sum(map(len, it["tails"])) <= 12 or len(it["tails"]) == 1 for it in items)
    assert all(it["labels"] == [int(y[[len(t) for h, t in rows].index(len(u)) if it["head"] == [1, 2] else 12 + len(u) - 1]) for u in it["tails"]]
               for it in items)  # fmt: skip
    assert items == training_packs(rows, y, allowed, 12, seed=0) != training_packs(rows, y, allowed, 12, seed=1)
    assert any(it["tails"] != sorted(it["tails"], key=len) for it in items)  # a sample of the question, not by length


def curve(folder, items, packed: bool, out) -> tuple[list[float], dict]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    tok = load_hf_tokenizer(str(folder))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(items[0]["allowed"][0]), pad_token_id=tok.pad_token_id)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8, learning_rate=2e-2,
        lr_scheduler_type="constant", use_cpu=True, logging_steps=1, seed=0, remove_unused_columns=False, report_to="none",
        save_strategy="no", disable_tqdm=True,
    )
    collator = lambda b: collate_packs(b, tok.pad_token_id, packed=packed)  # noqa: E731
    trainer = candidate_trainer()(model=model, args=args, train_dataset=items, data_collator=collator)
    trainer.train()
    weights = {k: v.detach().numpy().copy() for k, v in model.named_parameters() if v.requires_grad}
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], weights


def test_packed_training_follows_the_unpacked_loss_curve_on_the_same_rows(tiny_llama, tmp_path):
    """Same seed, same packs a step, no dropout: packing changes how the rows are computed, not what is learnt."""
    items = pack_items(load_hf_tokenizer(str(tiny_llama)), 256)
    packed, packed_w = curve(tiny_llama, items, True, tmp_path / "packed")
    whole, whole_w = curve(tiny_llama, items, False, tmp_path / "whole")
    assert len(packed) == 8 and max(packed) - min(packed) > 0.05  # it learns: a flat curve would match trivially
    assert packed == pytest.approx(whole, rel=1e-3, abs=1e-4)
    for name, w in whole_w.items():
        assert np.allclose(packed_w[name], w, atol=1e-4), name


@pytest.mark.parametrize("packed", [True, False])
def test_the_trainers_mixed_precision_reaches_the_packed_forward(tiny_llama, tmp_path, packed):
    """Issue 42: accelerate autocasts `model.forward` alone, and the packed step calls the backbone past it, so
    every packed step ran in fp32 under Trainer(fp16=True) on a T4 (no tensor cores, twice the activations). The
    Trainer's own bf16 on the CPU, through trainer.train(), as on CUDA; a hook reads the dtype each layer's MLP
    computes in (a layer's output is the fp32 residual stream either way)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    tok = load_hf_tokenizer(str(tiny_llama))
    items = pack_items(tok, 256)[:4]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=len(items[0]["allowed"][0]), pad_token_id=tok.pad_token_id)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8))
    dtypes = set()
    for layer in model.get_base_model().model.layers:
        layer.mlp.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, use_cpu=True, bf16=True,
                             remove_unused_columns=False, report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    collator = lambda b: collate_packs(b, tok.pad_token_id, packed=packed)  # noqa: E731
    candidate_trainer()(model=model, args=args, train_dataset=items, data_collator=collator).train()
    assert dtypes == {torch.bfloat16}


def test_a_tokenizer_that_ends_every_row_with_its_pad_reads_the_same_token_packed_and_unpacked(tmp_path):
    """Issue 42: transformers' head (unpacked training, validation and the export's reference) reads a row's
    rightmost token that is not the pad; the packed forward (packed training, the kernel) its literal last one. A
    tokenizer that appends EOS and pads with EOS made them disagree on every row; load_hf_tokenizer now pads with
    another special token."""
    from builder.models import Source, load_classifier
    from builder.torch_packed import torch_packed_logits
    from builder.torch_rows import torch_logits, whole

    folder = make_tiny("llama", tmp_path / "eos", eos_after=True)
    tok = load_hf_tokenizer(str(folder))
    assert tok("a")["input_ids"][-1] == tok.eos_token_id != tok.pad_token_id
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(48)
    rows = split_ids(hf_encoder(tok), render_parts(df, "context", fit_label_space(df), None), 200)
    model, _ = load_classifier(Source(str(folder)), fit_label_space(df).labels, tok.pad_token_id)
    hf = torch_logits(model.eval(), whole(MemberSpec(inputs=PACKED), rows), tok.pad_token_id, batch_size=8)
    assert np.abs(torch_packed_logits(model, rows, tok.pad_token_id, 0) - hf).max() < 1e-4


def test_train_pack_tokens_computes_fewer_tokens_a_row_and_validates(tiny_llama, tmp_path):
    common = dict(model=str(tiny_llama), data=str(SAMPLE_TRAIN), folds=3, epochs=1, batch_size=8, lora_r=2, template="context", max_length=200)
    packed = train(TrainConfig(**common, pack_tokens=256), tmp_path / "packed")
    whole = train(TrainConfig(**common), tmp_path / "whole")
    assert packed["train_tokens_per_row"] < 0.7 * whole["train_tokens_per_row"]
    assert packed["rows_valid"] == whole["rows_valid"] > 0 and 0 < packed["map3"] <= 1 and np.isfinite(packed["final_loss"])


def test_packing_an_encoder_or_under_ddp_is_refused_in_one_line(tiny_bert, tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(MapbuildError, match="bidirectional encoder.*--pack-tokens 0"):
        train(TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), folds=3, epochs=1, pack_tokens=256), tmp_path / "enc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MapbuildError, match="one process"):
        train(TrainConfig(model=str(tiny_llama), data=str(SAMPLE_TRAIN), folds=3, epochs=1, pack_tokens=256), tmp_path / "ddp")
    with pytest.raises(MapbuildError, match="--pack-tokens must be at least 0"):
        TrainConfig(data=str(SAMPLE_TRAIN), pack_tokens=-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_step_under_fp16_autocast_matches_the_unpacked_one(tiny_llama, attn, tmp_path):
    """What Trainer(fp16=True) runs on a T4: fp32 master weights, the forward under fp16 autocast, here CPU autocast
    for CUDA's. The packed mask is in the masters' dtype (fp32) beside fp16 scores, in both attention paths; the
    loss and the LoRA gradients must stay finite and equal unpacked (a mask of -1 instead of the dtype's minimum
    leaks between rows and fails here). Where CUDA may differ: its SDPA kernels may check the mask's dtype more
    strictly than the CPU's, which only a GPU run (bench/gpu_check.py --pack-tokens) shows."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    tok = load_hf_tokenizer(str(tiny_llama))
    items = pack_items(tok, 256)[:6]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=len(items[0]["allowed"][0]), pad_token_id=tok.pad_token_id, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False))
    trainer = candidate_trainer()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    steps = {}
    for packed in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = trainer.compute_loss(model, collate_packs(items, tok.pad_token_id, packed=packed))
        loss.backward()
        steps[packed] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    (packed_loss, packed_grad), (loss, grad) = steps[True], steps[False]
    assert np.isfinite(packed_loss) and torch.isfinite(packed_grad).all() and packed_grad.abs().sum() > 0
    assert packed_loss == pytest.approx(loss, rel=1e-2) and torch.nn.functional.cosine_similarity(packed_grad, grad, dim=0) > 0.99


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text", "phi3"])
def test_a_sliding_window_shorter_than_the_rows_holds_in_the_packed_forward(tmp_path, model_type):
    """Issue 42: transformers passes a 4-D mask to every layer untouched, so a sliding-window layer saw the whole
    row in the packed forward (the kernel's graph, at any --pack-tokens, and packed training) while the model's
    own forward, which trains and validates unpacked, cut it to the window. A window of 8 tokens, rows of 20-60."""
    import json

    from transformers import AutoModelForSequenceClassification

    from builder.torch_packed import torch_packed_logits
    from builder.torch_rows import torch_logits, whole

    folder = make_tiny(model_type, tmp_path / model_type)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"sliding_window": 8}))
    tok = load_hf_tokenizer(str(folder))
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(32)
    rows = split_ids(hf_encoder(tok), render_parts(df, "context", fit_label_space(df), None), 200)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5, pad_token_id=tok.pad_token_id).eval()
    assert model.config.sliding_window == 8 and min(len(h) + len(t) for h, t in rows) > 16
    own = torch_logits(model, whole(MemberSpec(inputs=PACKED), rows), tok.pad_token_id, batch_size=8)
    for pack_tokens in (0, 4096):
        assert np.abs(torch_packed_logits(model, rows, tok.pad_token_id, pack_tokens) - own).max() < 1e-4, pack_tokens
