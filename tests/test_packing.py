"""Shared-prefix packing is exact for every decoder family: packed logits equal unpacked ones, in PyTorch and in
the exported ONNX graph, at several pack sizes, with rows of different lengths and packs of one row."""

import numpy as np
import pytest

from builder.chat import chat_parts
from builder.torch_rows import hf_encoder, torch_logits
from builder.models import FAMILIES, load_hf_tokenizer
from builder.torch_packed import PackedClassifier, example_inputs, torch_packed_logits
from runtime.data import read_rows
from runtime.engine import load_kernel_tokenizer, onnx_forward
from runtime.labels import fit_label_space
from runtime.member import PACKED
from runtime.packing import PACK_TOKENS, PACKED_INPUTS, kernel_encoder, make_packs, pack_feed, run_packs, split_ids
from runtime.prompts import render_parts

from .conftest import SAMPLE_TRAIN, make_tiny

DECODERS = sorted(t for t, f in FAMILIES.items() if f.kind == "decoder")
PACK_SIZES = (0, 96, 256, 4096)  # 0: every row alone; 4096: every question's rows in one pack


def test_packs_group_rows_by_head_and_respect_the_budget():
    rows = [([1, 2], [3] * n) for n in (5, 1, 9, 2)] + [([7], [8, 8])]
    packs = make_packs(rows, 10)
    assert sorted(i for _, m in packs for i in m) == list(range(5))
    assert all(len(h) + sum(len(rows[i][1]) for i in m) <= 10 or len(m) == 1 for h, m in packs)
    assert {h for h, _ in packs} == {(1, 2), (7,)} and all(len(m) == 1 for _, m in make_packs(rows, 0))


def test_a_packed_row_sees_the_head_and_itself_only():
    rows = [([1, 2], [3, 4]), ([1, 2], [5])]
    ids, pos, mask, last = pack_feed(rows, [((1, 2), [0, 1])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5]] and pos.tolist() == [[0, 1, 2, 3, 2]] and last.tolist() == [[3, 4]]
    assert mask[0, 0, 4].tolist() == [True, True, False, False, True]  # row 2 sees the head, not row 1
    assert mask[0, 0, 1].tolist() == [True, True, False, False, False]  # causal


def seeing(poison: int | None = None):
    """A fake packed forward: each row's logits are its last token's id and position and the keys that token
    sees, which a pack of one gives too. A pack holding the token `poison` gives NaN in every row, as a NaN
    state spreads to pack mates through attention."""

    def forward(ids, pos, mask, last):
        b = np.arange(len(ids))[:, None]
        logits = np.stack([ids[b, last], pos[b, last], mask[:, 0][b, last].sum(-1)], -1).astype(np.float32)
        logits[(ids == poison).any(1)] = np.nan
        return logits

    return forward


def question_rows(questions: int = 20, per: int = 12) -> list:
    return [([1, 2 + q] + [9] * (q % 7), [20 + r] * (1 + (q * r) % 9)) for q in range(questions) for r in range(per)]


@pytest.mark.parametrize("pooled", [False, True], ids=["one-session", "device-pool"])
def test_each_batch_mask_is_built_as_the_run_reaches_it(monkeypatch, caplog, pooled):
    """Every batch's [B, 1, T, T] mask was built before the first ran: 1.17 GiB for 40,000 rows at pack 512, and a
    huge pack had the OOM killer end the kernel (issue 40; bench/kernel_memory.py). A run now holds one mask at a
    time (a pool: two a worker ahead), and running out of memory still halves a batch."""
    import logging

    import runtime.packing as packing

    from .test_engine import ThreadDevicePool, live_counter

    rows = question_rows()
    forward = seeing()
    alone = run_packs(forward, rows, 0, 0, batch_rows=8)
    counted, seen = live_counter(packing.pack_feed)
    monkeypatch.setattr(packing, "pack_feed", counted)

    def small(*feed):  # out of memory past 2 packs a batch
        if len(feed[0]) > 2:
            raise MemoryError("bad_alloc")
        return forward(*feed)

    pool = ThreadDevicePool(small, 2) if pooled else None
    try:
        with caplog.at_level(logging.WARNING, logger="mapbuild"):
            got = run_packs(pool or small, rows, 0, 40, batch_rows=8)
    finally:
        if pool:
            pool.threads.shutdown()
    assert np.array_equal(got, alone) and "out of memory on a batch" in caplog.text
    assert seen["built"] > 20 and seen["most"] <= (2 * 2 + 1 if pooled else 1), seen


def test_a_nan_row_costs_its_own_logits_only_not_its_pack_mates(caplog):
    """Two rows with a NaN cost 2 rows unpacked, but every row of their packs packed (136 at pack 4,096), enough
    for predict.checked to skip the member. The rows of a pack that came back non-finite run again one a pack."""
    import logging

    rows = question_rows(4, 30)
    rows[5] = (rows[5][0], rows[5][1] + [666])
    rows[40] = (rows[40][0], [666] + rows[40][1])
    alone = run_packs(seeing(666), rows, 0, 0, batch_rows=16)
    assert (~np.isfinite(alone).all(1)).nonzero()[0].tolist() == [5, 40]
    for size in (64, 4096):
        with caplog.at_level(logging.WARNING, logger="mapbuild"):
            got = run_packs(seeing(666), rows, 0, size, batch_rows=16, desc="member")
        assert (~np.isfinite(got).all(1)).nonzero()[0].tolist() == [5, 40], size
        assert np.array_equal(np.delete(got, [5, 40], 0), np.delete(alone, [5, 40], 0)), size
    assert "member: 60 rows of packs with NaN or inf logits run again one a pack; 2 of them still" in caplog.text


def test_pack_tokens_past_a_members_own_are_capped_there_with_one_line(caplog):
    """A member is exported and checked for packs up to its own pack_tokens. A huge --pack-tokens put a question's
    rows in one pack, whose mask is T^2 (2,000 rows grew to 22 GB, issue 40). Smaller sizes, 0 included, are taken."""
    import logging

    from runtime.predict import pack_size

    from runtime.member import Member

    member = Member(name="m1-qwen", weight=1.0, inputs=PACKED, pack_tokens=1024)
    with caplog.at_level(logging.WARNING, logger="mapbuild"):
        assert [pack_size(member, n) for n in (None, 0, 256, 1024)] == [1024, 0, 256, 1024] and not caplog.text
        assert pack_size(member, 100000) == 1024 and pack_size(Member(name="old", weight=1.0), 4096) == PACK_TOKENS
    assert caplog.messages == [
        "m1-qwen: --pack-tokens 100000 capped at 1024, the largest pack it was exported and checked for",
        f"old: --pack-tokens 4096 capped at {PACK_TOKENS}, the largest pack it was exported and checked for",
    ]


def word_tokenizer(words: list[str]):
    """A tokenizers.Tokenizer of whitespace words with a BOS, as the kernel loads one (truncating at 32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.enable_truncation(32)
    return tok


def test_a_question_too_long_for_max_length_leaves_its_rows_their_own_tokens(caplog, tmp_path):
    """A question text 10x max_length made every row of it head[:max_length] and an empty tail: one input for all
    of them, and nothing logged (issue 40, point 7). The head now loses its middle past 3/4 of max_length; a head
    within that is split as before, in the kernel (whose tokenizer.json truncates) as in training."""
    import logging

    from runtime.member import MemberSpec
    from runtime.predict import kernel_rows

    long_q = " ".join(f"q{i}" for i in range(320))
    tails = [f"answer{r} because {' '.join(f'why{r}' for _ in range(r + 1))}" for r in range(5)]
    parts = [(long_q, t) for t in tails] + [("short question", t) for t in tails]
    words = (long_q + " short question " + " ".join(tails)).split()
    untruncated = word_tokenizer(words)
    untruncated.no_truncation()
    plain = lambda texts, special: [e.ids for e in untruncated.encode_batch(list(texts), add_special_tokens=special)]  # noqa: E731
    word_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="mapbuild"):
        rows = kernel_rows(tmp_path / "tokenizer.json", MemberSpec(inputs=PACKED, max_length=32), parts)
    assert rows == split_ids(plain, parts, 32)  # the kernel cuts as training does, and each logs once
    assert caplog.text.count("5 of 10 rows have a head (question) of over 24 of their 32 tokens") == 2
    cut, head = rows[:5], plain([long_q], True)[0]
    assert len({tuple(h + t) for h, t in cut}) == 5 and all(len(h) == 24 and len(h) + len(t) <= 32 for h, t in cut)
    assert cut[0][0] == head[:12] + head[-12:]  # its start (BOS, instruction) and its end
    assert [t[:1] for _, t in cut] == plain([f"answer{r}" for r in range(5)], False)
    short = plain(["short question"], True)[0]
    assert rows[5:] == [(short, t[: 32 - len(short)]) for t in plain(tails, False)]  # as split before


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built = {}

    def get(model_type):
        if model_type not in built:
            import torch
            from transformers import AutoModelForSequenceClassification

            folder = make_tiny(model_type, tmp_path_factory.mktemp(model_type))
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=7).eval()
            tok = load_hf_tokenizer(str(folder))
            model.config.pad_token_id = tok.pad_token_id
            built[model_type] = folder, model, tok
        return built[model_type]

    return get


def sample_rows(tok, encode, n=40, max_length=250):
    df = read_rows(SAMPLE_TRAIN, labelled=True).head(n)
    return split_ids(encode, render_parts(df, "basic", fit_label_space(df), chat_parts(tok)), max_length)


def packed_onnx(model, path):
    """The packed forward as ONNX, exported as the fp32 and int8 members are (TorchScript, opset 17)."""
    import torch

    axes = {"input_ids": {0: "packs", 1: "tokens"}, "position_ids": {0: "packs", 1: "tokens"},
            "attention_mask": {0: "packs", 2: "tokens", 3: "tokens"}, "last": {0: "packs", 1: "rows"}, "logits": {0: "packs", 1: "rows"}}
    torch.onnx.export(PackedClassifier(model).eval(), example_inputs(), str(path), dynamo=False, opset_version=17,
                      input_names=list(PACKED_INPUTS), output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("model_type", DECODERS)
def test_packed_logits_equal_unpacked_in_pytorch_and_onnx(family_model, model_type, tmp_path):
    import torch

    folder, model, tok = family_model(model_type)
    rows = sample_rows(tok, hf_encoder(tok))
    assert len({len(t) for _, t in rows}) > 5  # rows of different lengths
    pad = tok.pad_token_id
    unpacked = torch_logits(model, [h + t for h, t in rows], pad, batch_size=8)
    for size in PACK_SIZES:
        assert np.abs(torch_packed_logits(model, rows, pad, size, batch_rows=16) - unpacked).max() < 1e-4, size

    forward = onnx_forward(packed_onnx(model, tmp_path / "packed.onnx"))
    tok.save_pretrained(tmp_path / "tok")
    kernel_rows = sample_rows(tok, kernel_encoder(load_kernel_tokenizer(tmp_path / "tok" / "tokenizer.json", None)))
    assert kernel_rows == rows  # the kernel's tokenizer splits exactly as training's
    for size in PACK_SIZES:
        assert np.abs(run_packs(forward, rows, pad, size, 16) - unpacked).max() < 1e-4, size


def test_a_decoder_bundle_runs_packed_and_scores_the_same_at_any_pack_size(tmp_path, caplog):
    """train -> merge -> export -> package -> kernel on a tiny llama in the context template: the member is packed
    from training on, and the kernel's pack size moves no score."""
    import logging

    from builder.export import export
    from builder.merge import merge
    from builder.package import package
    from builder.train import TrainConfig, train
    from runtime.labels import LabelSpace
    from runtime.manifest import load_manifest, schema_problem
    from runtime.predict import predict

    base = make_tiny("llama", tmp_path / "base")
    train(TrainConfig(model=str(base), data=str(SAMPLE_TRAIN), epochs=1, lora_r=4, template="context"), tmp_path / "run")
    merge(tmp_path / "run", tmp_path / "merged")
    export(tmp_path / "merged", tmp_path / "onnx", "fp32", rows=32)
    package([str(tmp_path / "onnx")], tmp_path / "bundle", "tester/packed", wheels=False)
    manifest = load_manifest(tmp_path / "bundle")
    member = manifest["members"][0]
    assert (member["inputs"], member["pack_tokens"]) == (PACKED, PACK_TOKENS)
    df = read_rows(SAMPLE_TRAIN, labelled=True)
    space = LabelSpace.from_json(manifest["label_space"])
    packed, used = predict(tmp_path / "bundle", manifest, space, df)
    alone, _ = predict(tmp_path / "bundle", manifest, space, df, pack_tokens=0)
    assert used == [member["name"]] and np.abs(packed - alone).max() < 1e-5
    caplog.clear()  # pack_tokens=0 was re-planned, and said so
    with caplog.at_level(logging.INFO, logger="mapbuild"):  # past its own pack size: capped there, and not re-planned
        assert np.array_equal(predict(tmp_path / "bundle", manifest, space, df, pack_tokens=8 * PACK_TOKENS)[0], packed)
    assert f"{member['name']}: --pack-tokens {8 * PACK_TOKENS} capped at {PACK_TOKENS}" in caplog.text and "planned at" not in caplog.text
    assert member["mean_tokens"] < np.mean([len(h) + len(t) for h, t in split_ids(
        kernel_encoder(load_kernel_tokenizer(tmp_path / "onnx" / "tokenizer.json", None)),
        render_parts(df, "context", space, member.get("chat")), member["max_length"])])  # the plan counts packed tokens
    assert "inputs 'ragged'" in schema_problem(manifest | {"members": [member | {"inputs": "ragged"}]})

    # --pack-tokens 0 is re-planned at its own cost: a deadline its own pack size meets drops it before it starts
    import time

    from runtime.packing import packed_tokens
    rows = split_ids(kernel_encoder(load_kernel_tokenizer(tmp_path / "onnx" / "tokenizer.json", None)), render_parts(df, "context", space, member.get("chat")), member["max_length"])
    cost = packed_tokens(rows, 0) / packed_tokens(rows, PACK_TOKENS)
    assert cost > 1.5
    planned = 600.0
    for plan in ("t4_seconds", "cpu_seconds"):
        manifest["estimate"][plan] = {member["name"]: planned * manifest["estimate"]["rows"] / len(df)}
    deadline = time.monotonic() + planned * (1 + cost) / 2
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        assert predict(tmp_path / "bundle", manifest, space, df, deadline=deadline)[1] == [member["name"]]
        assert predict(tmp_path / "bundle", manifest, space, df, deadline=deadline, pack_tokens=0)[1] == []
    assert f"planned at {cost:.2f}x its tokens" in caplog.text and f"DROPPED member {member['name']}" in caplog.text


def test_int8_moves_with_pack_mates_only_as_its_rounding_moves_with_last_bit_noise(family_model, tmp_path):
    """int8 packed logits differ from unpacked by about 1e-3 where fp32 ones differ by 1e-7: each row's activations
    are rounded to 8 bits, and a value by a rounding edge flips on fp32's reordering noise. Scaling the fp32
    embedding table by 1 + 1e-7 N(0, 1) and running unpacked moves int8 as far: the move is int8's, not packing's
    (a packing bug, a wrong mask say, moves logits by 1e-2 and more)."""
    import onnx

    from builder.export import int8_weights

    folder, model, tok = family_model("llama")
    rows, pad = sample_rows(tok, hf_encoder(tok), n=80), tok.pad_token_id
    fp32 = packed_onnx(model, tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    onnx.save(int8_weights(fp32, tmp_path, packed=True), str(int8))

    def noisy(path, seed):
        m = onnx.load(str(path))
        table = next(i for i in m.graph.initializer if "embed_tokens" in i.name)
        w = onnx.numpy_helper.to_array(table)
        table.CopyFrom(onnx.numpy_helper.from_array(w * (1 + 1e-7 * np.random.default_rng(seed).standard_normal(w.shape)).astype(np.float32), table.name))
        onnx.save(m, str(out := tmp_path / f"noisy-{path.stem}-{seed}.onnx"))
        return out

    run = lambda path, size: run_packs(onnx_forward(path), rows, pad, size, 16)  # noqa: E731
    moves = {}
    for path in (fp32, int8):
        alone = run(path, 0)
        moves[path.stem] = (max(np.abs(run(path, size) - alone).max() for size in PACK_SIZES[1:]),
                            max(np.abs(run(noisy(path, seed), 0) - alone).max() for seed in range(3)))  # fmt: skip
    (fp32_packed, fp32_noise), (int8_packed, int8_noise) = moves["fp32"], moves["int8"]
    assert fp32_packed < 1e-5 and fp32_noise < 1e-5, moves
    assert int8_noise > 100 * fp32_noise and int8_packed <= 2 * int8_noise, moves
