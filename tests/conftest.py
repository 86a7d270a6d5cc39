"""Shared fixtures: tiny models built in code, the real data when present, and the kernel sandbox."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from builder.launch import Launched, launch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "map" / "train.csv"
SAMPLE_TRAIN = ROOT / "builder" / "data" / "sample_train.csv"
SAMPLE_TEST = ROOT / "builder" / "data" / "sample_test.csv"
KERNEL_PYTHON = ROOT / ".venv-kernel" / "bin" / "python"
SANDBOX = ROOT / "builder" / "data" / "sandbox"


@pytest.fixture
def shared_train() -> Path:
    if not SHARED_TRAIN.is_file():
        pytest.skip(f"competition data not found at {SHARED_TRAIN} (it lives in ../shared, outside the repo)")
    return SHARED_TRAIN


def run_kernel(bundle: Path, *args: str, python: Path | None = None) -> Launched:
    """`runtime.submit` from inside the bundle, as the kernel runs it: by default on the runtime's oldest stack
    (.venv-kernel, made by `make test`) when present, with torch, transformers, peft, builder and sockets blocked."""
    python = python or (KERNEL_PYTHON if KERNEL_PYTHON.exists() else sys.executable)
    return launch(bundle, *args, python=python, path=(str(SANDBOX),), env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=600)


def sample_ids(folder: Path, meta: dict) -> list[list[int]]:
    """Runtime token ids of 40 sample rows, rendered as the model folder's meta says."""
    from runtime.data import read_rows
    from runtime.engine import encode, load_kernel_tokenizer
    from runtime.labels import LabelSpace
    from runtime.prompts import render

    df = read_rows(SAMPLE_TRAIN, labelled=True).head(40)
    texts = render(df, meta["template"], LabelSpace.from_json(meta["label_space"]), meta.get("chat"))
    return encode(load_kernel_tokenizer(folder / "tokenizer.json", meta["max_length"]), texts)


def input_device(model, call):
    """The device of the input_ids that `call()` hands `model`; the forward stops there (a meta-device model
    computes nothing)."""

    class Seen(Exception):
        pass

    def record(module, args, kwargs):
        raise Seen(kwargs["input_ids"].device)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with pytest.raises(Seen) as seen:
            call()
    finally:
        handle.remove()
    return seen.value.args[0]


def sample_corpus() -> list[str]:
    import pandas as pd

    df = pd.read_csv(SAMPLE_TRAIN, dtype=str, keep_default_na=False)
    text = pd.concat([df[c] for c in ("QuestionText", "MC_Answer", "StudentExplanation")]).tolist()
    return text + ["Question: Answer: Is the answer correct? correct incorrect unknown Explanation: Student"]


# ChatML that also writes BOS as text, as Llama-style templates do: the prompt must still get a single BOS.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(kind: str, eos_after: bool = False):
    """WordPiece with [CLS]/[SEP] for encoders; byte-level BPE with BOS for decoders, padding with EOS (a known trap),
    and with `eos_after` ending every text with EOS too (a worse one)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "encoder":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(sample_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        ids = {t: tok.token_to_id(t) for t in specials}
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ends = " </s>" if eos_after else ""
    tok.post_processor = processors.TemplateProcessing(single=f"<s> $A{ends}", special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHATML  # decoders train in their chat template, as instruct models do
    return fast


def make_tiny(model_type: str, folder: Path, dtype: str = "float32", eos_after: bool = False) -> Path:
    """A 2-layer random model of the family, from its config in code, with a tokenizer trained in code (`eos_after`:
    see tiny_tokenizer), stored in `dtype` (hub checkpoints are mostly bf16)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from builder.models import FAMILIES

    tok = tiny_tokenizer(FAMILIES[model_type].kind, eos_after)
    special = {f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("pad", "bos", "eos", "cls", "sep")}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **{k: v for k, v in special.items() if v is not None},
    )
    AutoModel.from_config(config).to(getattr(torch, dtype)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def merged_family(tmp_path_factory):
    """model_type -> a folder with its tiny model trained (run) and merged (merged), built once per family and session
    (tests/test_families.py, tests/test_torch_engine.py)."""
    from builder.merge import merge
    from builder.train import TrainConfig, train

    built: dict = {}

    def get(model_type: str):
        if model_type not in built:
            root = tmp_path_factory.mktemp(model_type)
            base = make_tiny(model_type, root / "base")
            train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4), root / "run")
            merge(root / "run", root / "merged")
            built[model_type] = root
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


def rewrite_record(folder: Path, meta: dict) -> None:
    """A stage folder's record changed by hand, then sealed as atomic_dir seals what a stage writes: the folder as
    its stage would have written it (a record without `files` reads as one written before custody records)."""
    from builder.stages import META, seal

    (folder / META).write_text(json.dumps(meta))
    if "files" in meta:
        seal(folder)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """train -> merge -> export (fp32 and int8) -> package on the tiny model and the sample data, built once."""
    from builder.export import export
    from builder.merge import merge
    from builder.package import package
    from builder.train import TrainConfig, train

    root = tmp_path_factory.mktemp("pipeline")
    cfg = TrainConfig(model=str(tiny_bert), data=str(SAMPLE_TRAIN), epochs=3, batch_size=16, learning_rate=3e-3, lora_r=4)
    train(cfg, root / "run")
    merge(root / "run", root / "merged")
    export(root / "merged", root / "onnx", "fp32")
    export(root / "merged", root / "onnx-int8", "int8", force=True)  # a tiny random model's logits nearly tie
    package([str(root / "onnx")], root / "bundle", "tester/tiny-bundle", wheels=False)  # the kernel-stack venv has onnxruntime
    return {k: root / k for k in ("run", "merged", "onnx", "onnx-int8", "bundle")}


@pytest.fixture(scope="session")
def wheel_folder(tmp_path_factory):
    """A local wheel folder with the real onnxruntime-gpu CUDA 12 wheels for CPython 3.11, 3.12 and 3.13."""
    from builder.wheels import fetch

    folder = tmp_path_factory.mktemp("wheels")
    fetch(folder, ("3.11", "3.12", "3.13"))
    return folder


@pytest.fixture(scope="session")
def kaggle_bundle(tiny_pipeline, wheel_folder, tmp_path_factory):
    """A bundle made with package's defaults, from a local wheel folder."""
    from builder.package import package

    out = tmp_path_factory.mktemp("kaggle") / "bundle"
    package([str(tiny_pipeline["onnx"])], out, "tester/tiny-bundle", find_links=str(wheel_folder))
    return out
