"""Shared fixtures: tiny models built in code, the real data when present, and the kernel sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "map" / "train.csv"
SAMPLE_TRAIN = ROOT / "builder" / "data" / "sample_train.csv"
SAMPLE_TEST = ROOT / "builder" / "data" / "sample_test.csv"
KERNEL_PYTHON = ROOT / ".venv-kernel" / "bin" / "python"


@pytest.fixture
def shared_train() -> Path:
    if not SHARED_TRAIN.is_file():
        pytest.skip(f"competition data not found at {SHARED_TRAIN} (it lives in ../shared, outside the repo)")
    return SHARED_TRAIN


def run_kernel(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m runtime.submit` from inside the bundle, as the kernel runs it: the Kaggle-like old stack
    (.venv-kernel, made by `make test`) when present, with torch, transformers, peft, builder and sockets blocked."""
    python = str(KERNEL_PYTHON if KERNEL_PYTHON.exists() else sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT / "tests" / "sandbox"), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([python, "-m", "runtime.submit", *args], cwd=bundle, env=env, capture_output=True, text=True, timeout=600)


def make_tiny_bert(folder: Path) -> Path:
    """A 2-layer random BERT with a WordPiece tokenizer trained in code on the sample data."""
    import pandas as pd
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    df = pd.read_csv(SAMPLE_TRAIN, dtype=str, keep_default_na=False)
    text = pd.concat([df[c] for c in ("QuestionText", "MC_Answer", "StudentExplanation")]).tolist()
    text += ["Question: Answer: Is the answer correct? correct incorrect unknown Explanation: Student"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, pad_token_id=fast.pad_token_id,
    )
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


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
    export(root / "merged", root / "onnx-int8", "int8")
    package([str(root / "onnx")], root / "bundle", "tester/tiny-bundle")
    return {k: root / k for k in ("run", "merged", "onnx", "onnx-int8", "bundle")}
