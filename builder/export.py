"""`mapbuild export`: a merged model to ONNX (dynamic batch and sequence), optionally int8, with its drift measured."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.data import labels_of
from runtime.engine import CPU
from runtime.errors import MapbuildError
from runtime.external_data import locations
from runtime.packing import PACK_TOKENS, PACKED_INPUTS, packed_tokens
from runtime.labels import LabelSpace
from runtime.plan import KERNEL_THREADS
from runtime.member import PACKED, TORCH, TORCH_PRECISIONS, MemberSpec
from runtime.metrics import masked_map3
from runtime.predict import kernel_rows, onnx_session, prompts, run_rows, shut
from runtime.torch_engine import torch_forward

from .folds import across_questions, input_key, load_labelled, scheme_of, split_fold
from .models import FAMILIES, Source, classifier_settings, load_hf_tokenizer
from .options import one_of
from .stages import ADAPTER, FULL, StageMeta, atomic_dir, base_folder, check_data, check_read, folder_files, read_meta, write_meta

# What an exported transformer's ONNX folder holds, by role: the bundle carries these (the .data file only when the
# weights are over EXTERNAL_DATA_BYTES, written by `save`).
FILES = {"model": "model.onnx", "tokenizer": "tokenizer.json", "data": "model.onnx.data"}
EXTERNAL_DATA_BYTES = 2**31 - 2**24  # protobuf cannot serialize 2 GiB: above this, weights go to one .data file


def held_out_rows(meta: dict, n: int) -> pd.DataFrame:
    """Up to n real rows the model never trained on, across every question (folds.across_questions): the drift gate,
    the paces and the tokens per row are measured on them. Its validation fold's, then, for a run on a --sample, the
    rows outside the sample whose input it never saw. A full refit has none, and checks its export on rows it
    trained on."""
    cfg = meta["config"]
    split = split_fold(cfg["data"], cfg.get("sample"), cfg["folds"], None if cfg.get("full") else cfg["fold"], cfg["seed"], dedupe=False, scheme=scheme_of(cfg))
    if not len(split.valid):
        return across_questions(split.rows, n, cfg["seed"])
    if not cfg.get("sample") or len(split.valid) >= n:
        return across_questions(split.valid, n, cfg["seed"])
    every = load_labelled(cfg["data"])
    outside = every[~every["row_id"].isin(split.rows["row_id"]) & ~input_key(every).isin(set(input_key(split.train)))]
    return pd.concat([split.valid, across_questions(outside, n - len(split.valid), cfg["seed"])])


def wrapped(model, pooled: bool = False):
    """The model as a module of (input_ids, attention_mask) to one fp32 tensor: a classifier's logits or, `pooled`,
    a bare encoder's sentence embedding as sentence-transformers computes it (the mean of the unpadded token states,
    L2-normalised). The exporter restores the module's training flag, and a fresh module trains: eval() keeps
    dropout off."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            if not pooled:
                return out.logits.float()
            m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            mean = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean.float(), dim=1)

    return Head(model).eval()


def to_onnx(model, path: Path, dynamo: bool = False, pooled: bool = False, packed: bool = False) -> None:
    """Export `wrapped(model, pooled)` with dynamic batch and sequence axes (inputs input_ids and attention_mask), or,
    `packed`, a decoder's packed forward (runtime.packing.PACKED_INPUTS, with dynamic packs, tokens and rows); the
    output is "logits".

    TorchScript for fp32 (onnxruntime's fusions match its graphs); the dynamo exporter for fp16, where TorchScript
    writes LayerNormalization nodes with mixed input types that onnxruntime rejects."""
    import torch

    from .torch_packed import PackedClassifier, example_inputs

    if packed:
        wrapper, args, inputs = PackedClassifier(model).eval(), example_inputs(), list(PACKED_INPUTS)
        # one name per axis: the mask's two token axes and the ids' are one length, or the graph cannot be fed
        axes = {"input_ids": {0: "packs", 1: "tokens"}, "position_ids": {0: "packs", 1: "tokens"},
                "attention_mask": {0: "packs", 2: "tokens", 3: "tokens"}, "last": {0: "packs", 1: "rows"}, "logits": {0: "packs", 1: "rows"}}
    else:
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0  # trace the padded path too
        wrapper, args, inputs = wrapped(model, pooled), (torch.ones(2, 8, dtype=torch.long), mask), ["input_ids", "attention_mask"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    names = {"input_names": inputs, "output_names": ["logits"]}
    if dynamo:
        dims: dict[str, torch.export.Dim] = {}
        dim = lambda name: dims.setdefault(name, torch.export.Dim(name))
        shapes = {k: {i: dim(n) for i, n in v.items()} for k, v in axes.items() if k in inputs}
        torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=18, dynamic_shapes=shapes, **names)
    else:
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)


def proto_bytes(proto) -> int:
    """The serialized size of a model, summed part by part: `ByteSize()` of the whole raises once it passes 2 GiB,
    while no single tensor, node or function of a model we export comes near that."""
    g = proto.graph
    return sum(x.ByteSize() for part in (g.initializer, g.sparse_initializer, g.node, proto.functions) for x in part)


def save(proto, path: Path) -> None:
    """One .onnx file or, above EXTERNAL_DATA_BYTES, the graph plus one `<name>.data` file."""
    import onnx

    external = proto_bytes(proto) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=f"{path.name}.data")


# Numerically fragile in fp16: attention's softmax, tanh (Gemma's soft-capping, tanh-GELU) and LayerNorm's variance.
FRAGILE_OPS = ("Softmax", "Tanh", "LayerNormalization")


def keep_fp32(proto, ops: tuple[str, ...] = FRAGILE_OPS) -> int:
    """Run `ops` in fp32 inside an fp16 graph: their fp16 inputs are cast up, their fp16 outputs cast back down.
    Returns how many nodes were pinned. (transformers' RMSNorm already upcasts, so its graph is fp32 there.)"""
    from onnx import TensorProto, helper

    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    half = lambda name: bool(name) and types.get(name) == TensorProto.FLOAT16
    nodes, pinned = [], 0
    for node in g.node:
        if node.op_type not in ops or not half(node.input[0]):
            nodes.append(node)
            continue
        for i, name in enumerate(list(node.input)):
            if half(name):
                node.input[i] = f"{name}/fp32_in{pinned}"
                nodes.append(helper.make_node("Cast", [name], [node.input[i]], to=TensorProto.FLOAT))
        down = []
        for j, name in enumerate(list(node.output)):
            if half(name):
                node.output[j] = f"{name}/fp32"
                down.append(helper.make_node("Cast", [node.output[j]], [name], to=TensorProto.FLOAT16))
        nodes += [node, *down]
        pinned += 1
    g.ClearField("node")
    g.node.extend(nodes)
    return pinned


def int8_weights(model: Path, scratch: Path, packed: bool = False):
    """Int8 whose rows never depend on their batch mates. Whole rows: dynamic int8 (quantize_dynamic), s8 weights
    per output channel in 7 bits, activations quantized at run time with one scale per run's tensor, so the kernel
    runs each row alone (max_batch_of: 1), and a row's scores are its own by construction. Run so, a MiniLM bundle
    ran at 2.7-3.2x PyTorch fp32 on 2 cores (bench/speed.py), where per-row MatMulNBits int8 ran at 0.74-0.90x fp32
    (docs/batch-independence.md, issue 43); the 7 bits keep AVX2's u8 x s8 sums from saturating on CPUs
    without VNNI, and cost no MAP@3 measured. Packed rows share a run whatever its size: there, 8-bit MatMulNBits
    with accuracy_level 4, which quantizes each row's activations on their own (32 values at a time)."""
    if packed:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(str(model), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        return quantizer.model.model
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = scratch / f"int8-{model.name}"
    quantize_dynamic(
        model, out, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, use_external_data_format=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # for tensors whose type shape inference leaves unknown
    )
    return onnx.load(str(out))


def max_batch_of(precision: str, packed: bool) -> int | None:
    """The most rows one run of the exported graph may hold (MemberSpec.max_batch): 1 for whole rows at int8
    (int8_weights: one activation scale a run)."""
    return 1 if precision == "int8" and not packed else None


def int4_weights(model: Path, scratch: Path, packed: bool = False):
    """Weight-only 4-bit MatMuls (MatMulNBits), blocks of 32: models too big for a T4 in fp16."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(model), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


@dataclass(frozen=True)
class Precision:
    """How a model is exported at one precision."""

    half: bool  # load and export in fp16: a 2-3B model never sits in RAM in fp32; fragile ops stay fp32 (keep_fp32)
    quantize: Callable | None = None  # (model file, scratch folder, packed) -> quantized proto

    @property
    def fuses(self) -> bool:
        """onnxruntime's attention fusions match fp32 graphs only."""
        return not self.half


EXPORT_PRECISIONS = {
    "fp32": Precision(half=False),
    "fp16": Precision(half=True),
    "int8": Precision(half=False, quantize=int8_weights),
    "int4": Precision(half=True, quantize=int4_weights),
}


def write_onnx(merged: str | os.PathLike, path: Path, precision: str, fusion: str, pooled: bool = False, packed: bool = False) -> None:
    """model.onnx at `precision` (EXPORT_PRECISIONS): exported, fused where the family has a fusion, quantized.
    `pooled`: a bare encoder's sentence embedding instead of a classifier's logits; `packed`: a decoder's packed
    forward (to_onnx)."""
    import onnx
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    how = EXPORT_PRECISIONS[precision]
    fusion = fusion if how.fuses else ""
    kwargs: dict = {"dtype": torch.float16 if how.half else torch.float32}  # never the checkpoint's stored dtype
    if fusion:
        kwargs["attn_implementation"] = "eager"  # the fusions match the eager attention pattern, not SDPA's
    model = (AutoModel if pooled else AutoModelForSequenceClassification).from_pretrained(merged, **kwargs).eval()
    config = model.config
    # Exporters may write a file per large tensor: export into scratch, keep one model file (+ one .data).
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        src = Path(scratch) / path.name
        to_onnx(model, src, dynamo=how.half, pooled=pooled, packed=packed)
        del model
        data = src.with_name(f"{src.name}.data")
        # Weights past the limit that the exporter wrote to one data file stay in it: only the graph is loaded and
        # edited (loading them too cost 2 bytes a parameter more in fp16). Fusions read the weights: small encoders.
        in_place = not fusion and data.is_file() and data.stat().st_size > EXTERNAL_DATA_BYTES and locations(src) == {data.name}
        proto = onnx.load(str(src), load_external_data=not in_place)
        if how.half:
            keep_fp32(proto)
        if fusion:
            from onnxruntime.transformers.optimizer import optimize_model

            # Attention, SkipLayerNormalization and BiasGelu: faster on CPU in fp32 and in int8, whose MatMuls are the rest.
            proto = optimize_model(proto, model_type=fusion, num_heads=config.num_attention_heads, hidden_size=config.hidden_size).model
        if how.quantize:  # from a file, with this proto freed first: the quantizer loads its own copy
            work = Path(scratch) / "quantize"
            work.mkdir()
            source = src if in_place else work / path.name
            onnx.save_model(proto, str(source), **({} if in_place else {"save_as_external_data": True, "location": f"{path.name}.data"}))
            del proto
            save(how.quantize(source, work, packed), path)
        elif in_place:
            onnx.save_model(proto, str(path))  # the edited graph, naming the data file it moves beside it
            os.replace(data, path.with_name(data.name))
        else:
            save(proto, path)


# A quantized model may cost at most this much MAP@3 on the held-out rows. int8 MiniLM moves about 1% of the
# kernel's top-1 predictions either way at no net cost, so a limit on flips refused sound exports by chance.
MAX_MAP3_DROP = 0.005


def reference_model(folder: str | os.PathLike, pooled: bool = False, run: bool = False):
    """The drift reference: PyTorch fp32, whatever dtype the folder stores, on the GPU when there is one (a 9B model
    over a thousand rows takes hours on a CPU); `run`: a run folder's base and adapter, as merge loads them. Returns
    the model and what it is, for the record."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if run:
        from .merge import load_trained_model

        model = load_trained_model(folder)
    else:
        model = (AutoModel if pooled else AutoModelForSequenceClassification).from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval(), f"PyTorch fp32 on {device}"


def measure_drift(got: np.ndarray, reference: np.ndarray, allowed: np.ndarray, truth: list[str], labels: list[str]) -> dict:
    """How far ONNX logits stray from PyTorch fp32: raw, in the prediction the kernel makes (masked top-1), and in
    the MAP@3 it scores on these labelled rows."""
    masked = lambda z: np.where(allowed, z, -np.inf).argmax(1)
    return {
        "rows": len(got),
        "max_abs_logit_diff": float(np.abs(got - reference).max()),
        "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
        "masked_top1_agreement": float((masked(got) == masked(reference)).mean()),
        "map3_reference": masked_map3(truth, reference, labels, allowed),
        "map3_onnx": masked_map3(truth, got, labels, allowed),
    }


def check_finite(got: np.ndarray, reference: np.ndarray, merged: str | os.PathLike) -> None:
    """Refuse NaN or inf logits, --force or not: they compare false against every threshold, so an all-NaN model
    would pass the MAP@3 gate with top-1 agreement 1.000."""
    for what, z, fix in (("PyTorch fp32", reference, "train it again"), ("ONNX", got, "export it at another --quantize")):
        if rows := int((~np.isfinite(z)).any(1).sum()):
            raise MapbuildError(f"{merged}: its {what} logits hold NaN or inf on {rows} of {len(z)} held-out rows; {fix}")


FP16_MAX = 65504.0  # float16's largest finite value: past it a T4's fp16 activation is inf


def computes_in_fp16(precision: str, engine: str) -> bool:
    """Whether an export at `precision` runs its activations in fp16 on a T4: an fp16 or int4 graph (MatMulNBits
    dequantizes to fp16), fp16 or nf4 torch weights."""
    return precision in ("fp16", "nf4") if engine == TORCH else EXPORT_PRECISIONS[precision].half


def check_activations(folder, names: list[str], peaks: np.ndarray, row_ids: np.ndarray, precision: str, fp16: bool, force: bool) -> None:
    """Refuse a model whose PyTorch fp32 activations are NaN or inf in some module on held-out rows, --force or not,
    or (where the export computes in `fp16`, unless `force`) past fp16's largest value: the first such module in the
    model's order, where the trouble starts, named with its rows. Qwen3 and Gemma are trained in bf16, whose range
    fp16 lacks (QwenLM/Qwen3#868)."""
    broken = ~np.isfinite(peaks)
    over = broken | (peaks > (FP16_MAX if fp16 and not force else np.inf))
    if not over.any():
        return
    j = int(np.argmax(over.any(0)))
    rows = np.flatnonzero(over[:, j])
    shown = ", ".join(map(str, row_ids[rows[:5]])) + (", ..." if len(rows) > 5 else "")
    where = f"on {len(rows)} of {len(peaks)} held-out rows (row_id {shown})"
    if broken[:, j].any():
        raise MapbuildError(f"{folder}: its PyTorch fp32 activations hold NaN or inf from {names[j]} on, {where}; train it again")
    raise MapbuildError(
        f"--quantize {precision}: {names[j]} reaches {peaks[rows, j].max():.3g} {where}, past fp16's largest {FP16_MAX:,.0f}: "
        "on a T4 it overflows to inf; export fp32, or pass --force to keep it"
    )


def check_recorded_drift(drift: dict, folder: str | os.PathLike) -> None:
    """Refuse an ONNX folder of any kind whose recorded drift has a figure that is not a finite number (fail closed:
    one written before the export gate refused NaN, or edited since)."""
    if bad := next(((k, v) for k, v in drift.items() if isinstance(v, float) and not np.isfinite(v)), None):
        raise MapbuildError(f"{folder}: its recorded drift has {bad[0]} = {bad[1]}; export it again from a model with finite outputs")


# An fp32 export computes the trained model in the same precision: it may differ from PyTorch by rounding, which
# moves a near-tie now and then, never this share of the kernel's predictions. Below it the graph computes another
# model (a last token read wrong, a sliding window lost: issue 42), whatever the MAP@3 says on these rows.
MIN_FP32_AGREEMENT = 0.99


def check_drift(drift: dict, precision: str, force: bool, max_drop: float = MAX_MAP3_DROP) -> None:
    """Refuse, unless `force`, a model that scores more than `max_drop` MAP@3 below PyTorch fp32 on the held-out rows,
    and an fp32 one whose masked top-1 agrees with PyTorch fp32's on fewer than MIN_FP32_AGREEMENT of them."""
    if force:
        return
    drop = drift["map3_reference"] - drift["map3_onnx"]
    if not drop <= max_drop:  # a NaN drop fails too
        fix = "report it with the model's config" if precision == "fp32" else "export fp32 instead"
        raise MapbuildError(
            f"--quantize {precision} lowers MAP@3 from {drift['map3_reference']:.4f} to {drift['map3_onnx']:.4f} on {drift['rows']} "
            f"held-out rows (limit {max_drop}); {fix}, or pass --force to keep it"
        )
    if precision == "fp32" and not drift["masked_top1_agreement"] >= MIN_FP32_AGREEMENT:
        raise MapbuildError(
            f"the fp32 export agrees with PyTorch fp32 on the top label of {drift['masked_top1_agreement']:.3f} of {drift['rows']} held-out "
            f"rows (at least {MIN_FP32_AGREEMENT}): it computes another model; report it with the model's config, or pass --force to keep it"
        )


def checked_kernel_rows(tokenizer_json: Path, model_dir: str | os.PathLike, spec: MemberSpec, texts: list) -> list:
    """The kernel's token ids of `texts` (runtime.predict.kernel_rows), refused unless they equal those of the model
    folder's training tokenizer."""
    from .torch_rows import training_rows

    rows = kernel_rows(tokenizer_json, spec, texts)
    mismatched = sum(a != b for a, b in zip(rows, training_rows(load_hf_tokenizer(str(model_dir)), spec, texts)))
    if mismatched:
        raise MapbuildError(f"{model_dir}/tokenizer.json: runtime tokenizer disagrees with the training tokenizer on {mismatched} of {len(rows)} rows")
    return rows


def write_torch(merged: str | os.PathLike, folder: Path, precision: str) -> None:
    """The torch engine's files (runtime.torch_engine.TORCH_FILES) at `precision`: the weights in one safetensors
    file whatever their size (the bundle lists a member's files by role), and the config; nf4 is quantized by
    bitsandbytes as it loads (on the CPU here where there is no GPU) and saved 4-bit, its settings in the config."""
    import torch
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from runtime.torch_engine import nf4_settings

    dtype = torch.float32 if precision == "fp32" else torch.float16  # never the checkpoint's stored dtype
    four_bit = {"quantization_config": BitsAndBytesConfig(**nf4_settings(dtype)), "device_map": {"": "cpu"}} if precision == "nf4" else {}
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=dtype, **four_bit)
    model.save_pretrained(folder, max_shard_size="1000GB")


# Where a kernel finds a base: a Kaggle Model (qwen-lm/qwen-3/transformers/8b/1) or a dataset (owner/slug).
KAGGLE_SOURCE = re.compile(r"[\w.-]+/[\w.-]+(/[\w.-]+/[\w.-]+/\d+)?")


def write_adapter(run: str | os.PathLike, folder: Path, meta: dict, source: str) -> tuple[dict, Path]:
    """The files of a torch member on a base outside the bundle (runtime.torch_engine.ADAPTER_FILES): the run's peft
    adapter, its base named as `source` (the Kaggle Model or dataset the kernel attaches), and the classifier's
    config. Returns the member's `base` record (the source and the sha256 of the base's files, read now and refused
    in one line if they changed since the run trained on them, as merge refuses) and the base's folder here."""
    from transformers import AutoConfig

    from runtime.base_model import base_digests
    from runtime.torch_engine import ADAPTER_FILES

    if (Path(run) / FULL).is_dir():
        raise MapbuildError(f"{run}: fully fine-tuned (--lora-r 0), so no adapter to put on a base; merge it and export without --base-source")
    if meta.get("gguf_file"):
        raise MapbuildError(f"{run}: its base is the GGUF file {meta['gguf_file']}, which a kernel loads as no Kaggle Model; merge it and export without --base-source")
    base = base_folder(Source(meta["base_model"]))
    digests = base_digests(base)
    check_read(meta, "base_model", digests, tuple(digests))
    adapter = Path(run) / ADAPTER
    shutil.copy(adapter / ADAPTER_FILES["adapter"], folder / ADAPTER_FILES["adapter"])
    settings = json.loads((adapter / ADAPTER_FILES["adapter_config"]).read_text())
    settings["base_model_name_or_path"] = source  # not this machine's path: what the kernel attaches
    (folder / ADAPTER_FILES["adapter_config"]).write_text(json.dumps(settings, indent=2))
    labels = meta["label_space"]["labels"]
    AutoConfig.from_pretrained(base, **classifier_settings(labels), pad_token_id=meta["pad_token_id"]).save_pretrained(folder)
    return {"source": source, "files": digests}, base


def export(
    merged: str | os.PathLike, out: str | os.PathLike, quantize: str = "fp32", rows: int = 1024, force: bool = False, engine: str = "onnx",
    base_source: str | None = None,
) -> dict:
    """Write OUT with the model for `engine` (onnx: model.onnx; torch: safetensors weights and config), tokenizer.json
    and the drift against PyTorch fp32 on held-out rows. `base_source`: `merged` is a run folder instead, and the torch
    member carries its adapter alone, on the base the kernel attaches as that Kaggle Model or dataset."""
    from .torch_rows import logits_and_peaks, whole

    torch_engine = engine == TORCH
    one_of(quantize, TORCH_PRECISIONS if torch_engine else EXPORT_PRECISIONS, f"--quantize (--engine {engine})")
    if base_source is not None and not torch_engine:
        raise MapbuildError(f"--base-source needs --engine {TORCH}: an ONNX graph holds its weights")
    if base_source is not None and not KAGGLE_SOURCE.fullmatch(base_source):
        raise MapbuildError(f"--base-source {base_source!r}: give a Kaggle Model as OWNER/MODEL/FRAMEWORK/VARIATION/VERSION, or a dataset as OWNER/SLUG")
    meta = read_meta(merged, "run" if base_source is not None else "merged")
    check_data(meta, meta["config"]["data"], "restore the file, or train again")  # the held-out rows come from it
    record = StageMeta.from_json(meta)
    packed = record.inputs == PACKED
    if packed:
        record = replace(record, pack_tokens=record.pack_tokens or PACK_TOKENS)  # the kernel's pack size, and its pace's
    record = replace(record, precision=quantize, max_batch=None if torch_engine else max_batch_of(quantize, packed))  # as the kernel runs it
    sample = held_out_rows(meta, rows)
    space = LabelSpace.from_json(meta["label_space"])
    tokenizer = Path(merged) / ("tokenizer" if base_source is not None else "")  # a run keeps its tokenizer in a folder
    with atomic_dir(out, "onnx") as tmp:
        shutil.copy(tokenizer / "tokenizer.json", tmp / FILES["tokenizer"])
        kernel = checked_kernel_rows(tmp / FILES["tokenizer"], tokenizer, record, prompts(record, sample, space))
        base, base_dir = write_adapter(merged, tmp, meta, base_source) if base_source is not None else (None, None)
        if torch_engine:
            if base is None:
                write_torch(merged, tmp, quantize)
            import torch

            # the kernel's own engine, as it loads it
            forward, threads = torch_forward(tmp, quantize, base=base_dir), torch.get_num_threads()
        else:
            write_onnx(merged, tmp / FILES["model"], quantize, FAMILIES[record.model_type].ort_fusion, packed=packed)
            forward, threads = onnx_session(tmp / FILES["model"], record, threads=KERNEL_THREADS), KERNEL_THREADS  # a CPU pace is the kernel's
        with shut(forward):
            start = time.perf_counter()
            got = run_rows(forward, record, kernel, 32, engine)  # packed as the kernel packs, rows alone where it runs them alone
            seconds = time.perf_counter() - start
        provider = forward.provider
        del forward  # the session, then the fp32 reference: never both in memory (a CPU session upcasts fp16 weights)
        model, what = reference_model(merged, run=base is not None)
        ids = whole(record, kernel)
        # unpacked: so the drift of a packed graph includes any error of packing itself
        reference, names, peaks = logits_and_peaks(model, ids, record.pad_token_id, desc="torch")
        check_activations(merged, names, peaks, sample["row_id"].to_numpy(), quantize, computes_in_fp16(quantize, engine), force)
        check_finite(got, reference, merged)
        drift = measure_drift(got, reference, space.candidate_mask(sample), labels_of(sample).tolist(), space.labels)
        drift |= {"reference": what, f"{engine}_provider": provider}
        check_drift(drift, quantize, force)
        write_meta(tmp, replace(
            record,
            stage="onnx",
            # exported from a run, it is its own run, as merge records one
            **({"merged": str(Path(merged).resolve())} if base is None else {"run": str(Path(merged).resolve()), "read": {**(meta.get("read") or {}), "run": {"path": str(Path(merged).resolve()), "files": meta.get("files") or folder_files(Path(merged))}}}),
            engine=TORCH if torch_engine else None,
            base=base,
            drift=drift,
            # the CPU pace is the kernel's plan when its sessions land on the CPU: only a CPU session measures it
            **({"cpu_rows_per_s": round(len(ids) / seconds, 1), "cpu_threads": threads} if provider == CPU else {"cuda_rows_per_s": round(len(ids) / seconds, 1)}),
            params=sum(p.numel() for p in model.parameters()),
            # what a row costs the kernel: its share of the packs where packed
            mean_tokens=round((packed_tokens(kernel, record.pack_tokens) if packed else sum(map(len, ids))) / len(ids), 1),
        ))
    return drift
